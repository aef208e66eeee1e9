"""The table users know (Model | Mean IoU | Det Rate | IoU>0.5 | IoU>0.7), the best recipe, the change over
the baseline; in the terminal (rich), in report.md and in summary.json."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from .stats import relative_change, threshold_key

_COLUMNS = [("mean_iou", "Mean IoU", "{:.4f}"), ("detection_rate", "Det Rate", "{:.2%}"),
            (threshold_key(0.5), "IoU>0.5", "{:.2%}"), (threshold_key(0.7), "IoU>0.7", "{:.2%}")]


def run_summary(rows: list[dict[str, Any]], baseline: str | None) -> dict[str, Any]:
    """Side-by-side summary of a run: each row has name, status, metrics; adds the change over the baseline."""
    base_row = next((r for r in rows if r["name"] == baseline and r["status"] == "ok"), None)
    base_iou = base_row["metrics"]["mean_iou"] if base_row else None
    for row in rows:
        mean = (row.get("metrics") or {}).get("mean_iou")
        row["change_vs_baseline"] = None if row["name"] == baseline else relative_change(mean, base_iou)
    finished = [r for r in rows if r["status"] == "ok" and r["metrics"]["mean_iou"] is not None]
    candidates = [r for r in finished if r["name"] != baseline] or finished
    best = max(candidates, key=lambda r: r["metrics"]["mean_iou"], default=None)
    return {
        "recipes": rows,
        "baseline": baseline,
        "best": best["name"] if best else None,
        "best_change_vs_baseline": best["change_vs_baseline"] if best else None,
    }


def _cells(row: dict[str, Any]) -> list[str]:
    metrics = row.get("metrics") or {}
    cells = []
    for key, _, fmt in _COLUMNS:
        value = metrics.get(key)
        cells.append(fmt.format(value) if value is not None else "-")
    change = row.get("change_vs_baseline")
    cells.append(f"{change:+.1%}" if change is not None else "")
    return cells


def _label(row: dict[str, Any], summary: dict[str, Any]) -> str:
    marks = []
    if row["name"] == summary["baseline"]:
        marks.append("baseline")
    if row.get("base_override"):
        marks.append("base overridden")
    return row["name"] + (f" ({', '.join(marks)})" if marks else "")


def _status(row: dict[str, Any]) -> str:
    errors = (row.get("metrics") or {}).get("errors")
    return f"{row['status']}, {errors} sample error(s)" if errors else row["status"]


def _problems(summary: dict[str, Any]) -> list[str]:
    return [f"{r['name']}: {r['status']}: {r['detail']}" for r in summary["recipes"] if r["status"] != "ok"]


def render_terminal(summary: dict[str, Any], console: Console) -> None:
    table = Table(title="Evaluation results")
    table.add_column("Model", style="bold")
    for _, title, _ in _COLUMNS:
        table.add_column(title, justify="right")
    table.add_column("vs baseline", justify="right")
    table.add_column("Status")
    for row in summary["recipes"]:
        style = None if row["status"] == "ok" else "red"
        table.add_row(_label(row, summary), *_cells(row), _status(row), style=style)
    console.print(table)
    console.print(_best_line(summary))
    for problem in _problems(summary):
        console.print(f"[red]{problem}[/red]", markup=True, highlight=False)


def _best_line(summary: dict[str, Any]) -> str:
    best = summary["best"]
    if best is None:
        return "Best recipe: none (no recipe finished with scored samples)"
    row = next(r for r in summary["recipes"] if r["name"] == best)
    change = summary["best_change_vs_baseline"]
    over = f", {change:+.1%} over {summary['baseline']}" if change is not None else ""
    return f"Best recipe: {best} (Mean IoU: {row['metrics']['mean_iou']:.4f}{over})"


def render_markdown(summary: dict[str, Any]) -> str:
    head = ["Model", *[title for _, title, _ in _COLUMNS], "vs baseline", "Status"]
    lines = ["# Evaluation results", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary["recipes"]:
        lines.append("| " + " | ".join([_label(row, summary), *_cells(row), _status(row)]) + " |")
    lines += ["", f"**{_best_line(summary)}**", ""]
    problems = _problems(summary)
    if problems:
        lines += ["## Problems", "", *[f"- {p}" for p in problems], ""]
    lines += ["## Lineage", ""]
    for row in summary["recipes"]:
        lines.append(f"- **{row['name']}**: " + (" → ".join(_link_text(link) for link in
                                                             reversed(row.get("lineage") or [])) or "-"))
    return "\n".join(lines) + "\n"


def _link_text(link: dict[str, Any]) -> str:
    return f"{link['kind']} `{link['path']}` ({link['fingerprint']})"
