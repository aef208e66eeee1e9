"""The results in the terminal (rich): the table, the best line, notes, problems and failed gates. User text
(recipe names, messages, model output) is always passed as Text or with markup off: it is never read as rich
markup, so `[defaults]` in a message stays `[defaults]`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from contract.layout import RunFolder
from contract.run_row import RunSummary, Status, Sweep
from orchestrator.reporting.cells import (
    SWEEP_COLUMNS,
    best_line,
    best_versus_others_line,
    change_cell,
    label,
    metric_cell,
    metric_columns,
    override_notes,
    paired_cell,
    parity_notes,
    problems,
    status_text,
    sweep_cells,
    sweep_line,
    sweep_title,
    worker_notes,
)


def render_terminal(summary: RunSummary, console: Console) -> None:
    table = Table(title="Evaluation results")
    table.add_column("Model", style="bold")
    columns = metric_columns(summary)
    for _, title, _ in columns:
        table.add_column(title, justify="right")
    table.add_column("vs baseline", justify="right")
    table.add_column("Paired Δ IoU vs baseline (95% CI)", justify="right")
    table.add_column("Status")
    for row in summary.recipes:
        style = None if row.ok else "red"
        cells = [metric_cell(row, key, fmt, interval=key == "mean_iou") for key, _, fmt in columns]
        texts = [label(row, summary), *cells, change_cell(row), paired_cell(row), status_text(row)]
        table.add_row(*[Text(t) for t in texts], style=style)  # Text: a recipe name is never rich markup
    console.print(table)
    console.print(best_line(summary), markup=False)
    versus = best_versus_others_line(summary)
    if versus:
        console.print(versus, markup=False, highlight=False)
    for sweep in summary.sweeps:
        console.print(sweep_table(sweep))
        console.print(sweep_line(sweep), markup=False, highlight=False)
    for note in override_notes(summary):
        console.print(note, markup=False, highlight=False, style="yellow")
    parity = parity_notes(summary)
    for agreed, note in parity:
        if not agreed:
            console.print(f"Warning: {note}", markup=False, highlight=False, style="bold yellow")
    if parity and all(agreed for agreed, _ in parity):
        console.print(f"Batch parity: every checked recipe ({len(parity)}) answers the same batched and alone",
                      markup=False, highlight=False)
    for oom, note in worker_notes(summary):
        if oom:  # which workers ran at once is in report.md and summary.json
            console.print(note, markup=False, highlight=False, style="yellow")
    for problem in problems(summary):
        console.print(problem, markup=False, highlight=False, style="red")


def sweep_table(sweep: Sweep) -> Table:
    """A sweep's checkpoints by training step: mean IoU with its interval beside the trainer's eval loss."""
    table = Table(title=sweep_title(sweep))
    for title in SWEEP_COLUMNS:
        table.add_column(title, justify="left" if title in ("Checkpoint", "Status") else "right")
    for point in sweep.points:
        style = "green" if point.recipe == sweep.best else None if point.status is Status.OK else "red"
        table.add_row(*[Text(cell) for cell in sweep_cells(point, sweep)], style=style)
    return table


def failures_table(gates: dict[str, Any]) -> Table:
    compared = any(f["previous"] is not None for f in gates["failures"])
    titles = ["Recipe", "Metric", "Value", *(["Previous"] if compared else []), "Limit", "Rule"]
    table = Table(title="Quality gates failed", title_style="bold red")
    for title in titles:
        table.add_column(title, justify="right" if title in ("Value", "Previous", "Limit") else "left")
    for f in gates["failures"]:
        previous = [_num(f["previous"])] if compared else []
        cells = [f["recipe"], f["metric"], _num(f["value"]), *previous, _num(f["limit"]), f["rule"]]
        table.add_row(*[Text(c) for c in cells])
    return table


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def show_results(summary: RunSummary, gates: dict[str, Any] | None, console: Console, html_path: Path) -> None:
    """The table, then the gates' verdict and notes, then where the reports are."""
    render_terminal(summary, console)
    if gates and gates["failures"]:
        console.print(failures_table(gates))
        for failure in gates["failures"]:
            console.print(f"Gate failed: {failure['message']}", markup=False, style="red")
    elif gates:
        console.print(f"Quality gates: all {gates['checked']} check(s) passed", markup=False)
    for note in (gates or {}).get("notes", []):
        console.print(f"Gate note: {note}", markup=False)
    console.print(f"Report: {RunFolder(html_path.parent).report_md} and {html_path}", markup=False)
