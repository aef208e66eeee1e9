"""Metrics over a recipe's sample records.

Scored samples are those the model saw (status "ok"); a sample whose image could not be read is counted
apart as an error, not as a miss. A scored sample with no parsable box is "not detected" and has IoU 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DEFAULT_THRESHOLDS = (0.5, 0.7)


def metrics(samples: Sequence[dict[str, Any]], thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict:
    scored = [s for s in samples if s.get("status") == "ok"]
    errors = len(samples) - len(scored)
    n = len(scored)
    ious = [float(s["iou"]) for s in scored]
    out: dict[str, Any] = {
        "n": n,
        "errors": errors,
        "mean_iou": sum(ious) / n if n else None,
        "detection_rate": sum(1 for s in scored if s["detected"]) / n if n else None,
    }
    for t in thresholds:
        out[threshold_key(t)] = sum(1 for v in ious if v > t) / n if n else None
    return out


def threshold_key(threshold: float) -> str:
    """iou>0.5 -> 'iou_gt_0.5' (a stable name for JSON and CLI options)."""
    return f"iou_gt_{threshold:g}"


def relative_change(value: float | None, baseline: float | None) -> float | None:
    """The seed's "+780.0% over base": (value - baseline) / baseline."""
    if value is None or baseline is None or baseline == 0:
        return None
    return (value - baseline) / baseline
