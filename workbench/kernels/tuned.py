"""MetaSchedule's best schedule of a layer (`tvm:tuned`), from the per-target tuning database."""

from __future__ import annotations

from pathlib import Path

from ..errors import WorkbenchError
from .tvm_kernel import TVMCandidate


class NotTunedError(WorkbenchError, LookupError):
    """No usable tuning record for a layer on this target."""


class TunedCandidate(TVMCandidate):
    """The best tuned conv+bias of each layer. ReLU stays a separate op: it was tuned without it.

    With `layers`, other layers report "not applicable" instead of failing; `trials` becomes the
    candidate's configuration, so a record measured at another budget is measured again.
    """

    impl = "tvm:tuned"
    fusible = ()

    def __init__(self, tuning_dir: str | Path | None = None, layers: list[str] | None = None,
                 trials: int | None = None):
        self.tuning_dir = Path(tuning_dir) if tuning_dir is not None else None
        self.layers = set(layers) if layers is not None else None
        self.note = f"MetaSchedule best record from {tuning_dir}"
        self.config = f"trials={trials}" if trials else ""

    def why_not_applicable(self, layer):
        if self.layers is not None and layer.name not in self.layers:
            if self.config:
                return "not tuned at this budget"
            return (f"no tuning record for this layer in {self.tuning_dir}; tune it first "
                    f"(python -m workbench tune --layers {layer.name} --trials N with this --work-dir)")
        return None

    def prim_func(self, layer, fusion, weight, target):
        from .. import tuning

        refusal = self.why_not_fusible(fusion)
        if refusal:
            raise NotTunedError(refusal)
        func = tuning.best_prim_func(layer, target, self.tuning_dir, fusion.relu) if self.tuning_dir else None
        if func is None:
            where = tuning.database_dir(self.tuning_dir, target) if self.tuning_dir else "(no tuning folder given)"
            raise NotTunedError(
                f"layer {layer.name!r} has no tuning record for target {target} under {where}; "
                "tune it first (python -m workbench tune --layers ...) or pick another implementation")
        return func, weight
