"""Fusion in the plan: the blocks of a UNet, fusion levels, folds chosen from measurements, plan files."""

from __future__ import annotations

import pytest

from workbench import blocks
from workbench.fusion import Fusion, fusible_chain, prologue_chain
from workbench.kernels.registry import all_candidates, find
from workbench.model import Model, conv_layer, pool_layer, random_params, reference_unet, unary_layer
from workbench.plan import LayerPlan, Plan, PlanError, choose_plan

NNPACK_WT = "nnpack:wt8x8:precompute"
NCHWC = "tvm:direct_nchwc"


def _record(layer, impl, ms, fusion="", prologue=(), epilogue=()):
    return {"layer": layer, "impl": impl, "status": "ok", "numerics_ok": True, "median_ms": ms,
            "fusion": fusion, "prologue": list(prologue), "epilogue": list(epilogue)}


def test_the_unet_blocks_follow_the_graph():
    model = reference_unet()
    pools = [c.name for c in model.convs if prologue_chain(model, c)]
    assert pools == ["enc1_conv1", "enc2_conv1", "enc3_conv1", "enc4_conv1"]  # the first conv after each pool
    decoders = [c.name for c in model.convs if fusible_chain(model, c, ("relu", "resize", "add"))[:1] == ("resize",)]
    assert decoders == ["dec3_reduce", "dec2_reduce", "dec1_reduce", "dec0_reduce"]
    skips = [c.name for c in model.convs if c.name.endswith("conv2") and c.name.startswith("enc")]
    assert all(fusible_chain(model, model.layer(s), ("relu", "resize", "add")) == () for s in skips)  # read twice


def test_a_pool_that_overlaps_or_has_two_readers_is_not_a_prologue():
    a = conv_layer("a", "input", (1, 3, 16, 16), 4)
    pool = pool_layer("pool", "a", a.output_shape, kernel=3, stride=2, pad=1)
    b = conv_layer("b", "pool", pool.output_shape, 4)
    model = Model("overlap", [a, pool, b], random_params([a, b]), a.input_shape)
    assert prologue_chain(model, b) == ()
    pool2 = pool_layer("pool", "a", a.output_shape)
    relu = unary_layer("relu", "relu", "pool", pool2.output_shape)
    c = conv_layer("c", "relu", relu.output_shape, 4)
    d = conv_layer("d", "pool", pool2.output_shape, 4)  # a second reader of the pooled value
    model = Model("two", [a, pool2, relu, c, d], random_params([a, c, d]), a.input_shape)
    assert prologue_chain(model, c) == ()
    assert prologue_chain(model, d) == ()  # the pool is also read by relu


def test_fusion_labels_and_odd_pool_inputs():
    model = reference_unet()
    group = Fusion.of(prologue=(model.layer("enc1_pool"), model.layer("enc1_pool_relu")),
                      epilogue=(model.layer("enc1_relu1"),))
    assert group.label == "maxpool+relu > conv > relu" and group.pool == 2 and group.pool_in == (192, 192)
    assert Fusion().label == "conv"


def test_fusion_levels_of_one_plan(small_model):
    plan = Plan.uniform(small_model, NCHWC)
    folded = plan.with_fusion(small_model, "folded")
    assert folded.layers["enc1_conv1"].prologue == ("maxpool", "relu")
    assert folded.layers["dec0_reduce"].fuse == ("resize", "add", "relu")
    assert folded.elementwise == "hand"
    groups = plan.with_fusion(small_model, "2018")
    assert all(e.prologue == () and e.fuse in ((), ("relu",)) for e in groups.layers.values())
    assert groups.layers["enc0_conv1"].fuse == ("relu",) and groups.elementwise == "hand"
    none = plan.with_fusion(small_model, "none")
    assert all(e.prologue == () and e.fuse == () for e in none.layers.values()) and none.elementwise == "separate"
    with pytest.raises(PlanError, match="unknown fusion level"):
        plan.with_fusion(small_model, "everything")


def test_plan_files_keep_prologue_knobs_and_elementwise(small_model, tmp_path):
    plan = Plan.uniform(small_model, NCHWC)
    entry = plan.layers["enc1_conv1"]
    plan.layers["enc1_conv1"] = LayerPlan(entry.layer, "tvm:direct_nchw", entry.fuse, entry.prologue,
                                          {"epilogue": "row", "vec": 8})
    plan.validate(small_model)
    again = Plan.load(plan.save(tmp_path / "plan.json"))
    assert again.layers == plan.layers and again.elementwise == plan.elementwise
    assert again.candidate("enc1_conv1").knobs(small_model.layer("enc1_conv1")).epilogue == "row"
    edited = Plan.from_frame(plan.frame(), plan.model)  # knobs as "vec=8, epilogue=row" in the frame
    assert edited.layers == plan.layers and edited.elementwise == plan.elementwise
    bad = dict(plan.layers, enc1_conv1=LayerPlan("enc1_conv1", "tvm:direct_nchw", ("relu",), (), {"unroll_kw": "no"}))
    with pytest.raises(PlanError, match="unroll_kw.*true or false"):
        Plan(plan.model, bad).validate(small_model)
    old = {k: v for k, v in plan.to_dict().items() if k != "elementwise"}
    assert Plan.from_dict(old).elementwise == "relax"  # plans from before the hand kernels keep TVM's groups


def test_plans_that_ask_the_impossible_fail_clearly(small_model):
    plan = Plan.uniform(small_model, NCHWC)
    nn = dict(plan.layers, enc1_conv1=LayerPlan("enc1_conv1", NNPACK_WT, ("relu",), ("maxpool", "relu")))
    with pytest.raises(PlanError, match=r"enc1_conv1.*cannot take \['maxpool', 'relu'\].*legal prologues"):
        Plan(plan.model, nn).validate(small_model)
    wrong_place = dict(plan.layers, enc0_conv1=LayerPlan("enc0_conv1", NCHWC, ("relu",), ("maxpool", "relu")))
    with pytest.raises(PlanError, match="enc0_conv1.*legal prologues here: \\[\\[\\]\\]"):
        Plan(plan.model, wrong_place).validate(small_model)
    knobs_on_nnpack = dict(plan.layers, head_conv=LayerPlan("head_conv", NNPACK_WT, (), (), {"vec": 4}))
    with pytest.raises(PlanError, match="head_conv.*has no knobs"):
        Plan(plan.model, knobs_on_nnpack).validate(small_model)
    unknown = dict(plan.layers, head_conv=LayerPlan("head_conv", NCHWC, (), (), {"speed": 11}))
    with pytest.raises(PlanError, match=r"head_conv.*no knob\(s\) \['speed'\]"):
        Plan(plan.model, unknown).validate(small_model)
    misfit = dict(plan.layers, head_conv=LayerPlan("head_conv", NCHWC, (), (), {"ow_bn": 7}))
    with pytest.raises(PlanError, match="head_conv.*ow_bn"):
        Plan(plan.model, misfit).validate(small_model)
    with pytest.raises(PlanError, match="'knobs' must be an object"):
        Plan.from_dict({"layers": [{"layer": "head_conv", "impl": NCHWC, "knobs": [1]}]})
    with pytest.raises(PlanError, match="'prologue' must be a list"):
        Plan.from_dict({"layers": [{"layer": "head_conv", "impl": NCHWC, "prologue": "maxpool"}]})
    with pytest.raises(PlanError, match="'elementwise'"):
        Plan.from_dict({"elementwise": "fastest", "layers": []})


def test_a_block_is_folded_only_where_it_measured_faster(small_model):
    isolated = [_record(c.name, "tvm:direct_nchw", 1.0) for c in small_model.convs]
    isolated += [_record("enc1_conv1", NCHWC, 1.2), _record("dec0_reduce", NCHWC, 1.1)]
    separate = [_record("enc1_pool_relu", "tvm:maxpool_relu", 0.3, fusion="maxpool+relu"),
                _record("dec0_add_relu", "tvm:resize_add_relu", 0.4, fusion="resize+add+relu")]
    folds = [
        # enc1_conv1: 1.2 folded against 1.0 + 0.3 apart: folded, onto the folding kernel
        _record("enc1_conv1", NCHWC, 1.2, "maxpool+relu > conv > relu", ("maxpool", "relu"), ("relu",)),
        # dec0_reduce: 1.5 folded against 1.0 + 0.4 apart: kept apart
        _record("dec0_reduce", NCHWC, 1.5, "conv > resize+add+relu", (), ("resize", "add", "relu")),
        # dec1_reduce: folded fast, but its separate kernel was never measured: kept apart
        _record("dec1_reduce", NCHWC, 0.5, "conv > resize+add+relu", (), ("resize", "add", "relu")),
    ]
    plan = choose_plan(small_model, isolated + separate + folds)
    assert plan.layers["enc1_conv1"] == LayerPlan("enc1_conv1", NCHWC, ("relu",), ("maxpool", "relu"))
    assert plan.layers["dec0_reduce"] == LayerPlan("dec0_reduce", "tvm:direct_nchw")
    assert plan.layers["dec1_reduce"].fuse == ()
    assert plan.layers["enc0_conv1"].fuse == ("relu",)  # the 2018 conv+bias+ReLU
    assert any("enc1_conv1: folded" in note for note in plan.notes)
    unfused = choose_plan(small_model, isolated + separate + folds, fuse=False)
    assert all(e.fuse == () and e.prologue == () for e in unfused.layers.values())


def test_block_variants_take_the_fastest_folding_kernels(small_model):
    candidates = all_candidates()
    records = [_record("dec0_reduce", impl, ms) for impl, ms in
               ((NNPACK_WT, 0.1), (NCHWC, 0.5), ("tvm:direct_nchw", 0.7), ("tvm:default", 0.9))]
    variants = blocks.block_variants(small_model, records, candidates, top=2)
    assert [(c.name, k.impl) for c, k, _ in variants] == [("dec0_reduce", NCHWC), ("dec0_reduce", "tvm:direct_nchw")]
    assert variants[0][2] == Fusion(scale=2, add=True, relu=True)  # NNPACK cannot fold: skipped
    assert find(NNPACK_WT, candidates).prologue_fusible == ()


# ---------------------------------------------------------------- the three builds of one plan

@pytest.fixture(scope="module")
def levels(small_model):
    """One plan on tvm:direct_nchwc built unfused, with the 2018 groups, and folded."""
    from workbench.build import build_hybrid, compile_hybrid
    from workbench.model import reference_output, sample_input
    from workbench.rpc import host_target

    plan = Plan.uniform(small_model, NCHWC)
    x = sample_input(small_model)
    built = {level: compile_hybrid(build_hybrid(small_model, plan.with_fusion(small_model, level), host_target(2)))
             for level in ("none", "2018", "folded")}
    return built, x, reference_output(small_model, x)


@pytest.mark.parametrize("level", ["none", "2018", "folded"])
def test_every_fusion_level_matches_the_reference(levels, small_model, level):
    from workbench import hybrid

    built, x, ref = levels
    result = hybrid.run_local(built[level], x, reference=ref, threads=2)
    assert result["numerics_ok"], result["rel_err"]
    symbols = set(hybrid.profile_layers(built[level], x, threads=2, runs=1).symbol)
    hand = {s for s in symbols if s.startswith(("maxpool_relu_", "resize_add_relu_"))}
    if level == "2018":  # the study's groups: one hand kernel per pool and per decoder merge
        assert len(hand) == len(fused_groups(small_model))
    else:
        assert not hand


def test_folding_leaves_fewer_kernels(levels):
    from workbench import hybrid

    built, x, _ = levels
    calls = {level: len(hybrid.profile_layers(exe, x, threads=2, runs=1)) for level, exe in built.items()}
    assert calls["folded"] < calls["2018"] < calls["none"], calls


def fused_groups(model):
    from workbench.kernels.fused import elementwise_groups

    return elementwise_groups(model)


def test_a_pool_the_hand_kernel_cannot_compute_runs_as_a_plain_op():
    from workbench import hybrid
    from workbench.build import build_hybrid, compile_hybrid
    from workbench.model import reference_output, sample_input
    from workbench.rpc import host_target

    a = conv_layer("a", "input", (1, 3, 16, 16), 4)
    pool = pool_layer("pool", "a", a.output_shape, kernel=3, stride=2, pad=1)
    relu = unary_layer("relu", "relu", "pool", pool.output_shape)
    b = conv_layer("b", "relu", relu.output_shape, 4)
    model = Model("overlap", [a, pool, relu, b], random_params([a, b]), a.input_shape)
    plan = Plan.uniform(model, NCHWC, fuse="2018")
    assert plan.elementwise == "hand" and plan.layers["b"].prologue == ()
    x = sample_input(model)
    result = hybrid.run_local(compile_hybrid(build_hybrid(model, plan, host_target(2))), x,
                              reference=reference_output(model, x), threads=2)
    assert result["numerics_ok"], result["rel_err"]


def test_a_composed_variant_lands_in_the_exported_hybrid(small_model, tmp_path):
    from workbench import composer, hybrid, load_hybrid
    from workbench.model import reference_output, sample_input
    from workbench.rpc import host_target

    plan = Plan.uniform(small_model, NCHWC, fuse="2018")
    variant = composer.make_variant(small_model, "enc1_conv1", "winograd_2", ("pool-relu", "relu"), tile_bn=2)
    composer.use_in_plan(plan, small_model, variant)
    entry = plan.layers["enc1_conv1"]
    assert (entry.impl, entry.prologue, entry.knobs["tile_bn"]) == ("tvm:winograd_2", ("maxpool", "relu"), 2)
    partial = dict(plan.layers, dec0_reduce=LayerPlan("dec0_reduce", "tvm:winograd_4",
                                                      ("resize", "add", "relu"), (), {"oc_bn": 4}))
    plan = Plan(plan.model, partial, elementwise="hand")
    out = hybrid.export_hybrid(small_model, plan, tmp_path / "hybrid", host_target(2), threads=2)
    saved = Plan.load(out / "plan.json")
    assert saved.layers["enc1_conv1"] == entry and saved.layers["dec0_reduce"].knobs == {"oc_bn": 4}
    x = sample_input(small_model)
    loaded = load_hybrid(out, threads=2)
    assert hybrid.check_output(loaded(x), reference_output(small_model, x))["numerics_ok"]


def test_two_conv_branches_into_one_add_fold_it_once(tmp_path):
    from workbench import hybrid
    from workbench.build import build_hybrid, compile_hybrid
    from workbench.model import add_layer, reference_output, resize_layer, sample_input
    from workbench.rpc import host_target

    pool = pool_layer("pool", "input", (1, 4, 16, 16))
    low = conv_layer("low", "pool", pool.output_shape, 4)
    up = resize_layer("up", "low", low.output_shape)
    lateral = conv_layer("lateral", "input", (1, 4, 16, 16), 4, kernel=1, pad=0)
    merge = add_layer("merge", "lateral", "up", up.output_shape)
    relu = unary_layer("merge_relu", "relu", "merge", merge.output_shape)
    head = conv_layer("head", "merge_relu", relu.output_shape, 2)
    layers = [pool, low, up, lateral, merge, relu, head]
    model = Model("fpn", layers, random_params(layers), (1, 4, 16, 16))
    plan = Plan.uniform(model, "tvm:default")
    assert plan.layers["low"].fuse == ("resize", "add", "relu") and plan.layers["lateral"].fuse == ()
    both = dict(plan.layers, lateral=LayerPlan("lateral", "tvm:default", ("add", "relu")))
    with pytest.raises(PlanError, match=r"'lateral'.*cannot fuse \['add', 'relu'\]"):  # the resize side took it
        Plan(plan.model, both).validate(model)
    x = sample_input(model)
    result = hybrid.run_local(compile_hybrid(build_hybrid(model, plan, host_target(2))), x,
                              reference=reference_output(model, x), threads=2)
    assert result["numerics_ok"], result["rel_err"]


def test_one_compiled_model_under_two_names_is_timed_once(small_model, device, levels):
    from workbench.baselines import measure_baselines
    from workbench.measure import TimingConfig

    built, x, _ = levels
    quick = TimingConfig(number=1, repeat=2, min_repeat_ms=5)
    results = measure_baselines(small_model, device, 2, quick, names=[], x=x,
                                extra={"hybrid": built["2018"], "groups_2018": built["2018"], "unfused": built["none"]})
    by_name = {r["name"]: r for r in results}
    assert by_name["groups_2018"]["median_ms"] == by_name["hybrid"]["median_ms"]
    assert by_name["groups_2018"]["note"] == "the same executable as hybrid"
    assert by_name["unfused"]["numerics_ok"] and by_name["unfused"]["median_ms"] != by_name["hybrid"]["median_ms"]
