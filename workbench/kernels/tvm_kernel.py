"""What every TVM conv kernel shares: a PrimFunc (data, weight as the kernel wants it, bias, out).

Measured, it is compiled for the device's target, uploaded over RPC and timed with TVM's time
evaluator; in a hybrid model it is a `call_tir` of the same PrimFunc with the weight embedded.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .. import tvm_compat
from ..names import symbol
from .base import Candidate, Running

FUNC_NAME = "conv"


def final_kernel(func, name: str):
    """Name a conv PrimFunc and mark it opaque, so FuseOps/FuseTIR leave it whole.

    Our conv kernels already carry their epilogue (and tuned ones their schedule). Left
    unmarked, FuseOps groups a TE conv with a following legalized ReLU and FuseTIR then fails
    in 0.27 ("Inconsistent buffers ... mapped to the same relax var").
    """
    return func.with_attr("global_symbol", name).with_attr("op_pattern", tvm_compat.OPAQUE)


class TVMCandidate(Candidate):
    """A TVM kernel given by `prim_func(layer, relu, weight, target) -> (PrimFunc, weight to pass)`."""

    def prim_func(self, layer, relu: bool, weight: np.ndarray, target: dict):
        raise NotImplementedError

    def setup(self, session, case, device) -> Running:
        import tvm

        func, weight = self.prim_func(case.layer, case.relu, case.weight, device.target)
        module = tvm.tirx.build(func.with_attr("global_symbol", FUNC_NAME), target=device.tvm_target())
        return TVMRunning(session, case, device, module, FUNC_NAME, weight)

    def emit(self, bb, group, values, weight, bias, target):
        from tvm import relax

        conv = group.conv
        func, packed = self.prim_func(conv, group.relu, weight, target)
        name = symbol(f"conv_{conv.name}")
        gv = bb.add_func(final_kernel(func, name), name)
        args = [values[conv.inputs[0]], relax.const(packed), relax.const(bias)]
        return bb.emit(relax.call_tir(gv, args, relax.TensorType(conv.output_shape, "float32")),
                       symbol(group.tail.name))


class TVMRunning(Running):
    def __init__(self, session, case, device, module, func_name: str, weight: np.ndarray):
        import tvm

        from ..rpc import upload

        self.remote = upload(session, module, "kernel.so", device.export_kwargs())
        self.dev, self.func_name = session.cpu(0), func_name
        self.out = tvm.runtime.empty(case.layer.output_shape, "float32", self.dev)
        self.args = [tvm.runtime.tensor(a, self.dev) for a in (case.x, weight, case.bias)] + [self.out]

    def run_once(self) -> np.ndarray:
        self.remote[self.func_name](*self.args)
        return self.out.numpy()

    def time(self, timing) -> list[float]:
        evaluator = self.remote.time_evaluator(self.func_name, self.dev, number=timing.number,
                                               repeat=timing.repeat, min_repeat_ms=timing.min_repeat_ms)
        return list(evaluator(*self.args).results)


class FactoryCandidate(TVMCandidate):
    """A TVM kernel from a function: (layer, relu, weight) -> PrimFunc, or (PrimFunc, weight to pass).

    For kernels written in a notebook or a test; `fusible` says which following ops it computes
    (a ReLU epilogue when `relu` is True).
    """

    def __init__(self, impl: str, factory: Callable, tolerance: float = 1e-4, note: str = "",
                 fusible: tuple[str, ...] = ("relu",), applies: Callable | None = None):
        self.impl, self.factory, self.tolerance, self.note = impl, factory, tolerance, note
        self.fusible, self._applies = fusible, applies

    def why_not_applicable(self, layer):
        return self._applies(layer) if self._applies else None

    def prim_func(self, layer, relu, weight, target):
        made = self.factory(layer, relu, weight)
        return made if isinstance(made, tuple) else (made, weight)
