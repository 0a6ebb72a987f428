"""The per-layer study: every applicable implementation of every conv, in one RPC session.

Implementations are the kernel layer's candidates (workbench/kernels), with ids such as
`nnpack:wt8x8:precompute` and `tvm:default`; each goes through the protocol in measure.py, and
every result becomes a record.
"""

from __future__ import annotations

import logging
import threading
import time

import pandas as pd

from . import interrupts, stats
from .fusion import Fusion
from .kernels.base import Candidate
from .measure import FINAL, ConvCase, Measurement, TimingConfig, measure, usable
from .model import Model
from .records import RecordStore
from .rpc import DeviceError, SessionKeeper, SessionLost, device_ok, hang_guard, short_reason

log = logging.getLogger(__name__)

KIND = "conv_measurement"
CRASH_LIMIT = 2  # sessions a candidate may lose before it is recorded `crashed`
STOP_WAIT_S = 30.0  # how long an interrupted farm waits for its workers' measurements in hand
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
        return _record(measure_surviving(candidate, case, sessions, device, timing), context, case)


# ---------------------------------------------------------------- the study

def record_context(model: Model, device) -> dict:
    """What every per-layer record says of where it was measured. Timings of an emulated device are
    labelled at the top of every record: never a board's speed."""
    return {"model": model.name, "model_fingerprint": model.fingerprint, "device": device.describe(),
            "threads": int(device.target.get("num-cores") or 1), "emulated": bool(getattr(device, "emulated", False))}


def compare(model: Model, device, layers: list[str] | None = None, candidates: list[Candidate] | None = None,
            timing: TimingConfig = TimingConfig(), store: RecordStore | None = None, resume: bool = True,
            seed: int = 0, progress: bool = True) -> list[dict]:
    """Measure every candidate (default: the libraries as they come) on every selected conv over
    RPC, surviving a dead session or server; returns the records.

    With a store and resume, records already measured (status in FINAL) are reused."""
    threads = int(device.target.get("num-cores") or 1)
    if candidates is None:
        from .kernels.registry import library_candidates

        candidates = library_candidates(threads, (getattr(device, "info", None) or {}).get("machine"))
    convs = model.select_convs(layers)
    # The name is the file's stem: two different files named small.onnx share it, so every record
    # also carries the model's content fingerprint, and only records with the same one are reused.
    fingerprint = model.fingerprint
    context = record_context(model, device)
    wanted = {(l.name, c.impl): (l, c) for l in convs for c in candidates}
    # Records of another model with the same name, or of another target (an armv7 run in the same
    # work dir, say), are never reused here; records from before fingerprints are measured again.
    where = {"model": model.name, "model_fingerprint": fingerprint, "threads": threads,
             "device.target": device.target}
    if context["emulated"]:
        where["emulated"] = True  # and a board's run never reuses an emulated one (below)
    done = store.latest(KIND, ("layer", "impl"), where) if store and resume else {}
    done = {key: rec for key, rec in done.items() if bool(rec.get("emulated")) == context["emulated"]}
    # A record is reused only if it is a measured result (not `failed`: a build error, or from
    # older runs a dead session) and its candidate is configured as when it was measured.
    results = {key: rec for key, rec in done.items()
               if key in wanted and rec.get("status") in FINAL and rec.get("config", "") == wanted[key][1].config_for(
                   wanted[key][0])}
    todo = [pair for key, pair in wanted.items() if key not in results]
    if todo:
        results.update(_measure_all(device, model, todo, timing, store, context, seed, progress))
    order = {key: i for i, key in enumerate(wanted)}
    return sorted(results.values(), key=lambda r: order[(r["layer"], r["impl"])])


def _measure_all(device, model, todo, timing, store, context, seed, progress) -> dict:
    """Measure `todo` on every server of the device's key at once: one worker, with its own
    session, per server (a farm); one server is measured in this thread. Each result is recorded
    as it comes, with the server that measured it."""
    from tqdm.auto import tqdm

    work = Work(model, todo, seed, store, context)
    with tqdm(total=len(todo), desc="layers x implementations", disable=not progress, unit="run") as bar:
        measure_work(work, device, timing, bar)
    return work.results


def measure_work(work: "Work", device, timing: TimingConfig, bar) -> None:
    """Measure a Work queue on the device: in this thread on one server, on every server at once on a farm."""
    workers = device.parallel_servers()
    if workers == 1:
        _worker(work, device, timing, bar)
    else:
        _farm(work, device, timing, bar, workers)


class Work:
    """The sweep's shared state: the queue of (layer, candidate), the cases, the results."""

    def __init__(self, model, todo, seed, store, context):
        self.model, self.seed, self.store, self.context = model, seed, store, context
        self.pending = list(todo)
        self.results: dict = {}
        self.cases: dict = {}
        self.stop = threading.Event()  # Ctrl-C, or a device that could not be revived
        self._lock = threading.Lock()

    def take(self):
        with self._lock:
            return None if self.stop.is_set() or not self.pending else self.pending.pop(0)

    def case(self, layer) -> ConvCase:
        with self._lock:  # one reference per layer (a PyTorch conv in float64), built once
            if layer.name not in self.cases:
                self.cases[layer.name] = ConvCase.from_model(self.model, layer, self.seed)
            return self.cases[layer.name]

    def keep(self, layer, candidate, result: Measurement, server: str | None) -> None:
        record = {**_record(result, self.context, self.case(layer)), "server": server}
        if self.store:
            self.store.append(KIND, record)  # one locked write per record: workers never interleave lines
        with self._lock:
            self.results[(layer.name, candidate.impl)] = record


def _worker(work: Work, device, timing: TimingConfig, bar, spare: bool = False) -> None:
    """One session (one server) measuring items from the queue until it is empty.

    A `spare` worker that gets no server (another client took it since it was counted free)
    leaves the work to the others instead of stopping the sweep."""
    with SessionKeeper(device) as sessions:
        try:
            sessions.get()
        except DeviceError as err:
            if not spare:
                raise
            log.warning("a farm worker got no server (%s); the others measure its share", short_reason(err))
            return
        while (item := work.take()) is not None:
            layer, candidate = item
            bar.set_postfix_str(f"{layer.name} {candidate.impl}", refresh=False)
            result = measure_surviving(candidate, work.case(layer), sessions, device, timing)
            work.keep(layer, candidate, result, sessions.server)
            bar.update(1)


def _farm(work: Work, device, timing: TimingConfig, bar, workers: int) -> None:
    """A worker thread per server (RPC calls release the GIL); the first error stops them all."""
    errors: list = []

    def run(spare: bool):
        try:
            _worker(work, device, timing, bar, spare)
        except BaseException as err:  # noqa: BLE001 - raised again in the calling thread
            errors.append(err)
            work.stop.set()

    log.info("measuring on %d servers at once", workers)
    threads = [threading.Thread(target=run, args=(i > 0,), name=f"farm-{i}", daemon=True) for i in range(workers)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)  # short joins: Ctrl-C reaches this thread
    except BaseException:
        work.stop.set()  # workers finish their measurement in hand; the cluster's end stops the rest
        deadline = time.monotonic() + STOP_WAIT_S  # bounded: records land before the work dir is released
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        raise
    if errors:
        raise errors[0]


def measure_surviving(candidate, case: ConvCase, sessions: SessionKeeper, device, timing: TimingConfig) -> Measurement:
    """measure() in a live session; a lost session is revived and the candidate tried again.

    A candidate whose session dies CRASH_LIMIT times (a kernel that kills its process, or
    hangs past the session timeout) is recorded `crashed` with the reasons; a device that
    cannot be revived raises DeviceError, which stops the sweep with every record kept.
    """
    reasons = []
    while len(reasons) < CRASH_LIMIT:
        hung: list = []
        try:
            session = sessions.get()
            with hang_guard(device, sessions.server) as hung:
                result = measure(candidate, case, session, device, timing)
            interrupts.check()  # a Ctrl-C inside the call may have come out as this "failure"
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
        interrupts.check()  # the session died of the Ctrl-C that reached the server too: stop, do not revive
        # Outside the except block, so the dead session's remote objects can be collected.
        log.warning("%s on %s: session lost (%s); reviving the device", candidate.impl, case.layer.name, reasons[-1])
        session = None
        sessions.lost()
    return Measurement(case.layer.name, candidate.impl, "crashed", numerics_ok=False,
                       tolerance=candidate.tolerance_for(case.layer), alias_of=candidate.alias_of,
                       config=candidate.config_for(case.layer),
                       note=f"the device session died {len(reasons)} times measuring it: {reasons[-1]}"[:500])


def _record(result: Measurement, context: dict, case: ConvCase) -> dict:
    return {**context, **result.to_dict(), "flops": case.flops}


def table(records: list[dict]) -> pd.DataFrame:
    columns = ["layer", "impl", "status", "median_ms", "ci_ms", "disturbed", "gflops", "numerics_ok", "max_abs_err",
               "note"]
    frame = pd.DataFrame(records)
    if len(frame):  # every row shows its interval (older records: from their repeats)
        frame["ci_ms"] = [_ci_text(r) for r in records]
    return frame[[c for c in columns if c in frame]] if len(frame) else pd.DataFrame(columns=columns)


def _ci_text(record: dict) -> str:
    ci = stats.interval(record) if record.get("median_ms") is not None else None
    return f"[{ci[0]:.3g}, {ci[1]:.3g}]" if ci else ""


def winners(records: list[dict]) -> pd.DataFrame:
    """Fastest implementation per layer among those whose numerics held (aliases left out), with its
    interval and whether it is `clear`: its interval lies below every other implementation's."""
    good = usable(records)
    frame = pd.DataFrame(good, columns=["layer", "impl", "median_ms", "gflops"])
    best = frame.loc[frame.groupby("layer", sort=False)["median_ms"].idxmin()]
    best = best[["layer", "impl", "median_ms", "gflops"]].reset_index(drop=True)
    # One interval per (layer, impl): its fastest record's (the slower ones written first, then overwritten).
    spans = {(r["layer"], r["impl"]): stats.interval(r) for r in sorted(good, key=lambda r: -r["median_ms"])}
    best["ci_lo_ms"] = [spans[(l, i)][0] for l, i in zip(best.layer, best.impl)]
    best["ci_hi_ms"] = [spans[(l, i)][1] for l, i in zip(best.layer, best.impl)]
    best["clear"] = [not any(stats.overlap(spans[(l, i)], span) for (other, impl), span in spans.items()
                             if other == l and impl != i) for l, i in zip(best.layer, best.impl)]
    return best


def json_rows(records: list[dict]) -> list[dict]:
    keys = ("layer", "impl", "status", "median_ms", "gflops", "numerics_ok", "max_abs_err", "rel_err",
            "repeats_ms", "ci_ms", "spread", "remeasured", "disturbed", "disturbed_by", "phases", "note", "alias_of",
            "server", "emulated")
    return [{k: r.get(k) for k in keys} for r in records]
