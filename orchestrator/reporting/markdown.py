"""report.md, and the table CI's step summary shows."""

from __future__ import annotations

from typing import Any

from contract.run_row import RunSummary
from orchestrator.reporting.cells import (
    RELATIVE_CHANGE_NOTE,
    SWEEP_COLUMNS,
    as_trained_notes,
    best_line,
    best_versus_others_line,
    change_cell,
    label,
    link_text,
    metric_cell,
    metric_columns,
    override_notes,
    paired_cell,
    parity_notes,
    problems,
    processor_text,
    status_text,
    sweep_cells,
    sweep_line,
    sweep_title,
    worker_notes,
)


def markdown_table(summary: RunSummary) -> str:
    """The table with 95% intervals and the best line: what report.md opens with and what CI's step summary
    shows."""
    columns = metric_columns(summary)
    head = ["Model", *[title for _, title, _ in columns], "vs baseline", "Paired Δ IoU vs baseline (95% CI)",
            "Status"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for row in summary.recipes:
        cells = [metric_cell(row, key, fmt, interval=True) for key, _, fmt in columns]
        lines.append("| " + " | ".join([label(row, summary), *cells, change_cell(row), paired_cell(row),
                                         status_text(row)]).replace("\n", " ") + " |")
    versus = best_versus_others_line(summary)
    return "\n".join([*lines, "", f"**{best_line(summary)}**", *(["", versus] if versus else []), ""])


def render_markdown(summary: RunSummary) -> str:
    lines = ["# Evaluation results", "", markdown_table(summary), _INTERVALS_NOTE, "", *sweeps_markdown(summary)]
    gates = summary.gates
    if gates and gates.get("failures"):
        lines += ["## Quality gates failed", "", gates_markdown(gates), ""]
    notes = override_notes(summary)
    if notes:
        lines += ["## Base overrides", "", *[f"- {n}" for n in notes], ""]
    trained = as_trained_notes(summary)
    if trained:
        lines += ["## Evaluated as trained", "", *[f"- {n}" for n in trained], ""]
    parity = parity_notes(summary)
    if parity:
        lines += ["## Batch parity", "", *[f"- {n}" if ok else f"- **⚠ {n}**" for ok, n in parity], ""]
    workers = worker_notes(summary)
    if workers:
        lines += ["## Workers", "", *[f"- **{n}**" if oom else f"- {n}" for oom, n in workers], ""]
    found = problems(summary)
    if found:
        lines += ["## Problems", "", *[f"- {p}" for p in found], ""]
    lines += ["## Lineage", ""]
    for row in summary.recipes:
        lines.append(f"- **{row.name}**: " + (" → ".join(link_text(link) for link in reversed(row.lineage))
                                               or "-"))
        if processor := processor_text(row):
            lines.append(f"  - processor: {processor}")
    return "\n".join(lines) + "\n"


def sweeps_markdown(summary: RunSummary) -> list[str]:
    """'## Checkpoint sweeps': for each sweep, its checkpoints by training step and the best one's line."""
    if not summary.sweeps:
        return []
    lines = ["## Checkpoint sweeps", ""]
    for sweep in summary.sweeps:
        lines += [f"### {sweep_title(sweep)}", "", "| " + " | ".join(SWEEP_COLUMNS) + " |",
                  "|---:|---|---:|---:|---|"]
        lines += ["| " + " | ".join(sweep_cells(point, sweep)) + " |" for point in sweep.points]
        lines += ["", f"**{sweep_line(sweep)}**", ""]
    return lines


_INTERVALS_NOTE = ("Brackets: 95% bootstrap intervals (2000 resamples). Paired Δ: the mean per-sample IoU difference"
                   " from the baseline on the samples both scored; \"better\"/\"worse\" only when its interval"
                   f" excludes 0. {RELATIVE_CHANGE_NOTE}.")


def gates_markdown(gates: dict[str, Any]) -> str:
    """The failed gates as a markdown table: recipe, metric, value, previous value (with --compare), limit."""
    compared = any(f.get("previous") is not None for f in gates["failures"])
    lines = ["| Recipe | Metric | Value | " + ("Previous | " if compared else "") + "Limit | Rule |",
             "|---|---|---:|" + ("---:|" if compared else "") + "---:|---|"]
    for f in gates["failures"]:
        previous = f"{_num(f.get('previous'))} | " if compared else ""
        lines.append(f"| {f['recipe']} | {f['metric']} | {_num(f['value'])} | {previous}{_num(f['limit'])} "
                     f"| {f['rule']} |")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
