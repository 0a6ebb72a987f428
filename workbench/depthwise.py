"""A depthwise convolution (groups == input channels) as a hand TensorIR schedule with knobs.

`tvm:depthwise` is one of the hand schedules (schedules.SCHEDULES): schedules.py dispatches its
knobs, computes and steps here, and it shares their argument order (data, packed weight, bias,
[skip], output), their fused ops (a pool before the conv in the padding stage; resize, add and
ReLU after it in the output stage) and their placement knobs (parallel, pad, epilogue).

A depthwise conv does kernel_h x kernel_w multiply-adds per output: it is bound by memory
traffic and vector shuffles rather than by arithmetic, so the layout is a knob:

- ``nchwc``: the padding stage re-lays the input out as NCHW[oc_bn]c; the register tile is
  ow_bn output pixels x oc_bn channels, vectorised along the channels, so every load is a
  contiguous vector at any stride; the output stage unpacks to NCHW.
- ``nchw``: no re-layout; the register tile is ow_bn pixels of one channel, vectorised along
  the width (a stride-2 conv then loads every other element).

``ow_bn`` divides the output width, or is a power of two up to the width rounded up (8 or 16 on a
14- or 28-wide row): the conv is then computed over the rounded-up width from a wider zero-padded
input, and the output stage keeps the row, so narrow rows still get whole vectors.

A channel multiplier (out_channels = multiplier x in_channels) is allowed: output channel k
reads input channel k // multiplier.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te

from . import schedules as S

LAYOUTS = ("nchwc", "nchw")
TILE_LIMIT = 32  # accumulator vectors of a register tile (AVX-512 has 32 registers; more spill)


@dataclass(frozen=True)
class DepthwiseKnobs:
    """Channel block, register tile along the width, vector lanes, and the placement knobs."""

    layout: str = "nchwc"  # one of LAYOUTS
    oc_bn: int = 16  # channels per block (divides out_channels); nchwc: the layout's block
    ow_bn: int = 8  # output pixels per register tile (see tile_widths)
    vec: int = 16  # vector lanes: along oc_bn (nchwc) or along ow_bn (nchw), dividing it
    unroll_kw: bool = True  # unroll the kernel's width loop inside the tile
    parallel: str = "fused"  # one of schedules.PARALLEL_DIRECT: (channel block, rows) fused, ...
    pad: str = "compute_at"  # one of schedules.PAD_DIRECT
    epilogue: str = "tile"  # one of schedules.EPILOGUE_DIRECT


def rule(g) -> str | None:
    """Why the depthwise schedule cannot compute a conv of geometry `g` (beyond the shared square and
    fusion rules), or None."""
    if not g.is_depthwise:
        kind = "a dense conv" if g.groups == 1 else f"a conv of {g.groups} groups over {g.in_channels} channels"
        return (f"tvm:depthwise computes depthwise convs only (groups == input channels); this is {kind}")
    return None


def tile_widths(layer: S.ConvLayer) -> tuple[int, ...]:
    """The widths of a register tile along a row: divisors of the output width, and powers of two
    (4 and up) no wider than the width rounded up to one, all up to 128."""
    ow = layer.out_width
    powers = [2 ** i for i in range(2, 8) if 2 ** (i - 1) < ow or 2 ** i <= ow]
    return tuple(sorted({d for d in S.divisors(ow) if d <= 128} | {p for p in powers if p <= 128}))


def padded_width(layer: S.ConvLayer, knobs: DepthwiseKnobs) -> int:
    """The width the conv is computed over: the output width rounded up to whole tiles."""
    return -(-layer.out_width // knobs.ow_bn) * knobs.ow_bn


def _multiplier(layer: S.ConvLayer) -> int:
    return layer.out_channels // layer.in_channels


def _channel(layer: S.ConvLayer, k):
    """The input channel output channel k reads."""
    m = _multiplier(layer)
    return k if m == 1 else k // m


# ----------------------------------------------------------------------------- knobs


def default_knobs(layer: S.ConvLayer) -> DepthwiseKnobs:
    """Measured on this machine (2 cores, AVX-512; MobileNetV2's depthwise convs, 7 to 112 wide).

    NCHW wins: the NCHW[x]c re-layout and the unpack back to NCHW are two transposes, each costing
    about as much as the conv itself (the tuner may still pick that layout). Stride 1 on a row
    with a vector of 8 or 16: the whole row (up to 8 vectors) is the tile, 16-channel tasks,
    padding inlined. Stride 1 on a narrower row (28, 14, 7): 8-lane vectors over the row rounded
    up to whole tiles (1.2-1.5x faster than 4- or 2-lane ones), padding per channel. Stride 2:
    one vector per tile (strided loads need shuffles; 2 or 4 lanes beat 8 on a 14- or 28-wide
    output), one channel per task; an odd output width (7) is rounded up to one 8-lane tile.
    """
    vec = S._pick_vec(layer.out_width)
    if vec >= 8 and layer.stride == 1:
        ow_bn = max(d for d in S.divisors(layer.out_width) if d % vec == 0 and d // vec <= 8)
        oc_bn = S._pick_block(layer.out_channels, (16, 8, 4))
        return DepthwiseKnobs(layout="nchw", oc_bn=oc_bn, ow_bn=ow_bn, vec=vec, parallel="oc", pad="inline")
    if layer.stride > 1 and vec > 1:
        return DepthwiseKnobs(layout="nchw", oc_bn=1, ow_bn=vec, vec=vec, parallel="oc", pad="inline")
    ow_bn = _rounded_up_tile(layer)
    return DepthwiseKnobs(layout="nchw", oc_bn=1, ow_bn=ow_bn, vec=min(8, ow_bn), parallel="oc",
                          pad="compute_at" if layer.stride == 1 else "inline")


def _rounded_up_tile(layer: S.ConvLayer) -> int:
    """The 8-, 16- or 32-wide tile that pads the row least (the widest on a tie); on a row too
    short for 8 lanes, the widest tile it has."""
    fits = [t for t in (8, 16, 32) if t in tile_widths(layer)] or [max(tile_widths(layer))]
    return min(reversed(fits), key=lambda t: -(-layer.out_width // t) * t)


def knob_space(layer: S.ConvLayer) -> dict[str, tuple]:
    blocks = lambda n, limit=S.BLOCK_LIMIT: tuple(d for d in S.divisors(n) if d <= limit)  # noqa: E731
    # A whole row is one tile at 7 vectors of 8 or 16 (56 or 112 wide): widths up to 128 are in the space.
    return {"layout": LAYOUTS, "oc_bn": blocks(layer.out_channels), "ow_bn": tile_widths(layer),
            "vec": S.VECTOR_WIDTHS, "unroll_kw": (False, True), "parallel": S.PARALLEL_DIRECT, "pad": S.PAD_DIRECT,
            "epilogue": S.EPILOGUE_DIRECT}


def validate_knobs(layer: S.ConvLayer, knobs: DepthwiseKnobs) -> None:
    """Raise KnobError naming the first knob that does not fit (called by schedules.validate_knobs)."""
    S._check_choice("layout", knobs.layout, LAYOUTS)
    S._check_divides("oc_bn", knobs.oc_bn, layer.out_channels, "out_channels")
    if knobs.ow_bn not in tile_widths(layer) or isinstance(knobs.ow_bn, bool):
        raise S._knob_error("ow_bn", knobs.ow_bn, "must divide out_width or be a power of two up to it rounded "
                            "up", list(tile_widths(layer)))
    if knobs.layout == "nchwc":
        S._check_divides("vec", knobs.vec, knobs.oc_bn, "oc_bn (nchwc: vectorised along the channel block)")
    else:
        S._check_divides("vec", knobs.vec, knobs.ow_bn, "ow_bn (nchw: vectorised along the width)")
    vectors = knobs.ow_bn * (knobs.oc_bn if knobs.layout == "nchwc" else 1) // knobs.vec
    if vectors > TILE_LIMIT:
        raise S._knob_error("ow_bn", knobs.ow_bn, f"the register tile would hold {vectors} vectors, more than the "
                            f"{TILE_LIMIT} registers; shrink ow_bn or oc_bn, or widen vec",
                            [d for d in tile_widths(layer) if d * vectors // knobs.ow_bn <= TILE_LIMIT])
    S._check_choice("parallel", knobs.parallel, S.PARALLEL_DIRECT)
    S._check_choice("pad", knobs.pad, S.PAD_DIRECT)
    S._check_choice("epilogue", knobs.epilogue, S.EPILOGUE_DIRECT)


# ----------------------------------------------------------------------------- weights


def packed_weight_shape(layer: S.ConvLayer, knobs: DepthwiseKnobs) -> tuple[int, ...]:
    k, r = layer.out_channels, layer.kernel
    return (k // knobs.oc_bn, r, r, knobs.oc_bn) if knobs.layout == "nchwc" else (k, r, r)


def pack_weight(layer: S.ConvLayer, knobs: DepthwiseKnobs, weight: np.ndarray) -> np.ndarray:
    """(K, 1, r, r) -> (K/oc_bn, r, r, oc_bn) for nchwc, (K, r, r) for nchw."""
    k, r = layer.out_channels, layer.kernel
    plain = weight.reshape(k, r, r)
    if knobs.layout == "nchw":
        return np.ascontiguousarray(plain)
    return np.ascontiguousarray(plain.reshape(k // knobs.oc_bn, knobs.oc_bn, r, r).transpose(0, 2, 3, 1))


def weight_prim_func(layer: S.ConvLayer, knobs: DepthwiseKnobs) -> tvm.tirx.PrimFunc:
    k, r, ob = layer.out_channels, layer.kernel, knobs.oc_bn
    weight = te.placeholder((k, 1, r, r), name="weight")
    shape = packed_weight_shape(layer, knobs)
    if knobs.layout == "nchwc":
        packed = te.compute(shape, lambda kc, h, w, kb: weight[kc * ob + kb, 0, h, w], name="weight_pack")
    else:
        packed = te.compute(shape, lambda kk, h, w: weight[kk, 0, h, w], name="weight_pack")
    return te.create_prim_func([weight, packed])


# ----------------------------------------------------------------------------- compute


def compute(layer: S.ConvLayer, knobs: DepthwiseKnobs) -> list:
    """The main function's tensors: data, packed weight, bias, [skip], output."""
    data, weight, bias, skip = S._placeholders(S.DEPTHWISE, layer, knobs)
    p, s, r, ob, k = layer.pad, layer.stride, layer.kernel, knobs.oc_bn, layer.out_channels
    kh = te.reduce_axis((0, r), name="kh")
    kw = te.reduce_axis((0, r), name="kw")
    ow = padded_width(layer, knobs)  # whole tiles: columns past the row read zero padding
    rows, cols = layer.height + 2 * p, max(layer.width + 2 * p, (ow - 1) * s + r)
    if knobs.layout == "nchwc":
        data_pad = S._padded(layer, data, (1, k // ob, rows, cols, ob),
                             lambda n, kc, h, w, kb: (_channel(layer, kc * ob + kb), h, w))
        conv = te.compute(
            (1, k // ob, layer.out_height, ow, ob),
            lambda n, kc, oh, ow, kb: te.sum(
                data_pad[n, kc, oh * s + kh, ow * s + kw, kb] * weight[kc, kh, kw, kb], axis=[kh, kw]),
            name="conv",
        )
        at = lambda n, kk, h, w: conv[n, kk // ob, h, w, kk % ob]  # noqa: E731
    else:
        data_pad = S._padded(layer, data, (1, k, rows, cols), lambda n, kk, h, w: (_channel(layer, kk), h, w))
        conv = te.compute(
            (1, k, layer.out_height, ow),
            lambda n, kk, oh, ow: te.sum(data_pad[n, kk, oh * s + kh, ow * s + kw] * weight[kk, kh, kw],
                                         axis=[kh, kw]),
            name="conv",
        )
        at = lambda n, kk, h, w: conv[n, kk, h, w]  # noqa: E731
    return S._args(data, weight, bias, skip, S._output(layer, at, bias, skip))


# ----------------------------------------------------------------------------- schedule


def schedule_steps(sch, layer: S.ConvLayer, knobs: DepthwiseKnobs) -> Iterator[str]:
    conv = sch.get_sblock("conv")
    ow = padded_width(layer, knobs)
    past = f" (the {layer.out_width}-wide row computed as {ow})" if ow != layer.out_width else ""
    if knobs.layout == "nchwc":
        n, kc, oh, ow, kb, kh, kw = sch.get_loops(conv)
        owo, owi = sch.split(ow, [None, knobs.ow_bn])
        kbo, kbv = sch.split(kb, [None, knobs.vec])
        sch.reorder(n, kc, oh, owo, kh, kw, owi, kbo, kbv)
        yield f"register tile: {knobs.ow_bn} pixels x {knobs.oc_bn} channels{past}, kernel window outside"
        vector, tile = kbv, (owi, kbo)
    else:
        n, k, oh, ow, kh, kw = sch.get_loops(conv)
        kc, kb = sch.split(k, [None, knobs.oc_bn])
        owo, owi = sch.split(ow, [None, knobs.ow_bn])
        owv_o, owv = sch.split(owi, [None, knobs.vec])
        sch.reorder(n, kc, oh, kb, owo, kh, kw, owv_o, owv)
        yield f"register tile: {knobs.ow_bn} pixels of one channel{past}, {knobs.oc_bn} channels per block"
        vector, tile = owv, (owv_o,)
    par, row, oc = S._outer_loops(sch, knobs.parallel, (n, kc, oh))
    yield f"parallel: {knobs.parallel}"
    sch.vectorize(vector)
    for loop in tile:
        sch.unroll(loop)
    if knobs.unroll_kw:
        sch.unroll(kw)
    yield f"vectorize the {'channel block' if knobs.layout == 'nchwc' else 'width'}, unroll the register tile"
    S._place_epilogue(sch, knobs, owo, row, oc)
    yield f"epilogue ({'unpack to NCHW + ' if knobs.layout == 'nchwc' else ''}bias{S._epilogue_label(layer)}): " \
          f"{knobs.epilogue}"
    S._place_pad(sch, knobs, par, row, vectorize=knobs.layout == "nchwc")
    yield f"padding{' + NCHW[%dc] re-layout' % knobs.oc_bn if knobs.layout == 'nchwc' else ''}: {knobs.pad}"
    sch.decompose_reduction(conv, kh)
    yield "decompose reduction: zero the accumulators before the kernel window"


S.PROVIDERS[S.DEPTHWISE] = sys.modules[__name__]  # schedules.py dispatches tvm:depthwise here
