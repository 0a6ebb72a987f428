"""NNPACK's algorithms x transform strategies as candidates (`nnpack:<algorithm>:<strategy>`).

Measured, the bridge's TVM global function runs on the device by name (the workbench server
registers it at start-up); in a hybrid model it is a `call_dps_packed` of the same function,
with a fused ReLU as NNPACK's activation. Names travel as NNPACK's integer codes: TVM RPC
does not carry string arguments, and codes keep compiled modules free of string constants.
"""

from __future__ import annotations

import json

import numpy as np

from .. import nnpack, nnpack_tvm
from ..measure import TIME_GLOBAL_FUNC
from .base import Candidate, Running


class NNPACKCandidate(Candidate):
    """One algorithm x strategy. `machine` is the device's CPU (its `platform.machine()`; None: this
    one): whether wt8x8_fp16 is an alias of wt8x8 depends on the CPU NNPACK runs on, not the host's."""

    def __init__(self, algorithm: str, strategy: str, threads: int = 1, machine: str | None = None):
        self.algorithm, self.strategy, self.threads = algorithm, strategy, threads
        self.impl = f"nnpack:{algorithm}:{strategy}"
        ran_as = nnpack.runs_as(algorithm, machine)
        rtol, atol = nnpack.TOLERANCE[ran_as]  # an alias is held to the bound of what really runs
        self.tolerance = rtol + atol
        if ran_as != algorithm:
            self.note = f"runs as {ran_as}: {nnpack.fp16_winograd(machine)[1]}"
            self.alias_of = f"nnpack:{ran_as}:{strategy}"
        elif algorithm == "wt8x8_fp16":
            self.note = "FP16 storage of the Winograd transforms: about 1e-2 relative error, not wt8x8's 1e-5"

    def why_not_applicable(self, layer):
        return nnpack.why_not_applicable(layer.geometry, self.algorithm, self.strategy)

    def require_applicable(self, layer) -> None:
        """Refuse a layer NNPACK cannot run with its rule's sentence, before any buffer is touched."""
        reason = self.why_not_applicable(layer)
        if reason is not None:
            raise nnpack.NotApplicableError(layer.geometry, self.algorithm, self.strategy, reason, layer.name)

    def setup(self, session, case, device) -> Running:
        self.require_applicable(case.layer)
        return NNPACKRunning(self, session, case)

    def emit(self, bb, group, values, weight, bias, target):
        from tvm import relax

        from ..names import symbol

        conv = group.conv
        self.require_applicable(conv)
        attrs = call_attributes(conv.geometry, self.algorithm, self.strategy, group.relu)
        args = [values[conv.inputs[0]], relax.const(weight), relax.const(bias),
                *(relax.prim_value(int(a)) for a in attrs)]
        out_type = relax.TensorType(conv.output_shape, "float32")
        return bb.emit(relax.call_dps_packed(self.function, args, out_type), symbol(group.tail.name))

    @property
    def function(self) -> str:
        return nnpack_tvm.CONV2D_PREPACKED if self.strategy == "precompute" else nnpack_tvm.CONV2D


def call_attributes(geometry, algorithm: str, strategy: str, relu: bool) -> list[int]:
    """The integer attributes between (x, w, b) and the output of the bridge's global function."""
    attrs = [*geometry.pad, geometry.stride, nnpack.ALGORITHMS[algorithm]]
    if strategy != "precompute":
        attrs.append(nnpack.STRATEGY_CODES[strategy])
    attrs.append(nnpack.ACTIVATIONS["relu" if relu else "identity"])
    return attrs


class NNPACKRunning(Running):
    """The bridge's TVM global function, called and timed on the device by name."""

    def __init__(self, candidate: NNPACKCandidate, session, case):
        import tvm

        session.get_function(nnpack_tvm.SET_THREADS)(candidate.threads)
        dev = session.cpu(0)
        self.session, self.name = session, candidate.function
        attrs = call_attributes(case.layer.geometry, candidate.algorithm, candidate.strategy, case.relu)
        self.out = tvm.runtime.empty(case.layer.output_shape, "float32", dev)
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

    def time(self, timing) -> list[float]:
        timer = self.session.get_function(TIME_GLOBAL_FUNC)
        return json.loads(timer(self.name, timing.number, timing.repeat, timing.min_repeat_ms, *self.args))


def nnpack_candidates(threads: int, machine: str | None = None) -> list[NNPACKCandidate]:
    return [NNPACKCandidate(a, s, threads, machine) for a in nnpack.ALGORITHMS for s in nnpack.STRATEGIES]
