"""The composer's logic on a small UNet, measured on a real local cluster (no widgets)."""

import dataclasses

import pytest

from workbench import composer, schedules
from workbench.errors import WorkbenchError
from workbench.measure import TimingConfig
from workbench.plan import Plan

TIMING = TimingConfig(number=1, repeat=2, min_repeat_ms=1)


def test_blocks_name_the_fusions_the_graph_allows(small_model):
    found = {b.name: b for b in composer.blocks(small_model)}
    assert list(found) == [c.name for c in small_model.convs]
    assert sorted(found["enc0_conv1"].toggles) == ["relu"]
    assert sorted(found["enc1_conv1"].toggles) == ["pool-relu", "relu"]
    assert sorted(found["dec1_reduce"].toggles) == ["resize-add-relu"]
    assert found["enc0_conv2"].toggles == {}  # its output is the skip and the pool's input
    assert "maxpool+relu > conv > relu" in found["enc1_conv1"].title
    kinds = composer.example_blocks(small_model)
    assert [b.name for b in kinds.values()] == ["enc0_conv1", "enc1_conv1", "dec1_reduce"]


def test_toggles_become_fusions_and_back(small_model):
    pool_block = composer.block(small_model, "enc1_conv1")
    fusion = pool_block.fusion(("pool-relu", "relu"))
    assert fusion.pool == 2 and fusion.pool_relu and fusion.relu
    assert pool_block.toggles_of(fusion) == ("pool-relu", "relu")
    assert pool_block.fusion(()).label == "conv"
    available = composer.available_toggles(pool_block)
    assert available == ("pool-relu", "relu")
    with pytest.raises(composer.ComposerError, match="resize-add-relu"):
        pool_block.fusion(("resize-add-relu",))
    with pytest.raises(composer.ComposerError, match="enc0_conv1"):
        composer.block(small_model, "nope")


def test_variant_keys_are_stable_and_knobs_checked(small_model):
    a = composer.make_variant(small_model, "enc0_conv1", "direct_nchw", ("relu",), ow_bn=8, vec=8)
    b = composer.make_variant(small_model, "enc0_conv1", "direct_nchw", ("relu",), vec=8, ow_bn=8)
    c = composer.make_variant(small_model, "enc0_conv1", "direct_nchw", ("relu",), ow_bn=8, vec=4)
    assert a.key == b.key != c.key
    assert "ow_bn=8" in a.knob_text and "vec=8" in a.knob_text
    with pytest.raises(schedules.KnobError, match="ow_bn"):
        composer.make_variant(small_model, "enc0_conv1", "direct_nchw", ow_bn=7)
    with pytest.raises(composer.ComposerError, match="no knob"):
        composer.make_variant(small_model, "enc0_conv1", "direct_nchw", tile=3)
    with pytest.raises(WorkbenchError, match="does not run"):
        composer.make_variant(small_model, "enc0_conv1", "winograd_9")
    choices = composer.knob_choices("direct_nchw", small_model.layer("enc0_conv1"))
    assert choices["ow_bn"] == schedules.divisors(48) and choices["epilogue"] == list(schedules.EPILOGUE_DIRECT)


def test_try_variant_measures_caches_and_diffs(small_model, device):
    comp = composer.Composer(small_model, device, TIMING)
    first = comp.try_variant(comp.variant("enc0_conv1", "direct_nchw", ("relu",)))
    assert first.status == "ok" and first.numerics_ok and first.median_ms > 0
    assert "T.max" in first.tir or "max(" in first.tir  # the fused ReLU is in the program
    assert "reverse_compute_at" in first.trace  # epilogue=tile places the ReLU stage in the tile
    assert first.diff == "" and "ms ✓ numerics ok" in first.summary and "epilogue=tile" in first.summary

    moved = comp.try_variant(comp.variant("enc0_conv1", "direct_nchw", ("relu",), epilogue="separate"))
    assert moved.usable and moved.diff.startswith("---") and "epilogue=separate" in moved.diff.splitlines()[1]

    again = comp.try_variant(comp.variant("enc0_conv1", "direct_nchw", ("relu",)))
    assert again.cached and again.median_ms == first.median_ms and again.tir == first.tir
    assert again.diff  # against the 'separate' variant tried just before
    assert len(comp.history("enc0_conv1")) == 3
    assert comp.best("enc0_conv1").median_ms == min(first.median_ms, moved.median_ms)

    plain = comp.try_variant(comp.variant("enc0_conv1", "direct_nchw", ()))
    assert plain.usable and "T.max" not in plain.tir
    relu = comp.blocks["enc0_conv1"].fusion(("relu",))
    assert comp.best("enc0_conv1", relu).median_ms == min(first.median_ms, moved.median_ms)  # like with like
    assert comp.best("enc0_conv1", plain.variant.fusion).variant == plain.variant


def test_a_wrong_variant_is_marked_and_never_best(small_model, device):
    from workbench.measure import ConvCase

    comp = composer.Composer(small_model, device, TIMING)
    variant = comp.variant("enc0_conv1", "direct_nchw", ("relu",))
    layer = small_model.layer("enc0_conv1")
    case = composer.conv_case(small_model, layer, variant.fusion)
    # The reference of the unfused conv: the kernel's ReLU makes its output wrong against it.
    comp._cases[(layer.name, variant.fusion)] = dataclasses.replace(
        case, reference=ConvCase.from_model(small_model, layer).reference)
    wrong = comp.try_variant(variant)
    assert wrong.status == "wrong" and not wrong.usable and wrong.summary.split(" ms ")[1].startswith("✗ wrong")
    assert comp.best("enc0_conv1") is None


def test_use_in_plan_validates(small_model):
    plan = Plan.uniform(small_model)
    variant = composer.make_variant(small_model, "dec0_conv", "direct_nchwc", ("relu",), epilogue="row")
    composer.use_in_plan(plan, small_model, variant)
    entry = plan.layers["dec0_conv"]
    assert (entry.impl, entry.fuse, entry.prologue) == ("tvm:direct_nchwc", ("relu",), ())
    assert entry.knobs == dataclasses.asdict(variant.knobs) and entry.knobs["epilogue"] == "row"
    pooled = composer.make_variant(small_model, "enc1_conv1", "direct_nchw", ("pool-relu", "relu"))
    composer.use_in_plan(plan, small_model, pooled)
    assert plan.layers["enc1_conv1"].prologue == ("maxpool", "relu")
    assert Plan.from_json(plan.to_json()).layers["enc1_conv1"] == plan.layers["enc1_conv1"]  # it survives saving
    before = plan.layers["enc0_conv1"]
    bad = dataclasses.replace(composer.make_variant(small_model, "enc0_conv1", "direct_nchw"), impl="winograd_9")
    with pytest.raises(WorkbenchError):
        composer.use_in_plan(plan, small_model, bad)
    assert plan.layers["enc0_conv1"] == before  # a variant the plan refuses leaves it as it was


def test_fused_blocks_measure_against_the_whole_chain(small_model, device):
    comp = composer.Composer(small_model, device, TIMING)
    pooled = comp.try_variant(comp.variant("enc1_conv1", "direct_nchw"))  # every available toggle on
    assert pooled.variant.fusion.label == "maxpool+relu > conv > relu"
    assert pooled.usable, pooled.note
    decoder = comp.try_variant(comp.variant("dec1_reduce", "direct_nchw", ("resize-add-relu",)))
    assert decoder.variant.fusion.label == "conv > resize+add+relu" and decoder.usable, decoder.note
    unfused = comp.try_variant(comp.variant("dec1_reduce", "direct_nchw", ()))
    assert unfused.usable and unfused.diff  # the resize+add stage leaves the program


def test_starting_plan_is_the_studys_when_it_fits(small_model, tmp_path):
    fresh = composer.starting_plan(small_model, tmp_path / "plan.json")
    assert "no study plan" in fresh.notes[-1] and fresh.layers["head_conv"].impl == "tvm:default"
    saved = Plan.uniform(small_model, overrides={"head_conv": "tvm:direct_nchw"})
    saved.save(tmp_path / "plan.json")
    assert composer.starting_plan(small_model, tmp_path / "plan.json").layers["head_conv"].impl == "tvm:direct_nchw"
    (tmp_path / "plan.json").write_text('{"model": "x", "layers": [{"layer": "nope", "impl": "tvm:default"}]}')
    stale = composer.starting_plan(small_model, tmp_path / "plan.json")
    assert "does not fit" in stale.notes[-1] and stale.layers["head_conv"].impl == "tvm:default"
