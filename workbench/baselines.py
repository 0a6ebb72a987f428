"""End-to-end peers of the hybrid: same model, same input, same thread count, checked first.

- ``onnxruntime``: CPU execution provider, intra-op threads = threads, inter-op 1, all graph
  optimizations.
- ``torch``: PyTorch eager with oneDNN (mkldnn) convolutions.
- ``torch_nnpack``: PyTorch with oneDNN off.  At batch 1 this is NOT NNPACK: desktop PyTorch
  uses NNPACK only for batch >= 16 (ConvUtils ``use_nnpack``), so batch-1 float32 convs run
  ``thnn_conv2d`` / ``_slow_conv2d_forward`` (im2col + GEMM).  The result's note names the
  conv kernel the profiler actually saw.
- ``nnpack_everywhere``: build_hybrid with every conv on ``nnpack:auto:precompute`` (``compute``
  where precompute does not apply) and ReLU fused: the Caffe2/NNPACK-style baseline.
- ``tvm_untuned``: TVM's own ONNX import (``model.relax_module``) compiled untouched with
  ``tvm.compile`` (its default CPU pipeline: legalize, no fusion, no schedules).

The peers (not TVM) run in this process; the TVM-built ones run on `device` over RPC when one
is given, else in this process.  In-process baselines are timed in interleaved rounds (one
repeat of each per round) so machine drift hits all alike; the RPC ones run back to back
right after, in one call.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import hybrid, stats
from .errors import WorkbenchError
from .build import build_hybrid, compile_hybrid
from .measure import TimingConfig
from .plan import Plan
from .model import Model, reference_output, sample_input, to_onnx

class BaselineError(WorkbenchError, ValueError):
    """An unknown peer."""


NAMES = ("onnxruntime", "torch", "torch_nnpack", "nnpack_everywhere", "tvm_untuned")


@dataclass
class Prepared:
    """A baseline ready to run: one call for the numerics check, one timed repeat."""

    name: str
    run: Callable[[], np.ndarray]
    repeat_ms: Callable[[], float]  # one repeat: mean ms per call over >= min_repeat_ms
    note: str = ""


def _python_repeat(fn: Callable[[], object], timing: TimingConfig) -> Callable[[], float]:
    """A repeat like TVM's evaluator: `number` calls, grown until one repeat lasts min_repeat_ms."""
    state = {"number": max(1, timing.number)}

    def repeat() -> float:
        while True:
            number = state["number"]
            start = time.perf_counter()
            for _ in range(number):
                fn()
            elapsed = time.perf_counter() - start
            if elapsed * 1e3 >= timing.min_repeat_ms or number >= 1 << 16:
                return elapsed * 1e3 / number
            state["number"] = max(number * 2, int(number * timing.min_repeat_ms / max(elapsed * 1e3, 1e-3)) + 1)

    return repeat


# ---------------------------------------------------------------- the peers (in process)

def _onnxruntime(model: Model, x: np.ndarray, threads: int, timing: TimingConfig) -> Prepared:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's defaults otherwise (its threads spin briefly after a run, as a user would have it);
    # the pause between interleaved repeats lets that spinning end before the next system runs.
    session = ort.InferenceSession(to_onnx(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {model.input_name: x}
    run = lambda: session.run(None, feed)[0]  # noqa: E731
    return Prepared("onnxruntime", run, _python_repeat(run, timing), f"onnxruntime {ort.__version__}, CPU EP")


def onnxruntime_conv(case, threads: int, timing: TimingConfig) -> dict:
    """ONNX Runtime running one conv layer alone (checked against the case's reference first)."""
    from .measure import check_numerics

    layer = dataclasses.replace(case.layer, inputs=("input",))
    single = Model(layer.name, [layer], {layer.name: (case.weight, case.bias)}, layer.input_shape)
    prepared = _onnxruntime(single, case.x, threads, timing)
    ok, err, _ = check_numerics(prepared.run(), case.reference, 1e-4)
    repeats = [prepared.repeat_ms() for _ in range(timing.repeat)]
    return {"layer": case.layer.name, "impl": "onnxruntime", "numerics_ok": ok, "max_abs_err": err,
            "median_ms": float(np.median(repeats)), "repeats_ms": repeats}


def _torch(model: Model, x: np.ndarray, threads: int, timing: TimingConfig, onednn: bool) -> Prepared:
    import torch

    from .model import torch_module

    torch.set_num_threads(threads)
    module, xt = torch_module(model), torch.from_numpy(x)

    def run():
        with torch.backends.mkldnn.flags(enabled=onednn), torch.inference_mode():
            return module(xt).numpy()

    name = "torch" if onednn else "torch_nnpack"
    return Prepared(name, run, _python_repeat(run, timing), f"torch {torch.__version__}; {_torch_conv_path(run)}")


def _torch_conv_path(run) -> str:
    """The ATen conv kernels the profiler sees in one run: what 'oneDNN off' really runs."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    keys = ("mkldnn", "nnpack", "slow_conv2d", "thnn_conv2d", "onednn")
    seen = sorted({e.name for e in prof.events() if any(k in e.name for k in keys) and "available" not in e.name})
    text = "conv kernels: " + (", ".join(seen) or "none of mkldnn/nnpack/slow_conv2d seen")
    if any("slow_conv2d" in s for s in seen):
        text += (" (slow_conv2d = im2col+GEMM, not NNPACK: PyTorch uses NNPACK only at batch >= 16, and "
                 "oneDNN at batch 1 only for 3x3 inputs above 20480 elements)")
    return text


# ---------------------------------------------------------------- TVM-built

def nnpack_everywhere_plan(model: Model) -> Plan:
    """Every conv NNPACK can run on NNPACK auto, precompute where it applies (compute otherwise), ReLU
    fused; a conv NNPACK cannot run (a grouped or depthwise conv) on TVM's default kernel, as a
    Caffe2+NNPACK deployment runs those on its own kernels."""
    from . import nnpack

    overrides, elsewhere = {}, []
    for conv in model.convs:
        if nnpack.why_not_applicable(conv.geometry, "auto", "compute") is not None:
            overrides[conv.name] = "tvm:default"
            elsewhere.append(conv.name)
            continue
        precompute_ok = nnpack.why_not_applicable(conv.geometry, "auto", "precompute") is None
        overrides[conv.name] = "nnpack:auto:precompute" if precompute_ok else "nnpack:auto:compute"
    plan = Plan.uniform(model, "nnpack:auto:precompute", overrides=overrides)
    plan.notes.append("nnpack_everywhere: NNPACK auto on every conv it can run, ReLU fused"
                      + (f"; {len(elsewhere)} conv(s) NNPACK cannot run (grouped) on tvm:default" if elsewhere else ""))
    return plan


def _tvm_executable(name: str, model: Model, target):
    import tvm

    from .model import relax_module

    if name == "nnpack_everywhere":
        plan = nnpack_everywhere_plan(model)
        return compile_hybrid(build_hybrid(model, plan, target), target), \
            f"build_hybrid, Relax FuseOps on; {plan.notes[-1]}"  # the note names convs NNPACK cannot run
    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    return tvm.compile(relax_module(model), target=target), \
        "TVM ONNX importer + tvm.compile default pipeline: no schedules, no fusion"


def _tvm_local(name: str, model: Model, x: np.ndarray, threads: int, timing: TimingConfig, target,
               executable=None, note: str = "") -> Prepared:
    import tvm

    if executable is None:
        executable, note = _tvm_executable(name, model, target)
    vm = hybrid.local_vm(executable, threads)
    dev, xt = tvm.cpu(), tvm.runtime.tensor(x)
    evaluator = vm.time_evaluator("main", dev, number=timing.number, repeat=1, min_repeat_ms=timing.min_repeat_ms)
    run = lambda: vm["main"](xt).numpy()  # noqa: E731
    return Prepared(name, run, lambda: evaluator(xt).results[0] * 1e3, note + "; in process")


# ---------------------------------------------------------------- measuring

def _result(name: str, check: dict, repeats: list[float], note: str) -> dict:
    return {"name": name, "median_ms": float(np.median(repeats)) if repeats else None,
            # On a shared machine the fastest repeat is the least disturbed one: keep it too.
            "min_ms": float(np.min(repeats)) if repeats else None,
            "repeats_ms": [float(r) for r in repeats], "numerics_ok": check["numerics_ok"],
            "max_abs_err": check["max_abs_err"], "rel_err": check["rel_err"], "note": note,
            **_interval(repeats)}


def _device_load(device) -> tuple[float, int] | None:
    """(1-minute load, cores) of the device (over a short session), else of this machine; None if unknown."""
    from .measure import device_load

    if device is not None:
        try:
            return device_load(device.session())
        except Exception:  # noqa: BLE001 - a probe that fails is no measurement's failure
            return None
    try:
        return os.getloadavg()[0], os.cpu_count() or 1
    except OSError:
        return None


def _flag_load(result: dict, loads: list) -> None:
    """Mark a result disturbed by "load" when the device's load exceeded its cores (measure.LOAD_MARGIN)."""
    from .measure import LOAD_MARGIN

    known = [load for load in loads if load]
    if not known:
        return
    result["load"] = [round(load, 2) for load, _ in known]
    if any(load > cores + LOAD_MARGIN for load, cores in known) and "load" not in result.get("disturbed_by", []):
        result["disturbed_by"] = [*result.get("disturbed_by", []), "load"]
        result["disturbed"] = True


def _interval(repeats: list[float]) -> dict:
    """The median's confidence interval and spread (stats.py); disturbed when the spread stays wide."""
    if not repeats:
        return {}
    figures = stats.summarize(repeats)
    wide = figures["spread"] > stats.SPREAD_LIMIT
    return {"ci_ms": figures["ci_ms"], "ci_coverage": figures["ci_coverage"], "spread": figures["spread"],
            "disturbed": wide, "disturbed_by": ["spread"] if wide else []}


def _prepare(name: str, model, x, threads, timing, target) -> Prepared:
    if name == "onnxruntime":
        return _onnxruntime(model, x, threads, timing)
    if name in ("torch", "torch_nnpack"):
        return _torch(model, x, threads, timing, onednn=(name == "torch"))
    return _tvm_local(name, model, x, threads, timing, target)


def _measure_interleaved(prepared: list[Prepared], reference, timing: TimingConfig,
                         cooldown_s: float = 0.2) -> list[dict]:
    """Check each once, then `repeat` rounds of one repeat per baseline (wrong ones still timed, flagged).

    Before each repeat: a pause, so the previous runtime's thread pool stops spin-waiting
    (TVM's pool, libgomp and NNPACK's pthreadpool all spin after a job; on 2 cores a spinning
    pool halves the next baseline's speed), then one untimed call to wake this runtime's pool.
    """
    checks = {p.name: hybrid.check_output(p.run(), reference) for p in prepared}
    repeats: dict[str, list[float]] = {p.name: [] for p in prepared}
    for p in prepared:
        p.repeat_ms()  # warm-up repeat, also settles `number`
    for round_ in range(timing.repeat):
        shift = round_ % max(1, len(prepared))  # rotate the order: nobody always runs after the same peer
        for p in prepared[shift:] + prepared[:shift]:
            time.sleep(cooldown_s)
            p.run()
            repeats[p.name].append(p.repeat_ms())
    return [_result(p.name, checks[p.name], repeats[p.name], p.note) for p in prepared]


def _measure_remote(name: str, model, x, reference, device, threads, timing, executable=None, note="") -> dict:
    if executable is None:
        executable, note = _tvm_executable(name, model, device.target)
    run = hybrid.run_remote(device, executable, x, reference=reference, timing=timing, threads=threads)
    ok = bool(run.get("nnpack_profile", {}).get("run")) or name != "nnpack_everywhere"
    note += f"; over RPC on {device.tracker}" + ("" if ok else "; WARNING: NNPACK profile empty")
    return _result(name, run, run["repeats_ms"], note)


def _warm_up(device, executable, x, threads: int) -> None:
    """One untimed run on the device first: right after a sweep, its processes are still settling,
    and the first model timed there ran up to 2x slower than the same model timed next."""
    hybrid.run_remote(device, executable, x, timing=TimingConfig(number=1, repeat=1, min_repeat_ms=200),
                      threads=threads)


def measure_baselines(model: Model, device, threads: int, timing: TimingConfig = TimingConfig(),
                      names: list[str] | None = None, x: np.ndarray | None = None,
                      extra: dict[str, object] | None = None) -> list[dict]:
    """Latency of each baseline (default: all of NAMES); each result: name, median_ms, min_ms,
    repeats_ms, numerics_ok, max_abs_err, rel_err, note.  Order follows `names`, then `extra`.

    `extra` maps a name to a compiled executable (e.g. a hybrid from hybrid.compile_hybrid),
    measured in the same run and the same way as the TVM-built baselines.
    """
    from .rpc import host_target

    names = list(names or NAMES)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise BaselineError(f"unknown baseline(s) {unknown}; choose from {list(NAMES)}")
    extra = dict(extra or {})
    x = sample_input(model) if x is None else x
    reference = reference_output(model, x, threads)
    tvm_built = ("nnpack_everywhere", "tvm_untuned", *extra)
    remote = [n for n in [*names, *extra] if device is not None and n in tvm_built]
    target = device.target if device is not None else host_target(threads)
    # Device runs first: the supplied models, then the baselines, untuned TVM (a second per run)
    # last, with a pause between sessions so a finishing session's teardown does not overlap the
    # next one's first repeats. The in-process peers come after: their thread pools (ONNX
    # Runtime's, PyTorch's OpenMP) stay busy for a while after they ran.
    results, first_named = {}, {}
    loads = [_device_load(device)]  # the device's load before and after: was the run disturbed?
    order = sorted(remote, key=lambda n: (n not in extra, n == "tvm_untuned"))
    if order and order[0] in extra:
        _warm_up(device, extra[order[0]], x, threads)
    for name in order:
        executable = extra.get(name)
        if executable is not None and id(executable) in first_named:  # one compiled model, one measurement
            same = first_named[id(executable)]
            results[name] = {**results[same], "name": name, "note": f"the same executable as {same}"}
            continue
        time.sleep(1.0)
        results[name] = _measure_remote(name, model, x, reference, device, threads, timing,
                                        executable, "supplied executable" if name in extra else "")
        if executable is not None:
            first_named[id(executable)] = name
    local = [_prepare(n, model, x, threads, timing, target) for n in names if n not in remote]
    local += [_tvm_local(n, model, x, threads, timing, target, ex, "supplied executable; in process")
              for n, ex in extra.items() if n not in remote]
    results.update({r["name"]: r for r in _measure_interleaved(local, reference, timing)})
    loads.append(_device_load(device))
    for result in results.values():
        _flag_load(result, loads)
    if device is None and os.environ.get("TVM_NUM_THREADS") not in (None, str(threads)):
        for name in tvm_built:
            if name in results:
                results[name]["note"] += f"; TVM's pool has TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']} threads"
    return [results[n] for n in [*names, *extra]]
