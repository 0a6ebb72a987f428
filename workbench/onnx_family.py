"""The widened ONNX op family of MobileNetV2, SqueezeNet and ShuffleNetV2, read into layers.

model.py reads the first family (Conv, Relu, MaxPool, Resize, Add, Concat); this module adds what
the mobile networks need, and the patterns exporters write for them:

- BatchNormalization after a Conv is folded into the conv's weights and bias (the model notes it,
  and the layer table says so); anywhere else it is refused.
- Shape arithmetic on constants (torch writes Shape -> Gather -> Div -> Slice for a chunk) is
  evaluated at import: only feature-map ops become layers.
- ShuffleNet's channel shuffle, Reshape to (N, g, C/g, H, W) -> Transpose(0, 2, 1, 3, 4) -> Reshape
  back, becomes one `shuffle` layer; a Split (or a channel Slice) becomes `slice` layers.
- Clip (ReLU6), AveragePool, GlobalAveragePool / ReduceMean over H and W, Flatten, Gemm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .layers import (MAX_ELEMENTS, Layer, ModelError, _attrs, _text, _window_attrs, clip_layer, flatten_layer, gemm_layer,
                    global_pool_layer, shuffle_layer, slice_layer, window_layer)

# Shape arithmetic exporters write (Shape -> Gather -> Div -> Slice for a torch chunk, say): evaluated
# at import when every input is known, so only the feature-map ops become layers.
_FOLDABLE_OPS = ("Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Add", "Sub", "Mul", "Div", "Cast",
                 "Slice", "Floor", "Ceil", "Reshape", "ConstantOfShape", "Range")
SHUFFLE_PERM = [0, 2, 1, 3, 4]
_SHUFFLE_HOW = ("a Reshape to 5-D is read only as ShuffleNet's channel shuffle: Reshape to (N, groups, C/groups, "
                "H, W), Transpose with perm [0, 2, 1, 3, 4], Reshape back to (N, C, H, W)")


@dataclass
class GraphState:
    """What the import knows so far: constants, feature-map shapes, and tensors in flight."""

    consts: dict
    shapes: dict  # layer (or input) name -> shape
    alias: dict  # tensor -> producing layer
    params: dict
    readers: dict  # tensor -> how many nodes (and graph outputs) read it
    opset: int
    views: dict = field(default_factory=dict)  # tensor -> (stage, source layer, groups) of a shuffle
    folded: dict = field(default_factory=dict)  # conv layer -> the BatchNormalization folded into it
    layers: list = field(default_factory=list)


def readers_of(graph) -> dict:
    counts: dict = {}
    for node in graph.node:
        for tensor in node.input:
            counts[tensor] = counts.get(tensor, 0) + 1
    for output in graph.output:
        counts[output.name] = counts.get(output.name, 0) + 1
    return counts


# ---------------------------------------------------------------- shape arithmetic on constants

def fold(node, state: GraphState) -> bool:
    """Evaluate a node whose inputs are all known values (a Shape reads a feature map's shape); False if
    it computes on feature maps."""
    if node.op_type not in _FOLDABLE_OPS:
        return False
    inputs = [t for t in node.input if t]
    if node.op_type == "Shape":
        source = state.alias.get(inputs[0], inputs[0])
        if source not in state.shapes and inputs[0] not in state.consts:
            return False
        shape = state.shapes[source] if source in state.shapes else state.consts[inputs[0]].shape
        attrs = _attrs(node)
        state.consts[node.output[0]] = np.array(shape, np.int64)[attrs.get("start", 0):attrs.get("end", None)]
        return True
    if not all(t in state.consts for t in inputs) or node.op_type == "Concat" and not inputs:
        return False
    # By position: a blank optional input (Slice's axes, say) is None, not the next one moved up.
    values = [np.asarray(state.consts[t]) if t else None for t in node.input]
    result = _evaluate(node.op_type, values, _attrs(node), node, state.consts)
    if result.size > MAX_ELEMENTS:
        raise ModelError(f"its constant result would have {result.size:,} elements, more than the {MAX_ELEMENTS:,} "
                         "the workbench handles; fix the shape arithmetic in the source model")
    state.consts[node.output[0]] = result
    return True


def _evaluate(op: str, values: list, attrs: dict, node, consts) -> np.ndarray:
    if op in ("Add", "Sub", "Mul", "Div", "ConstantOfShape", "Range"):
        _check_size(op, values)
    if op in ("Add", "Sub", "Mul"):
        return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op](values[0], values[1])
    if op == "Div":
        a, b = values
        if np.issubdtype(a.dtype, np.integer):  # ONNX's integer Div truncates toward zero
            quotient = np.abs(a) // np.abs(b)
            return (np.sign(a) * np.sign(b) * quotient).astype(a.dtype)
        return a / b
    if op in ("Floor", "Ceil"):
        return (np.floor if op == "Floor" else np.ceil)(values[0])
    if op == "Gather":
        return np.take(values[0], values[1], axis=attrs.get("axis", 0))
    if op in ("Unsqueeze", "Squeeze"):
        axes = attrs.get("axes", values[1].tolist() if len(values) > 1 and values[1] is not None else None)
        if op == "Squeeze":
            return np.squeeze(values[0], axis=tuple(axes) if axes is not None else None)
        out = values[0]
        for axis in sorted(a % (out.ndim + len(axes)) for a in axes):
            out = np.expand_dims(out, axis)
        return out
    if op == "Concat":
        return np.concatenate([np.atleast_1d(v) for v in values], axis=attrs.get("axis", 0))
    if op == "Cast":
        from onnx import helper

        return values[0].astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
    if op == "Slice":
        return values[0][_slices(values[0].ndim, values[1:])]
    if op == "Reshape":
        return values[0].reshape(_target_shape(values[0].shape, values[1]))
    if op == "ConstantOfShape":
        from onnx import numpy_helper

        fill = numpy_helper.to_array(attrs["value"]) if "value" in attrs else np.zeros(1, np.float32)
        return np.full(values[0].astype(np.int64), fill.ravel()[0], fill.dtype)
    if op == "Range":
        return np.arange(values[0], values[1], values[2])
    raise ModelError(f"{op} is not shape arithmetic the workbench evaluates")


def _check_size(op: str, values: list) -> None:
    """Refuse shape arithmetic whose result would not fit before numpy tries to allocate it."""
    if op == "ConstantOfShape":
        size = math.prod(int(d) for d in np.asarray(values[0]).ravel())
    elif op == "Range":
        start, limit, delta = (float(np.asarray(v).ravel()[0]) for v in values[:3])
        size = max(0, math.ceil((limit - start) / delta)) if delta else MAX_ELEMENTS + 1
    else:
        size = math.prod(np.broadcast_shapes(*(np.shape(v) for v in values[:2])))
    if size > MAX_ELEMENTS:
        raise ModelError(f"its {op} would make {size:,} elements, more than the {MAX_ELEMENTS:,} the workbench "
                         "handles; fix the shape arithmetic in the source model")


def _optional(args: list, index: int):
    return args[index] if len(args) > index and args[index] is not None else None


def _slices(ndim: int, args: list) -> tuple:
    starts, ends = args[0].tolist(), args[1].tolist()
    axes = _optional(args, 2).tolist() if _optional(args, 2) is not None else list(range(len(starts)))
    steps = _optional(args, 3).tolist() if _optional(args, 3) is not None else [1] * len(starts)
    index = [slice(None)] * ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[axis] = slice(start, end, step)
    return tuple(index)


def _target_shape(shape, target) -> tuple[int, ...]:
    """ONNX Reshape's target: 0 copies the input's dimension, -1 takes what is left."""
    target = np.asarray(target).tolist()
    if any(d == 0 and i >= len(shape) for i, d in enumerate(target)):
        raise ModelError(f"Reshape to {target} copies a dimension (0) that its {len(shape)}-D input does not have")
    dims = [shape[i] if d == 0 else int(d) for i, d in enumerate(target)]
    if -1 in dims:
        known = math.prod(d for d in dims if d != -1)
        dims[dims.index(-1)] = math.prod(shape) // known if known else 0
    return tuple(dims)


# ---------------------------------------------------------------- feature-map ops

def layers_from_node(node, name: str, srcs: list[str], state: GraphState, fresh) -> list[Layer] | None:
    """The layers a node of the widened family makes ([] when it only changes state, None when it is
    not one of them); `fresh(base)` names a second output's layer."""
    op, attrs = node.op_type, _attrs(node)
    if node.input[0] in state.views:  # the middle or the end of a channel shuffle
        if op not in ("Reshape", "Transpose"):
            raise ModelError(f"{op} reads a 5-D view; {_SHUFFLE_HOW}")
        return _reshape_or_transpose(node, name, None, None, attrs, state)
    shape = state.shapes[srcs[0]]
    if op == "BatchNormalization":
        fold_batch_norm(node, srcs[0], state)
        return []
    if op == "Clip":
        low, high = _clip_bounds(node, attrs, state)
        return [clip_layer(name, srcs[0], shape, low, high)]
    if op == "AveragePool":
        return [_average_pool(node, name, srcs[0], shape, attrs)]
    if op in ("GlobalAveragePool", "ReduceMean"):
        keepdims = True if op == "GlobalAveragePool" else bool(attrs.get("keepdims", 1))
        if op == "ReduceMean":
            _check_spatial_mean(node, attrs, state, shape)
        _need_4d(shape, op)
        return [global_pool_layer(name, srcs[0], shape, keepdims)]
    if op == "Flatten":
        if attrs.get("axis", 1) not in (0, 1) or len(shape) < 2:
            raise ModelError(f"Flatten with axis {attrs.get('axis')} is not supported; flatten from axis 1 "
                             "(torch.flatten(x, 1)) before the classifier")
        return [flatten_layer(name, srcs[0], shape)]
    if op == "Gemm":
        return [_gemm(node, name, srcs[0], shape, attrs, state)]
    if op == "Split":
        return _split(node, name, srcs[0], shape, attrs, state, fresh)
    if op == "Slice":
        start, stop = _channel_slice(node, state, shape)
        return [slice_layer(name, srcs[0], shape, start, stop)]
    if op in ("Reshape", "Transpose"):
        return _reshape_or_transpose(node, name, srcs[0], shape, attrs, state)
    return None


def _need_4d(shape, op: str) -> None:
    if len(shape) != 4:
        raise ModelError(f"{op} needs an NCHW feature map, its input has shape {list(shape)}")


def fold_batch_norm(node, src: str, state: GraphState) -> None:
    """Fold y = gamma (x - mean) / sqrt(var + eps) + beta into the conv that produced x."""
    conv = next((layer for layer in state.layers if layer.name == src), None)
    if conv is None or conv.op != "conv" or _readers_of_layer(state, src) != 1:
        raise ModelError("a BatchNormalization is supported only right after a Conv that nothing else reads "
                         "(it is folded into the conv's weights); fold it into the preceding layer before export")
    attrs = _attrs(node)
    # Training mode: an attribute from opset 14 on; before, the running statistics as extra outputs.
    if attrs.get("training_mode", 0) or any(node.output[1:]):
        raise ModelError("BatchNormalization in training mode; export the model in eval mode (model.eval())")
    names = list(node.input[1:5])
    if len(names) != 4 or any(n not in state.consts for n in names):
        raise ModelError("BatchNormalization needs constant scale, bias, mean and variance")
    gamma, beta, mean, var = (np.asarray(state.consts[n], np.float64).ravel() for n in names)
    if not gamma.shape == beta.shape == mean.shape == var.shape == (conv.out_channels,):
        raise ModelError(f"BatchNormalization's parameters do not have the conv's {conv.out_channels} channels")
    if np.any(var + float(attrs.get("epsilon", 1e-5)) <= 0):
        raise ModelError("BatchNormalization has a variance (plus epsilon) that is not positive; fix its statistics")
    factor = gamma / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
    weight, bias = state.params[conv.name]
    state.params[conv.name] = ((weight * factor[:, None, None, None]).astype(np.float32),
                               ((bias - mean) * factor + beta).astype(np.float32))
    state.folded[conv.name] = node.name or node.output[0]
    state.alias[node.output[0]] = conv.name


def _readers_of_layer(state: GraphState, layer: str) -> int:
    """How many nodes read a layer's value under any of its names: an Identity or inference Dropout
    forwarding it is one read that gives the value a new name, not a reader of its own."""
    names = [t for t, source in state.alias.items() if source == layer]
    return sum(state.readers.get(t, 0) for t in names) - (len(names) - 1)


def _clip_bounds(node, attrs: dict, state: GraphState) -> tuple[float, float]:
    if "min" in attrs or "max" in attrs:  # Clip-6 and earlier: attributes
        bounds = [float(attrs.get("min", -math.inf)), float(attrs.get("max", math.inf))]
    else:
        bounds = []
        for tensor, default in zip(list(node.input[1:3]) + [""] * 2, (-math.inf, math.inf)):
            if tensor and tensor not in state.consts:
                raise ModelError("Clip's min and max must be constants (ReLU6: 0 and 6)")
            value = np.asarray(state.consts[tensor]).ravel() if tensor else np.array([default])
            if value.size != 1:
                raise ModelError(f"Clip's bounds must be single numbers, one has {value.size} values")
            bounds.append(float(value[0]))
    if bounds[0] > bounds[1]:
        raise ModelError(f"Clip's min {bounds[0]} is above its max {bounds[1]}; fix the bounds in the source model")
    return bounds[0], bounds[1]


def _average_pool(node, name: str, src: str, shape, attrs: dict) -> Layer:
    _need_4d(shape, "AveragePool")
    if _text(attrs.get("auto_pad", "NOTSET")) != "NOTSET":
        raise ModelError("auto_pad is not supported; export with explicit pads")
    kernel, stride, pad = _window_attrs(attrs, "AveragePool")
    if 2 * pad > kernel:
        raise ModelError(f"pads of {pad} are more than half its {kernel}x{kernel} kernel; use pads of at most {kernel // 2}")
    return window_layer(name, "avgpool", src, shape, kernel, stride, pad, bool(attrs.get("ceil_mode", 0)),
                        bool(attrs.get("count_include_pad", 0)))


def _check_spatial_mean(node, attrs: dict, state: GraphState, shape) -> None:
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:  # ReduceMean-18: axes as an input
        if node.input[1] not in state.consts:
            raise ModelError("ReduceMean's axes must be constant")
        axes = np.asarray(state.consts[node.input[1]]).tolist()
    if sorted(a % len(shape) for a in (axes or [])) != [2, 3]:
        raise ModelError(f"ReduceMean over axes {axes} is not supported; only the mean over height and width "
                         "(axes [2, 3], a global average pool)")


def _gemm(node, name: str, src: str, shape, attrs: dict, state: GraphState) -> Layer:
    if len(shape) != 2:
        raise ModelError(f"Gemm reads a (1, features) input, this one has shape {list(shape)}; flatten first")
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        raise ModelError("Gemm is supported as a fully connected layer only (transA=0, alpha=beta=1)")
    if len(node.input) < 2 or node.input[1] not in state.consts:
        raise ModelError("the Gemm weight must be a constant initializer")
    weight = np.asarray(state.consts[node.input[1]], np.float32)
    weight = weight if attrs.get("transB", 0) else weight.T
    if weight.ndim != 2 or weight.shape[1] != shape[1]:
        raise ModelError(f"the Gemm weight of shape {list(weight.shape)} does not take {shape[1]} features")
    has_bias = len(node.input) > 2 and node.input[2]
    if has_bias and node.input[2] not in state.consts:
        raise ModelError("the Gemm bias must be a constant initializer")
    bias = np.asarray(state.consts[node.input[2]], np.float32).ravel() if has_bias else np.zeros(weight.shape[0], np.float32)
    if bias.size == 1:
        bias = np.full(weight.shape[0], bias[0], np.float32)
    if bias.shape != (weight.shape[0],):
        raise ModelError(f"the Gemm bias of shape {list(bias.shape)} does not match {weight.shape[0]} outputs")
    state.params[name] = (np.ascontiguousarray(weight), np.ascontiguousarray(bias))
    return gemm_layer(name, src, shape, weight.shape[0])


def _split(node, name: str, src: str, shape, attrs: dict, state: GraphState, fresh) -> list[Layer]:
    _need_4d(shape, "Split")
    if attrs.get("axis", 0) % 4 != 1:
        raise ModelError(f"Split along axis {attrs.get('axis', 0)} is not supported; only along channels (axis 1)")
    outputs = list(node.output)
    sizes = attrs.get("split")
    if sizes is None and len(node.input) > 1 and node.input[1]:
        if node.input[1] not in state.consts:
            raise ModelError("Split's sizes must be constant")
        sizes = np.asarray(state.consts[node.input[1]]).tolist()
    if sizes is None:  # equal parts (the last one smaller, as ONNX says)
        part = -(-shape[1] // len(outputs))
        sizes = [min(part, shape[1] - k * part) for k in range(len(outputs))]
    if len(sizes) != len(outputs) or sum(sizes) != shape[1] or min(sizes) < 1:
        raise ModelError(f"Split sizes {sizes} do not divide {shape[1]} channels into {len(outputs)} outputs")
    layers, start = [], 0
    for k, size in enumerate(sizes):
        layers.append(slice_layer(name if k == 0 else fresh(f"{name}_{k}"), src, shape, start, start + size))
        start += size
    return layers


def _channel_slice(node, state: GraphState, shape) -> tuple[int, int]:
    _need_4d(shape, "Slice")
    args = list(node.input[1:])
    if any(t and t not in state.consts for t in args) or len(args) < 2 or not all(args[:2]):
        raise ModelError("Slice's starts, ends, axes and steps must be constants")
    values = [np.asarray(state.consts[t]).ravel() if t else None for t in args]  # by position: blanks stay
    starts, ends = values[0].tolist(), values[1].tolist()
    axes = _optional(values, 2).tolist() if _optional(values, 2) is not None else list(range(len(starts)))
    steps = _optional(values, 3).tolist() if _optional(values, 3) is not None else [1] * len(starts)
    if [a % 4 for a in axes] != [1] or steps != [1]:
        raise ModelError(f"Slice over axes {axes} with steps {steps} is not supported; only a contiguous range of "
                         "channels (axis 1, step 1), as a torch chunk writes")
    start, stop, _ = slice(starts[0], ends[0]).indices(shape[1])
    if stop <= start:
        raise ModelError(f"Slice [{starts[0]}, {ends[0]}) of {shape[1]} channels is empty")
    return start, stop


def _reshape_or_transpose(node, name: str, src: str, shape, attrs: dict, state: GraphState) -> list[Layer]:
    """The three steps of a channel shuffle, or a Reshape that flattens for the classifier."""
    view = state.views.pop(node.input[0], None)
    if node.op_type == "Transpose":
        if view is None or view[0] != "grouped" or list(attrs.get("perm", [])) != SHUFFLE_PERM:
            raise ModelError(f"Transpose with perm {list(attrs.get('perm', []))} is not supported; {_SHUFFLE_HOW}")
        state.views[node.output[0]] = ("swapped", *view[1:])
        return []
    if len(node.input) < 2 or node.input[1] not in state.consts:
        raise ModelError("Reshape's shape must be constant; export with a fixed input size")
    if view is not None:
        stage, source, groups, original, grouped = view
        swapped = (grouped[0], grouped[2], grouped[1], *grouped[3:])
        target = _target_shape(swapped, state.consts[node.input[1]])
        if stage != "swapped" or target != tuple(original):
            raise ModelError(f"a Reshape to {list(target)} after a Reshape to 5-D is not supported; {_SHUFFLE_HOW}")
        return [shuffle_layer(name, source, original, groups)]
    target = _target_shape(shape, state.consts[node.input[1]])
    if len(target) == 5:
        _need_4d(shape, "a Reshape to 5-D")
        n, c, h, w = shape
        if target[0] != n or target[3:] != (h, w) or target[1] * target[2] != c:
            raise ModelError(f"Reshape of {list(shape)} to {list(target)} is not supported; {_SHUFFLE_HOW}")
        state.views[node.output[0]] = ("grouped", src, target[1], shape, target)
        state.alias.pop(node.output[0], None)
        return []
    if len(target) == 2 and target == (shape[0], math.prod(shape[1:])):
        return [flatten_layer(name, src, shape)]
    if tuple(target) == tuple(shape):
        state.alias[node.output[0]] = src  # a reshape that changes nothing
        return []
    raise ModelError(f"Reshape of {list(shape)} to {list(target)} is not supported; only a flatten to (1, features) "
                     f"before the classifier, or the channel shuffle ({_SHUFFLE_HOW})")
