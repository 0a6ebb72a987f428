"""The model as data: a layer list with weights, built from a UNet spec or imported from ONNX.

One `Model` feeds everything else: the layer table (intensity.py), the PyTorch reference
(`torch_module`), the ONNX file the peers run (`to_onnx`) and TVM's Relax module (`relax_module`).
"""

from __future__ import annotations

import hashlib
import math
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

# The layers and their constructors live in layers.py; they are re-exported here, where networks are built.
from .layers import (MAX_ELEMENTS, Layer, ModelError, UnsupportedOpError, _attrs, _ints,  # noqa: F401
                     _square, _text, _window_attrs, add_layer, clip_layer, concat_layer, conv_layer, flatten_layer,
                     gemm_layer, global_pool_layer, pool_layer, printable, resize_layer, shuffle_layer, slice_layer,
                     unary_layer, window_layer)
from .names import symbol
from . import onnx_family
from .onnx_family import _FOLDABLE_OPS

SUPPORTED_OPS = ("Conv", "BatchNormalization", "Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool",
                 "ReduceMean", "Resize", "Add", "Concat", "Flatten", "Gemm", "Split", "Slice", "Reshape", "Transpose")
# ONNX ops that carry no computation of their own (constants feeding Resize, say; Dropout at inference).
_PASSIVE_OPS = ("Constant", "Identity", "Dropout")
# The standard operator set: an op of the same name in another domain is some other operator.
_STANDARD_DOMAINS = ("", "ai.onnx")
@dataclass(frozen=True)
class UNetSpec:
    """The reference person-segmentation UNet and the family around it (DESIGN.md)."""

    widths: tuple[int, ...] = (16, 32, 64, 128, 256)
    in_channels: int = 3
    classes: int = 2
    height: int = 192
    width: int = 192

    def __post_init__(self):
        depth = len(self.widths)
        if depth < 1 or any(w < 1 for w in self.widths):
            raise ModelError(f"widths must be positive channel counts, got {self.widths}")
        if self.in_channels < 1 or self.classes < 1:
            raise ModelError("in_channels and classes must be at least 1")
        factor = 2 ** (depth - 1)
        if self.height % factor or self.width % factor:
            raise ModelError(
                f"input {self.height}x{self.width} must be divisible by {factor} "
                f"(2**(depth-1)) so that every pooled level upsamples back exactly; "
                f"pick a size that is a multiple of {factor}"
            )


@dataclass
class Model:
    """Layers in execution order, conv weights by layer name, one input and one output."""

    name: str
    layers: list[Layer]
    params: dict[str, tuple[np.ndarray, np.ndarray]]  # conv name -> (weight OIHW, bias)
    input_shape: tuple[int, ...]
    input_name: str = "input"
    source: str = "spec"
    notes: list[str] = field(default_factory=list)
    folded: dict[str, str] = field(default_factory=dict)  # conv layer -> the BatchNormalization folded into it

    @property
    def output_name(self) -> str:
        return self.layers[-1].name

    @property
    def convs(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.op == "conv"]

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.layers[-1].output_shape

    @property
    def fingerprint(self) -> str:
        """A short hash of what the model computes: every layer's op, wiring, shapes and attributes,
        and the weights' bytes. Two files with the same stem (the model's name) but other shapes or
        weights differ here, so results measured for one are never taken for the other; the name,
        the source path and the layer names do not enter it."""
        digest = hashlib.sha256(repr(_ints(self.input_shape)).encode())
        position = {self.input_name: -1}
        for index, layer in enumerate(self.layers):
            wiring = tuple(position.get(src, src) for src in layer.inputs)
            described = (layer.op, wiring, _ints(layer.input_shape), _ints(layer.output_shape),
                         int(layer.kernel), int(layer.stride), int(layer.pad), int(layer.scale))
            # Attributes added later enter only when set, so earlier models keep their fingerprint.
            described += tuple((key, value) for key, value in layer.extra_attributes())
            digest.update(repr(described).encode())
            position[layer.name] = index
            for array in self.params.get(layer.name, ()):  # conv and gemm weights
                array = np.ascontiguousarray(array, dtype=np.float32)
                digest.update(repr(array.shape).encode())
                digest.update(array.tobytes())
        return digest.hexdigest()[:16]

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        known = ", ".join(repr(l.name) for l in self.layers[:8])
        raise ModelError(f"no layer named {name!r} in model {self.name!r} (first layers: {known}, ...)")

    def select_convs(self, names: list[str] | None) -> list[Layer]:
        """The convs named (all when `names` is empty), failing clearly on unknown names."""
        if not names:
            return self.convs
        convs = {l.name: l for l in self.convs}
        unknown = [n for n in names if n not in convs]
        if unknown:
            raise ModelError(
                f"unknown conv layer(s) {unknown}; this model's convs are: {', '.join(map(repr, convs))}"
            )
        return [convs[n] for n in names]


# ---------------------------------------------------------------- the reference UNet

def unet_layers(spec: UNetSpec) -> list[Layer]:
    """The UNet of DESIGN.md as a layer list (19 convs for the reference widths)."""
    layers: list[Layer] = []
    shapes = {"input": (1, spec.in_channels, spec.height, spec.width)}

    def add(layer: Layer) -> str:
        layers.append(layer)
        shapes[layer.name] = layer.output_shape
        return layer.name

    x, skips = "input", []
    for i, width in enumerate(spec.widths):
        if i > 0:
            x = add(pool_layer(f"enc{i}_pool", x, shapes[x]))
            x = add(unary_layer(f"enc{i}_pool_relu", "relu", x, shapes[x]))
        x = add(conv_layer(f"enc{i}_conv1", x, shapes[x], width))
        x = add(unary_layer(f"enc{i}_relu1", "relu", x, shapes[x]))
        x = add(conv_layer(f"enc{i}_conv2", x, shapes[x], width))
        skips.append(x)
    for i in range(len(spec.widths) - 2, -1, -1):
        width, skip = spec.widths[i], skips[i]
        x = add(conv_layer(f"dec{i}_reduce", x, shapes[x], width))
        x = add(resize_layer(f"dec{i}_resize", x, shapes[x]))
        x = add(add_layer(f"dec{i}_add", x, skip, shapes[x]))
        x = add(unary_layer(f"dec{i}_add_relu", "relu", x, shapes[x]))
        x = add(conv_layer(f"dec{i}_conv", x, shapes[x], width))
        x = add(unary_layer(f"dec{i}_relu", "relu", x, shapes[x]))
    add(conv_layer("head_conv", x, shapes[x], spec.classes))
    return layers


def random_params(layers: list[Layer], seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Deterministic He-normal weights, so activations neither vanish nor explode through 19 convs."""
    rng = np.random.default_rng(seed)
    params = {}
    for layer in layers:
        if layer.op == "gemm":
            fan_in = layer.input_shape[1]
            weight = rng.normal(0.0, math.sqrt(1.0 / fan_in), (layer.output_shape[1], fan_in)).astype(np.float32)
            params[layer.name] = (weight, rng.uniform(-0.1, 0.1, layer.output_shape[1]).astype(np.float32))
        if layer.op != "conv":
            continue
        fan_in = layer.in_channels // layer.groups * layer.kernel * layer.kernel
        shape = (layer.out_channels, layer.in_channels // layer.groups, layer.kernel, layer.kernel)
        weight = rng.normal(0.0, math.sqrt(2.0 / fan_in), shape).astype(np.float32)
        bias = rng.uniform(-0.1, 0.1, layer.out_channels).astype(np.float32)
        params[layer.name] = (weight, bias)
    return params


def reference_unet(spec: UNetSpec | None = None, seed: int = 0) -> Model:
    spec = spec or UNetSpec()
    layers = unet_layers(spec)
    name = "unet-" + "-".join(map(str, spec.widths)) + f"-{spec.height}x{spec.width}"
    return Model(name, layers, random_params(layers, seed), layers[0].input_shape)


def sample_input(model: Model, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + 1).standard_normal(model.input_shape).astype(np.float32)


# ---------------------------------------------------------------- PyTorch reference

def torch_module(model: Model):
    """A torch.nn.Module that runs the layer list with the model's weights (the numerics reference)."""
    import torch
    import torch.nn.functional as F

    class GraphModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weights = torch.nn.ParameterDict()
            # ParameterDict keys cannot hold "." (torch-exported names do): keyed by symbol.
            for name, (weight, bias) in model.params.items():
                self.weights[symbol(name) + "_w"] = torch.nn.Parameter(torch.from_numpy(weight.copy()), False)
                self.weights[symbol(name) + "_b"] = torch.nn.Parameter(torch.from_numpy(bias.copy()), False)

        def forward(self, x):
            values = {model.input_name: x}
            for layer in model.layers:
                args = [values[src] for src in layer.inputs]
                values[layer.name] = self._run(layer, args)
            return values[model.output_name]

        def _run(self, layer, args):
            if layer.op == "conv":
                w, b = self.weights[symbol(layer.name) + "_w"], self.weights[symbol(layer.name) + "_b"]
                return F.conv2d(args[0], w, b, stride=layer.stride, padding=layer.pad, groups=layer.groups)
            if layer.op == "relu":
                return F.relu(args[0])
            if layer.op == "maxpool":
                return F.max_pool2d(args[0], layer.kernel, layer.stride, layer.pad, ceil_mode=layer.option("ceil", False))
            if layer.op == "clip":
                return torch.clamp(args[0], *layer.option("bounds"))
            if layer.op == "avgpool":
                return F.avg_pool2d(args[0], layer.kernel, layer.stride, layer.pad, ceil_mode=layer.option("ceil", False),
                                    count_include_pad=layer.option("include_pad", False))
            if layer.op == "globalavgpool":
                return args[0].mean((2, 3), keepdim=len(layer.output_shape) == 4)
            if layer.op == "flatten":
                return torch.flatten(args[0], 1)
            if layer.op == "gemm":
                w, b = self.weights[symbol(layer.name) + "_w"], self.weights[symbol(layer.name) + "_b"]
                return F.linear(args[0], w, b)
            if layer.op == "shuffle":
                n, c, h, w = args[0].shape
                groups = layer.option("groups")
                return args[0].reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)
            if layer.op == "slice":
                start, stop = layer.option("channels")
                return args[0][:, start:stop]
            if layer.op == "resize":
                return F.interpolate(args[0], scale_factor=layer.scale, mode="nearest")
            if layer.op == "add":
                return args[0] + args[1]
            if layer.op == "concat":
                return torch.cat(args, dim=1)
            raise AssertionError(layer.op)

    return GraphModule().eval()


def reference_output(model: Model, x: np.ndarray, threads: int = 2) -> np.ndarray:
    import torch

    torch.set_num_threads(threads)
    with torch.no_grad():
        return torch_module(model)(torch.from_numpy(x)).numpy()


# ---------------------------------------------------------------- ONNX export

def to_onnx(model: Model, opset: int = 17):
    """The model as an ONNX graph whose node names are the layer names."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    fresh = _fresh_names(model)
    nodes, inits = [], []
    for layer in model.layers:
        nodes.extend(_onnx_nodes(layer, model.params, inits, fresh, helper, numpy_helper))
    graph = helper.make_graph(
        nodes,
        model.name,
        [helper.make_tensor_value_info(model.input_name, TensorProto.FLOAT, model.input_shape)],
        [helper.make_tensor_value_info(model.output_name, TensorProto.FLOAT, model.output_shape)],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="workbench")
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return proto


def _fresh_names(model: Model):
    """`base` for an initializer, or `base_<k>` if a layer (or the input) already uses that name:
    ONNX tensor names are one namespace, and layer names come from the source file."""
    used = {model.input_name} | {layer.name for layer in model.layers}

    def fresh(base: str) -> str:
        name, k = base, 2
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        return name

    return fresh


def _onnx_nodes(layer: Layer, params, inits, fresh, helper, numpy_helper):
    ins, out, name = list(layer.inputs), [layer.name], layer.name
    p = layer.pad
    if layer.op == "conv":
        weight_bias = []
        for value, suffix in zip(params[name], ("_w", "_b")):
            weight_bias.append(fresh(name + suffix))
            inits.append(numpy_helper.from_array(value, weight_bias[-1]))
        return [helper.make_node("Conv", ins + weight_bias, out, name=name,
                                 kernel_shape=[layer.kernel] * 2, pads=[p] * 4, strides=[layer.stride] * 2,
                                 **({"group": layer.groups} if layer.groups != 1 else {}))]
    if layer.op in ("maxpool", "avgpool"):
        extra = {"ceil_mode": 1} if layer.option("ceil") else {}
        if layer.op == "avgpool":
            extra["count_include_pad"] = int(layer.option("include_pad", False))
        return [helper.make_node("MaxPool" if layer.op == "maxpool" else "AveragePool", ins, out, name=name,
                                 kernel_shape=[layer.kernel] * 2, pads=[p] * 4, strides=[layer.stride] * 2, **extra)]
    if layer.op in ("clip", "gemm", "shuffle", "slice"):
        return _onnx_nodes_new(layer, params, inits, fresh, helper, numpy_helper)
    if layer.op == "globalavgpool":
        if len(layer.output_shape) == 4:
            return [helper.make_node("GlobalAveragePool", ins, out, name=name)]
        return [helper.make_node("ReduceMean", ins, out, name=name, axes=[2, 3], keepdims=0)]
    if layer.op == "flatten":
        return [helper.make_node("Flatten", ins, out, name=name, axis=1)]
    if layer.op == "resize":
        scales = np.array([1, 1, layer.scale, layer.scale], np.float32)
        scales_name = fresh(name + "_scales")
        inits.append(numpy_helper.from_array(scales, scales_name))
        return [helper.make_node("Resize", ins + ["", scales_name], out, name=name, mode="nearest",
                                 coordinate_transformation_mode="asymmetric", nearest_mode="floor")]
    op = {"relu": "Relu", "add": "Add", "concat": "Concat"}[layer.op]
    extra = {"axis": 1} if layer.op == "concat" else {}
    return [helper.make_node(op, ins, out, name=name, **extra)]


def _onnx_nodes_new(layer: Layer, params, inits, fresh, helper, numpy_helper):
    """The ops of the widened family whose ONNX form needs constants beside the node."""
    ins, out, name = list(layer.inputs), [layer.name], layer.name

    def constant(value, suffix: str) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), fresh(name + suffix)))
        return inits[-1].name

    if layer.op == "clip":
        low, high = (np.float32(v) for v in layer.option("bounds"))
        return [helper.make_node("Clip", ins + [constant(low, "_min"), constant(high, "_max")], out, name=name)]
    if layer.op == "gemm":
        weight, bias = params[name]
        return [helper.make_node("Gemm", ins + [constant(weight, "_w"), constant(bias, "_b")], out, name=name, transB=1)]
    if layer.op == "slice":
        start, stop = layer.option("channels")
        return [helper.make_node("Slice", ins + [constant(np.array([start], np.int64), "_starts"),
                                                 constant(np.array([stop], np.int64), "_ends"),
                                                 constant(np.array([1], np.int64), "_axes")], out, name=name)]
    # shuffle: the Reshape -> Transpose -> Reshape ShuffleNet writes
    n, c, h, w = layer.input_shape
    groups = layer.option("groups")
    viewed, swapped = fresh(name + "_grouped"), fresh(name + "_swapped")
    return [helper.make_node("Reshape", ins + [constant(np.array([n, groups, c // groups, h, w], np.int64), "_shape5")],
                             [viewed], name=fresh(name + "_view")),
            helper.make_node("Transpose", [viewed], [swapped], name=fresh(name + "_transpose"), perm=[0, 2, 1, 3, 4]),
            helper.make_node("Reshape", [swapped, constant(np.array([n, c, h, w], np.int64), "_shape4")], out, name=name)]


def save_onnx(model: Model, path: str | Path) -> Path:
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(to_onnx(model), str(path))
    return path


# ---------------------------------------------------------------- ONNX import

def load_onnx(path: str | Path) -> Model:
    """Read an ONNX file of the supported family into a Model; anything else fails clearly."""
    if isinstance(path, str) and not path.strip():
        raise ModelError(f"the model path {path!r} is empty; pass the path of an .onnx file "
                         "(or leave --model out for the reference UNet)")
    proto = _read_onnx(Path(path))
    return from_onnx_proto(proto, name=Path(path).stem, source=str(path))


def _shown_path(path: Path) -> str:
    """A path as a message shows it: on one line (repr when it holds a newline, say), and shortened
    in the middle when very long."""
    text = str(path)
    if len(text) > 160:
        text = f"{text[:80]}...{text[-60:]}"
    return text if text.isprintable() else repr(text)


def _read_onnx(path: Path):
    import onnx

    shown = _shown_path(path)
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise ModelError(f"model file {shown} does not exist; pass the path of an .onnx file") from None
    except OSError as err:  # a name too long, a symlink loop, a folder that cannot be searched
        raise ModelError(f"cannot read model file {shown} ({err.strerror or type(err).__name__}); "
                         "pass the path of an existing, readable .onnx file") from None
    if not stat.S_ISREG(info.st_mode):
        raise ModelError(f"model path {shown} is not a file; pass the path of an .onnx file")
    if info.st_size == 0:
        raise ModelError(f"model file {shown} is empty; export the model again")
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise ModelError(f"cannot read model file {shown} ({err.strerror or type(err).__name__}); "
                         "check its permissions (it must be readable by this user)") from None
    try:
        proto = onnx.load(str(path))
    except Exception as err:  # onnx raises several unrelated types for a bad file
        raise _invalid(shown, err) from None
    # Before the checker: it reports a missing initializer as a topological-sort problem.
    _check_references(proto.graph)
    if not proto.graph.node:
        raise ModelError(f"{shown}: the model's graph has no nodes; export a network with at least one Conv")
    try:
        onnx.checker.check_model(proto)
    except Exception as err:
        raise _invalid(shown, err) from None
    return proto


def _invalid(shown: str, err: Exception) -> ModelError:
    first = printable((str(err).strip().splitlines() or [""])[0][:200])
    return ModelError(f"{shown} is not a valid ONNX model ({type(err).__name__}: {first}); "
                      "re-export it with torch.onnx.export or onnx.save")


def _check_references(graph) -> None:
    """Every tensor a node reads exists somewhere: a graph input, an initializer or a node's output."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    known |= {out for node in graph.node for out in node.output}
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in known:
                raise ModelError(
                    f"node {node.name or index!r} ({node.op_type!r}) reads {name!r}, which is no initializer, "
                    f"graph input or node output: the file lacks the initializer {name!r}. Re-export the model "
                    "with its weights inside (onnx.save(model, path, save_as_external_data=False))"
                )


def _default_opset(proto) -> int:
    """The version of the standard operator set the model was written for (0 if it names none)."""
    return next((int(o.version) for o in proto.opset_import if o.domain in _STANDARD_DOMAINS), 0)


def from_onnx_proto(proto, name: str = "model", source: str = "onnx") -> Model:
    from onnx import numpy_helper

    graph = proto.graph
    if not graph.node:
        raise ModelError("the model's graph has no nodes; export a network with at least one Conv")
    _check_supported(graph)
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    real_inputs = [i for i in graph.input if i.name not in consts]
    _check_weights_constant(graph, {i.name for i in real_inputs})
    if len(real_inputs) != 1 or len(graph.output) != 1:
        raise ModelError(f"the workbench handles models with one input and one output; "
                         f"this one has {len(real_inputs)} inputs and {len(graph.output)} outputs")
    _check_float32(real_inputs[0], graph.output[0])
    input_name = real_inputs[0].name
    input_shape = _static_shape(real_inputs[0])
    state = onnx_family.GraphState(consts, {input_name: input_shape}, {}, {}, onnx_family.readers_of(graph),
                                   _default_opset(proto))
    names = _LayerNames(graph, input_name)
    for index, node in enumerate(graph.node):
        try:
            if node.op_type in _PASSIVE_OPS:
                _passive(node, consts, state.alias)
                continue
            if onnx_family.fold(node, state):
                continue
        except (ModelError, ValueError, IndexError, KeyError) as err:
            raise ModelError(f"node {node.name or index!r} ({node.op_type}): {err}") from None
        node_name = names.take(node, index)
        try:
            made = _node_layers(node, node_name, state, names)
            for layer in made:
                _check_output(layer)
        except (ModelError, ValueError, IndexError, KeyError) as err:  # a malformed node, never a traceback
            raise ModelError(f"node {node_name!r} ({node.op_type}): {err}") from None
        for tensor, layer in zip(node.output, made):
            state.layers.append(layer)
            state.shapes[layer.name] = layer.output_shape
            state.alias[tensor] = layer.name
    layers = state.layers
    out = state.alias.get(graph.output[0].name)
    if not layers or out != layers[-1].name:
        raise ModelError("the graph output must be produced by the last node; re-export the model in topological order")
    if not any(layer.op == "conv" for layer in layers):
        raise ModelError("the model has no Conv node; the workbench studies convolutional networks")
    notes = names.notes + [f"BatchNormalization {bn!r} is folded into conv {conv!r}" for conv, bn in state.folded.items()]
    return Model(name, layers, state.params, input_shape, input_name=input_name, source=source, notes=notes,
                 folded=dict(state.folded))


def _node_layers(node, node_name: str, state, names) -> list[Layer]:
    """The layers one node makes: one for most ops, one per output of a Split, none for a folded
    BatchNormalization or the first steps of a channel shuffle."""
    if node.op_type not in SUPPORTED_OPS:  # shape arithmetic that reads a feature map
        raise UnsupportedOpError(
            f"op type {node.op_type!r} is read only as shape arithmetic on constants, and this one computes on a "
            f"feature map; supported feature-map ops: {', '.join(SUPPORTED_OPS)}. Replace it in the source model")
    if node.input and node.input[0] in state.views:
        return onnx_family.layers_from_node(node, node_name, [], state, names.fresh)
    srcs = _data_inputs(node, state.consts, state.alias, state.shapes)
    made = onnx_family.layers_from_node(node, node_name, srcs, state, names.fresh)
    if made is not None:
        return made
    return [_layer_from_node(node, node_name, srcs, state.shapes, state.consts, state.params, state.opset)]


def _passive(node, consts, alias) -> None:
    """A Constant adds a constant, an Identity (or an inference Dropout) forwards a tensor: none
    becomes a layer."""
    if node.op_type == "Dropout":
        training = node.input[2] if len(node.input) > 2 else ""
        if _attrs(node).get("is_test", 1) == 0 or training and not (
                training in consts and not np.asarray(consts[training]).any()):
            raise ModelError("a Dropout in training mode; export the model in eval mode (model.eval())")
        node_input, node_output = node.input[:1], node.output[:1]  # its mask output is never read
    else:
        node_input, node_output = node.input, node.output
    if len(node_output) != 1 or not node_output[0]:
        raise ModelError(f"it has {len(node_output)} outputs, not one; re-export the model")
    if node.op_type == "Constant":
        consts[node.output[0]] = _constant_value(node)
        return
    if len(node_input) != 1 or not node_input[0]:
        raise ModelError(f"{node.op_type} needs one input, it has {len(node_input)}; re-export the model")
    src = node.input[0]
    if src in consts:
        consts[node.output[0]] = consts[src]
    else:
        alias[node.output[0]] = alias.get(src, src)


def _constant_value(node) -> np.ndarray:
    """The value of a Constant node: a tensor (`value`) or one of the plain number forms."""
    from onnx import numpy_helper

    forms = {a.name: a for a in node.attribute}
    if len(forms) != 1:
        raise ModelError(f"a Constant needs exactly one value attribute, this one has {sorted(forms) or 'none'}; "
                         "re-export the model (give it value, value_float(s) or value_int(s))")
    (attr,) = forms.values()
    if attr.name == "value":
        try:
            return numpy_helper.to_array(attr.t)
        except Exception as err:  # an undefined element type, data of the wrong length...
            first = printable((str(err).strip().splitlines() or [""])[0][:120])
            raise ModelError(f"its value tensor cannot be read ({type(err).__name__}: {first}); "
                             "re-export the model") from None
    simple = {"value_float": lambda: np.array(attr.f, np.float32),
              "value_floats": lambda: np.array(list(attr.floats), np.float32),
              "value_int": lambda: np.array(attr.i, np.int64),
              "value_ints": lambda: np.array(list(attr.ints), np.int64)}
    if attr.name not in simple:
        raise ModelError(f"a Constant given as {attr.name!r} is not supported (only value, value_float(s) and "
                         "value_int(s) are); store the constant as an initializer instead")
    return simple[attr.name]()


def _check_output(layer: Layer) -> None:
    """Every layer's output is a real tensor the device can hold."""
    shape = list(layer.output_shape)
    if len(shape) not in (2, 4) or any(d < 1 for d in shape):
        raise ModelError(f"its output shape would be {shape}, with a dimension below 1; check the "
                         "kernel, strides, pads and scales of this node against its input "
                         f"{list(layer.input_shape)}")
    if math.prod(shape) > MAX_ELEMENTS:
        raise ModelError(f"its output {shape} would have {math.prod(shape):,} elements, more than the "
                         f"{MAX_ELEMENTS:,} the workbench handles; export the model at a smaller input size "
                         "or scale")


def _check_weights_constant(graph, inputs: set[str]) -> None:
    # A weight fed as a graph input would otherwise read as "two inputs".
    for index, node in enumerate(graph.node):
        if node.op_type == "Conv" and any(name in inputs for name in node.input[1:]):
            raise ModelError(f"node {node.name or index!r} (Conv): the conv weight must be a constant initializer, "
                             "not a graph input; export with the weights as initializers (the default of torch.onnx.export)")


class _LayerNames:
    """Unique layer names from node names: a layer is found, planned and measured by its name.

    Names a node was given win: a nameless node gets `<op>_<index>`, or the first free
    `<op>_<index>_<k>` if a node is named that. A name taken already (a duplicate, or the graph
    input's name) gets the first free `<name>_<k>`, and a name with a comma (which `--layers`,
    split on commas, could never select) has its commas replaced by `_`; both with a note, so no
    two layers ever share a name and every layer can be selected.
    """

    def __init__(self, graph, input_name: str):
        self.input_name = input_name
        self.wanted = {node.name for node in graph.node
                       if node.name and "," not in node.name and node.op_type not in _PASSIVE_OPS}
        self.used = {input_name}
        self.notes: list[str] = []

    def take(self, node, index: int) -> str:
        given = node.name
        if not given:
            name = self._free(f"{node.op_type.lower()}_{index}")
            if name != f"{node.op_type.lower()}_{index}":
                self.notes.append(f"node {index} ({node.op_type}) has no name and another node is named "
                                  f"{node.op_type.lower() + '_' + str(index)!r}; it is layer {name!r} here")
        elif "," in given:
            name = self._free(given.replace(",", "_"))
            self.notes.append(f"node {index} ({node.op_type}) is named {given!r}, with a comma, which --layers "
                              f"(a comma-separated list) cannot select; it is layer {name!r} here")
        elif given in self.used:
            name = self._free(given)
            why = "the graph input's name" if given == self.input_name else "the name of an earlier node"
            self.notes.append(f"node {index} ({node.op_type}) is named {given!r}, {why}; it is layer {name!r} here")
        else:
            name = given
        self.used.add(name)
        return name

    def fresh(self, base: str) -> str:
        """A free name for a node's second output (a Split's)."""
        name = self._free(base)
        self.used.add(name)
        return name

    def _free(self, base: str) -> str:
        """`base` if no layer has it and no node is named it, else the first such `base_<k>`."""
        if base not in self.used and base not in self.wanted:
            return base
        k = 2
        while f"{base}_{k}" in self.used or f"{base}_{k}" in self.wanted:
            k += 1
        return f"{base}_{k}"


def _data_inputs(node, consts, alias, shapes) -> list[str]:
    """The layers (or the graph input) a node reads, failing on inputs the family cannot take."""
    data = list(node.input) if node.op_type in ("Add", "Concat") else list(node.input[:1])
    srcs = []
    for tensor in data:
        if not tensor:
            continue
        if tensor in consts:
            raise ModelError(
                f"input {tensor!r} is a constant; {node.op_type} is supported between feature maps only "
                "(a broadcast bias or scale is not). Fold the constant into the preceding Conv's weights or "
                "bias before export, or remove it"
            )
        src = alias.get(tensor, tensor)
        if src not in shapes:
            raise ModelError(f"reads {tensor!r} before any node produces it (or from a second output); "
                             "re-export the model in topological order")
        srcs.append(src)
    if not srcs:
        raise ModelError("it has no feature-map input")
    return srcs


def _check_float32(value_info, output_info) -> None:
    for info, role in ((value_info, "input"), (output_info, "output")):
        elem = info.type.tensor_type.elem_type
        if elem != 1:  # TensorProto.FLOAT
            raise ModelError(
                f"the model's {role} {info.name!r} is {_dtype_name(elem)}; the workbench measures float32 models "
                "only. Export the model in float32 (model.float() before torch.onnx.export)"
            )


def _dtype_name(elem_type: int) -> str:
    from onnx import helper

    try:
        return str(helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:  # an unknown or undefined element type
        return f"ONNX element type {elem_type}"


def _check_supported(graph):
    for index, node in enumerate(graph.node):
        if node.domain not in _STANDARD_DOMAINS:
            raise UnsupportedOpError(
                f"node {node.name or index!r} has op type {node.op_type!r} from the operator domain "
                f"{node.domain!r}, which the workbench does not support: only the standard ONNX operators "
                f"({', '.join(SUPPORTED_OPS)}) are. Replace it with the standard op (domain '') in the source model"
            )
        if node.op_type not in SUPPORTED_OPS + _PASSIVE_OPS + _FOLDABLE_OPS:
            raise UnsupportedOpError(
                f"node {node.name or index!r} has op type {node.op_type!r}, which the workbench does not "
                f"support; supported op types: {', '.join(SUPPORTED_OPS)}. Remove or replace that operator "
                "(for example, keep activations as Relu and do upsampling with nearest Resize)"
            )


def _static_shape(value_info) -> tuple[int, ...]:
    dims = value_info.type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.dim_value > 0 else (1 if i == 0 else 0) for i, d in enumerate(dims))
    if len(shape) != 4 or 0 in shape:
        raise ModelError(
            f"input {value_info.name!r} must be a static NCHW shape (batch may be dynamic), got "
            f"{[d.dim_value or d.dim_param for d in dims]}; export with a fixed input size"
        )
    if shape[0] != 1:
        raise ModelError(f"input {value_info.name!r} has batch size {shape[0]}; the workbench times one image: "
                         "export with batch 1 (or a dynamic batch)")
    if math.prod(shape) > MAX_ELEMENTS:
        raise ModelError(f"input {value_info.name!r} of shape {list(shape)} has {math.prod(shape):,} elements, more "
                         f"than the {MAX_ELEMENTS:,} the workbench handles; export with a smaller input size")
    return shape


def _check_window_fits(op: str, shape, kernel: int, stride: int, pad: int) -> None:
    _, _, h, w = shape
    if kernel > min(h, w) + 2 * pad:
        raise ModelError(f"its {kernel}x{kernel} kernel does not fit its input {h}x{w} padded by {pad} (there would "
                         f"be no output); use a smaller kernel or more padding on this {op}")


def _layer_from_node(node, name, srcs, shapes, consts, params, opset: int = 0) -> Layer:
    attrs = _attrs(node)
    op = node.op_type
    if op in ("Conv", "MaxPool"):
        if _text(attrs.get("auto_pad", "NOTSET")) != "NOTSET":
            raise ModelError("auto_pad is not supported; export with explicit pads")
        if any(d != 1 for d in attrs.get("dilations", [1, 1])):
            raise ModelError(f"dilations {attrs['dilations']} are not supported (only 1)")
    if op == "Conv":
        return _conv_from_node(node, name, srcs, shapes, consts, params, attrs)
    if op == "MaxPool":
        kernel, stride, pad = _window_attrs(attrs, "MaxPool")
        if 2 * pad > kernel:
            raise ModelError(f"pads of {pad} are more than half its {kernel}x{kernel} kernel (windows of padding "
                             f"only); use pads of at most {kernel // 2}")
        _check_window_fits("MaxPool", shapes[srcs[0]], kernel, stride, pad)
        if attrs.get("ceil_mode", 0):  # SqueezeNet's pools round up
            return window_layer(name, "maxpool", srcs[0], shapes[srcs[0]], kernel, stride, pad, ceil=True)
        return pool_layer(name, srcs[0], shapes[srcs[0]], kernel, stride, pad)
    if op == "Relu":
        return unary_layer(name, "relu", srcs[0], shapes[srcs[0]])
    if op == "Resize":
        return _resize_from_node(node, name, srcs, shapes, consts, attrs, opset)
    if op == "Add":
        if len(srcs) != 2:
            raise ModelError(f"Add needs two feature maps, got {len(srcs)} inputs")
        a, b = (shapes[s] for s in srcs)
        if a != b:
            raise ModelError(f"Add needs two inputs of the same shape (no broadcasting), got {a} and {b}; "
                             "resize or crop one of them before the Add in the source model")
        return add_layer(name, srcs[0], srcs[1], a)
    if op == "Concat":
        if attrs.get("axis") != 1:
            raise ModelError(f"Concat is supported along channels (axis 1) only, got axis {attrs.get('axis')}")
        inputs = [shapes[s] for s in srcs]
        if len({(s[0], s[2], s[3]) for s in inputs}) != 1:
            raise ModelError(f"Concat joins channels of inputs with the same batch, height and width, got "
                             f"{[list(s) for s in inputs]}; resize or crop the inputs to one size before the "
                             "Concat in the source model")
        return concat_layer(name, srcs, inputs)
    raise AssertionError(op)


def _conv_from_node(node, name, srcs, shapes, consts, params, attrs) -> Layer:
    groups = int(attrs.get("group", 1))
    if groups < 1:
        raise ModelError(f"group={groups} must be at least 1; fix the conv's group in the source model")
    if len(node.input) < 2 or node.input[1] not in consts:
        raise ModelError("the conv weight must be a constant initializer")
    weight = _float32_param(node.input[1], consts)
    if weight.ndim != 4:
        raise ModelError(f"weight {node.input[1]!r} has shape {weight.shape}; a 2-D conv needs OIHW")
    if 0 in weight.shape:
        raise ModelError(f"weight {node.input[1]!r} has shape {weight.shape}, with no elements; "
                         "a conv needs at least one output channel and a kernel of at least 1x1")
    has_bias = len(node.input) > 2 and node.input[2]
    if has_bias and node.input[2] not in consts:
        raise ModelError("the conv bias must be a constant initializer")
    bias = _float32_param(node.input[2], consts) if has_bias else np.zeros(weight.shape[0], np.float32)
    if bias.shape != (weight.shape[0],):
        raise ModelError(f"bias {node.input[2]!r} has shape {bias.shape}; expected ({weight.shape[0]},)")
    if "kernel_shape" in attrs and list(attrs["kernel_shape"]) != list(weight.shape[2:]):
        raise ModelError(f"kernel_shape {list(attrs['kernel_shape'])} disagrees with the weight {node.input[1]!r} "
                         f"of shape {tuple(weight.shape)} (a {weight.shape[2]}x{weight.shape[3]} kernel); fix or "
                         "drop kernel_shape in the source model")
    kernel = _square(weight.shape[2:], "kernel size")
    _, stride, pad = _window_attrs(attrs, "Conv", kernel_default=list(weight.shape[2:]))
    shape = shapes[srcs[0]]
    if len(shape) != 4:
        raise ModelError(f"a 2-D conv needs an NCHW input, this one has shape {list(shape)}")
    if weight.shape[1] * groups != shape[1]:
        raise ModelError(f"weight has {weight.shape[1]} input channels per group ({groups} group(s)) but the input "
                         f"has {shape[1]}")
    _check_window_fits("Conv", shape, kernel, stride, pad)
    layer = conv_layer(name, srcs[0], shape, weight.shape[0], kernel, stride, pad, groups)
    params[name] = (np.ascontiguousarray(weight), np.ascontiguousarray(bias, dtype=np.float32))
    return layer


def _float32_param(name: str, consts) -> np.ndarray:
    value = consts[name]
    if value.dtype != np.float32:
        raise ModelError(f"initializer {name!r} is {value.dtype}; the workbench measures float32 models only. "
                         "Export the model in float32 (model.float() before torch.onnx.export)")
    return np.array(value)  # a writable copy: onnx hands out read-only views of the file's bytes


# Resize: the layer repeats each pixel `scale` times (source pixel floor(x / scale)). ONNX's
# coordinate modes that pick that pixel for an integer scale: the half-pixel ones with a rounding
# nearest_mode (ONNX's default), and asymmetric with floor (torch's nn.Upsample).
_HALF_PIXEL = ("half_pixel", "pytorch_half_pixel", "half_pixel_symmetric")
_COORDINATE_MODES = _HALF_PIXEL + ("asymmetric", "align_corners", "tf_crop_and_resize")
_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")
_RESIZE_HOW = ("export nearest upsampling by an integer factor, e.g. torch's nn.Upsample(scale_factor=2, "
               "mode='nearest')")


def _picks_floor(coordinates: str, nearest: str, scale: int) -> bool:
    if scale == 1:
        return True
    if coordinates in _HALF_PIXEL:  # x_in = (x + 0.5) / s - 0.5 lies within 0.5 of floor(x / s)
        return nearest.startswith("round")
    # asymmetric, x_in = x / s: floor picks floor(x / s); round does too when the only ties are halves
    return nearest == "floor" or (nearest == "round_prefer_floor" and scale == 2)


def _number(value) -> int | float:
    value = float(value)
    return int(value) if value.is_integer() else value


def _resize_from_node(node, name, srcs, shapes, consts, attrs, opset: int = 0) -> Layer:
    mode = _text(attrs.get("mode", "nearest"))
    if mode != "nearest":
        raise ModelError(f"Resize mode {mode!r} is not supported; only 'nearest': {_RESIZE_HOW}")
    coordinates = _text(attrs.get("coordinate_transformation_mode", "half_pixel"))
    nearest = _text(attrs.get("nearest_mode", "round_prefer_floor"))
    if coordinates not in _COORDINATE_MODES or nearest not in _NEAREST_MODES:
        raise ModelError(f"Resize coordinate_transformation_mode {coordinates!r} with nearest_mode {nearest!r} is "
                         f"not an ONNX Resize mode; {_RESIZE_HOW}")
    if coordinates in ("align_corners", "tf_crop_and_resize"):
        raise ModelError(f"Resize with coordinate_transformation_mode {coordinates!r} is not supported (the "
                         f"workbench repeats each pixel, floor(x / scale)); {_RESIZE_HOW}")
    shape = shapes[srcs[0]]
    factors, given = _resize_factors(node, shape, consts, attrs, opset)
    if factors[:2] != [1, 1]:
        raise ModelError(f"Resize {given} change the batch or channels; only height and width may be resized: "
                         f"{_RESIZE_HOW}")
    if factors[2] != factors[3] or not isinstance(factors[2], int) or factors[2] < 1:
        raise ModelError(f"Resize {given} are not supported; only an equal integer factor on H and W "
                         f"(1, 2, 3, ...): {_RESIZE_HOW} (downsample with MaxPool or a strided Conv)")
    scale = factors[2]
    n, c, h, w = shape
    if n * c * h * scale * w * scale > MAX_ELEMENTS:
        raise ModelError(f"Resize {given} would make an output of {n * c * h * scale * w * scale:,} elements "
                         f"({h * scale}x{w * scale}), more than the {MAX_ELEMENTS:,} the workbench handles; "
                         "fix the scale in the source model")
    if not _picks_floor(coordinates, nearest, scale):
        raise ModelError(f"Resize with coordinate_transformation_mode {coordinates!r} and nearest_mode {nearest!r} "
                         f"does not repeat each pixel {scale} times, which is the only nearest upsampling supported; "
                         "export with 'asymmetric' and 'floor' (what torch writes) or ONNX's defaults "
                         "('half_pixel' and 'round_prefer_floor')")
    return resize_layer(name, srcs[0], shape, scale)


def _resize_factors(node, shape, consts, attrs, opset: int) -> tuple[list, str]:
    """The scale of each NCHW axis, from the constant scales or sizes; and how to name what was given."""
    inputs = list(node.input) + [""] * 4
    # Resize-10 reads (X, scales); from opset 11 on, (X, roi, scales, sizes).
    scales_name, sizes_name = (inputs[1], "") if 0 < opset < 11 else (inputs[2], inputs[3])
    for role, tensor in (("scales", scales_name), ("sizes", sizes_name)):
        if tensor and tensor not in consts:
            raise ModelError(f"its {role} {tensor!r} are computed in the graph; Resize needs constant scales or "
                             "sizes (export with a fixed scale_factor)")
    scales = consts[scales_name].ravel() if scales_name and consts[scales_name].size else None
    sizes = consts[sizes_name].ravel() if sizes_name and consts[sizes_name].size else None
    if scales is not None and sizes is not None:
        raise ModelError("Resize is given both scales and sizes, and ONNX allows only one of them; keep one "
                         "(the scales, say) and pass '' for the other")
    if scales is None and sizes is None:
        raise ModelError("Resize needs constant scales or sizes")
    values = [_number(v) for v in (scales if scales is not None else sizes)]
    given = f"{'scales' if scales is not None else 'sizes'} {values}"
    axes = [int(a) % 4 if -4 <= int(a) < 4 else None for a in attrs.get("axes", [0, 1, 2, 3])]
    if None in axes or len(set(axes)) != len(axes):
        raise ModelError(f"Resize axes {list(attrs['axes'])} are not distinct axes of an NCHW input; fix them in "
                         "the source model")
    if len(values) != len(axes):
        raise ModelError(f"Resize {given} give {len(values)} values for {len(axes)} axes; give one per axis "
                         "(4 for an NCHW input)")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ModelError(f"Resize {given} must be positive (a factor of 1, 2, 3, ... on H and W); fix them in "
                         "the source model")
    if sizes is not None and _text(attrs.get("keep_aspect_ratio_policy", "stretch")) != "stretch":
        raise ModelError(f"Resize keep_aspect_ratio_policy {_text(attrs['keep_aspect_ratio_policy'])!r} is not "
                         "supported; give scales instead of sizes")
    factors = [1, 1, 1, 1]
    for axis, value in zip(axes, values):
        factors[axis] = _number(value if scales is not None else value / shape[axis])
    return factors, given


# ---------------------------------------------------------------- TVM Relax

def relax_module(model: Model):
    """The model as a TVM Relax IRModule, through TVM's own ONNX importer."""
    from tvm.relax.frontend.onnx import from_onnx

    proto = to_onnx(model)
    return from_onnx(proto, shape_dict={model.input_name: list(model.input_shape)}, keep_params_in_input=False)


def with_name(model: Model, name: str) -> Model:
    return replace(model, name=name)
