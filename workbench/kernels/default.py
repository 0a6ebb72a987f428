"""TVM's untuned conv (`tvm:default`): topi's NCHW compute, what Relax legalises a conv2d into
(grouped and depthwise convs included: topi's general conv with `groups`).

It also absorbs the ops around a conv as plain TE stages: the encoder's MaxPool [-> ReLU]
before it (computed from the pre-pool tensor) and the decoder's ResizeNearest -> Add(skip)
[-> ReLU] after it (the upsample is an index division in its epilogue, so the low-resolution
conv output is read directly instead of being materialised at full resolution).
"""

from __future__ import annotations

from ..fusion import Fusion
from ..schedules import activation
from .tvm_kernel import TVMCandidate


def default_conv_func(layer, relu: bool | Fusion = False):
    """PrimFunc (data, weight OIHW, bias, [skip], out): topi.nn.conv2d_nchw + bias (+ the fusion).

    With a bool (ReLU or not) the compute is exactly the one MetaSchedule tunes (tuning.workload).
    """
    from tvm import te, topi

    if isinstance(relu, Fusion) and (relu.prologue_ops or relu.scale > 1 or relu.add or relu.cap is not None):
        return fused_default_func(layer, relu)
    relu = relu.relu if isinstance(relu, Fusion) else relu
    data, weight, bias, conv = _conv(layer)
    out = te.compute(conv.shape, lambda n, k, y, x: conv[n, k, y, x] + bias[k], name="bias_add")
    if relu:
        out = topi.nn.relu(out)
    return te.create_prim_func([data, weight, bias, out]).with_attr("global_symbol", "conv")


def fused_conv_func(layer, scale: int, relu: bool):
    """PrimFunc (data, weight, bias, skip, out): conv + bias, nearest upsample by `scale`, + skip (+ ReLU)."""
    return fused_default_func(layer, Fusion(scale=scale, add=True, relu=relu))


def fused_default_func(layer, fusion: Fusion):
    """PrimFunc (data, weight, bias, [skip], out) computing `fusion` around topi's conv + bias."""
    from tvm import te

    g = layer.geometry
    data_shape = (1, g.in_channels, *fusion.pool_in) if fusion.pool else g.input_shape
    data = te.placeholder(data_shape, "float32", name="data")
    data, weight, bias, conv = _conv(layer, data, _pool(data, fusion, g.input_shape) if fusion.pool else data)
    _, k, oh, ow = (int(d) for d in conv.shape)
    s = fusion.scale
    skip = te.placeholder((1, k, oh * s, ow * s), "float32", name="skip") if fusion.add else None

    def epilogue(n, o, y, x):
        value = conv[n, o, y // s, x // s] + bias[o]
        value = value + skip[n, o, y, x] if skip is not None else value
        return activation(value, fusion)

    out = te.compute((1, k, oh * s, ow * s), epilogue, name="conv_epilogue")
    return te.create_prim_func([data, weight, bias] + ([skip] if skip is not None else []) + [out])


def _pool(data, fusion: Fusion, shape):
    """relu?(maxpool(data)) as the max of the window's loads (from 0 when ReLU follows)."""
    from tvm import te

    p = fusion.pool

    def value(n, c, h, w):
        out = te.const(0, "float32") if fusion.pool_relu else None
        for i in range(p):
            for j in range(p):
                load = data[n, c, h * p + i, w * p + j]
                out = load if out is None else te.max(out, load)
        return out

    return te.compute(shape, value, name="pool")


def _conv(layer, data=None, conv_input=None):
    from tvm import te, topi

    g = layer.geometry
    data = te.placeholder(g.input_shape, "float32", name="data") if data is None else data
    weight = te.placeholder(g.weight_shape, "float32", name="weight")
    bias = te.placeholder((g.out_channels,), "float32", name="bias")
    source = data if conv_input is None else conv_input
    if g.is_grouped:  # what Relax legalises a grouped conv2d into (topi's general conv, OIHW weights)
        conv = topi.nn.conv(source, weight, g.stride, g.symmetric_pad, 1, g.groups, "NCHW", "OIHW")
    else:  # kept for ungrouped convs: MetaSchedule's stored workloads are this compute
        conv = topi.nn.conv2d_nchw(source, weight, g.stride, g.symmetric_pad, 1)
    return data, weight, bias, conv


class DefaultCandidate(TVMCandidate):
    impl = "tvm:default"
    note = "unscheduled topi conv2d (NCHW; grouped: topi.nn.conv with groups)"
    fusible = ("relu", "clip", "resize", "add")
    prologue_fusible = ("maxpool", "relu")

    def prim_func(self, layer, fusion, weight, target):
        return default_conv_func(layer, fusion), weight
