"""The report page: sections (a figure or a table, with a caption) assembled into one HTML file.

Figures come from `trainer.report.figures` (plain data in, matplotlib Figure out); this module
only assembles them: each becomes a PNG beside the HTML file and a data URI inside it, so the
page needs nothing from the network and stays readable offline. No torch, no onnxruntime.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DPI = 110


@dataclass
class Section:
    """One part of the report: a heading, a figure or a table, and a caption saying how to
    read it. `name` is the stem of the figure's PNG file."""

    name: str
    title: str
    caption: str
    figure: Any = None  # matplotlib Figure
    table: str = ""  # HTML


def table_html(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1180px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
figure { margin: 0.8em 0; } img { max-width: 100%; height: auto; }
figcaption, .caption { color: #444; font-size: 0.95em; margin-top: 0.3em; }
table { border-collapse: collapse; font-size: 0.95em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }
th:first-child, td:first-child, td:nth-child(2) { text-align: left; }
.facts { color: #444; }
"""


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return buf.getvalue()


def write_report(title: str, facts: str, sections: Sequence[Section], out: Path) -> Path:
    """Write `out` (HTML, images inline) and `<stem>-<section>.png` beside it; returns `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class='facts'>{html.escape(facts)}</p>",
    ]
    for s in sections:
        parts.append(f"<section id='{s.name}'><h2>{html.escape(s.title)}</h2>")
        if s.table:
            parts.append(f"{s.table}<p class='caption'>{html.escape(s.caption)}</p>")
        if s.figure is not None:
            png = _png(s.figure)
            (out.parent / f"{out.stem}-{s.name}.png").write_bytes(png)
            uri = "data:image/png;base64," + base64.b64encode(png).decode()
            parts.append(
                f"<figure><img src='{uri}' alt='{html.escape(s.title)}'>"
                f"<figcaption>{html.escape(s.caption)}</figcaption></figure>"
            )
        parts.append("</section>")
    parts.append("</body></html>\n")
    out.write_text("".join(parts))
    return out
