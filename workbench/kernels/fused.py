"""The original study's fused elementwise groups as kernels with knobs.

- `tvm:maxpool_relu`: MaxPool (window = stride) [+ ReLU] as one loop nest: the pool window is
  unrolled inside the output loop, which is vectorised along the width (the study: by 4).
- `tvm:resize_add_relu`: ResizeNearest -> Add(skip) [-> ReLU] as one loop nest: the resize is
  an index division inlined into the add, vectorised along the width (the study: by 8).

A group is a tuple of model layers in order: (maxpool[, relu]) or (resize, add[, relu]).
Each kernel goes through the protocol (`measure.measure` with a `GroupCase`) and into a Relax
build (`emit`, a `call_tir` of the same PrimFunc, opaque so FuseOps leaves it whole).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import WorkbenchError
from ..model import Layer, Model
from ..names import symbol
from .base import Candidate, Running
from .tvm_kernel import FUNC_NAME, TVMRunning, final_kernel

PARALLEL = ("fused", "channel", "none")


class GroupError(WorkbenchError, ValueError):
    """A layer group or knob a fused elementwise kernel cannot compute."""


@dataclass(frozen=True)
class ElementwiseKnobs:
    """Vector lanes along the output width, and which outer loops run in parallel."""

    vec: int = 4  # divides the output width
    parallel: str = "fused"  # one of PARALLEL: (channel, row) fused, channels only, or none


# ----------------------------------------------------------------------------- groups


def group_kind(layers: tuple[Layer, ...]) -> str:
    """'maxpool_relu' or 'resize_add_relu' (the kernel's name), or GroupError naming the ops."""
    ops = tuple(layer.op for layer in layers)
    if ops in (("maxpool",), ("maxpool", "relu")):
        return "maxpool_relu"
    if ops in (("resize", "add"), ("resize", "add", "relu")):
        return "resize_add_relu"
    raise GroupError(f"no fused elementwise kernel for the ops {'+'.join(ops) or '(none)'}; "
                     "groups are maxpool[+relu] or resize+add[+relu]")


def elementwise_groups(model: Model) -> list[tuple[Layer, ...]]:
    """Every MaxPool [+ its sole reader, a ReLU] and every Resize -> Add [-> ReLU] chain the kernels
    compute, in model order (an overlapping or padded pool stays a plain op)."""
    from ..fusion import consumers, sole_consumer

    users, groups = consumers(model), []
    for layer in model.layers:
        if layer.op not in ("maxpool", "resize"):
            continue
        chain = [layer]
        if layer.op == "resize":
            nxt = sole_consumer(model, users, layer.name)
            if nxt is None or nxt.op != "add":
                continue
            chain.append(nxt)
        after = sole_consumer(model, users, chain[-1].name)
        if after is not None and after.op == "relu":
            chain.append(after)
        if _why_not(tuple(chain)) is None:
            groups.append(tuple(chain))
    return groups


def skip_input(layers: tuple[Layer, ...]) -> str:
    """The name of the add's other input (not the resize)."""
    resize, add = layers[0], layers[1]
    return next(s for s in add.inputs if s != resize.name)


def group_inputs(layers: tuple[Layer, ...]) -> list[str]:
    """The names of the values the group reads, in the kernel's argument order."""
    if group_kind(layers) == "maxpool_relu":
        return [layers[0].inputs[0]]
    return [layers[0].inputs[0], skip_input(layers)]


# ----------------------------------------------------------------------------- the protocol's case


@dataclass
class GroupCase:
    """A fused elementwise group with seeded inputs and its float64 PyTorch reference."""

    layers: tuple[Layer, ...]
    inputs: list[np.ndarray]  # in the kernel's argument order (see group_inputs)
    reference: np.ndarray

    @property
    def layer(self) -> Layer:
        """The group's last layer: the value it replaces (records are named after it)."""
        return self.layers[-1]

    @property
    def flops(self) -> int:
        """Elementwise operations: the window's comparisons, or the add, plus the ReLU."""
        out = int(np.prod(self.layer.output_shape))
        relu = int(self.layers[-1].op == "relu")
        first = self.layers[0]
        per = first.kernel * first.kernel - 1 if first.op == "maxpool" else 1
        return out * (per + relu)

    @classmethod
    def from_model(cls, model: Model, layers, seed: int = 0) -> "GroupCase":
        layers = tuple(model.layer(l) if isinstance(l, str) else l for l in layers)
        group_kind(layers)
        index = [l.name for l in model.layers].index(layers[0].name)
        rng = np.random.default_rng([seed, index])
        shapes = [layers[0].input_shape] + ([layers[1].output_shape] if layers[0].op == "resize" else [])
        inputs = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
        return cls(layers, inputs, reference_group(layers, inputs))


def reference_group(layers: tuple[Layer, ...], inputs: list[np.ndarray]) -> np.ndarray:
    """PyTorch in float64: maxpool [-> relu], or resize -> + skip [-> relu]."""
    import torch
    import torch.nn.functional as F

    first = layers[0]
    t = torch.from_numpy(inputs[0]).double()
    if first.op == "maxpool":
        t = F.max_pool2d(t, first.kernel, first.stride, first.pad)
    else:
        t = F.interpolate(t, scale_factor=first.scale, mode="nearest") + torch.from_numpy(inputs[1]).double()
    if layers[-1].op == "relu":
        t = torch.relu(t)
    return t.float().numpy()


# ----------------------------------------------------------------------------- computes and schedules


def _maxpool_compute(layers):
    from tvm import te

    pool, relu = layers[0], layers[-1].op == "relu"
    p = pool.kernel
    data = te.placeholder(pool.input_shape, "float32", name="data")

    def value(n, c, h, w):
        # The window unrolled as a max of loads; relu(maxpool(x)) is the max starting from 0.
        out = te.const(0, "float32") if relu else None
        for i in range(p):
            for j in range(p):
                load = data[n, c, h * p + i, w * p + j]
                out = load if out is None else te.max(out, load)
        return out

    out = te.compute(layers[-1].output_shape, value, name="output")
    return [data, out]


def _resize_add_compute(layers):
    from tvm import te

    resize, relu = layers[0], layers[-1].op == "relu"
    s = resize.scale
    low = te.placeholder(resize.input_shape, "float32", name="low")
    skip = te.placeholder(layers[1].output_shape, "float32", name="skip")

    def value(n, c, h, w):
        v = low[n, c, h // s, w // s] + skip[n, c, h, w]  # the resize, inlined as an index division
        return te.max(v, te.const(0, "float32")) if relu else v

    out = te.compute(layers[-1].output_shape, value, name="output")
    return [low, skip, out]


def _schedule(func, knobs: ElementwiseKnobs):
    import tvm

    sch = tvm.s_tir.Schedule(func)
    block = sch.get_sblock("output")
    n, c, h, w = sch.get_loops(block)
    if knobs.parallel == "fused":
        sch.parallel(sch.fuse(n, c, h))
    elif knobs.parallel == "channel":
        sch.parallel(sch.fuse(n, c))
    if knobs.vec > 1:
        sch.vectorize(sch.split(w, [None, knobs.vec])[1])
    return sch.mod["main"]


def default_knobs(layers: tuple[Layer, ...]) -> ElementwiseKnobs:
    """The study's lanes (4 for the pool, 8 for resize+add), halved until they divide the width."""
    vec = 4 if group_kind(layers) == "maxpool_relu" else 8
    width = layers[-1].output_shape[3]
    while width % vec:
        vec //= 2
    return ElementwiseKnobs(vec=vec)


def validate_knobs(layers: tuple[Layer, ...], knobs: ElementwiseKnobs) -> None:
    width = layers[-1].output_shape[3]
    if not isinstance(knobs.vec, int) or isinstance(knobs.vec, bool) or knobs.vec < 1 or width % knobs.vec:
        raise GroupError(f"knob vec={knobs.vec!r} must be a positive divisor of the output width ({width}) "
                         f"of {layers[-1].name!r}")
    if knobs.parallel not in PARALLEL:
        raise GroupError(f"knob parallel={knobs.parallel!r}: unknown choice; valid values: {list(PARALLEL)}")


def group_prim_func(layers: tuple[Layer, ...], knobs: ElementwiseKnobs | None = None):
    """The scheduled PrimFunc: (data, out) for a pool group, (low, skip, out) for resize+add."""
    from tvm import te

    kind = group_kind(layers)
    reason = _why_not(layers)
    if reason:
        raise GroupError(f"group ending at {layers[-1].name!r}: {reason}")
    knobs = default_knobs(layers) if knobs is None else knobs
    validate_knobs(layers, knobs)
    tensors = _maxpool_compute(layers) if kind == "maxpool_relu" else _resize_add_compute(layers)
    return _schedule(te.create_prim_func(tensors), knobs)


def _why_not(layers: tuple[Layer, ...]) -> str | None:
    first = layers[0]
    if first.op == "maxpool" and (first.kernel != first.stride or first.pad):
        return "the fused pool kernel takes a non-overlapping, unpadded window (kernel = stride, pad 0)"
    if first.op == "resize" and first.scale < 1:
        return f"resize scale {first.scale} is below 1"
    return None


# ----------------------------------------------------------------------------- the kernel


class ElementwiseKernel(Candidate):
    """A fused elementwise group's kernel (`tvm:maxpool_relu`, `tvm:resize_add_relu`) with knobs.

    Measured with a `GroupCase` through `measure.measure`; in a Relax build, `emit(bb, layers,
    values)` adds the PrimFunc and returns its `call_tir`. `knobs` is fixed for every group,
    or None for each group's defaults.
    """

    tolerance = 1e-6  # the same float32 operations as the reference, in another order at most
    fusible = ()

    def __init__(self, kind: str, knobs: ElementwiseKnobs | None = None):
        if kind not in ("maxpool_relu", "resize_add_relu"):
            raise GroupError(f"unknown fused elementwise kernel {kind!r}; choose maxpool_relu or resize_add_relu")
        self.kind, self.fixed = kind, knobs
        self.impl = f"tvm:{kind}"
        self.note = "fused elementwise group, " + ("chosen knobs" if knobs else "default knobs")
        self.config = "" if knobs is None else f"vec={knobs.vec},parallel={knobs.parallel}"

    def why_not_applicable(self, layer) -> str | None:
        return None  # the group is checked when the kernel is built (the case names only its last layer)

    def knobs(self, layers) -> ElementwiseKnobs:
        return self.fixed or default_knobs(tuple(layers))

    def prim_func(self, layers):
        layers = tuple(layers)
        kind = group_kind(layers)
        if kind != self.kind:
            raise GroupError(f"{self.impl} cannot compute {'+'.join(l.op for l in layers)}; use tvm:{kind}")
        return group_prim_func(layers, self.knobs(layers))

    def setup(self, session, case: GroupCase, device) -> Running:
        import tvm

        func = self.prim_func(case.layers)
        module = tvm.tirx.build(func.with_attr("global_symbol", FUNC_NAME), target=device.tvm_target())
        return TVMRunning(session, device, module, FUNC_NAME, case.inputs, case.reference.shape)

    def emit(self, bb, layers, values: dict):
        """Emit the group into a Relax BlockBuilder; `values` maps names to Relax values so far."""
        from tvm import relax

        layers = tuple(layers)
        name = symbol(f"{self.kind}_{layers[-1].name}")
        gv = bb.add_func(final_kernel(self.prim_func(layers), name), name)
        args = [values[n] for n in group_inputs(layers)]
        out_type = relax.TensorType(layers[-1].output_shape, "float32")
        return bb.emit(relax.call_tir(gv, args, out_type), symbol(layers[-1].name))


def elementwise_kernel(layers, knobs: ElementwiseKnobs | None = None) -> ElementwiseKernel:
    """The kernel computing this group (with fixed knobs, or the group's defaults)."""
    return ElementwiseKernel(group_kind(tuple(layers)), knobs)


def elementwise_candidates() -> list[ElementwiseKernel]:
    return [ElementwiseKernel("maxpool_relu"), ElementwiseKernel("resize_add_relu")]
