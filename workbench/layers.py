"""Layers as data: one operator of a network with its shapes and attributes, and the constructors that
compute each operator's output shape. model.py builds networks from them and onnx_family.py reads
the mobile networks' ONNX ops into them; neither imports the other's internals through this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import WorkbenchError
from .geometry import ConvGeometry

# The largest tensor (elements) accepted anywhere in a model: 8 GiB of float32.
MAX_ELEMENTS = 2 ** 31


class ModelError(WorkbenchError, ValueError):
    """A model the workbench cannot read; the message names the problem and what to do."""


class UnsupportedOpError(ModelError):
    """The model uses an operator outside the supported family."""


@dataclass(frozen=True)
class Layer:
    """One operator of the network. Shapes are NCHW with batch 1."""

    name: str
    op: str  # conv, relu, maxpool, resize, add, concat
    inputs: tuple[str, ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    kernel: int = 0  # conv and maxpool: square kernel size
    stride: int = 1
    pad: int = 0  # symmetric padding on every side
    scale: int = 1  # resize: integer nearest-neighbour factor
    groups: int = 1  # conv: channel groups (depthwise: groups == channels)
    # Op-specific settings as (key, value) pairs: clip bounds, a pool's ceil mode, a slice's channels...
    options: tuple[tuple[str, object], ...] = ()

    def option(self, key: str, default=None):
        return dict(self.options).get(key, default)

    def extra_attributes(self) -> list[tuple[str, object]]:
        """The attributes beyond the first release's, where they differ from their defaults."""
        return ([("groups", int(self.groups))] if self.groups != 1 else []) + list(self.options)

    @property
    def in_channels(self) -> int:
        return self.input_shape[1]

    @property
    def out_channels(self) -> int:
        return self.output_shape[1]

    @property
    def geometry(self) -> ConvGeometry:
        """A conv's geometry, the one description every kernel and count works from."""
        if self.op != "conv":
            raise ModelError(f"layer {self.name!r} is a {self.op}, not a convolution")
        _, c, h, w = self.input_shape
        return ConvGeometry.square(c, self.out_channels, h, w, self.kernel, self.stride, self.pad, self.groups)


def _ints(shape) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


def printable(text: str) -> str:
    """`text` with control and other unprintable characters escaped as repr() shows them (a newline
    becomes \\n, an ANSI escape \\x1b), so a name from a model file stays on its line in a table."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


# ---------------------------------------------------------------- shapes of each operator

def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def conv_layer(name, src, shape, out_channels, kernel=3, stride=1, pad=1, groups=1) -> Layer:
    n, _, h, w = shape
    out = (n, out_channels, _conv_out(h, kernel, stride, pad), _conv_out(w, kernel, stride, pad))
    if out[2] < 1 or out[3] < 1:
        raise ModelError(f"conv {name!r}: a {kernel}x{kernel} kernel does not fit input {shape}")
    if shape[1] % groups or out_channels % groups:
        raise ModelError(f"conv {name!r}: group={groups} must divide its {shape[1]} input and {out_channels} "
                         "output channels; fix the conv's group in the source model")
    return Layer(name, "conv", (src,), shape, out, kernel=kernel, stride=stride, pad=pad, groups=groups)


def pool_layer(name, src, shape, kernel=2, stride=2, pad=0) -> Layer:
    n, c, h, w = shape
    out = (n, c, _conv_out(h, kernel, stride, pad), _conv_out(w, kernel, stride, pad))
    return Layer(name, "maxpool", (src,), shape, out, kernel=kernel, stride=stride, pad=pad)


def unary_layer(name, op, src, shape) -> Layer:
    return Layer(name, op, (src,), shape, shape)


def resize_layer(name, src, shape, scale=2) -> Layer:
    n, c, h, w = shape
    return Layer(name, "resize", (src,), shape, (n, c, h * scale, w * scale), scale=scale)


def add_layer(name, a, b, shape) -> Layer:
    return Layer(name, "add", (a, b), shape, shape)


def concat_layer(name, srcs, shapes) -> Layer:
    n, _, h, w = shapes[0]
    channels = sum(s[1] for s in shapes)
    return Layer(name, "concat", tuple(srcs), shapes[0], (n, channels, h, w))


def _pool_out(size: int, kernel: int, stride: int, pad: int, ceil: bool) -> int:
    if not ceil:
        return _conv_out(size, kernel, stride, pad)
    out = -(-(size + 2 * pad - kernel) // stride) + 1
    # A last window that would start in the padding is dropped (ONNX's and torch's rule).
    return out - 1 if (out - 1) * stride >= size + pad else out


def window_layer(name, op, src, shape, kernel, stride, pad, ceil=False, include_pad=False) -> Layer:
    """A max or average pool; `ceil` rounds the output size up, `include_pad` averages over padding too."""
    n, c, h, w = shape
    out = (n, c, _pool_out(h, kernel, stride, pad, ceil), _pool_out(w, kernel, stride, pad, ceil))
    options = (("ceil", True),) if ceil else ()
    if op == "avgpool" and include_pad and pad:
        options += (("include_pad", True),)
    return Layer(name, op, (src,), shape, out, kernel=kernel, stride=stride, pad=pad, options=options)


def clip_layer(name, src, shape, low: float, high: float) -> Layer:
    """min(max(x, low), high): ReLU6 is clip(0, 6). A clip at 0 with no upper bound is a ReLU."""
    if low == 0 and high == math.inf:
        return unary_layer(name, "relu", src, shape)
    return Layer(name, "clip", (src,), shape, shape, options=(("bounds", (float(low), float(high))),))


def global_pool_layer(name, src, shape, keepdims=True) -> Layer:
    out = (shape[0], shape[1], 1, 1) if keepdims else (shape[0], shape[1])
    return Layer(name, "globalavgpool", (src,), shape, out)


def flatten_layer(name, src, shape) -> Layer:
    return Layer(name, "flatten", (src,), shape, (shape[0], math.prod(shape[1:])))


def gemm_layer(name, src, shape, out_features: int) -> Layer:
    """A fully connected layer on a (1, features) input; its weight is (out, in) like torch's Linear."""
    return Layer(name, "gemm", (src,), shape, (shape[0], out_features))


def shuffle_layer(name, src, shape, groups: int) -> Layer:
    """ShuffleNet's channel shuffle: channels viewed as (groups, C / groups), transposed, flattened."""
    return Layer(name, "shuffle", (src,), shape, shape, options=(("groups", int(groups)),))


def slice_layer(name, src, shape, start: int, stop: int) -> Layer:
    """Channels [start, stop) of a feature map (one output of a Split, a torch chunk)."""
    n, _, h, w = shape
    return Layer(name, "slice", (src,), shape, (n, stop - start, h, w), options=(("channels", (start, stop)),))


# ---------------------------------------------------------------- ONNX attributes

def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _square(values, what: str) -> int:
    values = [int(v) for v in values]
    if len(set(values)) != 1:
        raise ModelError(f"{what} {values} is not the same on every side; only symmetric {what} is supported")
    return values[0]


def _window_attrs(attrs, op: str, kernel_default=None) -> tuple[int, int, int]:
    """Conv's or MaxPool's (kernel, stride, pad), each one value for both axes; every list checked
    for its length and range first (a stride of 0 or a negative pad is no window)."""
    kernel = attrs.get("kernel_shape", kernel_default)
    if kernel is None or len(kernel) != 2:
        raise ModelError(f"kernel_shape {kernel} must give 2 sizes (height, width) for a 2-D {op}; "
                         "re-export the model with a 2-D kernel")
    strides, pads = list(attrs.get("strides", [1, 1])), list(attrs.get("pads", [0, 0, 0, 0]))
    if len(strides) != 2:
        raise ModelError(f"strides {strides} must give 2 values (height, width) for a 2-D {op}; "
                         "re-export the model with one stride per spatial axis")
    if len(pads) != 4:
        raise ModelError(f"pads {pads} must give 4 values (top, left, bottom, right) for a 2-D {op}; "
                         "re-export the model with explicit pads for both spatial axes")
    if any(k < 1 for k in kernel):
        raise ModelError(f"kernel_shape {list(kernel)} must be at least 1 on each axis; fix the {op} in the source model")
    if any(s < 1 for s in strides):
        raise ModelError(f"strides {strides} must be at least 1; fix the {op}'s strides in the source model")
    if any(p < 0 for p in pads):
        raise ModelError(f"pads {pads} must not be negative (a negative pad crops the input); crop with a "
                         f"separate op or fix the {op}'s pads in the source model")
    return _square(kernel, "kernel_shape"), _square(strides, "strides"), _square(pads, "pads")
