"""The text of each cell and line a person reads, one definition for the terminal, report.md and report.html:
metric columns, intervals, the paired difference, labels, statuses, the best line, problems."""

from __future__ import annotations

from typing import Any

from ..stats import DEFAULT_THRESHOLDS, threshold_key, thresholds_of


def metric_columns(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(key, title, format) of each metric column: mean IoU, detection rate, then every IoU threshold any
    recipe was scored with (a rescore may add 0.9)."""
    found = {t for row in summary["recipes"] for t in thresholds_of(row.get("metrics") or {})}
    thresholds = sorted(found) or list(DEFAULT_THRESHOLDS)
    keys = [("mean_iou", "Mean IoU"), ("detection_rate", "Det Rate"),
            *[(threshold_key(t), f"IoU>{t:g}") for t in thresholds]]
    return [(key, title, metric_format(key)) for key, title in keys]


def metric_format(key: str) -> str:
    """Mean IoU with four decimals; every other metric is a rate, shown as a percentage."""
    return "{:.4f}" if key == "mean_iou" else "{:.2%}"


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


def link_text(link: dict[str, Any]) -> str:
    return f"{link['kind']} `{link['path']}` ({link['fingerprint']})"
