"""The interface every convolution implementation implements, and the data it runs on."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import WorkbenchError

if TYPE_CHECKING:
    from ..fusion import ConvGroup
    from ..measure import ConvCase, TimingConfig
    from ..model import Layer

# Relative tolerance: max |out - ref| / max |ref|. Winograd and FFT lose a little precision.
DEFAULT_TOLERANCE = 1e-4


class KnobsError(WorkbenchError, ValueError):
    """Knobs given to an implementation that has none, or that do not fit it."""


class Running:
    """An implementation set up on a device for one case: run it once, time it."""

    def run_once(self) -> np.ndarray:
        raise NotImplementedError

    def time(self, timing: "TimingConfig") -> list[float]:
        """Seconds per repeat, timed on the device."""
        raise NotImplementedError

    def phases(self) -> dict | None:
        return None


class Candidate:
    """One implementation of a conv layer, named by its id (`nnpack:wt8x8:precompute`, `tvm:default`).

    Records and plans store the id; `config` is what a stored record must match to be reused
    (knobs, a tuning budget). `fusible` lists the ops after the conv this kernel can absorb:
    the fusion rules read it, so a plan never asks a kernel for an epilogue it cannot compute.
    `prologue_fusible` lists the ops before it (a MaxPool, then a ReLU) its input stage computes.
    """

    impl: str
    tolerance: float = DEFAULT_TOLERANCE
    note: str = ""
    alias_of: str | None = None  # the implementation this one really runs (fp16 Winograd on x86)
    config: str = ""
    fusible: tuple[str, ...] = ("relu",)
    prologue_fusible: tuple[str, ...] = ()  # ops before the conv its input stage computes

    def why_not_fusible(self, fusion) -> str | None:
        """A sentence naming the fused ops this kernel cannot compute, or None."""
        after = [op for op in fusion.epilogue_ops if op not in self.fusible]
        before = [op for op in fusion.prologue_ops if op not in self.prologue_fusible]
        if not after and not before:
            return None
        parts = ([f"{'+'.join(before)} before the conv"] if before else []) + \
                ([f"{'+'.join(after)} after it"] if after else [])
        return f"{self.impl} cannot fuse {' or '.join(parts)}; measure it with the ops unfused"

    def why_not_applicable(self, layer: "Layer") -> str | None:
        """A sentence saying why this implementation cannot run the layer, or None."""
        return None

    def config_for(self, layer: "Layer | None" = None) -> str:
        """What a record of this candidate on `layer` must match to be reused (per layer when it chooses per layer)."""
        return self.config

    def tolerance_for(self, layer: "Layer") -> float:
        """The numerics tolerance on this layer (a candidate choosing its algorithm per layer varies it)."""
        return self.tolerance

    def knobs(self, layer: "Layer") -> Any:
        """The knobs this implementation uses on the layer (None: it has none)."""
        return None

    def setup(self, session, case: "ConvCase", device) -> Running:
        """Build or bind the kernel on the device, ready to run the case."""
        raise NotImplementedError

    def emit(self, bb, group: "ConvGroup", values: dict, weight: np.ndarray, bias: np.ndarray, target: dict):
        """Emit the conv group (the conv and the ops it absorbs) into a Relax BlockBuilder.

        `values` maps layer (and input) names to the Relax values emitted so far.
        """
        raise NotImplementedError

    def with_knobs(self, knobs: dict) -> "Candidate":
        """This implementation with some knobs set (a plan entry's `knobs`); only hand schedules have knobs."""
        raise KnobsError(f"{self.impl} has no knobs to set; drop 'knobs' from its plan entry")

    def check_knobs(self, layer: "Layer", fusion=None) -> None:
        """Raise a WorkbenchError naming the first knob that does not fit the layer."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.impl}>"
