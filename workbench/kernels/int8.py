"""Int8 convolutions as candidates: PyTorch's QNNPACK (`qnnpack:int8`) and TVM's VNNI kernel (`tvm:int8`).

Both go through the one protocol (measure.py) over RPC like every other kernel, with two
differences the records show:

- the check is against the conv's own quantised reference (quant.reference_conv_q, exact
  integers), allowed off by quant.STEP_TOLERANCE output steps (the record's `tolerance`);
  `max_abs_err`/`rel_err` are that difference in real units. The distance of the dequantised
  output from the float32 conv is `quant_error`, reported beside the time.
- what is timed is the int8 conv proper: uint8 in -> uint8 out (int8 weights packed before,
  requantisation included). Quantising the float input and dequantising the output are
  elementwise ops of the model around it (they are in the end-to-end hybrid's time).

Scales: with a `calibration` (quant.calibrate_model, per conv name) the kernel uses the
model's, and `samples` (quant.conv_inputs on a held-out input) give each conv its real
activations as the measured input: a standard-normal input would be clipped by a post-ReLU
calibration and report an error that is the test input's, not int8's. Without a calibration
each measured case is calibrated on CALIBRATION_INPUTS seeded inputs drawn like (not equal to)
its measured input, so the measured input may clip slightly, as real data does.
"""

from __future__ import annotations

import json

import numpy as np

from .. import int8_device, int8_schedule, quant
from ..measure import TIME_GLOBAL_FUNC
from ..names import symbol
from .base import Candidate, Running

INT8_NOTE = "uint8 in -> uint8 out; checked to {steps} output step(s) of the quantised reference"


class Int8CalibrationError(quant.QuantError):
    """An int8 kernel emitted into a model without that model's calibration."""


class Int8Candidate(Candidate):
    """What both int8 kernels share: calibration, the quantised check, the float-in/float-out emit."""

    tolerance = float(quant.STEP_TOLERANCE)
    fusible: tuple[str, ...] = ()  # a ReLU stays a float op after the dequantise (its own kernel)

    def __init__(self, calibration: dict | None = None, samples: dict | None = None):
        self.calibration, self.samples = calibration, samples
        self.note = INT8_NOTE.format(steps=quant.STEP_TOLERANCE)
        if samples:
            self.note += "; measured on the model's activations at the conv"
        # A stored record is reused only under the same scales.
        self.config = f"model calibration {quant.digest(calibration)}" if calibration is not None else \
            f"per-case calibration: {quant.CALIBRATION_INPUTS} inputs, seed {quant.CALIBRATION_SEED}"

    def quant_for(self, case) -> quant.LayerQuant:
        if self.calibration is not None and case.layer.name in self.calibration:
            return self.calibration[case.layer.name]
        return quant.calibrate_case(case)

    def kernel_quant(self, lq: quant.LayerQuant) -> quant.LayerQuant:
        """The parameters handed to the kernel (the check always uses the calibrated ones)."""
        return lq

    def setup(self, session, case, device) -> Running:
        lq = self.quant_for(case)
        x, reference = case.x, case.reference
        sample = (self.samples or {}).get(case.layer.name)
        if sample is not None and sample.shape == case.x.shape:
            x, reference = sample, quant.float_conv(case.layer, sample, case.weight, case.bias)
        running = self.start(session, case, device, self.kernel_quant(lq), quant.quantize(x, lq.input))
        running.checker = lambda out: quant.check_against(out, x, reference, lq, case.layer)
        return running

    def start(self, session, case, device, lq, x_q) -> "Int8Running":
        raise NotImplementedError

    def emit(self, bb, group, values, weight, bias, target):
        """quantise (Relax ops) -> the int8 kernel -> dequantise: float32 in and out, like the layer."""
        from tvm import relax

        conv = group.conv
        if self.calibration is None or conv.name not in self.calibration:
            raise Int8CalibrationError(f"{self.impl} has no calibration for conv {conv.name!r}; build int8 models "
                                       "with workbench.int8_e2e (it calibrates every conv) or pass calibration=")
        lq = self.calibration[conv.name]
        x = values[group.source]
        scalar = lambda v: relax.const(np.float32(v))  # noqa: E731
        q = relax.op.add(relax.op.round(relax.op.divide(x, scalar(lq.input.scale))), scalar(lq.input.zero_point))
        q = bb.emit(relax.op.astype(relax.op.clip(q, quant.QMIN, quant.QMAX), "uint8"))
        y = bb.emit(self.emit_kernel(bb, conv, lq, q), symbol(f"{conv.name}_q"))
        real = relax.op.multiply(relax.op.subtract(relax.op.astype(y, "float32"), scalar(lq.output.zero_point)),
                                 scalar(lq.output.scale))
        return bb.emit(real, symbol(group.tail.name))

    def emit_kernel(self, bb, conv, lq, q):
        raise NotImplementedError


class Int8Running(Running):
    checker = None

    def own_check(self, out: np.ndarray) -> dict:
        return self.checker(out)


# ---------------------------------------------------------------- QNNPACK

class QNNPACKCandidate(Int8Candidate):
    """PyTorch's QNNPACK engine (`quantized::conv2d`), per-channel int8 weights, run on the device."""

    impl = "qnnpack:int8"

    def __init__(self, threads: int = 1, calibration: dict | None = None, samples: dict | None = None):
        super().__init__(calibration, samples)
        self.threads = threads
        self.note += "; torch quantized engine qnnpack, weights prepacked once, the call's two copies timed"

    def start(self, session, case, device, lq, x_q):
        return QNNPACKRunning(session, case.layer, lq, x_q, self.threads)

    def emit_kernel(self, bb, conv, lq, q):
        from tvm import relax

        # dtype given: relax.const turns float64 arrays into float32 by default.
        args = [q, *(relax.const(a, str(a.dtype)) for a in qnnpack_constants(lq)),
                *(relax.prim_value(int(v)) for v in (conv.stride, conv.pad, conv.groups))]
        return relax.call_dps_packed(int8_device.QNNPACK_CONV, args, relax.TensorType(conv.output_shape, "uint8"))


def qnnpack_constants(lq) -> list[np.ndarray]:
    """(w_q, bias, w_scales, qparams) as the device function takes them. The float bias is the
    int32 one times its scale, so QNNPACK's own rounding gives back exactly bias_q."""
    bias = (lq.bias_q.astype(np.float64) * lq.input.scale * lq.w_scales.astype(np.float64)).astype(np.float32)
    return [np.ascontiguousarray(lq.w_q), bias, lq.w_scales.astype(np.float32), lq.qparams_vector()]


class QNNPACKRunning(Int8Running):
    def __init__(self, session, layer, lq, x_q, threads: int):
        import tvm

        session.get_function(int8_device.SET_THREADS)(threads)
        dev = session.cpu(0)
        self.session = session
        self.out = tvm.runtime.empty(layer.output_shape, "uint8", dev)
        tensors = [x_q, *qnnpack_constants(lq)]
        self.args = ([tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in tensors]
                     + [int(layer.stride), int(layer.pad), int(layer.groups), self.out])

    def run_once(self) -> np.ndarray:
        self.session.get_function(int8_device.QNNPACK_CONV)(*self.args)  # also packs the weights
        return self.out.numpy()

    def time(self, timing) -> list[float]:
        timer = self.session.get_function(TIME_GLOBAL_FUNC)
        return json.loads(timer(int8_device.QNNPACK_CONV, timing.number, timing.repeat, timing.min_repeat_ms,
                                *self.args))


# ---------------------------------------------------------------- TVM

class TVMInt8Candidate(Int8Candidate):
    """TVM's int8 conv (int8_schedule): NCHW[4c], VNNI dot products where the target has them."""

    impl = "tvm:int8"

    def __init__(self, calibration: dict | None = None, knobs: dict | None = None, samples: dict | None = None):
        super().__init__(calibration, samples)
        self.fixed = dict(knobs or {})
        if self.fixed:
            self.config = (self.config + "; " if self.config else "") + \
                "knobs " + ", ".join(f"{k}={v}" for k, v in sorted(self.fixed.items()))

    def why_not_applicable(self, layer):
        return int8_schedule.why_not_applicable(layer.geometry)

    def knobs(self, layer, target=None):
        import dataclasses

        dot = "vnni" if target is None or int8_schedule.target_has_vnni(target) else "vector"
        return dataclasses.replace(int8_schedule.default_knobs(layer.geometry, dot), **self.fixed)

    def with_knobs(self, knobs: dict) -> "TVMInt8Candidate":
        return TVMInt8Candidate(self.calibration, {**self.fixed, **knobs}, self.samples)

    def check_knobs(self, layer, fusion=None) -> None:
        int8_schedule.validate(layer.geometry, self.knobs(layer))

    def prim_func(self, layer, lq, target):
        knobs = self.knobs(layer, target)
        func = int8_schedule.conv_int8_func(layer.geometry, lq.input.zero_point, lq.output.zero_point)
        return int8_schedule.schedule(func, layer.geometry, knobs)

    def start(self, session, case, device, lq, x_q):
        import tvm

        func = self.prim_func(case.layer, lq, device.target).with_attr("global_symbol", "conv")
        module = tvm.tirx.build(func, target=device.tvm_target())
        return TVMInt8Running(session, device, module, case.layer, lq, x_q)

    def emit_kernel(self, bb, conv, lq, q):
        from tvm import relax

        from .tvm_kernel import final_kernel

        target = getattr(self, "_target", None)
        name = symbol(f"conv_{conv.name}_int8")
        gv = bb.add_func(final_kernel(self.prim_func(conv, lq, target), name), name)
        args = [q, *(relax.const(a, str(a.dtype)) for a in tvm_constants(lq))]
        return relax.call_tir(gv, args, relax.TensorType(conv.output_shape, "uint8"))

    def emit(self, bb, group, values, weight, bias, target):
        self._target = target  # the schedule's dot product follows the build's target
        return super().emit(bb, group, values, weight, bias, target)


def tvm_constants(lq) -> list[np.ndarray]:
    return [int8_schedule.pack_weight(lq.w_q), int8_schedule.pack_bias(lq), int8_schedule.pack_multiplier(lq)]


class TVMInt8Running(Int8Running):
    def __init__(self, session, device, module, layer, lq, x_q):
        import tvm

        from ..rpc import upload

        self.remote = upload(session, module, "kernel_int8.so", device.export_kwargs())
        self.dev = session.cpu(0)
        self.out = tvm.runtime.empty(layer.output_shape, "uint8", self.dev)
        self.args = [tvm.runtime.tensor(np.ascontiguousarray(a), self.dev) for a in (x_q, *tvm_constants(lq))]
        self.args.append(self.out)

    def run_once(self) -> np.ndarray:
        self.remote["conv"](*self.args)
        return self.out.numpy()

    def time(self, timing) -> list[float]:
        evaluator = self.remote.time_evaluator("conv", self.dev, number=timing.number, repeat=timing.repeat,
                                               min_repeat_ms=timing.min_repeat_ms)
        return list(evaluator(*self.args).results)


def int8_candidates(threads: int = 1, calibration: dict | None = None,
                    samples: dict | None = None) -> list[Int8Candidate]:
    """QNNPACK's and TVM's int8 convs (not in the default sweep: opt in, e.g. compare(candidates=...))."""
    return [QNNPACKCandidate(threads, calibration, samples), TVMInt8Candidate(calibration, samples=samples)]
