"""The bad-input corpus: every case runs the real command line and must end in one clear line.

Each case asserts exit code 2, exactly one stderr line starting with `error:` that names the
problem, no traceback, and nothing written outside its work dir. All of them fail at the door,
before a local cluster starts: a tripwire on LocalCluster.start turns a case that got that far
into a failure (it would have measured something). Most run in-process through
`workbench.__main__.main`; a handful run as subprocesses to prove the real exit code.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from workbench.__main__ import main
from workbench.model import save_onnx
from workbench.plan import Plan
from workbench.records import DEFAULT_WORK_DIR

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


# ---------------------------------------------------------------- bad model files

def _vi(name, shape, elem=F32):
    return helper.make_tensor_value_info(name, elem, shape)


def _w(name, shape, dtype=np.float32):
    return numpy_helper.from_array(np.random.default_rng(0).standard_normal(shape).astype(dtype), name)


def _conv(src="x", out="y", name="conv", cin=3, cout=4, **attrs):
    attrs.setdefault("pads", [1, 1, 1, 1])
    return helper.make_node("Conv", [src, f"{name}.w", f"{name}.b"], [out], name=name, **attrs), \
        [_w(f"{name}.w", (cout, cin, 3, 3)), _w(f"{name}.b", (cout,))]


def _save(path, nodes, inits=(), inputs=None, outputs=None, check=True):
    inputs = inputs if inputs is not None else [_vi("x", [1, 3, 8, 8])]
    outputs = outputs if outputs is not None else [_vi("y", [1, 4, 8, 8])]
    proto = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                              opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    if check:  # the file itself is valid ONNX: only the workbench's rules refuse it
        onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def _conv_relu(**conv_attrs):
    conv, inits = _conv(out="c", **conv_attrs)
    return [conv, helper.make_node("Relu", ["c"], ["y"], name="relu")], inits


def _models(d: Path) -> dict[str, Path]:
    """name -> a model file the workbench must refuse."""
    m = {}
    (d / "garbage.onnx").write_bytes(b"\x08\x01this is not a protobuf\xff\xfe")
    m["garbage"] = d / "garbage.onnx"
    (d / "empty.onnx").write_bytes(b"")
    m["empty_file"] = d / "empty.onnx"
    (d / "text.onnx").write_text("graph { node: Conv }\n")
    m["text"] = d / "text.onnx"
    nodes, inits = _conv_relu()
    whole = _save(d / "whole.onnx", nodes, inits).read_bytes()
    (d / "truncated.onnx").write_bytes(whole[: len(whole) // 2])
    m["truncated"] = d / "truncated.onnx"
    (d / "folder.onnx").mkdir()
    m["folder"] = d / "folder.onnx"
    m["missing"] = d / "missing.onnx"

    conv, inits = _conv(out="c")
    m["sigmoid"] = _save(d / "sigmoid.onnx", [conv, helper.make_node("Sigmoid", ["c"], ["y"], name="gate")], inits)
    conv, _ = _conv()
    m["float16"] = _save(d / "f16.onnx", [conv], [_w("conv.w", (4, 3, 3, 3), np.float16), _w("conv.b", (4,), np.float16)],
                         inputs=[_vi("x", [1, 3, 8, 8], F16)], outputs=[_vi("y", [1, 4, 8, 8], F16)])
    m["float16_weights"] = _save(d / "f16w.onnx", [conv], [_w("conv.w", (4, 3, 3, 3), np.float16), _w("conv.b", (4,))],
                                 check=False)
    m["float64"] = _save(d / "f64.onnx", [conv], [_w("conv.w", (4, 3, 3, 3), np.float64), _w("conv.b", (4,), np.float64)],
                         inputs=[_vi("x", [1, 3, 8, 8], TensorProto.DOUBLE)], outputs=[_vi("y", [1, 4, 8, 8], TensorProto.DOUBLE)])
    m["missing_initializer"] = _save(d / "noinit.onnx", [conv], [_w("conv.b", (4,))], check=False)
    conv, inits = _conv(out="c")
    bias = _w("shift", (1, 4, 1, 1))
    m["broadcast_add"] = _save(d / "badd.onnx", [conv, helper.make_node("Add", ["c", "shift"], ["y"], name="/Add")],
                               inits + [bias])
    c1, i1 = _conv(out="a", name="c1")
    c2, i2 = _conv(src="x", out="b", name="c2", cout=4, pads=[0, 0, 0, 0])
    m["add_shapes"] = _save(d / "addshape.onnx", [c1, c2, helper.make_node("Add", ["a", "b"], ["y"], name="sum")],
                            i1 + i2, check=False)
    m["empty_graph"] = _save(d / "nonodes.onnx", [], inputs=[_vi("x", [1, 3, 8, 8])], outputs=[_vi("x2", [1, 3, 8, 8])],
                             check=False)
    conv, inits = _conv()
    m["rank3"] = _save(d / "rank3.onnx", [conv], inits, inputs=[_vi("x", [1, 3, 8])], check=False)
    m["batch2"] = _save(d / "batch2.onnx", [conv], inits, inputs=[_vi("x", [2, 3, 8, 8])], outputs=[_vi("y", [2, 4, 8, 8])])
    m["dynamic_hw"] = _save(d / "dyn.onnx", [conv], inits, inputs=[_vi("x", [1, 3, "H", "W"])],
                            outputs=[_vi("y", [1, 4, "H", "W"])])
    m["two_inputs"] = _save(d / "twoin.onnx", [helper.make_node("Add", ["x", "z"], ["s"], name="add"),
                                               helper.make_node("Conv", ["s", "conv.w", "conv.b"], ["y"], name="conv",
                                                                pads=[1] * 4)],
                            inits, inputs=[_vi("x", [1, 3, 8, 8]), _vi("z", [1, 3, 8, 8])])
    m["int64_input"] = _save(d / "int.onnx", [conv], inits, inputs=[_vi("x", [1, 3, 8, 8], TensorProto.INT64)], check=False)
    grouped = helper.make_node("Conv", ["x", "g.w"], ["y"], name="dw", group=3, pads=[1] * 4)
    m["grouped"] = _save(d / "grouped.onnx", [grouped], [_w("g.w", (3, 2, 3, 3))], outputs=[_vi("y", [1, 3, 8, 8])],
                         check=False)  # 2 input channels per group of a 3-channel input
    bn = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["n"], name="bn")
    m["lone_batchnorm"] = _save(d / "bn.onnx", [bn, helper.make_node("Conv", ["n", "conv.w", "conv.b"], ["y"], name="conv",
                                                                     pads=[1] * 4)],
                                [_w(t, (3,)) for t in "sbmv"] + _conv()[1])
    view = helper.make_node("Reshape", ["x", "shape5"], ["v5"], name="view")
    m["reshape_5d"] = _save(d / "view.onnx", [view, helper.make_node("Relu", ["v5"], ["y"], name="relu")],
                            [numpy_helper.from_array(np.array([1, 3, 1, 8, 8], np.int64), "shape5")],
                            outputs=[_vi("y", [1, 3, 1, 8, 8])])
    nodes, inits = _conv_relu(dilations=[2, 2], pads=[2, 2, 2, 2])
    m["dilated"] = _save(d / "dilated.onnx", nodes, inits)
    nodes, inits = _conv_relu(pads=[1, 0, 1, 0])
    m["asymmetric_pads"] = _save(d / "pads.onnx", nodes, inits, outputs=[_vi("y", [1, 4, 8, 6])])
    nodes, inits = _conv_relu()
    nodes[0].ClearField("attribute")  # no pads: SAME_UPPER instead
    nodes[0].attribute.extend([helper.make_attribute("auto_pad", "SAME_UPPER")])
    m["auto_pad"] = _save(d / "autopad.onnx", nodes, inits)
    conv, inits = _conv(out="c")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    linear = helper.make_node("Resize", ["c", "", "scales"], ["y"], name="up", mode="linear")
    m["resize_linear"] = _save(d / "linear.onnx", [conv, linear], inits + [scales], outputs=[_vi("y", [1, 4, 16, 16])])
    mean = helper.make_node("ReduceMean", ["c"], ["y"], name="mean", axes=[1])
    m["channel_mean"] = _save(d / "mean.onnx", [conv, mean], inits, outputs=[_vi("y", [1, 1, 8, 8])])
    cat = helper.make_node("Concat", ["c", "c"], ["y"], name="cat", axis=2)
    m["concat_axis"] = _save(d / "cat.onnx", [conv, cat], inits, outputs=[_vi("y", [1, 4, 16, 8])])
    dynamic_weight = helper.make_node("Conv", ["x", "wx"], ["y"], name="conv", pads=[1] * 4)
    m["weight_input"] = _save(d / "wx.onnx", [dynamic_weight], inputs=[_vi("x", [1, 3, 8, 8]), _vi("wx", [4, 3, 3, 3])])
    m["no_conv"] = _save(d / "relu.onnx", [helper.make_node("Relu", ["x"], ["y"], name="r")],
                         outputs=[_vi("y", [1, 3, 8, 8])])
    conv, inits = _conv(out="y")
    m["output_not_last"] = _save(d / "notlast.onnx", [conv, helper.make_node("Relu", ["y"], ["z"], name="r")], inits)
    m["relu_of_constant"] = _save(d / "constrelu.onnx", [helper.make_node("Relu", ["conv.b"], ["r"], name="r"),
                                                         _conv(out="y")[0]], inits)
    big = helper.make_node("Conv", ["x", "k.w"], ["y"], name="big", pads=[0] * 4)
    m["kernel_too_big"] = _save(d / "big.onnx", [big], [_w("k.w", (4, 3, 11, 11))],
                                inputs=[_vi("x", [1, 3, 8, 8])], outputs=[_vi("y", [1, 4, 1, 1])], check=False)
    conv, inits = _conv(out="c")
    unsorted = [helper.make_node("Relu", ["c"], ["y"], name="r"), conv]
    m["unsorted"] = _save(d / "unsorted.onnx", unsorted, inits, check=False)
    conv, inits = _conv()
    proto = helper.make_model(helper.make_graph([conv], "g", [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 4, 8, 8])], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, str(d / "external.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="external.bin", size_threshold=0)
    (d / "external.bin").unlink()
    m["external_data_missing"] = d / "external.onnx"
    m.update(_shape_models(d))
    m.update(_path_cases(d))
    return m


def _after_conv(d: Path, file: str, node, out_shape, extra_inits=()):
    """A conv (3 -> 4 channels, 8x8) whose output `c` feeds `node`, the node under test."""
    conv, inits = _conv(out="c")
    return _save(d / file, [conv, node], inits + list(extra_inits), outputs=[_vi("y", out_shape)], check=False)


def _resize(d: Path, file: str, scales=None, sizes=None, out=(1, 4, 16, 16), **attrs):
    inits, names = [], ["c", "", "", ""]
    if scales is not None:
        inits.append(numpy_helper.from_array(np.array(scales, np.float32), "scales"))
        names[2] = "scales"
    if sizes is not None:
        inits.append(numpy_helper.from_array(np.array(sizes, np.int64), "sizes"))
        names[3] = "sizes"
    node = helper.make_node("Resize", names[: 4 if sizes is not None else 3], ["y"], name="up", mode="nearest", **attrs)
    return _after_conv(d, file, node, list(out), inits)


def _shape_models(d: Path) -> dict[str, Path]:
    """Shapes, attributes and names the loader must check itself (the ONNX checker lets them through)."""
    m = {}
    pool = lambda **a: helper.make_node("MaxPool", ["c"], ["y"], name="pool", **a)
    m["pool_kernel_too_big"] = _after_conv(d, "poolbig.onnx", pool(kernel_shape=[16, 16]), [1, 4, 1, 1])
    m["pool_kernel_0"] = _after_conv(d, "pool0.onnx", pool(kernel_shape=[0, 0]), [1, 4, 8, 8])
    m["pool_pads_negative"] = _after_conv(d, "poolneg.onnx", pool(kernel_shape=[2, 2], strides=[2, 2], pads=[-3] * 4),
                                          [1, 4, 1, 1])
    m["pool_pads_beyond_half_kernel"] = _after_conv(d, "poolpad.onnx", pool(kernel_shape=[2, 2], pads=[2] * 4),
                                                    [1, 4, 11, 11])
    m["pool_stride_0"] = _after_conv(d, "poolstride0.onnx", pool(kernel_shape=[2, 2], strides=[0, 0]), [1, 4, 4, 4])
    m["pool_strides_length_1"] = _after_conv(d, "poolstride1.onnx", pool(kernel_shape=[2, 2], strides=[2]), [1, 4, 4, 4])
    nodes, inits = _conv_relu(strides=[0, 0])
    m["conv_stride_0"] = _save(d / "stride0.onnx", nodes, inits, check=False)
    nodes, inits = _conv_relu(pads=[1, 1])
    m["conv_pads_length_2"] = _save(d / "pads2.onnx", nodes, inits, check=False)
    nodes, inits = _conv_relu(pads=[-1] * 4)
    m["conv_pads_negative"] = _save(d / "padneg.onnx", nodes, inits, outputs=[_vi("y", [1, 4, 4, 4])], check=False)
    nodes, inits = _conv_relu(kernel_shape=[5, 5])
    m["conv_kernel_shape_disagrees"] = _save(d / "kshape.onnx", nodes, inits, check=False)
    zero = helper.make_node("Conv", ["x", "w0"], ["y"], name="conv", pads=[1] * 4)
    m["conv_zero_out_channels"] = _save(d / "cout0.onnx", [zero], [_w("w0", (0, 3, 3, 3))],
                                        outputs=[_vi("y", [1, 0, 8, 8])], check=False)
    nodes, inits = _conv_relu()
    m["input_too_large"] = _save(d / "huge.onnx", nodes, inits, inputs=[_vi("x", [1, 3, 100000, 100000])],
                                 outputs=[_vi("y", [1, 4, 100000, 100000])], check=False)
    c1, i1 = _conv(out="a", name="c1", pads=[0] * 4)
    c2, i2 = _conv(out="b", name="c2")
    m["concat_sizes_differ"] = _save(d / "catsize.onnx", [c1, c2, helper.make_node("Concat", ["a", "b"], ["y"], name="cat",
                                                                                   axis=1)],
                                     i1 + i2, outputs=[_vi("y", [1, 8, 8, 8])], check=False)
    m["resize_scale_0"] = _resize(d, "resize0.onnx", scales=[1, 1, 0, 0], out=(1, 4, 1, 1))
    m["resize_scale_negative"] = _resize(d, "resizeneg.onnx", scales=[1, 1, -2, -2])
    m["resize_scale_fraction"] = _resize(d, "resize15.onnx", scales=[1, 1, 1.5, 1.5], out=(1, 4, 12, 12))
    m["resize_scale_huge"] = _resize(d, "resizehuge.onnx", scales=[1, 1, 1e6, 1e6], out=(1, 4, 8000000, 8000000))
    m["resize_scale_nan"] = _resize(d, "resizenan.onnx", scales=[1, 1, float("nan"), float("nan")])
    m["resize_scales_and_sizes"] = _resize(d, "resizeboth.onnx", scales=[1, 1, 2, 2], sizes=[1, 4, 16, 16])
    m["resize_sizes_fraction"] = _resize(d, "resize12.onnx", sizes=[1, 4, 12, 12], out=(1, 4, 12, 12))
    m["resize_align_corners"] = _resize(d, "resizeac.onnx", scales=[1, 1, 2, 2],
                                        coordinate_transformation_mode="align_corners")
    m["resize_tf_crop_and_resize"] = _resize(d, "resizetf.onnx", scales=[1, 1, 2, 2],
                                             coordinate_transformation_mode="tf_crop_and_resize")
    m["resize_asymmetric_ceil"] = _resize(d, "resizeceil.onnx", scales=[1, 1, 2, 2],
                                          coordinate_transformation_mode="asymmetric", nearest_mode="ceil")
    m["resize_half_pixel_floor"] = _resize(d, "resizehpfloor.onnx", scales=[1, 1, 3, 3], out=(1, 4, 24, 24),
                                           nearest_mode="floor")
    conv, inits = _conv(out="c")
    custom = helper.make_node("Relu", ["c"], ["y"], name="relu", domain="com.custom")
    proto = helper.make_model(helper.make_graph([conv, custom], "g", [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 4, 8, 8])],
                                                inits),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.custom", 1)])
    proto.ir_version = 8
    onnx.save(proto, str(d / "custom.onnx"))
    m["custom_domain_relu"] = d / "custom.onnx"
    nodes, inits = _conv_relu()
    m["constant_without_value"] = _save(d / "constnone.onnx", [helper.make_node("Constant", [], ["k"], name="k")] + nodes,
                                        inits, check=False)
    text = helper.make_node("Constant", [], ["k"], name="k", value_string="hello")
    m["constant_string"] = _save(d / "conststr.onnx", [text] + nodes, inits, check=False)
    weight = helper.make_node("Constant", [], ["cw"], name="cw", value_floats=[0.5, 0.5])
    m["constant_1d_weight"] = _save(d / "constw.onnx", [weight, helper.make_node("Conv", ["x", "cw"], ["y"], name="conv")],
                                    check=False)
    # Names from the file shown with repr: a newline or an ANSI escape stays inside the one line.
    big = helper.make_node("Conv", ["x", "k.w"], ["y"], name="big\nline2", pads=[0] * 4)
    m["newline_in_node_name"] = _save(d / "nl.onnx", [big], [_w("k.w", (4, 3, 11, 11))], outputs=[_vi("y", [1, 4, 1, 1])],
                                      check=False)
    conv, inits = _conv(out="c")
    ansi = helper.make_node("Sigmoid", ["c"], ["y"], name="gate\x1b[31mRED")
    m["ansi_escape_in_node_name"] = _save(d / "ansi.onnx", [conv, ansi], inits)
    return m


def _path_cases(d: Path) -> dict[str, Path | str]:
    """--model values that are no readable file: empty, a name too long, a symlink loop."""
    (d / "loop.onnx").symlink_to("loop.onnx")
    return {"empty_path": "", "name_too_long": d / ("m" * 300 + ".onnx"), "symlink_loop": d / "loop.onnx"}


# What each model's one line must say (a fragment of the message, matched case-sensitively).
MODEL_CASES = {
    "garbage": "not a valid ONNX model", "empty_file": "is empty", "text": "not a valid ONNX model",
    "truncated": "not a valid ONNX model", "folder": "is not a file", "missing": "does not exist",
    "sigmoid": "'Sigmoid'", "float16": "float16", "float16_weights": "float16", "float64": "float64",
    "missing_initializer": "lacks the initializer 'conv.w'", "broadcast_add": "node '/Add' (Add): input 'shift'",
    "add_shapes": "same shape", "empty_graph": "graph has no nodes", "rank3": "static NCHW", "batch2": "batch size 2",
    "dynamic_hw": "static NCHW", "two_inputs": "one input", "int64_input": "int64", "grouped": "input channels per group",
    "lone_batchnorm": "only right after a Conv", "reshape_5d": "channel shuffle",
    "dilated": "dilations", "asymmetric_pads": "symmetric pads", "auto_pad": "auto_pad", "resize_linear": "'linear'",
    "channel_mean": "height and width", "concat_axis": "axis 2", "weight_input": "constant initializer", "no_conv": "no Conv",
    "output_not_last": "last node", "relu_of_constant": "node 'r' (Relu): input 'conv.b' is a constant",
    "kernel_too_big": "does not fit", "unsorted": "topolog", "external_data_missing": "not a valid ONNX model",
    "pool_kernel_too_big": "node 'pool' (MaxPool): its 16x16 kernel does not fit", "pool_kernel_0": "kernel_shape [0, 0]",
    "pool_pads_negative": "pads [-3, -3, -3, -3] must not be negative", "pool_pads_beyond_half_kernel": "more than half",
    "pool_stride_0": "node 'pool' (MaxPool): strides [0, 0] must be at least 1",
    "pool_strides_length_1": "strides [2] must give 2 values", "conv_stride_0": "node 'conv' (Conv): strides [0, 0]",
    "conv_pads_length_2": "pads [1, 1] must give 4 values", "conv_pads_negative": "node 'conv' (Conv): pads [-1, -1, -1, -1]",
    "conv_kernel_shape_disagrees": "kernel_shape [5, 5] disagrees with the weight 'conv.w'",
    "conv_zero_out_channels": "node 'conv' (Conv): weight 'w0' has shape (0, 3, 3, 3)",
    "input_too_large": "30,000,000,000 elements", "concat_sizes_differ": "node 'cat' (Concat): Concat joins channels",
    "resize_scale_0": "node 'up' (Resize): Resize scales [1, 1, 0, 0] must be positive",
    "resize_scale_negative": "scales [1, 1, -2, -2] must be positive", "resize_scale_fraction": "equal integer factor",
    "resize_scale_huge": "more than the 2,147,483,648", "resize_scale_nan": "must be positive",
    "resize_scales_and_sizes": "both scales and sizes", "resize_sizes_fraction": "sizes [1, 4, 12, 12] are not supported",
    "resize_align_corners": "'align_corners' is not supported", "resize_tf_crop_and_resize": "'tf_crop_and_resize'",
    "resize_asymmetric_ceil": "nearest_mode 'ceil'", "resize_half_pixel_floor": "nearest_mode 'floor' does not repeat",
    "custom_domain_relu": "node 'relu' has op type 'Relu' from the operator domain 'com.custom'",
    "constant_without_value": "node 'k' (Constant): a Constant needs exactly one value attribute",
    "constant_string": "'value_string' is not supported", "constant_1d_weight": "weight 'cw' has shape (2,)",
    "newline_in_node_name": "node 'big\\nline2' (Conv): its 11x11 kernel does not fit",
    "ansi_escape_in_node_name": "node 'gate\\x1b[31mRED' has op type 'Sigmoid'",
    "empty_path": "the model path '' is empty", "name_too_long": "(File name too long)",
    "symlink_loop": "(Too many levels of symbolic links)",
}


# ---------------------------------------------------------------- bad flags (each with a good model)

TARGETS = {
    '"host"': "quoted string", "{}": "no 'kind'", '{"kind": "nonsense"}': "'nonsense'", "{bad": "not JSON",
    "armv7": "generates arm code", "aarch64": "generates aarch64 code", '{"kind": "cuda"}': "'cuda'",
    '{"kind": "llvm", "mtriple": "nonsense-none"}': "architecture 'nonsense'",
    '{"kind": "llvm", "mcpu": "cortex-a72"}': "mcpu 'cortex-a72'", "[1]": "not a target dict",
    '{"kind": "llvm", "foo": 1}': "'foo'", '{"kind": "llvm", "num-cores": 64}': "64 threads",
    '{"kind": "llvm", "num-cores": 0}': "num-cores must be a positive integer", "": "unknown target ''",
    '{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "skylake-avx512"}': "mcpu 'skylake-avx512'",
    '{"kind": "llvm", "mattr": ["+nonsense-feature"]}': "mattr ['+nonsense-feature']: not a feature LLVM knows",
    '{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+avx2"]}': "not a feature LLVM knows for 'aarch64",
    '{"kind": "llvm", "mattr": "+avx2"}': "mattr must be a list",
    '{"kind": "llvm", "mattr": ["avx2"]}': "+FEATURE or -FEATURE",
}

FLAG_CASES = [  # (id, argv after the command's model/work-dir arguments, expected fragment)
    ("threads_999", ["compare", "--threads", "999"], "between 1 and the device's"),
    ("threads_minus_1", ["compare", "--threads", "-1"], "positive integer, got -1"),
    ("threads_0", ["ceilings", "--threads", "0"], "positive integer, got 0"),
    ("threads_word", ["compare", "--threads", "two"], "invalid int value: 'two'"),
    ("threads_fraction", ["tune", "--trials", "1", "--threads", "1.5"], "invalid int value: '1.5'"),
    ("serve_threads_999", ["serve", "--threads", "999"], "between 1 and the device's"),
    ("export_threads_999", ["export", "--out", "OUT", "--threads", "999"], "between 1 and the device's"),
    *[(f"target_{i}", ["compare", "--target", t], frag) for i, (t, frag) in enumerate(TARGETS.items())],
    ("target_threads_conflict", ["compare", "--target", '{"kind": "llvm", "num-cores": 1}', "--threads", "2"], "differ"),
    ("layers_unknown", ["compare", "--layers", "nope"], "unknown conv layer(s) ['nope']"),
    ("layers_empty_name", ["compare", "--layers", "enc0_conv1,,enc0_conv2"], "empty name"),
    ("layers_trailing_comma", ["tune", "--trials", "1", "--layers", "enc0_conv1,"], "empty name"),
    ("trials_0", ["tune", "--trials", "0"], "--trials must be at least 1"),
    ("trials_negative_study", ["study", "--trials", "-5"], "--trials must be at least 1"),
    ("trials_missing", ["tune"], "--trials"),
    ("trials_word", ["tune", "--trials", "many"], "invalid int value"),
    ("tune_choice", ["study", "--tune", "everything"], "invalid choice: 'everything'"),
    ("tracker_nohost", ["compare", "--tracker", "nohost"], "HOST:PORT"),
    ("tracker_no_host", ["compare", "--tracker", ":9"], "HOST:PORT"),
    ("tracker_port_word", ["ceilings", "--tracker", "h:p"], "HOST:PORT"),
    ("tracker_port_range", ["study", "--tracker", "127.0.0.1:70000"], "port from 1 to 65535"),
    ("tracker_port_0", ["tune", "--trials", "1", "--tracker", "127.0.0.1:0"], "port from 1 to 65535"),
    ("tracker_port_superscript", ["compare", "--tracker", "127.0.0.1:\u00b2"], "HOST:PORT"),
    ("tracker_port_arabic_digits", ["compare", "--tracker", "127.0.0.1:\u0669\u0661\u0669\u0660"], "HOST:PORT"),
    ("tracker_two_ports", ["compare", "--tracker", "127.0.0.1:9190:9190"], "HOST:PORT"),
    ("tracker_url", ["ceilings", "--tracker", "http://127.0.0.1:9190"], "no scheme"),
    ("serve_tracker_two_ports", ["serve", "--tracker", "127.0.0.1:9190:9190"], "HOST:PORT"),
    ("serve_host_empty", ["serve", "--host", ""], "--host is empty"),
    ("serve_host_unknown", ["serve", "--host", "nonexistent-host.invalid", "--allow-remote"],
     "cannot listen on --host 'nonexistent-host.invalid'"),
    ("serve_tracker_refused", ["serve", "--tracker", "127.0.0.1:9"], "RPC tracker at 127.0.0.1:9 "),
    ("layers_spaces_stripped", ["compare", "--layers", "enc0_conv1, nope"], "unknown conv layer(s) ['nope']"),
    ("layers_on_study", ["study", "--layers", "enc0_conv1"], "(see python -m workbench study --help)"),
    ("key_without_tracker", ["compare", "--key", "rpi"], "pass --tracker"),
    ("key_empty", ["compare", "--tracker", "127.0.0.1:9190", "--key", " "], "--key is empty"),
    ("serve_port", ["serve", "--port", "0"], "--port must be between 1 and 65535"),
    ("serve_remote_bind", ["serve", "--host", "0.0.0.0"], "--allow-remote"),
    ("serve_tracker", ["serve", "--tracker", "nohost"], "HOST:PORT"),
    ("unknown_flag", ["compare", "--fast"], "unrecognized arguments: --fast"),
    ("unknown_command", ["benchmark"], "invalid choice: 'benchmark'"),
    ("work_dir_is_a_file", ["compare", "--work-dir", "FILE"], "is a file, not a folder"),
    ("work_dir_under_proc", ["compare", "--work-dir", "/proc/workbench-nope"], "under /proc"),
]


# ---------------------------------------------------------------- bad plans (export)

def _plans(small_model) -> dict[str, str]:
    good = {**Plan.uniform(small_model).to_dict(), "model": "small"}  # a study of small.onnx names it so
    rows = good["layers"]
    return {
        "plan_truncated": json.dumps(good)[:40],
        "plan_not_an_object": json.dumps(rows),
        "plan_misnamed_keys": json.dumps({"model": "m", "convs": rows}),
        "plan_entry_without_impl": json.dumps({**good, "layers": [{"layer": rows[0]["layer"]}, *rows[1:]]}),
        "plan_unknown_layer": json.dumps({**good, "layers": [*rows, {"layer": "nope", "impl": "tvm:default"}]}),
        "plan_incomplete": json.dumps({**good, "layers": rows[1:]}),
        "plan_unknown_impl": json.dumps({**good, "layers": [{**rows[0], "impl": "winograd-please"}, *rows[1:]]}),
        "plan_fuse_string": json.dumps({**good, "layers": [{**rows[0], "fuse": "relu"}, *rows[1:]]}),
        "plan_impl_number": json.dumps({**good, "layers": [{**rows[0], "impl": 3}, *rows[1:]]}),
        "plan_duplicate_entry": json.dumps({**good, "layers": [rows[0], *rows]}),
        "plan_illegal_fusion": json.dumps({**good, "layers": [{**rows[0], "fuse": ["maxpool"]}, *rows[1:]]}),
        "plan_deeply_nested": "[" * 100_000,
        "plan_tuned_without_records": json.dumps({**good, "layers": [{**rows[0], "impl": "tvm:tuned", "fuse": []},
                                                                    *rows[1:]]}),
        "plan_binary": "BINARY",
        "plan_is_a_folder": "FOLDER",
        "plan_missing": "MISSING",
    }


PLAN_CASES = {
    "plan_truncated": "not valid JSON", "plan_not_an_object": "not a plan", "plan_misnamed_keys": "not a plan",
    "plan_entry_without_impl": "needs 'layer' and 'impl'", "plan_unknown_layer": "['nope'] that are not convs",
    "plan_incomplete": "no entry for conv(s) ['enc0_conv1']", "plan_unknown_impl": "unknown implementation id",
    "plan_fuse_string": "'fuse' must be a list", "plan_impl_number": "must be strings",
    "plan_duplicate_entry": "twice", "plan_illegal_fusion": "cannot fuse ['maxpool']",
    "plan_deeply_nested": "nested too deeply",
    "plan_tuned_without_records": "'tvm:tuned' does not apply: no tuning record for this layer",
    "plan_binary": "cannot read the plan", "plan_is_a_folder": "must be a regular file but is a folder", "plan_missing": "no plan at",
}


# ---------------------------------------------------------------- running a case

@pytest.fixture(scope="module")
def corpus(tmp_path_factory, small_model):
    d = tmp_path_factory.mktemp("corpus")
    return {"models": _models(d), "small": save_onnx(small_model, d / "small.onnx"), "plans": _plans(small_model)}


@pytest.fixture
def no_cluster(monkeypatch):
    """A tripwire: every case must fail before a local cluster starts (and measures anything)."""
    from workbench.rpc import LocalCluster

    def refuse(self):
        raise AssertionError("a local cluster started: the bad input was not caught at the door")

    monkeypatch.setattr(LocalCluster, "start", refuse)


def _snapshot(*roots: Path, skip: Path | None = None) -> set[str]:
    found = set()
    for root in roots:
        if root.is_dir():
            found |= {str(p) for p in root.rglob("*") if skip is None or skip not in (p, *p.parents)}
    return found


class Place:
    """A case's cwd (a fresh tmp dir) and its work dir inside it; what outside it must stay as it was."""

    def __init__(self, tmp: Path):
        self.cwd, self.work = tmp, tmp / "work"
        self.before = self.outside()

    def outside(self) -> set[str]:
        return _snapshot(self.cwd, DEFAULT_WORK_DIR, skip=self.work) | {p.name for p in Path("/").iterdir()}

    def argv(self, argv: list[str]) -> list[str]:
        argv = [str(self.cwd / "out") if a == "OUT" else a for a in argv]
        if "FILE" in argv:
            (self.cwd / "afile").write_text("x")
            self.before = self.outside()
            argv[argv.index("FILE")] = str(self.cwd / "afile")
        return argv


def _run_in_process(argv, place: Place, capfd, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.chdir(place.cwd)
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own exit, after printing its one line
        code = stop.code
    out, err = capfd.readouterr()
    return code, out, err


def _check(code, out, err, fragment, place: Place):
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in err and out == ""
    assert place.outside() == place.before, "a file was written outside the work dir"
    written = [p for p in place.work.rglob("*") if p.is_file()] if place.work.exists() else []
    assert written == [], written


def _model_and_work_dir(argv: list[str], model: str, place: Place) -> list[str]:
    """A good model and a work dir inside the case's folder, for the commands that take them."""
    extra = []
    if argv[0] in ("compare", "tune", "study", "export", "layers"):
        extra += ["--model", model]
    if argv[0] in ("compare", "tune", "study", "export") and "--work-dir" not in argv:
        extra += ["--work-dir", str(place.work)]
    return extra


# ---------------------------------------------------------------- the corpus

@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_bad_models(case, corpus, tmp_path, capfd, monkeypatch, no_cluster):
    place = Place(tmp_path)
    command = "compare" if sum(map(ord, case)) % 2 else "layers"  # both paths read models the same way
    argv = [command, "--model", str(corpus["models"][case])] + (["--work-dir", str(place.work)] if command == "compare" else [])
    _check(*_run_in_process(argv, place, capfd, monkeypatch), MODEL_CASES[case], place)


@pytest.mark.parametrize("case", FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_bad_flags(case, corpus, tmp_path, capfd, monkeypatch, no_cluster):
    _, argv, fragment = case
    place = Place(tmp_path)
    argv = place.argv(argv)
    argv = argv + _model_and_work_dir(argv, str(corpus["small"]), place)
    _check(*_run_in_process(argv, place, capfd, monkeypatch), fragment, place)


@pytest.mark.parametrize("case", sorted(PLAN_CASES))
def test_bad_plans(case, corpus, tmp_path, capfd, monkeypatch, no_cluster):
    place = Place(tmp_path)
    hybrid = place.work / "hybrid"
    hybrid.mkdir(parents=True)
    text = corpus["plans"][case]
    if text == "BINARY":
        (hybrid / "plan.json").write_bytes(b"\xff\xfe\x00garbage")
    elif text == "FOLDER":
        (hybrid / "plan.json").mkdir()
    elif text != "MISSING":
        (hybrid / "plan.json").write_text(text)
    inputs = _snapshot(place.work)
    argv = ["export", "--model", str(corpus["small"]), "--work-dir", str(place.work), "--out", str(tmp_path / "out")]
    code, out, err = _run_in_process(argv, place, capfd, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and PLAN_CASES[case] in lines[0], err
    assert "Traceback" not in err and out == ""
    assert place.outside() == place.before and _snapshot(place.work) == inputs


def test_the_corpus_is_large_enough():
    assert len(MODEL_CASES) + len(FLAG_CASES) + len(PLAN_CASES) >= 80


# A handful through a real process: the exit code and stderr a shell sees.
SUBPROCESS_CASES = [
    ("model", ["layers", "--model", "{float16}"], "float16"),
    ("model", ["compare", "--model", "{broadcast_add}", "--work-dir", "{work}"], "node '/Add' (Add)"),
    ("flag", ["compare", "--threads", "999", "--work-dir", "{work}"], "between 1 and the device's"),
    ("flag", ["compare", "--target", '"host"', "--work-dir", "{work}"], "quoted string"),
    ("flag", ["study", "--target", "armv7", "--work-dir", "{work}"], "generates arm code"),
    ("flag", ["ceilings", "--threads", "abc"], "invalid int value"),
    ("flag", ["compare", "--tracker", "h:p", "--work-dir", "{work}"], "HOST:PORT"),
]


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=[" ".join(c[1][:3]) for c in SUBPROCESS_CASES])
def test_a_real_process_exits_2_with_one_line(case, corpus, tmp_path):
    _, argv, fragment = case
    place = Place(tmp_path)
    names = {**{k: str(v) for k, v in corpus["models"].items()}, "work": str(place.work)}
    argv = [a.format(**names) if a.startswith("{") and a.endswith("}") else a for a in argv]
    proc = subprocess.run([sys.executable, "-m", "workbench", *argv], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    _check(proc.returncode, proc.stdout, proc.stderr, fragment, place)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:  # bound, then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_with_a_dead_tracker_exits_2_within_seconds(tmp_path):
    """The tracker is checked before the server starts: no server left running forever, unregistered."""
    place = Place(tmp_path)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "workbench", "serve", "--tracker", f"127.0.0.1:{_free_port()}",
                           "--port", str(_free_port())], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert time.monotonic() - started < 15
    _check(proc.returncode, proc.stdout, proc.stderr, "cannot connect to the RPC tracker", place)


# ---------------------------------------------------------------- a remote device checks on connecting

def test_a_remote_device_reports_its_machine_and_refuses_what_it_cannot_run(cluster):
    from workbench.rpc import open_device
    from workbench.targets import TargetError

    address = f"127.0.0.1:{cluster.port}"
    with open_device(address, cluster.key) as device:
        described = device.describe()
    assert described["machine"] == platform.machine() and described["cores"] == os.cpu_count()
    assert described["target"]["num-cores"] == os.cpu_count()  # no --threads: every core the device has
    with pytest.raises(TargetError, match=f"generates aarch64 code, but the device .* runs on {platform.machine()}"):
        with open_device(address, cluster.key, target="aarch64"):
            pass
    with pytest.raises(TargetError, match=f"{os.cpu_count() + 1} threads asked for, but the device .* has "
                                          f"{os.cpu_count()} core"):
        with open_device(address, cluster.key, threads=os.cpu_count() + 1):
            pass


def test_a_foreign_target_on_a_remote_device_is_one_line_in_a_real_process(cluster, tmp_path):
    place = Place(tmp_path)
    argv = ["ceilings", "--tracker", f"127.0.0.1:{cluster.port}", "--key", cluster.key, "--target", "armv7", "--quick"]
    proc = subprocess.run([sys.executable, "-m", "workbench", *argv], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    _check(proc.returncode, proc.stdout, proc.stderr, "generates arm code", place)
