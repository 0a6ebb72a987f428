"""The knob tuner: an XGBoost-guided search over the hand schedules' knobs, with NNPACK's
algorithm and strategy as one more choice (the AutoTVM recipe).

For each distinct conv workload the space is every applicable hand schedule with every valid
combination of its knobs (schedules.knob_space, checked by schedules.validate_knobs before
anything is built), plus every NNPACK algorithm x strategy that applies. A search round:
1. score a pool of candidate points (random valid points of every schedule, the neighbours of
   the best measured ones, the NNPACK choices) with the cost model, an XGBoost regressor on the
   points' features (schedule, knobs, what they imply: accumulators, parallel tasks per
   thread) and the workload's (sizes, FLOPs), trained on every trial of this target;
2. take a batch: the best predicted, and a few at random (the model is not trusted blindly);
3. build it while the previous batch is measured, then measure it over RPC through the one
   protocol (numerics against the PyTorch reference first, then time; on every server of a
   farm at once), keep every trial in the per-target database, and refit.

One budget serves the whole model: every workload first gets its starting points (each
schedule's default knobs and NNPACK's Winograd), then each batch goes to the workload with the
largest expected gain in whole-model time: its best time x the convs that share it x the
improvement the model predicts there. The database (`<tuning dir>/<target>/knobs.jsonl`) makes
a re-run resume: trials already there count toward the budget and are never measured again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from . import depthwise, nnpack, schedules
from .compare import Work, measure_work
from .errors import WorkbenchError
from .kernels.base import Candidate, Running
from .kernels.hand import HandSchedule
from .kernels.nnpack import NNPACKCandidate
from .kernels.tvm_kernel import TVMCandidate
from .geometry import ConvGeometry
from .knob_records import KnobDatabase, geometry_dict, good, workload_key
from .measure import ConvCase, Measurement, TimingConfig
from .model import Layer, Model
from .tuning import TuneResult

log = logging.getLogger(__name__)

FIRST_NNPACK = ("wt8x8:precompute", "implicit_gemm:precompute", "direct:compute")  # NNPACK's starting point


@dataclass(frozen=True)
class KnobTuningConfig:
    """How the knob tuner searches; the defaults suit a 2-core host."""

    batch: int = 8  # points built and measured per round
    explore: float = 0.25  # share of each batch drawn at random from the pool
    samples: int = 200  # random valid points of each schedule scored per round
    min_fit: int = 8  # trials on the target before the cost model is trusted
    # A search ranks points: a wide trial is not timed again (its spread is kept; the study re-measures the best).
    timing: TimingConfig = field(default_factory=lambda: TimingConfig(number=1, repeat=3, min_repeat_ms=20,
                                                                      extra_rounds=0))
    build_timeout_s: float = 120.0  # one build; past it the point is recorded failed
    seed: int = 0
    nnpack: bool = True  # NNPACK's algorithm x strategy as points of the space
    overlap: bool = True  # build the next batch while this one is measured


# ---------------------------------------------------------------- points of the space

@dataclass(frozen=True)
class Point:
    """One choice for a conv: a hand schedule with its knobs, or an NNPACK algorithm:strategy."""

    impl: str  # "tvm:winograd_4", "nnpack:wt8x8:precompute"
    knobs: tuple = ()  # sorted (name, value) pairs; () for NNPACK

    @classmethod
    def hand(cls, schedule: str, knobs) -> "Point":
        values = dataclasses.asdict(knobs) if dataclasses.is_dataclass(knobs) else dict(knobs)
        return cls(f"tvm:{schedule}", tuple(sorted(values.items())))

    @property
    def key(self) -> str:
        return self.impl + (json.dumps(dict(self.knobs), sort_keys=True) if self.knobs else "")

    @property
    def is_nnpack(self) -> bool:
        return self.impl.startswith("nnpack:")

    @property
    def schedule(self) -> str:
        return self.impl.split(":", 1)[1]

    def knob_dict(self) -> dict:
        return dict(self.knobs)

    def candidate(self, threads: int) -> Candidate:
        if self.is_nnpack:
            _, algorithm, strategy = self.impl.split(":")
            return NNPACKCandidate(algorithm, strategy, threads)
        return HandSchedule(self.schedule, fixed=self.knob_dict())

    def label(self) -> str:
        knobs = ", ".join(f"{k}={v}" for k, v in self.knobs)
        return f"{self.impl} ({knobs})" if knobs else self.impl


class KnobSpace:
    """The points of one conv: its applicable hand schedules' knobs, and NNPACK's choices."""

    def __init__(self, layer: Layer, threads: int, with_nnpack: bool = True):
        self.layer, self.threads = layer, threads
        self.conv = schedules.ConvLayer.of(layer)
        self.schedules = [s for s in schedules.SCHEDULES if schedules.applicable(s, self.conv) is None]
        self.ranges = {s: schedules.knob_space(s, self.conv) for s in self.schedules}
        self.nnpack = [Point(c.impl) for c in _nnpack_choices(layer, threads)] if with_nnpack else []

    def default(self, schedule: str) -> Point:
        return Point.hand(schedule, schedules.default_knobs(schedule, self.conv))

    def starting_points(self) -> list[Point]:
        """Each schedule's default knobs (the hand-tuned start), then NNPACK's likeliest choice."""
        points = [self.default(s) for s in self.schedules]
        nnpack_first = next((p for pref in FIRST_NNPACK for p in self.nnpack if p.impl == f"nnpack:{pref}"),
                            self.nnpack[0] if self.nnpack else None)
        return points + ([nnpack_first] if nnpack_first else [])

    def valid(self, point: Point) -> bool:
        if point.is_nnpack:
            return point in self.nnpack
        knobs_type = schedules.knobs_class(point.schedule)
        try:
            schedules.validate_knobs(point.schedule, self.conv, knobs_type(**point.knob_dict()))
        except (schedules.KnobError, TypeError):
            return False
        return True

    def sample(self, rng: np.random.Generator, per_schedule: int) -> list[Point]:
        """Random valid points of every schedule (invalid draws are dropped, not built)."""
        points = []
        for schedule, ranges in self.ranges.items():
            for _ in range(per_schedule):
                knobs = {name: values[rng.integers(len(values))] for name, values in ranges.items()}
                point = Point.hand(schedule, {k: _plain(v) for k, v in knobs.items()})
                if self.valid(point):
                    points.append(point)
        return points

    def neighbours(self, point: Point) -> list[Point]:
        """The valid points one step away along one knob (the next smaller or larger value)."""
        if point.is_nnpack:
            return []
        ranges, knobs, found = self.ranges[point.schedule], point.knob_dict(), []
        for name, values in ranges.items():
            if knobs.get(name) not in values:
                continue
            at = values.index(knobs[name])
            for step in (-1, 1):
                if 0 <= at + step < len(values):
                    moved = Point.hand(point.schedule, {**knobs, name: _plain(values[at + step])})
                    if self.valid(moved):
                        found.append(moved)
        return found


def _plain(value):
    """numpy scalars from a draw back to Python's, so knobs compare and serialise as written."""
    return value.item() if hasattr(value, "item") else value


def _nnpack_choices(layer: Layer, threads: int) -> list[NNPACKCandidate]:
    """NNPACK's algorithm x strategy that apply to the layer. Left out: auto (it picks one of the
    others) and wt8x8_fp16, on every device: an alias of wt8x8 on x86, and on ARM an error (2e-2)
    beyond the whole model's bound, which no plan may choose (plan.PLAN_MAX_REL_ERR)."""
    chosen = []
    for algorithm in nnpack.ALGORITHMS:
        for strategy in nnpack.STRATEGIES:
            candidate = NNPACKCandidate(algorithm, strategy, threads)
            if algorithm not in ("auto", "wt8x8_fp16") and candidate.why_not_applicable(layer) is None:
                chosen.append(candidate)
    return chosen


# ---------------------------------------------------------------- the cost model

FAMILIES = schedules.SCHEDULES + tuple(f"nnpack:{a}" for a in nnpack.ALGORITHMS)
NUMERIC_KNOBS = ("oc_bn", "ow_bn", "ic_bn", "tile_bn", "vec")
CHOICE_KNOBS = {"parallel": tuple(dict.fromkeys(schedules.PARALLEL_DIRECT + schedules.PARALLEL_WINOGRAD)),
                "pad": tuple(dict.fromkeys(schedules.PAD_DIRECT + schedules.PAD_WINOGRAD)),
                "epilogue": tuple(dict.fromkeys(schedules.EPILOGUE_DIRECT + schedules.EPILOGUE_WINOGRAD)),
                "layout": depthwise.LAYOUTS}


def features(g: ConvGeometry, point: Point, threads: int) -> list[float]:
    """The point's knobs and what they imply, with the workload's sizes, as numbers (AutoTVM's knob features)."""
    knobs = point.knob_dict()
    family = point.impl.rsplit(":", 1)[0] if point.is_nnpack else point.schedule
    row = [float(family == f) for f in FAMILIES]
    row.append(float(point.impl.endswith(":precompute")))
    row += [math.log2(v) for v in (g.in_channels, g.out_channels, g.out_height, g.out_width, g.flops, g.groups)]
    row += [math.log2(knobs[k]) if k in knobs else -1.0 for k in NUMERIC_KNOBS]
    row.append(float(knobs["unroll_kw"]) if "unroll_kw" in knobs else -1.0)
    for name, choices in CHOICE_KNOBS.items():
        row += [float(knobs.get(name) == c) for c in choices]
    accumulators, tasks = _register_tile_and_tasks(g, point)
    row += [math.log2(accumulators), math.log2(tasks), _imbalance(tasks, threads)]
    return row


def _register_tile_and_tasks(g: ConvGeometry, point: Point) -> tuple[float, float]:
    """(vector accumulators of the register tile, iterations of its parallel loop: 1 when serial); 1, 1
    for NNPACK (its own threads: the family features tell it apart)."""
    if point.is_nnpack:
        return 1.0, 1.0
    k = point.knob_dict()
    blocks = g.out_channels / k["oc_bn"]
    if point.schedule == schedules.DEPTHWISE:  # one channel's row tile (nchw), or ow_bn x oc_bn (nchwc)
        tile = k["ow_bn"] * (k["oc_bn"] if k["layout"] == "nchwc" else 1) / k["vec"]
        loops = {"fused": blocks * g.out_height, "oc": blocks, "oh": g.out_height, "none": 1.0}
        return tile, loops[k["parallel"]]
    if point.schedule.startswith("direct"):
        tile = k["oc_bn"] * k["ow_bn"] / k["vec"]  # either layout: oc_bn x ow_bn outputs, vec per register
        loops = {"fused": blocks * g.out_height, "oc": blocks, "oh": g.out_height, "none": 1.0}
        return tile, loops[k["parallel"]]
    m = schedules.winograd_m(point.schedule)
    alpha2 = (m + 2) ** 2
    loops = {"fused": alpha2 * blocks, "eps": alpha2, "none": 1.0}  # the GEMM's parallel loop
    return k["oc_bn"] / k["vec"] * k["tile_bn"], loops[k["parallel"]]


def _imbalance(tasks: float, threads: int) -> float:
    """Threads idle at the end of the parallel loop, as a share (0: an even split)."""
    tasks = max(1, int(round(tasks)))
    return math.ceil(tasks / threads) * threads / tasks - 1.0


class CostModel:
    """XGBoost on log(time): trained on every trial of the target, so workloads teach each other."""

    def __init__(self, seed: int = 0):
        self.seed, self.booster = seed, None

    def fit(self, rows: list[list[float]], ms: list[float]) -> None:
        import xgboost

        # One thread: the device may share this host's cores, and a spinning pool would slow it.
        params = {"max_depth": 6, "eta": 0.15, "subsample": 0.9, "nthread": 1, "seed": self.seed,
                  "objective": "reg:squarederror"}
        data = xgboost.DMatrix(np.asarray(rows, dtype=np.float64), label=np.log(np.asarray(ms, dtype=np.float64)))
        self.booster = xgboost.train(params, data, num_boost_round=150)

    @property
    def fitted(self) -> bool:
        return self.booster is not None

    def predict_ms(self, rows: list[list[float]]) -> np.ndarray:
        import xgboost

        return np.exp(self.booster.predict(xgboost.DMatrix(np.asarray(rows, dtype=np.float64))))


# ---------------------------------------------------------------- building beside measuring

class QuietGate:
    """Keeps builds off the cores while a kernel is timed, when the device shares this host's cores.

    Builds overlap everything else (uploads, numerics checks, the model's refit). A kernel about
    to be timed goes first: the build in hand finishes, the next one waits. Every wait is
    bounded by the build timeout; a timing that ran out of patience is said to be disturbed.
    A remote device's timings are not disturbed by builds here, so the gate is then open.
    """

    def __init__(self, active: bool, wait_s: float):
        self.active, self.wait_s = active, wait_s
        self._cond = threading.Condition()
        self._timing = self._waiting = 0
        self._building = False

    @contextlib.contextmanager
    def timing(self):
        """Held while a kernel is timed; yields True if a build still ran beside it (the wait ran out)."""
        if not self.active:
            yield False
            return
        with self._cond:
            self._waiting += 1
            quiet = self._cond.wait_for(lambda: not self._building, timeout=self.wait_s)
            self._waiting -= 1
            self._timing += 1
        try:
            yield not quiet
        finally:
            with self._cond:
                self._timing -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def building(self):
        """Held while compiling: waits while a kernel is timed or waits to be (bounded)."""
        if not self.active:
            yield
            return
        with self._cond:
            self._cond.wait_for(lambda: self._timing == 0 and self._waiting == 0, timeout=self.wait_s)
            self._building = True
        try:
            yield
        finally:
            with self._cond:
                self._building = False
                self._cond.notify_all()


class NotBuilt(WorkbenchError):
    """A trial whose build was cancelled or never started: the tuner's doing, not the point's result."""


class BuildTicket:
    """One build on its way: when it started and finished, and the compiled kernel or the error."""

    def __init__(self):
        self._done = threading.Event()
        self.started = self.finished = None
        self.compiled, self.error, self.cancelled = None, None, False

    def start(self) -> None:
        self.started = time.perf_counter()

    def finish(self, compiled=None, error: BaseException | None = None) -> None:
        self.compiled, self.error, self.finished = compiled, error, time.perf_counter()
        self._done.set()

    def cancel(self) -> None:
        self.cancelled = True
        self._done.set()

    @property
    def build_s(self) -> float | None:
        return self.finished - self.started if self.started and self.finished else None

    def wait(self, timeout_s: float):
        """The compiled kernel. A build running past `timeout_s` is the point's own failure (raised as
        TimeoutError); one that never started within twice that, or was cancelled, raises NotBuilt."""
        asked = time.perf_counter()
        while not self._done.wait(0.2):
            now = time.perf_counter()
            if self.started is not None and now - self.started > timeout_s:
                raise TimeoutError(f"its build took longer than {timeout_s:.0f} s")
            if self.started is None and now - asked > 2 * timeout_s:
                raise NotBuilt(f"its build did not start within {2 * timeout_s:.0f} s")
        if self.cancelled:
            raise NotBuilt("its build was cancelled")
        if self.error is not None:
            raise self.error
        return self.compiled


class Builder:
    """A daemon thread compiling the next batch while this one is measured (TVM's lowering and LLVM run
    without the GIL for the most part; the measurement mostly waits on RPC). Never waited for at exit."""

    def __init__(self, device, gate: QuietGate):
        self.device, self.gate = device, gate
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="knob-build", daemon=True)
        self._thread.start()

    def submit(self, candidate: TVMCandidate, case) -> BuildTicket:
        ticket = BuildTicket()
        self._queue.put((ticket, candidate, case))
        return ticket

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            ticket, candidate, case = item
            if ticket.cancelled:
                continue
            with self.gate.building():
                build(ticket, candidate, case, self.device)

    def close(self, wait_s: float = 30.0) -> None:
        """Cancel the queued builds and let the thread end after the one in hand (waited for, bounded):
        a thread still inside TVM when the interpreter exits can abort the process."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        self._queue.put(None)
        self._thread.join(wait_s)


def build(ticket: BuildTicket, candidate: TVMCandidate, case, device) -> BuildTicket:
    ticket.start()
    try:
        ticket.finish(candidate.compile(case, device))
    except Exception as err:  # noqa: BLE001 - a build error is the point's result, raised where it is measured
        ticket.finish(error=err)
    return ticket


class _QuietRunning(Running):
    def __init__(self, running: Running, gate: QuietGate):
        self.running, self.gate = running, gate
        self.beside_build = False

    def run_once(self):
        return self.running.run_once()

    def phases(self):
        return self.running.phases()

    def time(self, timing):
        with self.gate.timing() as disturbed:
            self.beside_build = disturbed
            return self.running.time(timing)


class Trial(Candidate):
    """A point on its way through the protocol: built ahead (a ticket), then checked and timed."""

    def __init__(self, point: Point, task: "Task", inner: Candidate, ticket: BuildTicket | None, gate: QuietGate,
                 timeout_s: float):
        self.point, self.task, self.inner, self.ticket, self.gate, self.timeout_s = \
            point, task, inner, ticket, gate, timeout_s
        self.impl, self.tolerance, self.note = inner.impl, inner.tolerance, inner.note
        self.started = self.measuring = None  # when its turn came; when its kernel was ready (perf_counter)
        self.waited_s = 0.0  # for its build once its turn came (0: built in time)
        self.skipped = False  # not built (cancelled, never started): nothing to keep
        self.running: _QuietRunning | None = None

    def why_not_applicable(self, layer):
        return self.inner.why_not_applicable(layer)

    def setup(self, session, case, device) -> Running:
        self.started = time.perf_counter()
        if self.ticket is None:  # NNPACK: nothing to build
            inner = self.inner.setup(session, case, device)
        else:
            try:
                compiled = self.ticket.wait(self.timeout_s)  # a build error is raised here: a failed trial
            except NotBuilt:
                self.skipped = True
                raise
            finally:
                self.waited_s = time.perf_counter() - self.started
            inner = self.inner.running(session, case, device, compiled)
        self.measuring = time.perf_counter()
        self.running = _QuietRunning(inner, self.gate)
        return self.running

    def seconds(self) -> dict:
        """Where the trial's time went: its build (overlapped unless waited for) and its measurement."""
        return {"build_s": self.ticket.build_s if self.ticket else None, "waited_for_build_s": self.waited_s,
                "measure_s": time.perf_counter() - self.measuring if self.measuring else None,
                "timed_beside_build": bool(self.running and self.running.beside_build)}


# ---------------------------------------------------------------- the search

@dataclass
class Task:
    """One distinct workload: the convs that share it, its space, and its trials so far."""

    key: str
    layers: list[Layer]
    space: KnobSpace
    trials: dict[str, dict] = field(default_factory=dict)  # point key -> latest record
    in_flight: set = field(default_factory=set)
    exhausted: bool = False
    before: set = field(default_factory=set)  # point keys measured before this call
    starts: list = field(default_factory=list)  # its starting points

    def __post_init__(self):
        self.starts = self.space.starting_points()

    @property
    def layer(self) -> Layer:
        return self.layers[0]

    @property
    def best_ms(self) -> float:
        return min((r["median_ms"] for r in self.trials.values() if good(r)), default=math.inf)

    def best(self) -> dict | None:
        found = [r for r in self.trials.values() if good(r)]
        return min(found, key=lambda r: r["median_ms"]) if found else None

    def seen(self, point: Point) -> bool:
        return point.key in self.trials or point.key in self.in_flight


class KnobTuner:
    """The search over a model's convs; `run(budget)` measures until the budget (trials, old and new) is spent."""

    def __init__(self, model: Model, device, work_dir, layers: list[str] | None = None,
                 config: KnobTuningConfig = KnobTuningConfig(), progress: bool = True):
        self.model, self.device, self.config, self.progress = model, device, config, progress
        self.threads = int(device.target.get("num-cores") or 1)
        self.db = KnobDatabase(work_dir, device.target, getattr(device, "emulated", False), self.threads)
        self.rng = np.random.default_rng(config.seed)
        self.cost = CostModel(config.seed)
        self.tasks: dict[str, Task] = {}
        for layer in model.select_convs(layers):
            key = workload_key(layer)
            if key not in self.tasks:
                self.tasks[key] = Task(key, [], KnobSpace(layer, self.threads, config.nnpack))
            self.tasks[key].layers.append(layer)
        self.load()
        for task in self.tasks.values():
            task.before = set(task.trials)
        self.batch_number = 0
        self._cases: dict = {}
        self._case_lock = threading.Lock()

    def load(self) -> None:
        """Every trial of these shapes already in the database (resume; or after other runs added some).
        The database is read here only; trials measured later are added as they are kept."""
        self.training = self.db.trials()
        for record in self.training:
            if record.get("workload") in self.tasks:
                self.tasks[record["workload"]].trials[point_of(record).key] = record

    def case(self, layer: Layer):
        """The layer's case (seeded inputs, float64 reference), made once: the build and the check share it."""
        with self._case_lock:
            if layer.name not in self._cases:
                self._cases[layer.name] = ConvCase.from_model(self.model, layer, 0)
            return self._cases[layer.name]

    # -- what the search knows
    def spent(self) -> int:
        return sum(len(t.trials) for t in self.tasks.values())

    def estimate_ms(self) -> float:
        """The convs' time if each ran its workload's best point so far (inf while one has none)."""
        return sum(t.best_ms * len(t.layers) for t in self.tasks.values())

    def _refit(self) -> None:
        rows, times = [], []
        for record in self.training:  # every workload of the target teaches, other models' too
            if good(record) and record.get("geometry"):
                rows.append(features(ConvGeometry(**record["geometry"]), point_of(record), self.threads))
                times.append(record["median_ms"])
        if len(rows) >= self.config.min_fit:
            self.cost.fit(rows, times)

    # -- choosing the next batch
    def _pool(self, task: Task) -> list[Point]:
        space = task.space
        ranked = sorted((r for r in task.trials.values() if good(r)), key=lambda r: r["median_ms"])
        points = space.sample(self.rng, self.config.samples)
        for record in ranked[:5]:
            points += space.neighbours(point_of(record))
        points += space.nnpack
        unique = {p.key: p for p in points if not task.seen(p)}
        return list(unique.values())

    def propose(self, room: int) -> list[tuple[Task, Point]]:
        """The next batch (at most `room` points): starting points first, for every workload, then
        the workload with the largest expected gain. Empty while starting points are still measured
        (their times decide where the budget goes) or when every space is exhausted."""
        batch: list[tuple[Task, Point]] = []
        starting = {key: [p for p in t.starts if not t.seen(p)] for key, t in self.tasks.items()}
        count = {key: len(t.trials) + len(t.in_flight) for key, t in self.tasks.items()}
        while len(batch) < room and any(starting.values()):  # the workload with the fewest trials first
            key = min((k for k, points in starting.items() if points), key=count.get)
            batch.append((self.tasks[key], starting[key].pop(0)))
            count[key] += 1
        if batch or any(p.key in t.in_flight for t in self.tasks.values() for p in t.starts):
            return batch
        scored = {key: self._scored_pool(t) for key, t in self.tasks.items() if not t.exhausted}
        gains = {key: self._gain(self.tasks[key], pool) for key, pool in scored.items() if pool}
        if not gains:
            return []
        key = max(gains, key=gains.get)
        return [(self.tasks[key], p) for p in self._pick(scored[key], room)]

    def _scored_pool(self, task: Task) -> list[tuple[Point, float]]:
        pool = self._pool(task)
        if not pool:
            task.exhausted = True
            return []
        if not self.cost.fitted:
            return [(p, math.nan) for p in pool]
        predicted = self.cost.predict_ms([features(task.layer.geometry, p, self.threads) for p in pool])
        return sorted(zip(pool, predicted.tolist()), key=lambda pair: pair[1])

    def _gain(self, task: Task, pool: list[tuple[Point, float]]) -> float:
        """Expected whole-model ms saved: best x convs sharing it x predicted improvement."""
        best, predicted = task.best_ms, pool[0][1]
        if not math.isfinite(best):
            return 0.0  # every trial of it failed: last in line, never ahead of a shape that runs
        improvement = 0.5 if math.isnan(predicted) else max(0.0, 1.0 - predicted / best)
        return best * len(task.layers) * max(improvement, 0.01)  # never zero: the model can be wrong

    def _pick(self, pool: list[tuple[Point, float]], room: int) -> list[Point]:
        take = min(room, self.config.batch, len(pool))
        random_count = take if math.isnan(pool[0][1]) else int(round(take * self.config.explore))
        chosen = [p for p, _ in pool[:take - random_count]]
        rest = pool[take - random_count:]
        for i in self.rng.choice(len(rest), size=min(random_count, len(rest)), replace=False):
            chosen.append(rest[int(i)][0])
        return chosen

    # -- measuring
    def _trials(self, batch, builder: Builder | None, gate: QuietGate) -> list[tuple[Layer, Trial]]:
        items = []
        for task, point in batch:
            inner = point.candidate(self.threads)
            task.in_flight.add(point.key)
            ticket = None
            if not point.is_nnpack:
                case = self.case(task.layer)
                # Without overlap, built here and now, in the measuring thread.
                ticket = builder.submit(inner, case) if builder else build(BuildTicket(), inner, case, self.device)
            items.append((task.layer, Trial(point, task, inner, ticket, gate, self.config.build_timeout_s)))
        return items

    def _measure(self, items, bar) -> int:
        """Measure a batch; returns how many trials were kept."""
        before = self.spent()
        measure_work(_TrialWork(self, items), self.device, self.config.timing, bar)
        for _, trial in items:
            trial.task.in_flight.discard(trial.point.key)
        self.batch_number += 1
        self._refit()
        estimate = self.estimate_ms()
        if math.isfinite(estimate):  # the whole model's convs, each at its shape's best so far
            bar.set_description_str(f"knob tuning (convs ~{estimate:.3g} ms)", refresh=True)
        return self.spent() - before

    def run(self, budget: int) -> None:
        """Measure until the database holds `budget` trials of these workloads (resumes; Ctrl-C keeps every trial)."""
        from tqdm.auto import tqdm

        todo = max(0, budget - self.spent())
        if not todo:
            return
        gate = QuietGate(_shares_host(self.device), self.config.build_timeout_s)
        builder = Builder(self.device, gate) if self.config.overlap else None
        self._refit()
        next_batch = lambda in_flight: self._trials(  # noqa: E731 - the rest of the budget, a batch at most
            self.propose(min(budget - self.spent() - in_flight, self.config.batch)), builder, gate) \
            if budget - self.spent() - in_flight > 0 else []
        with tqdm(total=todo, desc="knob tuning", unit="trial", disable=not self.progress) as bar:
            try:
                current = next_batch(0)
                while current:
                    upcoming = next_batch(len(current))  # builds while `current` is measured
                    if not self._measure(current, bar):
                        raise TuningError(f"none of the last {len(current)} trials could be built or measured; "
                                          "check the log, then run the same command again to resume")
                    # Empty while starting points were still being measured: ask again now.
                    current = upcoming or next_batch(0)
            finally:
                if builder:
                    builder.close()

    def results(self, started: float, spent_before: int) -> list[TuneResult]:
        """One TuneResult per conv (convs of one shape share their workload's trials)."""
        seconds = time.perf_counter() - started
        new = self.spent() - spent_before
        rate = new / seconds * 60 if new and seconds > 0 else 0.0  # of the whole call: the budget is shared
        results = []
        for task in self.tasks.values():
            best, history = task.best(), _history(task.trials.values())
            fresh = len(set(task.trials) - task.before)
            for index, layer in enumerate(task.layers):  # a shape's new trials are counted on its first conv
                results.append(TuneResult(
                    layer.name, len(task.trials), fresh if index == 0 else 0, seconds, rate,
                    best["median_ms"] if best else None, history, _servers(task),
                    space="hand", best={"impl": best["impl"], "knobs": best.get("knobs", {})} if best else {}))
        return results


class TuningError(WorkbenchError):
    """The search cannot go on (nothing of a batch could be built or measured); what it kept stays kept."""


def _servers(task: "Task") -> dict[str, int]:
    """Server -> trials of this shape it measured in this call."""
    counts: dict[str, int] = {}
    for key, record in task.trials.items():
        if record.get("server") and key not in task.before:
            counts[record["server"]] = counts.get(record["server"], 0) + 1
    return counts


class _TrialWork(Work):
    """compare's queue of (layer, candidate), keeping each trial in the knob database."""

    def __init__(self, tuner: KnobTuner, items):
        super().__init__(tuner.model, items, 0, None, {})
        self.tuner = tuner

    def keep(self, layer, trial: Trial, result: Measurement, server: str | None) -> None:
        if trial.skipped:  # not built (cancelled by Ctrl-C, say): no result of the point's to keep
            return
        record = {**result.to_dict(), "workload": trial.task.key, "knobs": trial.point.knob_dict(),
                  "geometry": geometry_dict(layer.geometry), "flops": layer.geometry.flops,
                  "threads": self.tuner.threads, "server": server, "emulated": self.tuner.db.emulated,
                  "seed": self.tuner.config.seed, "batch": self.tuner.batch_number, **trial.seconds()}
        stored = self.tuner.db.add(record)
        with self._lock:
            trial.task.trials[trial.point.key] = stored
            self.tuner.training.append(stored)

    def case(self, layer):
        return self.tuner.case(layer)


def point_of(record: dict) -> Point:
    knobs = record.get("knobs") or {}
    return Point(record["impl"], tuple(sorted(knobs.items())))


def _history(records) -> list[tuple[int, float]]:
    """(trial index, best ms so far), one point per trial that improved the best, in measurement order."""
    history, best = [], math.inf
    for index, record in enumerate(records, start=1):
        if good(record) and record["median_ms"] < best:
            best = record["median_ms"]
            history.append((index, best))
    return history


def _shares_host(device) -> bool:
    """Whether the device's servers run on this host's cores (a local cluster, or a loopback tracker)."""
    return getattr(device, "local", None) is not None or device.tracker_host in ("127.0.0.1", "localhost", "::1")


# ---------------------------------------------------------------- entry points

def tune_knobs(model: Model, device, trials: int, work_dir, layers: list[str] | None = None,
               whole_model: bool = True, progress: bool = True,
               config: KnobTuningConfig = KnobTuningConfig()) -> list[TuneResult]:
    """Search the hand schedules' knobs (and NNPACK's choices) for the selected convs.

    whole_model: `trials` is one budget for all of them, spent where it pays; else each distinct
    workload gets `trials` of its own. Trials already in the database count (a re-run resumes).
    """
    started = time.perf_counter()
    tuner = KnobTuner(model, device, work_dir, layers, config, progress)
    before = tuner.spent()
    if whole_model:
        tuner.run(trials)
    else:  # each shape its own budget
        for task in tuner.tasks.values():
            KnobTuner(model, device, work_dir, [task.layer.name], config, progress).run(trials)
        tuner.load()
    results = tuner.results(started, before)
    log.info("knob tuning: %d new trials in %.1f s (%.1f trials/min); convs estimated at %.3f ms",
             tuner.spent() - before, time.perf_counter() - started,
             results[0].trials_per_minute if results else 0.0, tuner.estimate_ms())
    return results


