"""A run's summary, read from its run folder: each recipe's row (status, metrics, lineage), the best recipe, the
change over the baseline, and the statistics (intervals, paired comparisons) added from the sample records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictFloat, ValidationError

from contract.layout import RunFolder
from orchestrator.errors import UserError
from orchestrator.results.stats import (
    DEFAULT_THRESHOLDS,
    IOU_RULE,
    OLD_IOU_RULE,
    metric_intervals,
    metrics,
    paired_comparison,
    relative_change,
    rule_of,
    thresholds_of,
)
from orchestrator.results.store import DamagedRunFile, read_json, read_samples

# The recipe-row keys a run summary keeps (a recipe's own summary.json adds the worker's messages).
ROW_KEYS = ("name", "status", "detail", "metrics", "iou_rule", "parity", "lineage", "base_override", "as_trained",
            "recipe", "preflight", "attempts", "sample_errors", "concurrent_with", "oom_retries", "final_batch_size",
            "decode_graph")


Samples = dict[str, list[dict[str, Any]]]


class ReportError(UserError):
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
    rules = sorted({rule_of(r) for r in rows})
    return {
        "recipes": rows,
        "iou_rule": rules[0] if len(rules) == 1 else "mixed: " + ", ".join(rules),  # how the rates at t count
        "baseline": baseline,
        "best": best["name"] if best else None,
        "best_change_vs_baseline": best["change_vs_baseline"] if best else None,
    }


class _Row(BaseModel):
    """The fields of a recipe row every reader relies on, as summary.json must hold them (issue 31 types the whole
    row); the rest is kept as it is."""

    model_config = ConfigDict(extra="allow")

    name: str
    status: str
    metrics: dict[str, StrictFloat | None] | None = None  # a count is a number too (StrictFloat takes ints)
    recipe: dict[str, Any] | None = None
    lineage: list[dict[str, Any]] | None = None


class _Summary(BaseModel):
    model_config = ConfigDict(extra="allow")

    recipes: list[_Row]


def read_summary(path: Path) -> dict[str, Any]:
    """A summary.json whose recipe rows have the shape the readers rely on; DamagedRunFile naming the first field
    that has not (a hand-edited or foreign file: a figure read from it would be a guess)."""
    summary = read_json(path)
    try:
        _Summary.model_validate(summary)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the file"
        raise DamagedRunFile(path, f"{where}: {first['msg']}") from None
    return summary


def load_run(run_dir: Path) -> dict[str, Any]:
    """The run's summary: summary.json when the run got that far, else rebuilt from each recipe's folder
    (an interrupted parent leaves samples but no summary)."""
    folder = RunFolder(run_dir)
    if folder.summary.is_file():
        return read_summary(folder.summary)
    record = folder.record
    if not record.is_file():
        raise ReportError(f"{run_dir} is not a run folder (no summary.json, no run.json)")
    run_record = read_json(record)
    planned = run_record.get("recipes", [])
    rule = run_record.get("iou_rule", OLD_IOU_RULE)  # a run.json from before the rule was recorded counted ">"
    rows = [recorded_row(run_dir, recipe, rule) for recipe in planned]
    baseline = next((r["name"] for r in planned if r.get("baseline")), None)
    return run_summary(rows, baseline)


def with_recorded_rows(run_dir: Path, recipes: list[dict[str, Any]],
                       rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A row for every recipe run.json records, in its order: `rows` (just evaluated) where they have one, else
    the one the folder holds (a recipe a resume did not select keeps its row)."""
    fresh = {row["name"]: row for row in rows}
    return [fresh.get(recipe["name"]) or recorded_row(run_dir, recipe, IOU_RULE) for recipe in recipes]


def recorded_row(run_dir: Path, recipe: dict[str, Any], rule: str) -> dict[str, Any]:
    """A recipe's row from its folder: its summary.json, or rebuilt from its samples where it has none."""
    folder = RunFolder(run_dir).recipe(recipe["name"])
    if folder.summary.is_file():
        stored = read_json(folder.summary)
        return {key: stored.get(key) for key in ROW_KEYS}
    return {"name": recipe["name"], "status": "incomplete", "detail": "no summary recorded (the run was stopped)",
            "metrics": metrics(read_samples(folder.samples), rule=rule), "iou_rule": rule,
            "lineage": recipe.get("chain") or [],
            "base_override": False, "recipe": recipe, "preflight": None, "attempts": []}


def load_samples(run_dir: Path, summary: dict[str, Any]) -> Samples:
    folder = RunFolder(run_dir)
    return {row["name"]: read_samples(folder.recipe(row["name"]).samples) for row in summary["recipes"]}


def add_statistics(summary: dict[str, Any], samples: Samples) -> dict[str, Any]:
    """Adds to each row a 95% interval for each metric and, against the baseline, the paired IoU difference."""
    baseline = summary.get("baseline")
    base_ok = any(r["name"] == baseline and r["status"] == "ok" for r in summary["recipes"])
    base_samples = samples.get(baseline, []) if isinstance(baseline, str) else []
    for row in summary["recipes"]:
        own = samples.get(row["name"], [])
        row["intervals"] = metric_intervals(own, thresholds_of(row.get("metrics") or {}) or DEFAULT_THRESHOLDS,
                                            rule=rule_of(row))
        paired = base_ok and row["name"] != baseline
        row["vs_baseline_paired"] = paired_comparison(own, base_samples) if paired else None
        row["vs_recorded_base_paired"] = _versus_recorded_base(row, summary, samples)
    summary["best_vs_others"] = _best_versus_others(summary, samples)
    return summary


def _best_versus_others(summary: dict[str, Any], samples: Samples) -> list[dict[str, Any]]:
    """The best recipe paired with every other finished recipe (best - other, per sample): whether it is clearly
    ahead of each, or only ahead by noise. The baseline is left out (its row has its own comparison)."""
    best = summary.get("best")
    if best is None:
        return []
    others = [r["name"] for r in summary["recipes"] if r["status"] == "ok" and r["name"] not in
              (best, summary.get("baseline"))]
    compared = []
    for name in others:
        paired = paired_comparison(samples.get(best, []), samples.get(name, []))
        if paired is not None:
            compared.append({"against": name, **paired})
    return compared


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
    paired = paired_comparison(samples.get(row["name"], []), samples.get(sibling, []))
    return {**paired, "against": sibling} if paired is not None else None  # None: no sample scored by both


def recipe_seconds(run_dir: Path, name: str) -> float | None:
    """The recipe's wall time, from its own summary.json (the run summary does not carry it)."""
    path = RunFolder(run_dir).recipe(name).summary
    try:
        return float(read_json(path).get("seconds")) if path.is_file() else None
    except (TypeError, ValueError):
        return None
