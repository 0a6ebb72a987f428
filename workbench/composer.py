"""The fused-operator composer's logic, without widgets: blocks, variants, trying them, the plan.

A *block* is one conv of the model with the ops around it it could absorb (a ReLU after it;
the decoder's ResizeNearest -> Add(skip) -> ReLU; the encoder's MaxPool -> ReLU before it).
A *variant* says how the block runs: a hand schedule, which of those ops are fused (the
block's *toggles*, e.g. ``relu``, ``resize-add-relu``, ``pool-relu``), and the schedule's
knobs (where the fused stage sits: ``epilogue``, ``pad``; tile sizes, vector width, ...).

Trying a variant schedules it, keeps its TensorIR and trace, and measures it through the
protocol (measure.py: numerics against the PyTorch reference of the same fused chain, then
time on the device over RPC). Results are cached by the variant's key, so re-applying a
variant already seen costs nothing; a wrong variant is marked so and never becomes the best.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import depthwise, schedules  # noqa: F401 (importing depthwise registers tvm:depthwise with schedules)
from .errors import WorkbenchError
from .fusion import PROLOGUE_OPS, Fusion, fusible_chain, fused_layers, prologue_chain, prologue_layers
from .measure import ConvCase, TimingConfig
from .model import Layer, Model

if TYPE_CHECKING:
    from .plan import Plan

IMPLS = schedules.SCHEDULES  # the hand schedules: the implementations with knobs
ALL_EPILOGUE = ("relu", "clip", "resize", "add")


class ComposerError(WorkbenchError, ValueError):
    """A block, toggle, knob or variant that does not fit; the message says what would."""


# ---------------------------------------------------------------- blocks


def toggle_name(ops: tuple[str, ...]) -> str:
    """A fusion toggle's name: ('resize', 'add', 'relu') -> 'resize-add-relu'; the pool is 'pool'."""
    return "-".join("pool" if op == "maxpool" else op for op in ops)


@dataclass(frozen=True)
class Block:
    """A conv and the fusions the graph allows around it; `toggles` maps a toggle's name to its ops."""

    conv: Layer
    prologue: tuple[str, ...]  # e.g. ('maxpool', 'relu'): what its input stage could compute
    epilogue: tuple[str, ...]  # e.g. ('resize', 'add', 'relu'): what its output stage could compute

    @property
    def name(self) -> str:
        return self.conv.name

    @property
    def toggles(self) -> dict[str, tuple[str, ...]]:
        found = {}
        if self.prologue:
            found[toggle_name(self.prologue)] = self.prologue
        if self.epilogue:
            found[toggle_name(self.epilogue)] = self.epilogue
        return found

    @property
    def kind(self) -> str:
        if "resize" in self.epilogue:
            return "decoder reduce conv"
        if self.prologue:
            return "conv after a pool"
        return {("relu",): "conv + ReLU", ("clip",): "conv + ReLU6"}.get(self.epilogue, "conv")

    @property
    def title(self) -> str:
        """For people: 'enc1_conv1 · conv after a pool · maxpool+relu > conv > relu · 4->8 16x24 ...'."""
        full = self.fusion(tuple(self.toggles))
        return f"{self.name} · {self.kind} · {full.label} · {self.conv.geometry.describe()}"

    def fusion(self, toggles: tuple[str, ...] | list[str]) -> Fusion:
        """The Fusion that the named toggles switch on (unknown names are a ComposerError)."""
        unknown = sorted(set(toggles) - set(self.toggles))
        if unknown:
            raise ComposerError(f"block {self.name!r} has no fusion toggle(s) {unknown}; "
                                f"its toggles are {sorted(self.toggles) or 'none'}")
        on = [self.toggles[t] for t in toggles]
        pro = next((ops for ops in on if ops == self.prologue), ())
        epi = next((ops for ops in on if ops == self.epilogue), ())
        return Fusion.of(tuple(prologue_layers(self._model, self.conv, pro)),
                         tuple(fused_layers(self._model, self.conv, epi)))

    def toggles_of(self, fusion: Fusion) -> tuple[str, ...]:
        """The toggles that are on in `fusion` (the inverse of `fusion`)."""
        names = []
        if fusion.prologue_ops and self.prologue:
            names.append(toggle_name(self.prologue))
        if fusion.epilogue_ops and self.epilogue:
            names.append(toggle_name(self.epilogue))
        return tuple(names)

    # the model is needed to turn toggles into layers, but is not part of the block's identity
    _model: Model = field(default=None, compare=False, repr=False)


def blocks(model: Model) -> list[Block]:
    """Every conv of the model as a block, with the fusions its neighbourhood allows, in model order."""
    return [Block(conv, prologue_chain(model, conv), fusible_chain(model, conv, ALL_EPILOGUE), model)
            for conv in model.convs]


def block(model: Model, name: str) -> Block:
    for found in blocks(model):
        if found.name == name:
            return found
    raise ComposerError(f"{name!r} is not a conv of model {model.name!r}; "
                        f"its convs are: {', '.join(c.name for c in model.convs)}")


def example_blocks(model: Model) -> dict[str, Block]:
    """One block of each kind a notebook shows: 'conv + ReLU', 'conv after a pool', 'decoder reduce conv'."""
    found = {}
    for candidate in blocks(model):
        found.setdefault(candidate.kind, candidate)
    return {kind: found[kind] for kind in ("conv + ReLU", "conv after a pool", "decoder reduce conv") if kind in found}


# ---------------------------------------------------------------- what the kernels compute


def supported(fusion: Fusion, layer: Layer) -> str | None:
    """Why the hand schedules cannot compute `fusion` around `layer`, or None when they can."""
    return schedules.fusion_problem(schedules.ConvLayer.of(layer, fusion))


def available_toggles(found: Block) -> tuple[str, ...]:
    """The block's toggles the kernels can compute (each alone and all together)."""
    names = tuple(name for name in found.toggles if supported(found.fusion((name,)), found.conv) is None)
    return names if supported(found.fusion(names), found.conv) is None else ()


def conv_layer(layer: Layer, fusion: Fusion) -> schedules.ConvLayer:
    """The schedules' view of the conv computing `fusion` around it (a ComposerError if they cannot)."""
    reason = supported(fusion, layer)
    if reason:
        raise ComposerError(f"layer {layer.name!r}: {reason}; switch those toggles off")
    return schedules.ConvLayer.of(layer, fusion)


def conv_case(model: Model, layer: Layer, fusion: Fusion, seed: int = 0) -> ConvCase:
    """Inputs and the float64 reference of the whole fused chain."""
    return ConvCase.from_model(model, layer, seed, fusion=fusion)


# ---------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """How a block runs: a hand schedule, what it fuses, and the schedule's knobs."""

    block: str
    impl: str  # a hand schedule: direct_nchw, direct_nchwc, winograd_<m>
    fusion: Fusion
    knobs: schedules.Knobs

    @property
    def key(self) -> str:
        """Stable across runs and processes: the same variant always has the same key."""
        return json.dumps({"block": self.block, "impl": self.impl, "fusion": dataclasses.asdict(self.fusion),
                           "knobs": dataclasses.asdict(self.knobs)}, sort_keys=True)

    @property
    def knob_text(self) -> str:
        """'oc_bn=16 ow_bn=16 vec=16 ...', in the knobs' own order."""
        return " ".join(f"{f.name}={getattr(self.knobs, f.name)}" for f in dataclasses.fields(self.knobs))

    @property
    def label(self) -> str:
        return f"{self.impl} · {self.fusion.label} · {self.knob_text}"


def knob_choices(impl: str, layer: Layer) -> dict[str, list]:
    """Each knob of `impl` on `layer` with the values worth offering (the validator has the last word)."""
    conv = schedules.ConvLayer.of(layer)
    if impl == schedules.DEPTHWISE:  # its space already lists what is worth offering
        return {knob: list(values) for knob, values in schedules.knob_space(impl, conv).items()}
    family = "DIRECT" if impl.startswith("direct") else "WINOGRAD"
    sizes = {"oc_bn": conv.out_channels, "ic_bn": conv.in_channels, "ow_bn": conv.out_width}
    if impl.startswith("winograd"):
        nh, nw = schedules.winograd_tiles(conv, schedules.winograd_m(impl))
        sizes["tile_bn"] = nh * nw
    choices = {}
    for knob in dataclasses.fields(schedules.knobs_class(impl)):
        default = knob.default
        if isinstance(default, bool):
            choices[knob.name] = [False, True]
        elif isinstance(default, int):
            total = sizes.get(knob.name)
            choices[knob.name] = schedules.divisors(total) if total else [1, 2, 4, 8, 16]
        else:
            choices[knob.name] = list(getattr(schedules, f"{knob.name.upper()}_{family}", (default,)))
    return choices


def applicable_impls(layer: Layer) -> list[str]:
    """The hand schedules that can run this conv."""
    conv = schedules.ConvLayer.of(layer)
    return [impl for impl in IMPLS if schedules.applicable(impl, conv) is None]


def make_variant(model: Model, block_name: str, impl: str | None = None, toggles: tuple[str, ...] | None = None,
                 **knobs) -> Variant:
    """A checked variant: default impl (the first that applies), every available toggle on, default knobs but `knobs`."""
    found = block(model, block_name)
    impls = applicable_impls(found.conv)
    if not impls:
        raise ComposerError(f"no hand schedule runs {block_name!r} ({found.conv.geometry.describe()}); "
                            "measure it with compare instead")
    impl = impl or impls[0]
    if impl not in impls:
        raise ComposerError(f"{impl!r} does not run {block_name!r}; choose one of {impls}")
    fusion = found.fusion(available_toggles(found) if toggles is None else tuple(toggles))
    conv = conv_layer(found.conv, fusion)
    base = schedules.default_knobs(impl, conv)
    unknown = sorted(set(knobs) - {f.name for f in dataclasses.fields(base)})
    if unknown:
        raise ComposerError(f"{impl} has no knob(s) {unknown}; its knobs: {[f.name for f in dataclasses.fields(base)]}")
    chosen = dataclasses.replace(base, **knobs)
    schedules.validate_knobs(impl, conv, chosen)  # KnobError (a WorkbenchError) names the knob
    return Variant(block_name, impl, fusion, chosen)


# ---------------------------------------------------------------- trying a variant


@dataclass
class Result:
    """What trying a variant showed: its program, trace, diff against the previous one, and its time."""

    variant: Variant
    tir: str
    trace: str
    status: str  # ok, wrong, failed, crashed (measure.Measurement's statuses)
    median_ms: float | None = None
    gflops: float | None = None
    numerics_ok: bool | None = None
    rel_err: float | None = None
    note: str = ""
    diff: str = ""  # unified diff of the TensorIR against the variant tried before on the block
    cached: bool = False

    @property
    def usable(self) -> bool:
        return self.status == "ok" and self.numerics_ok is True and self.median_ms is not None

    @property
    def mark(self) -> str:
        """The numerics mark shown beside the time."""
        if self.numerics_ok:
            return "✓ numerics ok"
        if self.status == "wrong":
            return f"✗ wrong (rel err {self.rel_err:.2g})" if self.rel_err is not None else "✗ wrong"
        return f"✗ {self.status}"

    @property
    def summary(self) -> str:
        """'0.123 ms ✓ numerics ok · oc_bn=16 ow_bn=16 ...': what the time label shows."""
        time = f"{self.median_ms:.3f} ms" if self.median_ms is not None else "no time"
        return f"{time} {self.mark} · {self.variant.knob_text}"


def tir_diff(before: str, after: str, label_before: str = "previous", label_after: str = "this") -> str:
    lines = difflib.unified_diff(before.splitlines(), after.splitlines(), label_before, label_after, n=2, lineterm="")
    return "\n".join(lines)


class Composer:
    """Tries variants of a model's blocks on a device; remembers every result per block."""

    def __init__(self, model: Model, device, timing: TimingConfig | None = None, seed: int = 0):
        self.model, self.device, self.seed = model, device, seed
        self.timing = timing or TimingConfig.quick()
        self.blocks = {b.name: b for b in blocks(model)}
        self._cache: dict[str, Result] = {}
        self._history: dict[str, list[Result]] = {}  # block -> results in the order tried
        self._cases: dict[tuple[str, Fusion], ConvCase] = {}

    def variant(self, block_name: str, impl: str | None = None, toggles: tuple[str, ...] | None = None,
                **knobs) -> Variant:
        return make_variant(self.model, block_name, impl, toggles, **knobs)

    def try_variant(self, variant: Variant) -> Result:
        """Schedule, check and time `variant` (or recall it), diffed against the block's previous variant."""
        seen = self._cache.get(variant.key)
        result = dataclasses.replace(seen, cached=True) if seen else self._run(variant)
        if not seen:
            self._cache[variant.key] = result
        history = self._history.setdefault(variant.block, [])
        if history:
            before = history[-1]
            result.diff = tir_diff(before.tir, result.tir, f"{before.variant.label}", f"{variant.label}")
        history.append(result)
        return result

    def history(self, block_name: str) -> list[Result]:
        return list(self._history.get(block_name, []))

    def best(self, block_name: str, fusion: Fusion | None = None) -> Result | None:
        """The fastest variant tried on the block whose numerics held (a wrong one never wins).

        With `fusion`, only variants computing it: a kernel that leaves the ReLU out is faster
        only because the ReLU then runs as an op of its own.
        """
        good = [r for r in self._history.get(block_name, [])
                if r.usable and (fusion is None or r.variant.fusion == fusion)]
        return min(good, key=lambda r: r.median_ms) if good else None

    def _run(self, variant: Variant) -> Result:
        from .kernels.hand import HandSchedule
        from .kernels.tvm_kernel import FactoryCandidate

        layer = self.blocks[variant.block].conv
        conv = conv_layer(layer, variant.fusion)
        sch = schedules.schedule(variant.impl, schedules.new_schedule(variant.impl, conv, variant.knobs), conv,
                                 variant.knobs)
        packed = schedules.pack_weight(variant.impl, conv, variant.knobs, self.model.params[layer.name][0])
        tolerance = HandSchedule(variant.impl).tolerance  # Winograd's looser bound, as everywhere
        candidate = FactoryCandidate(f"tvm:{variant.impl}", lambda *_: (sch.mod["main"], packed),
                                     tolerance=tolerance, fusible=ALL_EPILOGUE,
                                     prologue_fusible=PROLOGUE_OPS)
        measured = measure_case(self.device, candidate, self._case(layer, variant.fusion), self.timing)
        return Result(variant, sch.mod.script(), str(sch.trace), measured["status"], measured["median_ms"],
                      measured["gflops"], measured["numerics_ok"], measured["rel_err"], measured["note"])

    def _case(self, layer: Layer, fusion: Fusion) -> ConvCase:
        key = (layer.name, fusion)
        if key not in self._cases:
            self._cases[key] = conv_case(self.model, layer, fusion, self.seed)
        return self._cases[key]


def measure_case(device, candidate, case: ConvCase, timing: TimingConfig) -> dict:
    """One candidate on a prepared case (a fused chain's reference) through the protocol, surviving a lost session."""
    from .compare import measure_surviving
    from .rpc import SessionKeeper

    with SessionKeeper(device) as sessions:
        return measure_surviving(candidate, case, sessions, device, timing).to_dict()


# ---------------------------------------------------------------- into the plan


def use_in_plan(plan: Plan, model: Model, variant: Variant) -> Plan:
    """Put the variant (implementation, knobs, prologue and epilogue) into `plan`, validated; returns the plan.

    A variant the plan cannot take (PlanError) leaves the plan as it was.
    """
    from .plan import LayerPlan, PlanError

    entry = LayerPlan(variant.block, f"tvm:{variant.impl}", variant.fusion.epilogue_ops, variant.fusion.prologue_ops,
                      dataclasses.asdict(variant.knobs))
    previous = plan.layers.get(variant.block)
    plan.layers[variant.block] = entry
    try:
        plan.validate(model)
    except PlanError:
        if previous is None:
            del plan.layers[variant.block]
        else:
            plan.layers[variant.block] = previous
        raise
    return plan


def starting_plan(model: Model, path) -> Plan:
    """The study's hybrid plan saved at `path` when it fits the model, else TVM's default everywhere (noted)."""
    from pathlib import Path

    from .plan import Plan, PlanError

    if Path(path).is_file():
        try:
            plan = Plan.load(path)
            plan.validate(model)
            return plan
        except PlanError as err:
            reason = f"the plan at {path} does not fit this model ({err})"
    else:
        reason = f"no study plan at {path} yet (make study writes one)"
    plan = Plan.uniform(model)
    plan.notes.append(f"started from tvm:default everywhere: {reason}")
    return plan
