"""Each training run whose checkpoints a run evaluated (recipes named `<recipe>@<step>`, planning/sweep.py), side by
side: mean IoU against the training step with its interval, the trainer's own eval loss at each step, the best
checkpoint, and whether it is clearly ahead of the last one (paired, best - last, as the run's other comparisons).

Rows are grouped by name alone, so a run folder whose rows lack their checkpoint record (rebuilt from its samples
after an interrupt) still shows its sweep; the record adds the trainer's eval losses and the final model's step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from contract.recipe import FINAL, split_checkpoint_name
from contract.run_row import RecipeRow, RunSummary, Status, Sweep, SweepPoint
from orchestrator.results.stats import paired_comparison


def checkpoint_sweeps(summary: RunSummary, samples: Mapping[str, Sequence[dict[str, Any]]]) -> list[Sweep]:
    """Every sweep of which the run evaluated two checkpoints or more, in the order its first row comes."""
    groups: dict[str, list[RecipeRow]] = {}
    for row in summary.recipes:
        found = split_checkpoint_name(row.name)
        if found is not None:
            groups.setdefault(found[0], []).append(row)
    return [_sweep(name, rows, samples) for name, rows in groups.items() if len(rows) > 1]


def _sweep(name: str, rows: list[RecipeRow], samples: Mapping[str, Sequence[dict[str, Any]]]) -> Sweep:
    rows = sorted(rows, key=_training_order)
    losses: dict[int, float] = {}
    for row in rows:  # each checkpoint's trainer_state.json holds the losses up to it: the later one wins
        losses |= row.checkpoint.eval_losses if row.checkpoint is not None else {}
    points = [_point(row, losses) for row in rows]
    finished = [p for p in points if p.status is Status.OK and p.mean_iou is not None]
    # the latest among equals: an earlier checkpoint is best only where it scores more than the later ones
    best = max(reversed(finished), key=lambda p: p.mean_iou or 0.0, default=None)
    last = finished[-1] if finished else None
    paired = None
    if best is not None and last is not None and best is not last:
        paired = paired_comparison(samples.get(best.recipe, []), samples.get(last.recipe, []))
    return Sweep(name=name, points=points, eval_losses=dict(sorted(losses.items())),
                 best=best.recipe if best else None, last=last.recipe if last else None, best_vs_last=paired)


def _point(row: RecipeRow, losses: dict[int, float]) -> SweepPoint:
    step = _step(row)
    return SweepPoint(recipe=row.name, label=_label(row), step=step, status=row.status, mean_iou=row.mean_iou,
                      interval=(row.intervals or {}).get("mean_iou"),
                      eval_loss=losses.get(step) if step is not None else None)


def _label(row: RecipeRow) -> str:
    found = split_checkpoint_name(row.name)
    assert found is not None  # only swept rows are grouped
    return found[1]


def _step(row: RecipeRow) -> int | None:
    """The training step: the recorded one (the final model's from its trainer_state.json), else the name's."""
    if row.checkpoint is not None:
        return row.checkpoint.step
    label = _label(row)
    return int(label) if label.isdigit() else None


def _training_order(row: RecipeRow) -> tuple[bool, int]:
    """Checkpoints by step, the final model last."""
    return _label(row) == FINAL, _step(row) or 0
