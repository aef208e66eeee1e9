"""The end of a run (or of a re-render, or a rescore): statistics and gates added to the summary, then every
place the results go: summary.json, report.md, report.html, the terminal, $GITHUB_STEP_SUMMARY, JUnit XML,
MLflow and JSON on stdout. Returns the exit code. Also where `history` writes history.md and history.html."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console

from contract.layout import RunFolder, RunsFolder
from contract.run_row import RunSummary
from orchestrator.reporting.cells import problems
from orchestrator.reporting.gates import GateRequest, check, exit_code
from orchestrator.reporting.history import History
from orchestrator.reporting.history_text import render_history_markdown
from orchestrator.reporting.junit import junit_xml
from orchestrator.reporting.markdown import gates_markdown, markdown_table, render_markdown
from orchestrator.reporting.terminal import show_results
from orchestrator.reporting.tracking import Logged, MlflowTarget, log_run
from orchestrator.results.store import make_folder, write_bytes, write_json
from orchestrator.results.summary import Samples, add_statistics, load_samples


@dataclass
class Outputs:
    """Where the results of a run (or a re-rendered one) go besides report.md and report.html."""

    console: Console
    junit: Path | None = None
    json_out: bool = False
    write_summary: bool = True  # `run` and `rescore` write summary.json; `report` only re-renders
    mlflow: MlflowTarget | None = None


def publish(run_dir: Path, summary: RunSummary, request: GateRequest, outputs: Outputs,
            interrupted: bool = False) -> int:
    """Statistics, gates, summary.json, report.md/.html, the terminal table, CI outputs; returns the exit code.
    Raises GateError for a gate that names a metric or recipe the run does not have."""
    samples = load_samples(run_dir, summary)
    add_statistics(summary, samples)
    gates = check(summary, request)
    summary.gates = gates
    if outputs.write_summary:
        write_json(RunFolder(run_dir).summary, summary.to_json())
    html_path = write_reports(run_dir, summary, samples)
    code = exit_code(summary, gates, interrupted)
    show_results(summary, gates, outputs.console, html_path)
    _step_summary(summary, gates, run_dir)
    if outputs.junit is not None:
        make_folder(outputs.junit.parent)
        write_bytes(outputs.junit, junit_xml(summary, gates, run_dir).encode())
    logged = _track(run_dir, summary, outputs.mlflow, outputs) if outputs.mlflow is not None else None
    if outputs.json_out:
        document = {**summary.to_json(), "run_dir": str(run_dir), "report": str(html_path), "exit_code": code}
        if logged is not None:
            document["mlflow"] = asdict(logged)
        sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
        sys.stdout.flush()
    return code


def write_reports(run_dir: Path, summary: RunSummary, samples: Samples, out_dir: Path | None = None) -> Path:
    """report.md and report.html into `out_dir` (the run folder by default); returns the HTML's path."""
    from orchestrator.reporting.html import render_html  # matplotlib and Pillow load only when a report is written

    out = RunFolder(out_dir or run_dir)
    write_bytes(out.report_md, render_markdown(summary).encode())
    html_path = out.report_html
    write_bytes(html_path, render_html(summary, run_dir, samples).encode())
    return html_path


def write_history(history: History, out: Path) -> tuple[Path, Path]:
    """history.md and history.html into `out`; returns their paths."""
    from orchestrator.reporting.history_html import render_history_html  # matplotlib loads only when a page is drawn

    out.mkdir(parents=True, exist_ok=True)
    folder = RunsFolder(out)
    folder.history_md.write_text(render_history_markdown(history), encoding="utf-8")
    folder.history_html.write_text(render_history_html(history), encoding="utf-8")
    return folder.history_md, folder.history_html


def _step_summary(summary: RunSummary, gates: dict[str, Any] | None, run_dir: Path) -> None:
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


def _track(run_dir: Path, summary: RunSummary, target: MlflowTarget, outputs: Outputs) -> Logged:
    """Last, after every file is written: a tracking server that fails changes nothing of the run's results."""
    logged = log_run(run_dir, summary, target)
    if logged.warning:
        outputs.console.print(f"Warning: {logged.warning}", markup=False, highlight=False, style="yellow",
                              soft_wrap=True)
    else:
        outputs.console.print(f"MLflow: {len(logged.runs)} recipe(s) logged to {logged.uri}, experiment "
                              f"'{logged.experiment}'", markup=False, highlight=False)
    return logged
