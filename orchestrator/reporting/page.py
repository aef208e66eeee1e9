"""What every self-contained HTML page of evalorch shares (report.html, history.html): escaping, PNGs inlined as
base64, matplotlib figures drawn without pyplot, and the base style sheet. matplotlib is imported here only when a
figure is drawn."""

from __future__ import annotations

import base64
import html
import io
import re
from typing import Any


def escape(text: Any) -> str:
    return html.escape(str(text), quote=True)


def anchor(name: str) -> str:
    """An element id for a recipe's section: `#recipe-<name>` with every other character as `_`."""
    return "recipe-" + re.sub(r"[^A-Za-z0-9_-]", "_", name)


def png_img(data: bytes, alt: str, css: str = "") -> str:
    """An <img> holding the PNG itself, so the page needs no other file."""
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img class="{css}" alt="{escape(alt)}" src="data:image/png;base64,{encoded}">'


def figure(width: float, height: float):
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def png_bytes(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")  # a bare Figure renders through Agg
    return buffer.getvalue()


def page(title: str, css: str, body: str) -> str:
    """The whole document: the base style sheet, then the page's own."""
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{BASE_CSS}{css}</style></head>\n"
            f"<body>\n{body}\n</body></html>\n")


BASE_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1320px;
 padding:0 16px;color:#111827;background:#fff;line-height:1.4}
h1{margin:0 0 4px}h2{margin:28px 0 10px;border-bottom:1px solid #e5e7eb;padding-bottom:4px}h3{margin:14px 0 6px}
.meta{color:#6b7280;margin:0;font-size:13px}code{font-size:12px;background:#f3f4f6;padding:1px 4px;border-radius:3px}
.headline{margin:16px 0;padding:12px 16px;border-left:4px solid #16a34a;background:#f0fdf4}
.headline .best{font-size:17px;font-weight:600;margin:0 0 6px}.headline p{margin:4px 0}
.headline.bad{border-color:#dc2626;background:#fef2f2}.headline.unsure{border-color:#d97706;background:#fffbeb}.note{color:#6b7280;font-size:12px}
table.results{border-collapse:collapse;font-size:14px;width:100%}
.results th,.results td{border-bottom:1px solid #e5e7eb;padding:6px 10px;text-align:left;vertical-align:top}
.results thead th{background:#f9fafb;font-weight:600}.results td.num{text-align:right;white-space:nowrap}
.results tr.best{background:#f0fdf4}.results tr.failed{background:#fef2f2}
.results a{color:inherit}
.ci{display:block;color:#6b7280;font-size:11px}
.verdict{display:block;font-size:11px;font-weight:600}
.good{color:#15803d}.bad{color:#b91c1c}.warn{color:#b45309}.unclear{color:#6b7280}
.badge{padding:1px 8px;border-radius:10px;font-size:12px}.badge.ok{background:#dcfce7;color:#166534}
.badge.bad{background:#fee2e2;color:#991b1b}
img.chart{max-width:100%;height:auto}
"""
