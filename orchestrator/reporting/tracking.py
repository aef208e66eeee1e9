"""Each recipe of a run as an MLflow run (`run --mlflow URI`, `report --mlflow URI`), where teams already look.

In an experiment named after the recipe file (or --mlflow-experiment), each recipe's MLflow run gets
- params: the recipe's settings, each lineage link's path, kind and fingerprint (root first);
- metrics: mean IoU, detection rate, the IoU>t rates, their 95% interval bounds (`<metric>.low`, `.high`), the
  paired Δ IoU against the baseline (`vs_baseline.delta`, `.low`, `.high`, `.n`);
- tags: status, host, GPU, device, commit, the run folder;
- artifacts: the recipe's summary.json and the run's report.html and report.md.
Logging the same run folder again (`report --mlflow` after `run --mlflow`) updates the same MLflow runs.

MLflow is imported only here, only when asked for, so a plain run stays fast. Whatever goes wrong on the way to the
tracking server is a warning: summary.json, the reports and the exit code never depend on it.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from contract.layout import RunFolder
from contract.run_row import RecipeRow, RunSummary, Status
from orchestrator.errors import UserError
from orchestrator.results.store import DamagedRunFile, read_json

RUN_KEY_TAG = "evalorch.run_key"  # <run folder name>/<recipe>: finds the MLflow run of a recipe logged before
# An unreachable server must cost seconds, not MLflow's default minutes of retries (a user's own setting wins).
_FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
# MLflow 3 refuses its file store unless this is set; a user who types --mlflow file:... asked for one.
_FILE_STORE_OPT_IN = "MLFLOW_ALLOW_FILE_STORE"
_PARAM_CHARS = 500  # the smallest limit of a param's value among MLflow servers in use
# An MLflow run's end state by the recipe's status; anything else: FAILED
_MLFLOW_STATES = {Status.OK: "FINISHED", Status.INTERRUPTED: "KILLED", Status.SKIPPED: "KILLED"}


class TrackingError(UserError):
    """--mlflow cannot be used as asked (the client is not installed, an experiment without a URI)."""


@dataclass(frozen=True)
class MlflowTarget:
    uri: str
    experiment: str | None = None  # None: named after the recipe file


@dataclass
class Logged:
    """What reached MLflow: recipe -> MLflow run id, and the warning when something did not."""

    uri: str
    experiment: str = ""
    runs: dict[str, str] = field(default_factory=dict)
    warning: str | None = None


def mlflow_target(uri: str | None, experiment: str | None) -> MlflowTarget | None:
    """--mlflow and --mlflow-experiment, checked before any work starts."""
    if uri is None:
        if experiment is not None:
            raise TrackingError("--mlflow-experiment needs --mlflow URI (the tracking server or store)")
        return None
    if importlib.util.find_spec("mlflow") is None:
        raise TrackingError("--mlflow needs the MLflow client: pip install 'evalorch[mlflow]'")
    return MlflowTarget(uri, experiment)


def log_run(run_dir: Path, summary: RunSummary, target: MlflowTarget) -> Logged:
    """Every recipe of the run as an MLflow run; never raises (what failed is the returned warning)."""
    logged = Logged(target.uri)
    try:
        _log(run_dir, summary, target, logged)
    except Exception as exc:  # any failure of the tracking server or of its client is a warning, by design
        done = f" after {', '.join(logged.runs)}" if logged.runs else ""
        logged.warning = f"MLflow: logging to {target.uri} failed{done}: {type(exc).__name__}: {_first_line(exc)}"
    return logged


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:400] if text else ""


def _log(run_dir: Path, summary: RunSummary, target: MlflowTarget, logged: Logged) -> None:
    for name, value in _FAIL_FAST.items():
        os.environ.setdefault(name, value)
    if urlparse(target.uri).scheme in ("", "file"):
        os.environ.setdefault(_FILE_STORE_OPT_IN, "true")
    from mlflow import MlflowClient  # lazily: only a run that asked for MLflow pays for its import

    client = MlflowClient(tracking_uri=target.uri)
    record = _read_record(run_dir)
    logged.experiment = target.experiment or experiment_name(run_dir, record)
    found = client.get_experiment_by_name(logged.experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(logged.experiment)
    for row in summary.recipes:
        logged.runs[row.name] = _log_recipe(client, experiment_id, run_dir, summary, row, record)


def experiment_name(run_dir: Path, record: dict[str, Any]) -> str:
    """The recipe file's name without its suffix (recipes.toml -> recipes), as run.json records it."""
    recipe_file = record.get("recipe_file")
    return Path(recipe_file).stem if recipe_file else run_dir.resolve().parent.name or "evalorch"


def _read_record(run_dir: Path) -> dict[str, Any]:
    try:
        return read_json(RunFolder(run_dir).record)
    except (OSError, DamagedRunFile):
        return {}


def _log_recipe(client: Any, experiment_id: str, run_dir: Path, summary: RunSummary, row: RecipeRow,
                record: dict[str, Any]) -> str:
    from mlflow.entities import Metric, Param, RunTag

    key = f"{run_dir.name}/{row.name}"
    before = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{_quoted(key)}'",
                                max_results=1)
    run_id = before[0].info.run_id if before else client.create_run(experiment_id, run_name=row.name).info.run_id
    now = _millis()
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in recipe_metrics(row).items()],
                     params=[Param(k, v) for k, v in recipe_params(row).items()],
                     tags=[RunTag(k, v) for k, v in recipe_tags(run_dir, summary, row, record, key).items()])
    folder = RunFolder(run_dir)
    for path in (folder.recipe(row.name).summary, folder.report_html, folder.report_md):
        if path.is_file():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status=_MLFLOW_STATES.get(row.status, "FAILED"))
    return run_id


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _millis() -> int:
    return int(time.time() * 1000)


def recipe_params(row: RecipeRow) -> dict[str, str]:
    """The recipe's settings (`recipe.<field>`) and each lineage link (`lineage.<i>.path|kind|fingerprint`, the
    root first), as strings of at most the length every MLflow server takes."""
    params = {f"recipe.{k}": v for k, v in sorted((row.recipe or {}).items())}
    for index, link in enumerate(row.lineage):
        for part in ("path", "kind", "fingerprint"):
            params[f"lineage.{index}.{part}"] = link.get(part)
    return {k: _clip("" if v is None else str(v)) for k, v in params.items()}


def _clip(text: str) -> str:
    return text if len(text) <= _PARAM_CHARS else text[:_PARAM_CHARS - 1] + "…"


def recipe_metrics(row: RecipeRow) -> dict[str, float]:
    """Every metric with a value, its interval bounds, and the paired Δ against the baseline."""
    found: dict[str, float] = {k: float(v) for k, v in (row.metrics or {}).items() if v is not None}
    for key, bounds in (row.intervals or {}).items():
        if bounds:
            found[f"{key}.low"], found[f"{key}.high"] = float(bounds[0]), float(bounds[1])
    paired = row.vs_baseline_paired
    if paired:
        found |= {"vs_baseline.delta": float(paired["difference"]), "vs_baseline.low": float(paired["interval"][0]),
                  "vs_baseline.high": float(paired["interval"][1]), "vs_baseline.n": float(paired["n"])}
    return found


def recipe_tags(run_dir: Path, summary: RunSummary, row: RecipeRow, record: dict[str, Any],
                key: str) -> dict[str, str]:
    preflight = row.preflight or {}
    gpu = f"{preflight['gpu']}: {preflight.get('gpu_name')}" if preflight.get("gpu") is not None else "none"
    tags = {"status": row.status, "host": record.get("host"), "gpu": gpu, "device": record.get("device"),
            "baseline": str(row.name == summary.baseline).lower(), "evalorch.run_folder": str(run_dir),
            RUN_KEY_TAG: key, "commit": record.get("commit"), "mlflow.source.git.commit": record.get("commit")}
    return {k: str(v) for k, v in tags.items() if v is not None}
