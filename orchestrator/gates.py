"""Quality gates and the outputs CI acts on: exit code, JUnit XML, the GitHub step summary, JSON on stdout.

    --fail-under mean_iou=0.80            every recipe's mean IoU must be at least 0.80
    --fail-under r4-joint:iou_gt_0.5=0.9  one recipe, one metric (repeatable)
    --compare runs/<previous> --max-drop mean_iou=0.02
                                          no recipe may lose more than 0.02 mean IoU against the previous run

Gates are checked on the recorded summary, so `report RUN_DIR` can apply them to a stored run without a rerun.
Exit code: 130 interrupted, else 1 if any recipe failed or was refused (a gate cannot judge a recipe with no
result, and the failure is the bigger news), else 3 if a gate failed, else 0.
"""

from __future__ import annotations

import os
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.table import Table

from .report import (
    ReportError,
    add_statistics,
    gates_markdown,
    load_run,
    load_samples,
    markdown_table,
    problems,
    recipe_seconds,
    render_terminal,
    write_reports,
)
from .results import write_json
from .stats import metrics, threshold_key

EXIT_OK, EXIT_RECIPE_FAILED, EXIT_GATE_FAILED, EXIT_INTERRUPTED = 0, 1, 3, 130
_TOLERANCE = 1e-9  # 0.8 typed on the command line must pass a stored 0.8 computed as a sum / n
_ALIASES = {"iou": "mean_iou", "miou": "mean_iou", "det_rate": "detection_rate", "detection": "detection_rate"}
_RULE = re.compile(r"^(?:(?P<recipe>[^:=]+):)?(?P<metric>[^:=]+)=(?P<value>[^=]+)$")


class GateError(Exception):
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
    previous: dict[str, Any] | None = None  # the --compare run's summary
    previous_dir: Path | None = None

    @property
    def active(self) -> bool:
        return bool(self.fail_under or self.max_drop)


def parse_rules(specs: tuple[str, ...] | list[str], kind: str) -> list[Rule]:
    """`[recipe:]metric=value` each; metrics are mean_iou, detection_rate, iou_gt_<t> (or iou><t>)."""
    rules = []
    for spec in specs:
        match = _RULE.match(spec.strip())
        if match is None:
            raise GateError(f"--{kind} {spec!r}: expected [RECIPE:]METRIC=VALUE, e.g. mean_iou=0.80")
        try:
            value = float(match["value"])
        except ValueError:
            raise GateError(f"--{kind} {spec!r}: {match['value']!r} is not a number") from None
        rules.append(Rule(kind, (match["recipe"] or "").strip() or None, _metric_name(match["metric"]), value,
                          spec.strip()))
    return rules


def _metric_name(text: str) -> str:
    name = text.strip().lower()
    if name.startswith("iou>"):  # iou>0.5, as the table's column is titled
        try:
            return threshold_key(float(name[4:]))
        except ValueError:
            return name
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


# --------------------------------------------------------------------------------------------------- checks

def check(summary: dict[str, Any], request: GateRequest) -> dict[str, Any] | None:
    """Every rule against every recipe it names; None when no gate was asked for. Raises GateError for a rule
    that names a recipe or a metric the run does not have."""
    if not request.active:
        return None
    rows = summary["recipes"]
    _validate(request.fail_under + request.max_drop, rows)
    previous = {r["name"]: r for r in (request.previous or {}).get("recipes", [])}
    failures, notes, checked = [], [], 0
    for rule in request.fail_under + request.max_drop:
        for row in rows:
            if rule.recipe not in (None, row["name"]):
                continue
            if row["status"] != "ok":
                notes.append(f"{row['name']}: {rule.option} not checked ({row['status']})")
                continue
            if rule.kind == "fail-under":
                failure = _fail_under(rule, row)
            elif (old := _previous_value(previous.get(row["name"]), rule.metric)) is None:
                notes.append(f"{row['name']}: {rule.option} not checked (no {rule.metric} in the previous run)")
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


def _validate(rules: list[Rule], rows: list[dict[str, Any]]) -> None:
    known = {k for r in rows for k in (r.get("metrics") or {})}
    _check_names(rules, [r["name"] for r in rows], sorted(known))


def _check_names(rules: list[Rule], names: list[str], metric_keys: list[str]) -> None:
    known = [k for k in metric_keys if k not in ("n", "errors")]
    for rule in rules:
        if rule.recipe is not None and rule.recipe not in names:
            raise GateError(f"{rule.option}: no recipe '{rule.recipe}' in this run (recipes: {', '.join(names)})")
        if rule.metric not in known:
            raise GateError(f"{rule.option}: unknown metric '{rule.metric}' (metrics: {', '.join(known)})")


def _fail_under(rule: Rule, row: dict[str, Any]) -> dict[str, Any] | None:
    """The failure record, or None when the recipe passes."""
    value = row["metrics"].get(rule.metric)
    if value is not None and value >= rule.value - _TOLERANCE:
        return None
    shown = "none" if value is None else f"{value:.4f}"
    return {"recipe": row["name"], "metric": rule.metric, "value": value, "limit": rule.value, "previous": None,
            "rule": rule.option,
            "message": f"{row['name']}: {rule.metric} {shown} is under {rule.value:g} ({rule.option})"}


def _previous_value(before: dict[str, Any] | None, metric: str) -> float | None:
    if not before or before.get("status") != "ok":
        return None
    return (before.get("metrics") or {}).get(metric)


def _max_drop(rule: Rule, row: dict[str, Any], old: float) -> dict[str, Any] | None:
    """The failure record, or None when the recipe lost no more than allowed."""
    value = row["metrics"].get(rule.metric)
    if value is not None and old - value <= rule.value + _TOLERANCE:
        return None
    drop = f"dropped {old - value:.4f}" if value is not None else "has no value"
    return {"recipe": row["name"], "metric": rule.metric, "value": value, "limit": old - rule.value,
            "previous": old, "rule": rule.option,
            "message": f"{row['name']}: {rule.metric} {drop} (from {old:.4f}; at most {rule.value:g} allowed,"
                       f" {rule.option})"}


def exit_code(summary: dict[str, Any], gates: dict[str, Any] | None, interrupted: bool = False) -> int:
    if interrupted:
        return EXIT_INTERRUPTED
    if any(r["status"] != "ok" for r in summary["recipes"]):
        return EXIT_RECIPE_FAILED
    if gates and gates["failures"]:
        return EXIT_GATE_FAILED
    return EXIT_OK


def failures_table(gates: dict[str, Any]) -> Table:
    compared = any(f["previous"] is not None for f in gates["failures"])
    titles = ["Recipe", "Metric", "Value", *(["Previous"] if compared else []), "Limit", "Rule"]
    table = Table(title="Quality gates failed", title_style="bold red")
    for title in titles:
        table.add_column(title, justify="right" if title in ("Value", "Previous", "Limit") else "left")
    for f in gates["failures"]:
        previous = [_num(f["previous"])] if compared else []
        table.add_row(f["recipe"], f["metric"], _num(f["value"]), *previous, _num(f["limit"]), f["rule"])
    return table


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


# -------------------------------------------------------------------------------------------------- JUnit

_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml_text(text: str) -> str:
    """XML 1.0 cannot hold most control characters, and a garbled model output has them."""
    return _XML_ILLEGAL.sub("?", text)


def junit_xml(summary: dict[str, Any], gates: dict[str, Any] | None, run_dir: Path) -> str:
    """One test case per recipe; a failed or refused recipe, or one a gate failed, has a <failure>."""
    by_recipe: dict[str, list[dict[str, Any]]] = {}
    for failure in (gates or {}).get("failures", []):
        by_recipe.setdefault(failure["recipe"], []).append(failure)
    suite = ET.Element("testsuite", name="evalorch", tests=str(len(summary["recipes"])))
    failed = 0
    for row in summary["recipes"]:
        seconds = recipe_seconds(run_dir, row["name"])
        case = ET.SubElement(suite, "testcase", classname=f"evalorch.{run_dir.name}", name=row["name"],
                             time=f"{seconds or 0.0:.3f}")
        message, kind = _case_failure(row, by_recipe.get(row["name"], []))
        if message:
            failed += 1
            element = ET.SubElement(case, "failure", message=_xml_text(message.splitlines()[0][:500]), type=kind)
            element.text = _xml_text(message)
        out = ET.SubElement(case, "system-out")
        out.text = _xml_text(orjson.dumps(row.get("metrics") or {}).decode())
    suite.set("failures", str(failed))
    root = ET.Element("testsuites", name="evalorch", tests=suite.get("tests", "0"), failures=str(failed))
    root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _case_failure(row: dict[str, Any], gate_failures: list[dict[str, Any]]) -> tuple[str, str]:
    if row["status"] != "ok":
        return f"{row['name']}: {row['status']}: {row.get('detail') or ''}".rstrip(": "), row["status"]
    if gate_failures:
        return "\n".join(f["message"] for f in gate_failures), "gate"
    return "", ""


# ------------------------------------------------------------------------------------------ one finishing

@dataclass
class Outputs:
    """Where the results of a run (or a re-rendered one) go besides report.md and report.html."""

    console: Console
    junit: Path | None = None
    json_out: bool = False
    write_summary: bool = True  # `run` and `rescore` write summary.json; `report` only re-renders


def publish(run_dir: Path, summary: dict[str, Any], request: GateRequest, outputs: Outputs,
            interrupted: bool = False) -> int:
    """Statistics, gates, summary.json, report.md/.html, the terminal table, CI outputs; returns the exit code.
    Raises GateError for a gate that names a metric or recipe the run does not have."""
    samples = load_samples(run_dir, summary)
    add_statistics(summary, samples)
    gates = check(summary, request)
    summary["gates"] = gates
    if outputs.write_summary:
        write_json(run_dir / "summary.json", summary)
    html_path = write_reports(run_dir, summary, samples)
    code = exit_code(summary, gates, interrupted)
    _human(summary, gates, outputs.console, html_path)
    _step_summary(summary, gates, run_dir)
    if outputs.junit is not None:
        outputs.junit.parent.mkdir(parents=True, exist_ok=True)
        outputs.junit.write_text(junit_xml(summary, gates, run_dir), encoding="utf-8")
    if outputs.json_out:
        document = {**summary, "run_dir": str(run_dir), "report": str(html_path), "exit_code": code}
        sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
        sys.stdout.flush()
    return code


def _human(summary: dict[str, Any], gates: dict[str, Any] | None, console: Console, html_path: Path) -> None:
    render_terminal(summary, console)
    if gates and gates["failures"]:
        console.print(failures_table(gates))
        for failure in gates["failures"]:
            console.print(f"Gate failed: {failure['message']}", markup=False, style="red")
    elif gates:
        console.print(f"Quality gates: all {gates['checked']} check(s) passed", markup=False)
    for note in (gates or {}).get("notes", []):
        console.print(f"Gate note: {note}", markup=False)
    console.print(f"Report: {html_path.parent / 'report.md'} and {html_path}", markup=False)


def _step_summary(summary: dict[str, Any], gates: dict[str, Any] | None, run_dir: Path) -> None:
    """GitHub Actions shows what a job appends to $GITHUB_STEP_SUMMARY on the run's page."""
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return
    parts = [f"## evalorch: {run_dir.name}", "", markdown_table(summary)]
    if gates and gates["failures"]:
        parts += ["### Quality gates failed", "", gates_markdown(gates), ""]
    parts += [f"- {p}" for p in problems(summary)]
    with open(target, "a", encoding="utf-8") as f:
        f.write("\n".join(parts) + "\n\n")


def ci_options(command: Callable) -> Callable:
    """--fail-under, --compare, --max-drop, --junit, --json: shared by run, report and rescore."""
    options = [
        click.option("--fail-under", "fail_under", multiple=True, metavar="[RECIPE:]METRIC=VALUE",
                     help="Quality gate (repeatable): exit 3 when a recipe's metric is under VALUE, e.g."
                     " mean_iou=0.80 or r4-joint:iou_gt_0.5=0.9. Metrics: mean_iou, detection_rate, iou_gt_<t>"
                     " (rates as fractions). A failed or refused recipe still exits 1: that wins over a gate."),
        click.option("--compare", type=click.Path(path_type=Path, file_okay=False, exists=True),
                     metavar="PREVIOUS_RUN_DIR", help="Run folder to compare with (needs --max-drop)."),
        click.option("--max-drop", "max_drop", multiple=True, metavar="[RECIPE:]METRIC=VALUE",
                     help="Quality gate (repeatable): exit 3 when a recipe's metric fell by more than VALUE"
                     " (in the metric's units: 0.02 is 2 points of a rate) against --compare, e.g. mean_iou=0.02."),
        click.option("--junit", type=click.Path(path_type=Path, dir_okay=False),
                     help="Write JUnit XML here: one test case per recipe (failed, refused, gated)."),
        click.option("--json", "json_out", is_flag=True,
                     help="Print the summary as JSON on stdout (everything else goes to stderr)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command
