"""Metrics over a recipe's sample records, and how sure we can be of them.

Scored samples are those the model saw (status "ok"); a sample whose image could not be read is counted
apart as an error, not as a miss. A scored sample with no parsable box is "not detected" and has IoU 0.

The rate at t counts by the row's IoU rule (contract/run_row.py IouRule: IoU >= t for new runs, IoU > t in run
folders written before the rule was recorded); a rescore keeps a folder's own rule unless told otherwise. Gates
accept either key name for the rate at t: the row's own rule decides what it counted.

Intervals are percentile bootstrap intervals with a fixed seed, so re-rendering a report gives the same numbers.
A comparison with the baseline is paired (per-sample IoU differences on the samples both recipes scored): the
same hard samples are hard for both recipes, so pairing removes most of the noise an unpaired comparison has.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from contract.run_row import NEW_RUN_RULE, IouRule, Metrics, parse_threshold_key
from contract.samples import id_text

DEFAULT_THRESHOLDS = (0.5, 0.7)


def fraction(value: float, what: str) -> float:
    """`value`, where it is a fraction from 0 to 1 as every metric, IoU threshold and allowed drop is; ValueError
    naming `what` otherwise (nan and infinities included: a gate or rate built on one would pass or fail
    meaninglessly)."""
    if not math.isfinite(value) or not 0 <= value <= 1:
        raise ValueError(f"{what} must lie between 0 and 1, not {value:g}")
    return value


RESAMPLES = 2000
SEED = 0
CONFIDENCE = 0.95
_CELLS_PER_CHUNK = 4_000_000  # resampled values held at once (32 MB of floats), whatever the sample count
FIRST_ERRORS = 3  # errored samples quoted in a failing recipe's detail
VERDICT_BETTER, VERDICT_WORSE, VERDICT_UNCLEAR = "better", "worse", "no clear difference"


def metrics(samples: Sequence[dict[str, Any]], thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
            rule: IouRule = NEW_RUN_RULE) -> Metrics:
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
        out[rule.key(t)] = sum(1 for v in ious if rule.counts(v, t)) / n if n else None
    return out


def sample_error_verdict(samples: Sequence[dict[str, Any]], max_errors: int | float) -> dict[str, Any]:
    """Whether a recipe's errored samples (an unreadable image, a bad dataset line) let it pass: at most
    `max_errors` of them (a count, or a fraction of its samples: the recipe's max_sample_errors), and at least one
    sample scored, whatever the limit. `problem` says why it fails (None: it passes); `first` holds the first
    errors' ids and messages, for the table and the report. Computed once, when the recipe ends, and recorded in
    its row (`sample_errors`), so the table, the reports, JUnit and the exit code read the same verdict."""
    errored = [s for s in samples if s.get("status") != "ok"]
    total, count = len(samples), len(errored)
    allowed = math.floor(max_errors * total + 1e-9) if isinstance(max_errors, float) else int(max_errors)
    problem = None
    if total == count:
        problem = f"no sample was scored ({count} errored)" if count else "no sample was scored (none was read)"
    elif count > allowed:
        problem = f"{count} of {total} samples errored; max_sample_errors = {max_errors} allows {allowed}"
    first = [{"id": s.get("id"), "error": str(s.get("error"))[:300]} for s in errored[:FIRST_ERRORS]]
    return {"errors": count, "samples": total, "allowed": allowed, "max_sample_errors": max_errors,
            "passed": problem is None, "problem": problem, "first": first}


def thresholds_of(metric_values: dict[str, Any]) -> list[float]:
    """The IoU thresholds a metrics dict was computed with, read back from its keys (either rule), ascending."""
    return sorted({found[0] for k in metric_values if (found := parse_threshold_key(k)) is not None})


def metric_value(metric_values: dict[str, Any], name: str) -> Any:
    """A metric by name; the rate at t by either key name (iou_ge_t or the older iou_gt_t), as the row counted it."""
    if name in metric_values:
        return metric_values[name]
    found = parse_threshold_key(name)
    if found is None:
        return None
    return next((metric_values[rule.key(found[0])] for rule in IouRule if rule.key(found[0]) in metric_values),
                None)


# The smallest baseline mean IoU a change relative to it is given for ("+780.3% over base"). Below it the baseline
# barely overlaps its targets: the ratio grows without bound as the baseline nears 0 (0.004 -> 0.86 reads
# "+21367.9%") and tells noise, not size. The paired Δ IoU, absolute and with its interval, is given always.
MIN_BASELINE_FOR_RELATIVE = 0.05


def relative_change(value: float | None, baseline: float | None) -> float | None:
    """(value - baseline) / baseline, where the baseline's mean IoU is at least MIN_BASELINE_FOR_RELATIVE; else
    None (no relative figure is shown)."""
    if value is None or baseline is None or baseline < MIN_BASELINE_FOR_RELATIVE:
        return None
    return (value - baseline) / baseline


def bootstrap_intervals(columns: Sequence[Sequence[float]], *, resamples: int = RESAMPLES, seed: int = SEED,
                        confidence: float = CONFIDENCE) -> list[tuple[float, float]] | None:
    """Percentile bootstrap interval of the mean of each column (all of one length n, the samples); None
    when n is 0. The columns share their resamples: one draw of sample indices serves every metric.

    A rate is the mean of 0/1 values, so the same function serves mean IoU and every rate."""
    import numpy as np  # lazily: plain runs that never render a report stay fast to start

    data = np.asarray(columns, dtype=float).reshape(len(columns), -1)
    n = data.shape[1]
    if n == 0:
        return None
    rng = np.random.default_rng(seed)
    chunk = max(1, _CELLS_PER_CHUNK // data.size)
    means = []
    for start in range(0, resamples, chunk):
        picks = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        means.append(data[:, picks].mean(axis=2))  # columns x resamples
    tail = (1 - confidence) / 2 * 100
    lows, highs = np.percentile(np.concatenate(means, axis=1), [tail, 100 - tail], axis=1)
    return [(float(low), float(high)) for low, high in zip(lows, highs, strict=True)]


def bootstrap_interval(values: Sequence[float], *, seed: int = SEED) -> tuple[float, float] | None:
    """The 95% percentile bootstrap interval of the mean of `values`; None for no values."""
    found = bootstrap_intervals([values], seed=seed)
    return found[0] if found else None


def metric_intervals(samples: Sequence[dict[str, Any]], thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                     *, seed: int = SEED, rule: IouRule = NEW_RUN_RULE) -> dict[str, list[float] | None]:
    """A 95% interval for mean IoU, the detection rate and each rate at t (by `rule`), over the scored samples."""
    scored = [s for s in samples if s.get("status") == "ok"]
    ious = [float(s["iou"]) for s in scored]
    columns: dict[str, list[float]] = {
        "mean_iou": ious,
        "detection_rate": [1.0 if s["detected"] else 0.0 for s in scored],
    }
    for t in thresholds:
        columns[rule.key(t)] = [1.0 if rule.counts(v, t) else 0.0 for v in ious]
    found = bootstrap_intervals(list(columns.values()), seed=seed)
    if found is None:
        return dict.fromkeys(columns)
    return {key: list(interval) for key, interval in zip(columns, found, strict=True)}


def paired_comparison(samples: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]],
                      *, seed: int = SEED) -> dict[str, Any] | None:
    """Mean per-sample IoU difference (recipe - baseline) on the samples both scored, matched by id, with a
    paired bootstrap interval and a verdict; None when they share no scored sample."""
    return paired_difference(sample_values(samples), sample_values(baseline), seed=seed)


def sample_values(samples: Sequence[dict[str, Any]], metric: str = "mean_iou",
                  rule: str = NEW_RUN_RULE) -> dict[str, float]:
    """Each scored sample's part of `metric` (the metric is their mean), by id (as text: a run recorded before ids
    kept their type pairs with one after): its IoU for mean_iou, 1/0 for detection_rate and for the rate at t,
    iou_ge_<t> or iou_gt_<t> (IoU `rule` t, as the run scored it). ValueError for another name."""
    scored = [s for s in samples if s.get("status") == "ok"]
    if metric == "mean_iou":
        return {id_text(s["id"]): float(s["iou"]) for s in scored}
    if metric == "detection_rate":
        return {id_text(s["id"]): 1.0 if s["detected"] else 0.0 for s in scored}
    parsed = parse_threshold_key(metric)  # the rate at t, under either key name: counted by `rule`
    if parsed is not None and rule in tuple(IouRule):
        counted = IouRule(rule)
        return {id_text(s["id"]): 1.0 if counted.counts(float(s["iou"]), parsed[0]) else 0.0 for s in scored}
    raise ValueError(f"unknown metric {metric!r} (or threshold rule {rule!r})")



def paired_difference(values: dict[str, float], before: dict[str, float], *, seed: int = SEED) -> dict[str, Any] | None:
    """Mean of (value - before) over the ids both have, with a paired bootstrap interval and a verdict; None when
    they share no id."""
    diffs = [value - before[key] for key, value in values.items() if key in before]
    interval = bootstrap_interval(diffs, seed=seed)
    if interval is None:
        return None
    return {"n": len(diffs), "difference": sum(diffs) / len(diffs), "interval": list(interval),
            "verdict": verdict(interval)}


def verdict(interval: Sequence[float]) -> str:
    """"better"/"worse" only when the whole interval lies on one side of zero."""
    low, high = interval
    if low > 0:
        return VERDICT_BETTER
    if high < 0:
        return VERDICT_WORSE
    return VERDICT_UNCLEAR
