"""A run's summary (contract/run_row.py RunSummary), read from its run folder: each recipe's row, the best recipe,
the change over the baseline, and the statistics (intervals, paired comparisons) added from the sample records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from contract.layout import RunFolder
from contract.run_row import NEW_RUN_RULE, UNRECORDED_RULE, IouRule, RecipeRow, RunSummary, Status
from orchestrator.errors import UserError
from orchestrator.results.stats import (
    DEFAULT_THRESHOLDS,
    metric_intervals,
    metrics,
    paired_comparison,
    relative_change,
    thresholds_of,
)
from orchestrator.results.store import DamagedRunFile, read_json, read_record, read_samples
from orchestrator.results.sweeps import checkpoint_sweeps

Samples = dict[str, list[dict[str, Any]]]


class ReportError(UserError):
    """The folder cannot be reported on (not a run folder)."""


def run_summary(rows: list[RecipeRow], baseline: str | None) -> RunSummary:
    """Side-by-side summary of a run's rows, with the best recipe: the finished one with the highest mean IoU,
    other than the baseline where another finished (add_statistics adds how each compares)."""
    finished = [r for r in rows if r.ok and r.mean_iou is not None]
    candidates = [r for r in finished if r.name != baseline] or finished
    best = max(candidates, key=lambda r: r.mean_iou or 0.0, default=None)
    return RunSummary(recipes=rows, baseline=baseline, best=best.name if best else None)


def read_summary(path: Path) -> RunSummary:
    """A run's summary.json; DamagedRunFile naming the first field that has not its shape."""
    return read_record(path, RunSummary)


def read_row(path: Path) -> RecipeRow:
    """A recipe's row from its own summary.json (which holds the worker's messages besides); DamagedRunFile
    naming the first field that has not its shape."""
    return read_record(path, RecipeRow)


def load_run(run_dir: Path) -> RunSummary:
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
    rule = _recorded_rule(record, run_record)
    rows = [recorded_row(run_dir, recipe, rule) for recipe in planned]
    baseline = next((r["name"] for r in planned if r.get("baseline")), None)
    return run_summary(rows, baseline)


def _recorded_rule(path: Path, run_record: dict[str, Any]) -> IouRule:
    """The rule run.json says the run's rates count by; one from before the rule was recorded counted IoU > t."""
    recorded = run_record.get("iou_rule", UNRECORDED_RULE)
    try:
        return IouRule(recorded)
    except ValueError:
        raise DamagedRunFile(path, f"iou_rule: {recorded!r} is not an IoU rule ({', '.join(IouRule)})") from None


def with_recorded_rows(run_dir: Path, recipes: list[dict[str, Any]], rows: list[RecipeRow]) -> list[RecipeRow]:
    """A row for every recipe run.json records, in its order: `rows` (just evaluated) where they have one, else
    the one the folder holds (a recipe a resume did not select keeps its row)."""
    fresh = {row.name: row for row in rows}
    return [fresh.get(recipe["name"]) or recorded_row(run_dir, recipe, NEW_RUN_RULE) for recipe in recipes]


def recorded_row(run_dir: Path, recipe: dict[str, Any], rule: IouRule) -> RecipeRow:
    """A recipe's row from its folder: its summary.json, or rebuilt from its samples where it has none (counted by
    `rule`)."""
    folder = RunFolder(run_dir).recipe(recipe["name"])
    if folder.summary.is_file():
        return read_row(folder.summary)
    return RecipeRow(name=recipe["name"], status=Status.INCOMPLETE, detail="no summary recorded (the run was stopped)",
                     metrics=metrics(read_samples(folder.samples), rule=rule), iou_rule=rule,
                     lineage=recipe.get("chain") or [], recipe=recipe)


def load_samples(run_dir: Path, summary: RunSummary) -> Samples:
    folder = RunFolder(run_dir)
    return {row.name: read_samples(folder.recipe(row.name).samples) for row in summary.recipes}


def add_statistics(summary: RunSummary, samples: Samples) -> RunSummary:
    """Adds to each row a 95% interval for each metric and, against the baseline, the change in mean IoU relative
    to the baseline's (where its mean carries one: stats.relative_change) and the paired IoU difference; and each
    sweep's checkpoints side by side (sweeps.py). Made again from the samples each time a summary is published, so
    a re-rendered report follows today's rules."""
    baseline = summary.baseline
    base_row = summary.row(baseline)
    base_iou = base_row.mean_iou if base_row is not None and base_row.ok else None
    base_samples = samples.get(baseline, []) if baseline is not None else []
    for row in summary.recipes:
        row.change_vs_baseline = None if row.name == baseline else relative_change(row.mean_iou, base_iou)
        own = samples.get(row.name, [])
        row.intervals = metric_intervals(own, thresholds_of(row.metrics or {}) or DEFAULT_THRESHOLDS,
                                         rule=row.iou_rule)
        paired = base_row is not None and base_row.ok and row.name != baseline
        row.vs_baseline_paired = paired_comparison(own, base_samples) if paired else None
        row.vs_recorded_base_paired = _versus_recorded_base(row, summary, samples)
    best = summary.row(summary.best)
    summary.best_change_vs_baseline = best.change_vs_baseline if best is not None else None
    summary.best_vs_others = _best_versus_others(summary, samples)
    summary.sweeps = checkpoint_sweeps(summary, samples)
    return summary


def _best_versus_others(summary: RunSummary, samples: Samples) -> list[dict[str, Any]]:
    """The best recipe paired with every other finished recipe (best - other, per sample): whether it is clearly
    ahead of each, or only ahead by noise. The baseline is left out (its row has its own comparison)."""
    best = summary.best
    if best is None:
        return []
    others = [r.name for r in summary.recipes if r.ok and r.name not in (best, summary.baseline)]
    compared = []
    for name in others:
        paired = paired_comparison(samples.get(best, []), samples.get(name, []))
        if paired is not None:
            compared.append({"against": name, **paired})
    return compared


def _versus_recorded_base(row: RecipeRow, summary: RunSummary, samples: Samples) -> dict[str, Any] | None:
    """A recipe that loads its adapter on another base than the recorded one, paired with the recipe that loads
    the same adapter on its recorded base: how much the wrong base costs (the seed's bug, measured)."""
    if not row.base_override or not row.ok:
        return None
    model = (row.recipe or {}).get("model")
    sibling = next((r.name for r in summary.recipes if r.ok and not r.base_override
                    and (r.recipe or {}).get("model") == model), None)
    if sibling is None:
        return None
    paired = paired_comparison(samples.get(row.name, []), samples.get(sibling, []))
    return {**paired, "against": sibling} if paired is not None else None  # None: no sample scored by both


def recipe_seconds(run_dir: Path, name: str) -> float | None:
    """The recipe's wall time, from its own summary.json (the run summary does not carry it)."""
    path = RunFolder(run_dir).recipe(name).summary
    try:
        return float(read_json(path).get("seconds")) if path.is_file() else None
    except (TypeError, ValueError):
        return None
