"""The per-layer study: every applicable implementation of every conv, in one RPC session.

Implementations are the kernel layer's candidates (workbench/kernels), with ids such as
`nnpack:wt8x8:precompute` and `tvm:default`; each goes through the protocol in measure.py, and
every result becomes a record.
"""

from __future__ import annotations

import logging

import pandas as pd

from .fusion import Fusion
from .kernels.base import Candidate
from .measure import FINAL, ConvCase, Measurement, TimingConfig, measure, usable
from .model import Model
from .records import RecordStore
from .rpc import SessionKeeper, SessionLost, device_ok, hang_guard, short_reason

log = logging.getLogger(__name__)

KIND = "conv_measurement"
CRASH_LIMIT = 2  # sessions a candidate may lose before it is recorded `crashed`
PHASES = ("input_transform", "kernel_transform", "output_transform", "block_multiplication", "total")


def measure_one(model: Model, device, layer: str, candidate: Candidate, timing: TimingConfig = TimingConfig(),
                fusion: Fusion | None = None, seed: int = 0) -> dict:
    """One candidate on one layer through the protocol (not recorded).

    With `fusion`, the candidate computes those ops around the conv (the case's input is the
    pre-pool tensor, its reference the whole chain); the record names it in `fusion`.
    """
    if fusion is None:
        return compare(model, device, [layer], candidates=[candidate], timing=timing, progress=False, seed=seed)[0]
    conv = model.select_convs([layer])[0]
    case = ConvCase.from_model(model, conv, seed, fusion=fusion)
    threads = int(device.target.get("num-cores") or 1)
    context = {"model": model.name, "model_fingerprint": model.fingerprint, "device": device.describe(),
               "threads": threads, "fusion": fusion.label}
    with SessionKeeper(device) as sessions:
        return _record(_survive(candidate, case, sessions, device, timing), context, case)


# ---------------------------------------------------------------- the study

def compare(model: Model, device, layers: list[str] | None = None, candidates: list[Candidate] | None = None,
            timing: TimingConfig = TimingConfig(), store: RecordStore | None = None, resume: bool = True,
            seed: int = 0, progress: bool = True) -> list[dict]:
    """Measure every candidate (default: the libraries as they come) on every selected conv over
    RPC, surviving a dead session or server; returns the records.

    With a store and resume, records already measured (status in FINAL) are reused."""
    threads = int(device.target.get("num-cores") or 1)
    if candidates is None:
        from .kernels.registry import library_candidates

        candidates = library_candidates(threads)
    convs = model.select_convs(layers)
    # The name is the file's stem: two different files named small.onnx share it, so every record
    # also carries the model's content fingerprint, and only records with the same one are reused.
    fingerprint = model.fingerprint
    context = {"model": model.name, "model_fingerprint": fingerprint, "device": device.describe(), "threads": threads}
    wanted = {(l.name, c.impl): (l, c) for l in convs for c in candidates}
    # Records of another model with the same name, or of another target (an armv7 run in the same
    # work dir, say), are never reused here; records from before fingerprints are measured again.
    where = {"model": model.name, "model_fingerprint": fingerprint, "threads": threads,
             "device.target": device.target}
    done = store.latest(KIND, ("layer", "impl"), where) if store and resume else {}
    # A record is reused only if it is a measured result (not `failed`: a build error, or from
    # older runs a dead session) and its candidate is configured as when it was measured.
    results = {key: rec for key, rec in done.items()
               if key in wanted and rec.get("status") in FINAL and rec.get("config", "") == wanted[key][1].config}
    todo = [pair for key, pair in wanted.items() if key not in results]
    if todo:
        results.update(_measure_all(device, model, todo, timing, store, context, seed, progress))
    order = {key: i for i, key in enumerate(wanted)}
    return sorted(results.values(), key=lambda r: order[(r["layer"], r["impl"])])


def _measure_all(device, model, todo, timing, store, context, seed, progress) -> dict:
    from tqdm.auto import tqdm

    results, cases = {}, {}
    bar = tqdm(todo, desc="layers x implementations", disable=not progress, unit="run")
    with SessionKeeper(device) as sessions:
        for layer, candidate in bar:
            bar.set_postfix_str(f"{layer.name} {candidate.impl}")
            if layer.name not in cases:
                cases[layer.name] = ConvCase.from_model(model, layer, seed)
            result = _survive(candidate, cases[layer.name], sessions, device, timing)
            record = _record(result, context, cases[layer.name])
            if store:
                store.append(KIND, record)
            results[(layer.name, candidate.impl)] = record
    return results


def _survive(candidate, case: ConvCase, sessions: SessionKeeper, device, timing: TimingConfig) -> Measurement:
    """measure() in a live session; a lost session is revived and the candidate tried again.

    A candidate whose session dies CRASH_LIMIT times (a kernel that kills its process, or
    hangs past the session timeout) is recorded `crashed` with the reasons; a device that
    cannot be revived raises DeviceError, which stops the sweep with every record kept.
    """
    reasons = []
    while len(reasons) < CRASH_LIMIT:
        hung: list = []
        try:
            with hang_guard(device) as hung:
                result = measure(candidate, case, sessions.get(), device, timing)
            if hung:
                raise SessionLost("the guard ended the server")
            # A failure while the device died under it (an orphaned session process answering
            # for a dead server, say) is the device's, not the candidate's.
            if result.status != "failed" or device_ok(device):
                return result
            raise SessionLost(f"the device died while measuring ({result.note})")
        except SessionLost as err:
            reasons.append(f"no answer from the device within {hung[0]:.0f}s" if hung
                           else short_reason(err.__cause__ or err))
        # Outside the except block, so the dead session's remote objects can be collected.
        log.warning("%s on %s: session lost (%s); reviving the device", candidate.impl, case.layer.name, reasons[-1])
        sessions.lost()
    return Measurement(case.layer.name, candidate.impl, "crashed", numerics_ok=False, tolerance=candidate.tolerance,
                       alias_of=candidate.alias_of, config=candidate.config,
                       note=f"the device session died {len(reasons)} times measuring it: {reasons[-1]}"[:500])


def _record(result: Measurement, context: dict, case: ConvCase) -> dict:
    return {**context, **result.to_dict(), "flops": case.flops}


def table(records: list[dict]) -> pd.DataFrame:
    columns = ["layer", "impl", "status", "median_ms", "gflops", "numerics_ok", "max_abs_err", "note"]
    frame = pd.DataFrame(records)
    return frame[[c for c in columns if c in frame]] if len(frame) else pd.DataFrame(columns=columns)


def winners(records: list[dict]) -> pd.DataFrame:
    """Fastest implementation per layer among those whose numerics held (aliases left out)."""
    frame = pd.DataFrame(usable(records), columns=["layer", "impl", "median_ms", "gflops"])
    best = frame.loc[frame.groupby("layer", sort=False)["median_ms"].idxmin()]
    return best[["layer", "impl", "median_ms", "gflops"]].reset_index(drop=True)


def json_rows(records: list[dict]) -> list[dict]:
    keys = ("layer", "impl", "status", "median_ms", "gflops", "numerics_ok", "max_abs_err", "rel_err",
            "repeats_ms", "phases", "note", "alias_of")
    return [{k: r.get(k) for k in keys} for r in records]
