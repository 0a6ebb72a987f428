"""The hand-written TensorIR schedules (`tvm:direct_nchw`, `tvm:direct_nchwc`, `tvm:winograd_<m>`, and
`tvm:depthwise` for depthwise convs).

The schedules themselves, with their knobs, are in workbench/schedules.py; this module makes
each one a candidate. Knobs come from `knobs_for(layer)` when given, else the schedule's
defaults for the layer; the weight is packed (and Winograd-transformed) on the host once.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from .. import depthwise, schedules  # noqa: F401 (importing depthwise registers tvm:depthwise with schedules)
from .base import KnobsError
from .tvm_kernel import FactoryCandidate, TVMCandidate


class HandSchedule(TVMCandidate):
    fusible = ("relu", "clip", "resize", "add")
    prologue_fusible = ("maxpool", "relu")

    def __init__(self, schedule: str, knobs_for: Callable | None = None, fixed: dict | None = None):
        schedules.knobs_class(schedule)  # fails clearly on an unknown schedule name
        self.schedule, self.knobs_for, self.fixed = schedule, knobs_for, dict(fixed or {})
        self.impl = f"tvm:{schedule}"
        self.tolerance = 1e-3 if schedule.startswith("winograd") else 1e-4
        chosen = knobs_for is not None or self.fixed
        self.note = "hand schedule, chosen knobs" if chosen else "hand schedule, default knobs"
        if self.fixed:  # records of other knobs are not reused for these
            self.config = "knobs " + ", ".join(f"{k}={v}" for k, v in sorted(self.fixed.items()))

    def why_not_applicable(self, layer):
        return schedules.applicable(self.schedule, schedules.ConvLayer.of(layer))

    def knobs(self, layer, fusion=None):
        """The chosen knobs, else the defaults for the layer with its fusion (a pool changes Winograd's pad),
        with the `fixed` ones set over them."""
        chosen = self.knobs_for(layer) if self.knobs_for else None
        conv = schedules.ConvLayer.of(layer, fusion if fusion is not None else False)
        return dataclasses.replace(chosen or schedules.default_knobs(self.schedule, conv), **self.fixed)

    def prim_func(self, layer, fusion, weight, target):
        conv, knobs = schedules.ConvLayer.of(layer, fusion), self.knobs(layer, fusion)
        sch = schedules.schedule(self.schedule, schedules.new_schedule(self.schedule, conv, knobs), conv, knobs)
        return sch.mod["main"], schedules.pack_weight(self.schedule, conv, knobs, weight)

    def with_knobs(self, knobs: dict) -> "HandSchedule":
        """The schedule with `knobs` over its defaults for each layer (e.g. {'epilogue': 'row', 'pad': 'inline'})."""
        fields = {f.name for f in dataclasses.fields(schedules.knobs_class(self.schedule))}
        unknown = sorted(set(knobs) - fields)
        if unknown:
            raise KnobsError(f"{self.impl} has no knob(s) {unknown}; its knobs are {sorted(fields)}")
        return HandSchedule(self.schedule, self.knobs_for, {**self.fixed, **knobs})

    def check_knobs(self, layer, fusion=None) -> None:
        conv = schedules.ConvLayer.of(layer, fusion if fusion is not None else False)
        schedules.validate_knobs(self.schedule, conv, self.knobs(layer, fusion))


def hand_candidates() -> list[HandSchedule]:
    return [HandSchedule(name) for name in schedules.SCHEDULES]


def step_candidate(schedule: str, step: str, sch, knobs=None) -> FactoryCandidate:
    """One intermediate schedule (from schedules.steps) as a candidate, to time each step."""

    def factory(layer, relu, weight):
        packed = schedules.pack_weight(schedule, schedules.ConvLayer.of(layer, relu), knobs, weight)
        return sch.mod["main"], packed

    return FactoryCandidate(f"tvm:{schedule}:{step}", factory, tolerance=1e-3, note=step)
