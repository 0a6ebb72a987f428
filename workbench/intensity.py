"""Arithmetic of each layer: FLOPs, minimum bytes moved, arithmetic intensity, per algorithm.

Conventions: FLOPs count a multiply-accumulate as 2 and exclude the bias (the usual convention,
so the reference UNet's 19 convs come to about 2.261e9). "Minimum bytes" is compulsory traffic
in float32: every input, weight and output touched once. Transform costs are dense-matrix
counts, an upper bound (real kernels exploit the zeros and ones in the matrices).
"""

from __future__ import annotations

import math

import pandas as pd

from .geometry import FFT_SIZES, WINOGRAD_TILES, family_rule
from .model import Layer, Model, printable

FLOAT = 4  # bytes per float32


def _count(shape) -> int:
    return math.prod(shape)


def macs(layer: Layer) -> int:
    """Multiply-accumulates of a direct convolution."""
    return layer.geometry.macs


def layer_flops(layer: Layer) -> int:
    out = _count(layer.output_shape)
    if layer.op == "conv":
        return 2 * macs(layer)
    if layer.op == "maxpool":
        return (layer.kernel * layer.kernel - 1) * out  # comparisons
    if layer.op in ("relu", "add"):
        return out
    return 0  # resize and concat only move data


def layer_bytes(layer: Layer) -> int:
    moved = sum(_count(layer.input_shape) for _ in layer.inputs) if layer.op == "add" else _count(layer.input_shape)
    if layer.op == "concat":
        moved = _count(layer.output_shape)  # every input channel read once
    moved += _count(layer.output_shape)
    if layer.op == "conv":
        moved += math.prod(layer.geometry.weight_shape) + layer.out_channels  # grouped: C / groups per filter
    return FLOAT * moved


def layer_table(model: Model) -> pd.DataFrame:
    """One row per layer: shapes, FLOPs, minimum bytes and arithmetic intensity (FLOP/byte)."""
    rows = []
    for layer in model.layers:
        flops, moved = layer_flops(layer), layer_bytes(layer)
        rows.append({
            "name": printable(layer.name),  # control characters escaped: a name stays on its row
            "op": layer.op,
            "input_shape": list(layer.input_shape),
            "output_shape": list(layer.output_shape),
            "kernel": layer.kernel or None,
            "stride": layer.stride if layer.op in ("conv", "maxpool") else None,
            "pad": layer.pad if layer.op in ("conv", "maxpool") else None,
            "flops": flops,
            "bytes": moved,
            "intensity": flops / moved,
        })
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- per-algorithm arithmetic

def _tiles(layer: Layer, m: int) -> int:
    _, _, oh, ow = layer.output_shape
    return math.ceil(oh / m) * math.ceil(ow / m)


def why_not_applicable(layer: Layer, family: str) -> str | None:
    """The mathematical rule for an algorithm family (libraries add their own limits on top)."""
    if layer.op != "conv":
        return f"{layer.name} is a {layer.op}, not a convolution"
    return family_rule(layer.geometry, family)


def _row(layer, family, mults, transform_flops, workspace, note):
    direct_flops = 2 * macs(layer)
    compute = 2 * mults + transform_flops
    traffic = layer_bytes(layer) + 2 * workspace  # workspace written once and read once
    return {
        "layer": layer.name,
        "algorithm": family,
        "applies": True,
        "reason": "",
        "multiplications": mults,
        "transform_flops": transform_flops,
        "flops": compute,
        "workspace_bytes": workspace,
        "bytes": traffic,
        "intensity": compute / traffic,
        # How far the algorithm can run "above peak" in direct-equivalent terms.
        "speedup_bound": direct_flops / compute,
        "note": note,
    }


def direct_arithmetic(layer: Layer) -> dict:
    return _row(layer, "direct", macs(layer), 0, 0, "sliding window, no workspace")


def implicit_gemm_arithmetic(layer: Layer) -> dict:
    return _row(layer, "implicit_gemm", macs(layer), 0, 0,
                f"GEMM M={layer.out_channels} N={layer.output_shape[2] * layer.output_shape[3]} "
                f"K={layer.in_channels * layer.kernel ** 2}, im2col panels built on the fly")


def winograd_arithmetic(layer: Layer, m: int) -> dict:
    r, c, k = layer.kernel, layer.in_channels, layer.out_channels
    alpha, tiles = m + r - 1, _tiles(layer, m)
    mults = k * c * alpha * alpha * tiles
    input_tf = c * tiles * 4 * alpha ** 3  # B^T d B: two alpha x alpha products
    kernel_tf = k * c * 2 * (alpha * r * r + alpha * alpha * r)  # G g G^T
    output_tf = k * tiles * 2 * (m * alpha * alpha + m * m * alpha)  # A^T M A
    workspace = FLOAT * alpha * alpha * (c * tiles + k * c + k * tiles)
    return _row(layer, f"winograd_f{m}x{m}", mults, input_tf + kernel_tf + output_tf, workspace,
                f"{alpha}x{alpha} tiles, {tiles} tiles per channel")


def fft_arithmetic(layer: Layer, size: int) -> dict:
    c, k = layer.in_channels, layer.out_channels
    m = size - layer.kernel + 1
    tiles = _tiles(layer, m)
    bins = size * (size // 2 + 1)  # real-to-complex spectrum
    mults = 4 * k * c * bins * tiles  # a complex multiply-accumulate is 4 real ones
    fft = 2.5 * size * size * math.log2(size * size)  # real 2-D FFT
    transform = int(fft * (c * tiles + k * c + k * tiles))
    workspace = 2 * FLOAT * bins * (c * tiles + k * c + k * tiles)
    return _row(layer, f"fft{size}", mults, transform, workspace, f"{m}x{m} outputs per {size}x{size} tile")


def algorithm_families(layer: Layer) -> list[str]:
    return (["direct", "implicit_gemm"] + [f"winograd_f{m}x{m}" for m in WINOGRAD_TILES]
            + [f"fft{s}" for s in FFT_SIZES])


def _arithmetic(layer: Layer, family: str) -> dict:
    if family == "direct":
        return direct_arithmetic(layer)
    if family == "implicit_gemm":
        return implicit_gemm_arithmetic(layer)
    if family.startswith("winograd"):
        return winograd_arithmetic(layer, int(family.split("_f")[1].split("x")[0]))
    return fft_arithmetic(layer, int(family[3:]))


def algorithm_table(model: Model) -> pd.DataFrame:
    """For every conv and algorithm family: multiplications, transforms, workspace, and whether it applies."""
    rows = []
    for layer in model.convs:
        for family in algorithm_families(layer):
            reason = why_not_applicable(layer, family)
            if reason:
                rows.append({"layer": layer.name, "algorithm": family, "applies": False, "reason": reason})
            else:
                rows.append(_arithmetic(layer, family))
    return pd.DataFrame(rows)


def table_records(frame: pd.DataFrame) -> list[dict]:
    """JSON-ready rows (plain ints and floats, lists for shapes)."""
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in frame.to_dict("records")]


def roofline_prediction(layers: pd.DataFrame, peak_gflops: float, bandwidth_gbs: float) -> pd.DataFrame:
    """What the roofline promises each layer: its bound, the least time it can take, and what limits it."""
    out = layers.copy()
    memory_bound = out["intensity"] * bandwidth_gbs
    out["bound_gflops"] = memory_bound.clip(upper=peak_gflops)
    out["limited_by"] = ["memory" if m < peak_gflops else "compute" for m in memory_bound]
    # Time is at least the larger of compute time and transfer time.
    out["min_time_ms"] = [max(f / (peak_gflops * 1e9), b / (bandwidth_gbs * 1e9)) * 1e3
                          for f, b in zip(out["flops"], out["bytes"])]
    return out


def edge_convs(model: Model, count: int = 2) -> list[str]:
    """The first and last `count` convolutions: the few-channel, large-image layers of the study."""
    names = [layer.name for layer in model.convs]
    return names[:count] + names[-count:] if len(names) > 2 * count else names
