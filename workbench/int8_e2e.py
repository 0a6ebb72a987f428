"""Int8 end to end: the int8 hybrid against ONNX Runtime's static quantisation and PyTorch's
QNNPACK, in the same run as the float32 ONNX Runtime they are compared with.

Rows (`int8_end_to_end`): name, median_ms, ci_ms, repeats_ms, top1_agreement, max_rel_err,
numerics_ok, note.

- `top1_agreement`: on `inputs` (default 64) seeded random inputs, the share of argmaxes over
  the output's channel axis that match the float32 reference's (per pixel for a segmentation
  map); `top1_majority_share`: the share of float32's most common class, what a constant answer
  would agree on (the random-weight UNet answers class 0 on 99.99% of its pixels, so there its
  agreement is near 1 whatever the error); `max_rel_err`: the largest max |y - y_float32| / max |y_float32| over those inputs.
- `onnxruntime` (float32) and `onnxruntime_int8` (`quantize_static`: QDQ, per-channel int8
  weights, uint8 activations, MinMax calibration over the same calibration inputs as ours),
  each built, run and timed in a fresh process of its own (thread pools of different
  runtimes in one process slow each other: DESIGN.md).
- `torch_qnnpack`: the float reference module quantised with torch.ao FX graph mode
  (engine qnnpack, per-channel weights, the same calibration inputs), in its own process.
- `int8_hybrid`: every conv on the faster of `qnnpack:int8` / `tvm:int8` measured per layer
  with the model's calibration (the protocol in measure.py), the other ops in float32, built
  as one Relax model (quantise -> int8 kernel -> dequantise per conv) and run over RPC on the
  device. Its `numerics_ok` compares it with the exact simulated int8 model
  (quant.simulated_int8) on the first CHECK_INPUTS inputs. Each int8 kernel is checked to one
  output step per layer; end to end, the rare one-step differences (the kernel requantises in
  float32, the reference in float64) spread: measured on the reference UNet, 2e-6 of the
  elements differ after the second conv, 2.6% after the eighth and about half at the output,
  by 0.65 steps on average (max 7 steps). So the bound is on the mean: mean |hybrid - simulated|
  <= HYBRID_MEAN_TOLERANCE of max |simulated| (the UNet: 0.4%); the max is reported beside it.
  The peers' quantisations are their own (other rounding, other calibration rules): only
  their distance from float32 is reported, `numerics_ok` stays None.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

from . import quant, stats
from .errors import WorkbenchError
from .measure import TimingConfig
from .model import Model, sample_input, to_onnx

log = logging.getLogger(__name__)

EVAL_INPUTS = 64
EVAL_SEED = 7  # evaluation inputs; calibration uses quant.CALIBRATION_SEED
CHECK_INPUTS = 2  # inputs the hybrid is checked on against the simulated int8 model
HYBRID_MEAN_TOLERANCE = 0.01  # mean |hybrid - simulated int8| / max |simulated| (see above)
PEERS = ("onnxruntime", "onnxruntime_int8", "torch_qnnpack")


class Int8E2EError(WorkbenchError, ValueError):
    """A bad argument to the int8 end-to-end comparison."""


# ---------------------------------------------------------------- peers, each in its own process

def _python_repeats(fn, timing: TimingConfig) -> list[float]:
    """ms per call for each repeat, like TVM's evaluator: `number` grown until a repeat lasts min_repeat_ms."""
    fn()  # warm-up
    number, repeats = max(1, timing.number), []
    while len(repeats) < timing.repeat:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = (time.perf_counter() - start) * 1e3
        if elapsed < timing.min_repeat_ms and number < 1 << 16:
            number = max(number * 2, int(number * timing.min_repeat_ms / max(elapsed, 1e-3)) + 1)
            continue
        repeats.append(elapsed / number)
    return repeats


def _ort_session(model_bytes: bytes, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _ort_int8_bytes(model_bytes: bytes, input_name: str, calibration: list[np.ndarray]) -> bytes:
    """ONNX Runtime's static quantisation of the float model: QDQ, per-channel, MinMax calibration."""
    import os
    import tempfile

    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{input_name: x} for x in calibration])

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "int8.onnx")
        with open(src, "wb") as f:
            f.write(model_bytes)
        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        with open(dst, "rb") as f:
            return f.read()


def _torch_qnnpack(model: Model, calibration: list[np.ndarray]):
    """The float reference module, FX-quantised for QNNPACK (per-channel weights); returns a callable."""
    import torch
    from torch.ao.quantization import QConfig, QConfigMapping
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "qnnpack"
    qconfig = QConfig(activation=MinMaxObserver.with_args(dtype=torch.quint8),
                      weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8,
                                                                qscheme=torch.per_channel_symmetric))
    example = (torch.from_numpy(calibration[0]),)
    prepared = prepare_fx(_conv_modules(model), QConfigMapping().set_global(qconfig), example)
    with torch.no_grad():
        for x in calibration:
            prepared(torch.from_numpy(x))
    quantized = convert_fx(prepared)

    def run(x):
        with torch.inference_mode():
            return quantized(torch.from_numpy(x)).numpy()

    return run


def _conv_modules(model: Model):
    """The float reference with each conv as an nn.Conv2d (FX quantises modules; its functional
    conv path wants list strides, which the reference's F.conv2d calls do not pass)."""
    import torch

    from .model import torch_module
    from .names import symbol

    class ConvModules(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.reference = torch_module(model)  # the other ops, as the reference runs them
            self.convs = torch.nn.ModuleDict()
            for conv in model.convs:
                weight, bias = model.params[conv.name]
                module = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel, conv.stride, conv.pad,
                                         groups=conv.groups)
                module.weight.data, module.bias.data = torch.from_numpy(weight.copy()), torch.from_numpy(bias.copy())
                self.convs[symbol(conv.name)] = module

        def forward(self, x):
            values = {model.input_name: x}
            for layer in model.layers:
                args = [values[src] for src in layer.inputs]
                values[layer.name] = (self.convs[symbol(layer.name)](args[0]) if layer.op == "conv"
                                      else self.reference._run(layer, args))
            return values[model.output_name]

    return ConvModules().eval()


def _peer_in_process(name: str, model: Model, threads: int, timing: TimingConfig, calibration: list,
                     inputs: list, x: np.ndarray) -> dict:
    """Runs in a fresh process: build the peer, run every evaluation input, time it on `x`."""
    import os

    for var in ("OMP_NUM_THREADS", "TVM_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)
    if name == "torch_qnnpack":
        run = _torch_qnnpack(model, calibration)
        note = f"torch {torch.__version__} FX quantisation, engine qnnpack, per-channel weights"
    else:
        import onnxruntime as ort

        data = to_onnx(model).SerializeToString()
        if name == "onnxruntime_int8":
            data = _ort_int8_bytes(data, model.input_name, calibration)
            note = f"onnxruntime {ort.__version__} quantize_static: QDQ, per-channel int8, uint8 activations, MinMax"
        else:
            note = f"onnxruntime {ort.__version__}, float32, CPU EP"
        session = _ort_session(data, threads)
        run = lambda a: session.run(None, {model.input_name: a})[0]  # noqa: E731
    outputs = [np.asarray(run(a), np.float32) for a in inputs]
    repeats = _python_repeats(lambda: run(x), timing)
    return {"outputs": outputs, "repeats_ms": repeats, "note": note + "; in its own process"}


def run_peer(name: str, model: Model, threads: int, timing: TimingConfig, calibration: list, inputs: list,
             x: np.ndarray) -> dict:
    """One peer in a fresh (spawned) process, so no other runtime's thread pool shares it."""
    if name not in PEERS:
        raise Int8E2EError(f"unknown int8 peer {name!r}; choose from {list(PEERS)}")
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_peer_in_process, name, model, threads, timing, calibration, inputs, x).result()


# ---------------------------------------------------------------- the int8 hybrid

def int8_plan(model: Model, records: list[dict], candidates):
    """Every conv on its fastest usable int8 record (qnnpack:int8 where nothing else applies)."""
    from .measure import usable
    from .plan import Plan

    best: dict[str, dict] = {}
    for record in usable(records):
        if record["layer"] not in best or record["median_ms"] < best[record["layer"]]["median_ms"]:
            best[record["layer"]] = record
    missing = [c.name for c in model.convs if c.name not in best]
    if missing:
        log.warning("no usable int8 record for %s: they run qnnpack:int8", missing)
    overrides = {c.name: best[c.name]["impl"] for c in model.convs if c.name in best}
    plan = Plan.uniform(model, "qnnpack:int8", fuse=False, overrides=overrides, candidates=candidates)
    plan.elementwise = "relax"  # FuseOps merges each dequantise with the float ops and the next quantise
    plan.notes.append("int8 hybrid: per conv the faster of qnnpack:int8 and tvm:int8; other ops float32")
    if missing:  # the row's note carries it, and the row is not called correct
        plan.notes.append(f"UNCHECKED: {len(missing)} conv(s) had no int8 kernel that passed its check and run "
                          f"qnnpack:int8 anyway: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")
    return plan


def _hybrid_work(session, executable, inputs, x, timing, threads, export_kwargs, uses_qnnpack) -> dict:
    import tvm
    from tvm import relax

    from . import int8_device, nnpack_tvm
    from .rpc import upload

    session.get_function(int8_device.SET_THREADS)(threads)
    session.get_function(nnpack_tvm.SET_THREADS)(threads)
    if uses_qnnpack:  # TVM's pool sleeps between its kernels, so QNNPACK's threads get the cores
        session.get_function(nnpack_tvm.SHARE_CORES)()
    dev = session.cpu()
    vm = relax.VirtualMachine(upload(session, executable, "int8_hybrid.so", export_kwargs), dev)
    outputs = [vm["main"](tvm.runtime.tensor(a, dev)).numpy() for a in inputs]
    evaluator = vm.time_evaluator("main", dev, number=timing.number, repeat=timing.repeat,
                                  min_repeat_ms=timing.min_repeat_ms)
    repeats = [s * 1e3 for s in evaluator(tvm.runtime.tensor(x, dev)).results]
    return {"outputs": outputs, "repeats_ms": repeats}


def build_int8_hybrid(model: Model, plan, calibration: dict, target, threads: int):
    """The plan's int8 kernels (with the model's calibration) as one compiled Relax model."""
    from .build import build_hybrid, compile_hybrid
    from .kernels.int8 import int8_candidates

    candidates = int8_candidates(threads, calibration)
    return compile_hybrid(build_hybrid(model, plan, target, candidates), target)


def run_hybrid(device, executable, inputs, x, timing, threads, uses_qnnpack: bool) -> dict:
    return device.run(_hybrid_work, executable, inputs, x, timing, threads, device.export_kwargs(), uses_qnnpack)


# ---------------------------------------------------------------- the comparison

def _row(name: str, run: dict, references: list[np.ndarray], note: str, numerics_ok=None) -> dict:
    figures = stats.summarize(run["repeats_ms"])
    return {"name": name, "median_ms": figures["median_ms"], "ci_ms": figures["ci_ms"],
            "repeats_ms": [float(r) for r in run["repeats_ms"]],
            "top1_agreement": quant.top1_agreement(run["outputs"], references),
            # What always answering float32's most common class would score: agreement near it says little.
            "top1_majority_share": quant.majority_share(references),
            "max_rel_err": quant.max_rel_error(run["outputs"], references),
            "numerics_ok": numerics_ok, "note": note,
            "disturbed": figures["spread"] > stats.SPREAD_LIMIT,
            "disturbed_by": ["spread"] if figures["spread"] > stats.SPREAD_LIMIT else []}


def hybrid_numerics(model: Model, calibration: dict, outputs: list[np.ndarray], inputs: list[np.ndarray]) -> dict:
    """The hybrid's outputs against the exact simulated int8 model on the first CHECK_INPUTS inputs."""
    means, maxes = [], []
    for y, a in zip(outputs[:CHECK_INPUTS], inputs[:CHECK_INPUTS]):
        ref = quant.simulated_int8(model, calibration, a).astype(np.float64)
        diff, scale = np.abs(np.asarray(y, np.float64) - ref), float(np.max(np.abs(ref))) or 1.0
        means.append(float(diff.mean()) / scale)
        maxes.append(float(diff.max()) / scale)
    mean = max(means)
    return {"ok": bool(np.isfinite(mean) and mean <= HYBRID_MEAN_TOLERANCE), "mean_rel_err_vs_int8_reference": mean,
            "max_rel_err_vs_int8_reference": max(maxes)}


def measure_int8_layers(model: Model, device, calibration: dict, threads: int, timing: TimingConfig,
                        layers: list[str] | None = None, store=None) -> list[dict]:
    """qnnpack:int8 and tvm:int8 on every conv with the model's calibration, through the protocol,
    each measured on its real activations (the model run on a held-out input, seed EVAL_SEED)."""
    from .compare import compare
    from .kernels.int8 import int8_candidates

    samples = quant.conv_inputs(model, quant.model_inputs(model, 1, EVAL_SEED + 1)[0])
    return compare(model, device, layers, candidates=int8_candidates(threads, calibration, samples), timing=timing,
                   store=store, progress=False)


def int8_end_to_end(model: Model, device, threads: int, timing: TimingConfig = TimingConfig(),
                    inputs: int = EVAL_INPUTS, calibration_inputs: int = quant.CALIBRATION_INPUTS,
                    peers: tuple[str, ...] = PEERS, layer_records: list[dict] | None = None,
                    extra: dict | None = None, calibration: dict | None = None) -> list[dict]:
    """Float32 ONNX Runtime, the int8 peers and the int8 hybrid, measured in one run (rows above).

    `layer_records`: int8 per-layer records already measured with `calibration` (else they are
    measured here); `calibration` defaults to quant.calibrate_model on `calibration_inputs` seeded inputs. `extra`: name -> a compiled float32 executable (a float hybrid, say) run the
    same way as the int8 hybrid.
    """
    from .baselines import _device_load, _flag_load

    if inputs < 1 or calibration_inputs < 1:
        raise Int8E2EError(f"need at least one evaluation and one calibration input, got inputs={inputs}, "
                           f"calibration_inputs={calibration_inputs}")
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise Int8E2EError(f"unknown int8 peer(s) {unknown}; choose from {list(PEERS)}")
    loads = [_device_load(device)]  # the device's load before and after: was the run disturbed?
    calib_inputs = quant.model_inputs(model, calibration_inputs, quant.CALIBRATION_SEED)
    calibration = quant.calibrate_model(model, calib_inputs) if calibration is None else calibration
    eval_inputs = quant.model_inputs(model, inputs, EVAL_SEED)
    references = quant.float_outputs(model, eval_inputs)
    x = sample_input(model)
    records = layer_records if layer_records is not None else \
        measure_int8_layers(model, device, calibration, threads, timing)
    from .kernels.int8 import int8_candidates

    plan = int8_plan(model, records, int8_candidates(threads, calibration))
    chosen = {c.name: plan.impl(c.name) for c in model.convs}
    uses_qnnpack = any(impl == "qnnpack:int8" for impl in chosen.values())
    executable = build_int8_hybrid(model, plan, calibration, device.target, threads)
    rows = []
    for name, float_exe in (extra or {}).items():
        run = run_hybrid(device, float_exe, eval_inputs, x, timing, threads, False)
        rows.append(_row(name, run, references, "supplied float32 executable, over RPC"))
    run = run_hybrid(device, executable, eval_inputs, x, timing, threads, uses_qnnpack)
    check = hybrid_numerics(model, calibration, run["outputs"], eval_inputs)
    counts = {impl: list(chosen.values()).count(impl) for impl in sorted(set(chosen.values()))}
    note = (f"convs: {counts}; quantise -> int8 conv -> dequantise per conv, other ops float32; over RPC; "
            f"vs the simulated int8 model: mean rel err {check['mean_rel_err_vs_int8_reference']:.3g} "
            f"(bound {HYBRID_MEAN_TOLERANCE:g}), max {check['max_rel_err_vs_int8_reference']:.3g}")
    unchecked = [n for n in plan.notes if n.startswith("UNCHECKED")]
    row = _row("int8_hybrid", run, references, "; ".join([note, *unchecked]), check["ok"] and not unchecked)
    row["plan"] = chosen
    rows.append(row)
    for name in peers:
        try:
            run = run_peer(name, model, threads, timing, calib_inputs, eval_inputs, x)
        except Exception as err:  # noqa: BLE001 - one peer that cannot run must not stop the others
            text = str(err).strip().splitlines()
            rows.append({"name": name, "median_ms": None, "ci_ms": None, "repeats_ms": [], "top1_agreement": None,
                         "max_rel_err": None, "numerics_ok": False,
                         "note": f"failed: {type(err).__name__}: {text[-1] if text else ''}"[:300]})
            continue
        ok = bool(quant.max_rel_error(run["outputs"], references) <= 1e-3) if name == "onnxruntime" else None
        rows.append(_row(name, run, references, run["note"], ok))
    loads.append(_device_load(device))
    for row in rows:
        _flag_load(row, loads)
    return rows
