"""NNPACK from TVM: global functions a compiled model calls, and Relax helpers that emit the calls.

:func:`register_tvm_functions` registers the NNPACK convolution of :mod:`workbench.nnpack` as
TVM global functions in destination-passing style, which a Relax VM reaches with
``relax.call_dps_packed`` (see :func:`relax_conv2d`) and TE with ``te.extern`` +
``tvm.tirx.call_packed``.  The functions keep the names ``workbench.nnpack.*``: compiled
models and stored records refer to them by name.

TVM is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

from .geometry import ConvGeometry
from .nnpack import (ACTIVATIONS, ALGORITHMS, STRATEGY_CODES, Bridge, NNPACKNameError, _check_names,
                     shared_bridge)

__all__ = [
    "CONV2D",
    "CONV2D_PREPACKED",
    "LAST_PROFILE",
    "SET_THREADS",
    "SHARE_CORES",
    "last_profile_json",
    "register_tvm_functions",
    "relax_conv2d",
    "relax_vm",
    "share_cores_with_tvm",
]

CONV2D = "workbench.nnpack.conv2d"
CONV2D_PREPACKED = "workbench.nnpack.conv2d_prepacked"
LAST_PROFILE = "workbench.nnpack.last_profile"
SET_THREADS = "workbench.nnpack.set_threads"
SHARE_CORES = "workbench.nnpack.share_cores_with_tvm"

# Positional attributes between (x, w, b) and the trailing output, with their defaults.
_CONV2D_ATTRS = (("pad_top", 0), ("pad_right", 0), ("pad_bottom", 0), ("pad_left", 0), ("stride", 1),
                 ("algorithm", "auto"), ("strategy", "compute"), ("activation", "identity"))
_PREPACKED_ATTRS = tuple(a for a in _CONV2D_ATTRS if a[0] != "strategy")


def _name(value: Any, codes: dict[str, int]) -> str:
    """An attribute given by name or by its NNPACK code (TVM RPC cannot carry strings)."""
    if isinstance(value, str):
        return value
    by_code = {code: name for name, code in codes.items()}
    if int(value) not in by_code:
        raise NNPACKNameError(f"unknown code {value}; expected one of {by_code}")
    return by_code[int(value)]


def _parse_attrs(values: Sequence[Any], spec: tuple) -> dict[str, Any]:
    if len(values) > len(spec):
        raise TypeError(f"too many attributes {tuple(values)}; expected at most {[n for n, _ in spec]}")
    attrs = {name: default for name, default in spec}
    attrs.update({name: value for (name, _), value in zip(spec, values)})
    return attrs


def _tensor_ptr(t: Any, what: str, shape: tuple[int, ...]) -> int:
    """Data pointer of a contiguous float32 CPU tvm tensor (DLPack views from TE included).

    We read the pointer rather than converting with np.from_dlpack: a DLTensor that a TE
    extern passes is a non-owning view, and exporting it through DLPack segfaults.
    """
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{what} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if str(t.dtype) != "float32" or not t.is_contiguous():
        raise ValueError(f"{what} must be a contiguous float32 tensor, got {t.dtype}")
    if t.__dlpack_device__()[0] != 1:  # kDLCPU
        raise ValueError(f"{what} must be on the CPU, got {t.device}")
    return t.data_ptr()


@dataclass(frozen=True)
class _Plan:
    """What one packed-call signature means, validated once."""

    shape: ConvGeometry
    algorithm: str
    strategy: str
    activation: str
    out_shape: tuple[int, ...]


# Profiles of the latest packed call in this process, for measurements over RPC.
_LAST_PROFILE: dict[str, dict[str, float]] = {}


class _PackedConv2d:
    """Body of the TVM global functions; ``prepacked`` forces strategy precompute."""

    def __init__(self, threads: int, prepacked: bool):
        self.threads, self.prepacked = threads, prepacked
        self.spec = _PREPACKED_ATTRS if prepacked else _CONV2D_ATTRS
        self._plans: dict[tuple, _Plan] = {}

    @property
    def bridge(self) -> Bridge:
        # Looked up per call, not bound at registration: registration happens before an RPC
        # server forks its session processes, and each process needs its own thread pool.
        return shared_bridge(self.threads)

    def _plan(self, x_shape: tuple, w_shape: tuple, attr_values: tuple) -> _Plan:
        """Parse and check the attributes once per (shapes, attributes) signature."""
        attrs = _parse_attrs(attr_values, self.spec)
        strategy = "precompute" if self.prepacked else _name(attrs["strategy"], STRATEGY_CODES)
        algorithm = _name(attrs["algorithm"], ALGORITHMS)
        activation = _name(attrs["activation"], ACTIVATIONS)
        _check_names(algorithm, strategy, activation)
        pad = tuple(int(attrs[k]) for k in ("pad_top", "pad_right", "pad_bottom", "pad_left"))
        shape = ConvGeometry.from_arrays(x_shape, w_shape, pad, int(attrs["stride"]))
        self.bridge.require_applicable(shape, algorithm, strategy)
        out_shape = shape.output_shape if len(x_shape) == 4 else shape.output_shape[1:]
        return _Plan(shape, algorithm, strategy, activation, out_shape)

    def __call__(self, *args):
        if len(args) < 4:
            raise TypeError("expected (x, w, b, [attrs...], out)")
        x, w, b, out = args[0], args[1], args[2], args[-1]
        key = (tuple(x.shape), tuple(w.shape), args[3:-1])
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan(*key)
        shape, bridge = plan.shape, self.bridge
        x_ptr = _tensor_ptr(x, "x", key[0])
        w_ptr = _tensor_ptr(w, "w", key[1])
        y_ptr = _tensor_ptr(out, "out", plan.out_shape)
        if b is None:
            b_ptr = bridge.zero_bias(shape).ctypes.data
        else:
            b_ptr = _tensor_ptr(b, "b", (shape.out_channels,))
        if plan.strategy == "compute":
            profile = bridge.run_pointers(shape, plan.algorithm, "compute", x_ptr, w_ptr, b_ptr, y_ptr,
                                          plan.activation)
        else:
            # Weights of a compiled model are constants: transform once per weight buffer.
            tk, transform = bridge.transformed_at(w_ptr, shape, plan.algorithm)
            if transform is not None:
                _LAST_PROFILE["transform"] = transform.to_dict()
            profile = bridge.run_pointers(shape, plan.algorithm, "reuse", x_ptr, tk.ptr, b_ptr, y_ptr,
                                          plan.activation)
        _LAST_PROFILE["run"] = profile.to_dict()


def last_profile_json() -> str:
    """JSON of the latest packed call's phases ("run") and the latest kernel transform ("transform")."""
    return json.dumps(_LAST_PROFILE)


def register_tvm_functions(threads: int = 1) -> list[str]:
    """Register the NNPACK convolution as TVM global functions; returns their names.

    Both take ``(x, w, b, *attrs, out)`` and write the result into ``out`` (destination
    passing, so ``relax.call_dps_packed`` and ``te.extern`` + ``tvm.tirx.call_packed`` can call
    them); x is (1, C, H, W) or (C, H, W), w (K, C, kh, kw), b (K,) float32 tensors.  Missing
    trailing attributes take their defaults.

    - ``workbench.nnpack.conv2d``: attrs pad_top=0, pad_right=0, pad_bottom=0, pad_left=0,
      stride=1, algorithm="auto", strategy="compute", activation="identity".
    - ``workbench.nnpack.conv2d_prepacked``: the same without ``strategy``; the kernel is
      transformed on the first call and reused after (precompute + reuse).  The transformed
      kernel is cached by the weight buffer's address and a sample of its bytes, which
      assumes weights are constants (true for a compiled model's parameters); after
      changing a weight in place call ``shared_bridge(threads).clear_kernel_cache()``.
      ``workbench.nnpack.conv2d`` with strategy "precompute" behaves the same.

    Names may also be given as NNPACK's codes (``ALGORITHMS``, ``STRATEGY_CODES``,
    ``ACTIVATIONS`` of workbench.nnpack), which is how they travel over TVM RPC.

    Functions registered in one process do not exist in another: an RPC server must call
    this itself at start-up (e.g. in ``tvm.rpc.Server(server_init_callback=...)``).
    """
    import tvm_ffi

    tvm_ffi.register_global_func(CONV2D, _PackedConv2d(threads, prepacked=False), override=True)
    tvm_ffi.register_global_func(CONV2D_PREPACKED, _PackedConv2d(threads, prepacked=True), override=True)
    tvm_ffi.register_global_func(LAST_PROFILE, last_profile_json, override=True)
    # Lets an RPC client pick the thread count for its own session process.
    tvm_ffi.register_global_func(SET_THREADS, lambda n: register_tvm_functions(int(n)) and None, override=True)
    tvm_ffi.register_global_func(SHARE_CORES, share_cores_with_tvm, override=True)
    return [CONV2D, CONV2D_PREPACKED, LAST_PROFILE, SET_THREADS, SHARE_CORES]


def share_cores_with_tvm() -> None:
    """Make TVM's thread pool sleep instead of spin between kernels, in this process.

    In a model that alternates NNPACK calls (its own pthreadpool) with TVM kernels (TVM's
    pool), TVM's workers spin after each kernel and starve NNPACK's threads: measured on the
    reference UNet with NNPACK on every conv, 20.8 ms spinning against 10.5 ms sleeping.
    TVM reads the setting once, when its pool starts: call this before the first TVM kernel.
    """
    os.environ["TVM_THREAD_POOL_SPIN_COUNT"] = "0"


def relax_conv2d(x, w, b, shape: ConvGeometry, *, algorithm: str = "auto", strategy: str = "compute",
                 activation: str = "identity"):
    """A Relax ``call_dps_packed`` expression running NNPACK on Relax values x, w, b.

    Strategy "precompute" calls ``workbench.nnpack.conv2d_prepacked``.  Emit it with a
    BlockBuilder; the functions must be registered (register_tvm_functions) before the VM runs.
    """
    from tvm import ir, relax

    _check_names(algorithm, strategy, activation)
    attrs = [relax.prim_value(p) for p in (*shape.pad, shape.stride)]
    names = [algorithm] + ([] if strategy == "precompute" else [strategy]) + [activation]
    attrs += [ir.StringImm(s) for s in names]
    func = CONV2D_PREPACKED if strategy == "precompute" else CONV2D
    return relax.call_dps_packed(func, [x, w, b, *attrs], relax.TensorType(shape.output_shape, "float32"))


def _relax_module(shape: ConvGeometry, algorithm: str, strategy: str, activation: str):
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape.input_shape, "float32"))
    w = relax.Var("w", relax.TensorType(shape.weight_shape, "float32"))
    b = relax.Var("b", relax.TensorType((shape.out_channels,), "float32"))
    with bb.function("main", [x, w, b]):
        with bb.dataflow():
            y = bb.emit_output(relax_conv2d(x, w, b, shape, algorithm=algorithm, strategy=strategy,
                                            activation=activation))
        bb.emit_func_output(y)
    return bb.get()


def relax_vm(shape: ConvGeometry, algorithm: str = "auto", strategy: str = "compute",
             activation: str = "identity"):
    """A Relax VM whose ``main(x, w, b)`` runs this NNPACK convolution (for tests and timing)."""
    import tvm
    from tvm import relax

    mod = _relax_module(shape, algorithm, strategy, activation)
    executable = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    return relax.VirtualMachine(executable, tvm.cpu())
