"""The knob tuner's best point of each conv (`tvm:hand_tuned`): a hand schedule with the knobs that
measured fastest for the conv's shape on this target (knob_tuning.py searches them).

A plan pins the choice it was made with (`knobs` = {"schedule": ..., and the schedule's knobs}),
so a saved plan builds the kernels that were measured, whatever the database holds later.
"""

from __future__ import annotations

from .. import knob_records, schedules
from .base import KnobsError
from .hand import HandSchedule
from .tvm_kernel import TVMCandidate


class HandTunedCandidate(TVMCandidate):
    """Each conv on the knob tuner's fastest hand point for its shape, read from the per-target
    knob database (`tuning_dir` and `target`), or on the point a plan pinned (`pinned`).

    Its per-layer configuration (`config_for`) names the chosen schedule and knobs: a record of
    another choice is measured again.
    """

    impl = "tvm:hand_tuned"
    fusible = HandSchedule.fusible
    prologue_fusible = HandSchedule.prologue_fusible
    tolerance = 1e-3  # the loosest of the schedules it may choose; per layer: tolerance_for

    def __init__(self, tuning_dir=None, target: dict | None = None, emulated: bool = False,
                 pinned: dict | None = None):
        self.tuning_dir, self.target, self.emulated, self.pinned = tuning_dir, target, emulated, pinned
        self.note = "hand schedule, knobs " + ("pinned by the plan" if pinned else "from the knob tuner")
        self.best = None  # shape -> best trial, read once when the database and target are known
        if tuning_dir is not None and target is not None and pinned is None:
            self.best = knob_records.best_trials(tuning_dir, target, emulated=emulated)

    # -- the choice
    def choice(self, layer, target: dict | None = None) -> HandSchedule | None:
        """The hand schedule with its knobs for this conv, or None when the database has no trial of its shape."""
        if self.pinned is not None:
            knobs = dict(self.pinned)
            return HandSchedule(knobs.pop("schedule"), fixed=knobs)
        target = target or self.target
        if self.best is None and self.tuning_dir is not None and target is not None:
            self.target = target  # read once: a build asks for every conv
            self.best = knob_records.best_trials(self.tuning_dir, target, emulated=self.emulated)
        trial = (self.best or {}).get(knob_records.workload_key(layer))
        return None if trial is None else HandSchedule(trial["impl"].split(":", 1)[1], fixed=trial.get("knobs") or {})

    def pin(self, layer) -> dict:
        """The plan entry's `knobs` that fix this conv's current choice: {"schedule": ..., knob: value}."""
        chosen = self._chosen(layer)
        return {"schedule": chosen.schedule, **chosen.fixed}

    def _chosen(self, layer, target: dict | None = None) -> HandSchedule:
        chosen = self.choice(layer, target)
        if chosen is None:
            raise KnobsError(f"layer {layer.name!r} has no knob-tuning trial for this target under "
                             f"{self.tuning_dir}; tune it first (python -m workbench tune --space hand ...) "
                             "or pick another implementation")
        return chosen

    # -- the Candidate interface
    def why_not_applicable(self, layer):
        if self.pinned is not None:
            return self.choice(layer).why_not_applicable(layer)
        # Without a database and target it cannot tell (a plan checked before its build); building
        # then fails with what to do.
        if self.target is not None and self.choice(layer) is None:
            return ("no knob-tuning trial of this conv's shape on this target; run python -m workbench tune "
                    f"--space hand --layers {layer.name} --trials N with this --work-dir")
        return None

    def config_for(self, layer=None) -> str:
        chosen = self.choice(layer) if self.pinned is not None or layer is not None else None
        if chosen is None:
            return ""
        return chosen.impl + " " + ", ".join(f"{k}={v}" for k, v in sorted(chosen.fixed.items()))

    def tolerance_for(self, layer) -> float:
        chosen = self.choice(layer)
        return self.tolerance if chosen is None else chosen.tolerance

    def with_knobs(self, knobs: dict) -> "HandTunedCandidate":
        """Pinned to {"schedule": one of the hand schedules, and knobs of that schedule}."""
        schedule = knobs.get("schedule")
        if schedule not in schedules.SCHEDULES:
            raise KnobsError(f"{self.impl} knobs need 'schedule', one of {list(schedules.SCHEDULES)}, "
                             f"with that schedule's knobs; got {knobs!r}")
        rest = {k: v for k, v in knobs.items() if k != "schedule"}
        HandSchedule(schedule).with_knobs(rest)  # names every unknown knob
        return HandTunedCandidate(self.tuning_dir, self.target, self.emulated, {"schedule": schedule, **rest})

    def check_knobs(self, layer, fusion=None) -> None:
        if self.pinned is not None:
            self._fitted(self.choice(layer), layer, fusion).check_knobs(layer, fusion)

    def prim_func(self, layer, fusion, weight, target):
        return self._fitted(self._chosen(layer, target), layer, fusion).prim_func(layer, fusion, weight, target)

    @staticmethod
    def _fitted(chosen: HandSchedule, layer, fusion) -> HandSchedule:
        """The choice, with its pad/epilogue placement left to the schedule's defaults where they do not
        fit the fusion it runs with (it was tuned on the conv alone)."""
        try:
            chosen.check_knobs(layer, fusion)
            return chosen
        except schedules.KnobError:
            placed = {k: v for k, v in chosen.fixed.items() if k not in ("pad", "epilogue")}
            return HandSchedule(chosen.schedule, fixed=placed)

