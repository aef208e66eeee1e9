"""Quality gates, and the exit code a run ends with. No CLI and no terminal here: cli.py parses the options,
reporting/terminal.py shows the failures.

    --fail-under mean_iou=0.80            every recipe's mean IoU must be at least 0.80
    --fail-under r4-joint:iou_ge_0.5=0.9  one recipe, one metric (repeatable); the rate at 0.5 may also be named
                                          iou_gt_0.5 (its name before the rule became IoU >= t), iou≥0.5
                                          or iou>0.5: each names the rate at 0.5 as the recipe's row counted it
    --compare runs/<previous> --max-drop mean_iou=0.02
                                          no recipe may lose more than 0.02 mean IoU against the previous run

Gates are checked on the recorded summary, so `report RUN_DIR` can apply them to a stored run without a rerun.
Exit code: 130 interrupted, else 1 if any recipe failed or was refused (a gate cannot judge a recipe with no
result, and the failure is the bigger news), else 3 if a gate failed, else 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.exits import Exit
from contract.run_row import NEW_RUN_RULE, RecipeRow, RunSummary, parse_threshold_key
from orchestrator.errors import UserError
from orchestrator.results.stats import fraction, metric_value, metrics
from orchestrator.results.summary import ReportError, load_run

_TOLERANCE = 1e-9  # 0.8 typed on the command line must pass a stored 0.8 computed as a sum / n


_ALIASES = {"iou": "mean_iou", "miou": "mean_iou", "det_rate": "detection_rate", "detection": "detection_rate"}


_RULE = re.compile(r"^(?:(?P<recipe>[^:=]+):)?(?P<metric>[^:=]+)=(?P<value>[^=]+)$")


class GateError(UserError):
    """A gate option that cannot be applied (bad syntax, unknown metric or recipe): a usage error."""


@dataclass(frozen=True)
class Rule:
    kind: str  # "fail-under" or "max-drop"
    recipe: str | None  # None: every recipe
    metric: str
    value: float
    text: str  # as the user typed it, for messages

    @property
    def option(self) -> str:
        return f"--{self.kind} {self.text}"


@dataclass
class GateRequest:
    fail_under: list[Rule] = field(default_factory=list)
    max_drop: list[Rule] = field(default_factory=list)
    previous: RunSummary | None = None  # the --compare run's summary
    previous_dir: Path | None = None

    @property
    def active(self) -> bool:
        return bool(self.fail_under or self.max_drop)


def parse_rules(specs: tuple[str, ...] | list[str], kind: str) -> list[Rule]:
    """`[recipe:]metric=value` each; metrics are mean_iou, detection_rate, iou_ge_<t> (or iou_gt_<t>, iou≥<t>,
    iou><t>: all the rate at t)."""
    rules = []
    for spec in specs:
        match = _RULE.match(spec.strip())
        if match is None:
            raise GateError(f"--{kind} {spec!r}: expected [RECIPE:]METRIC=VALUE, e.g. mean_iou=0.80")
        try:
            value = float(match["value"])
        except ValueError:
            raise GateError(f"--{kind} {spec!r}: {match['value']!r} is not a number") from None
        try:
            fraction(value, "the value")
        except ValueError as exc:
            raise GateError(f"--{kind} {spec!r}: {exc} (metrics and drops are fractions, e.g. mean_iou=0.80)") \
                from None
        rules.append(Rule(kind, (match["recipe"] or "").strip() or None, metric_name(match["metric"]), value,
                          spec.strip()))
    return rules


def metric_name(text: str) -> str:
    """The metric's canonical name: the rate at t is iou_ge_<t> however it is written (a row of a folder from
    before the rule was recorded holds it as iou_gt_<t>: metric_value finds it there)."""
    name = text.strip().lower()
    for prefix in ("iou≥", "iou>"):  # as the table's columns are titled, now and before
        if name.startswith(prefix):
            try:
                return NEW_RUN_RULE.key(float(name[len(prefix):]))
            except ValueError:
                return name
    parsed = parse_threshold_key(name)
    if parsed is not None:
        return NEW_RUN_RULE.key(parsed[0])
    return _ALIASES.get(name, name)


def gate_request(fail_under: tuple[str, ...], compare: Path | None, max_drop: tuple[str, ...]) -> GateRequest:
    """The gate options, checked before any work starts; raises GateError."""
    if max_drop and compare is None:
        raise GateError("--max-drop needs --compare PREVIOUS_RUN_DIR (the run to compare with)")
    if compare is not None and not max_drop:
        raise GateError("--compare needs at least one --max-drop METRIC=VALUE (how much may be lost)")
    request = GateRequest(parse_rules(fail_under, "fail-under"), parse_rules(max_drop, "max-drop"))
    if compare is not None:
        try:
            request.previous, request.previous_dir = load_run(compare), compare
        except (ReportError, OSError, ValueError) as exc:
            raise GateError(f"--compare {compare}: {exc}") from None
    return request


def check(summary: RunSummary, request: GateRequest) -> dict[str, Any] | None:
    """Every rule against every recipe it names; None when no gate was asked for. Raises GateError for a rule
    that names a recipe or a metric the run does not have."""
    if not request.active:
        return None
    rows = summary.recipes
    _validate(request.fail_under + request.max_drop, rows)
    previous = {r.name: r for r in (request.previous.recipes if request.previous else [])}
    failures, notes, checked = [], [], 0
    for rule in request.fail_under + request.max_drop:
        for row in rows:
            if rule.recipe not in (None, row.name):
                continue
            if not row.ok:
                notes.append(f"{row.name}: {rule.option} not checked ({row.status})")
                continue
            if rule.kind == "fail-under":
                failure = _fail_under(rule, row)
            elif (old := _previous_value(previous.get(row.name), rule.metric)) is None:
                notes.append(f"{row.name}: {rule.option} not checked (no {rule.metric} in the previous run)")
                continue
            else:
                failure = _max_drop(rule, row, old)
            checked += 1
            if failure:
                failures.append(failure)
    return {"checked": checked, "failures": failures, "notes": notes,
            "compared_with": str(request.previous_dir) if request.previous_dir else None}


def validate_for_run(request: GateRequest, names: list[str]) -> None:
    """Before a run starts: every rule names a recipe of the run and a metric a run computes (GateError)."""
    _check_names(request.fail_under + request.max_drop, names, sorted(metrics([])))


def _validate(rules: list[Rule], rows: list[RecipeRow]) -> None:
    known = {k for r in rows for k in (r.metrics or {})}
    _check_names(rules, [r.name for r in rows], sorted(known))


def _check_names(rules: list[Rule], names: list[str], metric_keys: list[str]) -> None:
    known = [k for k in metric_keys if k not in ("n", "errors")]
    for rule in rules:
        if rule.recipe is not None and rule.recipe not in names:
            raise GateError(f"{rule.option}: no recipe '{rule.recipe}' in this run (recipes: {', '.join(names)})")
        if metric_value(dict.fromkeys(known, 0), rule.metric) is None:
            raise GateError(f"{rule.option}: unknown metric '{rule.metric}' (metrics: {', '.join(known)})")


def _fail_under(rule: Rule, row: RecipeRow) -> dict[str, Any] | None:
    """The failure record, or None when the recipe passes."""
    value = metric_value(row.metrics or {}, rule.metric)
    if value is not None and value >= rule.value - _TOLERANCE:
        return None
    shown = "none" if value is None else f"{value:.4f}"
    return {"recipe": row.name, "metric": rule.metric, "value": value, "limit": rule.value, "previous": None,
            "rule": rule.option,
            "message": f"{row.name}: {rule.metric} {shown} is under {rule.value:g} ({rule.option})"}


def _previous_value(before: RecipeRow | None, metric: str) -> float | None:
    if before is None or not before.ok:
        return None
    return metric_value(before.metrics or {}, metric)


def _max_drop(rule: Rule, row: RecipeRow, old: float) -> dict[str, Any] | None:
    """The failure record, or None when the recipe lost no more than allowed."""
    value = metric_value(row.metrics or {}, rule.metric)
    if value is not None and old - value <= rule.value + _TOLERANCE:
        return None
    drop = f"dropped {old - value:.4f}" if value is not None else "has no value"
    return {"recipe": row.name, "metric": rule.metric, "value": value, "limit": old - rule.value,
            "previous": old, "rule": rule.option,
            "message": f"{row.name}: {rule.metric} {drop} (from {old:.4f}; at most {rule.value:g} allowed,"
                       f" {rule.option})"}


def exit_code(summary: RunSummary, gates: dict[str, Any] | None, interrupted: bool = False) -> int:
    if interrupted:
        return Exit.INTERRUPTED
    if any(not r.ok for r in summary.recipes):
        return Exit.RECIPE_FAILED
    if gates and gates["failures"]:
        return Exit.GATE_FAILED
    return Exit.OK
