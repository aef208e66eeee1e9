"""The table users know (Model | Mean IoU | Det Rate | IoU>0.5 | IoU>0.7), the best recipe, the change over
the baseline, and how sure we are of each number; in the terminal (rich), in report.md, report.html and
summary.json. Everything here renders from the run folder alone, so `report RUN_DIR` can redo it any time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .results import read_json, read_samples
from .stats import (
    DEFAULT_THRESHOLDS,
    metric_intervals,
    metrics,
    paired_comparison,
    relative_change,
    threshold_key,
    thresholds_of,
)

# The recipe-row keys a run summary keeps (a recipe's own summary.json adds the worker's messages).
ROW_KEYS = ("name", "status", "detail", "metrics", "lineage", "base_override", "recipe", "preflight", "attempts")
Samples = dict[str, list[dict[str, Any]]]


class ReportError(Exception):
    """The folder cannot be reported on (not a run folder)."""


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


# ---------------------------------------------------------------------------------------------- the run folder

def load_run(run_dir: Path) -> dict[str, Any]:
    """The run's summary: summary.json when the run got that far, else rebuilt from each recipe's folder
    (an interrupted parent leaves samples but no summary)."""
    path = run_dir / "summary.json"
    if path.is_file():
        return read_json(path)
    record = run_dir / "run.json"
    if not record.is_file():
        raise ReportError(f"{run_dir} is not a run folder (no summary.json, no run.json)")
    planned = read_json(record).get("recipes", [])
    rows = [_rebuilt_row(run_dir, recipe) for recipe in planned]
    baseline = next((r["name"] for r in planned if r.get("baseline")), None)
    return run_summary(rows, baseline)


def _rebuilt_row(run_dir: Path, recipe: dict[str, Any]) -> dict[str, Any]:
    folder = run_dir / recipe["name"]
    if (folder / "summary.json").is_file():
        stored = read_json(folder / "summary.json")
        return {key: stored.get(key) for key in ROW_KEYS}
    return {"name": recipe["name"], "status": "incomplete", "detail": "no summary recorded (the run was stopped)",
            "metrics": metrics(read_samples(folder / "samples.jsonl")), "lineage": recipe.get("chain") or [],
            "base_override": False, "recipe": recipe, "preflight": None, "attempts": []}


def load_samples(run_dir: Path, summary: dict[str, Any]) -> Samples:
    return {row["name"]: read_samples(run_dir / row["name"] / "samples.jsonl") for row in summary["recipes"]}


def add_statistics(summary: dict[str, Any], samples: Samples) -> dict[str, Any]:
    """Adds to each row a 95% interval for each metric and, against the baseline, the paired IoU difference."""
    baseline = summary.get("baseline")
    base_ok = any(r["name"] == baseline and r["status"] == "ok" for r in summary["recipes"])
    for row in summary["recipes"]:
        own = samples.get(row["name"], [])
        row["intervals"] = metric_intervals(own, thresholds_of(row.get("metrics") or {}) or DEFAULT_THRESHOLDS)
        paired = base_ok and row["name"] != baseline
        row["vs_baseline_paired"] = paired_comparison(own, samples.get(baseline, [])) if paired else None
        row["vs_recorded_base_paired"] = _versus_recorded_base(row, summary, samples)
    return summary


def _versus_recorded_base(row: dict[str, Any], summary: dict[str, Any], samples: Samples) -> dict | None:
    """A recipe that loads its adapter on another base than the recorded one, paired with the recipe that loads
    the same adapter on its recorded base: how much the wrong base costs (the seed's bug, measured)."""
    if not row.get("base_override") or row["status"] != "ok":
        return None
    model = (row.get("recipe") or {}).get("model")
    sibling = next((r["name"] for r in summary["recipes"] if r["status"] == "ok" and not r.get("base_override")
                    and (r.get("recipe") or {}).get("model") == model), None)
    if sibling is None:
        return None
    return {**paired_comparison(samples.get(row["name"], []), samples.get(sibling, [])), "against": sibling}


def override_notes(summary: dict[str, Any]) -> list[str]:
    """One line per recipe evaluated on an overridden base, with its paired difference from the recorded base."""
    notes = []
    for row in summary["recipes"]:
        paired = row.get("vs_recorded_base_paired")
        if paired:
            notes.append(f"{row['name']} loads its adapter on a base it was not trained on; against "
                         f"{paired['against']} (the same adapter on its recorded base): {paired['difference']:+.4f} "
                         f"{interval_text(paired['interval'], signed=True)} {paired['verdict']}")
    return notes


def recipe_seconds(run_dir: Path, name: str) -> float | None:
    """The recipe's wall time, from its own summary.json (the run summary does not carry it)."""
    path = run_dir / name / "summary.json"
    try:
        return float(read_json(path).get("seconds")) if path.is_file() else None
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------ the table

def metric_columns(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(key, title, format) of each metric column: mean IoU, detection rate, then every IoU threshold any
    recipe was scored with (a rescore may add 0.9)."""
    found = {t for row in summary["recipes"] for t in thresholds_of(row.get("metrics") or {})}
    thresholds = sorted(found) or list(DEFAULT_THRESHOLDS)
    return [("mean_iou", "Mean IoU", "{:.4f}"), ("detection_rate", "Det Rate", "{:.2%}"),
            *[(threshold_key(t), f"IoU>{t:g}", "{:.2%}") for t in thresholds]]


def metric_cell(row: dict[str, Any], key: str, fmt: str, *, interval: bool = False) -> str:
    value = (row.get("metrics") or {}).get(key)
    if value is None:
        return "-"
    text = fmt.format(value)
    bounds = (row.get("intervals") or {}).get(key)
    if interval and bounds:
        text += " " + interval_text(bounds, percent=fmt.endswith("%}"))
    return text


def interval_text(bounds: list[float], *, percent: bool = False, signed: bool = False) -> str:
    if percent:
        return f"[{bounds[0]:.0%}, {bounds[1]:.0%}]"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"[{fmt.format(bounds[0])}, {fmt.format(bounds[1])}]"


def change_cell(row: dict[str, Any]) -> str:
    change = row.get("change_vs_baseline")
    return f"{change:+.1%}" if change is not None else ""


def paired_cell(row: dict[str, Any]) -> str:
    """'+0.0019 [-0.012, +0.016] no clear difference' (recipe - baseline, per sample, same samples)."""
    paired = row.get("vs_baseline_paired")
    if not paired:
        return ""
    return f"{paired['difference']:+.4f} {interval_text(paired['interval'], signed=True)} {paired['verdict']}"


def label(row: dict[str, Any], summary: dict[str, Any]) -> str:
    marks = []
    if row["name"] == summary["baseline"]:
        marks.append("baseline")
    if row.get("base_override"):
        marks.append("base overridden")
    return row["name"] + (f" ({', '.join(marks)})" if marks else "")


def status_text(row: dict[str, Any]) -> str:
    errors = (row.get("metrics") or {}).get("errors")
    return f"{row['status']}, {errors} sample error(s)" if errors else row["status"]


def problems(summary: dict[str, Any]) -> list[str]:
    return [f"{r['name']}: {r['status']}: {r['detail']}" for r in summary["recipes"] if r["status"] != "ok"]


def best_line(summary: dict[str, Any]) -> str:
    """Which recipe is best, by how much, and whether the difference is more than noise."""
    best = summary["best"]
    if best is None:
        return "Best recipe: none (no recipe finished with scored samples)"
    row = next(r for r in summary["recipes"] if r["name"] == best)
    bounds = (row.get("intervals") or {}).get("mean_iou")
    text = f"Best recipe: {best} (Mean IoU: {row['metrics']['mean_iou']:.4f}"
    text += f" {interval_text(bounds)}" if bounds else ""
    change = summary["best_change_vs_baseline"]
    text += f", {change:+.1%} over {summary['baseline']}" if change is not None else ""
    paired = row.get("vs_baseline_paired")
    if paired:
        text += f"; paired difference {paired_cell(row)}"
    return text + ")"


def render_terminal(summary: dict[str, Any], console: Console) -> None:
    table = Table(title="Evaluation results")
    table.add_column("Model", style="bold")
    columns = metric_columns(summary)
    for _, title, _ in columns:
        table.add_column(title, justify="right")
    table.add_column("vs baseline", justify="right")
    table.add_column("Paired Δ IoU vs baseline (95% CI)", justify="right")
    table.add_column("Status")
    for row in summary["recipes"]:
        style = None if row["status"] == "ok" else "red"
        cells = [metric_cell(row, key, fmt, interval=key == "mean_iou") for key, _, fmt in columns]
        texts = [label(row, summary), *cells, change_cell(row), paired_cell(row), status_text(row)]
        table.add_row(*[Text(t) for t in texts], style=style)  # Text: a recipe name is never rich markup
    console.print(table)
    console.print(best_line(summary), markup=False)
    for note in override_notes(summary):
        console.print(note, markup=False, highlight=False, style="yellow")
    for problem in problems(summary):
        console.print(problem, markup=False, highlight=False, style="red")


def markdown_table(summary: dict[str, Any]) -> str:
    """The table with 95% intervals and the best line: what report.md opens with and what CI's step summary
    shows."""
    columns = metric_columns(summary)
    head = ["Model", *[title for _, title, _ in columns], "vs baseline", "Paired Δ IoU vs baseline (95% CI)",
            "Status"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for row in summary["recipes"]:
        cells = [metric_cell(row, key, fmt, interval=True) for key, _, fmt in columns]
        lines.append("| " + " | ".join([label(row, summary), *cells, change_cell(row), paired_cell(row),
                                         status_text(row)]).replace("\n", " ") + " |")
    return "\n".join([*lines, "", f"**{best_line(summary)}**", ""])


def render_markdown(summary: dict[str, Any]) -> str:
    lines = ["# Evaluation results", "", markdown_table(summary), _INTERVALS_NOTE, ""]
    gates = summary.get("gates")
    if gates and gates.get("failures"):
        lines += ["## Quality gates failed", "", gates_markdown(gates), ""]
    notes = override_notes(summary)
    if notes:
        lines += ["## Base overrides", "", *[f"- {n}" for n in notes], ""]
    found = problems(summary)
    if found:
        lines += ["## Problems", "", *[f"- {p}" for p in found], ""]
    lines += ["## Lineage", ""]
    for row in summary["recipes"]:
        lines.append(f"- **{row['name']}**: " + (" → ".join(link_text(link) for link in
                                                             reversed(row.get("lineage") or [])) or "-"))
    return "\n".join(lines) + "\n"


_INTERVALS_NOTE = ("Brackets: 95% bootstrap intervals (2000 resamples). Paired Δ: the mean per-sample IoU difference"
                   " from the baseline on the samples both scored; \"better\"/\"worse\" only when its interval"
                   " excludes 0.")


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


def link_text(link: dict[str, Any]) -> str:
    return f"{link['kind']} `{link['path']}` ({link['fingerprint']})"


def write_reports(run_dir: Path, summary: dict[str, Any], samples: Samples, out_dir: Path | None = None) -> Path:
    """report.md and report.html into `out_dir` (the run folder by default); returns the HTML's path."""
    from .report_html import render_html  # matplotlib and Pillow load only when a report is written

    out_dir = out_dir or run_dir
    (out_dir / "report.md").write_text(render_markdown(summary))
    html_path = out_dir / "report.html"
    html_path.write_text(render_html(summary, run_dir, samples), encoding="utf-8")
    return html_path
