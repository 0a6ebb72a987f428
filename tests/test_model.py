"""The model as data: reference UNet, ONNX round trip, import of foreign files, clear errors."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from workbench.intensity import layer_table
from workbench.model import (ModelError, UNetSpec, UnsupportedOpError, load_onnx, reference_output,
                             reference_unet, relax_module, sample_input, save_onnx)


def test_reference_unet_has_the_studied_structure():
    model = reference_unet()
    convs = model.convs
    assert len(convs) == 19
    assert [c.out_channels for c in convs[:2]] == [16, 16]
    assert convs[-1].out_channels == 2 and convs[-1].output_shape == (1, 2, 192, 192)
    assert {l.op for l in model.layers} == {"conv", "relu", "maxpool", "resize", "add"}
    # every conv weight matches its layer
    for conv in convs:
        weight, bias = model.params[conv.name]
        assert weight.shape == (conv.out_channels, conv.in_channels, 3, 3) and bias.shape == (conv.out_channels,)


def test_family_scales_with_spec():
    model = reference_unet(UNetSpec(widths=(8, 16, 32, 64), in_channels=1, classes=5, height=64, width=96))
    assert len(model.convs) == 4 * 2 + 3 * 2 + 1
    assert model.layers[-1].output_shape == (1, 5, 64, 96)


def test_spec_rejects_sizes_that_cannot_pool_evenly():
    with pytest.raises(ModelError, match="divisible by 16"):
        UNetSpec(height=100, width=192)


def test_onnx_round_trip_gives_the_same_layer_table(tmp_path, small_model):
    path = save_onnx(small_model, tmp_path / "small.onnx")
    imported = load_onnx(path)
    assert layer_table(imported).equals(layer_table(small_model))
    for name, (weight, bias) in small_model.params.items():
        np.testing.assert_array_equal(imported.params[name][0], weight)
        np.testing.assert_array_equal(imported.params[name][1], bias)


def test_onnx_runtime_agrees_with_the_pytorch_reference(tmp_path, small_model):
    import onnxruntime as ort

    path = save_onnx(small_model, tmp_path / "small.onnx")
    x = sample_input(small_model)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = session.run(None, {small_model.input_name: x})[0]
    np.testing.assert_allclose(ours, reference_output(small_model, x), rtol=1e-4, atol=1e-4)


def test_relax_module_computes_the_reference(small_model):
    import tvm
    from tvm import relax

    executable = tvm.compile(relax_module(small_model), target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    x = sample_input(small_model)
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(out, reference_output(small_model, x), rtol=1e-4, atol=1e-4)


def test_a_torch_exported_unet_with_concat_imports(tmp_path):
    import torch
    import torch.nn.functional as F

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
            self.head = torch.nn.Conv2d(16, 2, 1)

        def forward(self, x):
            a = F.relu(self.c1(x))
            b = self.c2(F.relu(F.max_pool2d(a, 2)))
            up = F.interpolate(b, scale_factor=2, mode="nearest")
            return self.head(torch.cat([up + a, a], 1))

    path = tmp_path / "tiny.onnx"
    torch.onnx.export(Tiny().eval(), torch.randn(1, 3, 32, 40), str(path), dynamo=False, input_names=["x"])
    model = load_onnx(path)
    assert [l.op for l in model.layers] == ["conv", "relu", "maxpool", "relu", "conv", "resize", "add", "concat", "conv"]
    assert model.layers[-1].output_shape == (1, 2, 32, 40) and model.layers[-1].kernel == 1
    import onnxruntime as ort

    x = sample_input(model)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(reference_output(model, x), expected, rtol=1e-4, atol=1e-4)


def _graph_with(node, extra_inits=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])
    graph = helper.make_graph([node], "g", [x], [y], list(extra_inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_unsupported_op_names_the_op_and_the_node(tmp_path):
    path = tmp_path / "sigmoid.onnx"
    onnx.save(_graph_with(helper.make_node("Sigmoid", ["x"], ["y"], name="gate")), str(path))
    with pytest.raises(UnsupportedOpError) as err:
        load_onnx(path)
    assert "'Sigmoid'" in str(err.value) and "'gate'" in str(err.value) and "Conv" in str(err.value)


def test_a_depthwise_conv_imports_and_a_group_that_does_not_fit_is_refused_with_the_node_name(tmp_path):
    weight = onnx.numpy_helper.from_array(np.ones((3, 1, 3, 3), np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=3, pads=[1, 1, 1, 1])
    path = tmp_path / "grouped.onnx"
    onnx.save(_graph_with(node, [weight]), str(path))
    conv = load_onnx(path).layer("dw")
    assert conv.groups == 3 and conv.geometry.is_depthwise and conv.geometry.macs == 3 * 9 * 64
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=2, pads=[1, 1, 1, 1])
    onnx.save(_graph_with(node, [weight]), str(path))
    with pytest.raises(ModelError, match=r"node 'dw' \(Conv\): .*input channels per group"):
        load_onnx(path)


def test_malformed_and_missing_files_fail_clearly(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x01this is not a protobuf\xff\xfe")
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        load_onnx(garbage)
    with pytest.raises(ModelError, match="does not exist"):
        load_onnx(tmp_path / "missing.onnx")


def test_an_unreadable_file_is_one_clear_error(tmp_path, monkeypatch):
    import workbench.model as model_module

    path = save_onnx(reference_unet(UNetSpec(widths=(4,), height=8, width=8)), tmp_path / "m.onnx")

    def denied(*args, **kwargs):  # what open() says for a file without read permission (root reads anything)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(model_module, "open", denied, raising=False)
    with pytest.raises(ModelError, match=r"cannot read model file .*m\.onnx \(Permission denied\); check its permissions"):
        load_onnx(path)


# ---------------------------------------------------------------- the content fingerprint

def test_the_fingerprint_follows_content_not_names(tmp_path, small_model):
    from dataclasses import replace

    from workbench.model import with_name

    fingerprint = small_model.fingerprint
    assert len(fingerprint) == 16 and fingerprint == reference_unet(UNetSpec(widths=(4, 8, 16), height=32, width=48),
                                                                    seed=3).fingerprint
    assert load_onnx(save_onnx(small_model, tmp_path / "a" / "small.onnx")).fingerprint == fingerprint
    assert with_name(small_model, "other").fingerprint == fingerprint
    # Same layer names, other weights; same layer names, other input size: each another model.
    assert reference_unet(UNetSpec(widths=(4, 8, 16), height=32, width=48), seed=4).fingerprint != fingerprint
    assert reference_unet(UNetSpec(widths=(4, 8, 16), height=32, width=64), seed=3).fingerprint != fingerprint
    weights = {name: (w.copy(), b.copy()) for name, (w, b) in small_model.params.items()}
    first = small_model.convs[0].name
    weights[first][0][0, 0, 0, 0] += 1e-3
    assert replace(small_model, params=weights).fingerprint != fingerprint


# ---------------------------------------------------------------- Resize and Constant forms

def _conv_then(node_after, inits_after=(), out_hw=8, nodes_before=(), opset=19):
    rng = np.random.default_rng(5)
    conv = helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1] * 4)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((2, 3, 3, 3)).astype(np.float32), "w"),
             onnx.numpy_helper.from_array(rng.standard_normal(2).astype(np.float32), "b"), *inits_after]
    graph = helper.make_graph([*nodes_before, conv, node_after], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 7, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 7 * out_hw // 8,
                                                                                      5 * out_hw // 8])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 9 if opset >= 19 else 8
    return proto


RESIZE_MODES = [(ctm, nearest, scale)
                for ctm in ("half_pixel", "pytorch_half_pixel", "half_pixel_symmetric", "asymmetric", "align_corners")
                for nearest in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil") for scale in (2, 3)]


@pytest.mark.parametrize("ctm,nearest,scale", RESIZE_MODES, ids=["-".join(map(str, m)) for m in RESIZE_MODES])
def test_a_resize_is_accepted_only_where_it_repeats_each_pixel(ctm, nearest, scale):
    """What ONNX Runtime computes is what the workbench's layer computes, or the loader refuses."""
    import onnxruntime as ort

    from workbench.model import from_onnx_proto

    scales = onnx.numpy_helper.from_array(np.array([1, 1, scale, scale], np.float32), "scales")
    node = helper.make_node("Resize", ["c", "", "scales"], ["y"], name="up", mode="nearest",
                            coordinate_transformation_mode=ctm, nearest_mode=nearest)
    proto = _conv_then(node, [scales], out_hw=8 * scale)
    x = np.random.default_rng(1).standard_normal((1, 3, 7, 5)).astype(np.float32)
    expected = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    repeats = ctm != "align_corners" and (nearest.startswith("round") if "half_pixel" in ctm else
                                          nearest == "floor" or (nearest == "round_prefer_floor" and scale == 2))
    if not repeats:
        with pytest.raises(ModelError, match="node 'up' \\(Resize\\): Resize with coordinate_transformation_mode"):
            from_onnx_proto(proto)
        return
    model = from_onnx_proto(proto)
    assert model.layers[-1].scale == scale
    np.testing.assert_allclose(reference_output(model, x), expected, rtol=1e-5, atol=1e-5)


def test_resize_forms_that_mean_the_same_upsampling_are_read():
    from workbench.model import from_onnx_proto

    constant = helper.make_node("Constant", [], ["s"], name="s", value_floats=[1.0, 1.0, 2.0, 2.0])
    resize = helper.make_node("Resize", ["c", "", "s"], ["y"], name="up", mode="nearest")  # ONNX's default modes
    assert from_onnx_proto(_conv_then(resize, out_hw=16, nodes_before=[constant])).layers[-1].scale == 2
    two = onnx.numpy_helper.from_array(np.array([2, 2], np.float32), "s")  # opset 18: scales for axes H, W only
    axes = helper.make_node("Resize", ["c", "", "s"], ["y"], name="up", mode="nearest", axes=[2, 3])
    assert from_onnx_proto(_conv_then(axes, [two], out_hw=16)).layers[-1].scale == 2
    sizes = onnx.numpy_helper.from_array(np.array([1, 2, 21, 15], np.int64), "sz")
    by_size = helper.make_node("Resize", ["c", "", "", "sz"], ["y"], name="up", mode="nearest")
    assert from_onnx_proto(_conv_then(by_size, [sizes], out_hw=24)).layers[-1].scale == 3
    four = onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "s4")
    resize10 = helper.make_node("Resize", ["c", "s4"], ["y"], name="up", mode="nearest")  # Resize-10: (X, scales)
    assert from_onnx_proto(_conv_then(resize10, [four], out_hw=16, opset=10)).layers[-1].scale == 2


def test_constants_in_their_plain_number_forms_are_read():
    from workbench.model import from_onnx_proto

    extra = [helper.make_node("Constant", [], [f"k{i}"], name=f"k{i}", **{form: value})
             for i, (form, value) in enumerate([("value_float", 2.0), ("value_int", 3), ("value_ints", [1, 2])])]
    scales = helper.make_node("Constant", [], ["s"], name="s", value_floats=[1.0, 1.0, 2.0, 2.0])
    resize = helper.make_node("Resize", ["c", "", "s"], ["y"], name="up", mode="nearest")
    model = from_onnx_proto(_conv_then(resize, out_hw=16, nodes_before=[*extra, scales]))
    assert [l.op for l in model.layers] == ["conv", "resize"]
