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
"""


@dataclass
class Section:
    title: str
    parts: list = field(default_factory=list)  # str (paragraph), DataFrame, plotly Figure, dict (shown as JSON)


def _render(part, first_figure: list) -> str:
    if isinstance(part, str):
        return f"<p>{html.escape(part)}</p>"
    if isinstance(part, pd.DataFrame):
        return part.to_html(index=False, float_format=lambda v: f"{v:.3g}", border=0)
    if isinstance(part, dict):
        return f"<pre>{html.escape(json.dumps(part, indent=1, default=str))}</pre>"
    if hasattr(part, "to_html"):  # a plotly figure: the library is embedded once, so the file works offline
        include = "inline" if not first_figure else False
        first_figure.append(True)
        return part.to_html(full_html=False, include_plotlyjs=include)
    raise TypeError(f"cannot render {type(part).__name__} in a report")


def write_report(path: str | Path, title: str, sections: list[Section]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    first_figure: list = []
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        body.extend(_render(part, first_figure) for part in section.parts)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")
    path.write_text(page)
    return path
