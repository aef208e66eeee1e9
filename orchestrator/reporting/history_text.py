"""The history as text: the cells (one definition for the terminal, history.md and history.html), history.md and
the terminal tables."""

from __future__ import annotations

from datetime import UTC

from rich.console import Console
from rich.table import Table
from rich.text import Text

from contract.run_row import Status
from orchestrator.reporting.cells import interval_text, metric_format
from orchestrator.reporting.history import (
    BETTER,
    FINISHED,
    NEW_SETUP,
    NOT_COMPARED,
    WORSE,
    Change,
    History,
    Point,
    RunEntry,
    Trend,
)

SYMBOLS = {BETTER: "▲", WORSE: "▼", NEW_SETUP: "⚑", NOT_COMPARED: "✕"}
LEGEND = ("▲ better, ▼ worse: the paired 95% interval of the per-sample difference from the recipe's previous run,"
          " on the samples both scored, excludes 0, with the same weights, settings and software · ⚑ new setup:"
          " the weights (lineage fingerprints), the recipe's settings or the software changed, so a jump is not the"
          " same model getting better or worse · ✕ not compared: the runs scored differently (box format, threshold"
          " rule) or share no sample · no mark: no change beyond noise")


# ---------------------------------------------------------------------------------------------- cells

def time_text(entry: RunEntry) -> str:
    return entry.started.astimezone(UTC).strftime("%Y-%m-%d %H:%M") if entry.started else "-"


def commit_text(entry: RunEntry) -> str:
    return entry.commit[:10] if entry.commit else "-"


def state_text(entry: RunEntry) -> str:
    return entry.state + (f": {entry.note}" if entry.note else "")


def value_text(point: Point, metric: str) -> str:
    """'0.6123 ▲', or the recipe's status when it has no value, '-' when the run has no such recipe."""
    if point.status is None:
        return "-"
    if point.status is not Status.OK:
        return str(point.status)
    if point.value is None:
        return "no value"
    mark = point.change.mark if point.change else ""
    return metric_format(metric).format(point.value) + (f" {SYMBOLS[mark]}" if mark else "")


def delta_text(value: float, metric: str) -> str:
    return ("{:+.4f}" if metric == "mean_iou" else "{:+.1%}").format(value)


def bounds_text(interval: list[float], metric: str) -> str:
    """A paired interval: '[-1.000, -0.625]' of mean IoU, '[-12.5%, +0.0%]' of a rate."""
    if metric == "mean_iou":
        return interval_text(interval, signed=True)
    return "[" + ", ".join(delta_text(b, metric) for b in interval) + "]"


def change_text(change: Change, metric: str) -> str:
    """'-0.8750 [-1.000, -0.625] worse, n=8, vs <run>; new setup: weights changed: ...'."""
    if change.paired is None:
        return f"not compared with {change.previous}: {change.not_compared}"
    paired = change.paired
    text = f"{delta_text(paired['difference'], metric)} {bounds_text(paired['interval'], metric)} " \
           f"{paired['verdict']}, n={paired['n']}, vs {change.previous}"
    return text + (f"; new setup: {'; '.join(change.setup)}" if change.setup else "")


def marked_lines(history: History) -> list[tuple[str, Trend, Point]]:
    """(mark, trend, point) of every marked change, run by run."""
    order = {r.name: i for i, r in enumerate(history.runs)}
    found = [(p.marked_change.mark, t, p) for t in history.trends for p in t.marked]
    return sorted(found, key=lambda item: (order.get(item[2].run, 0), item[1].recipe))


def mark_line(trend: Trend, point: Point, metric: str) -> str:
    change = point.marked_change
    return f"{SYMBOLS[change.mark]} {trend.recipe}, {point.run}: {change_text(change, metric)}"


def skipped(history: History) -> list[RunEntry]:
    """The folders not compared: not a run, a run that did not finish, an unreadable one."""
    return [r for r in history.runs if r.state != FINISHED]


# ---------------------------------------------------------------------------------------------- history.md

def render_history_markdown(history: History) -> str:
    metric, finished = history.metric, history.finished
    lines = ["# Evaluation history", "",
             f"`{history.folder}` · metric **{metric}** · {len(finished)} finished run(s), oldest first", "",
             "## Runs", "", "| # | Time (UTC) | Run | Commit | Command | State |", "|---:|---|---|---|---|---|"]
    for index, entry in enumerate(history.runs, 1):
        cells = [str(index), time_text(entry), f"`{entry.name}`", commit_text(entry),
                 f"`{entry.command}`" if entry.command else "-", state_text(entry)]
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    lines += ["", f"## {metric} by run", ""]
    if history.trends:
        lines += ["| Run | " + " | ".join(_md(t.recipe) for t in history.trends) + " |",
                  "|---|" + "---:|" * len(history.trends)]
        for i, entry in enumerate(finished):
            lines.append(f"| `{entry.name}` | " + " | ".join(value_text(t.points[i], metric) for t in history.trends)
                         + " |")
    else:
        lines.append("No finished run.")
    lines += ["", LEGEND, "", "## Marked changes", ""]
    marked = marked_lines(history)
    lines += [f"- {_md(mark_line(t, p, metric))}" for _, t, p in marked] or ["No change beyond noise."]
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------------------------------------- terminal

def show_history(history: History, console: Console) -> None:
    """The runs, the metric of each recipe in each finished run with its marks, then every marked change."""
    runs = Table(title="Runs, oldest first")
    for title in ("#", "Time (UTC)", "Run", "Commit", "State"):
        runs.add_column(title, justify="right" if title == "#" else "left", no_wrap=True)
    runs.add_column("Command", overflow="fold")  # the one cell that gives way on a narrow terminal
    for index, entry in enumerate(history.runs, 1):
        cells = [str(index), time_text(entry), entry.name, commit_text(entry), state_text(entry), entry.command or "-"]
        runs.add_row(*[Text(c) for c in cells], style=None if entry.state == FINISHED else "dim")
    console.print(runs)
    if history.trends:
        values = Table(title=f"{history.metric} by run")
        values.add_column("Run")
        for trend in history.trends:
            values.add_column(trend.recipe, justify="right")
        for i, entry in enumerate(history.finished):
            values.add_row(Text(entry.name), *[Text(value_text(t.points[i], history.metric)) for t in history.trends])
        console.print(values)
    styles = {BETTER: "green", WORSE: "red", NEW_SETUP: "yellow", NOT_COMPARED: "dim"}
    for mark, trend, point in marked_lines(history):
        console.print(mark_line(trend, point, history.metric), markup=False, highlight=False, style=styles[mark],
                      soft_wrap=True)  # one line each, for logs that are grepped
    if not history.finished:
        console.print("No finished run to compare.", markup=False)
    elif not marked_lines(history):
        console.print("No change beyond noise between consecutive runs.", markup=False)
