"""Supervision under faults, with real worker subprocesses driven by the test-only EVALORCH_FAULT switch:
the right status for each fault, the samples before it kept, the next recipe still run, no process left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import ROOT, only_run_dir, run_cli, wait_for_samples, write_recipes

from orchestrator.results.store import read_samples


def _recipes(tmp_path: Path, demo: dict, names: list[str], extra: str = "", **defaults: object) -> Path:
    models = demo["root"] / "models"
    body = "".join(f'[[recipe]]\nname = "{n}"\nmodel = "{models}/base"\n{extra}' for n in names)
    return write_recipes(tmp_path, body, demo, **{"batch_size": 2, "limit": 6, **defaults})


def _summary(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / name / "summary.json").read_text())


def _ids(run_dir: Path, name: str) -> list[str]:
    return [s["id"] for s in read_samples(run_dir / name / "samples.jsonl")]


def _workers_of(run_dir: Path) -> list[psutil.Process]:
    """Live worker processes started for this run folder (their command line names its spec files)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "-m worker" in cmdline and str(run_dir) in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def test_each_fault_gets_its_status_and_keeps_what_was_received(demo: dict, tmp_path: Path) -> None:
    names = ["segv", "abort", "hang", "badline", "early-exit", "fine"]
    recipes = _recipes(tmp_path, demo, names, load_timeout=4)
    faults = "segv:segv@sample:3,abort:abort@sample:5,hang:hang@load,badline:bad-line@sample:2,early-exit:exit@sample:3"
    result = run_cli("run", str(recipes), "--out", str(tmp_path / "runs"), "--device", "cpu",
                     env={"EVALORCH_FAULT": faults})
    assert result.returncode == 1, result.stdout + result.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    expect = {
        "segv": ("crashed", "SIGSEGV", 2),
        "abort": ("crashed", "SIGABRT", 4),
        "hang": ("timeout", "load timeout (4s)", 0),
        "badline": ("protocol", "not JSON", 6),
        "early-exit": ("protocol", "stream ended without `done` (exited with code 0)", 2),
        "fine": ("ok", "", 6),
    }
    for name, (status, detail, kept) in expect.items():
        summary = _summary(run_dir, name)
        assert (summary["status"], len(_ids(run_dir, name))) == (status, kept), (name, summary["detail"])
        assert detail in summary["detail"], (name, summary["detail"])
        assert summary["exit"] and "log_tail" in summary
    assert not _workers_of(run_dir)
    # the timeout escalated: first a traceback of every thread into worker.log, then SIGKILL, each step recorded
    hang = _summary(run_dir, "hang")
    assert [(s["action"], s["signal"]) for s in hang["shutdown"]] == [("traceback", "SIGUSR1"), ("kill", "SIGKILL")]
    assert hang["shutdown"][0]["reason"] == "load timeout" and hang["shutdown"][1]["exited"] is True
    log = (run_dir / "hang" / "worker.log").read_text()
    assert "most recent call first" in log and "faults.py" in log and " in hit" in log, log[-2000:]
    assert _summary(run_dir, "fine")["shutdown"] == []


def test_retries_continue_with_the_missing_samples(demo: dict, tmp_path: Path) -> None:
    """A crash is retried (and the retry runs only what is missing); an internal error is not retried."""
    recipes = _recipes(tmp_path, demo, ["flaky", "broken"], "retries = 2\nretry_backoff = 0.1\n")
    result = run_cli("run", str(recipes), "--out", str(tmp_path / "runs"), "--device", "cpu",
                     env={"EVALORCH_FAULT": "flaky:segv@sample:3#1,broken:raise@load"})
    run_dir = only_run_dir(tmp_path / "runs")
    flaky = _summary(run_dir, "flaky")
    assert flaky["status"] == "ok", flaky["detail"]
    assert [a["status"] for a in flaky["attempts"]] == ["crashed", "ok"]
    assert [a["samples"] for a in flaky["attempts"]] == [2, 4]
    assert sorted(_ids(run_dir, "flaky")) == [f"s{i:03d}" for i in range(6)]
    assert flaky["metrics"]["n"] == 6
    broken = _summary(run_dir, "broken")
    assert broken["status"] == "error" and len(broken["attempts"]) == 1
    assert result.returncode == 1
    assert "attempt 2" in (run_dir / "flaky" / "worker.log").read_text()


def test_launcher_variables_are_stripped_from_the_worker_environment(demo: dict, tmp_path: Path) -> None:
    recipes = _recipes(tmp_path, demo, ["env"], limit=1)
    result = run_cli("run", str(recipes), "--out", str(tmp_path / "runs"), "--device", "cpu",
                     env={"SLURM_JOB_ID": "42", "RANK": "3", "WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.1"})
    assert result.returncode == 0, result.stdout + result.stderr
    env_set = _summary(only_run_dir(tmp_path / "runs"), "env")["env_set"]
    assert {"SLURM_JOB_ID", "RANK", "WORLD_SIZE", "MASTER_ADDR"} <= set(env_set["removed"])
    assert env_set["set"]["CUDA_VISIBLE_DEVICES"] == ""


def _start(recipes: Path, out: Path, fault: str) -> subprocess.Popen:
    env = {**os.environ, "EVALORCH_FAULT": fault}
    return subprocess.Popen([sys.executable, "-m", "orchestrator", "run", str(recipes), "--out", str(out),
                             "--device", "cpu"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signals, status", [([signal.SIGINT], "interrupted"), ([signal.SIGTERM], "interrupted"),
                                             ([signal.SIGINT, signal.SIGINT], "interrupted")])
def test_interrupts_stop_cleanly_and_keep_what_was_received(demo: dict, tmp_path: Path, signals: list,
                                                            status: str) -> None:
    recipes = _recipes(tmp_path, demo, ["first", "second"], batch_size=1, limit=12)
    proc = _start(recipes, tmp_path / "runs", "delay@each")
    run_dir = wait_for_samples(tmp_path / "runs", "first", 2)
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(0.2)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout + stderr
    assert not _workers_of(run_dir)
    first = _summary(run_dir, "first")
    assert first["status"] == status
    kept = _ids(run_dir, "first")
    assert 2 <= len(kept) < 12 and len(set(kept)) == len(kept)
    assert _summary(run_dir, "second")["status"] == "skipped"
    assert "Interrupted: continue with --resume" in stderr
    assert "Mean IoU" in stdout  # the report is printed for what finished


def test_a_killed_parent_takes_no_worker_with_it_and_resume_matches_a_clean_run(demo: dict, tmp_path: Path) -> None:
    recipes = _recipes(tmp_path, demo, ["first", "second"], batch_size=1, limit=8)
    proc = _start(recipes, tmp_path / "runs", "delay@each")
    run_dir = wait_for_samples(tmp_path / "runs", "second", 2)
    workers = _workers_of(run_dir)
    assert len(workers) == 1
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    _gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, "the worker outlived its parent"

    samples = run_dir / "second" / "samples.jsonl"
    kept = len(read_samples(samples))
    with open(samples, "ab") as f:
        f.write(b'{"id": "s007", "status": "ok", "iou": 0.9')  # a line cut by the crash
    resumed = run_cli("run", str(recipes), "--resume", str(run_dir), "--device", "cpu")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert 2 <= kept < 8 and sorted(_ids(run_dir, "second")) == [f"s{i:03d}" for i in range(8)]

    clean = run_cli("run", str(recipes), "--out", str(tmp_path / "clean"), "--device", "cpu")
    assert clean.returncode == 0
    clean_summary = json.loads((only_run_dir(tmp_path / "clean") / "summary.json").read_text())
    resumed_summary = json.loads((run_dir / "summary.json").read_text())
    for before, after in zip(clean_summary["recipes"], resumed_summary["recipes"], strict=True):
        assert before["metrics"] == after["metrics"]

    (recipes).write_text(recipes.read_text().replace("max_new_tokens = 8", "max_new_tokens = 9"))
    refused = run_cli("run", str(recipes), "--resume", str(run_dir), "--device", "cpu")
    assert refused.returncode == 2 and "field 'max_new_tokens': 8 -> 9" in refused.stderr
    forced = run_cli("run", str(recipes), "--resume", str(run_dir), "--device", "cpu", "--force")
    assert forced.returncode == 0, forced.stderr


def test_a_cuda_worker_grows_its_allocator_segments_in_place_unless_the_user_chose() -> None:
    from orchestrator.execution.environment import worker_env

    env, record = worker_env("cuda", gpu="1", base={"PATH": "/bin"})
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert record["set"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):  # the user's own, under either name, is kept
        env, _ = worker_env("cuda", base={"PATH": "/bin", name: "max_split_size_mb:128"})
        assert env[name] == "max_split_size_mb:128"
        assert "expandable_segments" not in env.get("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb")
    env, _ = worker_env("cpu", base={"PATH": "/bin"})
    assert "PYTORCH_CUDA_ALLOC_CONF" not in env


def test_the_worker_finds_the_project_uninstalled() -> None:
    """The worker's PYTHONPATH starts at the folder that holds `worker/`, wherever the parent's modules lie."""
    from orchestrator.execution.environment import worker_env

    env, _ = worker_env("cpu", base={"PATH": "/bin"})
    assert (Path(env["PYTHONPATH"].split(os.pathsep)[0]) / "worker" / "__main__.py").is_file()
