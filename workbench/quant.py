"""Int8 quantisation: calibration, the exact quantised reference, and the error against float32.

The scheme is the one QNNPACK, ONNX Runtime's QDQ and TVM's kernel here all implement:

- weights: symmetric int8, one scale per output channel (scale_k = max|w_k| / 127, zero point 0);
- activations: affine uint8 per tensor, scale and zero point from the [min, max] observed on a
  few seeded calibration inputs (the range always contains 0, so zero padding is exact);
- bias: int32 at scale in_scale * w_scale_k;
- the conv accumulates (x_q - zx) * w_q in int32, adds the bias and requantises with the
  float multiplier M_k = in_scale * w_scale_k / out_scale: y_q = clamp(round(acc * M_k) + zy, 0, 255).

An int8 kernel is checked against `reference_conv_q` (integers, computed exactly in float64:
every partial sum is an integer far below 2**53), allowed off by `STEP_TOLERANCE` output steps
(rounding of ties and float32 requantisation differ between libraries). Its distance from the
float32 conv is reported separately as `quant_error` (max |dequant(y_q) - y_float| / max |y_float|):
the price of int8, shown beside the time, never hidden in a tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import WorkbenchError

STEP_TOLERANCE = 1  # output quantisation steps an int8 kernel may differ from the quantised reference
CALIBRATION_INPUTS = 4  # seeded inputs a layer's activation ranges are observed on
CALIBRATION_SEED = 1234  # calibration inputs are drawn apart from the measured input (seed 0)
QMIN, QMAX = 0, 255  # uint8 activations
WMAX = 127  # symmetric int8 weights: [-127, 127]


class QuantError(WorkbenchError, ValueError):
    """Quantisation parameters or inputs that cannot work (a zero or negative scale, a bad shape)."""


@dataclass(frozen=True)
class QParams:
    """Affine uint8 quantisation of one tensor: real = scale * (q - zero_point)."""

    scale: float
    zero_point: int

    def __post_init__(self):
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise QuantError(f"an activation scale must be a positive number, got {self.scale!r}; "
                             "calibrate on inputs with a non-empty range")
        if not QMIN <= int(self.zero_point) <= QMAX:
            raise QuantError(f"a uint8 zero point must lie in [0, 255], got {self.zero_point!r}")

    @classmethod
    def from_range(cls, lo: float, hi: float) -> "QParams":
        """The uint8 parameters covering [lo, hi] widened to contain 0 (so padding with 0 is exact)."""
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        if not np.isfinite(lo) or not np.isfinite(hi):
            raise QuantError(f"cannot calibrate on a range with inf or nan ([{lo}, {hi}]); check the inputs")
        scale = (hi - lo) / (QMAX - QMIN) if hi > lo else 1.0
        return cls(float(scale), int(np.clip(round(QMIN - lo / scale), QMIN, QMAX)))


def quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    return np.clip(np.round(np.asarray(x, np.float64) / qp.scale) + qp.zero_point, QMIN, QMAX).astype(np.uint8)


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    return ((np.asarray(q, np.float64) - qp.zero_point) * qp.scale).astype(np.float32)


def weight_scales(weight: np.ndarray) -> np.ndarray:
    """Symmetric per-output-channel scales: max |w_k| / 127 (an all-zero channel gets scale 1)."""
    peak = np.abs(np.asarray(weight, np.float64)).reshape(weight.shape[0], -1).max(axis=1)
    return np.where(peak > 0, peak / WMAX, 1.0).astype(np.float32)


def quantize_weight(weight: np.ndarray, scales: np.ndarray) -> np.ndarray:
    shaped = np.asarray(scales, np.float64).reshape(-1, *([1] * (weight.ndim - 1)))
    return np.clip(np.round(np.asarray(weight, np.float64) / shaped), -WMAX, WMAX).astype(np.int8)


@dataclass
class LayerQuant:
    """Everything an int8 kernel of one conv needs: activation parameters, int8 weights, int32 bias."""

    input: QParams
    output: QParams
    w_scales: np.ndarray  # (K,) float32
    w_q: np.ndarray  # int8, the weight's shape
    bias_q: np.ndarray  # (K,) int32, at scale input.scale * w_scales

    @classmethod
    def from_ranges(cls, weight: np.ndarray, bias: np.ndarray, in_range, out_range) -> "LayerQuant":
        inp, out = QParams.from_range(*in_range), QParams.from_range(*out_range)
        scales = weight_scales(weight)
        bias_q = np.round(np.asarray(bias, np.float64) / (inp.scale * scales.astype(np.float64)))
        return cls(inp, out, scales, quantize_weight(weight, scales), bias_q.astype(np.int32))

    @property
    def multiplier(self) -> np.ndarray:
        """Per-channel requantisation multiplier in_scale * w_scale_k / out_scale (float32, as kernels use it)."""
        return (self.input.scale * self.w_scales.astype(np.float64) / self.output.scale).astype(np.float32)

    def qparams_vector(self) -> np.ndarray:
        """(in_scale, in_zp, out_scale, out_zp) as float64: how they travel to a device function."""
        return np.array([self.input.scale, self.input.zero_point, self.output.scale, self.output.zero_point],
                        np.float64)


def accumulate(x_q: np.ndarray, lq: LayerQuant, stride: int, pad: int, groups: int = 1) -> np.ndarray:
    """The int32 accumulator sum (x_q - zx) * w_q + bias_q, exactly (integers in float64)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.asarray(x_q, np.float64) - lq.input.zero_point)
    w = torch.from_numpy(lq.w_q.astype(np.float64))
    acc = F.conv2d(x, w, torch.from_numpy(lq.bias_q.astype(np.float64)), stride=stride, padding=pad, groups=groups)
    return acc.numpy()


def requantize(acc: np.ndarray, lq: LayerQuant) -> np.ndarray:
    m = lq.multiplier.astype(np.float64).reshape(1, -1, 1, 1)
    return np.clip(np.round(acc * m) + lq.output.zero_point, QMIN, QMAX).astype(np.uint8)


def reference_conv_q(x_q: np.ndarray, lq: LayerQuant, layer) -> np.ndarray:
    """The quantised conv's exact uint8 output: what an int8 kernel must reproduce (to a step)."""
    return requantize(accumulate(x_q, lq, layer.stride, layer.pad, layer.groups), lq)


def float_conv(layer, x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    out = F.conv2d(torch.from_numpy(np.asarray(x, np.float64)), torch.from_numpy(weight.astype(np.float64)),
                   torch.from_numpy(bias.astype(np.float64)), stride=layer.stride, padding=layer.pad,
                   groups=layer.groups)
    return out.numpy()


def calibration_inputs(shape, count: int = CALIBRATION_INPUTS, seed: int = CALIBRATION_SEED) -> list[np.ndarray]:
    """Seeded standard-normal inputs (the measured input comes from another seed: no peeking)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(tuple(shape)).astype(np.float32) for _ in range(count)]


def calibrate_layer(layer, weight: np.ndarray, bias: np.ndarray, inputs: list[np.ndarray]) -> LayerQuant:
    """Per-channel weight scales and the input/output ranges seen on `inputs` (float32 conv outputs)."""
    if not inputs:
        raise QuantError(f"calibrating {layer.name!r} needs at least one input; pass calibration inputs")
    outs = [float_conv(layer, x, weight, bias) for x in inputs]
    in_range = (min(float(x.min()) for x in inputs), max(float(x.max()) for x in inputs))
    out_range = (min(float(o.min()) for o in outs), max(float(o.max()) for o in outs))
    return LayerQuant.from_ranges(weight, bias, in_range, out_range)


def calibrate_case(case, count: int = CALIBRATION_INPUTS, seed: int = CALIBRATION_SEED) -> LayerQuant:
    """A measured ConvCase's calibration: its layer on `count` inputs drawn like (not equal to) its own."""
    return calibrate_layer(case.layer, case.weight, case.bias, calibration_inputs(case.x.shape, count, seed))


def check_against(out_q: np.ndarray, x: np.ndarray, case_float_ref: np.ndarray, lq: LayerQuant, layer,
                  tolerance: float = STEP_TOLERANCE) -> dict:
    """An int8 kernel's uint8 output against its quantised reference (for x quantised with lq.input),
    and its distance from float32.

    ok: at most `tolerance` output steps from the quantised reference. max_abs_err / rel_err: that
    difference in real units (and over max |reference|). quant_error: max |dequant(out) - float32| /
    max |float32|, the error int8 costs.
    """
    ref_q = reference_conv_q(quantize(x, lq.input), lq, layer)
    if out_q.shape != ref_q.shape:
        return {"ok": False, "max_abs_err": float("inf"), "rel_err": float("inf"), "quant_error": None,
                "steps": None, "note": f"output shape {out_q.shape}, expected {ref_q.shape}"}
    steps = int(np.max(np.abs(out_q.astype(np.int32) - ref_q.astype(np.int32))))
    ref = dequantize(ref_q, lq.output).astype(np.float64)
    err = steps * lq.output.scale
    ok = steps <= tolerance
    note = "" if ok else (f"int8 output differs from its quantised reference by {steps} steps "
                          f"(> {tolerance:g}): wrong scales, zero points or kernel")
    return {"ok": ok, "max_abs_err": float(err), "rel_err": float(err / (np.max(np.abs(ref)) or 1.0)),
            "quant_error": quant_error(dequantize(out_q, lq.output), case_float_ref), "steps": steps, "note": note}


def quant_error(y: np.ndarray, float_ref: np.ndarray) -> float:
    """max |y - float_ref| / max |float_ref|."""
    y, ref = np.asarray(y, np.float64), np.asarray(float_ref, np.float64)
    return float(np.max(np.abs(y - ref)) / (float(np.max(np.abs(ref))) or 1.0))


# ---------------------------------------------------------------- whole models

def _walk(model, module, x, on_conv=None):
    """Run the float reference layer by layer (torch_module's ops); `on_conv(layer, input, output)`
    may return a replacement output (the quantised conv of the simulated int8 model)."""
    import torch

    values = {model.input_name: torch.from_numpy(np.asarray(x, np.float32))}
    with torch.no_grad():
        for layer in model.layers:
            args = [values[src] for src in layer.inputs]
            out = module._run(layer, args)
            if on_conv is not None and layer.op == "conv":
                replaced = on_conv(layer, args[0].numpy(), out.numpy())
                out = out if replaced is None else torch.from_numpy(np.asarray(replaced, np.float32))
            values[layer.name] = out
    return values[model.output_name].numpy()


def model_inputs(model, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(model.input_shape).astype(np.float32) for _ in range(count)]


def calibrate_model(model, inputs: list[np.ndarray] | None = None, count: int = CALIBRATION_INPUTS,
                    seed: int = CALIBRATION_SEED) -> dict[str, LayerQuant]:
    """Every conv's LayerQuant from the activations seen on seeded calibration inputs (float32 model)."""
    from .model import torch_module

    inputs = model_inputs(model, count, seed) if inputs is None else inputs
    if not inputs:
        raise QuantError("calibrating a model needs at least one input")
    seen: dict[str, list[float]] = {}

    def observe(layer, x, y):
        lo_in, hi_in, lo_out, hi_out = seen.get(layer.name, [np.inf, -np.inf, np.inf, -np.inf])
        seen[layer.name] = [min(lo_in, x.min()), max(hi_in, x.max()), min(lo_out, y.min()), max(hi_out, y.max())]

    module = torch_module(model)
    for x in inputs:
        _walk(model, module, x, observe)
    return {conv.name: LayerQuant.from_ranges(*model.params[conv.name], seen[conv.name][:2], seen[conv.name][2:])
            for conv in model.convs}


def digest(calibration: dict[str, LayerQuant]) -> str:
    """A short hash of a model calibration's scales and zero points (records name it in `config`)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(calibration):
        lq = calibration[name]
        h.update(name.encode() + lq.qparams_vector().tobytes() + lq.w_scales.astype(np.float32).tobytes())
    return h.hexdigest()[:12]


def conv_inputs(model, x: np.ndarray) -> dict[str, np.ndarray]:
    """Each conv's float32 input when the model runs on `x`: a layer's realistic activations."""
    from .model import torch_module

    seen: dict[str, np.ndarray] = {}

    def keep(layer, inp, _out):
        seen[layer.name] = inp.copy()

    _walk(model, torch_module(model), x, keep)
    return seen


def simulated_int8(model, calibration: dict[str, LayerQuant], x: np.ndarray) -> np.ndarray:
    """The int8 model's exact output: every conv quantises its input, runs the integer conv and
    dequantises; the other ops run in float32 as in the hybrid."""
    from .model import torch_module

    def conv_q(layer, inp, _out):
        lq = calibration[layer.name]
        return dequantize(reference_conv_q(quantize(inp, lq.input), lq, layer), lq.output)

    return _walk(model, torch_module(model), x, conv_q)


def float_outputs(model, inputs: list[np.ndarray]) -> list[np.ndarray]:
    from .model import torch_module

    module = torch_module(model)
    return [_walk(model, module, x) for x in inputs]


def top1_agreement(outputs: list[np.ndarray], references: list[np.ndarray]) -> float:
    """Share of argmaxes over the channel axis that agree (per pixel for a segmentation map,
    once per image for a (1, classes) output), over all inputs."""
    agree = total = 0
    for y, ref in zip(outputs, references):
        y, ref = np.asarray(y), np.asarray(ref)
        if y.shape != ref.shape:
            raise QuantError(f"output shape {y.shape} differs from the float32 reference's {ref.shape}")
        a, b = y.reshape(y.shape[0], y.shape[1], -1).argmax(1), ref.reshape(ref.shape[0], ref.shape[1], -1).argmax(1)
        agree, total = agree + int((a == b).sum()), total + a.size
    return agree / total if total else float("nan")


def majority_share(references: list[np.ndarray]) -> float:
    """The share of argmaxes (as top1_agreement counts them) that are the most common class."""
    classes = np.concatenate([np.asarray(r).reshape(r.shape[0], r.shape[1], -1).argmax(1).ravel() for r in references])
    return float(np.bincount(classes).max() / classes.size) if classes.size else float("nan")


def max_rel_error(outputs: list[np.ndarray], references: list[np.ndarray]) -> float:
    """The largest per-input max |y - ref| / max |ref|."""
    return max(quant_error(y, ref) for y, ref in zip(outputs, references))
