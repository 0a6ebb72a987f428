"""The NNPACK bridge: every NNPACK convolution algorithm and transform strategy, from Python and TVM.

The real NNPACK library ships inside the PyTorch CPU wheel (``torch/lib/libtorch_cpu.so``);
PyTorch picks one algorithm for us, this module calls ``nnp_convolution_inference`` directly
through ctypes so that a study can choose the algorithm, the kernel-transform strategy and
the fused activation, and read NNPACK's own per-phase profile.

Main entry points:

- :class:`ConvShape` describes one batch-1 NCHW float32 convolution.
- :func:`why_not_applicable` / :func:`applicable_algorithms`: the applicability rules, so a
  sweep says "not applicable" instead of crashing.
- :class:`Bridge` owns a thread pool and workspaces and runs convolutions, returning the
  output and a :class:`Profile`.
- :func:`register_tvm_functions` registers TVM global functions (destination-passing style)
  that a Relax VM reaches with ``relax.call_dps_packed`` and TE with ``te.extern``.

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
  and crash, so :class:`ConvShape` refuses shapes whose output would be empty.
- ft8x8/ft16x16/wt8x8 with stride > 1, wt8x8 with a non-3x3 kernel, ft8x8 above 8x8 and
  ft16x16 above 16x16, direct with a non-1x1 kernel or stride > 1: status 26
  (``nnp_status_unsupported_algorithm``).  direct with precompute: status 27.
- ``wt8x8_fp16`` silently runs ``wt8x8`` unless the CPU has ARM NEON-FP16.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib.util
import os
import platform
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "ACTIVATIONS",
    "ALGORITHMS",
    "STRATEGIES",
    "STATUS_NAMES",
    "TOLERANCE",
    "Bridge",
    "ConvShape",
    "NNPACKError",
    "NotApplicableError",
    "Profile",
    "TransformedKernel",
    "applicable_algorithms",
    "auto_algorithm",
    "overhead_vs_direct",
    "register_tvm_functions",
    "relative_error",
    "relax_conv2d",
    "relax_vm",
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
TOLERANCE: dict[str, tuple[float, float]] = {
    "auto": (1e-4, 1e-4),  # may pick wt8x8
    "ft8x8": (1e-5, 2e-6),
    "ft16x16": (1e-5, 2e-6),
    "wt8x8": (1e-4, 1e-4),
    "wt8x8_fp16": (1e-2, 5e-3),  # FP16 storage on ARM (not measured here); on x86 it is wt8x8
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


class NNPACKError(RuntimeError):
    """NNPACK returned a status other than success."""

    def __init__(self, status: int, function: str, context: str = ""):
        self.status = status
        self.status_name = STATUS_NAMES.get(status, "unknown nnp_status")
        self.function = function
        advice = _ADVICE.get(status, "See nnp_status in NNPACK's include/nnpack.h.")
        where = f" for {context}" if context else ""
        super().__init__(f"{function} failed{where}: {self.status_name} ({status}). {advice}")


class NotApplicableError(ValueError):
    """The chosen algorithm/strategy does not apply to this convolution."""

    def __init__(self, shape: "ConvShape", algorithm: str, strategy: str, reason: str,
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


# --------------------------------------------------------------------------------------
# Shapes and applicability
# --------------------------------------------------------------------------------------


def _as_padding(pad: int | Sequence[int]) -> tuple[int, int, int, int]:
    """int -> all sides; (vertical, horizontal); or (top, right, bottom, left) as NNPACK."""
    if isinstance(pad, (int, np.integer)):
        return (int(pad),) * 4
    pad = tuple(int(p) for p in pad)
    if len(pad) == 2:
        return (pad[0], pad[1], pad[0], pad[1])
    if len(pad) == 4:
        return pad  # type: ignore[return-value]
    raise ValueError(f"padding must be an int, (vertical, horizontal) or (top, right, bottom, left), got {pad}")


@dataclass(frozen=True)
class ConvShape:
    """One convolution: batch 1, NCHW, float32, bias, square stride.

    ``pad`` is (top, right, bottom, left), NNPACK's order; an int or a 2-tuple
    (vertical, horizontal) is accepted and normalised.
    """

    in_channels: int
    out_channels: int
    height: int
    width: int
    kernel_h: int
    kernel_w: int
    stride: int = 1
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)

    def __post_init__(self):
        object.__setattr__(self, "pad", _as_padding(self.pad))
        for field in ("in_channels", "out_channels", "height", "width", "kernel_h", "kernel_w", "stride"):
            value = getattr(self, field)
            if int(value) != value or value < 1:
                raise ValueError(f"ConvShape.{field} must be a positive integer, got {value!r}")
            object.__setattr__(self, field, int(value))
        if min(self.pad) < 0:
            raise ValueError(f"ConvShape.pad must be non-negative, got {self.pad}")
        # NNPACK would wrap the output size around (size_t) and crash: refuse early.
        top, right, bottom, left = self.pad
        if self.height + top + bottom < self.kernel_h or self.width + left + right < self.kernel_w:
            raise ValueError(f"kernel {self.kernel_h}x{self.kernel_w} is larger than the padded input "
                             f"of {self.describe()}")

    @classmethod
    def from_arrays(cls, x_shape: Sequence[int], w_shape: Sequence[int], padding: int | Sequence[int] = 0,
                    stride: int = 1) -> "ConvShape":
        """Shape of conv(x, w): x is (1, C, H, W) or (C, H, W), w is (K, C, kh, kw)."""
        x_shape, w_shape = tuple(x_shape), tuple(w_shape)
        if len(x_shape) == 4:
            if x_shape[0] != 1:
                raise ValueError(f"NNPACK inference takes batch 1, got input shape {x_shape}")
            x_shape = x_shape[1:]
        if len(x_shape) != 3 or len(w_shape) != 4:
            raise ValueError(f"expected x (1,C,H,W) or (C,H,W) and w (K,C,kh,kw), got {x_shape} and {w_shape}")
        if x_shape[0] != w_shape[1]:
            raise ValueError(f"input has {x_shape[0]} channels but the kernel expects {w_shape[1]}")
        return cls(x_shape[0], w_shape[0], x_shape[1], x_shape[2], w_shape[2], w_shape[3], stride, _as_padding(padding))

    @property
    def out_height(self) -> int:
        return (self.height + self.pad[0] + self.pad[2] - self.kernel_h) // self.stride + 1

    @property
    def out_width(self) -> int:
        return (self.width + self.pad[1] + self.pad[3] - self.kernel_w) // self.stride + 1

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, self.in_channels, self.height, self.width)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels, self.kernel_h, self.kernel_w)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (1, self.out_channels, self.out_height, self.out_width)

    @property
    def flops(self) -> int:
        """Multiply-adds counted as 2 FLOPs, direct-convolution count."""
        macs = self.out_channels * self.in_channels * self.kernel_h * self.kernel_w * self.out_height * self.out_width
        return 2 * macs

    def describe(self) -> str:
        pad = f" pad {self.pad}" if any(self.pad) else ""
        stride = f" stride {self.stride}" if self.stride != 1 else ""
        return (f"{self.in_channels}->{self.out_channels} {self.height}x{self.width} "
                f"kernel {self.kernel_h}x{self.kernel_w}{stride}{pad}")


def _check_names(algorithm: str, strategy: str = "compute", activation: str = "identity") -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown NNPACK algorithm {algorithm!r}; choose from {list(ALGORITHMS)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown transform strategy {strategy!r}; choose from {list(STRATEGIES)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {list(ACTIVATIONS)}")


def auto_algorithm(shape: ConvShape) -> str:
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


def _algorithm_rule(shape: ConvShape, algorithm: str, strategy: str) -> str | None:
    """Why this explicit algorithm cannot run this shape, or None."""
    kernel = f"{shape.kernel_h}x{shape.kernel_w}"
    stride_1 = f"{algorithm} needs stride 1, this layer has stride {shape.stride}"
    if algorithm in ("ft8x8", "ft16x16"):
        limit = 8 if algorithm == "ft8x8" else 16
        if max(shape.kernel_h, shape.kernel_w) > limit:
            return f"{algorithm} handles kernels up to {limit}x{limit}, this one is {kernel}"
        return stride_1 if shape.stride != 1 else None
    if algorithm in ("wt8x8", "wt8x8_fp16"):
        if (shape.kernel_h, shape.kernel_w) != (3, 3):
            return f"{algorithm} (Winograd F(6x6,3x3)) handles only 3x3 kernels, this one is {kernel}"
        return stride_1 if shape.stride != 1 else None
    if algorithm == "direct":
        if (shape.kernel_h, shape.kernel_w) != (1, 1):
            return f"direct handles only 1x1 kernels, this one is {kernel}"
        if shape.stride != 1:
            return stride_1
        if strategy == "precompute":
            return "direct has no kernel transform to precompute (nnp_status_unsupported_transform_strategy)"
    return None  # implicit_gemm takes anything


def why_not_applicable(shape: ConvShape, algorithm: str, strategy: str = "compute") -> str | None:
    """A sentence saying why NNPACK cannot run ``shape`` this way, or None if it can."""
    _check_names(algorithm, strategy)
    top, right, bottom, left = shape.pad
    if max(top, bottom) >= shape.kernel_h or max(left, right) >= shape.kernel_w:
        return (f"NNPACK rejects padding >= kernel size (nnp_status_invalid_input_padding): "
                f"padding (top, right, bottom, left) {shape.pad} with a {shape.kernel_h}x{shape.kernel_w} kernel")
    if algorithm == "auto":
        chosen = auto_algorithm(shape)
        reason = _algorithm_rule(shape, chosen, strategy)
        return f"auto picks {chosen} for this shape, and {reason}" if reason else None
    return _algorithm_rule(shape, algorithm, strategy)


def applicable_algorithms(shape: ConvShape, strategy: str = "compute") -> list[str]:
    """Algorithm names (in ALGORITHMS order, "auto" included) that can run ``shape``."""
    return [a for a in ALGORITHMS if why_not_applicable(shape, a, strategy) is None]


@functools.cache
def _fp16_winograd_available() -> bool:
    """Whether NNPACK's wt8x8_fp16 really uses FP16: only ARM with NEON-FP16 conversions.

    NNPACK enables it when cpuinfo reports NEON-FP16.  Every AArch64 CPU has it; on 32-bit
    ARM we look for VFPv4 (which implies the NEON half-precision conversions).  Only the x86
    answer (False) is verified on this machine.
    """
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    if machine.startswith("arm"):
        try:
            features = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return " neon" in features and " vfpv4" in features
    return False


def runs_as(algorithm: str) -> str:
    """The algorithm that really runs: wt8x8_fp16 is wt8x8 on CPUs without NEON-FP16 (x86)."""
    _check_names(algorithm)
    if algorithm == "wt8x8_fp16" and not _fp16_winograd_available():
        return "wt8x8"
    return algorithm


def resolved_algorithm(shape: ConvShape, algorithm: str) -> str:
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

    shape: ConvShape
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


def _as_input(x: np.ndarray, shape: ConvShape) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape not in (shape.input_shape, shape.input_shape[1:]):
        raise ValueError(f"input of shape {x.shape} does not match {shape.describe()} (want {shape.input_shape})")
    return x


def _as_weight(weight: np.ndarray, shape: ConvShape) -> np.ndarray:
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    if weight.shape != shape.weight_shape:
        raise ValueError(f"weight of shape {weight.shape} does not match {shape.describe()} "
                         f"(want {shape.weight_shape})")
    return weight


def _check_out(out: np.ndarray, shape: ConvShape, batched: bool) -> np.ndarray:
    want = shape.output_shape if batched else shape.output_shape[1:]
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or not out.flags.c_contiguous or out.shape != want:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {want}")
    return out


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
        self._structs: dict[ConvShape, tuple] = {}

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
                    shape: ConvShape | None = None, *, padding: int | Sequence[int] = 0, stride: int = 1,
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
            shape = ConvShape.from_arrays(np.shape(x), np.shape(weight), padding, stride)
        x, weight = _as_input(x, shape), _as_weight(weight, shape)
        if precheck:
            self._require_applicable(shape, algorithm, strategy, name)
        if strategy == "precompute":
            tk, first_profile = self._cached_transform(weight, shape, algorithm)
            y, profile = self.run_transformed(x, tk, bias, activation, out)
            return y, profile + first_profile
        y, bias = self._output(x, shape, out), self._bias(bias, shape)
        profile = self._run(shape, algorithm, _COMPUTE, x.ctypes.data, weight.ctypes.data, bias.ctypes.data,
                            y.ctypes.data, activation)
        return y, profile

    def transform_kernel(self, weight: np.ndarray, shape: ConvShape, algorithm: str = "auto") -> TransformedKernel:
        """Transform ``weight`` once for ``shape`` (strategy precompute); see run_transformed."""
        _check_names(algorithm, "precompute")
        weight = _as_weight(weight, shape)
        self._require_applicable(shape, algorithm, "precompute", None)
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

    # -- internals -----------------------------------------------------------------------

    def _require_applicable(self, shape: ConvShape, algorithm: str, strategy: str, name: str | None) -> None:
        reason = why_not_applicable(shape, algorithm, strategy)
        if reason is not None:
            raise NotApplicableError(shape, algorithm, strategy, reason, name)

    def _bias(self, bias: np.ndarray | None, shape: ConvShape) -> np.ndarray:
        """bias as K contiguous float32 values; zeros (cached) when None."""
        if bias is None:
            zeros = self._zeros.get(shape.out_channels)
            if zeros is None:
                zeros = self._zeros[shape.out_channels] = np.zeros(shape.out_channels, np.float32)
            return zeros
        bias = np.ascontiguousarray(bias, dtype=np.float32)
        if bias.shape != (shape.out_channels,):
            raise ValueError(f"bias must have shape ({shape.out_channels},), got {bias.shape}")
        return bias

    def _output(self, x: np.ndarray, shape: ConvShape, out: np.ndarray | None) -> np.ndarray:
        """The output array: ``out`` checked, or a new one of x's rank."""
        batched = x.ndim == 4
        if out is not None:
            return _check_out(out, shape, batched)
        return np.empty(shape.output_shape if batched else shape.output_shape[1:], np.float32)

    def _cached_transform(self, weight: np.ndarray, shape: ConvShape, algorithm: str):
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

    def _transform(self, weight_ptr: int, shape: ConvShape, algorithm: str) -> TransformedKernel:
        with self._lock:
            size = self._query(shape, algorithm, _PRECOMPUTE, weight_ptr)
            buffer = _aligned_empty(size)
            nbytes = ctypes.c_size_t(buffer.nbytes)
            profile = self._call(shape, algorithm, _PRECOMPUTE, None, weight_ptr, None, None,
                                 buffer.ctypes.data, nbytes, ACTIVATIONS["identity"])
            return TransformedKernel(shape, algorithm, buffer, profile)

    def _structs_for(self, shape: ConvShape) -> tuple:
        structs = self._structs.get(shape)
        if structs is None:
            structs = self._structs[shape] = (
                _Size(shape.width, shape.height), _Padding(*shape.pad),
                _Size(shape.kernel_w, shape.kernel_h), _Size(shape.stride, shape.stride))
        return structs

    def _call(self, shape: ConvShape, algorithm: str, strategy_code: int, x_ptr, k_ptr, b_ptr, y_ptr,
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

    def _query(self, shape: ConvShape, algorithm: str, strategy_code: int, weight_ptr=None) -> int:
        """Workspace bytes NNPACK wants (NULL workspace = size query), remembered per key."""
        key = (shape, algorithm, strategy_code)
        size = self._workspace_sizes.get(key)
        if size is None:
            nbytes = ctypes.c_size_t(0)
            self._call(shape, algorithm, strategy_code, None, weight_ptr, None, None, None, nbytes,
                       ACTIVATIONS["identity"])
            size = self._workspace_sizes[key] = nbytes.value
        return size

    def _run(self, shape: ConvShape, algorithm: str, strategy_code: int, x_ptr: int, k_ptr: int, b_ptr: int,
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
# Shared bridges and TVM global functions
# --------------------------------------------------------------------------------------

_SHARED: dict[int, Bridge] = {}
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


CONV2D = "workbench.nnpack.conv2d"
CONV2D_PREPACKED = "workbench.nnpack.conv2d_prepacked"
LAST_PROFILE = "workbench.nnpack.last_profile"
SET_THREADS = "workbench.nnpack.set_threads"
SHARE_CORES = "workbench.nnpack.share_cores_with_tvm"

# Positional attributes between (x, w, b) and the trailing output, with their defaults.
_CONV2D_ATTRS = (("pad_top", 0), ("pad_right", 0), ("pad_bottom", 0), ("pad_left", 0), ("stride", 1),
                 ("algorithm", "auto"), ("strategy", "compute"), ("activation", "identity"))
_PREPACKED_ATTRS = tuple(a for a in _CONV2D_ATTRS if a[0] != "strategy")


STRATEGY_CODES = {"compute": _COMPUTE, "precompute": _PRECOMPUTE}


def _name(value: Any, codes: dict[str, int]) -> str:
    """An attribute given by name or by its NNPACK code (TVM RPC cannot carry strings)."""
    if isinstance(value, str):
        return value
    by_code = {code: name for name, code in codes.items()}
    if int(value) not in by_code:
        raise ValueError(f"unknown code {value}; expected one of {by_code}")
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


def _fingerprint(ptr: int, nbytes: int) -> bytes:
    """First, middle and last 64 bytes of a weight: catches a different weight at a reused address."""
    n = min(64, nbytes)
    return b"".join(ctypes.string_at(ptr + off, n) for off in (0, (nbytes - n) // 2, nbytes - n))


@dataclass(frozen=True)
class _Plan:
    """What one packed-call signature means, validated once."""

    shape: ConvShape
    algorithm: str
    strategy: str
    activation: str
    out_shape: tuple[int, ...]
    weight_nbytes: int


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
        shape = ConvShape.from_arrays(x_shape, w_shape, pad, int(attrs["stride"]))
        self.bridge._require_applicable(shape, algorithm, strategy, None)
        out_shape = shape.output_shape if len(x_shape) == 4 else shape.output_shape[1:]
        return _Plan(shape, algorithm, strategy, activation, out_shape, 4 * int(np.prod(w_shape)))

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
            b_ptr = bridge._bias(None, shape).ctypes.data
        else:
            b_ptr = _tensor_ptr(b, "b", (shape.out_channels,))
        if plan.strategy == "compute":
            profile = bridge._run(shape, plan.algorithm, _COMPUTE, x_ptr, w_ptr, b_ptr, y_ptr, plan.activation)
        else:
            tk = self._transformed(bridge, plan, w_ptr)
            profile = bridge._run(shape, plan.algorithm, _REUSE, x_ptr, tk.ptr, b_ptr, y_ptr, plan.activation)
        _LAST_PROFILE["run"] = profile.to_dict()

    def _transformed(self, bridge: Bridge, plan: _Plan, w_ptr: int) -> TransformedKernel:
        """Transform once per weight buffer (address + sampled bytes); weights are constants."""
        key = ("tvm", plan.shape, plan.algorithm, w_ptr, _fingerprint(w_ptr, plan.weight_nbytes))
        with bridge._lock:
            tk = bridge._kernels.get(key)
            if tk is None:
                tk = bridge._transform(w_ptr, plan.shape, plan.algorithm)
                bridge._kernels.put(key, tk)
                _LAST_PROFILE["transform"] = tk.profile.to_dict()
            return tk


def last_profile_json() -> str:
    """JSON of the latest packed call's phases ("run") and the latest kernel transform ("transform")."""
    import json

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


def relax_conv2d(x, w, b, shape: ConvShape, *, algorithm: str = "auto", strategy: str = "compute",
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


# --------------------------------------------------------------------------------------
# Overhead of the TVM path
# --------------------------------------------------------------------------------------


def _blocked_medians(fns: dict[str, Any], repeat: int, blocks: int = 10) -> dict[str, float]:
    """Median seconds per call of each function.

    Calls run in blocks (each path keeps its own kernel and tensors in cache, as in steady
    state) and the blocks rotate over the functions, so machine drift hits all alike.
    """
    import time

    per_block = max(1, repeat // blocks)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(blocks):
        for name, fn in fns.items():
            fn()  # warm this path's data after the other paths ran
            for _ in range(per_block):
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    return {name: float(np.median(s)) for name, s in samples.items()}


def _relax_module(shape: ConvShape, algorithm: str, strategy: str, activation: str):
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


def relax_vm(shape: ConvShape, algorithm: str = "auto", strategy: str = "compute", activation: str = "identity"):
    """A Relax VM whose ``main(x, w, b)`` runs this NNPACK convolution (for tests and timing)."""
    import tvm
    from tvm import relax

    mod = _relax_module(shape, algorithm, strategy, activation)
    executable = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    return relax.VirtualMachine(executable, tvm.cpu())


def overhead_vs_direct(shapes: Sequence[ConvShape] | None = None, *, algorithm: str = "wt8x8",
                       strategy: str = "precompute", threads: int = 1, repeat: int = 30,
                       seed: int = 0) -> list[dict[str, Any]]:
    """Median time of one convolution called three ways, and the TVM overhead.

    - direct: ``Bridge.run_transformed`` (or ``convolution``) with a preallocated output;
    - packed: the registered global function called from Python;
    - relax: a Relax VM calling it through ``call_dps_packed`` (allocates its output).
    Defaults to the UNet middle layers 64->64 48x48 and 128->128 24x24, 3x3 pad 1.  The
    three are timed in rotating blocks.  Registers the TVM functions for ``threads`` (replacing
    earlier registrations).
    """
    import tvm
    import tvm_ffi

    if shapes is None:
        shapes = [ConvShape(64, 64, 48, 48, 3, 3, 1, 1), ConvShape(128, 128, 24, 24, 3, 3, 1, 1)]
    register_tvm_functions(threads)
    bridge = shared_bridge(threads)
    rng = np.random.default_rng(seed)
    rows = []
    for shape in shapes:
        x = rng.standard_normal(shape.input_shape, dtype=np.float32)
        w = rng.standard_normal(shape.weight_shape, dtype=np.float32)
        b = rng.standard_normal(shape.out_channels, dtype=np.float32)
        y = np.empty(shape.output_shape, np.float32)
        if strategy == "precompute":
            tk = bridge.transform_kernel(w, shape, algorithm)
            direct = lambda: bridge.run_transformed(x, tk, b, out=y)  # noqa: E731
            name, attrs = CONV2D_PREPACKED, [*shape.pad, shape.stride, algorithm]
        else:
            direct = lambda: bridge.convolution(x, w, b, shape, algorithm=algorithm, out=y)  # noqa: E731
            name, attrs = CONV2D, [*shape.pad, shape.stride, algorithm, strategy]
        xt, wt, bt = (tvm.runtime.tensor(a) for a in (x, w, b))
        yt = tvm.runtime.tensor(y)
        func = tvm_ffi.get_global_func(name)
        vm = relax_vm(shape, algorithm, strategy)
        times = _blocked_medians({
            "direct": direct,
            "packed": lambda: func(xt, wt, bt, *attrs, yt),
            "relax": lambda: vm["main"](xt, wt, bt),
        }, repeat)
        rows.append({
            "shape": shape.describe(), "algorithm": algorithm, "strategy": strategy, "threads": threads,
            **{f"{k}_ms": v * 1e3 for k, v in times.items()},
            "packed_overhead_us": (times["packed"] - times["direct"]) * 1e6,
            "relax_overhead_us": (times["relax"] - times["direct"]) * 1e6,
            "relax_overhead_pct": 100 * (times["relax"] / times["direct"] - 1),
        })
    return rows
