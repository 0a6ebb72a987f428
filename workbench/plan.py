"""The per-layer plan: which implementation runs each conv (with which knobs), and which ops
around it the conv's kernel absorbs.

A plan names implementations by id (`nnpack:wt8x8:precompute`, `tvm:winograd_4`, ...); the
kernel layer says whether each applies to its layer and what it can absorb, so a plan that
asks for the impossible fails here with the layer's name and what would work instead.

Fusion levels (`Plan.with_fusion`), the three builds of one plan the study compares:
- `none`: every op its own kernel (conv + bias alone; ReLU, MaxPool, Resize, Add separate);
- `2018`: the original study's groups: conv+bias+ReLU in the conv kernel, MaxPool+ReLU and
  Resize+Add+ReLU as one hand-scheduled kernel each;
- `folded`: beyond the study: the decoder's Resize+Add(skip)+ReLU folded into the epilogue of
  the conv before it, the encoder's MaxPool+ReLU into the input stage of the conv after it,
  wherever the conv's kernel can compute them.
`elementwise` says how the ops no conv absorbs run: `hand` (the 2018 fused kernels),
`relax` (TVM's FuseOps groups) or `separate` (one kernel per op).

Choosing with noise (`choose_plan`): every record has a confidence interval for its median
(stats.interval). The fastest record wins outright only when its interval lies wholly below
every other's. Otherwise the records no other record clearly beats (each one's interval starts
at or below the lowest interval's end) are a tie, and a fixed rule picks among them, so that noise cannot flip the choice back and forth: fewer
transforms first (`transform_rank`: direct convolutions and implicit GEMM, then Winograd
F(2x2), F(4x4), F(6x6) (NNPACK's wt8x8 is F(6x6)), then FFT 8x8, 16x16, then NNPACK's `auto`;
a pre-transformed kernel (`precompute`) before one transformed per call), then the
implementation id in alphabetical order. Every tie is written in `Plan.notes`. A fold
(`fold_where_faster`) likewise happens only where the folded kernel's interval lies wholly
below the separate kernels' summed interval; an overlap keeps the 2018 way and is noted.

A conv with a runoff (runoff.py: its close contenders timed again in interleaved rounds) is
chosen among its runoff records, compared round by round: a contender ties with the fastest
unless the interval of their median per-round time ratio lies above 1.02 (a slow spell of the
machine slows both within a round, and cancels in the ratio; 2% is not worth a different plan).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .blocks import absorbed_groups
from .errors import WorkbenchError
from .fusion import Fusion, chain_label, fused_layers, fusible_chain, legal_fusions, prologue_chain, prologue_layers
from .kernels.base import Candidate
from .kernels.registry import UnknownImplementationError, all_candidates, find
from . import stats
from .measure import usable
from .model import Layer, Model

DEFAULT_IMPL = "tvm:default"
FUSION_LEVELS = ("none", "2018", "folded")
ELEMENTWISE = ("hand", "relax", "separate")
ELEMENTWISE_OF_LEVEL = {"none": "separate", "2018": "hand", "folded": "hand"}


class PlanError(WorkbenchError, ValueError):
    """A plan that does not fit the model; the message names the layer and what applies."""


@dataclass(frozen=True)
class LayerPlan:
    layer: str
    impl: str
    fuse: tuple[str, ...] = ()  # the epilogue: ops after the conv its kernel computes
    prologue: tuple[str, ...] = ()  # ops before the conv its input stage computes: ('maxpool', 'relu')
    knobs: dict = field(default_factory=dict)  # the implementation's knobs (hand schedules); {} = its defaults

    @property
    def label(self) -> str:
        """e.g. 'maxpool+relu > conv > relu'."""
        return chain_label(self.prologue, self.fuse)


def _level(fuse) -> str:
    """A fusion level from a level name or the older bool (True: as much as the kernel can)."""
    if fuse is True:
        return "folded"
    if fuse is False or fuse is None:
        return "none"
    if fuse not in FUSION_LEVELS:
        raise PlanError(f"unknown fusion level {fuse!r}; use one of {list(FUSION_LEVELS)}")
    return fuse


def fusion_for(model: Model, conv: Layer, candidate: Candidate, level) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(epilogue, prologue) a conv on `candidate` gets at a fusion level."""
    level = _level(level)
    if level == "none":
        return (), ()
    epilogue = fusible_chain(model, conv, candidate.fusible)
    if level == "2018":
        return (epilogue if epilogue in (("relu",), ("clip",)) else ()), ()  # conv + bias + ReLU (or ReLU6)
    return epilogue, prologue_chain(model, conv, candidate.prologue_fusible)


def _find(impl: str, candidates: list[Candidate] | None, layer: str | None = None) -> Candidate:
    try:
        return find(impl, candidates)
    except UnknownImplementationError as err:
        raise PlanError(f"layer {layer!r}: {err}" if layer else str(err)) from None


@dataclass
class Plan:
    """Per-conv implementation and fusion, in model order; JSON and DataFrame round trips."""

    model: str
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    elementwise: str = "hand"  # how ops no conv absorbs run: one of ELEMENTWISE

    # -- construction
    @classmethod
    def uniform(cls, model: Model, impl: str = DEFAULT_IMPL, fuse: bool | str = True,
                overrides: dict[str, str] | None = None, candidates: list[Candidate] | None = None) -> "Plan":
        """Every conv on `impl` (or overrides[layer]), fused at level `fuse` (True: as much as each kernel can).

        `candidates` are the implementations ids resolve to (default: the kernel layer's).
        """
        candidates = all_candidates() if candidates is None else candidates
        overrides = overrides or {}
        unknown = sorted(set(overrides) - {c.name for c in model.convs})
        if unknown:
            raise PlanError(f"overrides name unknown conv layer(s) {unknown}; convs: {[c.name for c in model.convs]}")
        plan = cls(model.name, {conv.name: LayerPlan(conv.name, overrides.get(conv.name, impl)) for conv in model.convs})
        return plan.with_fusion(model, fuse, candidates)

    def with_fusion(self, model: Model, level: bool | str, candidates: list[Candidate] | None = None) -> "Plan":
        """The same implementations and knobs, every conv fused as much as `level` allows, and the ops
        no conv absorbs run as the level says (`none`: separate; `2018`, `folded`: the hand kernels)."""
        candidates = all_candidates() if candidates is None else candidates
        level = _level(level)
        entries = {}
        for name, entry in self.layers.items():
            conv = model.layer(name) if name in {c.name for c in model.convs} else None
            if conv is None:
                raise PlanError(f"plan names layer {name!r}, which is not a conv of model {model.name!r}")
            epilogue, prologue = fusion_for(model, conv, _find(entry.impl, candidates, name), level)
            entries[name] = LayerPlan(name, entry.impl, epilogue, prologue, dict(entry.knobs))
        plan = Plan(self.model, entries, list(self.notes), ELEMENTWISE_OF_LEVEL[level])
        plan.validate(model, candidates)
        return plan

    def candidate(self, layer: str, candidates: list[Candidate] | None = None) -> Candidate:
        """The candidate running `layer`, with the plan's knobs for it applied."""
        entry = self.layers[layer]
        found = _find(entry.impl, all_candidates() if candidates is None else candidates, layer)
        return found.with_knobs(entry.knobs) if entry.knobs else found

    def prologues(self) -> dict[str, tuple[str, ...]]:
        return {name: tuple(entry.prologue) for name, entry in self.layers.items()}

    def impl(self, layer: str) -> str:
        return self.layers[layer].impl

    def fusions(self) -> dict[str, tuple[str, ...]]:
        return {name: tuple(entry.fuse) for name, entry in self.layers.items()}

    # -- checks
    def validate(self, model: Model, candidates: list[Candidate] | None = None) -> None:
        """Raise PlanError unless every conv has an entry that applies and a legal fusion."""
        candidates = all_candidates() if candidates is None else candidates
        convs = {c.name: c for c in model.convs}
        unknown = [name for name in self.layers if name not in convs]
        if unknown:
            raise PlanError(f"plan names layer(s) {unknown} that are not convs of model {model.name!r}; "
                            f"its convs are: {', '.join(convs)}")
        missing = [name for name in convs if name not in self.layers]
        if missing:
            raise PlanError(f"plan has no entry for conv(s) {missing}; give each an impl (e.g. {DEFAULT_IMPL!r})")
        if self.elementwise not in ELEMENTWISE:
            raise PlanError(f"plan's 'elementwise' is {self.elementwise!r}; use one of {list(ELEMENTWISE)}")
        for name, entry in self.layers.items():
            _check_entry(model, convs[name], entry, candidates)

    # -- JSON
    def to_dict(self) -> dict:
        def row(e: LayerPlan) -> dict:
            extra = {"prologue": list(e.prologue)} if e.prologue else {}
            return {"layer": e.layer, "impl": e.impl, "fuse": list(e.fuse), **extra,
                    **({"knobs": dict(e.knobs)} if e.knobs else {})}

        return {"model": self.model, "notes": self.notes, "elementwise": self.elementwise,
                "layers": [row(e) for e in self.layers.values()]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        shape = "{'model': NAME, 'layers': [{'layer': CONV, 'impl': ID, 'fuse': [OPS]}, ...]}"
        if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
            raise PlanError(f"not a plan: expected {shape}, got {_preview(data)}; write it with Plan.save "
                            "or run the study again")
        entries = {}
        for index, row in enumerate(data["layers"]):
            entry = _entry(row, index, shape)
            if entry.layer in entries:
                raise PlanError(f"the plan lists layer {entry.layer!r} twice; keep one entry per conv")
            entries[entry.layer] = entry
        model, notes = data.get("model", ""), data.get("notes", [])
        if not isinstance(model, str) or not isinstance(notes, list):
            raise PlanError(f"not a plan: 'model' must be a string and 'notes' a list; expected {shape}")
        elementwise = data.get("elementwise", "relax")  # plans written before the 2018 kernels: TVM's groups
        if elementwise not in ELEMENTWISE:
            raise PlanError(f"the plan's 'elementwise' is {_preview(elementwise)}; use one of {list(ELEMENTWISE)}")
        return cls(model, entries, [str(n) for n in notes], elementwise)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanError(f"the plan is not valid JSON ({err}); write it again with Plan.save or run the study") from None
        except RecursionError:
            raise PlanError("the plan is nested too deeply to be a plan (a plan is one object with a list of "
                            "layers); write it again with Plan.save or run the study") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
            raise PlanError(f"cannot read the plan {path} ({reason}); write it with Plan.save or run the study") from None
        try:
            return cls.from_json(text)
        except PlanError as err:
            raise PlanError(f"{path}: {err}") from None

    # -- DataFrame (fuse and prologue as "relu" / "resize+add+relu" / "")
    def frame(self) -> pd.DataFrame:
        rows = [{"layer": e.layer, "impl": e.impl, "prologue": "+".join(e.prologue), "fuse": "+".join(e.fuse),
                 "knobs": ", ".join(f"{k}={v}" for k, v in e.knobs.items())} for e in self.layers.values()]
        frame = pd.DataFrame(rows, columns=["layer", "impl", "prologue", "fuse", "knobs"])
        frame.attrs["elementwise"] = self.elementwise
        return frame

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, model: str = "", elementwise: str | None = None) -> "Plan":
        """A plan from a frame like `frame()` gives (edited); knobs as "ow_bn=8, epilogue=row" or a dict."""
        entries = {}
        for row in frame.to_dict("records"):
            entries[row["layer"]] = LayerPlan(row["layer"], row["impl"], _ops(row.get("fuse")),
                                              _ops(row.get("prologue")), _knobs(row.get("knobs"), row["layer"]))
        return cls(model, entries, elementwise=elementwise or frame.attrs.get("elementwise", "hand"))


def _knobs(cell, layer: str) -> dict:
    """A frame cell of knobs: a dict, "name=value, ..." (ints and True/False read as such), or empty."""
    if isinstance(cell, dict):
        return dict(cell)
    if not isinstance(cell, str) or not cell.strip():
        return {}
    knobs = {}
    for part in cell.split(","):
        name, sep, value = (p.strip() for p in part.partition("="))
        if not sep or not name:
            raise PlanError(f"layer {layer!r}: knobs {cell!r} are not 'name=value, ...' (e.g. 'ow_bn=8, epilogue=row')")
        knobs[name] = int(value) if value.lstrip("-").isdigit() else {"True": True, "False": False}.get(value, value)
    return knobs


def _ops(cell) -> tuple[str, ...]:
    """A frame cell of op names: "resize+add+relu", a list, or empty (None/NaN: no fusion)."""
    if isinstance(cell, str):
        return tuple(f.strip() for f in cell.split("+") if f.strip())
    return tuple(cell) if isinstance(cell, (list, tuple)) else ()


def _entry(row, index: int, shape: str) -> LayerPlan:
    """One plan row, its fields checked for type: a hand-edited plan fails here, not in the build."""
    if not isinstance(row, dict) or "layer" not in row or "impl" not in row:
        raise PlanError(f"plan entry {index} is {_preview(row)}; every entry needs 'layer' and 'impl': {shape}")
    layer, impl = row["layer"], row["impl"]
    fuse, prologue, knobs = row.get("fuse") or [], row.get("prologue") or [], row.get("knobs") or {}
    if not isinstance(layer, str) or not isinstance(impl, str):
        raise PlanError(f"plan entry {index}: 'layer' and 'impl' must be strings, got {_preview(row)}")
    for key, ops, example in (("fuse", fuse, "['relu']"), ("prologue", prologue, "['maxpool', 'relu']")):
        if not isinstance(ops, list) or not all(isinstance(op, str) for op in ops):
            raise PlanError(f"plan entry {index} ({layer!r}): '{key}' must be a list of op names such as "
                            f"{example}, got {_preview(ops)}")
    if not isinstance(knobs, dict) or not all(isinstance(k, str) for k in knobs):
        raise PlanError(f"plan entry {index} ({layer!r}): 'knobs' must be an object of knob values such as "
                        f"{{'epilogue': 'row'}}, got {_preview(knobs)}")
    return LayerPlan(layer, impl, tuple(fuse), tuple(prologue), dict(knobs))


def _preview(value) -> str:
    try:
        text = json.dumps(value, default=str)
    except (RecursionError, ValueError):
        return f"a deeply nested {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def _check_entry(model: Model, conv: Layer, entry: LayerPlan, candidates: list[Candidate]) -> None:
    candidate = _find(entry.impl, candidates, conv.name)
    if entry.knobs:  # knobs can choose what runs (a pinned tvm:hand_tuned): applicability is the chosen kernel's
        try:
            candidate = candidate.with_knobs(entry.knobs)
        except WorkbenchError as err:
            raise PlanError(f"layer {conv.name!r}: {err}") from None
    reason = candidate.why_not_applicable(conv)
    if reason:
        options = [c.impl for c in candidates if not c.alias_of and c.why_not_applicable(conv) is None]
        raise PlanError(f"layer {conv.name!r} ({conv.geometry.describe()}): {entry.impl!r} does not apply: "
                        f"{reason}. Options: {options}")
    legal = legal_fusions(model, conv, candidate.fusible)
    if tuple(entry.fuse) not in legal:
        raise PlanError(f"layer {conv.name!r} with {entry.impl!r} cannot fuse {list(entry.fuse)}; "
                        f"legal fusions here: {[list(f) for f in legal]}")
    chain = prologue_chain(model, conv, candidate.prologue_fusible)
    if entry.prologue and tuple(entry.prologue) != chain:
        legal_before = [[], list(chain)] if chain else [[]]
        raise PlanError(f"layer {conv.name!r} with {entry.impl!r} cannot take {list(entry.prologue)} into its "
                        f"input stage; legal prologues here: {legal_before}")
    if entry.knobs:
        try:
            fusion = Fusion.of(tuple(prologue_layers(model, conv, tuple(entry.prologue))),
                               tuple(fused_layers(model, conv, tuple(entry.fuse))))
            candidate.check_knobs(conv, fusion)
        except WorkbenchError as err:
            raise PlanError(f"layer {conv.name!r}: {err}") from None


def choose_plan(model: Model, records: list[dict], fuse: bool | str = True,
                candidates: list[Candidate] | None = None) -> Plan:
    """The fastest usable implementation per conv, chosen with its noise; `tvm:default` where
    nothing usable was measured.

    Usable: measured ok with its numerics checked (measure.usable), and applicable to the layer
    (a stale record for an impl that does not apply never wins). A fast but wrong kernel
    therefore never wins. Convs are chosen by their isolated times (records without a
    `fusion`) and fused as the original study did (ReLU into the conv; MaxPool+ReLU and
    Resize+Add+ReLU as their own kernels); with `fuse` (True or "folded"), a block's pool or
    resize+add is then folded into its conv wherever the per-block sweep measured that faster
    beyond noise.

    The choice rule (module docstring): the fastest record wins if its confidence interval does
    not overlap any other's; else the records overlapping it tie, and the tie-break (`tie_key`:
    fewer transforms, then the implementation id) picks one; each tie is noted in `Plan.notes`
    ("enc1_conv1: tvm:winograd_4 and tvm:winograd_6 tie (intervals overlap); chose ...").
    """
    candidates = all_candidates() if candidates is None else candidates
    convs = {c.name: c for c in model.convs}
    choices = _choices(records, convs, candidates, folded=False)
    overrides = {name: choice.record["impl"] for name, choice in choices.items()}
    level = _level(fuse)
    plan = Plan.uniform(model, DEFAULT_IMPL, fuse="none" if level == "none" else "2018", overrides=overrides,
                        candidates=candidates)
    plan.notes.extend(choice.note for choice in choices.values() if choice.tie)
    fallback = [name for name in convs if name not in choices]
    if fallback:
        plan.notes.append(f"no usable record, fell back to {DEFAULT_IMPL}: {', '.join(fallback)}")
    return fold_where_faster(model, plan, records, candidates) if level == "folded" else plan


# Transforms per implementation family, fewest first: the tie-break's first key.
TRANSFORM_RANK = {"default": 0, "direct": 0, "direct_nchw": 0, "direct_nchwc": 0, "tuned": 0, "implicit_gemm": 0,
                  "winograd_2": 1, "winograd_4": 2, "winograd_6": 3, "wt8x8": 3, "wt8x8_fp16": 3,
                  "ft8x8": 4, "ft16x16": 5, "auto": 6}
STRATEGY_RANK = {"precompute": 0, "compute": 1}  # a kernel transformed once ahead before once per call


def transform_rank(impl: str) -> int:
    """How many transforms an implementation does, as a rank (unknown kinds last among equals)."""
    parts = impl.split(":")
    kind = parts[1] if len(parts) > 1 else impl
    return TRANSFORM_RANK.get(kind, 7)


def tie_key(record: dict) -> tuple:
    """The tie-break's order: fewer transforms, precompute before compute, then the id (fixed)."""
    impl, config = record["impl"], str(record.get("config", ""))
    strategy = impl.split(":")[2] if impl.startswith("nnpack:") and impl.count(":") >= 2 else ""
    # tvm:hand_tuned's config names the schedule it chose ("tvm:winograd_4 ic_bn=16, ..."): ranked as that.
    ranked_as = config.split(" ")[0] if impl == "tvm:hand_tuned" and config.startswith("tvm:") else impl
    return transform_rank(ranked_as), STRATEGY_RANK.get(strategy, 0), impl, config


@dataclass
class Choice:
    """One conv's choice: the record chosen, and the records it tied with (empty: a clear win)."""

    layer: str
    record: dict
    fastest: dict
    tied: list = field(default_factory=list)  # other records no record clearly beats (see choose)
    runner_up: dict | None = None  # the fastest record of another implementation

    @property
    def tie(self) -> bool:
        return bool(self.tied)

    @property
    def note(self) -> str:
        names = list(dict.fromkeys(r["impl"] for r in sorted([self.fastest, *self.tied], key=tie_key)))
        listed = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]
        return (f"{self.layer}: {listed} tie (intervals overlap); chose {self.record['impl']} by the tie-break "
                f"(fewest transforms, then id); fastest median was {self.fastest['impl']} "
                f"{stats.show(self.fastest)}")


def _interval(record: dict) -> tuple[float, float]:
    return stats.interval(record) or (record["median_ms"], record["median_ms"])


def choose(layer: str, records: list[dict]) -> Choice:
    """The choice among one conv's usable records (see the module docstring)."""
    ranked = sorted(records, key=lambda r: (r["median_ms"], tie_key(r)))
    fastest = ranked[0]
    others = [r for r in ranked[1:] if r["impl"] != fastest["impl"]]
    if stats.same_runoff(records):
        tied = [r for r in others if not stats.slower_in_rounds(r, fastest)]
        runner_up = others[0] if others else None
        if not tied:
            return Choice(layer, fastest, fastest, runner_up=runner_up)
        return Choice(layer, min([fastest, *tied], key=tie_key), fastest, tied, runner_up)
    # The contenders are the records no other record clearly beats: their interval starts at or below
    # the lowest interval's end. A chain of overlaps (A with B, B with C, C clearly above A) never
    # lets C in, whichever of A or B noise made the fastest.
    ceiling = min(_interval(r)[1] for r in ranked)
    tied = [r for r in others if _interval(r)[0] <= ceiling]
    runner_up = others[0] if others else None
    if not tied:
        return Choice(layer, fastest, fastest, runner_up=runner_up)
    return Choice(layer, min([fastest, *tied], key=tie_key), fastest, tied, runner_up)


# A conv whose own error exceeds the whole model's bound (hybrid.MODEL_TOLERANCE) cannot be in a plan whose
# output passes: FP16 Winograd on ARM (about 2e-2) is measured and shown, but never chosen.
PLAN_MAX_REL_ERR = 1e-3


def _candidates_of(records: list[dict], convs: dict[str, Layer], candidates: list[Candidate], folded: bool,
                   runoff: bool = True) -> dict:
    """conv name -> its usable records, among isolated (`folded` False) or folded-block records; with
    `runoff`, a conv's runoff records replace its sweep records."""
    found: dict[str, list] = {}
    for rec in usable(records):
        name = rec.get("layer")
        if name not in convs or bool(rec.get("fusion")) != folded or not _applies(rec["impl"], convs[name], candidates):
            continue
        if (rec.get("rel_err") or 0.0) > PLAN_MAX_REL_ERR:
            continue
        found.setdefault(name, []).append(rec)
    if runoff and not folded:  # a conv with a runoff (runoff.py) is chosen among its runoff's records only
        for name, recs in found.items():
            runoffs = [r for r in recs if r.get("runoff")]
            found[name] = runoffs or recs
    return found


def choices(model: Model, records: list[dict], candidates: list[Candidate] | None = None) -> dict[str, Choice]:
    """conv name -> its Choice among the isolated records (what choose_plan picks, with its ties)."""
    candidates = all_candidates() if candidates is None else candidates
    return _choices(records, {c.name: c for c in model.convs}, candidates, folded=False)


def _choices(records: list[dict], convs: dict[str, Layer], candidates: list[Candidate], folded: bool) -> dict:
    return {name: choose(name, recs) for name, recs in _candidates_of(records, convs, candidates, folded).items()}


def _fastest(records: list[dict], convs: dict[str, Layer], candidates: list[Candidate], folded: bool) -> dict:
    """conv name -> its chosen usable record (by the noise-aware rule), isolated or folded-block records."""
    return {name: choice.record for name, choice in _choices(records, convs, candidates, folded).items()}


def fold_where_faster(model: Model, plan: Plan, records: list[dict], candidates: list[Candidate]) -> Plan:
    """Fold a block into its conv where the folded kernel measured faster, beyond noise, than the
    conv's chosen kernel plus the separate elementwise kernels the fold would replace (both from
    records): the folded interval must lie wholly below the separate times' summed interval.
    An overlap keeps the 2018 way and is noted as a tie."""
    convs = {c.name: c for c in model.convs}
    # conv -> the fastest record of the plan's implementation for it, sweep or runoff: a runoff timed in a slow
    # spell of the machine is no measure of the time a block measured at another moment saves.
    isolated = {}
    for name, recs in _candidates_of(records, convs, candidates, folded=False, runoff=False).items():
        mine = [r for r in recs if r["impl"] == plan.impl(name)]
        if mine:
            isolated[name] = min(mine, key=lambda r: r["median_ms"])
    separate = {}  # last layer of an elementwise group -> its fastest separate kernel record
    for rec in usable(records):
        if rec.get("fusion") and rec.get("layer") not in convs:
            if rec["layer"] not in separate or rec["median_ms"] < separate[rec["layer"]]["median_ms"]:
                separate[rec["layer"]] = rec
    entries, notes = dict(plan.layers), list(plan.notes)
    for name, rec in _fastest(records, convs, candidates, folded=True).items():
        conv, prologue, epilogue = convs[name], tuple(rec.get("prologue", ())), tuple(rec.get("epilogue", ()))
        absorbed = absorbed_groups(model, conv, prologue, epilogue)
        if name not in isolated or not absorbed or any(tail not in separate for tail in absorbed):
            continue  # nothing measured to weigh the fold against: keep the 2018 way
        parts = [isolated[name], *(separate[tail] for tail in absorbed)]
        apart = sum(r["median_ms"] for r in parts)
        apart_ci = stats.sum_interval(stats.interval(r) for r in parts)
        folded_ci = stats.interval(rec)
        if stats.clearly_below(folded_ci, apart_ci):
            entries[name] = LayerPlan(name, rec["impl"], epilogue, prologue)
            notes.append(f"{name}: folded {rec['fusion']!r} into {rec['impl']} ({stats.show(rec)} "
                         f"against {apart:.3g} ms [{apart_ci[0]:.3g}, {apart_ci[1]:.3g}] for {plan.impl(name)} "
                         "and the separate kernels)")
        elif rec["median_ms"] < apart:
            notes.append(f"{name}: folding {rec['fusion']!r} into {rec['impl']} ({stats.show(rec)}) and the "
                         f"separate kernels ({apart:.3g} ms [{apart_ci[0]:.3g}, {apart_ci[1]:.3g}]) tie "
                         "(intervals overlap); kept the 2018 groups")
    folded = Plan(plan.model, entries, notes, plan.elementwise)
    folded.validate(model, candidates)
    return folded


def _applies(impl: str, layer: Layer, candidates: list[Candidate]) -> bool:
    try:
        return find(impl, candidates).why_not_applicable(layer) is None
    except UnknownImplementationError:
        return False
