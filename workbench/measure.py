"""One measurement protocol for every convolution implementation.

1. Inputs are generated once from a seed; the reference output comes from PyTorch in float64.
2. The implementation runs once on the device; its output is checked against the reference
   with the tolerance of its algorithm. A wrong result is recorded as such and never wins.
3. Only then is it timed on the device with TVM's time evaluator (explicit number, repeat,
   min_repeat_ms); every repeat is kept, and the median with its confidence interval
   (stats.py) is the headline.
4. Noise: when the interval is wider than stats.SPREAD_LIMIT of the median, the kernel is
   timed again (at most stats.EXTRA_ROUNDS more rounds, repeats pooled). A measurement is
   `disturbed` when its interval stayed wide (signal "spread") or when the device's 1-minute
   load average, read before and after timing, exceeded its cores + LOAD_MARGIN (signal
   "load": other work shared the cores); `disturbed_by` names the signals.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import asdict, dataclass, field

import numpy as np

from . import stats
from .fusion import Fusion
from .model import Layer, Model
from .rpc import SessionLost, is_transport_failure, short_reason

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class TimingConfig:
    number: int = 1  # calls per repeat (raised by the evaluator until min_repeat_ms is reached)
    repeat: int = 5
    min_repeat_ms: int = 50
    extra_rounds: int = stats.EXTRA_ROUNDS  # rounds more for a wide interval (a search that only ranks: 0)

    @classmethod
    def quick(cls) -> "TimingConfig":
        return cls(number=1, repeat=3, min_repeat_ms=10)


@dataclass
class ConvCase:
    """One conv layer with its weights, seeded inputs and the float64 reference output.

    `fusion` is what the kernel computes around conv + bias: with a pool prologue `x` is the
    pre-pool tensor; with an add, `skip` is the tensor added (at the upsampled size). A bare
    `relu` is the same as `fusion=Fusion(relu=True)`.
    """

    layer: Layer
    weight: np.ndarray
    bias: np.ndarray
    x: np.ndarray
    reference: np.ndarray
    relu: bool = False
    fusion: Fusion | None = None
    skip: np.ndarray | None = None

    def __post_init__(self):
        self.fusion = Fusion(relu=self.relu) if self.fusion is None else self.fusion
        self.relu = self.fusion.relu

    @property
    def flops(self) -> int:
        """The conv's direct-equivalent FLOPs (the fused elementwise ops are not counted)."""
        return self.layer.geometry.flops

    @classmethod
    def from_model(cls, model: Model, layer: Layer, seed: int = 0, relu: bool = False,
                   fusion: Fusion | None = None) -> "ConvCase":
        fusion = Fusion(relu=relu) if fusion is None else fusion
        weight, bias = model.params[layer.name]
        index = [l.name for l in model.layers].index(layer.name)
        rng = np.random.default_rng([seed, index])
        shape = (1, layer.in_channels, *fusion.pool_in) if fusion.pool else layer.input_shape
        x = rng.standard_normal(shape).astype(np.float32)
        skip = None
        if fusion.add:  # drawn after x, so the unfused case's x is unchanged
            _, k, oh, ow = layer.output_shape
            skip = rng.standard_normal((1, k, oh * fusion.scale, ow * fusion.scale)).astype(np.float32)
        return cls(layer, weight, bias, x, reference_conv(layer, x, weight, bias, fusion, skip), fusion=fusion,
                   skip=skip)

    @classmethod
    def from_group(cls, model: Model, group, seed: int = 0) -> "ConvCase":
        """The case of a conv group (fusion.ConvGroup): its conv with the ops it absorbs."""
        return cls.from_model(model, group.conv, seed, fusion=group.fusion)


def reference_conv(layer: Layer, x, weight, bias, relu: bool | Fusion = False, skip=None) -> np.ndarray:
    """PyTorch in float64: [maxpool [-> relu] ->] conv + bias [-> resize] [-> + skip] [-> relu]."""
    import torch
    import torch.nn.functional as F

    fusion = relu if isinstance(relu, Fusion) else Fusion(relu=bool(relu))
    t = torch.from_numpy(x).double()
    if fusion.pool:
        t = F.max_pool2d(t, fusion.pool)  # floor mode: an odd row or column is dropped
        t = torch.relu(t) if fusion.pool_relu else t
    out = F.conv2d(t, torch.from_numpy(weight).double(), torch.from_numpy(bias).double(),
                   stride=layer.stride, padding=layer.pad, groups=getattr(layer, "groups", 1))  # duck-typed layers: dense
    if fusion.scale > 1:
        out = F.interpolate(out, scale_factor=fusion.scale, mode="nearest")
    if fusion.add:
        out = out + torch.from_numpy(skip).double()
    if fusion.relu:
        out = torch.relu(out)
    if fusion.cap is not None:
        out = torch.clamp(out, max=fusion.cap)
    return out.float().numpy()


# Statuses that are a candidate's measured result and stay so on resume. `failed` (a build error,
# or, before transport failures were told apart, a dead session) is measured again on resume.
FINAL = ("ok", "wrong", "not_applicable", "crashed")


@dataclass
class Measurement:
    """A record of one (layer, implementation): status, numerics and timing."""

    layer: str
    impl: str
    status: str  # ok, not_applicable, failed, wrong, crashed (see FINAL)
    median_ms: float | None = None
    repeats_ms: list[float] = field(default_factory=list)
    gflops: float | None = None  # direct-equivalent FLOPs / median time
    numerics_ok: bool | None = None
    max_abs_err: float | None = None
    rel_err: float | None = None
    tolerance: float | None = None
    phases: dict | None = None
    note: str = ""
    alias_of: str | None = None
    config: str = ""
    ci_ms: list[float] | None = None  # the median's confidence interval [lo, hi] (stats.median_ci)
    ci_coverage: float | None = None
    spread: float | None = None  # (hi - lo) / median
    remeasured: int = 0  # extra rounds timed because the spread was too wide
    disturbed: bool = False
    disturbed_by: list[str] = field(default_factory=list)  # "spread", "load"
    load: list[float] | None = None  # the device's 1-minute load average before and after timing
    quant_error: float | None = None  # int8: max |dequantised out - float32| / max |float32| (quant.py)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def usable(self) -> bool:
        return self.status == "ok" and bool(self.numerics_ok)


def check_numerics(out: np.ndarray, reference: np.ndarray, tolerance: float) -> tuple[bool, float, float]:
    if out.shape != reference.shape:
        return False, float("inf"), float("inf")
    err = float(np.max(np.abs(out.astype(np.float64) - reference)))
    scale = float(np.max(np.abs(reference))) or 1.0
    rel = err / scale
    return bool(np.isfinite(err) and rel <= tolerance), err, rel


def usable(records: list[dict]) -> list[dict]:
    """The records a choice may use: measured ok, numerics checked and held, not an alias, finite time.

    An alias (fp16 Winograd running as wt8x8 on x86) is the same kernel under another name: it
    never wins twice, and never appears as a different algorithm in a figure.
    """
    return [r for r in records
            if r.get("status") == "ok" and r.get("numerics_ok") is True and not r.get("alias_of")
            and r.get("median_ms") is not None and np.isfinite(r["median_ms"])]


def measure(candidate, case: ConvCase, session, device, timing: TimingConfig) -> Measurement:
    """Check, then time: the protocol every implementation goes through."""
    tolerance = candidate.tolerance_for(case.layer)
    result = Measurement(case.layer.name, candidate.impl, "ok", tolerance=tolerance, note=candidate.note,
                         alias_of=candidate.alias_of, config=candidate.config_for(case.layer))
    reason = candidate.why_not_applicable(case.layer) or _fusion_refusal(candidate, case)
    if reason:
        result.status, result.note = "not_applicable", reason
        return result
    try:
        running = candidate.setup(session, case, device)
        out = running.run_once()
        # An int8 kernel checks against its own quantised reference (Running.own_check) and reports
        # its distance from float32 as quant_error; every other kernel against case.reference.
        own = running.own_check(out) if hasattr(running, "own_check") else None
        if own is None:
            ok, result.max_abs_err, result.rel_err = check_numerics(out, case.reference, tolerance)
        else:
            ok, result.max_abs_err, result.rel_err = own["ok"], own["max_abs_err"], own["rel_err"]
            result.quant_error = own["quant_error"]
        result.numerics_ok = ok
        result.phases = running.phases()
        if not ok:
            # Timed anyway so the record shows what a wrong kernel would have "won"; it never wins.
            result.status = "wrong"
            result.note = (own or {}).get("note") or (
                f"output differs from the reference: max abs err {result.max_abs_err:.3g}, "
                f"relative {result.rel_err:.3g} > {tolerance:g}")
        load_before = device_load(session)
        seconds = list(running.time(timing))
        # Wide interval: time again (bounded), pooling the repeats, before calling it disturbed
        # (a wrong kernel never wins: its time is shown, not worth more rounds).
        while (ok and result.remeasured < timing.extra_rounds
               and stats.summarize([s * 1e3 for s in seconds])["spread"] > stats.SPREAD_LIMIT):
            seconds += list(running.time(timing))
            result.remeasured += 1
        load_after = device_load(session)
    except Exception as err:  # one failing implementation must not stop the study
        if is_transport_failure(err, session):  # the session died: not this candidate's result
            raise SessionLost(f"the RPC session died while measuring {candidate.impl} on {case.layer.name}: "
                              f"{short_reason(err)}") from err
        log.debug("%s on %s failed:\n%s", candidate.impl, case.layer.name, traceback.format_exc())
        result.status, result.numerics_ok = "failed", False
        result.note = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"[:500]
        return result
    result.repeats_ms = [s * 1e3 for s in seconds]
    annotate(result, result.repeats_ms, [load_before, load_after])
    result.gflops = case.flops / (result.median_ms * 1e-3) / 1e9
    return result


LOAD_MARGIN = 1.0  # load above the device's cores by more than this: other work shared them


def annotate(result, repeats_ms: list[float], loads: list) -> None:
    """Set median, interval, spread and the disturbed flags of a Measurement from its repeats and
    the device loads ((load1, cores) pairs or None) read around the timing."""
    figures = stats.summarize(repeats_ms)
    result.median_ms, result.ci_ms = figures["median_ms"], figures["ci_ms"]
    result.ci_coverage, result.spread = figures["ci_coverage"], figures["spread"]
    flags = ["spread"] if result.spread > stats.SPREAD_LIMIT else []
    known = [load for load in loads if load]
    if known:
        result.load = [round(load, 2) for load, _ in known]
        if any(load > cores + LOAD_MARGIN for load, cores in known):
            flags.append("load")
    result.disturbed_by, result.disturbed = flags, bool(flags)


def device_load(session) -> tuple[float, int] | None:
    """(1-minute load average, cores) of the device, or None where its server cannot tell
    (an older server, or a platform without a load average)."""
    import json

    try:
        text = session.get_function(LOAD_GLOBAL_FUNC)()
        data = json.loads(text)
        return float(data["load1"]), int(data["cores"])
    except Exception:  # noqa: BLE001 - a missing probe is no measurement's failure
        return None


def _fusion_refusal(candidate, case) -> str | None:
    """Why the candidate cannot compute the case's fusion (conv cases only), or None."""
    fusion = getattr(case, "fusion", None)
    check = getattr(candidate, "why_not_fusible", None)
    return check(fusion) if fusion is not None and check is not None else None


# ---------------------------------------------------------------- on the device

TIME_GLOBAL_FUNC = "workbench.measure.time_global_func"
LOAD_GLOBAL_FUNC = "workbench.measure.load_average"


def load_average() -> str:
    """The device's 1-minute load average and cores, as JSON (the server registers this)."""
    import json
    import os

    try:
        load1 = os.getloadavg()[0]
    except OSError:
        return json.dumps({})
    return json.dumps({"load1": load1, "cores": os.cpu_count() or 1})


def time_global_func(name: str, number: int, repeat: int, min_repeat_ms: int, *args) -> str:
    """Time a global function of this (device) process with TVM's time evaluator; JSON seconds.

    The remote evaluator of a global function returns bytes, which TVM RPC cannot carry back;
    running the same evaluator here and returning text can. The server registers this.
    """
    import json

    from . import tvm_compat

    return json.dumps(tvm_compat.time_global_func(name, number, repeat, min_repeat_ms, *args))
