"""The hybrid model: plan choice, plan files, clear errors, and whole-model builds that match PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

from workbench import hybrid
from workbench.build import build_hybrid, compile_hybrid
from workbench.kernels.default import default_conv_func
from workbench.kernels.registry import all_candidates
from workbench.kernels.tvm_kernel import FactoryCandidate
from workbench.measure import TimingConfig
from workbench.plan import LayerPlan, Plan, PlanError, choose_plan
from workbench.model import Model, conv_layer, random_params, reference_output, sample_input

NNPACK_WT = "nnpack:wt8x8:precompute"
QUICK = TimingConfig(number=1, repeat=2, min_repeat_ms=5)


def _record(layer, impl, ms, status="ok", numerics_ok=True):
    return {"layer": layer, "impl": impl, "status": status, "numerics_ok": numerics_ok, "median_ms": ms}


def _mixed_overrides(model):
    """NNPACK on the encoder/decoder middle, tvm:default on the first two and the decoder's last level."""
    middle = [c.name for c in model.convs if c.name.startswith(("enc1", "enc2", "dec1"))]
    return {name: NNPACK_WT for name in middle}


# ---------------------------------------------------------------- choosing and saving plans

def test_choose_plan_fastest_usable_wins_and_falls_back(small_model):
    convs = [c.name for c in small_model.convs]
    first, second = convs[0], convs[1]
    records = [
        _record(first, "tvm:default", 5.0),
        _record(first, NNPACK_WT, 2.0),
        _record(first, "nnpack:ft8x8:compute", 0.1, status="wrong", numerics_ok=False),  # fast but wrong
        _record(first, "nnpack:implicit_gemm:compute", 0.2, status="failed", numerics_ok=False),
        _record(first, "nnpack:direct:compute", 0.05),  # claims ok, but direct cannot run 3x3
        _record(second, "nnpack:ft8x8:compute", 1.0),
        _record(second, NNPACK_WT, 3.0),
        _record("not_a_layer", NNPACK_WT, 0.01),
    ]
    plan = choose_plan(small_model, records)
    assert plan.impl(first) == NNPACK_WT
    assert plan.impl(second) == "nnpack:ft8x8:compute"
    assert all(plan.impl(name) == "tvm:default" for name in convs[2:])
    assert any("fell back" in note and convs[2] in note for note in plan.notes)
    assert plan.layers[first].fuse == ("relu",)  # enc0_conv1 is followed by its only reader, a ReLU


def test_plan_json_and_frame_round_trip(small_model, tmp_path):
    plan = Plan.uniform(small_model, "tvm:default", overrides=_mixed_overrides(small_model))
    again = Plan.from_json(plan.to_json())
    assert again.layers == plan.layers and again.model == plan.model
    assert Plan.load(plan.save(tmp_path / "plan.json")).layers == plan.layers
    frame = plan.frame()
    assert list(frame.columns) == ["layer", "impl", "prologue", "fuse", "knobs"]
    frame.loc[frame.layer == "head_conv", "impl"] = NNPACK_WT  # edited like a user would
    edited = Plan.from_frame(frame, small_model.name)
    edited.validate(small_model)
    assert edited.impl("head_conv") == NNPACK_WT
    assert edited.layers["dec0_reduce"].fuse == ("resize", "add", "relu")


def test_bad_plans_fail_clearly(small_model):
    plan = Plan.uniform(small_model)
    with pytest.raises(PlanError, match="not convs of model"):
        Plan(plan.model, {**plan.layers, "nope": LayerPlan("nope", "tvm:default")}).validate(small_model)
    with pytest.raises(PlanError, match="unknown implementation id"):
        Plan.uniform(small_model, "winograd-please")
    with pytest.raises(PlanError, match="unknown NNPACK implementation"):
        Plan.uniform(small_model, "nnpack:wt4x4:precompute")
    with pytest.raises(PlanError, match="no entry for conv"):
        Plan(plan.model, dict(list(plan.layers.items())[1:])).validate(small_model)
    bad_fuse = dict(plan.layers, enc0_conv2=LayerPlan("enc0_conv2", "tvm:default", ("relu",)))
    with pytest.raises(PlanError, match="cannot fuse"):
        Plan(plan.model, bad_fuse).validate(small_model)
    # NNPACK takes a ReLU epilogue only, not the decoder's resize/add.
    nn_fuse = dict(plan.layers, dec0_reduce=LayerPlan("dec0_reduce", NNPACK_WT, ("resize", "add", "relu")))
    with pytest.raises(PlanError, match="cannot fuse"):
        Plan(plan.model, nn_fuse).validate(small_model)


def test_wt8x8_on_1x1_conv_is_refused():
    layer = conv_layer("squeeze", "input", (1, 8, 6, 6), 4, kernel=1, pad=0)
    model = Model("one-by-one", [layer], random_params([layer]), layer.input_shape)
    with pytest.raises(PlanError, match=r"squeeze.*only 3x3.*Options"):
        Plan.uniform(model, NNPACK_WT)
    Plan.uniform(model, "nnpack:direct:compute").validate(model)


def test_a_tuned_kernel_must_exist(small_model, tmp_path):
    from workbench.kernels.tuned import NotTunedError
    from workbench.rpc import host_target

    plan = Plan.uniform(small_model, overrides={"head_conv": "tvm:tuned"})
    assert plan.layers["head_conv"].fuse == ()  # tuned without its ReLU: it absorbs nothing
    with pytest.raises(NotTunedError, match="head_conv.*no tuning record"):
        build_hybrid(small_model, plan, host_target(2), all_candidates(tuning_dir=tmp_path))


def test_unknown_ids_and_kernels_that_cannot_fuse_are_refused(small_model):
    relu_only = FactoryCandidate("tvm:mine", lambda layer, relu, weight: default_conv_func(layer, relu))
    candidates = all_candidates() + [relu_only]
    plan = Plan.uniform(small_model, "tvm:mine", candidates=candidates)
    assert plan.layers["dec0_reduce"].fuse == ()  # the decoder's resize+add is not a ReLU epilogue
    assert plan.layers["enc0_conv1"].fuse == ("relu",)
    with pytest.raises(PlanError, match="unknown implementation id 'tvm:mine'"):
        plan.validate(small_model)  # without the kernel that answers to the id


# ---------------------------------------------------------------- whole-model builds

@pytest.fixture(scope="module")
def mixed(small_model, device):
    """A mixed plan: NNPACK wt8x8 precompute (ReLU fused) in the middle, tvm:default (with the
    decoder's resize+add+relu epilogue) at the ends, and one 'tuned' kernel supplied by name."""
    overrides = {**_mixed_overrides(small_model), "head_conv": "tvm:mine"}
    candidates = all_candidates() + [FactoryCandidate("tvm:mine", lambda l, relu, w: default_conv_func(l, relu))]
    plan = Plan.uniform(small_model, "tvm:default", overrides=overrides, candidates=candidates)
    mod = build_hybrid(small_model, plan, device.target, candidates)
    x = sample_input(small_model)
    return plan, compile_hybrid(mod), x, reference_output(small_model, x)


def test_mixed_plan_has_the_expected_fusions(mixed):
    plan = mixed[0]
    assert plan.layers["enc1_conv1"].fuse == ("relu",)  # NNPACK activation
    assert plan.layers["dec0_reduce"].fuse == ("resize", "add", "relu")  # TVM epilogue
    assert plan.layers["enc0_conv2"].fuse == ()  # read by the pool and the skip


def test_mixed_plan_matches_reference_in_process(mixed, small_model):
    plan, executable, x, ref = mixed
    result = hybrid.run_local(executable, x, reference=ref, timing=QUICK, threads=2)
    assert result["numerics_ok"], result["rel_err"]
    assert result["median_ms"] > 0 and len(result["repeats_ms"]) == QUICK.repeat
    calls = hybrid.label_calls(hybrid.profile_layers(executable, x, threads=2, runs=1), small_model, plan)
    nnpack_calls = calls[calls.symbol.str.startswith("workbench.nnpack.")]
    assert list(nnpack_calls.layer) == [n for n in plan.layers if plan.impl(n) == NNPACK_WT]
    assert any(s.startswith("conv_dec0_reduce_resize_add_relu") for s in calls.symbol)  # TVM epilogue ran


def test_mixed_plan_matches_reference_over_rpc(mixed, device):
    _, executable, x, ref = mixed
    result = hybrid.run_remote(device, executable, x, reference=ref, timing=QUICK)
    assert result["numerics_ok"], result["rel_err"]
    # A fresh session process has run NNPACK (and transformed a kernel once) only if the model called it.
    assert result["nnpack_profile"].get("run") and result["nnpack_profile"].get("transform")
    assert result["median_ms"] > 0


def test_export_and_load_round_trip(small_model, tmp_path):
    plan = Plan.uniform(small_model, "tvm:default", overrides=_mixed_overrides(small_model))
    from workbench.rpc import host_target

    out = hybrid.export_hybrid(small_model, plan, tmp_path / "hybrid", host_target(2), threads=2)
    assert {p.name for p in out.iterdir()} >= {"hybrid.so", "plan.json", "model.onnx", "meta.json"}
    model_fn = hybrid.load_hybrid(out)
    x = sample_input(small_model, seed=5)
    assert hybrid.check_output(model_fn(x), reference_output(small_model, x))["numerics_ok"]
    assert model_fn.plan.layers == plan.layers
    with pytest.raises(ValueError, match="input shape"):
        model_fn(np.zeros((1, 3, 8, 8), np.float32))


def test_measure_baselines_all_five(small_model, device):
    from workbench.baselines import NAMES, measure_baselines

    results = measure_baselines(small_model, device, threads=2, timing=QUICK)
    assert [r["name"] for r in results] == list(NAMES)
    for r in results:
        assert r["numerics_ok"], r
        assert r["median_ms"] > 0 and len(r["repeats_ms"]) == QUICK.repeat
    notes = {r["name"]: r["note"] for r in results}
    assert "conv kernels" in notes["torch_nnpack"]
