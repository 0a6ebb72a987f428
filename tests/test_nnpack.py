"""Tests of the NNPACK bridge (workbench.nnpack) and its TVM functions (workbench.nnpack_tvm)
against PyTorch's conv2d in float64."""

from __future__ import annotations

import ast
import platform
from pathlib import Path

import numpy as np
import pytest

from workbench import nnpack, nnpack_tvm
from workbench.errors import WorkbenchError
from workbench.geometry import ConvGeometry
from workbench.nnpack import ConvShape, NNPACKError, NotApplicableError

torch = pytest.importorskip("torch")

# The UNet's middle layers, its first layer at a smaller size, and awkward shapes.
SHAPES = {
    "unet_16_96": ConvShape(16, 16, 96, 96, 3, 3, 1, 1),
    "unet_64_48": ConvShape(64, 64, 48, 48, 3, 3, 1, 1),
    "unet_first_64": ConvShape(3, 16, 64, 64, 3, 3, 1, 1),
    "non_square_5x37": ConvShape(8, 4, 5, 37, 3, 3, 1, 1),
    "one_input_channel": ConvShape(1, 8, 20, 20, 3, 3, 1, 1),
    "one_output_channel": ConvShape(8, 1, 20, 20, 3, 3, 1, 1),
    "no_padding": ConvShape(8, 8, 15, 15, 3, 3, 1, 0),
    "kernel_1x1": ConvShape(16, 8, 9, 11, 1, 1),
    "kernel_5x5": ConvShape(4, 6, 13, 17, 5, 5, 1, 2),
    "odd_asymmetric_pad": ConvShape(7, 5, 11, 13, 3, 3, 1, (0, 2, 1, 0)),
    "kernel_1x3": ConvShape(4, 4, 9, 9, 1, 3, 1, (0, 1, 0, 1)),
    "kernel_9x9": ConvShape(3, 4, 20, 20, 9, 9, 1, 4),
    "stride_2": ConvShape(6, 4, 15, 15, 3, 3, 2, 1),
    "stride_2_even": ConvShape(8, 16, 14, 14, 3, 3, 2, 1),  # MobileNet-style downsampling
    "stride_2_no_pad": ConvShape(8, 16, 13, 13, 3, 3, 2, 0),
    "stride_2_1x1": ConvShape(8, 16, 14, 14, 1, 1, 2, 0),  # ShuffleNet/ResNet-style shortcut
}


def make_data(shape: ConvShape, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape.input_shape, dtype=np.float32)
    fan_in = shape.in_channels * shape.kernel_h * shape.kernel_w
    w = (rng.standard_normal(shape.weight_shape) / np.sqrt(fan_in)).astype(np.float32)
    b = rng.standard_normal(shape.out_channels, dtype=np.float32)
    return x, w, b


def reference(x, w, b, shape: ConvShape, relu: bool = False) -> np.ndarray:
    top, right, bottom, left = shape.pad
    xp = torch.nn.functional.pad(torch.from_numpy(x).double(), (left, right, top, bottom))
    y = torch.nn.functional.conv2d(xp, torch.from_numpy(w).double(), torch.from_numpy(b).double(),
                                   stride=shape.stride)
    return (torch.relu(y) if relu else y).numpy()


@pytest.fixture(scope="module")
def bridge():
    with nnpack.Bridge(threads=1) as b:
        yield b


# ---------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SHAPES))
def test_every_applicable_algorithm_and_strategy_matches_torch(bridge, name):
    shape = SHAPES[name]
    x, w, b = make_data(shape)
    ref = reference(x, w, b, shape)
    for strategy in nnpack.STRATEGIES:
        algorithms = nnpack.applicable_algorithms(shape, strategy)
        assert "implicit_gemm" in algorithms  # the fallback takes every shape
        for algorithm in algorithms:
            y, profile = bridge.convolution(x, w, b, shape, algorithm=algorithm, strategy=strategy)
            assert y.shape == shape.output_shape
            err = nnpack.relative_error(y, ref)
            assert nnpack.within_tolerance(y, ref, algorithm), (name, algorithm, strategy, err)
            assert profile.total > 0


def test_expected_applicability_of_reference_shapes():
    assert nnpack.applicable_algorithms(SHAPES["unet_64_48"]) == [
        "auto", "ft8x8", "ft16x16", "wt8x8", "implicit_gemm", "wt8x8_fp16"]
    assert nnpack.applicable_algorithms(SHAPES["kernel_1x1"]) == [
        "auto", "ft8x8", "ft16x16", "implicit_gemm", "direct"]
    assert nnpack.applicable_algorithms(SHAPES["kernel_1x1"], "precompute") == ["ft8x8", "ft16x16", "implicit_gemm"]
    assert nnpack.applicable_algorithms(SHAPES["kernel_5x5"]) == ["auto", "ft8x8", "ft16x16", "implicit_gemm"]
    assert nnpack.applicable_algorithms(SHAPES["kernel_9x9"]) == ["auto", "ft16x16", "implicit_gemm"]
    assert nnpack.applicable_algorithms(SHAPES["stride_2"]) == ["auto", "implicit_gemm"]


@pytest.mark.parametrize("name", ["unet_16_96", "kernel_5x5", "kernel_1x1", "kernel_9x9", "stride_2"])
def test_auto_runs_what_auto_algorithm_predicts(bridge, name):
    shape = SHAPES[name]
    x, w, b = make_data(shape)
    y_auto, _ = bridge.convolution(x, w, b, shape, algorithm="auto")
    y_pick, _ = bridge.convolution(x, w, b, shape, algorithm=nnpack.auto_algorithm(shape))
    np.testing.assert_array_equal(y_auto, y_pick)


@pytest.mark.parametrize("name,algorithm", [
    ("unet_16_96", "wt8x8"), ("unet_16_96", "ft8x8"), ("unet_16_96", "ft16x16"),
    ("kernel_5x5", "implicit_gemm"), ("kernel_1x1", "direct")])
def test_fused_relu_gives_relu_of_reference(bridge, name, algorithm):
    shape = SHAPES[name]
    x, w, b = make_data(shape, seed=1)
    ref = reference(x, w, b, shape, relu=True)
    for strategy in nnpack.STRATEGIES if algorithm != "direct" else ("compute",):
        y, _ = bridge.convolution(x, w, b, shape, algorithm=algorithm, strategy=strategy, activation="relu")
        assert y.min() >= 0 and (y == 0).mean() > 0.1
        assert nnpack.within_tolerance(y, ref, algorithm), nnpack.relative_error(y, ref)


def test_shape_inferred_from_arrays_rank_3_and_out_argument(bridge):
    shape = SHAPES["odd_asymmetric_pad"]
    x, w, b = make_data(shape)
    out = np.full(shape.output_shape[1:], np.nan, np.float32)
    y, _ = bridge.convolution(x[0], w, b, padding=shape.pad, algorithm="wt8x8", out=out)
    assert y is out
    assert nnpack.within_tolerance(y[None], reference(x, w, b, shape), "wt8x8")


def test_no_bias_means_zero_bias(bridge):
    shape = SHAPES["no_padding"]
    x, w, _ = make_data(shape)
    y, _ = bridge.convolution(x, w, None, shape, algorithm="implicit_gemm")
    ref = reference(x, w, np.zeros(shape.out_channels, np.float32), shape)
    assert nnpack.within_tolerance(y, ref, "implicit_gemm")


# ---------------------------------------------------------------------------------------
# Applicability and errors
# ---------------------------------------------------------------------------------------


def test_direct_on_3x3_is_not_applicable_and_says_what_is(bridge):
    shape = SHAPES["unet_64_48"]
    x, w, b = make_data(shape)
    with pytest.raises(NotApplicableError) as info:
        bridge.convolution(x, w, b, shape, algorithm="direct", name="enc2.conv1")
    message = str(info.value)
    assert "'direct'" in message and "enc2.conv1" in message and "1x1" in message
    assert "wt8x8" in message and "implicit_gemm" in message
    assert info.value.applicable == nnpack.applicable_algorithms(shape)
    assert isinstance(info.value, ValueError)


def test_wt8x8_on_5x5_is_not_applicable(bridge):
    shape = SHAPES["kernel_5x5"]
    x, w, b = make_data(shape)
    with pytest.raises(NotApplicableError, match=r"'wt8x8'.*3x3.*ft8x8, ft16x16, implicit_gemm"):
        bridge.convolution(x, w, b, shape, algorithm="wt8x8")
    with pytest.raises(NotApplicableError, match="wt8x8"):
        bridge.transform_kernel(w, shape, "wt8x8")


def test_why_not_applicable_reasons():
    assert nnpack.why_not_applicable(SHAPES["unet_64_48"], "wt8x8") is None
    assert nnpack.why_not_applicable(SHAPES["kernel_9x9"], "ft16x16", "precompute") is None
    assert "3x3" in nnpack.why_not_applicable(SHAPES["kernel_5x5"], "wt8x8")
    assert "8x8" in nnpack.why_not_applicable(SHAPES["kernel_9x9"], "ft8x8")
    assert "stride 1" in nnpack.why_not_applicable(SHAPES["stride_2"], "ft16x16")
    assert "precompute" in nnpack.why_not_applicable(SHAPES["kernel_1x1"], "direct", "precompute")
    # auto picks direct for a 1x1 stride-1 conv, which cannot precompute
    assert "auto picks direct" in nnpack.why_not_applicable(SHAPES["kernel_1x1"], "auto", "precompute")
    # NNPACK rejects padding >= kernel size, whatever the algorithm
    big_pad = ConvShape(4, 4, 10, 10, 3, 3, 1, 3)
    assert "padding" in nnpack.why_not_applicable(big_pad, "implicit_gemm")
    assert nnpack.applicable_algorithms(big_pad) == []
    with pytest.raises(ValueError, match="unknown NNPACK algorithm"):
        nnpack.why_not_applicable(big_pad, "winograd")


def test_strided_convs_take_implicit_gemm_only_and_1x1_also_direct_and_fft():
    for name in ("stride_2", "stride_2_even", "stride_2_no_pad", "stride_2_1x1"):
        for strategy in nnpack.STRATEGIES:
            assert nnpack.applicable_algorithms(SHAPES[name], strategy) == ["auto", "implicit_gemm"], name
    assert "stride 1" in nnpack.why_not_applicable(SHAPES["stride_2_1x1"], "direct")


@pytest.mark.parametrize("groups", [2, 8])
def test_grouped_and_depthwise_convs_are_never_applicable_and_are_refused_before_nnpack(bridge, groups):
    from workbench.kernels.nnpack import nnpack_candidates
    from workbench.model import conv_layer

    shape = ConvShape(8, 8, 12, 12, 3, 3, 1, 1, groups)
    for strategy in nnpack.STRATEGIES:
        assert nnpack.applicable_algorithms(shape, strategy) == []
    assert "no grouped convolution" in nnpack.why_not_applicable(shape, "implicit_gemm")
    x, w, b = make_data(shape)
    with pytest.raises(nnpack.NotApplicableError, match="no grouped convolution"):
        bridge.convolution(x, w, b, shape, algorithm="implicit_gemm")
    layer = conv_layer("g", "input", (1, 8, 12, 12), 8, 3, 1, 1, groups)
    for candidate in nnpack_candidates(1):  # called anyway, setup refuses before any buffer or session
        with pytest.raises(nnpack.NotApplicableError, match="no grouped convolution"):
            candidate.setup(None, type("Case", (), {"layer": layer})(), None)


def test_conv_shape_normalises_and_refuses_empty_outputs():
    shape = ConvShape(3, 8, 10, 12, 3, 5, 2, (1, 2))
    assert shape.pad == (1, 2, 1, 2)
    assert (shape.out_height, shape.out_width) == (5, 6)
    assert ConvShape(3, 8, 10, 12, 3, 3, 1, 1).pad == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="larger than the padded input"):
        ConvShape(2, 2, 3, 3, 5, 5)  # NNPACK would wrap the output size and crash
    with pytest.raises(ValueError):
        ConvShape(0, 2, 3, 3, 1, 1)


def test_conv_shape_is_the_workbench_geometry_and_rules_come_from_it():
    assert ConvShape is ConvGeometry
    one_by_one = SHAPES["kernel_1x1"]
    assert "only 3x3" in nnpack.why_not_applicable(one_by_one, "wt8x8")
    assert "only 3x3" in nnpack.why_not_applicable(one_by_one, "wt8x8_fp16")
    assert "1x1" in nnpack.why_not_applicable(SHAPES["unet_64_48"], "direct")


def test_errors_are_workbench_errors(bridge):
    for name in ("algorithm", "strategy", "activation"):
        kwargs = {"algorithm": "wt8x8", "strategy": "compute", "activation": "identity", name: "nope"}
        with pytest.raises(nnpack.NNPACKNameError, match=f"unknown .*{name}") as info:
            bridge.convolution(*make_data(SHAPES["unet_16_96"]), SHAPES["unet_16_96"], **kwargs)
        assert isinstance(info.value, WorkbenchError) and isinstance(info.value, ValueError)
    assert issubclass(NNPACKError, WorkbenchError) and issubclass(NNPACKError, RuntimeError)
    assert issubclass(NotApplicableError, WorkbenchError) and issubclass(NotApplicableError, ValueError)


@pytest.mark.parametrize("shape,algorithm,strategy,status,name", [
    (SHAPES["unet_64_48"], "direct", "compute", 26, "nnp_status_unsupported_algorithm"),
    (SHAPES["stride_2"], "wt8x8", "compute", 26, "nnp_status_unsupported_algorithm"),
    (SHAPES["kernel_1x1"], "direct", "precompute", 27, "nnp_status_unsupported_transform_strategy"),
    (ConvShape(4, 4, 10, 10, 3, 3, 1, 3), "implicit_gemm", "compute", 12, "nnp_status_invalid_input_padding"),
])
def test_library_status_becomes_nnpack_error(bridge, shape, algorithm, strategy, status, name):
    x, w, b = make_data(shape)
    with pytest.raises(NNPACKError) as info:
        bridge.convolution(x, w, b, shape, algorithm=algorithm, strategy=strategy, precheck=False)
    assert info.value.status == status
    assert f"{name} ({status})" in str(info.value)
    assert "nnp_convolution_inference" in str(info.value)


# ---------------------------------------------------------------------------------------
# Precompute, threads, fp16
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["wt8x8", "ft8x8", "implicit_gemm"])
def test_precompute_then_reuse_matches_compute_without_kernel_transform(algorithm):
    shape = SHAPES["unet_16_96"]
    x, w, b = make_data(shape)
    with nnpack.Bridge(1) as bridge:
        y_compute, p_compute = bridge.convolution(x, w, b, shape, algorithm=algorithm)
        y_first, p_first = bridge.convolution(x, w, b, shape, algorithm=algorithm, strategy="precompute")
        y_reuse, p_reuse = bridge.convolution(x, w.copy(), b, shape, algorithm=algorithm, strategy="precompute")
        assert len(bridge._kernels) == 1  # same content, one transformed kernel
        tk = bridge.transform_kernel(w, shape, algorithm)
        y_explicit, p_explicit = bridge.run_transformed(x, tk, b)
    assert p_compute.kernel_transform > 0 and p_first.kernel_transform > 0
    assert p_reuse.kernel_transform == 0 and p_explicit.kernel_transform == 0
    assert tk.profile.kernel_transform > 0 and tk.nbytes > 0
    for y in (y_first, y_reuse, y_explicit):
        np.testing.assert_allclose(y, y_compute, rtol=1e-6, atol=1e-6 * np.abs(y_compute).max())
    assert set(p_reuse.to_dict()) == {"total", "input_transform", "kernel_transform", "output_transform",
                                      "block_multiplication"}


def test_changed_weight_is_transformed_again():
    shape = SHAPES["one_output_channel"]
    x, w, b = make_data(shape)
    with nnpack.Bridge(1) as bridge:
        bridge.convolution(x, w, b, shape, algorithm="wt8x8", strategy="precompute")
        w[0, 0, 1, 1] += 1.0  # in place: same address, new content
        y, profile = bridge.convolution(x, w, b, shape, algorithm="wt8x8", strategy="precompute")
    assert profile.kernel_transform > 0
    assert nnpack.within_tolerance(y, reference(x, w, b, shape), "wt8x8")


def test_run_pointers_matches_convolution(bridge):
    shape = SHAPES["odd_asymmetric_pad"]
    x, w, b = make_data(shape)
    y_ref, _ = bridge.convolution(x, w, b, shape, algorithm="ft8x8", activation="relu")
    y = np.full(shape.output_shape, np.nan, np.float32)
    profile = bridge.run_pointers(shape, "ft8x8", "compute", x.ctypes.data, w.ctypes.data, b.ctypes.data,
                                  y.ctypes.data, "relu")
    np.testing.assert_array_equal(y, y_ref)
    assert profile.total > 0
    with pytest.raises(nnpack.NNPACKNameError, match="unknown run strategy 'precompute'"):
        bridge.run_pointers(shape, "ft8x8", "precompute", 0, 0, 0, 0)


def test_transformed_at_transforms_once_per_weight_buffer():
    shape = SHAPES["unet_16_96"]
    x, w, _ = make_data(shape)
    with nnpack.Bridge(1) as bridge:
        tk, first = bridge.transformed_at(w.ctypes.data, shape, "wt8x8")
        again, second = bridge.transformed_at(w.ctypes.data, shape, "wt8x8")
        assert first is not None and first.kernel_transform > 0
        assert second is None and again is tk
        y = np.empty(shape.output_shape, np.float32)
        bridge.run_pointers(shape, "wt8x8", "reuse", x.ctypes.data, tk.ptr, bridge.zero_bias(shape).ctypes.data,
                            y.ctypes.data)
        y_no_bias, _ = bridge.convolution(x, w, None, shape, algorithm="wt8x8")
        np.testing.assert_allclose(y, y_no_bias, rtol=1e-6, atol=1e-6 * np.abs(y_no_bias).max())
        w[0, 0, 0, 0] += 1.0  # same address, new content: transformed again
        _, changed = bridge.transformed_at(w.ctypes.data, shape, "wt8x8")
        assert changed is not None


@pytest.mark.parametrize("algorithm,strategy", [("wt8x8", "precompute"), ("ft16x16", "compute"),
                                                ("implicit_gemm", "compute")])
def test_two_threads_match_one_thread(algorithm, strategy):
    shape = SHAPES["unet_64_48"]
    x, w, b = make_data(shape)
    with nnpack.Bridge(1) as one, nnpack.Bridge(2) as two:
        y1, _ = one.convolution(x, w, b, shape, algorithm=algorithm, strategy=strategy)
        y2, _ = two.convolution(x, w, b, shape, algorithm=algorithm, strategy=strategy)
    np.testing.assert_array_equal(y2, y1)  # NNPACK splits work, not reductions, across threads


def test_wt8x8_fp16_runs_as_wt8x8_on_x86(bridge):
    assert nnpack.runs_as("wt8x8") == "wt8x8"
    assert nnpack.runs_as("auto") == "auto"
    assert nnpack.resolved_algorithm(SHAPES["kernel_5x5"], "auto") == "ft16x16"
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        pytest.skip("FP16 Winograd may really run on ARM")
    assert nnpack.runs_as("wt8x8_fp16") == "wt8x8"
    shape = SHAPES["unet_16_96"]
    x, w, b = make_data(shape)
    y16, _ = bridge.convolution(x, w, b, shape, algorithm="wt8x8_fp16")
    y32, _ = bridge.convolution(x, w, b, shape, algorithm="wt8x8")
    np.testing.assert_array_equal(y16, y32)


def test_bridge_module_does_not_import_tvm():
    tree = ast.parse(Path(nnpack.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert not {name for name in imported if name.split(".")[0] in ("tvm", "tvm_ffi")}, imported


# ---------------------------------------------------------------------------------------
# TVM global functions
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tvm_functions():
    tvm = pytest.importorskip("tvm")
    names = nnpack_tvm.register_tvm_functions(threads=1)
    assert names == ["workbench.nnpack.conv2d", "workbench.nnpack.conv2d_prepacked", "workbench.nnpack.last_profile",
                     "workbench.nnpack.set_threads", "workbench.nnpack.share_cores_with_tvm"]
    return tvm


@pytest.mark.parametrize("algorithm,strategy,activation", [
    ("wt8x8", "precompute", "relu"), ("ft8x8", "compute", "identity"), ("auto", "compute", "relu")])
def test_relax_call_dps_packed_matches_torch(tvm_functions, algorithm, strategy, activation):
    tvm = tvm_functions
    shape = SHAPES["odd_asymmetric_pad"]
    x, w, b = make_data(shape)
    ref = reference(x, w, b, shape, relu=activation == "relu")

    vm = nnpack_tvm.relax_vm(shape, algorithm, strategy, activation)  # call_dps_packed inside a compiled module
    for _ in range(2):  # the second call reuses the transformed kernel when precomputing
        y = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), tvm.runtime.tensor(b)).numpy()
        assert nnpack.within_tolerance(y, ref, algorithm), nnpack.relative_error(y, ref)


def test_prepacked_function_sees_new_weights(tvm_functions):
    tvm = tvm_functions
    shape = SHAPES["one_input_channel"]
    func = tvm.get_global_func("workbench.nnpack.conv2d_prepacked")
    out = tvm.runtime.tensor(np.zeros(shape.output_shape, np.float32))
    for seed in (0, 1, 2):
        x, w, b = make_data(shape, seed)
        func(tvm.runtime.tensor(x), tvm.runtime.tensor(w), tvm.runtime.tensor(b), *shape.pad, 1, "wt8x8", out)
        assert nnpack.within_tolerance(out.numpy(), reference(x, w, b, shape), "wt8x8")


def test_te_extern_call_packed_matches_torch(tvm_functions):
    tvm = tvm_functions
    from tvm import te

    shape = SHAPES["kernel_5x5"]
    x, w, b = make_data(shape)
    X = te.placeholder(shape.input_shape, name="x")
    W = te.placeholder(shape.weight_shape, name="w")
    B = te.placeholder((shape.out_channels,), name="b")
    Y = te.extern(
        shape.output_shape, [X, W, B],
        lambda ins, outs: tvm.tirx.call_packed("workbench.nnpack.conv2d", ins[0], ins[1], ins[2], *shape.pad,
                                               shape.stride, "ft8x8", "precompute", "identity", outs[0]),
        name="y", dtype="float32")
    lib = tvm.compile(tvm.IRModule({"main": te.create_prim_func([X, W, B, Y])}),
                      target=tvm.target.Target({"kind": "llvm"}))
    out = tvm.runtime.tensor(np.zeros(shape.output_shape, np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), tvm.runtime.tensor(b), out)
    assert nnpack.within_tolerance(out.numpy(), reference(x, w, b, shape), "ft8x8")


def test_packed_function_reports_not_applicable(tvm_functions):
    tvm = tvm_functions
    shape = SHAPES["unet_64_48"]
    x, w, b = make_data(shape)
    out = tvm.runtime.tensor(np.zeros(shape.output_shape, np.float32))
    func = tvm.get_global_func("workbench.nnpack.conv2d")
    with pytest.raises(Exception, match="direct.*does not apply"):
        func(tvm.runtime.tensor(x), tvm.runtime.tensor(w), tvm.runtime.tensor(b), 1, 1, 1, 1, 1, "direct", out)


@pytest.mark.parametrize("algorithm,strategy", [("wt8x8", "precompute"), ("implicit_gemm", "compute")])
def test_packed_and_relax_paths_give_the_bridges_numbers(tvm_functions, bridge, algorithm, strategy):
    tvm = tvm_functions
    shape = SHAPES["unet_16_96"]
    x, w, b = make_data(shape, seed=3)
    y_bridge, _ = bridge.convolution(x, w, b, shape, algorithm=algorithm, strategy=strategy)
    xt, wt, bt = (tvm.runtime.tensor(a) for a in (x, w, b))

    out = tvm.runtime.tensor(np.zeros(shape.output_shape, np.float32))
    tvm.get_global_func(nnpack_tvm.CONV2D)(xt, wt, bt, *shape.pad, shape.stride, algorithm, strategy, out)
    y_vm = nnpack_tvm.relax_vm(shape, algorithm, strategy)["main"](xt, wt, bt).numpy()
    np.testing.assert_array_equal(out.numpy(), y_bridge)
    np.testing.assert_array_equal(y_vm, y_bridge)
