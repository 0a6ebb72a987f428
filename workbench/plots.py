"""Plotly figures from tables and records. Pure functions: data in, figure out."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

OP_COLOURS = {"conv": "#1f77b4", "relu": "#2ca02c", "maxpool": "#9467bd", "resize": "#8c564b",
              "add": "#e377c2", "concat": "#7f7f7f"}
LIBRARY_COLOURS = {"nnpack": "#d62728", "tvm": "#1f77b4", "onnxruntime": "#ff7f0e", "torch": "#9467bd"}


def _ceiling_values(ceilings) -> dict:
    return ceilings if isinstance(ceilings, dict) else ceilings.to_dict()


def attainable(intensity, peak_gflops: float, bandwidth_gbs: float):
    """The roofline: min(peak, bandwidth x intensity), in GFLOP/s."""
    return np.minimum(peak_gflops, bandwidth_gbs * np.asarray(intensity, dtype=float))


def _hover(frame: pd.DataFrame) -> list[str]:
    return [
        f"<b>{r['name']}</b> ({r['op']})<br>{r['input_shape']} → {r['output_shape']}<br>"
        f"{r['flops'] / 1e6:.1f} MFLOP, {r['bytes'] / 1e6:.2f} MB<br>intensity {r['intensity']:.1f} FLOP/B"
        for _, r in frame.iterrows()
    ]


def roofline(ceilings, layers: pd.DataFrame, achieved: pd.DataFrame | None = None,
             title: str = "Roofline") -> go.Figure:
    """Measured ceilings as lines, each layer at its roofline bound, and achieved GFLOP/s if given.

    `achieved` has columns layer, impl, gflops (direct-equivalent FLOPs / time) and optionally intensity.
    """
    c = _ceiling_values(ceilings)
    peak, bandwidth = c["peak_gflops"], c["bandwidth_gbs"]
    layers = layers[layers["flops"] > 0]
    lo = min(0.05, layers["intensity"].min() / 2)
    hi = max(1000.0, layers["intensity"].max() * 2)
    x = np.logspace(np.log10(lo), np.log10(hi), 200)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=attainable(x, peak, bandwidth), mode="lines", name="roofline",
                             line=dict(color="black", width=2),
                             hovertemplate="%{x:.2f} FLOP/B → %{y:.1f} GFLOP/s<extra>roofline</extra>"))
    fig.add_trace(go.Scatter(x=[x[0], x[-1]], y=[peak, peak], mode="lines", line=dict(dash="dot", color="grey"),
                             name=f"peak {peak:.0f} GFLOP/s (FMA kernel)"))
    if c.get("gemm_gflops"):
        g = c["gemm_gflops"]
        fig.add_trace(go.Scatter(x=[x[0], x[-1]], y=[g, g], mode="lines", line=dict(dash="dash", color="grey"),
                                 name=f"BLAS GEMM {g:.0f} GFLOP/s"))
    for op, frame in layers.groupby("op", sort=False):
        fig.add_trace(go.Scatter(
            x=frame["intensity"], y=attainable(frame["intensity"], peak, bandwidth), mode="markers",
            name=f"{op} (bound)", marker=dict(symbol="circle-open", size=10, color=OP_COLOURS.get(op)),
            text=_hover(frame), hovertemplate="%{text}<br>bound %{y:.1f} GFLOP/s<extra></extra>"))
    if achieved is not None and len(achieved):
        _add_achieved(fig, layers, achieved)
    fig.update_layout(
        title=f"{title}: {bandwidth:.1f} GB/s, ridge {peak / bandwidth:.1f} FLOP/B",
        xaxis=dict(type="log", title="arithmetic intensity (FLOP/byte)"),
        yaxis=dict(type="log", title="GFLOP/s"), legend=dict(font=dict(size=10)), height=520)
    return fig


def _add_achieved(fig: go.Figure, layers: pd.DataFrame, achieved: pd.DataFrame) -> None:
    intensity = dict(zip(layers["name"], layers["intensity"]))
    frame = achieved.copy()
    if "intensity" not in frame:
        frame["intensity"] = frame["layer"].map(intensity)
    frame["library"] = frame["impl"].str.split(":").str[0]
    for library, group in frame.groupby("library", sort=False):
        fig.add_trace(go.Scatter(
            x=group["intensity"], y=group["gflops"], mode="markers", name=f"{library} (measured)",
            marker=dict(size=9, color=LIBRARY_COLOURS.get(library)),
            text=[f"<b>{r.layer}</b><br>{r.impl}" for r in group.itertuples()],
            hovertemplate="%{text}<br>%{y:.1f} GFLOP/s<extra></extra>"))


def layer_bars(layers: pd.DataFrame, column: str = "flops", title: str | None = None) -> go.Figure:
    """One bar per layer, coloured by op: where the work (or the traffic) is."""
    fig = go.Figure()
    for op, frame in layers.groupby("op", sort=False):
        fig.add_trace(go.Bar(x=frame["name"], y=frame[column], name=op, marker_color=OP_COLOURS.get(op)))
    fig.update_layout(title=title or f"{column} per layer", xaxis=dict(categoryorder="array",
                      categoryarray=list(layers["name"])), yaxis_title=column, height=380)
    return fig


def implementation_bars(records, title: str = "Effective GFLOP/s per layer") -> go.Figure:
    """Grouped bars: each layer, each usable implementation (numerics held, no aliases)."""
    from .measure import usable

    records = pd.DataFrame(records)
    frame = pd.DataFrame(usable(records.to_dict("records")), columns=list(records.columns))
    fig = go.Figure()
    for impl, group in frame.groupby("impl", sort=False):
        library = impl.split(":")[0]
        fig.add_trace(go.Bar(x=group["layer"], y=group["gflops"], name=impl,
                             marker_line_color=LIBRARY_COLOURS.get(library), marker_line_width=1.5,
                             hovertemplate="%{x}<br>" + impl + ": %{y:.1f} GFLOP/s<extra></extra>"))
    fig.update_layout(barmode="group", title=title, yaxis_title="direct-equivalent GFLOP/s", height=450,
                      xaxis=dict(categoryorder="array", categoryarray=list(dict.fromkeys(records["layer"]))))
    return fig


def phase_bars(records: pd.DataFrame, impl: str, title: str | None = None) -> go.Figure:
    """Stacked NNPACK phases per layer for one implementation: where the time goes."""
    frame = records[(records["impl"] == impl) & records["phases"].notna()]
    phases = ("input_transform", "kernel_transform", "block_multiplication", "output_transform")
    fig = go.Figure()
    for phase in phases:
        fig.add_trace(go.Bar(x=frame["layer"], y=[p.get(f"{phase}_ms", 0) for p in frame["phases"]], name=phase))
    fig.update_layout(barmode="stack", title=title or f"{impl}: time per phase", yaxis_title="ms", height=400)
    return fig


def end_to_end_bars(results: pd.DataFrame, title: str = "End to end: median latency") -> go.Figure:
    """One bar per system (the hybrid, the peers), wrong results marked."""
    frame = results.sort_values("median_ms")
    colours = ["#2ca02c" if n == "hybrid" else ("#d62728" if not ok else "#7f7f7f")
               for n, ok in zip(frame["name"], frame["numerics_ok"])]
    fig = go.Figure(go.Bar(x=frame["median_ms"], y=frame["name"], orientation="h", marker_color=colours,
                           text=[f"{v:.1f} ms" for v in frame["median_ms"]], textposition="outside"))
    fig.update_layout(title=title, xaxis=dict(type="log", title="ms (log scale)"), height=80 + 40 * len(frame),
                      yaxis=dict(autorange="reversed"))
    return fig


def tuning_curves(results, title: str = "Tuning: best latency against trials") -> go.Figure:
    """Best time so far against trial index, one line per tuned layer and search space (TuneResult
    objects or dicts); convs of one shape share a line (the knob tuner tunes each shape once)."""
    fig, drawn = go.Figure(), set()
    for result in results:
        r = result if isinstance(result, dict) else result.to_dict()
        space = r.get("space", "metaschedule")
        key = (space, tuple(map(tuple, r.get("history") or ())))
        if r.get("history") and key not in drawn:
            drawn.add(key)
            trials, best = zip(*r["history"])
            name = r["layer"] if space == "metaschedule" else f"{r['layer']} (knobs)"
            fig.add_trace(go.Scatter(x=trials, y=best, mode="lines+markers", name=name))
    fig.update_layout(title=title, xaxis_title="trial", yaxis_title="best ms so far", height=400)
    return fig


def fusion_bars(figures: dict, title: str = "Fusion: one plan built three ways, end to end") -> go.Figure:
    """Unfused, the 2018 groups, folded, the hybrid, and the convs' isolated times summed (ms)."""
    names = [("unfused_ms", "unfused"), ("groups_2018_ms", "2018 groups"), ("folded_ms", "folded"),
             ("hybrid_ms", "hybrid"), ("isolated_sum_ms", "convs alone, summed")]
    shown = [(label, figures[key]) for key, label in names if figures.get(key) is not None]
    fig = go.Figure(go.Bar(x=[label for label, _ in shown], y=[ms for _, ms in shown],
                           text=[f"{ms:.2f}" for _, ms in shown], textposition="outside"))
    fig.update_layout(title=title, yaxis_title="ms", template="plotly_white")
    return fig


def model_estimate(history: list[tuple[int, float]], title: str = "Knob tuning: the convs' estimated time") -> go.Figure:
    """The whole model's convs at their best point so far (ms) against the trials spent."""
    fig = go.Figure()
    if history:
        trials, ms = zip(*history)
        fig.add_trace(go.Scatter(x=trials, y=ms, mode="lines+markers", name="sum of the convs' best"))
    fig.update_layout(title=title, xaxis_title="trials (all convs)", yaxis_title="ms", height=350)
    return fig


def flop_share_bars(shares: pd.DataFrame, title: str = "Where each network's conv FLOPs are") -> go.Figure:
    """Per network, the share of its convs' FLOPs in each conv class (families.flop_shares rows)."""
    fig = go.Figure()
    for cls, part in shares.groupby("class", sort=False):
        fig.add_trace(go.Bar(x=part["network"], y=100 * part["share"], name=cls,
                             text=[f"{100 * s:.0f}%" if s > 0.02 else "" for s in part["share"]]))
    fig.update_layout(title=title, barmode="stack", yaxis_title="% of conv FLOPs", template="plotly_white")
    return fig
