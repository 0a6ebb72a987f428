"""A self-contained HTML write-up: tables and plotly figures, readable offline."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { border-bottom: 2px solid #ccc; } h2 { margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; } th { background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; } .note { color: #555; } pre { background: #f8f8f8; padding: 1em; }
.device { color: #444; } .emulated { color: #a00; font-weight: bold; }
.warning { color: #a00; font-weight: bold; border-left: 4px solid #a00; padding-left: 0.5em; }
"""


def device_line(device: dict | None) -> str:
    """What measured the results, in one line: key, target, machine, and whether it was emulated."""
    if not device:
        return ""
    target = device.get("target") or {}
    triple = target.get("mtriple") or target.get("mcpu") or "host"
    line = (f"device: key {device.get('key', '?')} at {device.get('tracker', '?')}, target {triple} "
            f"({target.get('num-cores', '?')} threads), machine {device.get('machine') or '?'}")
    if device.get("emulated"):
        line += f"; EMULATED ({device.get('emulation') or 'qemu'}): these timings are not a board's speed"
    return line


@dataclass
class Section:
    title: str
    parts: list = field(default_factory=list)  # str (paragraph), DataFrame, plotly Figure, dict (shown as JSON)


def _render(part, first_figure: list, device: dict | None = None) -> str:
    if isinstance(part, str):  # a paragraph; one that starts with WARNING (disturbed runs) stands out
        css = " class='warning'" if part.startswith("WARNING") else ""
        return f"<p{css}>{html.escape(part)}</p>"
    if isinstance(part, pd.DataFrame):
        return part.to_html(index=False, float_format=lambda v: f"{v:.3g}", border=0)
    if isinstance(part, dict):
        return f"<pre>{html.escape(json.dumps(part, indent=1, default=str))}</pre>"
    if hasattr(part, "to_html"):  # a plotly figure: the library is embedded once, so the file works offline
        if device:  # every figure says what measured it (a figure is often shown on its own)
            part = _with_device(part, device)
        include = "inline" if not first_figure else False
        first_figure.append(True)
        return part.to_html(full_html=False, include_plotlyjs=include)
    raise TypeError(f"cannot render {type(part).__name__} in a report")


def _with_device(fig, device: dict):
    import plotly.graph_objects as go

    fig = go.Figure(fig)  # a copy: the caller's figure keeps its title
    title = fig.layout.title.text or ""
    fig.update_layout(title_text=f"{title}<br><sup>{html.escape(device_line(device))}</sup>",
                      margin=dict(t=110))
    return fig


def write_report(path: str | Path, title: str, sections: list[Section], device: dict | None = None) -> Path:
    """The report; `device` (Device.describe()) heads it and every figure, marked when emulated."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    first_figure: list = []
    body = [f"<h1>{html.escape(title)}</h1>"]
    if device:
        css = "device emulated" if device.get("emulated") else "device"
        body.append(f"<p class='{css}'>{html.escape(device_line(device))}</p>")
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        body.extend(_render(part, first_figure, device) for part in section.parts)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")
    path.write_text(page)
    return path


def fp16_section(fp16_rows: list[dict], conv_records: list[dict] = ()) -> Section | None:
    """FP16 Winograd per device: the error wt8x8_fp16 adds over wt8x8 where it really stores FP16
    (rows of workbench.fp16, the latest per device and conv), and where it is only wt8x8 under
    another name (an alias in the per-layer records); None when the records say nothing of it.
    Timings are left out: on an emulated board they are no board's speed."""
    from . import fp16

    latest = {}
    for row in fp16_rows:  # a later run of the same device and conv replaces the earlier
        latest[(row.get("machine"), bool(row.get("emulated")), row.get("model"), row["layer"], row["algorithm"])] = row
    rows = list(latest.values())
    figures = fp16.summary(rows)
    parts: list = [fp16.sentence(f) for f in figures]
    if rows:
        columns = ("layer", "shape", "algorithm", "rel_err", "fp16_really_used")
        parts.append(pd.DataFrame([{"device": f"{r.get('machine')}{' (emulated)' if r.get('emulated') else ''}",
                                    **{k: r.get(k) for k in columns}} for r in rows]))
    said = {f["machine"] for f in figures if f["fp16_really_used"] is False}
    aliases = {(r.get("device") or {}).get("machine"): r.get("note", "") for r in conv_records
               if str(r.get("impl", "")).startswith("nnpack:wt8x8_fp16:") and r.get("alias_of")}
    parts += [f"On {machine or 'this device'}, nnpack:wt8x8_fp16 is an alias of wt8x8 ({note}); it is not shown as "
              "a separate algorithm." for machine, note in aliases.items() if machine not in said]
    return Section("FP16 Winograd (nnpack:wt8x8_fp16)", parts) if parts else None
