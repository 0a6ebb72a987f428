"""The per-layer study: every applicable implementation of every conv, in one RPC session.

Implementations are candidates with ids such as `nnpack:wt8x8:precompute`, `nnpack:direct:compute`
and `tvm:default`; each goes through the protocol in measure.py, and every result becomes a record.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd

from . import nnpack, nnpack_tvm
from .measure import TIME_GLOBAL_FUNC, Candidate, ConvCase, Measurement, Running, TimingConfig, measure
from .model import Layer, Model
from .records import RecordStore

log = logging.getLogger(__name__)

KIND = "conv_measurement"
PHASES = ("input_transform", "kernel_transform", "output_transform", "block_multiplication", "total")


def conv_shape(layer: Layer) -> nnpack.ConvShape:
    _, c, h, w = layer.input_shape
    return nnpack.ConvShape(c, layer.out_channels, h, w, layer.kernel, layer.kernel, layer.stride, layer.pad)


# ---------------------------------------------------------------- NNPACK on the device

class NNPACKCandidate(Candidate):
    def __init__(self, algorithm: str, strategy: str, threads: int):
        self.algorithm, self.strategy, self.threads = algorithm, strategy, threads
        self.impl = f"nnpack:{algorithm}:{strategy}"
        rtol, atol = nnpack.TOLERANCE[algorithm]
        self.tolerance = rtol + atol
        ran_as = nnpack.runs_as(algorithm)
        if ran_as != algorithm:
            self.note = f"runs as {ran_as} on this CPU (no FP16 arithmetic)"
            self.alias_of = f"nnpack:{ran_as}:{strategy}"

    def why_not_applicable(self, layer: Layer) -> str | None:
        try:
            return nnpack.why_not_applicable(conv_shape(layer), self.algorithm, self.strategy)
        except ValueError as err:  # shapes NNPACK cannot describe at all
            return str(err)

    def setup(self, session, case: ConvCase, device) -> Running:
        return NNPACKRunning(self, session, case)


class NNPACKRunning(Running):
    """The bridge's TVM global function, called and timed on the device by name."""

    def __init__(self, candidate: NNPACKCandidate, session, case: ConvCase):
        import tvm

        session.get_function(nnpack_tvm.SET_THREADS)(candidate.threads)
        dev = session.cpu(0)
        self.session, self.dev = session, dev
        self.name = nnpack_tvm.CONV2D_PREPACKED if candidate.strategy == "precompute" else nnpack_tvm.CONV2D
        shape = conv_shape(case.layer)
        # Names travel as NNPACK's codes: TVM RPC does not carry string arguments.
        attrs = [*shape.pad, shape.stride, nnpack.ALGORITHMS[candidate.algorithm]]
        if candidate.strategy != "precompute":
            attrs.append(nnpack.STRATEGY_CODES[candidate.strategy])
        attrs.append(nnpack.ACTIVATIONS["relu" if case.relu else "identity"])
        self.out = tvm.runtime.empty(shape.output_shape, "float32", dev)
        self.args = [tvm.runtime.tensor(a, dev) for a in (case.x, case.weight, case.bias)] + attrs + [self.out]

    def run_once(self) -> np.ndarray:
        # For precompute this first call transforms the kernel; timed calls reuse it.
        self.session.get_function(self.name)(*self.args)
        return self.out.numpy()

    def phases(self) -> dict:
        profile = json.loads(self.session.get_function(nnpack_tvm.LAST_PROFILE)())
        phases = {f"{k}_ms": v * 1e3 for k, v in profile.get("run", {}).items()}
        if "transform" in profile and self.name == nnpack_tvm.CONV2D_PREPACKED:
            phases["precompute_kernel_ms"] = profile["transform"]["total"] * 1e3
        return phases

    def time(self, timing: TimingConfig) -> list[float]:
        timer = self.session.get_function(TIME_GLOBAL_FUNC)
        return json.loads(timer(self.name, timing.number, timing.repeat, timing.min_repeat_ms, *self.args))


def nnpack_candidates(threads: int) -> list[NNPACKCandidate]:
    return [NNPACKCandidate(a, s, threads) for a in nnpack.ALGORITHMS for s in nnpack.STRATEGIES]


# ---------------------------------------------------------------- TVM kernels on the device

class TVMKernelCandidate(Candidate):
    """A compiled TVM kernel taking (x, weight-as-packed, bias, out) in NCHW."""

    def __init__(self, impl: str, build, tolerance: float = 1e-4, note: str = "", applies=None, config: str = ""):
        self.impl, self._build, self.tolerance, self.note = impl, build, tolerance, note
        self._applies, self.config = applies, config

    def why_not_applicable(self, layer: Layer) -> str | None:
        return self._applies(layer) if self._applies else None

    def setup(self, session, case: ConvCase, device) -> Running:
        return TVMRunning(session, case, device, *self._build(case, device))


class TVMRunning(Running):
    def __init__(self, session, case: ConvCase, device, module, func_name: str, weight: np.ndarray):
        import tvm

        from .rpc import upload

        self.remote = upload(session, module, "kernel.so", device.export_kwargs())
        self.dev, self.func_name = session.cpu(0), func_name
        self.out = tvm.runtime.empty(case.layer.output_shape, "float32", self.dev)
        self.args = [tvm.runtime.tensor(a, self.dev) for a in (case.x, weight, case.bias)] + [self.out]

    def run_once(self) -> np.ndarray:
        self.remote[self.func_name](*self.args)
        return self.out.numpy()

    def time(self, timing: TimingConfig) -> list[float]:
        evaluator = self.remote.time_evaluator(self.func_name, self.dev, number=timing.number,
                                               repeat=timing.repeat, min_repeat_ms=timing.min_repeat_ms)
        return list(evaluator(*self.args).results)


def default_conv_func(layer: Layer, relu: bool = False):
    """TVM's untuned conv: topi's NCHW compute, exactly what Relax legalises a conv2d into."""
    from tvm import te, topi

    _, c, h, w = layer.input_shape
    data = te.placeholder((1, c, h, w), "float32", name="data")
    weight = te.placeholder((layer.out_channels, c, layer.kernel, layer.kernel), "float32", name="weight")
    bias = te.placeholder((layer.out_channels,), "float32", name="bias")
    conv = topi.nn.conv2d_nchw(data, weight, layer.stride, layer.pad, 1)
    out = te.compute(conv.shape, lambda n, k, y, x: conv[n, k, y, x] + bias[k], name="bias_add")
    if relu:
        out = topi.nn.relu(out)
    return te.create_prim_func([data, weight, bias, out]).with_attr("global_symbol", "conv")


def _build_default(case: ConvCase, device):
    import tvm

    module = tvm.tirx.build(default_conv_func(case.layer, case.relu), target=device.tvm_target())
    return module, "conv", case.weight


def tvm_candidates() -> list[Candidate]:
    return [TVMKernelCandidate("tvm:default", _build_default, note="unscheduled topi conv2d_nchw")]


def schedule_layer(layer: Layer, relu: bool = False):
    """The schedules module's description of a model conv."""
    from . import schedules

    _, c, h, w = layer.input_shape
    return schedules.ConvLayer(layer.name, c, layer.out_channels, h, w, layer.kernel, layer.stride, layer.pad, relu)


def schedule_candidate(impl: str, knobs_for=None) -> TVMKernelCandidate:
    """A hand-written TensorIR schedule (schedules.py) with default knobs, or knobs_for(layer)."""
    from . import schedules

    def build(case: ConvCase, device):
        layer = schedule_layer(case.layer, case.relu)
        knobs = knobs_for(case.layer) if knobs_for else None
        built = schedules.build(impl, layer, knobs, target=device.tvm_target())
        return built.module, built.func_name, schedules.pack_weight(impl, layer, knobs, case.weight)

    winograd = impl.startswith("winograd")
    return TVMKernelCandidate(
        f"tvm:{impl}", build, tolerance=1e-3 if winograd else 1e-4,
        note="hand schedule, default knobs" if knobs_for is None else "hand schedule, chosen knobs",
        applies=lambda layer: schedules.applicable(impl, schedule_layer(layer)))


def schedule_step_candidate(impl: str, step: str, sch, knobs=None) -> TVMKernelCandidate:
    """One intermediate schedule (e.g. from schedules.steps) as a candidate, to time each step."""
    import tvm

    from . import schedules

    def build(case: ConvCase, device):
        module = tvm.tirx.build(sch.mod["main"].with_attr("global_symbol", "conv"), target=device.tvm_target())
        return module, "conv", schedules.pack_weight(impl, schedule_layer(case.layer, case.relu), knobs, case.weight)

    return TVMKernelCandidate(f"tvm:{impl}:{step}", build, tolerance=1e-3, note=step)


def measure_one(model: Model, device, layer: str, candidate: Candidate, timing: TimingConfig = TimingConfig()) -> dict:
    """One candidate on one layer through the protocol (not recorded)."""
    return compare(model, device, [layer], candidates=[candidate], timing=timing, progress=False)[0]


def schedule_candidates() -> list[TVMKernelCandidate]:
    from . import schedules

    return [schedule_candidate(impl) for impl in schedules.IMPLEMENTATIONS]


# ---------------------------------------------------------------- the study

def all_candidates(threads: int) -> list[Candidate]:
    return nnpack_candidates(threads) + tvm_candidates()


def compare(model: Model, device, layers: list[str] | None = None, candidates: list[Candidate] | None = None,
            timing: TimingConfig = TimingConfig(), store: RecordStore | None = None, resume: bool = True,
            seed: int = 0, progress: bool = True) -> list[dict]:
    """Measure every candidate on every selected conv in one RPC session; returns the records."""
    threads = int(device.target.get("num-cores") or 1)
    candidates = candidates if candidates is not None else all_candidates(threads)
    convs = model.select_convs(layers)
    context = {"model": model.name, "device": device.describe(), "threads": threads}
    wanted = {(l.name, c.impl): (l, c) for l in convs for c in candidates}
    done = store.latest(KIND, ("layer", "impl"), {"model": model.name, "threads": threads}) if store and resume else {}
    # A record is reused only if its candidate is configured as when it was measured.
    results = {key: rec for key, rec in done.items()
               if key in wanted and rec.get("config", "") == wanted[key][1].config}
    todo = [pair for key, pair in wanted.items() if key not in results]
    if todo:
        results.update(device.run(_measure_all, device, model, todo, timing, store, context, seed, progress))
    order = {key: i for i, key in enumerate(wanted)}
    return sorted(results.values(), key=lambda r: order[(r["layer"], r["impl"])])


def _measure_all(session, device, model, todo, timing, store, context, seed, progress) -> dict:
    from tqdm.auto import tqdm

    results, cases = {}, {}
    bar = tqdm(todo, desc="layers x implementations", disable=not progress, unit="run")
    for layer, candidate in bar:
        bar.set_postfix_str(f"{layer.name} {candidate.impl}")
        if layer.name not in cases:
            cases[layer.name] = ConvCase.from_model(model, layer, seed)
        result = measure(candidate, cases[layer.name], session, device, timing)
        record = _record(result, context, cases[layer.name])
        if store:
            store.append(KIND, record)
        results[(layer.name, candidate.impl)] = record
    return results


def _record(result: Measurement, context: dict, case: ConvCase) -> dict:
    return {**context, **result.to_dict(), "flops": case.flops}


def table(records: list[dict]) -> pd.DataFrame:
    columns = ["layer", "impl", "status", "median_ms", "gflops", "numerics_ok", "max_abs_err", "note"]
    frame = pd.DataFrame(records)
    return frame[[c for c in columns if c in frame]] if len(frame) else pd.DataFrame(columns=columns)


def winners(records: list[dict]) -> pd.DataFrame:
    """Fastest implementation per layer among those whose numerics held (aliases left out)."""
    frame = pd.DataFrame(records)
    usable = frame[(frame.status == "ok") & (frame.numerics_ok == True)]  # noqa: E712
    if "alias_of" in usable:
        usable = usable[usable.alias_of.isna()]
    best = usable.loc[usable.groupby("layer", sort=False)["median_ms"].idxmin()]
    return best[["layer", "impl", "median_ms", "gflops"]].reset_index(drop=True)


def json_rows(records: list[dict]) -> list[dict]:
    keys = ("layer", "impl", "status", "median_ms", "gflops", "numerics_ok", "max_abs_err", "rel_err",
            "repeats_ms", "phases", "note", "alias_of")
    return [{k: r.get(k) for k in keys} for r in records]
