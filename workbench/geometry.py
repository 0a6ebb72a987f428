"""The one description of a convolution's geometry, and the algorithm families' rules beside it.

Every part of the workbench that reasons about a conv (the layer table, NNPACK's bridge, the
TensorIR schedules, tuning) uses :class:`ConvGeometry`: batch 1, NCHW, float32, with bias.
The mathematical rules of each algorithm family (Winograd, FFT) are written here once;
libraries add their own limits on top (NNPACK's padding rule, its 1x1-only direct kernel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import WorkbenchError

WINOGRAD_TILES = (2, 4, 6)  # F(m x m, 3 x 3)
FFT_SIZES = (8, 16)


class GeometryError(WorkbenchError, ValueError):
    """A convolution that cannot exist (empty output, non-positive sizes, bad padding)."""


def as_padding(pad: int | Sequence[int]) -> tuple[int, int, int, int]:
    """int -> all sides; (vertical, horizontal); or (top, right, bottom, left), NNPACK's order."""
    if isinstance(pad, bool):
        raise GeometryError(f"padding must be an integer, got {pad!r}")
    if hasattr(pad, "__index__"):
        return (int(pad),) * 4
    pad = tuple(int(p) for p in pad)
    if len(pad) == 2:
        return (pad[0], pad[1], pad[0], pad[1])
    if len(pad) == 4:
        return pad  # type: ignore[return-value]
    raise GeometryError(f"padding must be an int, (vertical, horizontal) or (top, right, bottom, left), got {pad}")


@dataclass(frozen=True)
class ConvGeometry:
    """One convolution: batch 1, NCHW, float32, bias, the same stride along both axes.

    ``pad`` is (top, right, bottom, left); an int or a 2-tuple (vertical, horizontal) is
    accepted and normalised. ``groups`` splits the channels into independent convolutions
    (groups == in_channels == out_channels: a depthwise conv).
    """

    in_channels: int
    out_channels: int
    height: int
    width: int
    kernel_h: int
    kernel_w: int
    stride: int = 1
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)
    groups: int = 1

    def __post_init__(self):
        object.__setattr__(self, "pad", as_padding(self.pad))
        for name in ("in_channels", "out_channels", "height", "width", "kernel_h", "kernel_w", "stride", "groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise GeometryError(f"conv {name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if min(self.pad) < 0:
            raise GeometryError(f"conv padding must be non-negative, got {self.pad}")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise GeometryError(f"groups={self.groups} must divide both channel counts "
                                f"({self.in_channels} in, {self.out_channels} out)")
        # An empty output would make NNPACK wrap its size around and crash: refuse early.
        if self.out_height < 1 or self.out_width < 1:
            raise GeometryError(f"kernel {self.kernel_h}x{self.kernel_w} is larger than the padded input "
                                f"of {self.describe()}")

    @classmethod
    def square(cls, in_channels: int, out_channels: int, height: int, width: int, kernel: int = 3,
               stride: int = 1, pad: int = 1, groups: int = 1) -> "ConvGeometry":
        """The common case: a square kernel and the same padding on every side."""
        return cls(in_channels, out_channels, height, width, kernel, kernel, stride, pad, groups)

    @classmethod
    def from_arrays(cls, x_shape: Sequence[int], w_shape: Sequence[int], padding: int | Sequence[int] = 0,
                    stride: int = 1) -> "ConvGeometry":
        """Geometry of conv(x, w): x is (1, C, H, W) or (C, H, W), w is (K, C, kh, kw)."""
        x_shape, w_shape = tuple(x_shape), tuple(w_shape)
        if len(x_shape) == 4:
            if x_shape[0] != 1:
                raise GeometryError(f"batch 1 only, got input shape {x_shape}")
            x_shape = x_shape[1:]
        if len(x_shape) != 3 or len(w_shape) != 4:
            raise GeometryError(f"expected x (1,C,H,W) or (C,H,W) and w (K,C,kh,kw), got {x_shape} and {w_shape}")
        if x_shape[0] != w_shape[1]:
            raise GeometryError(f"input has {x_shape[0]} channels but the kernel expects {w_shape[1]}")
        return cls(x_shape[0], w_shape[0], x_shape[1], x_shape[2], w_shape[2], w_shape[3], stride,
                   as_padding(padding))

    # -- derived sizes
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
        return (self.out_channels, self.in_channels // self.groups, self.kernel_h, self.kernel_w)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (1, self.out_channels, self.out_height, self.out_width)

    @property
    def is_grouped(self) -> bool:
        return self.groups > 1

    @property
    def is_depthwise(self) -> bool:
        """One input channel per group (a multiplier of output channels per group is allowed)."""
        return self.groups > 1 and self.groups == self.in_channels

    @property
    def is_square(self) -> bool:
        return self.kernel_h == self.kernel_w and len(set(self.pad)) == 1

    @property
    def kernel(self) -> int:
        """The kernel size of a square kernel (the model's convs are square)."""
        if self.kernel_h != self.kernel_w:
            raise GeometryError(f"{self.describe()} has a non-square kernel; use kernel_h and kernel_w")
        return self.kernel_h

    @property
    def symmetric_pad(self) -> int:
        """The padding of a conv padded equally on every side."""
        if len(set(self.pad)) != 1:
            raise GeometryError(f"{self.describe()} is padded unequally; use pad (top, right, bottom, left)")
        return self.pad[0]

    # -- arithmetic
    @property
    def macs(self) -> int:
        """Multiply-accumulates of the direct convolution."""
        return (self.out_channels * (self.in_channels // self.groups) * self.kernel_h * self.kernel_w
                * self.out_height * self.out_width)

    @property
    def flops(self) -> int:
        """A multiply-accumulate counts 2 FLOPs; bias excluded."""
        return 2 * self.macs

    def describe(self) -> str:
        pad = f" pad {self.pad}" if any(self.pad) else ""
        stride = f" stride {self.stride}" if self.stride != 1 else ""
        groups = (" depthwise" if self.is_depthwise else f" groups {self.groups}") if self.groups > 1 else ""
        return (f"{self.in_channels}->{self.out_channels} {self.height}x{self.width} "
                f"kernel {self.kernel_h}x{self.kernel_w}{stride}{pad}{groups}")


# ---------------------------------------------------------------- the families' rules, written once

def winograd_rule(geometry: ConvGeometry) -> str | None:
    """Why Winograd F(m x m, 3x3) cannot compute this conv, or None."""
    if (geometry.kernel_h, geometry.kernel_w) != (3, 3) or geometry.stride != 1:
        return (f"Winograd F(m x m, 3x3) handles only 3x3 kernels with stride 1, this one is "
                f"{geometry.kernel_h}x{geometry.kernel_w} stride {geometry.stride}")
    return None


def fft_rule(geometry: ConvGeometry, size: int) -> str | None:
    """Why FFT convolution with size x size tiles cannot compute this conv, or None."""
    if max(geometry.kernel_h, geometry.kernel_w) > size:
        return (f"FFT {size}x{size} tiles handle kernels up to {size}x{size}, this one is "
                f"{geometry.kernel_h}x{geometry.kernel_w}")
    if geometry.stride != 1:
        return f"FFT convolution needs stride 1, this layer has stride {geometry.stride}"
    return None


def family_rule(geometry: ConvGeometry, family: str) -> str | None:
    """The rule of an algorithm family by name: direct, implicit_gemm, winograd_f<m>x<m>, fft<size>."""
    if geometry.is_grouped and family != "direct":
        return (f"a grouped conv ({geometry.groups} groups) is {geometry.groups} small convs; "
                f"{family} transforms one dense conv, use a direct (depthwise) kernel")
    if family.startswith("winograd"):
        return winograd_rule(geometry)
    if family.startswith("fft"):
        return fft_rule(geometry, int(family[3:]))
    return None  # direct and implicit GEMM compute any conv
