"""Int8: calibration, the quantised reference, QNNPACK's and TVM's int8 kernels over RPC, end to end."""

import numpy as np
import pytest

from workbench import quant
from workbench.compare import measure_one
from workbench.measure import TimingConfig
from workbench.model import Model, UNetSpec, conv_layer, random_params, reference_unet, unary_layer

TINY = TimingConfig(number=1, repeat=2, min_repeat_ms=2, extra_rounds=0)


@pytest.fixture(scope="module")
def tiny_unet():
    return reference_unet(UNetSpec(widths=(4, 8), height=32, width=32), seed=5)


@pytest.fixture(scope="module")
def grouped_model():
    """conv (8 -> 8, 2 groups) -> relu -> depthwise conv (8 groups) -> 1x1 conv."""
    layers = [conv_layer("grouped", "input", (1, 8, 16, 16), 8, groups=2)]
    layers.append(unary_layer("relu", "relu", "grouped", layers[-1].output_shape))
    layers.append(conv_layer("depthwise", "relu", layers[-1].output_shape, 8, groups=8))
    layers.append(conv_layer("pointwise", "depthwise", layers[-1].output_shape, 4, kernel=1, pad=0))
    return Model("grouped", layers, random_params(layers, seed=2), layers[0].input_shape)


# ---------------------------------------------------------------- calibration and the reference

def test_weight_scales_reconstruct_weights_within_half_a_step():
    w = np.random.default_rng(0).standard_normal((6, 3, 3, 3)).astype(np.float32) * [[[[0.01]]], [[[1]]], [[[5]]],
                                                                                      [[[0.1]]], [[[2]]], [[[0.5]]]]
    scales = quant.weight_scales(w)
    assert scales.shape == (6,)
    back = quant.quantize_weight(w, scales).astype(np.float64) * scales.reshape(-1, 1, 1, 1)
    assert np.all(np.abs(back - w) <= scales.reshape(-1, 1, 1, 1) / 2 * (1 + 1e-6))
    # Per channel: the small channel keeps its resolution (a per-tensor scale would zero it).
    assert scales[0] < scales[2] / 100


def test_activation_params_cover_the_range_and_zero():
    qp = quant.QParams.from_range(-1.5, 3.0)
    x = np.linspace(-1.5, 3.0, 1001)
    assert np.max(np.abs(quant.dequantize(quant.quantize(x, qp), qp) - x)) <= qp.scale / 2 * (1 + 1e-5)
    assert quant.dequantize(quant.quantize(np.zeros(1), qp), qp)[0] == 0  # zero padding is exact
    positive = quant.QParams.from_range(0.5, 2.0)  # widened to contain 0
    assert positive.zero_point == 0


def test_quantised_reference_is_the_integer_conv():
    layer = conv_layer("c", "input", (1, 3, 5, 5), 4, kernel=1, pad=0)
    rng = np.random.default_rng(1)
    w, b = rng.standard_normal((4, 3, 1, 1)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    lq = quant.calibrate_layer(layer, w, b, quant.calibration_inputs(layer.input_shape, 2))
    x_q = quant.quantize(rng.standard_normal(layer.input_shape), lq.input)
    acc = np.einsum("kc,nchw->nkhw", lq.w_q[:, :, 0, 0].astype(np.int64),
                    x_q.astype(np.int64) - lq.input.zero_point) + lq.bias_q.reshape(1, -1, 1, 1)
    expected = np.clip(np.round(acc * lq.multiplier.astype(np.float64).reshape(1, -1, 1, 1))
                       + lq.output.zero_point, 0, 255)
    assert np.array_equal(quant.reference_conv_q(x_q, lq, layer), expected.astype(np.uint8))


def test_top1_agreement_counts_pixels_and_images():
    ref = np.zeros((1, 2, 2, 2))
    ref[0, 1, 0, 0] = 1  # pixel (0, 0) is class 1, the rest class 0
    same, flipped = ref.copy(), ref.copy()
    flipped[0, 1, 1, 1] = 1
    assert quant.top1_agreement([same], [ref]) == 1.0
    assert quant.top1_agreement([flipped], [ref]) == 0.75
    assert quant.top1_agreement([np.array([[0.0, 1.0]])], [np.array([[1.0, 0.0]])]) == 0.0
    assert quant.majority_share([ref]) == 0.75  # three of four pixels are class 0


def test_bad_scales_and_inputs_fail_clearly():
    with pytest.raises(quant.QuantError, match="positive"):
        quant.QParams(0.0, 0)
    with pytest.raises(quant.QuantError, match="zero point"):
        quant.QParams(0.1, 300)
    with pytest.raises(quant.QuantError, match="at least one"):
        quant.calibrate_layer(conv_layer("c", "input", (1, 1, 4, 4), 1), np.ones((1, 1, 3, 3), np.float32),
                              np.zeros(1, np.float32), [])


# ---------------------------------------------------------------- the kernels, over RPC

def test_int8_kernels_are_opt_in():
    from workbench.kernels.registry import all_candidates

    assert not [c for c in all_candidates(2) if c.impl.endswith(":int8")]
    assert {c.impl for c in all_candidates(2, int8=True)} >= {"qnnpack:int8", "tvm:int8"}


@pytest.mark.parametrize("impl, knobs", [("qnnpack:int8", None), ("tvm:int8", None), ("tvm:int8", {"dot": "vector"})])
def test_int8_kernels_match_their_quantised_reference_over_rpc(device, tiny_unet, impl, knobs):
    from workbench.kernels.registry import find, int8_candidates

    candidate = find(impl, int8_candidates(2))
    candidate = candidate.with_knobs(knobs) if knobs else candidate
    record = measure_one(tiny_unet, device, "enc1_conv1", candidate, TINY)
    assert record["status"] == "ok", record["note"]
    assert record["numerics_ok"] is True and record["tolerance"] == quant.STEP_TOLERANCE
    assert record["median_ms"] > 0
    # int8 costs something, and not much: reported beside the time, not hidden.
    assert 0 < record["quant_error"] < 0.15


def test_grouped_convs_run_on_qnnpack_and_are_refused_by_tvm_int8(device, grouped_model):
    from workbench.compare import compare
    from workbench.kernels.registry import int8_candidates

    records = {(r["layer"], r["impl"]): r for r in
               compare(grouped_model, device, ["grouped", "depthwise"], int8_candidates(2), TINY, progress=False)}
    for layer in ("grouped", "depthwise"):
        assert records[(layer, "qnnpack:int8")]["status"] == "ok", records[(layer, "qnnpack:int8")]["note"]
        assert records[(layer, "qnnpack:int8")]["numerics_ok"] is True
        refused = records[(layer, "tvm:int8")]
        assert refused["status"] == "not_applicable" and "groups" in refused["note"]


def test_a_wrong_scale_fails_the_check(device, tiny_unet):
    import dataclasses

    from workbench.kernels.int8 import TVMInt8Candidate

    class WrongScale(TVMInt8Candidate):
        impl = "tvm:int8:wrong_scale"

        def kernel_quant(self, lq):  # the kernel requantises with an output scale 30% off
            return dataclasses.replace(lq, output=quant.QParams(lq.output.scale * 1.3, lq.output.zero_point))

    record = measure_one(tiny_unet, device, "enc1_conv1", WrongScale(), TINY)
    assert record["status"] == "wrong" and record["numerics_ok"] is False
    assert "steps" in record["note"]


def test_an_int8_kernel_without_the_models_calibration_is_refused_in_a_build(tiny_unet):
    from workbench.build import build_hybrid
    from workbench.kernels.int8 import Int8CalibrationError, int8_candidates
    from workbench.plan import Plan

    candidates = int8_candidates(2)
    plan = Plan.uniform(tiny_unet, "tvm:int8", fuse=False, candidates=candidates)
    with pytest.raises(Int8CalibrationError, match="calibration"):
        build_hybrid(tiny_unet, plan, {"kind": "llvm"}, candidates)


# ---------------------------------------------------------------- end to end

def test_int8_end_to_end_hybrid_and_ort_static_quantisation(device, tiny_unet):
    from workbench.int8_e2e import int8_end_to_end

    rows = {r["name"]: r for r in int8_end_to_end(tiny_unet, device, 2, TINY, inputs=4, calibration_inputs=2,
                                                  peers=("onnxruntime", "onnxruntime_int8"))}
    assert set(rows) == {"int8_hybrid", "onnxruntime", "onnxruntime_int8"}
    for row in rows.values():
        assert row["median_ms"] > 0, row["note"]
        assert 0.0 <= row["top1_agreement"] <= 1.0 and 0.0 < row["top1_majority_share"] <= 1.0
    assert rows["onnxruntime"]["numerics_ok"] is True and rows["onnxruntime"]["max_rel_err"] < 1e-3
    assert rows["int8_hybrid"]["numerics_ok"] is True, rows["int8_hybrid"]["note"]
    assert set(rows["int8_hybrid"]["plan"].values()) <= {"qnnpack:int8", "tvm:int8"}
    for name in ("int8_hybrid", "onnxruntime_int8"):  # quantisation moved the output, measurably
        assert rows[name]["max_rel_err"] > 0


def test_int8_end_to_end_refuses_no_inputs(tiny_unet):
    from workbench.int8_e2e import Int8E2EError, int8_end_to_end

    with pytest.raises(Int8E2EError, match="at least one"):
        int8_end_to_end(tiny_unet, None, 2, TINY, inputs=0)
    with pytest.raises(Int8E2EError, match="unknown int8 peer"):
        int8_end_to_end(tiny_unet, None, 2, TINY, peers=("tflite",))


def test_the_hybrid_check_holds_for_the_int8_model_and_fails_for_a_scaled_one(tiny_unet):
    from workbench.int8_e2e import hybrid_numerics

    calibration = quant.calibrate_model(tiny_unet, count=2)
    inputs = quant.model_inputs(tiny_unet, 2, 11)
    exact = [quant.simulated_int8(tiny_unet, calibration, x) for x in inputs]
    assert hybrid_numerics(tiny_unet, calibration, exact, inputs)["ok"] is True
    assert hybrid_numerics(tiny_unet, calibration, [y * 1.3 for y in exact], inputs)["ok"] is False


def test_a_hybrid_mixing_qnnpack_and_tvm_int8_runs_over_rpc(device, grouped_model):
    from workbench.int8_e2e import int8_end_to_end

    rows = int8_end_to_end(grouped_model, device, 2, TINY, inputs=2, calibration_inputs=2, peers=())
    (row,) = rows
    # Grouped convs have only QNNPACK; the dense 1x1 conv goes to whichever int8 kernel was faster.
    assert row["plan"]["grouped"] == row["plan"]["depthwise"] == "qnnpack:int8"
    assert row["numerics_ok"] is True, row["note"]
    assert row["median_ms"] > 0 and 0.0 <= row["top1_agreement"] <= 1.0
