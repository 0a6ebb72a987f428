"""PyTorch's QNNPACK int8 conv as TVM global functions, registered on the device at start-up.

Like the NNPACK bridge (nnpack_tvm.py), a function registered in one process does not exist in
another: the RPC server registers these in every session process (server.py), and a Relax
model reaches them with `call_dps_packed`. torch is imported on the first call, inside the
session process, never before the server forks.

`workbench.int8.qnnpack_conv(x, w_q, bias, w_scales, qparams, stride, pad, groups, out)`:

    x         (1, C, H, W)       uint8, quantised with (in_scale, in_zp)
    w_q       (K, C/g, kh, kw)   int8, symmetric per output channel
    bias      (K,)               float32 (QNNPACK quantises it at in_scale * w_scale_k)
    w_scales  (K,)               float32
    qparams   (4,)               float64: in_scale, in_zp, out_scale, out_zp
    out       (1, K, OH, OW)     uint8

The weights are packed (`quantized::conv2d_prepack`) once per weight buffer and reused, as a
deployed model would; a call wraps the uint8 input as a quantised tensor (one copy), runs
`quantized::conv2d` and copies the uint8 result out: both copies are in the timed call.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

from .errors import WorkbenchError

QNNPACK_CONV = "workbench.int8.qnnpack_conv"
SET_THREADS = "workbench.int8.set_threads"
ENGINE = "qnnpack"

_STATE: dict = {"threads": None, "packed": {}}


class QNNPACKUnavailable(WorkbenchError, RuntimeError):
    """This torch build has no QNNPACK engine."""


def _torch(threads: int | None = None):
    import torch

    if ENGINE not in torch.backends.quantized.supported_engines:
        raise QNNPACKUnavailable(f"torch {torch.__version__} has no {ENGINE!r} quantized engine "
                                 f"(it has {torch.backends.quantized.supported_engines}); install the CPU wheel")
    if torch.backends.quantized.engine != ENGINE:
        torch.backends.quantized.engine = ENGINE
    wanted = threads or _STATE["threads"] or int(os.environ.get("TVM_NUM_THREADS", "0") or 0) or None
    if wanted and torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)  # QNNPACK's pthreadpool follows torch's intra-op thread count
    return torch


def set_threads(threads: int) -> None:
    _STATE["threads"] = int(threads)
    _torch(int(threads))


def _array(t, dtype, shape) -> np.ndarray:
    """A numpy view of a contiguous CPU tvm tensor (by pointer: DLPack views from a VM are non-owning)."""
    if tuple(t.shape) != tuple(shape) or str(t.dtype) != np.dtype(dtype).name:
        raise ValueError(f"expected a {np.dtype(dtype).name} tensor of shape {tuple(shape)}, "
                         f"got {t.dtype} {tuple(t.shape)}")
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = (ctypes.c_byte * size).from_address(t.data_ptr())
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def _packed(w, bias, scales, stride: int, pad: int, groups: int):
    """The prepacked weights for this weight buffer (keyed by address and contents' sample)."""
    shape = tuple(int(d) for d in w.shape)
    w_np = _array(w, np.int8, shape)
    s_np = _array(scales, np.float32, (shape[0],))
    key = (w.data_ptr(), shape, w_np.reshape(-1)[:64].tobytes(), s_np.tobytes(), stride, pad, groups)
    packed = _STATE["packed"].get(key)
    if packed is None:
        torch = _torch()
        w_t = torch._make_per_channel_quantized_tensor(
            torch.from_numpy(w_np.copy()), torch.from_numpy(s_np.astype(np.float64)),
            torch.zeros(shape[0], dtype=torch.long), 0)
        b_t = torch.from_numpy(_array(bias, np.float32, (shape[0],)).copy())
        packed = torch.ops.quantized.conv2d_prepack(w_t, b_t, [stride, stride], [pad, pad], [1, 1], groups)
        _STATE["packed"][key] = packed
    return packed


def qnnpack_conv(x, w, bias, scales, qparams, stride, pad, groups, out) -> None:
    torch = _torch()
    in_scale, in_zp, out_scale, out_zp = (float(v) for v in _array(qparams, np.float64, (4,)))
    packed = _packed(w, bias, scales, int(stride), int(pad), int(groups))
    qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(_array(x, np.uint8, tuple(x.shape))),
                                                 in_scale, int(in_zp))
    y = torch.ops.quantized.conv2d(qx, packed, out_scale, int(out_zp))
    target = _array(out, np.uint8, tuple(out.shape))
    if tuple(y.shape) != target.shape:
        raise ValueError(f"QNNPACK produced {tuple(y.shape)}, the output buffer is {target.shape}")
    target[...] = y.int_repr().numpy()


def register_functions(threads: int | None = None) -> list[str]:
    """Register the QNNPACK conv and its thread setter in this process (an RPC session, or a local VM)."""
    import tvm_ffi

    if threads:
        _STATE["threads"] = int(threads)
    tvm_ffi.register_global_func(QNNPACK_CONV, qnnpack_conv, override=True)
    tvm_ffi.register_global_func(SET_THREADS, lambda n: set_threads(int(n)), override=True)
    return [QNNPACK_CONV, SET_THREADS]
