"""What every TVM conv kernel shares: a PrimFunc (data, weight as the kernel wants it, bias, [skip], out).

Measured, it is compiled for the device's target, uploaded over RPC and timed with TVM's time
evaluator; in a hybrid model it is a `call_tir` of the same PrimFunc with the weight embedded.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .. import tvm_compat
from ..fusion import Fusion
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
    """A TVM kernel given by `prim_func(layer, fusion, weight, target) -> (PrimFunc, weight to pass)`.

    The PrimFunc's arguments are (data, weight, bias, [skip when fusion.add], output): data is
    the pre-pool tensor when a pool prologue is fused, output the upsampled one after a resize.
    """

    def prim_func(self, layer, fusion: Fusion, weight: np.ndarray, target: dict):
        raise NotImplementedError

    def setup(self, session, case, device) -> Running:
        return self.running(session, case, device, self.compile(case, device))

    def compile(self, case, device) -> tuple:
        """(module, weight to pass): the host's part of setup, which a tuner runs ahead in a thread."""
        import tvm

        func, weight = self.prim_func(case.layer, case.fusion, case.weight, device.target)
        return tvm.tirx.build(func.with_attr("global_symbol", FUNC_NAME), target=device.tvm_target()), weight

    def running(self, session, case, device, compiled: tuple) -> Running:
        """The compiled kernel uploaded to the device with the case's inputs."""
        module, weight = compiled
        inputs = [case.x, weight, case.bias] + ([case.skip] if case.fusion.add else [])
        return TVMRunning(session, device, module, FUNC_NAME, inputs, case.reference.shape)

    def emit(self, bb, group, values, weight, bias, target):
        from tvm import relax

        conv, fusion = group.conv, group.fusion
        func, packed = self.prim_func(conv, fusion, weight, target)
        ops = (*fusion.prologue_ops, *fusion.epilogue_ops)
        name = symbol(f"conv_{conv.name}") + ("" if ops in ((), ("relu",)) else "_" + "_".join(ops))
        gv = bb.add_func(final_kernel(func, name), name)
        args = [values[group.source], relax.const(packed), relax.const(bias)]
        if fusion.add:
            args.append(values[group.skip])
        return bb.emit(relax.call_tir(gv, args, relax.TensorType(group.tail.output_shape, "float32")),
                       symbol(group.tail.name))


class TVMRunning(Running):
    """A compiled PrimFunc uploaded to the device, called with `inputs` then a fresh output."""

    def __init__(self, session, device, module, func_name: str, inputs: list, out_shape: tuple):
        import tvm

        from ..rpc import upload

        self.remote = upload(session, module, "kernel.so", device.export_kwargs())
        self.dev, self.func_name = session.cpu(0), func_name
        self.out = tvm.runtime.empty(tuple(out_shape), "float32", self.dev)
        self.args = [tvm.runtime.tensor(np.ascontiguousarray(a), self.dev) for a in inputs] + [self.out]

    def run_once(self) -> np.ndarray:
        self.remote[self.func_name](*self.args)
        return self.out.numpy()

    def time(self, timing) -> list[float]:
        evaluator = self.remote.time_evaluator(self.func_name, self.dev, number=timing.number,
                                               repeat=timing.repeat, min_repeat_ms=timing.min_repeat_ms)
        return list(evaluator(*self.args).results)


class FactoryCandidate(TVMCandidate):
    """A TVM kernel from a function: (layer, relu or fusion, weight) -> PrimFunc, or (PrimFunc, weight to pass).

    For kernels written in a notebook or a test; `fusible` and `prologue_fusible` say which
    ops around the conv it computes. A factory declaring at most a ReLU gets `relu` (a bool);
    one declaring more gets the whole `Fusion`.
    """

    def __init__(self, impl: str, factory: Callable, tolerance: float = 1e-4, note: str = "",
                 fusible: tuple[str, ...] = ("relu",), applies: Callable | None = None,
                 prologue_fusible: tuple[str, ...] = ()):
        self.impl, self.factory, self.tolerance, self.note = impl, factory, tolerance, note
        self.fusible, self.prologue_fusible, self._applies = fusible, prologue_fusible, applies

    def why_not_applicable(self, layer):
        return self._applies(layer) if self._applies else None

    def prim_func(self, layer, fusion, weight, target):
        relu_only = set(self.fusible) <= {"relu"} and not self.prologue_fusible
        made = self.factory(layer, fusion.relu if relu_only else fusion, weight)
        return made if isinstance(made, tuple) else (made, weight)
