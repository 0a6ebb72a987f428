"""MetaSchedule tuning of single convolutions, measured on a device through its RPC tracker.

One JSON database per target (`work_dir/<target-slug>/`) holds every layer's records, so tuning
is resumable: records already there count toward a layer's trial budget, and a second run with
the same budget measures nothing. The best record becomes a `tvm:tuned` candidate for compare.py.

Why a builder of our own: MetaSchedule's stock LocalBuilder imports `tvm.s_tir.tensor_intrin`
(about 30 s for its CUDA part) in a worker pool that is re-created for every batch, so every
candidate times out here. `InProcessBuilder` builds in this process with no such import.
(MetaSchedule's TuneContext still imports it once per process in the parent: ~20-35 s the
first time a process tunes anything.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import tvm_compat
from .kernels.default import default_conv_func
from .model import Layer, Model
from .names import symbol
from .rpc import DeviceError, SessionLost, is_transport_failure, runner_session, short_reason

log = logging.getLogger(__name__)



@dataclass
class TuneResult:
    layer: str
    trials: int  # records in the database for this workload, old and new
    new_trials: int  # measured by this call
    seconds: float  # wall time of this call
    trials_per_minute: float  # new trials per minute of this call (0 if none)
    best_ms: float | None
    history: list[tuple[int, float]] = field(default_factory=list)  # (trial index, best ms so far)
    servers: dict[str, int] = field(default_factory=dict)  # server (host:port) -> sessions it measured in this call
    space: str = "metaschedule"  # or "hand": the knob tuner (knob_tuning.py)
    best: dict = field(default_factory=dict)  # the knob tuner's best point: {"impl", "knobs"}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TuningConfig:
    """How candidates are searched and measured; the defaults suit a 2-core host."""

    trials_per_batch: int = 16  # candidates built and measured per search round
    # Evolutionary search: MetaSchedule's 512 candidates x 4 generations take ~35 s of cost-model
    # work per round on 2 cores, longer than measuring a batch; a smaller population keeps rounds short.
    population_size: int = 128
    genetic_num_iters: int = 2
    number: int = 1  # EvaluatorConfig: calls per repeat (raised until min_repeat_ms)
    repeat: int = 3
    min_repeat_ms: int = 20
    session_timeout_sec: int = 60  # per candidate: the server ends a session (a hung kernel) after this
    request_wait_sec: float = 10  # how long a runner waits for a server to be registered and free
    revivals: int = 2  # times a tuning run may lose its device (revived each time) before it stops
    builder: str = "in-process"  # or "pool": LocalBuilder with our build function
    seed: int | None = 0


# ---------------------------------------------------------------- where records live

def target_slug(target: dict) -> str:
    """A readable, file-safe name for a target dict, plus a hash so distinct targets never collide."""
    canonical = json.dumps(target, sort_keys=True)
    parts = [str(target.get("kind", "target"))]
    for key in ("mtriple", "mcpu", "mattr", "num-cores"):
        value = target.get(key)
        if value not in (None, "", []):
            text = "+".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            parts.append(f"{key}={text}" if key == "num-cores" else text)
    readable = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", "-".join(parts)).replace("=", "")
    return f"{readable}-{hashlib.sha1(canonical.encode()).hexdigest()[:8]}"


DATABASE_FILES = ("database_workload.json", "database_tuning_record.json")  # MetaSchedule's JSONDatabase


def database_dir(work_dir, target: dict) -> Path:
    return Path(work_dir) / target_slug(target)


def open_database(work_dir, target: dict):
    from tvm.s_tir import meta_schedule as ms

    path = database_dir(work_dir, target)
    path.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(path))


def workload(layer: Layer, relu: bool = False):
    """The IRModule MetaSchedule tunes and the database keys on (function "main", symbol "conv")."""
    return tvm_compat.normalize_mod(default_conv_func(layer, relu))


def records_of(database, mod) -> list:
    """This workload's records, fastest first (the database keeps them sorted); [] if never tuned."""
    if not database.has_workload(mod):
        return []
    # commit_workload returns the stored workload, the very object its records point to.
    wanted = database.commit_workload(mod)
    return [r for r in database.get_all_tuning_records() if r.workload.same_as(wanted)]


def record_ms(record) -> float | None:
    """Mean measured time of a record in ms, or None for a failed build or run."""
    return _mean_ms(record.run_secs)


def best_history(database, mod, directory) -> list[tuple[int, float]]:
    """(trial index, best ms so far), one point per trial that improved the best.

    Read from the record files because they are in measurement order; the database API returns
    records sorted by time.
    """
    if not database.has_workload(mod):
        return []
    history, best = [], math.inf
    runs = tvm_compat.tuning_history(directory, tvm_compat.workload_hash(database, mod))
    for trial, run_secs in enumerate(runs, start=1):
        ms = _mean_ms(run_secs)
        if ms is not None and ms < best:
            best = ms
            history.append((trial, ms))
    return history


def _mean_ms(run_secs) -> float | None:
    secs = [float(s) for s in (run_secs or [])]
    # MetaSchedule stores a failed build or run as FAILED_RUN_SECONDS: a marker, not a time.
    if not secs or min(secs) >= tvm_compat.FAILED_RUN_SECONDS / 10:
        return None
    return sum(secs) / len(secs) * 1e3


# ---------------------------------------------------------------- builder, runner, progress

def build_without_intrinsics(mod, target, _params=None):
    """MetaSchedule's default build minus the `tvm.s_tir.tensor_intrin` import (30 s of CUDA)."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.tirx.build(mod, target=target)


def _make_in_process_builder():
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_export

    @derived_object
    class InProcessBuilder(PyBuilder):
        """Builds each candidate here, one after another: no worker start-up per batch."""

        def build(self, build_inputs):
            results = []
            for item in build_inputs:
                if _INTERRUPTS:  # Ctrl-C: skip the rest of the batch; the device guard stops the search
                    results.append(BuilderResult(None, "InProcessBuilder: interrupted"))
                    continue
                try:
                    artifact = default_export(build_without_intrinsics(item.mod, item.target))
                    results.append(BuilderResult(artifact, None))
                except Exception as err:  # a bad candidate is a failed trial, not a failed tuning run
                    results.append(BuilderResult(None, f"InProcessBuilder: {type(err).__name__}: {err}"))
            return results

    return InProcessBuilder()


def make_builder(config: TuningConfig):
    from tvm.s_tir import meta_schedule as ms

    if config.builder == "in-process":
        return _make_in_process_builder()
    if config.builder == "pool":
        # Workers unpickle build_without_intrinsics by reference, importing workbench.tuning only.
        return ms.builder.LocalBuilder(f_build=build_without_intrinsics, max_workers=os.cpu_count() or 1,
                                       timeout_sec=60)
    raise ValueError(f"unknown builder {config.builder!r}; use 'in-process' or 'pool'")


def make_runner(device, config: TuningConfig, served_log: Path | None = None):
    """Measure on the device through its tracker, exactly like every other workbench timing.

    Sessions come from rpc.runner_session: MetaSchedule's own request waits forever for a
    server that died (and its worker retries a dead tracker every 5 s).
    """
    from tvm.s_tir import meta_schedule as ms

    rpc = ms.runner.RPCConfig(tracker_host=device.tracker_host, tracker_port=device.tracker_port,
                              tracker_key=device.key, session_timeout_sec=config.session_timeout_sec)
    evaluator = ms.runner.EvaluatorConfig(number=config.number, repeat=config.repeat,
                                          min_repeat_ms=config.min_repeat_ms, enable_cpu_cache_flush=False)
    worker_device = dataclasses.replace(device.plain(), session_timeout=config.session_timeout_sec)
    create = functools.partial(runner_session, worker_device, config.request_wait_sec,
                               str(served_log) if served_log else None)
    return ms.runner.RPCRunner(rpc_config=rpc, evaluator_config=evaluator, max_workers=device.parallel_servers(),
                               f_create_session=create)


def _make_device_guard(database, device, lost: list):
    """A measure callback, first in line: a batch that lost the device, or was interrupted, stops
    the search with only real results committed.

    Runner errors that say the transport failed, with the device then gone from its tracker,
    are not the candidates' results: the batch's other results are committed here, the lost
    ones dropped, and the search stops (SessionLost) so tune_layer can revive and resume.
    Transport-like errors while the device still serves were the candidates' own crashes and
    go through MetaSchedule's callbacks as failed trials. After a Ctrl-C every error of the
    batch is dropped (its workers got the signal too) and the search stops the same way.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.database import TuningRecord
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class DeviceGuard(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            if _INTERRUPTS:
                drop = [bool(r.error_msg) for r in runner_results]
            else:
                drop = [bool(r.error_msg) and is_transport_failure(RuntimeError(str(r.error_msg)))
                        for r in runner_results]
                if not any(drop) or device.alive(wait=3):
                    return
                reason = next(str(r.error_msg) for r, d in zip(runner_results, drop) if d)
                lost.append(short_reason(RuntimeError(reason)))
            context = task_scheduler.tasks_[task_id].ctx
            workload = database.commit_workload(context.mod)
            for candidate, result, dropped in zip(measure_candidates, runner_results, drop):
                if not dropped:  # measured, or failed on its own (a build error): a real trial
                    run_secs = result.run_secs if result.run_secs else [tvm_compat.FAILED_RUN_SECONDS]
                    database.commit_tuning_record(TuningRecord(candidate.sch.trace, workload, run_secs,
                                                               context.target, candidate.args_info))
            raise SessionLost("interrupted" if _INTERRUPTS else f"the device was lost while tuning: {lost[-1]}")

    return DeviceGuard()


# Signals noted while MetaSchedule's C++ runs: an exception raised by a signal handler inside
# it can end in std::terminate (a segfault, records lost), so the search stops at the next batch.
_INTERRUPTS: list[int] = []


@contextlib.contextmanager
def _interrupts_deferred():
    """SIGINT and SIGTERM are noted during the block and delivered, to their own handlers, after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, _frame: _INTERRUPTS.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        noted, _INTERRUPTS[:] = list(_INTERRUPTS), []
        for sig in dict.fromkeys(noted):
            if callable(previous[sig]):
                previous[sig](sig, None)  # raises KeyboardInterrupt (or the CLI's Terminated)
            elif previous[sig] == signal.SIG_DFL:
                signal.raise_signal(sig)


def _make_progress_callback(bar, best_so_far: list[float]):
    """A measure callback that moves the tqdm bar and shows the best time after every batch."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            for result in runner_results:
                secs = [float(s) for s in (result.run_secs or [])]
                if secs and not result.error_msg:
                    best_so_far[0] = min(best_so_far[0], sum(secs) / len(secs) * 1e3)
            bar.update(len(runner_results))
            if math.isfinite(best_so_far[0]):
                bar.set_postfix_str(f"best {best_so_far[0]:.4g} ms")

    return Progress()


# ---------------------------------------------------------------- tuning

def _warm_start(cost_model, context, records) -> None:
    """Train the cost model on the records a previous run left, so a resumed search is not blind."""
    if not records:
        return
    from tvm.s_tir.meta_schedule.runner import RunnerResult

    try:
        candidates = [r.as_measure_candidate() for r in records]
        cost_model.update(context, candidates, [RunnerResult(r.run_secs, None) for r in records])
    except Exception as err:  # tuning still works without it, just starts cold
        log.warning("could not warm-start the cost model from %d records: %s", len(records), err)


def tune_layer(layer: Layer, device, trials: int, work_dir, relu: bool = False, progress: bool = True,
               config: TuningConfig = TuningConfig()) -> TuneResult:
    """Tune default_conv_func(layer, relu) on the device until the database holds `trials` records."""
    started = time.perf_counter()
    database = open_database(work_dir, device.target)
    served = _served_log(database_dir(work_dir, device.target), layer.name)
    mod = workload(layer, relu)
    previous = records_of(database, mod)
    done = len(previous)
    todo = max(0, trials - done)
    revivals = 0
    while todo:
        try:
            _search(mod, layer.name, device, database, database_dir(work_dir, device.target), todo, previous,
                    progress, config, served)
            break
        except SessionLost as err:  # every record measured so far is in the database already
            revivals += 1
            kept = len(records_of(database, mod))
            if revivals > config.revivals:
                raise DeviceError(
                    f"tuning {layer.name} lost the device {revivals} times ({err}); the {kept} trials measured are "
                    f"kept in {database_dir(work_dir, device.target)}: check the device, then run the same "
                    "command again to resume") from None
            log.warning("tuning %s: %s; reviving the device and resuming from %d trials", layer.name, err, kept)
            device.revive()
        previous = records_of(database, mod)
        todo = max(0, trials - len(previous))
    records = records_of(database, mod)
    seconds = time.perf_counter() - started
    new = max(0, len(records) - done)
    history = best_history(database, mod, database_dir(work_dir, device.target))
    best = min((ms for ms in map(record_ms, records) if ms is not None), default=None)
    result = TuneResult(layer.name, len(records), new, seconds, new / seconds * 60 if new else 0.0, best, history,
                        _servers_in(served))
    log.info("tuned %s: %d new trials (%d total) in %.1f s, %.1f trials/min, best %s ms",
             layer.name, new, len(records), seconds, result.trials_per_minute, result.best_ms)
    return result


def _served_log(directory: Path, name: str) -> Path:
    """A fresh file where this call's runner workers note each session's server (farm runs)."""
    path = (Path(directory) / "logs" / f"{symbol(name)}.servers").resolve()  # a node name is not a path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    return path


def _servers_in(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            if line.strip():
                counts[line.strip()] = counts.get(line.strip(), 0) + 1
    except OSError:
        pass
    return counts


def _search(mod, name: str, device, database, logs: Path, todo: int, previous: list, progress: bool,
            config: TuningConfig, served: Path | None = None) -> None:
    from tqdm.auto import tqdm
    from tvm.s_tir import meta_schedule as ms

    target = device.tvm_target()
    threads = int(device.target.get("num-cores") or os.cpu_count() or 1)
    best = [math.inf]
    with tqdm(total=todo, desc=f"tune {name}", unit="trial", disable=not progress) as bar:
        strategy = ms.search_strategy.EvolutionarySearch(population_size=config.population_size,
                                                         genetic_num_iters=config.genetic_num_iters)
        context = ms.TuneContext(mod=mod, target=target, space_generator="post-order-apply",
                                 search_strategy=strategy, task_name=name, num_threads=threads,
                                 rand_state=-1 if config.seed is None else config.seed,
                                 logger=_task_logger(logs, name)).clone()
        cost_model = ms.cost_model.XGBModel(num_tuning_cores=threads, tree_method="auto")
        _warm_start(cost_model, context, previous)
        runner, lost = make_runner(device, config, served), []
        try:
            with _interrupts_deferred():
                try:
                    ms.tune_tasks(
                        tasks=[context], task_weights=[1.0], work_dir=str(logs), max_trials_global=todo,
                        num_trials_per_iter=min(todo, config.trials_per_batch),
                        builder=make_builder(config), runner=runner, database=database, cost_model=cost_model,
                        measure_callbacks=[_make_device_guard(database, device, lost),
                                           *ms.MeasureCallback.create("default"), _make_progress_callback(bar, best)],
                        task_scheduler="round-robin",
                    )
                except Exception:
                    if not _INTERRUPTS:  # else the end of the block delivers the interrupt itself
                        if lost:  # raised by the guard, wrapped on its way through MetaSchedule's C++
                            raise SessionLost(f"the device was lost while tuning: {lost[0]}") from None
                        raise
        finally:
            runner.pool.shutdown(wait=False)  # its worker must not outlive the search (or a Ctrl-C)


def _task_logger(directory: Path, name: str) -> logging.Logger:
    """A per-task log file next to the database.

    Not ms.logging.get_loggers_from_work_dir: its second call in one process for the same task
    name fails (AttributeError in _parameterize_config), which breaks resuming in a notebook.
    """
    path = (Path(directory) / "logs" / f"{symbol(name)}.log").resolve()  # a node name is not a path
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(f"{__name__}.task.{hashlib.sha1(str(path).encode()).hexdigest()[:12]}")
    if not any(getattr(h, "baseFilename", None) == str(path) for h in logger.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # per-trial detail goes to the file, not the notebook
    return logger


def tune_layers(model: Model, device, trials_per_layer: int, work_dir, layers: list[str] | None = None,
                relu: bool = False, progress: bool = True, config: TuningConfig = TuningConfig()) -> list[TuneResult]:
    """Tune each selected conv in turn; an interrupted run resumes from the database.

    relu=False tunes conv+bias, the workload compare.py measures; relu=True the fused variant.
    """
    return [tune_layer(layer, device, trials_per_layer, work_dir, relu=relu, progress=progress, config=config)
            for layer in model.select_convs(layers)]


# ---------------------------------------------------------------- using the results

def tune_model(model: Model, device, total_trials: int, work_dir, layers: list[str] | None = None,
               progress: bool = True, config: TuningConfig = TuningConfig()) -> list[TuneResult]:
    """Tune a model's convs within one trial budget, spending it where it pays.

    Tasks are the distinct conv workloads: layers of the same shape share one task and its
    records. Every task first gets one batch, so no layer is left with naive loops (a model is
    as fast as its least-tuned layer); after that each batch goes to the task with the most time
    left on the table, its best time so far times the number of layers that use it. Records
    already in the database count toward the budget, so a re-run resumes. One result per layer.
    """
    tasks: dict = {}  # geometry -> the layers of that shape
    for layer in model.select_convs(layers):
        tasks.setdefault(layer.geometry, []).append(layer)
    database = open_database(work_dir, device.target)
    done = {key: len(records_of(database, workload(members[0]))) for key, members in tasks.items()}
    results: dict[tuple, TuneResult] = {}

    def grant(key, trials):
        result = tune_layer(tasks[key][0], device, done[key] + trials, work_dir, progress=progress, config=config)
        done[key] = result.trials
        results[key] = result
        return result.new_trials

    batch = config.trials_per_batch
    for key in tasks:  # first, every task gets a batch
        left = total_trials - sum(done.values())
        if done[key] < batch and left > 0:
            grant(key, min(batch - done[key], left))
    while (left := total_trials - sum(done.values())) > 0:
        key = max(tasks, key=lambda k: _best_ms(database, tasks[k][0]) * len(tasks[k]))
        if grant(key, min(batch, left)) == 0:
            break  # the search space of the costliest task is exhausted
    return [_result_for(layer, results.get(key) or tune_layer(layer, device, done[key], work_dir, progress=False,
                                                               config=config))
            for key, members in tasks.items() for layer in members]


def _best_ms(database, layer: Layer) -> float:
    return min((ms for ms in map(record_ms, records_of(database, workload(layer))) if ms is not None),
               default=math.inf)


def _result_for(layer: Layer, result: TuneResult) -> TuneResult:
    """The task's result under this layer's name (layers of one shape share the task)."""
    return TuneResult(layer.name, result.trials, result.new_trials, result.seconds, result.trials_per_minute,
                      result.best_ms, result.history, result.servers)


def has_database(work_dir, target: dict) -> bool:
    """Whether work_dir holds a tuning database for `target` (checked without creating one)."""
    path = database_dir(work_dir, target)
    return all((path / name).is_file() for name in DATABASE_FILES)


def best_prim_func(layer: Layer, target: dict, work_dir, relu: bool = False):
    """The database's best schedule of this layer as a PrimFunc (data, weight OIHW, bias, out), or None."""
    import tvm

    if not has_database(work_dir, target):  # reading never creates a database
        return None
    database = open_database(work_dir, target)
    mod = workload(layer, relu)
    if not any(record_ms(r) is not None for r in records_of(database, mod)):
        return None
    schedule = database.query_schedule(mod, tvm.target.Target(target), workload_name="main")
    # Unlike the measuring builder, keep any weight-layout rewrite block, so the function takes
    # the weight as given (OIHW) and computes the right answer.
    return None if schedule is None else schedule.mod["main"]


def tuned_layers(model: Model, target: dict, work_dir) -> list[str]:
    """The convs of `model` with at least one usable tuning record for `target` under work_dir."""
    if not has_database(work_dir, target):
        return []
    database = open_database(work_dir, target)
    return [layer.name for layer in model.convs
            if any(record_ms(r) is not None for r in records_of(database, workload(layer)))]
