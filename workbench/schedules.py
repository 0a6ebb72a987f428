"""TensorIR convolution implementations for a CPU target, each a compute plus a schedule with knobs.

Implementations (batch 1, float32, NCHW in and out, bias, and a fused `Fusion` around the
conv: a max-pool [+ReLU] computed by the padding stage from the pre-pool input, and a nearest
resize [+ add of a skip] [+ ReLU] computed by the output stage):

- ``direct_nchw``: direct convolution on NCHW, vectorised along the output width, register
  blocked over output channels x output width.
- ``direct_nchwc``: the old TVM x86 ``conv2d_NCHWc`` recipe: input re-laid out as NCHW[ic_bn]c,
  weights pre-packed as OIHW[ic_bn]i[oc_bn]o, a register tile of ``ow_bn`` output pixels x
  ``oc_bn`` output channels (vectorised along the channels), output unpacked back to NCHW.
- ``winograd_2/4/6``: Winograd F(m x m, 3x3) for 3x3 stride-1 layers. The kernel transform is
  done once (``pack_weight`` / the weight prim func); the main function does the input
  transform, the batched GEMM over the alpha x alpha points and the output transform.
- ``depthwise``: depthwise convs (groups == input channels), in workbench/depthwise.py; the
  functions here dispatch to it. ``direct_nchw`` also computes grouped convs (each output channel
  reads its group's inputs); the other dense schedules refuse them.

``IMPLEMENTATIONS`` are the dense schedules; ``SCHEDULES`` adds the depthwise one (the hand
candidates and the knob tuner search all of them).

Every main function has the same argument order (see ``arg_specs``)::

    data   (1, C, H, W)         float32, NCHW (the pre-pool size with a pool prologue)
    weight pre-packed           float32, layout given by ``pack_weight`` (depends on knobs)
    bias   (K,)                 float32
    skip   (1, K, OH*s, OW*s)   float32, only when the epilogue fuses an add
    output (1, K, OH*s, OW*s)   float32, NCHW (s: the epilogue's resize scale, else 1)

so the measured time excludes weight packing, as it would in deployed inference.

A schedule is a generator of named steps (``_schedule_steps``): ``schedule`` runs it to the end,
``steps`` keeps a copy of the schedule after each step for notebooks. Knobs that do not fit
a layer raise ``KnobError`` before any TVM primitive runs.

The TVM runtime thread pool reads ``TVM_NUM_THREADS`` when it starts: set it (e.g. to 2)
before the first kernel runs to fix the number of threads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te

from . import tvm_compat
from .errors import WorkbenchError
from .fusion import Fusion
from .geometry import ConvGeometry, family_rule

IMPLEMENTATIONS = ("direct_nchw", "direct_nchwc", "winograd_2", "winograd_4", "winograd_6")
DEPTHWISE = "depthwise"
SCHEDULES = IMPLEMENTATIONS + (DEPTHWISE,)
ARG_NAMES = ("data", "weight", "bias", "output")

PARALLEL_DIRECT = ("fused", "oc", "oh", "none")
PARALLEL_WINOGRAD = ("fused", "eps", "none")
PAD_DIRECT = ("separate", "compute_at", "inline")
PAD_WINOGRAD = ("separate", "inline")
EPILOGUE_DIRECT = ("tile", "row", "oc", "separate")
EPILOGUE_WINOGRAD = ("fused", "separate")


# ----------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class ConvLayer:
    """A conv to schedule: its geometry, a name for symbols and messages, and what is fused around it.

    The schedules handle square kernels padded equally on every side (the model's convs).
    `geometry` is the conv's own (after any pool prologue); `fusion` says what the kernel
    computes besides conv + bias (a pool before it, resize/add/ReLU after it).
    """

    name: str
    geometry: ConvGeometry
    fusion: Fusion = Fusion()

    @classmethod
    def square(cls, name: str, in_channels: int, out_channels: int, height: int, width: int, kernel: int = 3,
               stride: int = 1, pad: int = 1, relu: bool = False, fusion: Fusion | None = None,
               groups: int = 1) -> "ConvLayer":
        geometry = ConvGeometry.square(in_channels, out_channels, height, width, kernel, stride, pad, groups)
        return cls(name, geometry, fusion if fusion is not None else Fusion(relu=relu))

    @classmethod
    def of(cls, layer, relu_or_fusion: bool | Fusion = False) -> "ConvLayer":
        """The schedules' view of a model conv layer (a bool means ReLU or nothing)."""
        fusion = relu_or_fusion if isinstance(relu_or_fusion, Fusion) else Fusion(relu=bool(relu_or_fusion))
        return cls(layer.name, layer.geometry, fusion)

    @property
    def relu(self) -> bool:
        return self.fusion.relu

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """The data argument: the pre-pool tensor when a pool prologue is fused."""
        h, w = self.fusion.pool_in if self.fusion.pool else (self.height, self.width)
        return (1, self.in_channels, h, w)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        """The output argument: upsampled by the epilogue's scale."""
        s = self.fusion.scale
        return (1, self.out_channels, self.out_height * s, self.out_width * s)

    # The geometry, read through (the schedules use these names throughout).
    in_channels = property(lambda self: self.geometry.in_channels)
    out_channels = property(lambda self: self.geometry.out_channels)
    height = property(lambda self: self.geometry.height)
    width = property(lambda self: self.geometry.width)
    kernel = property(lambda self: self.geometry.kernel)
    stride = property(lambda self: self.geometry.stride)
    pad = property(lambda self: self.geometry.symmetric_pad)
    out_height = property(lambda self: self.geometry.out_height)
    out_width = property(lambda self: self.geometry.out_width)
    flops = property(lambda self: self.geometry.flops)


class KnobError(WorkbenchError, ValueError):
    """A knob value does not fit the layer or the implementation."""


class ScheduleError(WorkbenchError, ValueError):
    """An unknown schedule, or one that does not apply to the layer."""


def _check_impl(impl: str) -> None:
    if impl not in SCHEDULES:
        raise ScheduleError(f"unknown implementation {impl!r}; choose one of {SCHEDULES}")


# Schedules written in their own module on top of this one register here when imported (depthwise.py
# does), so this module never imports them: name -> module with the functions dispatched to below.
PROVIDERS: dict = {}


def _depthwise():
    """workbench.depthwise, registered when it is imported (kernels/hand.py, knob_tuning.py, composer.py do)."""
    if DEPTHWISE not in PROVIDERS:
        raise ScheduleError("the depthwise schedule is not loaded: import workbench.depthwise first")
    return PROVIDERS[DEPTHWISE]


def winograd_m(impl: str) -> int:
    """Output tile size m of a ``winograd_<m>`` implementation."""
    return int(impl.rsplit("_", 1)[1])


def applicable(impl: str, layer: ConvLayer) -> str | None:
    """Why ``impl`` cannot run ``layer`` (with its fusion), or None if it can."""
    _check_impl(impl)
    if not layer.geometry.is_square:
        return "the hand schedules handle square kernels padded equally on every side"
    return fusion_problem(layer) or _family_problem(impl, layer.geometry)


def _family_problem(impl: str, geometry: ConvGeometry) -> str | None:
    """The schedule's own rule: depthwise convs for tvm:depthwise; dense convs for the others, grouped ones
    too for direct_nchw; Winograd also needs 3x3 stride 1."""
    if impl == DEPTHWISE:
        return _depthwise().rule(geometry)
    if geometry.is_depthwise:
        return f"{impl} is a dense schedule; a depthwise conv ({geometry.groups} groups of one channel) needs tvm:depthwise"
    if geometry.is_grouped and impl != "direct_nchw":
        return (f"{impl} sums over every input channel of a dense conv; this conv has {geometry.groups} groups "
                "(grouped convs: tvm:direct_nchw or tvm:default)")
    return family_rule(geometry, "winograd") if impl.startswith("winograd") else None


def fusion_problem(layer: ConvLayer) -> str | None:
    """Why the schedules cannot compute ``layer.fusion`` around this conv, or None."""
    f = layer.fusion
    if not isinstance(f.scale, int) or f.scale < 1:
        return f"the epilogue's resize scale must be a positive integer, got {f.scale!r}"
    if f.pool_relu and not f.pool:
        return "a prologue ReLU is fused only after a max-pool (pool_relu needs pool > 0)"
    if not f.pool:
        return None
    if not isinstance(f.pool, int) or f.pool < 1 or f.pool_in is None or len(f.pool_in) != 2:
        return f"a pool prologue needs a positive window and the pre-pool (height, width), got {f.pool!r}, {f.pool_in!r}"
    pooled = (f.pool_in[0] // f.pool, f.pool_in[1] // f.pool)
    if pooled != (layer.height, layer.width):
        return (f"a {f.pool}x{f.pool} pool of {f.pool_in[0]}x{f.pool_in[1]} gives {pooled[0]}x{pooled[1]}, "
                f"but the conv reads {layer.height}x{layer.width}")
    return None


def _require_applicable(impl: str, layer: ConvLayer) -> None:
    reason = applicable(impl, layer)
    if reason is not None:
        raise ScheduleError(f"{impl} is not applicable to layer {layer.name!r}: {reason}")


# ----------------------------------------------------------------------------- knobs


@dataclass(frozen=True)
class DirectNCHWKnobs:
    """Register tile oc_bn output channels x ow_bn output pixels, vectorised along the width."""

    oc_bn: int = 16  # output channels per register tile (divides out_channels)
    ow_bn: int = 16  # output pixels per register tile (divides out_width)
    vec: int = 16  # vector lanes along the width (divides ow_bn)
    unroll_kw: bool = True  # kw innermost of the reduction and unrolled
    parallel: str = "fused"  # one of PARALLEL_DIRECT
    pad: str = "separate"  # one of PAD_DIRECT
    epilogue: str = "tile"  # one of EPILOGUE_DIRECT: where bias (+ReLU) is added


@dataclass(frozen=True)
class DirectNCHWcKnobs:
    """NCHW[ic_bn]c input, OIHW[ic_bn]i[oc_bn]o weights, register tile ow_bn x oc_bn."""

    ic_bn: int = 16  # input-channel block of the data layout (divides in_channels)
    oc_bn: int = 32  # output-channel block = register tile height (divides out_channels)
    ow_bn: int = 12  # output pixels per register tile (divides out_width)
    vec: int = 16  # vector lanes along oc_bn (divides oc_bn)
    unroll_kw: bool = False  # old recipe's unroll_kw: kw inside ic_block, unrolled
    parallel: str = "fused"  # one of PARALLEL_DIRECT
    pad: str = "separate"  # one of PAD_DIRECT: where pad + NCHWc re-layout happens
    epilogue: str = "tile"  # one of EPILOGUE_DIRECT: where unpack + bias (+ReLU) happen


@dataclass(frozen=True)
class WinogradKnobs:
    """Tiles of the batched GEMM (oc_bn channels x tile_bn tiles) and transform placement."""

    ic_bn: int = 16  # input-channel block, vector lanes of the input transform (divides C)
    oc_bn: int = 32  # output-channel block of the GEMM and output transform (divides K)
    tile_bn: int = 8  # Winograd tiles per GEMM register tile (divides the tile count)
    vec: int = 16  # vector lanes along oc_bn (divides oc_bn)
    parallel: str = "fused"  # one of PARALLEL_WINOGRAD, for the GEMM
    pad: str = "separate"  # one of PAD_WINOGRAD
    epilogue: str = "fused"  # one of EPILOGUE_WINOGRAD: output unpack + bias (+ReLU)


Knobs = DirectNCHWKnobs | DirectNCHWcKnobs | WinogradKnobs


def knobs_class(impl: str) -> type:
    _check_impl(impl)
    if impl == DEPTHWISE:
        return _depthwise().DepthwiseKnobs
    if impl == "direct_nchw":
        return DirectNCHWKnobs
    if impl == "direct_nchwc":
        return DirectNCHWcKnobs
    return WinogradKnobs


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in divisors(n) if d <= max(limit, 1))


def _pick_block(n: int, preferred: tuple[int, ...]) -> int:
    """First preferred block size dividing n, else the largest divisor of n below the first."""
    for block in preferred:
        if n % block == 0:
            return block
    return _largest_divisor(n, preferred[0])


def _pick_vec(block: int, lanes: int = 16) -> int:
    """Largest power of two <= lanes dividing block (1 if block is odd)."""
    vec = lanes
    while block % vec:
        vec //= 2
    return vec


def winograd_tiles(layer: ConvLayer, m: int) -> tuple[int, int]:
    """Number of m x m output tiles along the height and the width."""
    return -(-layer.out_height // m), -(-layer.out_width // m)


def default_knobs(impl: str, layer: ConvLayer) -> Knobs:
    """Knobs tuned on this machine (2 cores, AVX-512), adjusted to divide the layer's sizes."""
    _require_applicable(impl, layer)
    if impl == DEPTHWISE:
        return _depthwise().default_knobs(layer)
    pad = "separate" if layer.pad or (layer.fusion.pool and impl.startswith("winograd")) else "inline"
    if impl == "direct_nchw":
        ow_bn = _pick_block(layer.out_width, (16, 24, 32, 8, 12))
        vec = _pick_vec(ow_bn)
        # About 16-24 accumulator vectors: oc_bn rows x (ow_bn / vec) vectors.
        oc_prefs = tuple(b for b in (16, 8, 4, 2) if b * (ow_bn // vec) <= 24) or (2,)
        oc_bn = _pick_block(layer.out_channels, oc_prefs)
        return DirectNCHWKnobs(oc_bn=oc_bn, ow_bn=ow_bn, vec=vec, pad=pad)
    if impl == "direct_nchwc":
        oc_bn = _pick_block(layer.out_channels, (32, 16, 8))
        return DirectNCHWcKnobs(
            ic_bn=_pick_block(layer.in_channels, (16, 8)),
            oc_bn=oc_bn,
            ow_bn=_pick_block(layer.out_width, (12, 8, 16, 6, 24) if oc_bn > 16 else (24, 16, 12, 8)),
            vec=_pick_vec(oc_bn),
            pad=pad,
        )
    nh, nw = winograd_tiles(layer, winograd_m(impl))
    oc_bn = _pick_block(layer.out_channels, (32, 16, 8))
    vec = _pick_vec(oc_bn)
    # Measured: 8 tiles x 2 vectors, or 9-16 tiles x 1 vector, per GEMM register tile.
    tile_prefs = (8, 6, 4, 9, 12) if oc_bn > vec else (12, 9, 16, 8, 6, 4)
    return WinogradKnobs(
        ic_bn=_pick_block(layer.in_channels, (16, 8)),
        oc_bn=oc_bn,
        tile_bn=_pick_block(nh * nw, tile_prefs),
        vec=vec,
        pad=pad,
    )


VECTOR_WIDTHS = (1, 2, 4, 8, 16)
BLOCK_LIMIT = 64  # register and cache blocks beyond this never paid on the CPUs measured


def knob_space(impl: str, layer: ConvLayer) -> dict[str, tuple]:
    """Every value each knob of `impl` may take on `layer`, knob by knob (the knob tuner's space).

    A combination can still be invalid (a vector wider than its tile): validate_knobs rejects it
    before anything is built.
    """
    _require_applicable(impl, layer)
    if impl == DEPTHWISE:
        return _depthwise().knob_space(layer)
    blocks = lambda n, limit=BLOCK_LIMIT: tuple(d for d in divisors(n) if d <= limit)  # noqa: E731
    space: dict[str, tuple] = {"oc_bn": blocks(layer.out_channels), "vec": VECTOR_WIDTHS}
    if impl == "direct_nchw":
        space.update(ow_bn=blocks(layer.out_width), unroll_kw=(False, True), parallel=PARALLEL_DIRECT,
                     pad=PAD_DIRECT, epilogue=EPILOGUE_DIRECT)
    elif impl == "direct_nchwc":
        space.update(ic_bn=blocks(layer.in_channels), ow_bn=blocks(layer.out_width, 32), unroll_kw=(False, True),
                     parallel=PARALLEL_DIRECT, pad=PAD_DIRECT, epilogue=EPILOGUE_DIRECT)
    else:
        nh, nw = winograd_tiles(layer, winograd_m(impl))
        space.update(ic_bn=blocks(layer.in_channels), tile_bn=blocks(nh * nw, 32), parallel=PARALLEL_WINOGRAD,
                     pad=PAD_WINOGRAD, epilogue=EPILOGUE_WINOGRAD)
    return space


def _knob_error(knob: str, value, why: str, valid) -> KnobError:
    return KnobError(f"knob {knob}={value!r}: {why}; valid values: {valid}")


def _check_divides(knob: str, value, total: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or total % value:
        raise _knob_error(knob, value, f"must be a positive divisor of {what} ({total})", divisors(total))


def _check_choice(knob: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _knob_error(knob, value, "unknown choice", list(choices))


def validate_knobs(impl: str, layer: ConvLayer, knobs: Knobs) -> None:
    """Raise KnobError naming the first knob that does not fit ``layer``."""
    _require_applicable(impl, layer)
    expected = knobs_class(impl)
    if not isinstance(knobs, expected):
        raise KnobError(f"{impl} takes {expected.__name__}, got {type(knobs).__name__}")
    for knob in dataclasses.fields(knobs):  # a bool knob given as "false" would be truthy
        value = getattr(knobs, knob.name)
        if isinstance(knob.default, bool) and not isinstance(value, bool):
            raise _knob_error(knob.name, value, "must be true or false", [False, True])
    if impl == DEPTHWISE:
        _depthwise().validate_knobs(layer, knobs)
        return
    _check_divides("oc_bn", knobs.oc_bn, layer.out_channels, "out_channels")
    if impl == "direct_nchw":
        _check_divides("ow_bn", knobs.ow_bn, layer.out_width, "out_width")
        _check_divides("vec", knobs.vec, knobs.ow_bn, "ow_bn (vectorised along the width)")
    else:
        _check_divides("ic_bn", knobs.ic_bn, layer.in_channels, "in_channels")
        _check_divides("vec", knobs.vec, knobs.oc_bn, "oc_bn (vectorised along output channels)")
    if impl == "direct_nchwc":
        _check_divides("ow_bn", knobs.ow_bn, layer.out_width, "out_width")
    if impl.startswith("direct"):
        _check_choice("parallel", knobs.parallel, PARALLEL_DIRECT)
        _check_choice("pad", knobs.pad, PAD_DIRECT)
        _check_choice("epilogue", knobs.epilogue, EPILOGUE_DIRECT)
        return
    nh, nw = winograd_tiles(layer, winograd_m(impl))
    _check_divides("tile_bn", knobs.tile_bn, nh * nw, f"the number of {winograd_m(impl)}x{winograd_m(impl)} tiles")
    _check_choice("parallel", knobs.parallel, PARALLEL_WINOGRAD)
    _check_choice("pad", knobs.pad, PAD_WINOGRAD)
    _check_choice("epilogue", knobs.epilogue, EPILOGUE_WINOGRAD)
    if layer.fusion.pool and knobs.pad == "inline":
        # Inlined, the pool window is recomputed for every term of the alpha x alpha input
        # transform, and LLVM takes about 25 s to compile one small layer (measured, m=4).
        raise _knob_error("pad", knobs.pad, "a pool prologue is computed once per input pixel only by a "
                          "separate padding stage in Winograd", ["separate"])


def _resolve_knobs(impl: str, layer: ConvLayer, knobs: Knobs | None) -> Knobs:
    knobs = default_knobs(impl, layer) if knobs is None else knobs
    validate_knobs(impl, layer, knobs)
    return knobs


# ----------------------------------------------------------------------------- argument layout


def packed_weight_shape(impl: str, layer: ConvLayer, knobs: Knobs) -> tuple[int, ...]:
    """Shape of the weight argument of the main function."""
    if impl == DEPTHWISE:
        return _depthwise().packed_weight_shape(layer, knobs)
    k, c, r = layer.out_channels, layer.in_channels, layer.kernel
    if impl == "direct_nchw":
        return layer.geometry.weight_shape  # (K, C / groups, r, r)
    if impl == "direct_nchwc":
        return (k // knobs.oc_bn, c // knobs.ic_bn, r, r, knobs.ic_bn, knobs.oc_bn)
    alpha = winograd_m(impl) + 2
    return (alpha, alpha, k // knobs.oc_bn, c, knobs.oc_bn)


def arg_specs(impl: str, layer: ConvLayer, knobs: Knobs | None = None) -> list[tuple[tuple[int, ...], str]]:
    """(shape, dtype) of the main function's arguments, in order: data, weight, bias, [skip], output.

    With a pool prologue the data is the pre-pool tensor; with a resize epilogue the output
    (and the skip, when an add is fused) is at the upsampled size.
    """
    knobs = _resolve_knobs(impl, layer, knobs)
    specs = [
        (layer.input_shape, "float32"),
        (packed_weight_shape(impl, layer, knobs), "float32"),
        ((layer.out_channels,), "float32"),
    ]
    if layer.fusion.add:
        specs.append((layer.output_shape, "float32"))
    return specs + [(layer.output_shape, "float32")]


def winograd_matrices(m: int, r: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TOPI's Winograd matrices (float64): A (alpha x m), B (alpha x alpha), G (alpha x r).

    Y = A^T [(G g G^T) * (B^T d B)] A, with TOPI's interpolation points (Barabasz et al.).
    """
    return tvm_compat.winograd_matrices(m, r)


def pack_weight(impl: str, layer: ConvLayer, knobs: Knobs | None, weight: np.ndarray) -> np.ndarray:
    """Weight (K, C, kh, kw) re-laid out (and Winograd-transformed) for the main function, in numpy."""
    knobs = _resolve_knobs(impl, layer, knobs)
    weight = np.asarray(weight, dtype=np.float32)
    k, c, r = layer.out_channels, layer.in_channels, layer.kernel
    if weight.shape != layer.geometry.weight_shape:
        raise ValueError(f"weight shape {weight.shape} != {layer.geometry.weight_shape} for layer {layer.name!r}")
    if impl == DEPTHWISE:
        return _depthwise().pack_weight(layer, knobs, weight)
    if impl == "direct_nchw":
        return np.ascontiguousarray(weight)
    if impl == "direct_nchwc":
        ob, ib = knobs.oc_bn, knobs.ic_bn
        blocked = weight.reshape(k // ob, ob, c // ib, ib, r, r)
        return np.ascontiguousarray(blocked.transpose(0, 2, 4, 5, 3, 1))
    _, _, g = winograd_matrices(winograd_m(impl))
    u = np.einsum("ea,kcab,nb->enck", g, weight.astype(np.float64), g)  # (alpha, alpha, C, K)
    alpha, ob = g.shape[0], knobs.oc_bn
    u = u.reshape(alpha, alpha, c, k // ob, ob).transpose(0, 1, 3, 2, 4)
    return np.ascontiguousarray(u, dtype=np.float32)


# ----------------------------------------------------------------------------- computes


def _placeholders(impl: str, layer: ConvLayer, knobs: Knobs):
    """data, weight, bias and (only when an add is fused) skip."""
    specs = arg_specs(impl, layer, knobs)
    tensors = [te.placeholder(shape, name=name) for (shape, _), name in zip(specs, ("data", "weight", "bias"))]
    skip = te.placeholder(specs[3][0], name="skip") if layer.fusion.add else None
    return (*tensors, skip)


def _args(data, weight, bias, skip, output) -> list:
    """The main function's arguments in their one order: data, weight, bias, [skip], output."""
    return [data, weight, bias] + ([skip] if skip is not None else []) + [output]


def activation(value, fusion: Fusion):
    """The output stage's ReLU, capped for a ReLU6: min(max(v, 0), cap)."""
    if fusion.relu:
        value = te.max(value, tvm.tirx.const(0.0, "float32"))
    if fusion.cap is not None:
        value = te.min(value, tvm.tirx.const(fusion.cap, "float32"))
    return value


def _epilogue(value, bias_value, fusion: Fusion):
    return activation(value + bias_value, fusion)


def _output(layer: ConvLayer, conv_at: Callable, bias, skip):
    """The `output` block: relu?(conv + bias [+ skip]) at the (upsampled) output size.

    ``conv_at(n, k, h, w)`` reads the conv result at conv coordinates; a nearest resize by
    ``scale`` reads it at (h // scale, w // scale), so the low-resolution value is never stored.
    """
    s = layer.fusion.scale

    def value(n, k, h, w):
        v = conv_at(n, k, h // s, w // s) if s > 1 else conv_at(n, k, h, w)
        if skip is None:
            return _epilogue(v, bias[k], layer.fusion)
        return activation(v + bias[k] + skip[n, k, h, w], layer.fusion)

    return te.compute(layer.output_shape, value, name="output")


def _pooled(data, fusion: Fusion, c, h, w):
    """data[c, h, w] of the conv's input: the pre-pool window's max (from 0 when ReLU follows).

    Written as a max of loads, not a reduction, so the padding stage stays a plain block that
    can be inlined or computed at a tile (relu(maxpool(x)) is a max-pool starting from 0).
    """
    if not fusion.pool:
        return data[0, c, h, w]
    p = fusion.pool
    value = tvm.tirx.const(0.0, "float32") if fusion.pool_relu else None
    for i in range(p):
        for j in range(p):
            load = data[0, c, h * p + i, w * p + j]
            value = load if value is None else te.max(value, load)
    return value


def _padded(layer: ConvLayer, data, out_shape, index: Callable):
    """Zero-padded conv input (pooled first when a pool is fused); ``index`` maps output indices
    to (c, h, w) of the conv's unpadded input."""
    pad, height, width = layer.pad, layer.height, layer.width

    def value(*idx):
        c, h, w = index(*idx)
        inside = te.all(h >= pad, h < height + pad, w >= pad, w < width + pad)
        return te.if_then_else(inside, _pooled(data, layer.fusion, c, h - pad, w - pad),
                               tvm.tirx.const(0.0, "float32"))

    return te.compute(out_shape, value, name="data_pad")


def _compute_direct_nchw(layer: ConvLayer, knobs: DirectNCHWKnobs):
    data, weight, bias, skip = _placeholders("direct_nchw", layer, knobs)
    p, s, r = layer.pad, layer.stride, layer.kernel
    shape = (1, layer.in_channels, layer.height + 2 * p, layer.width + 2 * p)
    data_pad = _padded(layer, data, shape, lambda n, c, h, w: (c, h, w))
    g = layer.geometry.groups
    cpg, kpg = layer.in_channels // g, layer.out_channels // g  # channels per group, in and out
    ic = te.reduce_axis((0, cpg), name="ic")
    kh = te.reduce_axis((0, r), name="kh")
    kw = te.reduce_axis((0, r), name="kw")
    out_shape = (1, layer.out_channels, layer.out_height, layer.out_width)
    # Output channel k reads its group's input channels (a dense conv: one group, the same expression as ever).
    channel = (lambda k: ic) if g == 1 else (lambda k: k // kpg * cpg + ic)
    conv = te.compute(
        out_shape,
        lambda n, k, oh, ow: te.sum(
            data_pad[n, channel(k), oh * s + kh, ow * s + kw] * weight[k, ic, kh, kw], axis=[ic, kh, kw]
        ),
        name="conv",
    )
    output = _output(layer, lambda n, k, h, w: conv[n, k, h, w], bias, skip)
    return _args(data, weight, bias, skip, output)


def _compute_direct_nchwc(layer: ConvLayer, knobs: DirectNCHWcKnobs):
    data, weight, bias, skip = _placeholders("direct_nchwc", layer, knobs)
    p, s, r, ib, ob = layer.pad, layer.stride, layer.kernel, knobs.ic_bn, knobs.oc_bn
    shape = (1, layer.in_channels // ib, layer.height + 2 * p, layer.width + 2 * p, ib)
    data_pad = _padded(layer, data, shape, lambda n, cc, h, w, cb: (cc * ib + cb, h, w))
    ic = te.reduce_axis((0, layer.in_channels), name="ic")
    kh = te.reduce_axis((0, r), name="kh")
    kw = te.reduce_axis((0, r), name="kw")
    conv = te.compute(
        (1, layer.out_channels // ob, layer.out_height, layer.out_width, ob),
        lambda n, kc, oh, ow, kb: te.sum(
            data_pad[n, ic // ib, oh * s + kh, ow * s + kw, ic % ib]
            * weight[kc, ic // ib, kh, kw, ic % ib, kb],
            axis=[ic, kh, kw],
        ),
        name="conv",
    )
    output = _output(layer, lambda n, k, h, w: conv[n, k // ob, h, w, k % ob], bias, skip)
    return _args(data, weight, bias, skip, output)


def _combination(coeffs: np.ndarray, row, terms: list) -> tvm.tirx.PrimExpr:
    """sum_j coeffs[row, j] * terms[j] for a symbolic ``row``.

    A Select over the rows, each branch a sum that skips zero coefficients; it folds to a
    single branch when the loop over ``row`` is unrolled, so transforms cost only their
    non-zero coefficients.
    """
    expr = None
    for i in reversed(range(coeffs.shape[0])):
        branch = None
        for c, term in zip(coeffs[i], terms):
            if c == 0:
                continue
            scaled = term if c == 1 else -term if c == -1 else tvm.tirx.const(float(c), "float32") * term
            branch = scaled if branch is None else branch + scaled
        branch = tvm.tirx.const(0.0, "float32") if branch is None else branch
        expr = branch if expr is None else tvm.tirx.Select(row == i, branch, expr)
    return expr


def _compute_winograd(impl: str, layer: ConvLayer, knobs: WinogradKnobs):
    data, weight, bias, skip = _placeholders(impl, layer, knobs)
    m = winograd_m(impl)
    alpha, ib, ob = m + 2, knobs.ic_bn, knobs.oc_bn
    a_mat, b_mat, _ = winograd_matrices(m)
    nh, nw = winograd_tiles(layer, m)
    tiles, c, k = nh * nw, layer.in_channels, layer.out_channels
    # Padded to whole tiles: rows/cols past the output only feed discarded outputs.
    shape = (1, c // ib, nh * m + 2, nw * m + 2, ib)
    data_pad = _padded(layer, data, shape, lambda n, cc, h, w, cb: (cc * ib + cb, h, w))
    # Input transform V = B^T d B, separable: first along h (rows of a tile row), then along w.
    data_t1 = te.compute(
        (c // ib, nh, alpha, nw * m + 2, ib),
        lambda cc, th, e, w, cb: _combination(
            b_mat.T, e, [data_pad[0, cc, th * m + a, w, cb] for a in range(alpha)]
        ),
        name="data_t1",
    )
    data_pack = te.compute(
        (alpha, alpha, tiles, c),
        lambda e, nu, p, ci: _combination(
            b_mat.T,
            nu,
            [data_t1[ci // ib, p // nw, e, (p % nw) * m + b, ci % ib] for b in range(alpha)],
        ),
        name="data_pack",
    )
    # Batched GEMM over the alpha x alpha points, output channels blocked by oc_bn.
    rc = te.reduce_axis((0, c), name="rc")
    bgemm = te.compute(
        (alpha, alpha, k // ob, tiles, ob),
        lambda e, nu, kc, p, kb: te.sum(weight[e, nu, kc, rc, kb] * data_pack[e, nu, p, rc], axis=rc),
        name="bgemm",
    )
    # Output transform Y = A^T M A, separable: first along eps, then along nu. Tiles are
    # indexed (th, tw) here so the NCHW output's reads stay quasi-affine.
    inverse_t1 = te.compute(
        (k // ob, nh, nw, m, alpha, ob),
        lambda kc, th, tw, vh, nu, kb: _combination(
            a_mat.T, vh, [bgemm[a, nu, kc, th * nw + tw, kb] for a in range(alpha)]
        ),
        name="inverse_t1",
    )
    inverse = te.compute(
        (k // ob, nh, nw, m, m, ob),
        lambda kc, th, tw, vh, vw, kb: _combination(
            a_mat.T, vw, [inverse_t1[kc, th, tw, vh, b, kb] for b in range(alpha)]
        ),
        name="inverse",
    )
    output = _output(layer, lambda n, ko, h, w: inverse[ko // ob, h // m, w // m, h % m, w % m, ko % ob], bias, skip)
    return _args(data, weight, bias, skip, output)


def conv_prim_func(impl: str, layer: ConvLayer, knobs: Knobs | None = None) -> tvm.tirx.PrimFunc:
    """The unscheduled main function: (data, packed weight, bias, output), see ``arg_specs``.

    The blocked layouts (ic_bn, oc_bn) are part of the computation, so a schedule must be made
    from the prim func of the same knobs (default knobs when None).
    """
    knobs = _resolve_knobs(impl, layer, knobs)
    if impl == DEPTHWISE:
        tensors = _depthwise().compute(layer, knobs)
    elif impl == "direct_nchw":
        tensors = _compute_direct_nchw(layer, knobs)
    elif impl == "direct_nchwc":
        tensors = _compute_direct_nchwc(layer, knobs)
    else:
        tensors = _compute_winograd(impl, layer, knobs)
    return te.create_prim_func(tensors)


def weight_prim_func(impl: str, layer: ConvLayer, knobs: Knobs | None = None) -> tvm.tirx.PrimFunc | None:
    """Prim func (weight (K,C,kh,kw) -> packed weight), run once before timing; None if no packing.

    Same result as ``pack_weight`` (Winograd in float32 here, float64 there).
    """
    knobs = _resolve_knobs(impl, layer, knobs)
    if impl == DEPTHWISE:
        return _depthwise().weight_prim_func(layer, knobs)
    if impl == "direct_nchw":
        return None
    k, c, r = layer.out_channels, layer.in_channels, layer.kernel
    weight = te.placeholder((k, c, r, r), name="weight")
    shape = packed_weight_shape(impl, layer, knobs)
    ob = knobs.oc_bn
    if impl == "direct_nchwc":
        ib = knobs.ic_bn
        packed = te.compute(
            shape,
            lambda kc, cc, h, w, ci, ko: weight[kc * ob + ko, cc * ib + ci, h, w],
            name="weight_pack",
        )
    else:
        _, _, g_mat = winograd_matrices(winograd_m(impl))
        g = tvm.topi.utils.const_matrix(g_mat.astype("float32"), "G")
        rh = te.reduce_axis((0, r), name="rh")
        rw = te.reduce_axis((0, r), name="rw")
        packed = te.compute(
            shape,
            lambda e, nu, kc, ci, kb: te.sum(
                weight[kc * ob + kb, ci, rh, rw] * g[e, rh] * g[nu, rw], axis=[rh, rw]
            ),
            name="weight_pack",
        )
    return te.create_prim_func([weight, packed])


# ----------------------------------------------------------------------------- schedules
#
# Each schedule is a generator: it applies a group of primitives, then yields the step's name.
# Blocks are named in the computes above: data_pad, conv / data_t1, data_pack, bgemm,
# inverse_t1, inverse, and output (unpack + bias + ReLU).


def _outer_loops(sch, parallel: str, order: tuple):
    """Order the outer loops ``order`` = (n, kc, oh) for the ``parallel`` knob and mark it.

    Returns (the parallel loop or None, the loop directly above the register tile, the
    output-channel block loop: the fused loop when the three are fused).
    """
    n, kc, oh = order
    if parallel == "oh":
        sch.reorder(n, oh, kc)
    if parallel == "fused":
        fused = sch.fuse(n, kc, oh)
        sch.parallel(fused)
        return fused, fused, fused
    if parallel == "oc":
        sch.parallel(kc)
        return kc, oh, kc
    if parallel == "oh":
        sch.parallel(oh)
        return oh, kc, kc
    return None, oh, kc


def _place_pad(sch, knobs, par_loop, inner_loop, vectorize: bool) -> None:
    """Padding as its own parallel loop nest, computed per parallel iteration, or inlined.

    ``vectorize`` the innermost loop only where the pad condition is lane-invariant (the
    NCHWc channel block): vectorised along the width (by 2 lanes for 98-wide rows), the
    whole convolution ran up to 2x slower.
    """
    pad = sch.get_sblock("data_pad")
    if knobs.pad == "inline":
        sch.compute_inline(pad)
        return
    if knobs.pad == "compute_at":
        # Each parallel iteration pads the input rows it reads (rows shared by neighbours
        # are padded again): no separate pass over memory.
        sch.compute_at(pad, par_loop if par_loop is not None else inner_loop)
    else:
        loops = sch.get_loops(pad)
        sch.parallel(sch.fuse(*loops[:3]))  # n, channel (block), row
    if vectorize:
        _vectorize_innermost(sch, sch.get_loops(pad)[-1])


def _vectorize_innermost(sch, loop, lanes: int = 16) -> None:
    """Vectorise ``loop`` by the largest power of two <= lanes dividing its extent."""
    vec = _pick_vec(sch.get(loop).extent.value, lanes)
    if vec > 1:
        sch.vectorize(sch.split(loop, [None, vec])[1])


def _place_epilogue(sch, knobs, tile_loop, row_loop, oc_loop) -> None:
    """Bias (+ReLU, +unpack) at the register tile (a column tile of a row), per row of tiles,
    per output-channel block, or as its own loop nest.

    With a resize epilogue the output block reads conv[h // s, w // s]; reverse_compute_at
    inverts that read (0.27, verified): at a tile it computes the s x s upsampled copies of
    the tile's pixels, so the low-resolution result never leaves the cache.
    """
    out = sch.get_sblock("output")
    if knobs.epilogue == "tile":
        sch.reverse_compute_at(out, tile_loop)
    elif knobs.epilogue == "row":
        sch.reverse_compute_at(out, row_loop)
    elif knobs.epilogue == "oc":
        sch.reverse_compute_at(out, oc_loop)
    else:
        loops = sch.get_loops(out)
        sch.parallel(sch.fuse(*loops[:2]))
    _vectorize_innermost(sch, sch.get_loops(out)[-1])  # along the NCHW output width


def _epilogue_label(layer: ConvLayer) -> str:
    """What the output stage adds after the bias, for step names: '+ReLU', '+resize+add+relu'."""
    return "".join(f"+{op}" for op in layer.fusion.epilogue_ops).replace("+relu", "+ReLU")


def _schedule_direct_nchw(sch, layer: ConvLayer, knobs: DirectNCHWKnobs) -> Iterator[str]:
    conv = sch.get_sblock("conv")
    n, k, oh, ow, ic, kh, kw = sch.get_loops(conv)
    kc, kb = sch.split(k, [None, knobs.oc_bn])
    owo, owi = sch.split(ow, [None, knobs.ow_bn])
    owv_o, owv = sch.split(owi, [None, knobs.vec])
    # unroll_kw puts kw inside the oc_bn loop (both unrolled); measured equal or slightly better.
    inner = (kh, kb, kw) if knobs.unroll_kw else (kh, kw, kb)
    sch.reorder(n, kc, oh, owo, ic, *inner, owv_o, owv)
    yield "register tile: oc_bn output channels x ow_bn pixels, reduction outside"
    par, row, oc = _outer_loops(sch, knobs.parallel, (n, kc, oh))
    yield f"parallel: {knobs.parallel}"
    sch.vectorize(owv)
    sch.unroll(owv_o)
    sch.unroll(kb)
    if knobs.unroll_kw:
        sch.unroll(kw)
    yield "vectorize the width, unroll the register tile"
    _place_epilogue(sch, knobs, owo, row, oc)
    yield f"epilogue (bias{_epilogue_label(layer)}): {knobs.epilogue}"
    _place_pad(sch, knobs, par, row, vectorize=False)
    yield f"padding: {knobs.pad}"
    sch.decompose_reduction(conv, ic)
    yield "decompose reduction: zero the accumulators before the channel loop"


def _schedule_direct_nchwc(sch, layer: ConvLayer, knobs: DirectNCHWcKnobs) -> Iterator[str]:
    conv = sch.get_sblock("conv")
    n, kc, oh, ow, kb, ic, kh, kw = sch.get_loops(conv)
    owo, owi = sch.split(ow, [None, knobs.ow_bn])
    ico, ici = sch.split(ic, [None, knobs.ic_bn])
    kbo, kbv = sch.split(kb, [None, knobs.vec])
    if knobs.unroll_kw:
        sch.reorder(n, kc, oh, owo, ico, kh, ici, kw, owi, kbo, kbv)
    else:
        sch.reorder(n, kc, oh, owo, ico, kh, kw, ici, owi, kbo, kbv)
    yield "register tile: ow_bn pixels x oc_bn channels, reduction outside (conv2d_NCHWc recipe)"
    par, row, oc = _outer_loops(sch, knobs.parallel, (n, kc, oh))
    yield f"parallel: {knobs.parallel}"
    sch.vectorize(kbv)
    sch.unroll(kbo)
    sch.unroll(owi)
    if knobs.unroll_kw:
        sch.unroll(kw)
    yield "vectorize output channels, unroll the register tile"
    _place_epilogue(sch, knobs, owo, row, oc)
    yield f"epilogue (unpack to NCHW + bias{_epilogue_label(layer)}): {knobs.epilogue}"
    _place_pad(sch, knobs, par, row, vectorize=True)
    yield f"padding + NCHW[{knobs.ic_bn}]c re-layout: {knobs.pad}"
    sch.decompose_reduction(conv, ico)
    yield "decompose reduction: zero the accumulators before the channel loop"


def _schedule_winograd_input(sch, layer: ConvLayer, knobs: WinogradKnobs, nw: int) -> None:
    """V = B^T d B per (channel block, tile row, tile), vectorised along the channel block."""
    pack = sch.get_sblock("data_pack")
    e, nu, p, c = sch.get_loops(pack)
    th, tw = sch.split(p, [None, nw])
    cc, cb = sch.split(c, [None, knobs.ic_bn])
    sch.reorder(cc, th, tw, e, nu, cb)
    sch.parallel(sch.fuse(cc, th))
    _break_power_of_two_stride(sch, pack)
    sch.compute_at(sch.get_sblock("data_t1"), tw)
    sch.unroll(e)
    sch.unroll(nu)
    sch.vectorize(cb)
    t1 = sch.get_sblock("data_t1")
    t1_loops = sch.get_loops(t1)
    for loop in t1_loops[-3:-1]:  # alpha x columns of the tile
        sch.unroll(loop)
    sch.vectorize(t1_loops[-1])


def _break_power_of_two_stride(sch, block) -> None:
    """Pad the (eps, nu) planes of ``block``'s output by one cache line.

    The transforms touch all alpha x alpha planes per tile; with power-of-two plane sizes
    they all map to the same L1 sets and thrash.
    """
    shape = [int(x) for x in sch.get(block).writes[0].source.shape]  # 0.27: .source is the buffer
    plane = int(np.prod(shape[2:]))
    sch.storage_align(block, 0, axis=1, factor=plane, offset=16)


def _schedule_winograd_gemm(sch, knobs: WinogradKnobs) -> None:
    """Register tile tile_bn tiles x oc_bn channels, vectorised along the channels."""
    gemm = sch.get_sblock("bgemm")
    e, nu, kc, p, kb, rc = sch.get_loops(gemm)
    po, pi = sch.split(p, [None, knobs.tile_bn])
    kbo, kbv = sch.split(kb, [None, knobs.vec])
    sch.reorder(e, nu, kc, po, rc, pi, kbo, kbv)
    if knobs.parallel == "fused":
        sch.parallel(sch.fuse(e, nu, kc))
    elif knobs.parallel == "eps":
        sch.parallel(sch.fuse(e, nu))
    sch.vectorize(kbv)
    sch.unroll(kbo)
    sch.unroll(pi)
    # Accumulate in a tile-sized local buffer (registers), then copy the tile out.
    store = sch.cache_write(gemm, 0, "local")
    _break_power_of_two_stride(sch, store)
    sch.reverse_compute_at(store, po)
    store_loops = sch.get_loops(store)
    sch.vectorize(sch.split(store_loops[-1], [None, knobs.vec])[1])
    sch.decompose_reduction(gemm, rc)


def _schedule_winograd_output(sch, layer: ConvLayer, knobs: WinogradKnobs, m: int, nw: int) -> None:
    """Y = A^T M A per (channel block, tile), vectorised along the channel block."""
    inv = sch.get_sblock("inverse")
    kc, th, tw, vh, vw, kb = sch.get_loops(inv)
    par = sch.fuse(kc, th)
    sch.parallel(par)
    sch.compute_at(sch.get_sblock("inverse_t1"), tw)
    sch.unroll(vh)
    sch.unroll(vw)
    sch.vectorize(kb)
    t1_loops = sch.get_loops(sch.get_sblock("inverse_t1"))
    for loop in t1_loops[-3:-1]:  # m x alpha
        sch.unroll(loop)
    sch.vectorize(t1_loops[-1])
    if knobs.epilogue == "fused":
        sch.reverse_compute_at(sch.get_sblock("output"), par)
    else:
        out_loops = sch.get_loops(sch.get_sblock("output"))
        sch.parallel(sch.fuse(*out_loops[:2]))
    w = sch.get_loops(sch.get_sblock("output"))[-1]
    if layer.out_width % m == 0:
        # w = tw * m + vw: reads of a tile row are then affine (strided by oc_bn), not gathers.
        sch.vectorize(sch.split(w, [None, m])[1])
    else:
        _vectorize_innermost(sch, w)


def _schedule_winograd(sch, layer: ConvLayer, knobs: WinogradKnobs, impl: str) -> Iterator[str]:
    m = winograd_m(impl)
    _, nw = winograd_tiles(layer, m)
    _schedule_winograd_input(sch, layer, knobs, nw)
    yield f"input transform B^T d B, vectorised over {knobs.ic_bn} channels, parallel over tile rows"
    if knobs.pad == "inline":
        sch.compute_inline(sch.get_sblock("data_pad"))
    else:
        loops = sch.get_loops(sch.get_sblock("data_pad"))
        sch.parallel(sch.fuse(*loops[:3]))
        sch.vectorize(loops[-1])
    yield f"padding + channel blocking: {knobs.pad}"
    _schedule_winograd_gemm(sch, knobs)
    yield f"batched GEMM: {knobs.tile_bn} tiles x {knobs.oc_bn} channels register tile, parallel {knobs.parallel}"
    _schedule_winograd_output(sch, layer, knobs, m, nw)
    yield f"output transform A^T M A + bias{_epilogue_label(layer)}: epilogue {knobs.epilogue}"


def _schedule_steps(impl: str, sch, layer: ConvLayer, knobs: Knobs) -> Iterator[str]:
    if impl == DEPTHWISE:
        return _depthwise().schedule_steps(sch, layer, knobs)
    if impl == "direct_nchw":
        return _schedule_direct_nchw(sch, layer, knobs)
    if impl == "direct_nchwc":
        return _schedule_direct_nchwc(sch, layer, knobs)
    return _schedule_winograd(sch, layer, knobs, impl)


def _check_schedule_matches(impl: str, sch, layer: ConvLayer, knobs: Knobs) -> None:
    """The schedule's function must have the argument shapes these knobs imply."""
    func = sch.mod[sch.func_working_on] if sch.func_working_on is not None else sch.mod["main"]
    shapes = [tuple(int(x) for x in param.shape) for param in func.params]  # 0.27: params are buffers
    expected = [shape for shape, _ in arg_specs(impl, layer, knobs)]
    if shapes != expected:
        raise KnobError(
            f"the schedule's function has argument shapes {shapes}, but {impl} with {knobs} "
            f"on layer {layer.name!r} needs {expected}: build it with conv_prim_func(impl, layer, knobs)"
        )


def _run_steps(impl: str, sch, layer: ConvLayer, knobs: Knobs) -> Iterator[str]:
    """The schedule's steps, turning TVM schedule errors into KnobError naming the knobs."""
    validate_knobs(impl, layer, knobs)
    _check_schedule_matches(impl, sch, layer, knobs)
    gen = _schedule_steps(impl, sch, layer, knobs)
    while True:
        try:
            name = next(gen)
        except StopIteration:
            return
        except (tvm.s_tir.ScheduleError, tvm.error.InternalError, ValueError) as err:
            raise KnobError(f"{impl} could not apply {knobs} to layer {layer.name!r}: {err}") from err
        yield name


def schedule(impl: str, sch: tvm.s_tir.Schedule, layer: ConvLayer, knobs: Knobs | None = None) -> tvm.s_tir.Schedule:
    """Apply ``impl``'s schedule with ``knobs`` to ``sch`` (made from ``conv_prim_func``) and return it."""
    knobs = _resolve_knobs(impl, layer, knobs)
    for _ in _run_steps(impl, sch, layer, knobs):
        pass
    return sch


def new_schedule(impl: str, layer: ConvLayer, knobs: Knobs | None = None) -> tvm.s_tir.Schedule:
    """A fresh (traced) schedule over ``conv_prim_func(impl, layer, knobs)``."""
    return tvm.s_tir.Schedule(conv_prim_func(impl, layer, knobs))


def steps(impl: str, layer: ConvLayer, knobs: Knobs | None = None) -> list[tuple[str, tvm.s_tir.Schedule]]:
    """(step name, schedule after the step) for each step; the first entry is the unscheduled function."""
    knobs = _resolve_knobs(impl, layer, knobs)
    sch = new_schedule(impl, layer, knobs)
    result = [("unscheduled compute", sch.copy())]
    for name in _run_steps(impl, sch, layer, knobs):
        result.append((name, sch.copy()))
    return result


# ----------------------------------------------------------------------------- build and run


def default_target(num_cores: int | None = None) -> tvm.target.Target:
    """The host, with every core unless told otherwise."""
    from .threads import default_threads

    return tvm.target.Target({"kind": "llvm", "mcpu": tvm_compat.host_cpu(), "num-cores": num_cores or default_threads()})


def func_name(impl: str, layer: ConvLayer) -> str:
    safe = "".join(ch if ch.isalnum() else "_" for ch in layer.name)
    return f"{impl}_{safe}"


def _named_module(func: tvm.tirx.PrimFunc, name: str) -> tvm.IRModule:
    return tvm.IRModule({name: func.with_attr("global_symbol", name)})


@dataclass
class BuiltConv:
    """A compiled implementation: the main kernel (exportable) and its host weight packer.

    ``module[func_name](data, weight, bias, output)`` with tensors of ``arg_shapes`` (see
    ``arg_specs``). Over RPC, with the weight packed on the host in numpy::

        built = build(impl, layer, knobs, target=device_target)
        built.module.export_library(path)  # cross-compiling: fcompile=cc.cross_compiler(...)
        session.upload(path)
        remote = session.load_module(os.path.basename(path))
        dev = session.cpu()
        args = [tvm.runtime.tensor(a, dev) for a in (x, built.pack_weight(w), b)]
        args.append(tvm.runtime.empty(built.arg_shapes[-1][0], "float32", dev))  # after the skip, if any
        seconds = remote.time_evaluator(built.func_name, dev, number=10, repeat=5,
                                        min_repeat_ms=20)(*args).results
    """

    impl: str
    layer: ConvLayer
    knobs: Knobs
    target: tvm.target.Target
    module: tvm.runtime.Module
    func_name: str
    arg_shapes: list[tuple[tuple[int, ...], str]]
    weight_module: tvm.runtime.Module | None = None
    device: tvm.runtime.Device = dataclasses.field(default_factory=tvm.cpu)

    def pack_weight(self, weight: np.ndarray) -> np.ndarray:
        """Packed weight in numpy (same as the weight module's result)."""
        return pack_weight(self.impl, self.layer, self.knobs, weight)

    def prepare(self, weight: np.ndarray, bias: np.ndarray) -> tuple:
        """(packed weight, bias) as device tensors; the packing runs once, in the weight module."""
        weight = np.ascontiguousarray(weight, dtype=np.float32)
        bias_t = tvm.runtime.tensor(np.ascontiguousarray(bias, dtype=np.float32), self.device)
        if self.weight_module is None:
            return tvm.runtime.tensor(weight, self.device), bias_t
        packed = tvm.runtime.empty(self.arg_shapes[1][0], "float32", self.device)
        self.weight_module["weight_pack"](tvm.runtime.tensor(weight, self.device), packed)
        return packed, bias_t

    def output_tensor(self) -> tvm.runtime.Tensor:
        return tvm.runtime.empty(self.arg_shapes[-1][0], "float32", self.device)

    def _skip(self, skip: np.ndarray | None) -> list:
        if not self.layer.fusion.add:
            return []
        if skip is None:
            raise KnobError(f"layer {self.layer.name!r} fuses an add: pass its skip tensor of shape {self.arg_shapes[3][0]}")
        return [tvm.runtime.tensor(np.ascontiguousarray(skip, dtype=np.float32), self.device)]

    def run(self, x: np.ndarray, prepared: tuple, skip: np.ndarray | None = None) -> np.ndarray:
        data = tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32), self.device)
        out = self.output_tensor()
        self.module[self.func_name](data, *prepared, *self._skip(skip), out)
        return out.numpy()

    def time(self, prepared: tuple, number: int = 10, repeat: int = 5, min_repeat_ms: int = 0) -> list[float]:
        """Seconds per run of the main kernel, one value per repeat (in-process)."""
        data = tvm.runtime.empty(self.arg_shapes[0][0], "float32", self.device)
        data.copyfrom(np.random.default_rng(0).standard_normal(self.arg_shapes[0][0], dtype=np.float32))
        out = self.output_tensor()
        skip = self._skip(np.zeros(self.arg_shapes[3][0], "float32")) if self.layer.fusion.add else []
        timer = self.module.time_evaluator(
            self.func_name, self.device, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms
        )
        return list(timer(data, *prepared, *skip, out).results)


def build(
    impl: str,
    layer: ConvLayer,
    knobs: Knobs | None = None,
    target: tvm.target.Target | dict | None = None,
) -> BuiltConv:
    """Schedule and compile the main kernel for ``target`` (the host by default).

    The weight packer is always compiled for the host, where ``prepare`` runs it.
    """
    knobs = _resolve_knobs(impl, layer, knobs)
    target = default_target() if target is None else tvm.target.Target(target)
    sch = schedule(impl, new_schedule(impl, layer, knobs), layer, knobs)
    name = func_name(impl, layer)
    module = tvm.tirx.build(_named_module(sch.mod["main"], name), target=target)
    return BuiltConv(
        impl=impl,
        layer=layer,
        knobs=knobs,
        target=target,
        module=module,
        func_name=name,
        arg_shapes=arg_specs(impl, layer, knobs),
        weight_module=_build_weight_module(impl, layer, knobs),
    )


def _build_weight_module(impl: str, layer: ConvLayer, knobs: Knobs) -> tvm.runtime.Module | None:
    """The weight packer, compiled for the host: packing runs where ``prepare`` runs."""
    func = weight_prim_func(impl, layer, knobs)
    if func is None:
        return None
    sch = tvm.s_tir.Schedule(func)
    block = sch.get_sblock("weight_pack")
    sch.parallel(sch.get_loops(block)[0])
    return tvm.tirx.build(_named_module(sch.mod["main"], "weight_pack"), target=default_target())
