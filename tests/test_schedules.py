"""TensorIR convolutions: numerics against PyTorch, knob validation, steps, export."""

import dataclasses

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi

from workbench import schedules as S
from workbench.schedules import ConvLayer, KnobError

SQUARE = ConvLayer.square("square", 16, 32, 24, 24, relu=True)
ODD = ConvLayer.square("odd", 3, 8, 17, 23)
POINTWISE = ConvLayer.square("pointwise", 16, 32, 12, 12, kernel=1, pad=0, relu=True)
STRIDED = ConvLayer.square("strided", 16, 32, 24, 24, stride=2)
UNPADDED = ConvLayer.square("unpadded", 8, 16, 14, 15, pad=0, relu=True)
LAYERS = (SQUARE, ODD, POINTWISE, STRIDED, UNPADDED)

# max |err| / max |reference|: float32 reordering for direct; Winograd's error grows with m
# (measured on these layers: direct <= 4e-7, m=2 4e-7, m=4 1.1e-6, m=6 5.8e-6).
TOLERANCE = {"direct_nchw": 1e-5, "direct_nchwc": 1e-5, "winograd_2": 1e-5, "winograd_4": 1e-4, "winograd_6": 1e-3}


def _inputs(layer: ConvLayer, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, layer.in_channels, layer.height, layer.width), dtype=np.float32)
    w = rng.standard_normal((layer.out_channels, layer.in_channels, layer.kernel, layer.kernel), dtype=np.float32)
    b = rng.standard_normal(layer.out_channels, dtype=np.float32)
    return x, w, b


def _reference(layer: ConvLayer, x, w, b) -> np.ndarray:
    out = torch.nn.functional.conv2d(
        torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), stride=layer.stride, padding=layer.pad
    )
    return (torch.relu(out) if layer.relu else out).numpy()


def _relative_error(impl, layer, knobs=None) -> float:
    x, w, b = _inputs(layer)
    built = S.build(impl, layer, knobs)
    out = built.run(x, built.prepare(w, b))
    ref = _reference(layer, x, w, b)
    assert out.shape == ref.shape
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def test_layer_shapes_and_flops():
    assert (SQUARE.out_height, SQUARE.out_width) == (24, 24)
    assert (STRIDED.out_height, STRIDED.out_width) == (12, 12)
    assert (ODD.out_height, ODD.out_width) == (17, 23)
    assert SQUARE.flops == 2 * 32 * 16 * 9 * 24 * 24


def test_applicability_rules():
    assert all(S.applicable(impl, SQUARE) is None for impl in S.IMPLEMENTATIONS)
    assert "3x3" in S.applicable("winograd_4", POINTWISE)
    assert "stride" in S.applicable("winograd_6", STRIDED)
    assert S.applicable("direct_nchwc", STRIDED) is None
    with pytest.raises(ValueError, match="unknown implementation"):
        S.applicable("fft", SQUARE)
    with pytest.raises(ValueError, match="not applicable"):
        S.default_knobs("winograd_2", POINTWISE)


CASES = [(impl, layer) for layer in LAYERS for impl in S.IMPLEMENTATIONS if S.applicable(impl, layer) is None]


@pytest.mark.parametrize("impl,layer", CASES, ids=[f"{i}-{l.name}" for i, l in CASES])
def test_matches_torch(impl, layer):
    assert _relative_error(impl, layer) < TOLERANCE[impl]


KNOB_VARIANTS = [
    ("direct_nchw", dict(parallel="oc")),
    ("direct_nchw", dict(parallel="oh", epilogue="separate")),
    ("direct_nchw", dict(parallel="none", pad="inline", epilogue="row", unroll_kw=False)),
    ("direct_nchwc", dict(parallel="oh", pad="compute_at", unroll_kw=True)),
    ("direct_nchwc", dict(parallel="oc", pad="inline", epilogue="separate")),
    ("direct_nchwc", dict(epilogue="row", oc_bn=16, ow_bn=8)),
    ("winograd_4", dict(parallel="eps", pad="inline", epilogue="separate")),
    ("winograd_2", dict(parallel="none", oc_bn=16, tile_bn=4, ic_bn=8)),
]


@pytest.mark.parametrize("impl,changes", KNOB_VARIANTS, ids=[f"{i}-{sorted(c)}" for i, c in KNOB_VARIANTS])
def test_knob_variants_stay_correct(impl, changes):
    knobs = dataclasses.replace(S.default_knobs(impl, SQUARE), **changes)
    assert _relative_error(impl, SQUARE, knobs) < TOLERANCE[impl]


def test_weight_prim_func_matches_numpy_packing():
    for impl in ("direct_nchwc", "winograd_6"):
        _, w, b = _inputs(SQUARE)
        built = S.build(impl, SQUARE)
        packed, _ = built.prepare(w, b)
        np.testing.assert_allclose(packed.numpy(), S.pack_weight(impl, SQUARE, None, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [SQUARE, ODD, ConvLayer.square("unet", 3, 16, 192, 192), ConvLayer.square("deep", 256, 256, 12, 12)])
def test_default_knobs_are_valid(layer):
    for impl in S.IMPLEMENTATIONS:
        if S.applicable(impl, layer) is None:
            S.validate_knobs(impl, layer, S.default_knobs(impl, layer))


@pytest.mark.parametrize(
    "impl,changes,knob",
    [
        ("direct_nchwc", dict(oc_bn=12), "oc_bn"),
        ("direct_nchwc", dict(ic_bn=5), "ic_bn"),
        ("direct_nchwc", dict(oc_bn=16, vec=32), "vec"),
        ("direct_nchw", dict(ow_bn=8, vec=16), "vec"),
        ("direct_nchw", dict(ow_bn=7), "ow_bn"),
        ("direct_nchw", dict(parallel="rows"), "parallel"),
        ("direct_nchwc", dict(pad="later"), "pad"),
        ("winograd_4", dict(tile_bn=5), "tile_bn"),
        ("winograd_6", dict(epilogue="tile"), "epilogue"),
    ],
)
def test_bad_knobs_raise_clear_knob_error(impl, changes, knob):
    knobs = dataclasses.replace(S.default_knobs(impl, SQUARE), **changes)
    with pytest.raises(KnobError) as err:
        S.build(impl, SQUARE, knobs)
    message = str(err.value)
    assert f"knob {knob}=" in message and "valid values" in message


def test_divisor_error_lists_the_divisors():
    with pytest.raises(KnobError, match=r"\[1, 2, 4, 8, 16, 32\]"):
        S.validate_knobs("direct_nchwc", SQUARE, dataclasses.replace(S.default_knobs("direct_nchwc", SQUARE), oc_bn=12))


def test_wrong_knob_class_and_mismatched_schedule():
    with pytest.raises(KnobError, match="WinogradKnobs"):
        S.schedule("winograd_2", S.new_schedule("winograd_2", SQUARE), SQUARE, S.DirectNCHWKnobs())
    knobs = dataclasses.replace(S.default_knobs("direct_nchwc", SQUARE), oc_bn=16)
    sch = S.new_schedule("direct_nchwc", SQUARE)  # default oc_bn=32 layout
    with pytest.raises(KnobError, match="argument shapes"):
        S.schedule("direct_nchwc", sch, SQUARE, knobs)


@pytest.mark.parametrize("impl", ["direct_nchw", "direct_nchwc", "winograd_4"])
def test_steps_end_at_the_schedule(impl):
    result = S.steps(impl, SQUARE)
    assert len(result) > 2 and all(isinstance(name, str) and name for name, _ in result)
    final = S.schedule(impl, S.new_schedule(impl, SQUARE), SQUARE)
    tvm.ir.assert_structural_equal(result[-1][1].mod, final.mod)
    assert not tvm_ffi.structural_equal(result[0][1].mod, final.mod)  # 0.27: moved to tvm_ffi
    assert len(result[-1][1].trace.insts) > len(result[1][1].trace.insts)
    assert "T.prim_func" in result[1][1].mod.script()


def test_arg_specs_and_exported_module_round_trip(tmp_path):
    impl = "direct_nchwc"
    built = S.build(impl, SQUARE)
    specs = S.arg_specs(impl, SQUARE, built.knobs)
    assert built.arg_shapes == specs
    assert specs[0] == ((1, 16, 24, 24), "float32") and specs[3] == ((1, 32, 24, 24), "float32")
    x, w, b = _inputs(SQUARE)
    path = str(tmp_path / "conv.so")
    built.module.export_library(path)
    loaded = tvm.runtime.load_module(path)
    dev = tvm.cpu()
    args = [
        tvm.runtime.tensor(x, dev),
        tvm.runtime.tensor(S.pack_weight(impl, SQUARE, built.knobs, w), dev),
        tvm.runtime.tensor(b, dev),
        tvm.runtime.empty(specs[3][0], "float32", dev),
    ]
    timer = loaded.time_evaluator(built.func_name, dev, number=2, repeat=2)
    assert len(timer(*args).results) == 2
    np.testing.assert_allclose(args[3].numpy(), _reference(SQUARE, x, w, b), rtol=1e-4, atol=1e-4)
