"""TVM's int8 convolution: uint8 activations x int8 weights -> int32, requantised to uint8.

TVM 0.27's wheel has no x86 int8 conv schedule (topi/x86 is gone), but it keeps the VNNI dot
product as a TensorIR intrinsic (`vpdpbusd`: 16 int32 lanes += 4 uint8 x 4 int8 each). The
layout is the one that instruction wants, the recipe of the old topi `conv2d_NCHWc_int8`:

    data    (1, C, H, W)                 uint8, NCHW (re-laid out as NCHW[4c] by the pad stage)
    weight  (K/16, C/4, kh, kw, 16, 4)   int8, packed once on the host (`pack_weight`)
    bias    (K16,)                       int32: bias_q - zx * sum(w_q) (the input zero point folded in)
    mult    (K16,)                       float32: in_scale * w_scale_k / out_scale
    output  (1, K, OH, OW)               uint8, NCHW

K16 and C4 are the channel counts rounded up to 16 and 4 (padded weights are zero). The pad
stage fills the border with the input's zero point, so the folded bias is exact everywhere.
Timed: uint8 in -> uint8 out (the conv proper; quantising the float input and dequantising
the output are separate elementwise ops in a model, as in QNNPACK).

Knobs: `ow_bn` (output pixels per register tile), `dot` ("vnni": the tensorized intrinsic;
"vector": plain int32 vectors, for CPUs without VNNI), `parallel` ("oc_oh": fused outer loops
over output channel blocks and rows; "none").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import WorkbenchError

OC_BLOCK, IC_BLOCK = 16, 4  # the VNNI intrinsic's 16 lanes x 4 bytes
VNNI_INTRIN = "workbench_dot_16x4_u8i8i32_vnni"
DOTS = ("vnni", "vector")
PARALLEL = ("oc_oh", "none")


class Int8KnobError(WorkbenchError, ValueError):
    """A knob of the int8 schedule that does not fit the layer."""


@dataclass(frozen=True)
class Int8Knobs:
    ow_bn: int = 8
    dot: str = "vnni"
    parallel: str = "oc_oh"


def _ceil(n: int, b: int) -> int:
    return (n + b - 1) // b * b


def default_knobs(geometry, dot: str = "vnni") -> Int8Knobs:
    ow = geometry.out_width
    # Measured (2 cores, VNNI): 16 pixels x 16 channels of int32 accumulators (16 of the 32 zmm
    # registers) beat 8 by 1.2-1.8x on 16->16 at 192x192 and 32->32 at 96x96; 12 where 16 does not divide.
    ow_bn = next((b for b in (16, 12, 8, 14, 7, 6, 4, 3, 2) if ow % b == 0), 1)
    return Int8Knobs(ow_bn=ow_bn, dot=dot)


def validate(geometry, knobs: Int8Knobs) -> None:
    if geometry.out_width % knobs.ow_bn:
        raise Int8KnobError(f"ow_bn={knobs.ow_bn} must divide the output width {geometry.out_width}; "
                            f"pick a divisor of it")
    if knobs.dot not in DOTS:
        raise Int8KnobError(f"dot={knobs.dot!r} is not one of {DOTS}")
    if knobs.parallel not in PARALLEL:
        raise Int8KnobError(f"parallel={knobs.parallel!r} is not one of {PARALLEL}")


def why_not_applicable(geometry) -> str | None:
    if geometry.groups > 1:
        return (f"tvm:int8 computes dense convs only; this one has {geometry.groups} groups "
                "(a depthwise int8 kernel would reduce over kh x kw, not over 4 input channels)")
    if not geometry.is_square:
        return "tvm:int8 handles square kernels padded equally on every side"
    return None


def pack_weight(w_q: np.ndarray) -> np.ndarray:
    """OIHW int8 -> (K16/16, C4/4, kh, kw, 16, 4), channels zero-padded."""
    k, c, kh, kw = w_q.shape
    padded = np.zeros((_ceil(k, OC_BLOCK), _ceil(c, IC_BLOCK), kh, kw), np.int8)
    padded[:k, :c] = w_q
    ko, co = padded.shape[0] // OC_BLOCK, padded.shape[1] // IC_BLOCK
    return np.ascontiguousarray(padded.reshape(ko, OC_BLOCK, co, IC_BLOCK, kh, kw).transpose(0, 2, 4, 5, 1, 3))


def pack_bias(lq) -> np.ndarray:
    """bias_q - zx * sum(w_q) per output channel, padded to K16 (the zero point folded in)."""
    k = lq.w_q.shape[0]
    folded = lq.bias_q.astype(np.int64) - lq.input.zero_point * lq.w_q.reshape(k, -1).astype(np.int64).sum(1)
    out = np.zeros(_ceil(k, OC_BLOCK), np.int32)
    out[:k] = folded
    return out


def pack_multiplier(lq) -> np.ndarray:
    k = lq.w_q.shape[0]
    out = np.zeros(_ceil(k, OC_BLOCK), np.float32)
    out[:k] = lq.multiplier
    return out


def conv_int8_func(geometry, in_zero_point: int, out_zero_point: int):
    """The TE compute as a PrimFunc (data, weight, bias, mult, output); zero points are constants."""
    from tvm import te, tirx

    g = geometry
    c4, k16 = _ceil(g.in_channels, IC_BLOCK), _ceil(g.out_channels, OC_BLOCK)
    kh, kw, st, (pt, pr, pb, pl) = g.kernel_h, g.kernel_w, g.stride, g.pad
    hp, wp = g.height + pt + pb, g.width + pl + pr
    oh, ow, k = g.out_height, g.out_width, g.out_channels
    data = te.placeholder(g.input_shape, "uint8", name="data")
    weight = te.placeholder((k16 // OC_BLOCK, c4 // IC_BLOCK, kh, kw, OC_BLOCK, IC_BLOCK), "int8", name="weight")
    bias = te.placeholder((k16,), "int32", name="bias")
    mult = te.placeholder((k16,), "float32", name="mult")
    zx = tirx.const(in_zero_point, "uint8")

    def pad_value(co, y, x, ci):
        c = co * IC_BLOCK + ci
        inside = tirx.all(c < g.in_channels, y >= pt, y < pt + g.height, x >= pl, x < pl + g.width)
        return tirx.if_then_else(inside, data[0, tirx.min(c, g.in_channels - 1), y - pt, x - pl], zx)

    padded = te.compute((c4 // IC_BLOCK, hp, wp, IC_BLOCK), pad_value, name="pad")
    rc = te.reduce_axis((0, c4 // IC_BLOCK), name="rc")
    ry, rx = te.reduce_axis((0, kh), name="ry"), te.reduce_axis((0, kw), name="rx")
    ri = te.reduce_axis((0, IC_BLOCK), name="ri")
    acc = te.compute(
        (k16 // OC_BLOCK, oh, ow, OC_BLOCK),
        lambda ko, y, x, ki: te.sum(padded[rc, y * st + ry, x * st + rx, ri].astype("int32")
                                    * weight[ko, rc, ry, rx, ki, ri].astype("int32"), axis=[rc, ry, rx, ri]),
        name="acc")

    def requant(n, o, y, x):
        a = acc[o // OC_BLOCK, y, x, o % OC_BLOCK] + bias[o]
        q = tirx.round(a.astype("float32") * mult[o]) + tirx.const(float(out_zero_point), "float32")
        return tirx.max(tirx.min(q, tirx.const(255.0, "float32")), tirx.const(0.0, "float32")).astype("uint8")

    out = te.compute((1, k, oh, ow), requant, name="requant")
    return te.create_prim_func([data, weight, bias, mult, out])


def register_vnni_intrin() -> str:
    """The VNNI dot product as a TensorIntrin under our own name.

    The same definition as tvm.s_tir.tensor_intrin.x86's, written here because importing that
    package imports its CUDA intrinsics too (about 30 s, DESIGN.md).
    """
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    try:
        TensorIntrin.get(VNNI_INTRIN)
        return VNNI_INTRIN
    except Exception:  # noqa: BLE001 - not registered yet in this process
        pass

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            # LLVM 20's vpdpbusd takes its byte operands as <64 x i8> (older LLVMs: <16 x i32>).
            a = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"), T.reinterpret(T.broadcast(a, 16), dtype="int8x64"),
                B.vload([0, 0], dtype="int8x64"), dtype="int32x16")

    TensorIntrin.register(VNNI_INTRIN, desc, impl, override=True)
    return VNNI_INTRIN


def target_has_vnni(target) -> bool:
    """Whether LLVM's CPU of `target` (a Target or dict) has AVX-512 VNNI."""
    import tvm

    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    try:
        return bool(tvm.target.codegen.llvm_cpu_has_features("avx512vnni", target))
    except Exception:  # noqa: BLE001 - a non-x86 target, or an LLVM that cannot tell
        return False


def schedule(func, geometry, knobs: Int8Knobs):
    """The scheduled PrimFunc: NCHW4c pad, register tile ow_bn x 16 channels, VNNI or vectors, parallel rows."""
    import tvm

    validate(geometry, knobs)
    sch = tvm.s_tir.Schedule(func)
    acc, pad, out = sch.get_sblock("acc"), sch.get_sblock("pad"), sch.get_sblock("requant")
    ko, y, x, ki, rc, ry, rx, ri = sch.get_loops(acc)
    xo, xi = sch.split(x, [None, knobs.ow_bn])
    sch.reorder(ko, y, xo, rc, ry, rx, xi, ki, ri)
    outer = sch.fuse(ko, y)
    if knobs.parallel == "oc_oh":
        sch.parallel(outer)
    # Requantise each tile while its accumulators are in cache (the acc buffer shrinks to a tile).
    sch.reverse_compute_at(out, xo)
    # The padded input is made once, in parallel over its rows, vectorised along its 4 channels.
    p_loops = sch.get_loops(pad)
    sch.parallel(sch.fuse(p_loops[0], p_loops[1]))
    sch.vectorize(p_loops[-1])
    init = sch.decompose_reduction(acc, rc)
    sch.vectorize(sch.get_loops(init)[-1])
    if knobs.dot == "vnni":
        sch.tensorize(ki, register_vnni_intrin())
    else:  # ki innermost over an unrolled ri: LLVM's loop vectoriser takes the 16 lanes
        sch.reorder(ri, ki)
        sch.unroll(ri)
    sch.unroll(xi)
    return sch.mod["main"]
