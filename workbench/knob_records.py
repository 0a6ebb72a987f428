"""The knob tuner's database: every trial on one target, as JSON lines beside MetaSchedule's
(`<tuning dir>/<target>/knobs.jsonl`), and what is read back from it (the best point of each
conv shape, the whole model's estimate as the search went).

Apart from the search (knob_tuning.py) so that the kernel layer can read the best points
without importing the search.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

from .geometry import ConvGeometry
from .model import Layer, Model
from .records import RecordStore
from .tuning import database_dir

KIND = "knob_trial"
DATABASE_FILE = "knobs.jsonl"


def workload_key(layer: Layer) -> str:
    """The conv's geometry as text: layers of one shape share their trials. Groups are named when
    there are any (a depthwise conv must never reuse a dense conv's trials; dense keys are unchanged)."""
    g = layer.geometry
    groups = f" g{g.groups}" if g.groups > 1 else ""
    return (f"conv {g.in_channels}->{g.out_channels} {g.height}x{g.width} k{g.kernel_h}x{g.kernel_w} "
            f"s{g.stride} p{','.join(map(str, g.pad))}{groups}")


def geometry_dict(g: ConvGeometry) -> dict:
    return {**dataclasses.asdict(g), "pad": list(g.pad)}


def database_path(work_dir, target: dict) -> Path:
    return database_dir(work_dir, target) / DATABASE_FILE


class KnobDatabase:
    """Every trial on one target, JSON lines (records.RecordStore); emulated trials kept apart."""

    def __init__(self, work_dir, target: dict, emulated: bool = False, threads: int | None = None):
        self.path = database_path(work_dir, target)
        self.store = RecordStore(self.path)
        self.emulated, self.threads = bool(emulated), threads

    def trials(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [r for r in self.store.read(KIND) if bool(r.get("emulated")) == self.emulated
                and (self.threads is None or r.get("threads") == self.threads)]

    def add(self, record: dict) -> dict:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return self.store.append(KIND, record)


def good(record: dict) -> bool:
    """A trial that ran, checked right, and has a time."""
    return (record.get("status") == "ok" and record.get("numerics_ok") is True
            and record.get("median_ms") is not None and math.isfinite(record["median_ms"]))


def best_trials(work_dir, target: dict, hand_only: bool = True, emulated: bool = False) -> dict[str, dict]:
    """workload key -> its fastest good trial (of a hand schedule, with `hand_only`)."""
    best: dict[str, dict] = {}
    for record in KnobDatabase(work_dir, target, emulated).trials():
        if not good(record) or (hand_only and record["impl"].startswith("nnpack:")):
            continue
        key = record["workload"]
        if key not in best or record["median_ms"] < best[key]["median_ms"]:
            best[key] = record
    return best


def estimate_history(model: Model, work_dir, target: dict, layers: list[str] | None = None, emulated: bool = False,
                     threads: int | None = None) -> list[tuple[int, float]]:
    """(trials spent, the convs' estimated ms) in measurement order, from the database: each conv at its
    shape's best trial so far, once every shape has one."""
    counts: dict[str, int] = {}
    for layer in model.select_convs(layers):
        counts[workload_key(layer)] = counts.get(workload_key(layer), 0) + 1
    best: dict[str, float] = {}
    history, spent = [], 0
    for record in KnobDatabase(work_dir, target, emulated, threads).trials():
        if record.get("workload") not in counts:
            continue
        spent += 1
        if good(record) and record["median_ms"] < best.get(record["workload"], math.inf):
            best[record["workload"]] = record["median_ms"]
            if len(best) == len(counts):
                history.append((spent, sum(best[k] * n for k, n in counts.items())))
    return history


def database_digest(work_dir, target: dict, emulated: bool = False) -> str:
    """A short digest of the best hand points: a tuned candidate's records are re-measured when it changes."""
    best = best_trials(work_dir, target, emulated=emulated)
    text = json.dumps({k: [r["impl"], r.get("knobs")] for k, r in sorted(best.items())}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:10]
