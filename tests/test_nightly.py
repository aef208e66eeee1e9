"""Nightly use on folders made by real CPU runs of the committed, trained demo family: a first night logged to
MLflow through a local file store, a second after the adapter was retrained (its fingerprint and its scores move)
logged to a tracking server that cannot be reached (a loopback port nobody listens on: only a warning), a third
killed mid-run, and a folder that is no run. `history` reads them all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import ROOT, run_cli

from orchestrator.reporting.history import FINISHED, NEW_SETUP, NOT_A_RUN, UNFINISHED, read_history
from orchestrator.reporting.tracking import experiment_name
from orchestrator.results.store import read_samples

FAMILY = ROOT / "examples" / "demo-family"
UNREACHABLE = "http://127.0.0.1:9"  # the discard port on loopback: nothing answers, nothing leaves the machine
RECIPES = f"""[defaults]
dataset = "{FAMILY}/data/heldout.jsonl"
prompt = "{{prompt}} Answer with its bounding box."
max_new_tokens = 32
batch_size = 8
limit = 8
[lineage]
remap = {{ "/ssd1/team/vlm_outputs" = "{FAMILY}" }}
[[recipe]]
name = "base"
model = "{FAMILY}/base"
baseline = true
[[recipe]]
name = "tuned"
model = "{{adapter}}"
"""


def _retrain(adapter: Path, factor: float) -> None:
    """The adapter's LoRA update scaled, as a retrained adapter would differ: new bytes, other answers."""
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    tensors = {k: v * factor if "lora_B" in k else v for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})


def _new_run(runs: Path, known: set[Path]) -> Path:
    (found,) = set(runs.iterdir()) - known
    return found


def _killed(recipes: Path, runs: Path, known: set[Path]) -> Path:
    """A run whose parent was killed (an out-of-memory kill, a lost machine) after its first samples were written:
    its folder holds run.json and samples, and no summary.json."""
    command = [sys.executable, "-m", "orchestrator", "run", str(recipes), "--out", str(runs), "--device", "cpu",
               "--no-prestart"]  # one worker at a time: the first is killed with the parent
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "EVALORCH_FAULT": "delay@each"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        started = set(runs.iterdir()) - known
        if started and read_samples(next(iter(started)) / "base" / "samples.jsonl"):
            break
        time.sleep(0.2)
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    proc.wait(timeout=30)
    psutil.wait_procs(workers, timeout=30)  # each worker exits when its lifeline (the parent's pipe) closes
    return _new_run(runs, known)


@pytest.fixture(scope="module")
def nightly(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("nightly")
    adapter = folder / "adapter"
    adapter.mkdir()
    for part in (FAMILY / "r1-llm-only").iterdir():
        (adapter / part.name).write_bytes(part.read_bytes())
    recipes = folder / "recipes.toml"
    recipes.write_text(RECIPES.replace("{adapter}", str(adapter)))
    runs, store = folder / "runs", folder / "mlruns"
    runs.mkdir()
    done, folders = [], []
    for options in (["--mlflow", f"file:{store}", "--mlflow-experiment", "nightly"], ["--mlflow", UNREACHABLE]):
        if done:
            _retrain(adapter, 0.5)
        known = set(runs.iterdir())
        done.append(run_cli("run", str(recipes), "--out", str(runs), "--device", "cpu", *options))
        folders.append(_new_run(runs, known))
    stopped = _killed(recipes, runs, set(runs.iterdir()))
    (runs / "notes").mkdir()
    (runs / "notes" / "README.md").write_text("what changed this week")
    return {"folder": folder, "runs": runs, "store": store, "adapter": adapter, "results": done,
            "folders": folders, "stopped": stopped}


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_an_unreachable_tracking_server_is_a_warning_and_changes_no_result(nightly: dict) -> None:
    logged, unreachable = nightly["results"]
    for result in nightly["results"]:
        assert result.returncode == 0, result.stdout + result.stderr
    assert "MLflow: 2 recipe(s) logged to file:" in logged.stdout
    assert f"Warning: MLflow: logging to {UNREACHABLE} failed" in unreachable.stdout
    run_dir = nightly["folders"][1]
    summary = _summary(run_dir)  # written, whole, before MLflow was asked
    assert [(r["name"], r["status"], r["metrics"]["n"]) for r in summary["recipes"]] == [("base", "ok", 8),
                                                                                      ("tuned", "ok", 8)]
    assert "mlflow" not in json.dumps(summary).lower()
    assert (run_dir / "report.html").is_file() and (run_dir / "report.md").is_file()


def test_run_json_records_the_commit_of_the_checkout(nightly: dict) -> None:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    expected = head.stdout.strip() if head.returncode == 0 else None  # the recipe file's folder is no checkout
    for run_dir in nightly["folders"]:
        assert json.loads((run_dir / "run.json").read_text())["commit"] == expected


def test_history_of_real_runs_marks_the_retrained_adapter_and_skips_the_rest(nightly: dict) -> None:
    runs, (first, second) = nightly["runs"], nightly["folders"]
    result = run_cli("history", str(runs), "--out", str(nightly["folder"] / "site"))
    assert result.returncode == 0, result.stdout + result.stderr
    site = nightly["folder"] / "site"
    assert (site / "history.html").is_file()
    assert "did not finish" in result.stdout and "not a run" in result.stdout
    assert "no summary.json (stopped before its end)" in (site / "history.md").read_text()

    history = read_history(runs)
    assert [(r.name, r.state) for r in history.runs] == [
        (first.name, FINISHED), (second.name, FINISHED), (nightly["stopped"].name, UNFINISHED), ("notes", NOT_A_RUN)]
    assert history.runs[0].command.startswith("python -m orchestrator run ")
    base, tuned = history.trends
    same = base.points[1].change  # the same weights score the same every night
    assert same.mark == "" and same.paired["difference"] == 0 and same.setup == ()
    retrained = tuned.points[1].change
    assert retrained.mark == NEW_SETUP and retrained.paired["verdict"] == "worse"  # a jump, not a regression
    assert len(retrained.setup) == 1 and retrained.setup[0].startswith(f"weights changed: adapter {nightly['adapter']}")
    assert f"⚑ tuned, {second.name}: -" in result.stdout


def _client(store: Path, monkeypatch: pytest.MonkeyPatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=f"file:{store}")


def test_each_recipe_is_an_mlflow_run_searchable_by_its_metrics(nightly: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client(nightly["store"], monkeypatch)
    experiment = client.get_experiment_by_name("nightly")
    found = client.search_runs([experiment.experiment_id], "metrics.mean_iou > 0.5 and tags.status = 'ok'")
    assert [r.info.run_name for r in found] == ["tuned"]
    run_dir = nightly["folders"][0]
    row = next(r for r in _summary(run_dir)["recipes"] if r["name"] == "tuned")
    data = found[0].data
    for key in ("mean_iou", "detection_rate", "iou_ge_0.5", "iou_ge_0.7"):
        assert data.metrics[key] == pytest.approx(row["metrics"][key])
        assert [data.metrics[f"{key}.low"], data.metrics[f"{key}.high"]] == pytest.approx(row["intervals"][key])
    assert data.metrics["vs_baseline.delta"] == pytest.approx(row["vs_baseline_paired"]["difference"])
    assert data.metrics["vs_baseline.low"] == pytest.approx(row["vs_baseline_paired"]["interval"][0])
    assert data.params["recipe.model"] == str(nightly["adapter"])
    fingerprints = [link["fingerprint"] for link in row["lineage"]]
    assert [data.params[f"lineage.{i}.fingerprint"] for i in range(2)] == fingerprints
    record = json.loads((run_dir / "run.json").read_text())
    assert data.tags["host"] == record["host"] and data.tags["gpu"] == "none" and data.tags["status"] == "ok"
    artifacts = {a.path for a in client.list_artifacts(found[0].info.run_id)}
    assert {"summary.json", "report.html"} <= artifacts
    assert found[0].info.status == "FINISHED"


def test_report_logs_a_stored_run_again_without_torch_and_without_duplicates(nightly: dict,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`report --mlflow` of the first run again, into its experiment: the same MLflow runs, updated; and the
    interpreter that logged has not imported torch."""
    store, first = nightly["store"], nightly["folders"][0]
    args = ["report", str(first), "--mlflow", f"file:{store}", "--mlflow-experiment", "nightly"]
    code = ("import json, sys\nfrom orchestrator.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
            "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "MLflow: 2 recipe(s) logged" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"
    client = _client(store, monkeypatch)
    runs = client.search_runs([client.get_experiment_by_name("nightly").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["base", "tuned"]
    assert {r.data.tags["evalorch.run_key"] for r in runs} == {f"{first.name}/base", f"{first.name}/tuned"}


def test_the_experiment_is_named_after_the_recipe_file(nightly: dict) -> None:
    run_dir = nightly["folders"][1]
    record = json.loads((run_dir / "run.json").read_text())
    assert experiment_name(run_dir, record) == "recipes"  # recipes.toml
    assert experiment_name(run_dir, {}) == "runs"  # an older run.json without it: the folder that holds the runs


def test_mlflow_options_are_checked_before_any_work(nightly: dict) -> None:
    result = run_cli("report", str(nightly["folders"][0]), "--mlflow-experiment", "x")
    assert result.returncode == 2 and "--mlflow-experiment needs --mlflow URI" in result.stderr
