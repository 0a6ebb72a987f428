"""The candidates of a study, and the candidate behind an implementation id (plans name ids).

Adding a kind of kernel: write its module in this package and list it in `all_candidates`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import WorkbenchError
from .base import Candidate


class UnknownImplementationError(WorkbenchError, ValueError):
    """An implementation id no candidate answers to."""


def library_candidates(threads: int = 1, machine: str | None = None) -> list[Candidate]:
    """NNPACK's algorithms x strategies and TVM's untuned conv: the libraries as they come.
    `machine` is the device's CPU (None: this one): it decides which NNPACK names are aliases."""
    from .default import DefaultCandidate
    from .nnpack import nnpack_candidates

    return nnpack_candidates(threads, machine) + [DefaultCandidate()]


def int8_candidates(threads: int = 1, calibration: dict | None = None) -> list[Candidate]:
    """QNNPACK's and TVM's int8 convs (`qnnpack:int8`, `tvm:int8`); never in a sweep unless asked for."""
    from .int8 import int8_candidates as make

    return make(threads, calibration)


def all_candidates(threads: int = 1, tuning_dir: str | Path | None = None, tuned_layers: list[str] | None = None,
                   trials: int | None = None, target: dict | None = None, emulated: bool = False,
                   machine: str | None = None, int8: bool = False) -> list[Candidate]:
    """NNPACK's algorithms x strategies, TVM's default, every hand schedule, and the tuned schedules:
    MetaSchedule's (`tvm:tuned`) and the knob tuner's (`tvm:hand_tuned`; with the `target`, only
    where its database has a trial of the conv's shape). With `int8`, the int8 kernels too."""
    from .hand import hand_candidates
    from .hand_tuned import HandTunedCandidate
    from .tuned import TunedCandidate

    tuned = [TunedCandidate(tuning_dir, tuned_layers, trials), HandTunedCandidate(tuning_dir, target, emulated)]
    return library_candidates(threads, machine) + hand_candidates() + tuned + (int8_candidates(threads) if int8 else [])


def find(impl: str, candidates: list[Candidate] | None = None) -> Candidate:
    """The candidate with this id among `candidates` (default: all_candidates()), or a clear error."""
    from .. import nnpack

    candidates = all_candidates() if candidates is None else candidates
    for candidate in candidates:
        if candidate.impl == impl:
            return candidate
    parts = str(impl).split(":")
    if parts[0] == "nnpack":
        raise UnknownImplementationError(
            f"unknown NNPACK implementation {impl!r}: use 'nnpack:<algorithm>:<strategy>' with an algorithm "
            f"of {list(nnpack.ALGORITHMS)} and a strategy of {list(nnpack.STRATEGIES)}")
    known = sorted({c.impl for c in candidates if not c.impl.startswith("nnpack:")})
    raise UnknownImplementationError(
        f"unknown implementation id {impl!r}; use 'nnpack:<algorithm>:<strategy>' (e.g. 'nnpack:wt8x8:precompute') "
        f"or one of {known}")
