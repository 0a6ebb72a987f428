"""The hybrid model: a per-conv plan (NNPACK or a TVM kernel, plus fused neighbours) and its build.

A :class:`Plan` says, for every conv of a model, which implementation runs it
(``nnpack:<algorithm>:<strategy>`` or ``tvm:default`` / ``tvm:<name>``) and which following
ops are folded into it (``relu``; for TVM convs also ``resize`` + ``add`` (+ ``relu``), the
decoder's ResizeNearest/Add/ReLU).  :func:`build_hybrid` turns model + plan into one Relax
IRModule:

- an NNPACK conv is a ``call_dps_packed`` of the bridge's global function (strategy
  precompute transforms the kernel once, at the first call, and reuses it; a fused ReLU
  becomes NNPACK's activation);
- a TVM conv is a ``call_tir`` of a PrimFunc: :func:`workbench.compare.default_conv_func`
  (or, with resize/add fused, :func:`fused_conv_func`), or a kernel supplied in
  ``tvm_kernels`` (how tuned kernels come in);
- every other op is a plain Relax op, so TVM's usual LegalizeOps + FuseOps pipeline handles
  it (MaxPool+ReLU, Resize+Add+ReLU form fusion groups there).

Weights are embedded as Relax constants: the compiled library is self-contained (one
``hybrid.so``), and constant buffers have stable addresses, which the NNPACK bridge's
transformed-kernel cache relies on.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from . import nnpack, nnpack_tvm
from .compare import conv_shape, default_conv_func, schedule_layer
from .measure import TimingConfig
from .model import Layer, Model, reference_output, save_onnx

DEFAULT_IMPL = "tvm:default"
FUSIBLE_OPS = ("relu", "resize", "add")
# Whole-model numerics: max|y - ref| / max|ref|.  Winograd loses ~1e-5 per layer and the
# error compounds through the network, hence looser than one layer's bound.
MODEL_TOLERANCE = 1e-3


class PlanError(ValueError):
    """A plan that does not fit the model; the message names the layer and what applies."""


# ---------------------------------------------------------------- implementation ids

@dataclass(frozen=True)
class Impl:
    """A parsed implementation id: ``nnpack:wt8x8:precompute`` or ``tvm:default``."""

    kind: str  # nnpack or tvm
    algorithm: str = ""  # nnpack only
    strategy: str = ""  # nnpack only
    variant: str = ""  # tvm only: default or the name of a supplied kernel

    @classmethod
    def parse(cls, text: str) -> "Impl":
        parts = str(text).split(":")
        if parts[0] == "nnpack" and len(parts) == 3:
            algorithm, strategy = parts[1], parts[2]
            if algorithm not in nnpack.ALGORITHMS or strategy not in nnpack.STRATEGIES:
                raise PlanError(f"unknown NNPACK implementation {text!r}: algorithms are {list(nnpack.ALGORITHMS)}, "
                                f"strategies {list(nnpack.STRATEGIES)}")
            return cls("nnpack", algorithm=algorithm, strategy=strategy)
        if parts[0] == "tvm" and len(parts) == 2 and parts[1]:
            return cls("tvm", variant=parts[1])
        raise PlanError(f"unknown implementation id {text!r}; use 'nnpack:<algorithm>:<strategy>' "
                        f"(e.g. 'nnpack:wt8x8:precompute') or 'tvm:default' / 'tvm:<kernel name>'")

    def why_not_applicable(self, layer: Layer) -> str | None:
        if self.kind == "nnpack":
            return nnpack.why_not_applicable(conv_shape(layer), self.algorithm, self.strategy)
        return None


# ---------------------------------------------------------------- fusion rules

def consumers(model: Model) -> dict[str, list[str]]:
    """Layer (or input) name -> names of the layers reading it; the model output gets '<output>'."""
    users: dict[str, list[str]] = {model.input_name: []}
    for layer in model.layers:
        users.setdefault(layer.name, [])
        for src in layer.inputs:
            users.setdefault(src, []).append(layer.name)
    users[model.output_name].append("<output>")
    return users


def _sole_consumer(model: Model, users: dict, name: str) -> Layer | None:
    """The one layer reading `name`, or None when several read it (or it is the output)."""
    readers = users.get(name, [])
    if len(readers) != 1 or readers[0] == "<output>":
        return None
    return model.layer(readers[0])


def fusible_chain(model: Model, conv: Layer, impl: str) -> tuple[str, ...]:
    """The longest run of following ops this implementation can absorb into the conv.

    Every absorbed op must be the only reader of its predecessor (otherwise the unfused value
    is still needed).  NNPACK and supplied TVM kernels take a ReLU epilogue only; the default
    TVM conv also takes the decoder's resize -> add(skip) -> relu.
    """
    users = consumers(model)
    nxt = _sole_consumer(model, users, conv.name)
    if nxt is None:
        return ()
    if nxt.op == "relu":
        return ("relu",)
    if Impl.parse(impl) != Impl("tvm", variant="default"):
        return ()
    chain, current = [], conv.name
    if nxt.op == "resize":
        chain.append("resize")
        current, nxt = nxt.name, _sole_consumer(model, users, nxt.name)
    if nxt is None or nxt.op != "add" or nxt.inputs.count(current) != 1:
        return ()  # a resize alone is not worth a custom epilogue
    chain.append("add")
    after = _sole_consumer(model, users, nxt.name)
    if after is not None and after.op == "relu":
        chain.append("relu")
    return tuple(chain)


def legal_fusions(model: Model, conv: Layer, impl: str) -> list[tuple[str, ...]]:
    """Every fusion a plan may name for this conv: nothing, or a prefix of the chain ending sensibly."""
    chain = fusible_chain(model, conv, impl)
    options = [()]
    if chain == ("relu",):
        options.append(chain)
    elif chain:
        start = 2 if chain[0] == "resize" else 1  # resize only together with its add
        options += [chain[:n] for n in range(start, len(chain) + 1)]
    return options


def fused_layers(model: Model, conv: Layer, fuse: tuple[str, ...]) -> list[Layer]:
    """The layers a fusion absorbs, in order (following the sole-consumer chain)."""
    users, members, current = consumers(model), [], conv.name
    for _ in fuse:
        layer = _sole_consumer(model, users, current)
        members.append(layer)
        current = layer.name
    return members


# ---------------------------------------------------------------- the plan

@dataclass(frozen=True)
class LayerPlan:
    layer: str
    impl: str
    fuse: tuple[str, ...] = ()


@dataclass
class Plan:
    """Per-conv implementation and fusion, in model order; JSON and DataFrame round trips."""

    model: str
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    # -- construction
    @classmethod
    def uniform(cls, model: Model, impl: str = DEFAULT_IMPL, fuse: bool = True,
                overrides: dict[str, str] | None = None) -> "Plan":
        """Every conv on `impl` (or overrides[layer]), each with its largest legal fusion if `fuse`."""
        overrides = overrides or {}
        unknown = sorted(set(overrides) - {c.name for c in model.convs})
        if unknown:
            raise PlanError(f"overrides name unknown conv layer(s) {unknown}; convs: {[c.name for c in model.convs]}")
        entries = {}
        for conv in model.convs:
            chosen = overrides.get(conv.name, impl)
            entries[conv.name] = LayerPlan(conv.name, chosen, fusible_chain(model, conv, chosen) if fuse else ())
        plan = cls(model.name, entries)
        plan.validate(model)
        return plan

    def impl(self, layer: str) -> str:
        return self.layers[layer].impl

    # -- checks
    def validate(self, model: Model) -> None:
        """Raise PlanError unless every conv has an entry that applies and a legal fusion."""
        convs = {c.name: c for c in model.convs}
        unknown = [name for name in self.layers if name not in convs]
        if unknown:
            raise PlanError(f"plan names layer(s) {unknown} that are not convs of model {model.name!r}; "
                            f"its convs are: {', '.join(convs)}")
        missing = [name for name in convs if name not in self.layers]
        if missing:
            raise PlanError(f"plan has no entry for conv(s) {missing}; give each an impl (e.g. {DEFAULT_IMPL!r})")
        for name, entry in self.layers.items():
            self._check_entry(model, convs[name], entry)

    @staticmethod
    def _check_entry(model: Model, conv: Layer, entry: LayerPlan) -> None:
        try:
            impl = Impl.parse(entry.impl)
        except PlanError as err:
            raise PlanError(f"layer {conv.name!r}: {err}") from None
        reason = impl.why_not_applicable(conv)
        if reason:
            options = [f"nnpack:{a}:{impl.strategy}" for a in nnpack.applicable_algorithms(conv_shape(conv), impl.strategy)]
            raise PlanError(f"layer {conv.name!r} ({conv_shape(conv).describe()}): {entry.impl!r} does not apply: "
                            f"{reason}. Options: {options + [DEFAULT_IMPL]}")
        bad = [op for op in entry.fuse if op not in FUSIBLE_OPS]
        legal = legal_fusions(model, conv, entry.impl)
        if bad or tuple(entry.fuse) not in legal:
            raise PlanError(f"layer {conv.name!r} with {entry.impl!r} cannot fuse {list(entry.fuse)}; "
                            f"legal fusions here: {[list(f) for f in legal]}")

    # -- JSON
    def to_dict(self) -> dict:
        return {"model": self.model, "notes": self.notes,
                "layers": [{"layer": e.layer, "impl": e.impl, "fuse": list(e.fuse)} for e in self.layers.values()]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        try:
            rows = data["layers"]
            entries = {r["layer"]: LayerPlan(r["layer"], r["impl"], tuple(r.get("fuse") or ())) for r in rows}
        except (KeyError, TypeError) as err:
            raise PlanError(f"not a plan: expected {{'model', 'layers': [{{'layer', 'impl', 'fuse'}}...]}} ({err})") from None
        return cls(data.get("model", ""), entries, list(data.get("notes", [])))

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return cls.from_json(Path(path).read_text())

    # -- DataFrame (fuse as "relu" / "resize+add+relu" / "")
    def frame(self) -> pd.DataFrame:
        rows = [{"layer": e.layer, "impl": e.impl, "fuse": "+".join(e.fuse)} for e in self.layers.values()]
        return pd.DataFrame(rows, columns=["layer", "impl", "fuse"])

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, model: str = "") -> "Plan":
        entries = {}
        for row in frame.to_dict("records"):
            fuse = row.get("fuse")
            if isinstance(fuse, str):
                fuse = tuple(f.strip() for f in fuse.split("+") if f.strip())
            else:  # a list/tuple, or an empty cell (None/NaN) meaning no fusion
                fuse = tuple(fuse) if isinstance(fuse, (list, tuple)) else ()
            entries[row["layer"]] = LayerPlan(row["layer"], row["impl"], fuse)
        return cls(model, entries)


def choose_plan(model: Model, records: list[dict], fuse: bool = True) -> Plan:
    """The fastest usable implementation per conv; `tvm:default` where nothing usable was measured.

    Usable: status "ok" and numerics_ok true, and applicable to the layer (a stale record for an
    impl that does not apply never wins).  A fast but wrong kernel therefore never wins.
    """
    convs = {c.name: c for c in model.convs}
    best: dict[str, dict] = {}
    for rec in records:
        name = rec.get("layer")
        if name not in convs or not _usable(rec, convs[name]):
            continue
        if name not in best or rec["median_ms"] < best[name]["median_ms"]:
            best[name] = rec
    overrides = {name: rec["impl"] for name, rec in best.items()}
    plan = Plan.uniform(model, DEFAULT_IMPL, fuse=fuse, overrides=overrides)
    fallback = [name for name in convs if name not in best]
    if fallback:
        plan.notes.append(f"no usable record, fell back to {DEFAULT_IMPL}: {', '.join(fallback)}")
    return plan


def _usable(rec: dict, layer: Layer) -> bool:
    if rec.get("status") != "ok" or rec.get("numerics_ok") is not True or rec.get("alias_of"):
        return False
    ms = rec.get("median_ms")
    if ms is None or not np.isfinite(ms):
        return False
    try:
        return Impl.parse(rec["impl"]).why_not_applicable(layer) is None
    except (PlanError, KeyError):
        return False


# ---------------------------------------------------------------- TVM conv kernels

def fused_conv_func(layer: Layer, scale: int, relu: bool):
    """Default (topi) conv + bias, then nearest upsample by `scale`, + skip, optional ReLU.

    Args (data, weight, bias, skip, out): the decoder's conv -> ResizeNearest -> Add -> ReLU
    as one kernel; the upsample is an index division, so the low-resolution conv output is
    read directly instead of being materialised at full resolution.
    """
    from tvm import te, topi

    _, c, h, w = layer.input_shape
    k = layer.out_channels
    data = te.placeholder((1, c, h, w), "float32", name="data")
    weight = te.placeholder((k, c, layer.kernel, layer.kernel), "float32", name="weight")
    bias = te.placeholder((k,), "float32", name="bias")
    conv = topi.nn.conv2d_nchw(data, weight, layer.stride, layer.pad, 1)
    _, _, oh, ow = (int(d) for d in conv.shape)
    skip = te.placeholder((1, k, oh * scale, ow * scale), "float32", name="skip")

    def epilogue(n, o, y, x):
        value = conv[n, o, y // scale, x // scale] + bias[o] + skip[n, o, y, x]
        return te.max(value, te.const(0, "float32")) if relu else value

    out = te.compute(skip.shape, epilogue, name="conv_resize_add")
    return te.create_prim_func([data, weight, bias, skip, out])


KernelFactory = Callable[[Layer, bool], Any]  # (layer, relu) -> PrimFunc or (PrimFunc, weight)


def _kernel_for(layer: Layer, impl: Impl, relu: bool, tvm_kernels: dict | None):
    """(PrimFunc, weight array or None) for a TVM conv; supplied kernels by layer name, then impl id."""
    tvm_kernels = tvm_kernels or {}
    factory = tvm_kernels.get(layer.name) or tvm_kernels.get(f"tvm:{impl.variant}")
    if factory is None:
        if impl.variant != "default":
            raise PlanError(f"layer {layer.name!r} uses 'tvm:{impl.variant}' but tvm_kernels has no entry for "
                            f"{layer.name!r} or 'tvm:{impl.variant}'")
        return default_conv_func(layer, relu), None
    made = factory(layer, relu)
    # A tuned kernel may take its weight pre-packed (e.g. NCHW[x]c): it returns it alongside.
    return made if isinstance(made, tuple) else (made, None)


def schedule_kernels(model: Model, impl: str, knobs: dict[str, Any] | None = None) -> KernelFactory:
    """A tvm_kernels factory from workbench.schedules (e.g. "direct_nchwc", "winograd_4").

    Use as ``tvm_kernels={"tvm:direct_nchwc": schedule_kernels(model, "direct_nchwc")}`` with
    plan impl ``tvm:direct_nchwc``.  `knobs` maps layer name -> knobs (default knobs otherwise).
    The weight is packed in numpy (schedules.pack_weight) and embedded pre-packed.
    """
    from . import schedules

    def factory(layer: Layer, relu: bool):
        conv = schedule_layer(layer, relu)
        layer_knobs = (knobs or {}).get(layer.name)
        sch = schedules.schedule(impl, schedules.new_schedule(impl, conv, layer_knobs), conv, layer_knobs)
        packed = schedules.pack_weight(impl, conv, layer_knobs, model.params[layer.name][0])
        return sch.mod["main"], packed

    return factory


# ---------------------------------------------------------------- building the Relax module

def _groups(model: Model, plan: Plan) -> tuple[dict[str, tuple[Layer, LayerPlan, list[Layer]]], set[str]]:
    """tail layer name -> (conv, entry, absorbed layers); and the names of absorbed non-tail layers."""
    tails, absorbed = {}, set()
    for conv in model.convs:
        entry = plan.layers[conv.name]
        members = fused_layers(model, conv, entry.fuse)
        tail = members[-1].name if members else conv.name
        tails[tail] = (conv, entry, members)
        absorbed.update(m.name for m in [conv] + members if m.name != tail)
    return tails, absorbed


def build_hybrid(model: Model, plan: Plan, target=None, tvm_kernels: dict[str, KernelFactory] | None = None):
    """The whole model as a Relax IRModule with ``main(x)``; weights are embedded constants.

    `target` (a Target or dict) is recorded on the module (attr ``workbench.target``) so that
    :func:`compile_hybrid` can default to it.  `tvm_kernels` maps a layer name or a
    ``tvm:<name>`` impl id to a factory (layer, relu) -> PrimFunc with args (data, weight,
    bias, out), or -> (PrimFunc, packed_weight) when the kernel takes its weight pre-packed.
    A supplied kernel fuses ReLU only; a resize/add fusion planned on it is left to Relax's
    FuseOps (as separate Relax ops).
    """
    import tvm
    from tvm import relax

    plan.validate(model)
    tails, absorbed = _groups(model, plan)
    bb = relax.BlockBuilder()
    x = relax.Var(model.input_name, relax.TensorType(model.input_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            values = {model.input_name: x}
            for layer in model.layers:
                if layer.name in tails:
                    values[layer.name] = _emit_conv_group(bb, model, values, *tails[layer.name], tvm_kernels)
                elif layer.name not in absorbed:
                    values[layer.name] = bb.emit(_relax_op(layer, [values[s] for s in layer.inputs]), layer.name)
            out = bb.emit_output(values[model.output_name])
        bb.emit_func_output(out)
    mod = bb.get()
    if target is not None:
        target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
        mod = mod.with_attr("workbench.target", json.dumps(_target_dict(target)))
    return mod


def _target_dict(target) -> dict:
    # Target.export() gives the dict form, which Target(dict) accepts back; FFI arrays -> lists.
    def plain(value):
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        if hasattr(value, "items"):
            return {str(k): plain(v) for k, v in value.items()}
        return [plain(v) for v in value] if hasattr(value, "__iter__") else str(value)

    return {k: plain(v) for k, v in dict(target.export()).items() if k != "host"}


def _emit_conv_group(bb, model: Model, values: dict, conv: Layer, entry: LayerPlan, members: list[Layer],
                     tvm_kernels) -> Any:
    from tvm import relax

    weight, bias = model.params[conv.name]
    data = values[conv.inputs[0]]
    impl, fuse = Impl.parse(entry.impl), tuple(entry.fuse)
    relu = bool(fuse) and fuse[-1] == "relu"
    name = members[-1].name if members else conv.name
    if impl.kind == "nnpack":
        expr = _nnpack_call(data, relax.const(weight), relax.const(bias), conv, impl, relu)
        return bb.emit(expr, name)
    if "add" in fuse:
        return _emit_tvm_fused(bb, model, values, conv, members, relu, tvm_kernels, impl, weight, bias)
    func, packed = _kernel_for(conv, impl, relu, tvm_kernels)
    gv = bb.add_func(_final_kernel(func, f"conv_{conv.name}"), f"conv_{conv.name}")
    args = [data, relax.const(packed if packed is not None else weight), relax.const(bias)]
    return bb.emit(relax.call_tir(gv, args, relax.TensorType(conv.output_shape, "float32")), name)


def _emit_tvm_fused(bb, model, values, conv, members, relu, tvm_kernels, impl, weight, bias):
    """conv [-> resize] -> add [-> relu]: one PrimFunc for the default conv; Relax ops around a supplied one."""
    from tvm import relax

    add = next(m for m in members if m.op == "add")
    resize = next((m for m in members if m.op == "resize"), None)
    produced = resize.name if resize else conv.name
    skip = values[next(s for s in add.inputs if s != produced)]
    supplied = tvm_kernels and (conv.name in tvm_kernels or f"tvm:{impl.variant}" in tvm_kernels)
    if supplied:
        # Conv from the supplied kernel; resize/add/relu as Relax ops for FuseOps to group.
        y = _emit_conv_group(bb, model, values, conv, LayerPlan(conv.name, f"tvm:{impl.variant}"), [], tvm_kernels)
        for member in members:
            args = [y if s == produced or s == conv.name else values[s] for s in member.inputs]
            y = bb.emit(_relax_op(member, args), member.name)
            produced = member.name
        return y
    func = fused_conv_func(conv, resize.scale if resize else 1, relu)
    symbol = f"conv_{conv.name}_" + "_".join(m.op for m in members)
    gv = bb.add_func(_final_kernel(func, symbol), symbol)
    args = [values[conv.inputs[0]], relax.const(weight), relax.const(bias), skip]
    return bb.emit(relax.call_tir(gv, args, relax.TensorType(add.output_shape, "float32")), members[-1].name)


OPAQUE = 8  # relax.OpPatternKind.kOpaque


def _final_kernel(func, symbol: str):
    """Name a conv PrimFunc and mark it opaque so FuseOps/FuseTIR leave it whole.

    Our conv kernels already carry their epilogue (and supplied ones their schedule).  Left
    unmarked, FuseOps groups a TE conv with a following legalized ReLU and FuseTIR then fails
    in 0.27 ("Inconsistent buffers ... mapped to the same relax var").
    """
    return func.with_attr("global_symbol", symbol).with_attr("op_pattern", OPAQUE)


def _nnpack_call(data, weight, bias, conv: Layer, impl: Impl, relu: bool):
    """call_dps_packed of the bridge; names travel as NNPACK's integer codes (see note below).

    The bridge accepts names or codes.  Codes keep the module free of string constants, which
    need no special care whether the VM runs in this process or on an RPC server.
    """
    from tvm import relax

    shape = conv_shape(conv)
    attrs = [*shape.pad, shape.stride, nnpack.ALGORITHMS[impl.algorithm]]
    if impl.strategy == "precompute":
        func = nnpack_tvm.CONV2D_PREPACKED
    else:
        func = nnpack_tvm.CONV2D
        attrs.append(nnpack.STRATEGY_CODES[impl.strategy])
    attrs.append(nnpack.ACTIVATIONS["relu" if relu else "identity"])
    args = [data, weight, bias, *(relax.prim_value(int(a)) for a in attrs)]
    return relax.call_dps_packed(func, args, relax.TensorType(shape.output_shape, "float32"))


def _relax_op(layer: Layer, args: list):
    from tvm import relax

    if layer.op == "relu":
        return relax.op.nn.relu(args[0])
    if layer.op == "maxpool":
        return relax.op.nn.max_pool2d(args[0], pool_size=layer.kernel, strides=layer.stride, padding=layer.pad)
    if layer.op == "resize":
        _, _, h, w = layer.output_shape
        return relax.op.image.resize2d(args[0], (h, w), method="nearest_neighbor",
                                       coordinate_transformation_mode="asymmetric", rounding_method="floor")
    if layer.op == "add":
        return relax.op.add(args[0], args[1])
    if layer.op == "concat":
        return relax.op.concat(args, axis=1)
    raise PlanError(f"layer {layer.name!r}: op {layer.op!r} has no Relax lowering here")


def compile_hybrid(mod, target=None, fuse_ops: bool = True):
    """Compile with tvm.compile; `fuse_ops` picks the CPU pipeline that runs FuseOps/FuseTIR.

    In TVM 0.27, ``tvm.compile(mod, target)`` on a CPU target uses the generic "default_build"
    pipeline, which legalizes but does NOT fuse (vm_build.py: the CPU fusion passes may drop
    unused call_pure_packed results).  Every packed call here has a used result, so we ask
    for ``relax.get_default_pipeline(target)`` (LegalizeOps, AnnotateTIROpPattern,
    FoldConstant, FuseOps, FuseTIR, ...): MaxPool+ReLU and Resize+Add+ReLU then become single
    kernels, and an unfused TVM conv absorbs a following elementwise op.
    """
    import tvm
    from tvm import relax

    if target is None:
        recorded = mod.attrs.get("workbench.target") if mod.attrs is not None else None
        if recorded is None:
            raise ValueError("no target: pass one, or build the module with build_hybrid(..., target=...)")
        target = json.loads(str(recorded))
    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    pipeline = cpu_pipeline(target) if fuse_ops else "default"
    return tvm.compile(mod, target=target, relax_pipeline=pipeline)


def cpu_pipeline(target):
    """TVM's CPU pipeline plus one pass: the fused elementwise kernels run parallel and vectorised.

    Legalized ops (ReLU, MaxPool, Resize, Add) come out as plain serial loops, and on CPU no
    default schedule touches them; on 2 cores that left about 1 ms of the UNet single-threaded.
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod, _ctx):
        with target:
            passes = (cpu_generic.library_dispatch_passes(target) + cpu_generic.legalize_passes(target)
                      + [parallel_elementwise_pass()] + cpu_generic.dataflow_lower_passes(target)
                      + cpu_generic.finalize_passes(target))
            return tvm.transform.Sequential(passes)(mod)

    return pipeline


def parallel_elementwise_pass():
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="ParallelElementwise")
    def transform(mod, _ctx):
        updates = {}
        for gv, func in mod.functions.items():
            if isinstance(func, tvm.tirx.PrimFunc) and not _is_opaque(func):
                updates[gv] = _parallelize(func)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return transform


def _is_opaque(func) -> bool:
    attrs = func.attrs
    return attrs is not None and "op_pattern" in attrs and int(attrs["op_pattern"]) == OPAQUE


def _parallelize(func):
    """Inline what can be inlined, then parallelise each remaining block's outer spatial loops."""
    import tvm

    sch = tvm.s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root")) if _has_root(sch) else []
    for block in blocks[:-1]:
        try:
            sch.compute_inline(block)
        except Exception:  # a reduction or a multi-consumer block stays
            pass
    for block in sch.get_child_blocks(sch.get_sblock("root")) if blocks else []:
        _parallel_block(sch, block)
    return sch.mod["main"]


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # an already-lowered function has no root block
        return False


def _parallel_block(sch, block) -> None:
    """Fuse the leading spatial loops but the last and run them in parallel; vectorise the last if it can."""
    iters = sch.get(block).iter_vars
    loops = sch.get_loops(block)
    spatial = 0
    for var in iters:
        if var.iter_type != 0:  # kDataPar
            break
        spatial += 1
    if spatial < 2 or len(loops) < spatial:
        return
    try:
        sch.parallel(sch.fuse(*loops[:spatial - 1]))
        if spatial == len(loops):
            sch.vectorize(loops[spatial - 1])
    except Exception:  # a shape the primitives refuse keeps the serial loops
        pass


# ---------------------------------------------------------------- running and timing

def check_output(y: np.ndarray, reference: np.ndarray, tolerance: float = MODEL_TOLERANCE) -> dict:
    """numerics_ok, max_abs_err and rel_err (max abs err / max |ref|) of a whole-model output."""
    if y.shape != reference.shape:
        return {"numerics_ok": False, "max_abs_err": float("inf"), "rel_err": float("inf")}
    err = float(np.max(np.abs(y.astype(np.float64) - reference)))
    rel = err / (float(np.max(np.abs(reference))) or 1.0)
    return {"numerics_ok": bool(np.isfinite(err) and rel <= tolerance), "max_abs_err": err, "rel_err": rel}


def _reference(reference, x: np.ndarray) -> np.ndarray | None:
    return reference_output(reference, x) if isinstance(reference, Model) else reference


def uses_nnpack(executable) -> bool:
    """Whether a compiled model (an Executable, or the module loaded from its library) calls NNPACK."""
    from tvm import relax

    if not isinstance(executable, relax.VMExecutable):
        executable = relax.VMExecutable(executable)
    return "workbench.nnpack." in executable.as_text()


def local_vm(executable, threads: int = 2):
    """A Relax VM in this process, with the NNPACK functions registered for `threads`."""
    import tvm
    from tvm import relax

    # TVM's pool reads this once, when it starts; unset, it halves the cores on x86.
    os.environ.setdefault("TVM_NUM_THREADS", str(threads))
    if uses_nnpack(executable):
        nnpack_tvm.share_cores_with_tvm()
    nnpack_tvm.register_tvm_functions(threads)
    return relax.VirtualMachine(executable, tvm.cpu())


def _run_and_time(vm, dev, x_tvm, reference, timing: TimingConfig | None) -> dict:
    """Run once, check against the reference, then time main end to end (the VM's evaluator)."""
    y = vm["main"](x_tvm).numpy()
    result = {"output": y}
    if reference is not None:
        result.update(check_output(y, reference))
    if timing is not None:
        evaluator = vm.time_evaluator("main", dev, number=timing.number, repeat=timing.repeat,
                                      min_repeat_ms=timing.min_repeat_ms)
        repeats = [s * 1e3 for s in evaluator(x_tvm).results]
        result.update(median_ms=float(np.median(repeats)), min_ms=float(np.min(repeats)), repeats_ms=repeats)
    return result


def run_local(executable, x: np.ndarray, reference: np.ndarray | Model | None = None,
              timing: TimingConfig | None = None, threads: int = 2) -> dict:
    """Run (and, given `timing`, time) the compiled hybrid in this process.

    Returns output, numerics_ok/max_abs_err/rel_err (when a reference or Model is given),
    median_ms and repeats_ms (when timed), and nnpack_profile (the bridge's last profile).
    TVM's own thread pool follows TVM_NUM_THREADS (set it before TVM starts).
    """
    import tvm

    vm = local_vm(executable, threads)
    result = _run_and_time(vm, tvm.cpu(), tvm.runtime.tensor(x), _reference(reference, x), timing)
    result["nnpack_profile"] = json.loads(nnpack_tvm.last_profile_json())
    return result


def run_remote(device, executable, x: np.ndarray, reference: np.ndarray | Model | None = None,
               timing: TimingConfig | None = None, threads: int | None = None) -> dict:
    """The same over RPC: export, upload, load with relax.VirtualMachine on the device, check, time.

    `threads` sets the device's NNPACK thread count for this session (default: the server's).
    nnpack_profile is read from the device: a non-empty "run" entry proves NNPACK ran there.
    """
    return device.run(_remote_work, executable, x, _reference(reference, x), timing, threads, device.export_kwargs())


def _remote_work(session, executable, x, reference, timing, threads, export_kwargs) -> dict:
    import os
    import tempfile
    import uuid

    import tvm
    from tvm import relax

    if threads:
        session.get_function(nnpack_tvm.SET_THREADS)(threads)
    if uses_nnpack(executable):
        session.get_function(nnpack_tvm.SHARE_CORES)()
    name = f"hybrid-{uuid.uuid4().hex[:8]}.so"  # fresh name: the device caches loaded paths
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        executable.export_library(path, **export_kwargs)
        session.upload(path)
    dev = session.cpu()
    vm = relax.VirtualMachine(session.load_module(name), dev)
    result = _run_and_time(vm, dev, tvm.runtime.tensor(x, dev), reference, timing)
    result["nnpack_profile"] = json.loads(session.get_function(nnpack_tvm.LAST_PROFILE)())
    return result


def profile_layers(executable, x: np.ndarray, threads: int = 2, runs: int = 3) -> pd.DataFrame:
    """Per-call time inside the whole model (in process), via the VM's instrument hook.

    One row per VM call (builtins excluded): call index, symbol, layer (the plan's NNPACK
    convs are matched in order; TVM kernels by their symbol), median ms over `runs` runs
    after a warm-up.  Times include the hook's own Python overhead (a few microseconds).
    """
    import tvm

    vm = local_vm(executable, threads)
    x_tvm = tvm.runtime.tensor(x)
    vm["main"](x_tvm)  # warm-up: kernel transforms, allocations
    samples: list[list[tuple[str, float]]] = []
    for _ in range(runs):
        calls, starts = [], []

        def instrument(func, symbol, before, ret, *args):
            if before:
                starts.append(time.perf_counter())
            else:
                calls.append((str(symbol), (time.perf_counter() - starts.pop()) * 1e3))
            return 0

        vm.set_instrument(instrument)
        vm["main"](x_tvm)
        samples.append([c for c in calls if not c[0].startswith("vm.builtin.")])
    rows = [{"call": i, "symbol": sym, "ms": float(np.median([s[i][1] for s in samples]))}
            for i, (sym, _) in enumerate(samples[0])]
    return pd.DataFrame(rows, columns=["call", "symbol", "ms"])


def label_calls(table: pd.DataFrame, model: Model, plan: Plan) -> pd.DataFrame:
    """Add a `layer` column: NNPACK calls matched to the plan's NNPACK convs in model order."""
    nn_layers = iter([c.name for c in model.convs if plan.impl(c.name).startswith("nnpack:")])
    labels = []
    convs = {c.name for c in model.convs}
    for symbol in table["symbol"]:
        if symbol.startswith("workbench.nnpack."):
            labels.append(next(nn_layers, "?"))
        else:  # our TVM conv kernels are named conv_<layer>[_<fused ops>]
            labels.append(next((c for c in convs if symbol == f"conv_{c}" or symbol.startswith(f"conv_{c}_")), symbol))
    table = table.copy()
    table["layer"] = labels
    return table


# ---------------------------------------------------------------- export / load

def export_hybrid(model: Model, plan: Plan, out_dir: str | Path, target=None, tvm_kernels=None,
                  threads: int = 2) -> Path:
    """Write hybrid.so (weights embedded), plan.json, model.onnx and meta.json into out_dir."""
    from .rpc import host_target

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = target or host_target(threads)
    executable = compile_hybrid(build_hybrid(model, plan, target, tvm_kernels), target)
    executable.export_library(str(out / "hybrid.so"))
    plan.save(out / "plan.json")
    save_onnx(model, out / "model.onnx")
    meta = {"model": model.name, "input_name": model.input_name, "input_shape": list(model.input_shape),
            "output_shape": list(model.layers[-1].output_shape), "threads": threads,
            "weights": "embedded in hybrid.so as constants"}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return out


class HybridModel:
    """A loaded hybrid: call it with a numpy input, get the numpy output."""

    def __init__(self, out_dir: str | Path, threads: int | None = None):
        import tvm

        out = Path(out_dir)
        self.meta = json.loads((out / "meta.json").read_text())
        self.plan = Plan.load(out / "plan.json")
        self.threads = threads or int(self.meta.get("threads", 1))
        # The library calls the NNPACK bridge by name: register it in this process first.
        self.vm = local_vm(tvm.runtime.load_module(str(out / "hybrid.so")), self.threads)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import tvm

        x = np.ascontiguousarray(x, dtype=np.float32)
        if tuple(x.shape) != tuple(self.meta["input_shape"]):
            raise ValueError(f"input shape {x.shape} != the model's {tuple(self.meta['input_shape'])}")
        return self.vm["main"](tvm.runtime.tensor(x)).numpy()


def load_hybrid(out_dir: str | Path, threads: int | None = None) -> HybridModel:
    return HybridModel(out_dir, threads)
