"""What the other networks are made of, and where each library wins on them (notebook 06).

The original study's answer to "what about other networks?" was that MobileNet, ShuffleNet and
SqueezeNet have few 3x3 stride-1 convolutions, the only kind Winograd (NNPACK's strength) speeds
up. These functions measure that claim: each conv's class, the share of FLOPs per class, and
which library's kernel won each class in a sweep.
"""

from __future__ import annotations

import pandas as pd

from . import intensity
from .model import Layer, Model

CLASSES = ("3x3 stride 1", "depthwise", "1x1", "strided or other")
WINNER_COLUMNS = ["layer", "class", "winner", "library", "best_ms", "nnpack_ms", "tvm_ms", "nnpack_note"]


def conv_class(layer: Layer) -> str:
    """The class that decides which algorithms apply: Winograd only for dense 3x3 stride 1."""
    g = layer.geometry
    if g.is_grouped:
        return "depthwise" if g.is_depthwise else "strided or other"
    if g.stride != 1:
        return "strided or other"
    if (g.kernel_h, g.kernel_w) == (3, 3):
        return "3x3 stride 1"
    return "1x1" if (g.kernel_h, g.kernel_w) == (1, 1) else "strided or other"


def flop_shares(model: Model) -> pd.DataFrame:
    """Per conv class: how many convs, their FLOPs, their share of the convs' FLOPs, and their median
    arithmetic intensity (FLOP/byte)."""
    table = intensity.layer_table(model).query("op == 'conv'").copy()
    table["class"] = [conv_class(model.layer(name)) for name in table.name]
    rows = []
    total = table.flops.sum()
    for cls in CLASSES:
        part = table[table["class"] == cls]
        rows.append({"network": model.name, "class": cls, "convs": len(part), "flops": int(part.flops.sum()),
                     "share": float(part.flops.sum() / total) if total else 0.0,
                     "median_intensity": float(part.intensity.median()) if len(part) else float("nan")})
    return pd.DataFrame(rows)


def winners_by_class(model: Model, records: list[dict]) -> pd.DataFrame:
    """Per conv: its class, the fastest correct implementation, its library, and the fastest of the other
    library (NNPACK against TVM), with the reason when NNPACK does not apply at all."""
    rows = []
    for layer in model.convs:
        mine = [r for r in records if r.get("layer") == layer.name]
        ok = [r for r in mine if r.get("numerics_ok") and r.get("median_ms") and not r.get("fusion")]
        best = min(ok, key=lambda r: r["median_ms"], default=None)
        nnpack = min((r for r in ok if r["impl"].startswith("nnpack:")), key=lambda r: r["median_ms"], default=None)
        tvm = min((r for r in ok if r["impl"].startswith("tvm:")), key=lambda r: r["median_ms"], default=None)
        refused = next((r.get("note") for r in mine
                        if r["impl"].startswith("nnpack:") and r.get("status") == "not_applicable"), "")
        rows.append({"layer": layer.name, "class": conv_class(layer), "winner": best["impl"] if best else None,
                     "library": best["impl"].split(":")[0] if best else None,
                     "best_ms": best["median_ms"] if best else None,
                     "nnpack_ms": nnpack["median_ms"] if nnpack else None,
                     "tvm_ms": tvm["median_ms"] if tvm else None,
                     "nnpack_note": "" if nnpack else (refused or "no NNPACK record")})
    return pd.DataFrame(rows, columns=WINNER_COLUMNS)


def library_count(winners: pd.DataFrame) -> pd.DataFrame:
    """Convs won by each library, per class."""
    if winners.empty:
        return pd.DataFrame()
    return winners.groupby(["class", "library"]).size().unstack(fill_value=0)
