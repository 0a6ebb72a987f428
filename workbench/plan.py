"""The per-layer plan: which implementation runs each conv, and which following ops it absorbs.

A plan names implementations by id (`nnpack:wt8x8:precompute`, `tvm:winograd_4`, ...); the
kernel layer says whether each applies to its layer and what it can absorb, so a plan that
asks for the impossible fails here with the layer's name and what would work instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .errors import WorkbenchError
from .fusion import fusible_chain, legal_fusions
from .kernels.base import Candidate
from .kernels.registry import UnknownImplementationError, all_candidates, find
from .measure import usable
from .model import Layer, Model

DEFAULT_IMPL = "tvm:default"


class PlanError(WorkbenchError, ValueError):
    """A plan that does not fit the model; the message names the layer and what applies."""


@dataclass(frozen=True)
class LayerPlan:
    layer: str
    impl: str
    fuse: tuple[str, ...] = ()


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

    # -- construction
    @classmethod
    def uniform(cls, model: Model, impl: str = DEFAULT_IMPL, fuse: bool = True,
                overrides: dict[str, str] | None = None, candidates: list[Candidate] | None = None) -> "Plan":
        """Every conv on `impl` (or overrides[layer]), each with its largest legal fusion if `fuse`.

        `candidates` are the implementations ids resolve to (default: the kernel layer's).
        """
        candidates = all_candidates() if candidates is None else candidates
        overrides = overrides or {}
        unknown = sorted(set(overrides) - {c.name for c in model.convs})
        if unknown:
            raise PlanError(f"overrides name unknown conv layer(s) {unknown}; convs: {[c.name for c in model.convs]}")
        entries = {}
        for conv in model.convs:
            chosen = overrides.get(conv.name, impl)
            fusible = _find(chosen, candidates, conv.name).fusible
            entries[conv.name] = LayerPlan(conv.name, chosen, fusible_chain(model, conv, fusible) if fuse else ())
        plan = cls(model.name, entries)
        plan.validate(model, candidates)
        return plan

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
        for name, entry in self.layers.items():
            _check_entry(model, convs[name], entry, candidates)

    # -- JSON
    def to_dict(self) -> dict:
        return {"model": self.model, "notes": self.notes,
                "layers": [{"layer": e.layer, "impl": e.impl, "fuse": list(e.fuse)} for e in self.layers.values()]}

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
        return cls(model, entries, [str(n) for n in notes])

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


def _entry(row, index: int, shape: str) -> LayerPlan:
    """One plan row, its fields checked for type: a hand-edited plan fails here, not in the build."""
    if not isinstance(row, dict) or "layer" not in row or "impl" not in row:
        raise PlanError(f"plan entry {index} is {_preview(row)}; every entry needs 'layer' and 'impl': {shape}")
    layer, impl, fuse = row["layer"], row["impl"], row.get("fuse") or []
    if not isinstance(layer, str) or not isinstance(impl, str):
        raise PlanError(f"plan entry {index}: 'layer' and 'impl' must be strings, got {_preview(row)}")
    if not isinstance(fuse, list) or not all(isinstance(op, str) for op in fuse):
        raise PlanError(f"plan entry {index} ({layer!r}): 'fuse' must be a list of op names such as "
                        f"['relu'], got {_preview(fuse)}")
    return LayerPlan(layer, impl, tuple(fuse))


def _preview(value) -> str:
    try:
        text = json.dumps(value, default=str)
    except (RecursionError, ValueError):
        return f"a deeply nested {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def _check_entry(model: Model, conv: Layer, entry: LayerPlan, candidates: list[Candidate]) -> None:
    candidate = _find(entry.impl, candidates, conv.name)
    reason = candidate.why_not_applicable(conv)
    if reason:
        options = [c.impl for c in candidates if not c.alias_of and c.why_not_applicable(conv) is None]
        raise PlanError(f"layer {conv.name!r} ({conv.geometry.describe()}): {entry.impl!r} does not apply: "
                        f"{reason}. Options: {options}")
    legal = legal_fusions(model, conv, candidate.fusible)
    if tuple(entry.fuse) not in legal:
        raise PlanError(f"layer {conv.name!r} with {entry.impl!r} cannot fuse {list(entry.fuse)}; "
                        f"legal fusions here: {[list(f) for f in legal]}")


def choose_plan(model: Model, records: list[dict], fuse: bool = True,
                candidates: list[Candidate] | None = None) -> Plan:
    """The fastest usable implementation per conv; `tvm:default` where nothing usable was measured.

    Usable: measured ok with its numerics checked (measure.usable), and applicable to the layer
    (a stale record for an impl that does not apply never wins). A fast but wrong kernel
    therefore never wins.
    """
    candidates = all_candidates() if candidates is None else candidates
    convs = {c.name: c for c in model.convs}
    best: dict[str, dict] = {}
    for rec in usable(records):
        name = rec.get("layer")
        if name not in convs or not _applies(rec["impl"], convs[name], candidates):
            continue
        if name not in best or rec["median_ms"] < best[name]["median_ms"]:
            best[name] = rec
    overrides = {name: rec["impl"] for name, rec in best.items()}
    plan = Plan.uniform(model, DEFAULT_IMPL, fuse=fuse, overrides=overrides, candidates=candidates)
    fallback = [name for name in convs if name not in best]
    if fallback:
        plan.notes.append(f"no usable record, fell back to {DEFAULT_IMPL}: {', '.join(fallback)}")
    return plan


def _applies(impl: str, layer: Layer, candidates: list[Candidate]) -> bool:
    try:
        return find(impl, candidates).why_not_applicable(layer) is None
    except UnknownImplementationError:
        return False
