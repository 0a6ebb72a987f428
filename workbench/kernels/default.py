"""TVM's untuned conv (`tvm:default`): topi's NCHW compute, what Relax legalises a conv2d into.

It is also the one TVM kernel that absorbs the decoder's ResizeNearest -> Add(skip) [-> ReLU]:
the upsample is an index division in its epilogue, so the low-resolution conv output is read
directly instead of being materialised at full resolution.
"""

from __future__ import annotations

from ..names import symbol
from .tvm_kernel import TVMCandidate, final_kernel


def default_conv_func(layer, relu: bool = False):
    """PrimFunc (data, weight OIHW, bias, out): topi.nn.conv2d_nchw + bias (+ ReLU)."""
    from tvm import te, topi

    data, weight, bias, conv = _conv(layer)
    out = te.compute(conv.shape, lambda n, k, y, x: conv[n, k, y, x] + bias[k], name="bias_add")
    if relu:
        out = topi.nn.relu(out)
    return te.create_prim_func([data, weight, bias, out]).with_attr("global_symbol", "conv")


def fused_conv_func(layer, scale: int, relu: bool):
    """PrimFunc (data, weight, bias, skip, out): conv + bias, nearest upsample by `scale`, + skip (+ ReLU)."""
    from tvm import te

    data, weight, bias, conv = _conv(layer)
    _, k, oh, ow = (int(d) for d in conv.shape)
    skip = te.placeholder((1, k, oh * scale, ow * scale), "float32", name="skip")

    def epilogue(n, o, y, x):
        value = conv[n, o, y // scale, x // scale] + bias[o] + skip[n, o, y, x]
        return te.max(value, te.const(0, "float32")) if relu else value

    out = te.compute(skip.shape, epilogue, name="conv_resize_add")
    return te.create_prim_func([data, weight, bias, skip, out])


def _conv(layer):
    from tvm import te, topi

    g = layer.geometry
    data = te.placeholder(g.input_shape, "float32", name="data")
    weight = te.placeholder(g.weight_shape, "float32", name="weight")
    bias = te.placeholder((g.out_channels,), "float32", name="bias")
    conv = topi.nn.conv2d_nchw(data, weight, g.stride, g.symmetric_pad, 1)
    return data, weight, bias, conv


class DefaultCandidate(TVMCandidate):
    impl = "tvm:default"
    note = "unscheduled topi conv2d_nchw"
    fusible = ("relu", "resize", "add")

    def prim_func(self, layer, relu, weight, target):
        return default_conv_func(layer, relu), weight

    def emit(self, bb, group, values, weight, bias, target):
        if group.add is None:
            return super().emit(bb, group, values, weight, bias, target)
        from tvm import relax

        conv = group.conv
        func = fused_conv_func(conv, group.resize.scale if group.resize else 1, group.relu)
        name = symbol(f"conv_{conv.name}") + "_" + "_".join(m.op for m in group.members)
        gv = bb.add_func(final_kernel(func, name), name)
        args = [values[conv.inputs[0]], relax.const(weight), relax.const(bias), values[group.skip]]
        out_type = relax.TensorType(group.add.output_shape, "float32")
        return bb.emit(relax.call_tir(gv, args, out_type), symbol(group.tail.name))
