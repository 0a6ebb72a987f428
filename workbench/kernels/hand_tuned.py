"""The knob tuner's best point of each conv (`tvm:hand_tuned`): a hand schedule with the knobs that
measured fastest for the conv's shape on this target (knob_tuning.py searches them)."""

from __future__ import annotations

from .. import knob_records, schedules
from .base import KnobsError
from .hand import HandSchedule
from .tvm_kernel import TVMCandidate


class HandTunedCandidate(TVMCandidate):
    """Each conv on the knob tuner's fastest hand schedule and knobs (`tvm:hand_tuned`), read from
    the per-target knob database (knob_records.py).

    With a `target`, convs without a good trial there report "not applicable"; the candidate's
    `config` is a digest of the chosen points, so records of other choices are measured again.
    """

    impl = "tvm:hand_tuned"
    fusible = HandSchedule.fusible
    prologue_fusible = HandSchedule.prologue_fusible
    tolerance = 1e-3  # the loosest of the schedules it may pick (Winograd's); see tolerance_for

    def __init__(self, tuning_dir=None, target: dict | None = None, emulated: bool = False):
        self.tuning_dir, self.emulated = tuning_dir, emulated
        self.note = "hand schedule with the knob tuner's best knobs"
        self.best = None  # workload -> best trial, when the target is known
        if tuning_dir is not None and target is not None:
            self.best = knob_records.best_trials(tuning_dir, target, emulated=emulated)
            self.config = "best " + knob_records.database_digest(tuning_dir, target, emulated)

    def _trial(self, layer, target: dict | None = None) -> dict | None:
        best = self.best
        if best is None and self.tuning_dir is not None and target is not None:
            best = knob_records.best_trials(self.tuning_dir, target, emulated=self.emulated)
        return (best or {}).get(knob_records.workload_key(layer))

    def why_not_applicable(self, layer):
        if self.best is not None and self._trial(layer) is None:
            return ("no knob-tuning trial of this conv's shape on this target; run python -m workbench tune "
                    f"--space hand --layers {layer.name} --trials N with this --work-dir")
        return None

    def schedule_for(self, layer, target: dict | None = None) -> HandSchedule:
        """The chosen hand schedule with its tuned knobs; placement knobs that do not fit a fusion are
        left to the schedule's defaults for it (prim_func)."""
        trial = self._trial(layer, target)
        if trial is None:
            raise KnobsError(f"layer {layer.name!r} has no knob-tuning trial for this target under "
                             f"{self.tuning_dir}; tune it first (python -m workbench tune --space hand ...) "
                             "or pick another implementation")
        return HandSchedule(trial["impl"].split(":", 1)[1], fixed=trial.get("knobs") or {})

    def tolerance_for(self, layer) -> float:
        trial = self._trial(layer)
        return 1e-3 if trial is None or "winograd" in trial["impl"] else 1e-4

    def prim_func(self, layer, fusion, weight, target):
        chosen = self.schedule_for(layer, target)
        try:
            chosen.check_knobs(layer, fusion)
        except schedules.KnobError:  # tuned without the fusion: its pad/epilogue placement may not fit it
            chosen = HandSchedule(chosen.schedule, fixed={k: v for k, v in chosen.fixed.items()
                                                          if k not in ("pad", "epilogue")})
        return chosen.prim_func(layer, fusion, weight, target)
