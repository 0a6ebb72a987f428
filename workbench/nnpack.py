"""The NNPACK bridge: every NNPACK convolution algorithm and transform strategy, from Python.

The real NNPACK library ships inside the PyTorch CPU wheel (``torch/lib/libtorch_cpu.so``);
PyTorch picks one algorithm for us, this module calls ``nnp_convolution_inference`` directly
through ctypes so that a study can choose the algorithm, the kernel-transform strategy and
the fused activation, and read NNPACK's own per-phase profile.

Main entry points:

- :class:`ConvShape` (an alias of :class:`workbench.geometry.ConvGeometry`) describes one
  batch-1 NCHW float32 convolution.
- :func:`why_not_applicable` / :func:`applicable_algorithms`: the applicability rules, so a
  sweep says "not applicable" instead of crashing.  The Winograd and FFT rules come from
  :mod:`workbench.geometry`; NNPACK's own limits are added here.
- :class:`Bridge` owns a thread pool and workspaces and runs convolutions, returning the
  output and a :class:`Profile`; its pointer-level methods (``run_pointers``,
  ``transformed_at``) serve callers that own their buffers, such as the TVM functions.

The TVM global functions live in :mod:`workbench.nnpack_tvm`; this module does not import TVM.

Facts about the library that shaped this code (verified against the library in torch 2.13):

- The workspace must be 64-byte aligned: a misaligned one crashes NNPACK (segfault), it
  does not return ``nnp_status_misaligned_buffer``.  Input, kernel, bias and output only
  need float alignment.
- A NULL workspace with a non-NULL ``workspace_size`` is a *size query*: NNPACK returns
  success without computing anything.  The direct algorithm needs 0 bytes, so we always
  pass a real (non-NULL) buffer when running.
- NNPACK rejects any padding >= the kernel size in that direction
  (``nnp_status_invalid_input_padding``, 12) for every algorithm.
- A kernel larger than the padded input makes NNPACK compute a wrapped-around output size
  and crash, so :class:`ConvGeometry` refuses shapes whose output would be empty.
- ft8x8/ft16x16/wt8x8 with stride > 1, wt8x8 with a non-3x3 kernel, ft8x8 above 8x8 and
  ft16x16 above 16x16, direct with a non-1x1 kernel or stride > 1: status 26
  (``nnp_status_unsupported_algorithm``).  direct with precompute: status 27.
- ``wt8x8_fp16`` silently runs ``wt8x8`` unless the CPU has ARM NEON-FP16 (x86: identical
  output).  On aarch64 it really stores the Winograd transforms as FP16: measured on the
  emulated board, 1e-2 to 3e-2 relative error against wt8x8's 1e-5 (see TOLERANCE).
- Stride goes in as ``output_subsampling``: implicit_gemm (and auto, which picks it) match
  PyTorch on 3x3 and 1x1 convs with stride 2; ft8x8/ft16x16 also run 1x1 stride-1 convs
  (checked against PyTorch, relative error about 2e-7).
- NNPACK has no ``groups`` argument: a grouped or depthwise conv is never applicable.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib.util
import math
import os
import platform
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import WorkbenchError
from .geometry import ConvGeometry, fft_rule, winograd_rule

__all__ = [
    "ACTIVATIONS",
    "ALGORITHMS",
    "STRATEGIES",
    "STRATEGY_CODES",
    "STATUS_NAMES",
    "TOLERANCE",
    "Bridge",
    "ConvShape",
    "NNPACKError",
    "NNPACKNameError",
    "NotApplicableError",
    "Profile",
    "TransformedKernel",
    "applicable_algorithms",
    "auto_algorithm",
    "fp16_winograd",
    "relative_error",
    "resolved_algorithm",
    "runs_as",
    "shared_bridge",
    "why_not_applicable",
    "within_tolerance",
]

# --------------------------------------------------------------------------------------
# Enumerations of NNPACK's public header (include/nnpack.h)
# --------------------------------------------------------------------------------------

ALGORITHMS = {
    "auto": 0,
    "ft8x8": 1,
    "ft16x16": 2,
    "wt8x8": 3,
    "implicit_gemm": 4,
    "direct": 5,
    "wt8x8_fp16": 6,
}
STRATEGIES = ("compute", "precompute")
ACTIVATIONS = {"identity": 0, "relu": 1}

# nnp_convolution_transform_strategy: "precompute" in this module means transform the kernel
# once (2) and then run every call with the transformed kernel (3).
_COMPUTE, _PRECOMPUTE, _REUSE = 1, 2, 3
# The codes of STRATEGIES, for callers that cannot pass strings (TVM RPC).
STRATEGY_CODES = {"compute": _COMPUTE, "precompute": _PRECOMPUTE}
# What run_pointers accepts: a plain run, or a run with a kernel transformed beforehand.
_RUN_CODES = {"compute": _COMPUTE, "reuse": _REUSE}

# nnp_status.  Three values are shared by two names in the header; we name the meaning that
# applies to convolutions first.
STATUS_NAMES = {
    0: "nnp_status_success",
    2: "nnp_status_invalid_batch_size",
    3: "nnp_status_invalid_channels",
    4: "nnp_status_invalid_input_channels",
    5: "nnp_status_invalid_output_channels",
    10: "nnp_status_invalid_input_size",
    11: "nnp_status_invalid_input_stride",
    12: "nnp_status_invalid_input_padding",
    13: "nnp_status_invalid_kernel_size/nnp_status_invalid_output_subsampling",
    14: "nnp_status_invalid_activation/nnp_status_invalid_pooling_size",
    15: "nnp_status_invalid_activation_parameters/nnp_status_invalid_pooling_stride",
    16: "nnp_status_invalid_algorithm",
    17: "nnp_status_invalid_transform_strategy",
    20: "nnp_status_unsupported_input_size",
    21: "nnp_status_unsupported_input_stride",
    22: "nnp_status_unsupported_input_padding",
    23: "nnp_status_unsupported_kernel_size",
    24: "nnp_status_unsupported_pooling_size",
    25: "nnp_status_unsupported_pooling_stride",
    26: "nnp_status_unsupported_algorithm",
    27: "nnp_status_unsupported_transform_strategy",
    28: "nnp_status_unsupported_activation",
    29: "nnp_status_unsupported_activation_parameters",
    50: "nnp_status_uninitialized",
    51: "nnp_status_unsupported_hardware",
    52: "nnp_status_out_of_memory",
    53: "nnp_status_insufficient_buffer",
    54: "nnp_status_misaligned_buffer",
}

_ADVICE = {
    12: "NNPACK needs every padding to be smaller than the kernel in that direction; "
    "pad the input yourself (numpy.pad) and pass the remainder as padding.",
    16: "Use one of workbench.nnpack.ALGORITHMS.",
    17: "Use strategy 'compute' or 'precompute'.",
    26: "This algorithm does not support this kernel size or stride on this CPU; "
    "see workbench.nnpack.applicable_algorithms(shape), or use 'auto'.",
    27: "This algorithm has no kernel transform to precompute; use strategy 'compute'.",
    50: "nnp_initialize() was not called or failed; create the Bridge again.",
    51: "NNPACK has no kernels for this CPU (x86-64 needs AVX2 and FMA3); use another "
    "implementation.",
    52: "NNPACK could not allocate its temporary buffers; free memory or use a smaller layer.",
    53: "The workspace is smaller than NNPACK asked for: a bug in workbench.nnpack.",
    54: "The workspace is not 64-byte aligned: a bug in workbench.nnpack.",
}

# Numerics bound per algorithm, as (rtol, atol) where atol is relative to the output scale:
# an output passes if |y - ref| <= atol * max|ref| + rtol * |ref| elementwise (see
# within_tolerance).  Measured max|y - ref| / max|ref| against a float64 PyTorch reference
# (random normal input, weights scaled 1/sqrt(fan-in); 3..256 channels, 12..192 px, 1x1 to
# 9x9 kernels), worst case per algorithm: wt8x8 1.5e-5 (grows with channels: 6e-6 at 16,
# 1.0e-5 at 128, 1.5e-5 at 256), ft8x8 2.4e-7, ft16x16 2.4e-7, implicit_gemm 5.9e-7,
# direct 1.1e-7.  The bounds leave about 7-10x margin for wider layers.
# wt8x8_fp16 really stores FP16 only on ARM (on x86 it is wt8x8, checked with wt8x8's bound).
# Measured on the emulated aarch64 board (qemu-user, torch 2.13's NNPACK, 2026-11-22, with
# benchmarks/fp16_winograd.py; 28 convs, 3..256 channels, 12..192 px, two inputs each): max
# relative error 1.2e-2 to 3.2e-2, median 1.9e-2 (worst: 3->128 and 3->16 channels; the tail
# grows with the image), 1000-6800x wt8x8's (at most 1.8e-5).  A numpy model of F(6x6,3x3) with
# FP16-rounded transforms gives 0.9e-2 to 2.4e-2 on the same convs: the error is FP16's, not
# qemu's.  The bound (rtol + atol = 6e-2) is about 2x the worst measured.
TOLERANCE: dict[str, tuple[float, float]] = {
    "auto": (1e-4, 1e-4),  # may pick wt8x8
    "ft8x8": (1e-5, 2e-6),
    "ft16x16": (1e-5, 2e-6),
    "wt8x8": (1e-4, 1e-4),
    "wt8x8_fp16": (1e-2, 5e-2),  # FP16 storage on ARM, measured on the emulated aarch64 board (above)
    "implicit_gemm": (1e-5, 5e-6),
    "direct": (1e-5, 2e-6),
}


def relative_error(y: np.ndarray, ref: np.ndarray) -> float:
    """max |y - ref| / max |ref|: an error scaled by the output magnitude."""
    ref = np.asarray(ref, dtype=np.float64)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    err = float(np.max(np.abs(np.asarray(y, dtype=np.float64) - ref))) if ref.size else 0.0
    return err / scale if scale > 0 else err


def within_tolerance(y: np.ndarray, ref: np.ndarray, algorithm: str) -> bool:
    """True if y matches ref within TOLERANCE[algorithm] (atol scaled by max |ref|)."""
    rtol, atol = TOLERANCE[algorithm]
    ref = np.asarray(ref, dtype=np.float64)
    scale = float(np.max(np.abs(ref))) if ref.size else 1.0
    return bool(np.allclose(np.asarray(y, dtype=np.float64), ref, rtol=rtol, atol=atol * scale))


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


class NNPACKError(WorkbenchError, RuntimeError):
    """NNPACK returned a status other than success."""

    def __init__(self, status: int, function: str, context: str = ""):
        self.status = status
        self.status_name = STATUS_NAMES.get(status, "unknown nnp_status")
        self.function = function
        advice = _ADVICE.get(status, "See nnp_status in NNPACK's include/nnpack.h.")
        where = f" for {context}" if context else ""
        super().__init__(f"{function} failed{where}: {self.status_name} ({status}). {advice}")


class NotApplicableError(WorkbenchError, ValueError):
    """The chosen algorithm/strategy does not apply to this convolution."""

    def __init__(self, shape: ConvGeometry, algorithm: str, strategy: str, reason: str,
                 name: str | None = None):
        self.shape, self.algorithm, self.strategy, self.reason = shape, algorithm, strategy, reason
        self.layer = name
        self.applicable = applicable_algorithms(shape, strategy)
        layer = f"layer {name!r} ({shape.describe()})" if name else shape.describe()
        options = ", ".join(self.applicable) or "none"
        super().__init__(
            f"{layer}: NNPACK algorithm {algorithm!r} with strategy {strategy!r} does not apply: "
            f"{reason}. Algorithms that apply here with strategy {strategy!r}: {options}."
        )


class NNPACKNameError(WorkbenchError, ValueError):
    """An algorithm, strategy or activation name NNPACK does not have."""


# --------------------------------------------------------------------------------------
# Shapes and applicability
# --------------------------------------------------------------------------------------


# The bridge's name for the workbench's one geometry type, kept so existing callers work.
ConvShape = ConvGeometry


def _check_names(algorithm: str, strategy: str = "compute", activation: str = "identity") -> None:
    if algorithm not in ALGORITHMS:
        raise NNPACKNameError(f"unknown NNPACK algorithm {algorithm!r}; choose from {list(ALGORITHMS)}")
    if strategy not in STRATEGIES:
        raise NNPACKNameError(f"unknown transform strategy {strategy!r}; choose from {list(STRATEGIES)}")
    if activation not in ACTIVATIONS:
        raise NNPACKNameError(f"unknown activation {activation!r}; choose from {list(ACTIVATIONS)}")


def auto_algorithm(shape: ConvGeometry) -> str:
    """The algorithm NNPACK's "auto" picks for this shape (a copy of its select_algorithm)."""
    kh, kw = shape.kernel_h, shape.kernel_w
    if shape.stride == 1:
        if max(kh, kw) == 1:
            return "direct"
        if (kh, kw) == (3, 3):
            return "wt8x8"
        if min(kh, kw) >= 2 and max(kh, kw) <= 8:
            def tiles(t: int) -> int:
                return -(-shape.out_height // (t - kh + 1)) * -(-shape.out_width // (t - kw + 1))
            return "ft8x8" if tiles(8) <= 4 * tiles(16) else "ft16x16"
        if min(kh, kw) >= 2 and max(kh, kw) <= 16:
            return "ft16x16"
    return "implicit_gemm"


def _algorithm_rule(shape: ConvGeometry, algorithm: str, strategy: str) -> str | None:
    """Why this explicit algorithm cannot run this shape, or None."""
    if algorithm in ("ft8x8", "ft16x16"):
        return fft_rule(shape, 8 if algorithm == "ft8x8" else 16)
    if algorithm in ("wt8x8", "wt8x8_fp16"):
        return winograd_rule(shape)  # F(6x6, 3x3)
    if algorithm == "direct":
        return _direct_rule(shape, strategy)
    return None  # implicit_gemm takes anything


def _direct_rule(shape: ConvGeometry, strategy: str) -> str | None:
    """NNPACK's direct kernel is a 1x1 stride-1 special case with nothing to precompute."""
    if (shape.kernel_h, shape.kernel_w) != (1, 1):
        return f"direct handles only 1x1 kernels, this one is {shape.kernel_h}x{shape.kernel_w}"
    if shape.stride != 1:
        return f"direct needs stride 1, this layer has stride {shape.stride}"
    if strategy == "precompute":
        return "direct has no kernel transform to precompute (nnp_status_unsupported_transform_strategy)"
    return None


def why_not_applicable(shape: ConvGeometry, algorithm: str, strategy: str = "compute") -> str | None:
    """A sentence saying why NNPACK cannot run ``shape`` this way, or None if it can."""
    _check_names(algorithm, strategy)
    if shape.is_grouped:
        kind = "a depthwise conv" if shape.is_depthwise else f"a conv of {shape.groups} groups"
        return (f"NNPACK has no grouped convolution; this is {kind} and nnp_convolution_inference "
                "computes one dense conv over all channels")
    top, right, bottom, left = shape.pad
    if max(top, bottom) >= shape.kernel_h or max(left, right) >= shape.kernel_w:
        return (f"NNPACK rejects padding >= kernel size (nnp_status_invalid_input_padding): "
                f"padding (top, right, bottom, left) {shape.pad} with a {shape.kernel_h}x{shape.kernel_w} kernel")
    if algorithm == "auto":
        chosen = auto_algorithm(shape)
        reason = _algorithm_rule(shape, chosen, strategy)
        return f"auto picks {chosen} for this shape, and {reason}" if reason else None
    return _algorithm_rule(shape, algorithm, strategy)


def applicable_algorithms(shape: ConvGeometry, strategy: str = "compute") -> list[str]:
    """Algorithm names (in ALGORITHMS order, "auto" included) that can run ``shape``."""
    return [a for a in ALGORITHMS if why_not_applicable(shape, a, strategy) is None]


def fp16_winograd(machine: str | None = None) -> tuple[bool, str]:
    """Whether NNPACK's wt8x8_fp16 really stores FP16 on ``machine`` (a ``platform.machine()``
    value; None: this process's CPU), and why, in a sentence.

    NNPACK takes the FP16 path when cpuinfo_has_arm_neon_fp16() holds, and falls through to
    wt8x8 otherwise.  On AArch64 that function is true on every CPU (FP16 conversions are base
    ARMv8); measured on the emulated aarch64 board, wt8x8_fp16's output differs from wt8x8's
    (1e-2 relative error against 1e-5), so it is no alias there.  On 32-bit ARM cpuinfo wants
    VFPv4 (read from /proc/cpuinfo for this CPU; a remote one is assumed to have it, as every
    core from the Cortex-A7 on does).  On x86 the output is identical to wt8x8's (tested).
    """
    local = machine is None
    arch = (platform.machine() if local else machine).lower()
    if arch in ("aarch64", "arm64"):
        return True, "NNPACK's NEON backend stores the Winograd transforms as FP16 on every ARM64 CPU"
    if arch.startswith("arm"):
        if local and not _has_vfpv4():
            return False, f"this {arch} CPU has no VFPv4 (no NEON-FP16 conversions): NNPACK runs wt8x8"
        return True, "NNPACK stores the Winograd transforms as FP16 on ARM with NEON and VFPv4"
    return False, f"NNPACK has FP16 Winograd only on ARM with NEON-FP16; on {arch or 'this CPU'} it runs wt8x8"


def _has_vfpv4() -> bool:
    try:
        features = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " neon" in features and " vfpv4" in features


def runs_as(algorithm: str, machine: str | None = None) -> str:
    """The algorithm that really runs on ``machine`` (None: this CPU): wt8x8_fp16 is wt8x8 on CPUs
    without NEON-FP16 (x86)."""
    _check_names(algorithm)
    if algorithm == "wt8x8_fp16" and not fp16_winograd(machine)[0]:
        return "wt8x8"
    return algorithm


def resolved_algorithm(shape: ConvGeometry, algorithm: str) -> str:
    """What NNPACK actually runs for ``shape``: resolves "auto", then :func:`runs_as`."""
    return runs_as(auto_algorithm(shape) if algorithm == "auto" else algorithm)


# --------------------------------------------------------------------------------------
# The C library
# --------------------------------------------------------------------------------------


class _Size(ctypes.Structure):
    _fields_ = [("width", ctypes.c_size_t), ("height", ctypes.c_size_t)]


class _Padding(ctypes.Structure):
    _fields_ = [("top", ctypes.c_size_t), ("right", ctypes.c_size_t),
                ("bottom", ctypes.c_size_t), ("left", ctypes.c_size_t)]


class _Profile(ctypes.Structure):
    _fields_ = [(name, ctypes.c_double) for name in
                ("total", "input_transform", "kernel_transform", "output_transform", "block_multiplication")]


def _library_path() -> Path:
    """libtorch_cpu.so of the installed torch; WORKBENCH_NNPACK_LIBRARY overrides it."""
    override = os.environ.get("WORKBENCH_NNPACK_LIBRARY")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        raise ImportError("workbench.nnpack needs the PyTorch CPU wheel (it ships NNPACK): pip install torch")
    lib_dir = Path(spec.origin).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        if (lib_dir / name).exists():
            return lib_dir / name
    raise ImportError(f"no libtorch_cpu library in {lib_dir}")


@functools.cache
def _library() -> ctypes.CDLL:
    """Load NNPACK (once), declare the prototypes we use and initialise it."""
    path = _library_path()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        import torch  # noqa: F401  loads libtorch_cpu's dependencies, then retry

        lib = ctypes.CDLL(str(path))
    c_size, c_ptr = ctypes.c_size_t, ctypes.c_void_p
    lib.nnp_initialize.restype = ctypes.c_int
    lib.nnp_initialize.argtypes = []
    lib.nnp_convolution_inference.restype = ctypes.c_int
    lib.nnp_convolution_inference.argtypes = [
        ctypes.c_int, ctypes.c_int,              # algorithm, transform_strategy
        c_size, c_size,                          # input_channels, output_channels
        _Size, _Padding, _Size, _Size,           # input_size, input_padding, kernel_size, output_subsampling
        c_ptr, c_ptr, c_ptr, c_ptr,              # input, kernel, bias, output
        c_ptr, ctypes.POINTER(c_size),           # workspace_buffer, workspace_size
        ctypes.c_int, c_ptr,                     # activation, activation_parameters
        c_ptr, ctypes.POINTER(_Profile),         # threadpool, profile
    ]
    lib.pthreadpool_create.restype = c_ptr
    lib.pthreadpool_create.argtypes = [c_size]
    lib.pthreadpool_destroy.restype = None
    lib.pthreadpool_destroy.argtypes = [c_ptr]
    # PyTorch may have initialised NNPACK already; a second call is harmless.  We never call
    # nnp_deinitialize: torch may still be using the library.
    status = lib.nnp_initialize()
    if status != 0:
        raise NNPACKError(status, "nnp_initialize")
    return lib


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass
class Profile:
    """NNPACK's per-phase times of one call, in seconds."""

    total: float = 0.0
    input_transform: float = 0.0
    kernel_transform: float = 0.0
    output_transform: float = 0.0
    block_multiplication: float = 0.0

    @classmethod
    def _from_struct(cls, p: _Profile) -> "Profile":
        return cls(p.total, p.input_transform, p.kernel_transform, p.output_transform, p.block_multiplication)

    def __add__(self, other: "Profile") -> "Profile":
        return Profile(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def _aligned_empty(nbytes: int, alignment: int = 64) -> np.ndarray:
    """A uint8 buffer of at least max(nbytes, alignment) bytes starting on an aligned address."""
    nbytes = max(int(nbytes), alignment)  # never empty: a NULL workspace means "size query"
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    offset = (-raw.ctypes.data) % alignment
    return raw[offset:offset + nbytes]


@dataclass
class TransformedKernel:
    """A kernel NNPACK transformed once (strategy precompute), for runs with reuse."""

    shape: ConvGeometry
    algorithm: str
    buffer: np.ndarray  # 64-byte-aligned bytes owned by this object
    profile: Profile  # of the transform call

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)

    @property
    def ptr(self) -> int:
        return int(self.buffer.ctypes.data)


class _KernelCache:
    """LRU of transformed kernels bounded by total bytes (ft16x16 kernels get large)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[Any, TransformedKernel] = OrderedDict()

    def get(self, key) -> TransformedKernel | None:
        tk = self._items.get(key)
        if tk is not None:
            self._items.move_to_end(key)
        return tk

    def put(self, key, tk: TransformedKernel) -> None:
        self._items[key] = tk
        while len(self._items) > 1 and sum(t.nbytes for t in self._items.values()) > self.max_bytes:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


# --------------------------------------------------------------------------------------
# The bridge
# --------------------------------------------------------------------------------------


def _as_input(x: np.ndarray, shape: ConvGeometry) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape not in (shape.input_shape, shape.input_shape[1:]):
        raise ValueError(f"input of shape {x.shape} does not match {shape.describe()} (want {shape.input_shape})")
    return x


def _as_weight(weight: np.ndarray, shape: ConvGeometry) -> np.ndarray:
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    if weight.shape != shape.weight_shape:
        raise ValueError(f"weight of shape {weight.shape} does not match {shape.describe()} "
                         f"(want {shape.weight_shape})")
    return weight


def _check_out(out: np.ndarray, shape: ConvGeometry, batched: bool) -> np.ndarray:
    want = shape.output_shape if batched else shape.output_shape[1:]
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or not out.flags.c_contiguous or out.shape != want:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {want}")
    return out


def _fingerprint(ptr: int, nbytes: int) -> bytes:
    """First, middle and last 64 bytes of a weight: catches a different weight at a reused address."""
    n = min(64, nbytes)
    return b"".join(ctypes.string_at(ptr + off, n) for off in (0, (nbytes - n) // 2, nbytes - n))


class Bridge:
    """Runs NNPACK convolutions; owns a pthreadpool, workspaces and transformed kernels.

    ``threads=1`` runs on the calling thread (NULL thread pool).  Calls on one Bridge are
    serialised (they share the workspace); use one Bridge per thread for parallel callers.
    """

    def __init__(self, threads: int = 1, kernel_cache_bytes: int = 512 << 20):
        if int(threads) != threads or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        self.threads = int(threads)
        self._lib = _library()
        self._pool = self._lib.pthreadpool_create(self.threads) if self.threads > 1 else None
        if self.threads > 1 and not self._pool:
            raise RuntimeError(f"pthreadpool_create({self.threads}) failed")
        self._lock = threading.RLock()
        self._workspace = _aligned_empty(0)
        self._workspace_sizes: dict[tuple, int] = {}
        self._kernels = _KernelCache(kernel_cache_bytes)
        self._zeros: dict[int, np.ndarray] = {}
        self._structs: dict[ConvGeometry, tuple] = {}

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Destroy the thread pool and drop buffers.  NNPACK itself stays initialised."""
        with self._lock:
            if self._pool:
                self._lib.pthreadpool_destroy(self._pool)
            self._pool = None
            self._kernels.clear()
            self._workspace_sizes.clear()
            self._workspace = _aligned_empty(0)

    def __enter__(self) -> "Bridge":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool:
            try:
                self._lib.pthreadpool_destroy(pool)
            except Exception:  # interpreter shutdown: ctypes may already be gone
                pass

    def clear_kernel_cache(self) -> None:
        """Forget transformed kernels (needed only if a weight changed in place)."""
        with self._lock:
            self._kernels.clear()

    # -- public API ----------------------------------------------------------------------

    def convolution(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                    shape: ConvGeometry | None = None, *, padding: int | Sequence[int] = 0, stride: int = 1,
                    algorithm: str = "auto", strategy: str = "compute", activation: str = "identity",
                    out: np.ndarray | None = None, name: str | None = None,
                    precheck: bool = True) -> tuple[np.ndarray, Profile]:
        """conv2d(x, weight) + bias, then the activation; returns (output, profile).

        ``x`` is (1, C, H, W) or (C, H, W); the output has the same rank.  ``padding`` and
        ``stride`` are used only when ``shape`` is None.  Strategy "precompute" transforms the
        kernel once (cached by weight content, shape and algorithm) and runs with reuse; the
        first call's profile includes the transform, later calls report kernel_transform 0.
        ``precheck=False`` skips the applicability rules so NNPACK itself judges the call.
        """
        _check_names(algorithm, strategy, activation)
        if shape is None:
            shape = ConvGeometry.from_arrays(np.shape(x), np.shape(weight), padding, stride)
        x, weight = _as_input(x, shape), _as_weight(weight, shape)
        if precheck:
            self.require_applicable(shape, algorithm, strategy, name)
        if strategy == "precompute":
            tk, first_profile = self._cached_transform(weight, shape, algorithm)
            y, profile = self.run_transformed(x, tk, bias, activation, out)
            return y, profile + first_profile
        y, bias = self._output(x, shape, out), self._bias(bias, shape)
        profile = self._run(shape, algorithm, _COMPUTE, x.ctypes.data, weight.ctypes.data, bias.ctypes.data,
                            y.ctypes.data, activation)
        return y, profile

    def transform_kernel(self, weight: np.ndarray, shape: ConvGeometry, algorithm: str = "auto") -> TransformedKernel:
        """Transform ``weight`` once for ``shape`` (strategy precompute); see run_transformed."""
        _check_names(algorithm, "precompute")
        weight = _as_weight(weight, shape)
        self.require_applicable(shape, algorithm, "precompute")
        return self._transform(weight.ctypes.data, shape, algorithm)

    def run_transformed(self, x: np.ndarray, tk: TransformedKernel, bias: np.ndarray | None,
                        activation: str = "identity", out: np.ndarray | None = None) -> tuple[np.ndarray, Profile]:
        """Run with a kernel from transform_kernel (strategy reuse): no kernel transform."""
        _check_names(tk.algorithm, "precompute", activation)
        x = _as_input(x, tk.shape)
        y, bias = self._output(x, tk.shape, out), self._bias(bias, tk.shape)
        profile = self._run(tk.shape, tk.algorithm, _REUSE, x.ctypes.data, tk.ptr, bias.ctypes.data,
                            y.ctypes.data, activation)
        return y, profile

    # -- pointer level: for callers that own their buffers (the TVM functions) ----------

    def require_applicable(self, shape: ConvGeometry, algorithm: str, strategy: str = "compute",
                           name: str | None = None) -> None:
        """Raise NotApplicableError (naming layer ``name`` if given) unless NNPACK can run this."""
        reason = why_not_applicable(shape, algorithm, strategy)
        if reason is not None:
            raise NotApplicableError(shape, algorithm, strategy, reason, name)

    def zero_bias(self, shape: ConvGeometry) -> np.ndarray:
        """K float32 zeros (cached per K): the bias of a convolution without one."""
        zeros = self._zeros.get(shape.out_channels)
        if zeros is None:
            zeros = self._zeros[shape.out_channels] = np.zeros(shape.out_channels, np.float32)
        return zeros

    def run_pointers(self, shape: ConvGeometry, algorithm: str, strategy: str, x_ptr: int, k_ptr: int,
                     b_ptr: int, y_ptr: int, activation: str = "identity") -> Profile:
        """One convolution on raw addresses; returns NNPACK's profile.

        Strategy "compute" reads the weight at ``k_ptr``; "reuse" reads a transformed kernel
        (``TransformedKernel.ptr`` from transformed_at or transform_kernel).  Only the names are
        checked: the caller guarantees contiguous float32 buffers of ``shape``'s sizes and
        should call require_applicable once per shape (NNPACK's own refusal is an NNPACKError).
        """
        code = _RUN_CODES.get(strategy)
        if code is None:
            raise NNPACKNameError(f"unknown run strategy {strategy!r}; choose from {list(_RUN_CODES)}")
        _check_names(algorithm, activation=activation)
        return self._run(shape, algorithm, code, x_ptr, k_ptr, b_ptr, y_ptr, activation)

    def transformed_at(self, w_ptr: int, shape: ConvGeometry,
                       algorithm: str) -> tuple[TransformedKernel, Profile | None]:
        """The weight at ``w_ptr`` transformed for reuse, once per weight buffer.

        Cached by address and a sample of the bytes (first, middle and last 64), not the whole
        content: hashing a large weight on every call would cost more than the call.  This
        assumes weights are constants (a compiled model's parameters are); after changing one
        in place call clear_kernel_cache.  The profile is the transform's when this call
        transformed, None when the kernel came from the cache.
        """
        _check_names(algorithm, "precompute")
        nbytes = 4 * math.prod(shape.weight_shape)
        key = ("address", shape, algorithm, w_ptr, _fingerprint(w_ptr, nbytes))
        with self._lock:
            tk = self._kernels.get(key)
            if tk is not None:
                return tk, None
            tk = self._transform(w_ptr, shape, algorithm)
            self._kernels.put(key, tk)
            return tk, tk.profile

    # -- internals -----------------------------------------------------------------------

    def _bias(self, bias: np.ndarray | None, shape: ConvGeometry) -> np.ndarray:
        """bias as K contiguous float32 values; zeros (cached) when None."""
        if bias is None:
            return self.zero_bias(shape)
        bias = np.ascontiguousarray(bias, dtype=np.float32)
        if bias.shape != (shape.out_channels,):
            raise ValueError(f"bias must have shape ({shape.out_channels},), got {bias.shape}")
        return bias

    def _output(self, x: np.ndarray, shape: ConvGeometry, out: np.ndarray | None) -> np.ndarray:
        """The output array: ``out`` checked, or a new one of x's rank."""
        batched = x.ndim == 4
        if out is not None:
            return _check_out(out, shape, batched)
        return np.empty(shape.output_shape if batched else shape.output_shape[1:], np.float32)

    def _cached_transform(self, weight: np.ndarray, shape: ConvGeometry, algorithm: str):
        """Transformed kernel for this weight content; the profile is zero when cached."""
        # Content, not address: a converted copy of the same weight must hit the cache.
        key = (shape, algorithm, zlib.crc32(memoryview(weight).cast("B")),
               _fingerprint(weight.ctypes.data, weight.nbytes))
        with self._lock:
            tk = self._kernels.get(key)
            if tk is not None:
                return tk, Profile()
            tk = self._transform(weight.ctypes.data, shape, algorithm)
            self._kernels.put(key, tk)
            return tk, tk.profile

    def _transform(self, weight_ptr: int, shape: ConvGeometry, algorithm: str) -> TransformedKernel:
        with self._lock:
            size = self._query(shape, algorithm, _PRECOMPUTE, weight_ptr)
            buffer = _aligned_empty(size)
            nbytes = ctypes.c_size_t(buffer.nbytes)
            profile = self._call(shape, algorithm, _PRECOMPUTE, None, weight_ptr, None, None,
                                 buffer.ctypes.data, nbytes, ACTIVATIONS["identity"])
            return TransformedKernel(shape, algorithm, buffer, profile)

    def _structs_for(self, shape: ConvGeometry) -> tuple:
        structs = self._structs.get(shape)
        if structs is None:
            structs = self._structs[shape] = (
                _Size(shape.width, shape.height), _Padding(*shape.pad),
                _Size(shape.kernel_w, shape.kernel_h), _Size(shape.stride, shape.stride))
        return structs

    def _call(self, shape: ConvGeometry, algorithm: str, strategy_code: int, x_ptr, k_ptr, b_ptr, y_ptr,
              workspace_ptr, workspace_size: ctypes.c_size_t, activation_code: int) -> Profile:
        """One nnp_convolution_inference call; raises NNPACKError on a failure status."""
        if self._pool is None and self.threads > 1:
            raise RuntimeError("this Bridge is closed")
        profile = _Profile()
        status = self._lib.nnp_convolution_inference(
            ALGORITHMS[algorithm], strategy_code, shape.in_channels, shape.out_channels,
            *self._structs_for(shape), x_ptr, k_ptr, b_ptr, y_ptr,
            workspace_ptr, ctypes.byref(workspace_size), activation_code, None, self._pool, ctypes.byref(profile))
        if status != 0:
            strategy = {_COMPUTE: "compute", _PRECOMPUTE: "precompute", _REUSE: "reuse"}[strategy_code]
            raise NNPACKError(status, "nnp_convolution_inference",
                              f"{shape.describe()}, algorithm {algorithm}, strategy {strategy}")
        return Profile._from_struct(profile)

    def _query(self, shape: ConvGeometry, algorithm: str, strategy_code: int, weight_ptr=None) -> int:
        """Workspace bytes NNPACK wants (NULL workspace = size query), remembered per key."""
        key = (shape, algorithm, strategy_code)
        size = self._workspace_sizes.get(key)
        if size is None:
            nbytes = ctypes.c_size_t(0)
            self._call(shape, algorithm, strategy_code, None, weight_ptr, None, None, None, nbytes,
                       ACTIVATIONS["identity"])
            size = self._workspace_sizes[key] = nbytes.value
        return size

    def _run(self, shape: ConvGeometry, algorithm: str, strategy_code: int, x_ptr: int, k_ptr: int, b_ptr: int,
             y_ptr: int, activation: str) -> Profile:
        """Run compute or reuse with the shared, grow-only, 64-byte-aligned workspace."""
        with self._lock:
            size = self._query(shape, algorithm, strategy_code, k_ptr)
            if self._workspace.nbytes < size:
                self._workspace = _aligned_empty(size)
            nbytes = ctypes.c_size_t(self._workspace.nbytes)
            return self._call(shape, algorithm, strategy_code, x_ptr, k_ptr, b_ptr, y_ptr,
                              self._workspace.ctypes.data, nbytes, ACTIVATIONS[activation])


# --------------------------------------------------------------------------------------
# One bridge per process and thread count
# --------------------------------------------------------------------------------------

_SHARED: dict[tuple[int, int], Bridge] = {}
_SHARED_LOCK = threading.Lock()


def shared_bridge(threads: int = 1) -> Bridge:
    """The process-wide Bridge for ``threads``; never closed (TVM functions may hold it).

    Keyed by process id too: an RPC server forks a process per session, and a thread pool
    made before the fork has no threads in the child.
    """
    key = (os.getpid(), threads)
    with _SHARED_LOCK:
        bridge = _SHARED.get(key)
        if bridge is None:
            bridge = _SHARED[key] = Bridge(threads)
        return bridge
