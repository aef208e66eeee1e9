"""Bootstrap intervals and the paired comparison, on data whose answer is known."""

from __future__ import annotations

import math
import random

import pytest

from contract.run_row import IouRule, RecipeRow, Status
from orchestrator.results.stats import (
    MIN_BASELINE_FOR_RELATIVE,
    bootstrap_interval,
    metric_intervals,
    metric_value,
    metrics,
    paired_comparison,
    relative_change,
    thresholds_of,
    verdict,
)


def _records(ious: list[float], prefix: str = "s") -> list[dict]:
    return [{"id": f"{prefix}{i:03d}", "status": "ok", "iou": v, "detected": v > 0} for i, v in enumerate(ious)]


def _with_mean(values: list[float], mean: float) -> list[float]:
    """Shift `values` so that their mean is exactly `mean`, staying inside [0, 1]."""
    shifted = [v + mean - sum(values) / len(values) for v in values]
    assert all(0.0 <= v <= 1.0 for v in shifted)
    return shifted


def _seed_r1_r2() -> tuple[list[float], list[float]]:
    """Per-sample IoUs like the seed's r1 and r2 on 50 samples: mostly good boxes, a few misses, and two recipes
    whose per-sample results differ by a few points either way (same images, so they are correlated)."""
    rng = random.Random(7)
    r1 = [min(0.97, max(0.45, rng.gauss(0.87, 0.07))) for _ in range(47)] + [0.21, 0.34, 0.52]
    r1 = _with_mean(r1, 0.8349)
    r2 = [min(0.99, max(0.0, v + rng.gauss(0.0, 0.05))) for v in r1]
    return r1, _with_mean(r2, 0.8330)


def test_the_seeds_r1_vs_r2_is_no_clear_difference() -> None:
    r1, r2 = _seed_r1_r2()
    assert sum(r1) / 50 == pytest.approx(0.8349) and sum(r2) / 50 == pytest.approx(0.8330)
    result = paired_comparison(_records(r2), _records(r1))  # r2 against r1 as the baseline
    assert result is not None
    assert result["n"] == 50
    assert result["difference"] == pytest.approx(0.8330 - 0.8349)
    low, high = result["interval"]
    assert low < result["difference"] < high
    assert low < 0 < high
    assert result["verdict"] == "no clear difference"


def test_a_large_known_difference_is_detected_both_ways() -> None:
    r1, _ = _seed_r1_r2()
    rng = random.Random(3)
    worse = [max(0.0, v - 0.10 + rng.gauss(0.0, 0.03)) for v in r1]
    result = paired_comparison(_records(worse), _records(r1))
    assert result["verdict"] == "worse"
    assert result["interval"][1] < 0
    assert result["interval"][0] < result["difference"] < result["interval"][1]
    assert result["difference"] == pytest.approx(-0.10, abs=0.02)
    reverse = paired_comparison(_records(r1), _records(worse))
    assert reverse["verdict"] == "better" and reverse["interval"][0] > 0


def test_all_equal_values_give_a_zero_width_interval() -> None:
    assert bootstrap_interval([0.625] * 40) == (pytest.approx(0.625), pytest.approx(0.625))
    low, high = bootstrap_interval([0.625] * 40)
    assert low == high
    same = _records([0.4, 0.9, 0.7, 0.1])
    result = paired_comparison(same, same)
    assert result["interval"] == [0.0, 0.0] and result["verdict"] == "no clear difference"


def test_a_rate_interval_matches_the_normal_approximation() -> None:
    values = [1.0] * 50 + [0.0] * 50  # p = 0.5, n = 100: 95% interval about 0.5 -+ 1.96 * 0.05
    low, high = bootstrap_interval(values)
    half_width = 1.96 * math.sqrt(0.25 / 100)
    assert low == pytest.approx(0.5 - half_width, abs=0.025)
    assert high == pytest.approx(0.5 + half_width, abs=0.025)


def test_intervals_are_seeded_and_reproducible() -> None:
    rng = random.Random(1)
    values = [rng.random() for _ in range(30)]
    assert bootstrap_interval(values) == bootstrap_interval(values)
    assert bootstrap_interval(values, seed=1) != bootstrap_interval(values, seed=2)
    assert bootstrap_interval([]) is None


def test_metric_intervals_cover_every_metric_and_only_scored_samples() -> None:
    error = {"id": "bad", "status": "error", "iou": 0.0, "detected": False}
    samples = [*_records([0.9, 0.8, 0.6, 0.0, 0.75, 0.95]), error]
    found = metric_intervals(samples, (0.5, 0.9))
    assert set(found) == {"mean_iou", "detection_rate", "iou_ge_0.5", "iou_ge_0.9"}
    m = metrics(samples, (0.5, 0.9))
    for key, (low, high) in found.items():
        assert low <= m[key] <= high, key
    assert found["iou_ge_0.9"][1] <= 1.0 and found["detection_rate"][0] >= 0.5
    assert metric_intervals([], (0.5,)) == {"mean_iou": None, "detection_rate": None, "iou_ge_0.5": None}


def test_the_paired_comparison_uses_only_samples_both_scored() -> None:
    baseline = [*_records([0.5, 0.5, 0.5, 0.5]), {"id": "only-base", "status": "ok", "iou": 0.0, "detected": False}]
    recipe = _records([0.7, 0.7, 0.7, 0.7])
    recipe[0] = {**recipe[0], "status": "error", "iou": 0.0}  # an unreadable image is no evidence either way
    recipe.append({"id": "only-recipe", "status": "ok", "iou": 1.0, "detected": True})
    result = paired_comparison(recipe, baseline)
    assert result["n"] == 3
    assert result["difference"] == pytest.approx(0.2)
    assert paired_comparison(recipe, []) is None


def test_verdict_needs_the_whole_interval_on_one_side() -> None:
    assert verdict([0.001, 0.2]) == "better"
    assert verdict([-0.3, -0.01]) == "worse"
    assert verdict([-0.01, 0.2]) == "no clear difference"
    assert verdict([0.0, 0.2]) == "no clear difference"


def test_thresholds_are_read_back_from_metric_keys() -> None:
    assert thresholds_of(metrics(_records([0.5]), (0.9, 0.5, 0.75))) == [0.5, 0.75, 0.9]


def test_the_rate_at_t_counts_iou_equal_to_t_as_every_peer_does() -> None:
    ious = [0.5, 0.5, 0.7, 0.4999, 0.0]
    assert metrics(_records(ious)) == {"n": 5, "errors": 0, "mean_iou": pytest.approx(sum(ious) / 5),
                                       "detection_rate": 0.8, "iou_ge_0.5": 0.6, "iou_ge_0.7": 0.2}
    old = metrics(_records(ious), rule=IouRule.ABOVE)  # folders from before the rule was recorded
    assert old["iou_gt_0.5"] == 0.2 and old["iou_gt_0.7"] == 0.0 and "iou_ge_0.5" not in old
    assert metric_intervals(_records(ious), (0.5,))["iou_ge_0.5"][1] >= 0.6


def test_the_rule_of_a_row_is_the_recorded_one_else_read_from_its_keys() -> None:
    def rule(row: dict) -> IouRule:
        return RecipeRow.model_validate({"name": "r", "status": "ok", **row}).iou_rule

    assert rule({"iou_rule": ">=", "metrics": {}}) == IouRule.AT_LEAST
    assert rule({"iou_rule": ">", "metrics": {"iou_ge_0.5": 0.1}}) == IouRule.ABOVE  # recorded: it wins
    assert rule({"metrics": {"iou_gt_0.5": 0.1}}) == IouRule.ABOVE  # a summary from before the rule was recorded
    assert rule({"metrics": {"iou_ge_0.5": 0.1}}) == IouRule.AT_LEAST
    assert rule({"metrics": None}) == IouRule.ABOVE  # no rate at all: as before the rule was recorded
    assert RecipeRow(name="r", status=Status.OK, metrics={"iou_ge_0.5": 0.1}).iou_rule == IouRule.AT_LEAST
    assert metric_value({"iou_gt_0.5": 0.25}, "iou_ge_0.5") == 0.25  # either name finds the rate at 0.5
    assert metric_value({"iou_ge_0.5": 0.5}, "iou_gt_0.5") == 0.5 and metric_value({}, "iou_ge_0.5") is None


def test_a_relative_change_is_given_only_over_a_baseline_that_carries_one() -> None:
    assert relative_change(0.8636, 0.0981) == pytest.approx(7.803, abs=1e-3)  # README's "+780.3% over base"
    assert relative_change(0.2, MIN_BASELINE_FOR_RELATIVE) == pytest.approx(3.0)
    assert relative_change(0.86, 0.004) is None  # "+21400%": noise, not a figure
    assert relative_change(0.86, 0.0) is None and relative_change(None, 0.5) is None
