"""Several workers at once on the GPUs of one host (`run --gpus all`, `--max-workers-per-gpu`): the placement rule
on estimates alone, the preflight's per-GPU mode and its accounting of the workers placed on a GPU, and the real
CLI with real workers on fake GPUs (EVALORCH_FAKE_NVML, --device cpu): where each recipe went, how many ran at once
(watched live: never two on one GPU with one slot each; two where one GPU's memory takes two), one GPU's failure
not stopping the others, retries and resume per GPU, and an interrupt stopping every lane."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import ROOT, only_run_dir, run_cli, write_recipes
from rich.console import Console

from contract.nvml import FAKE_ENV, FakeNvml, write_fake_nvml
from contract.run_row import RecipeRow, Status
from orchestrator.execution.lanes import Lane
from orchestrator.execution.progress import LiveProgress, PlainProgress
from orchestrator.execution.scheduler import GpuSlots, Job, place, runs_concurrently, workers_per_gpu
from orchestrator.execution.supervisor import RecipeOutcome
from orchestrator.gpu.memory import read_workload
from orchestrator.gpu.preflight import GpuPreflight
from orchestrator.planning.plan import RecipePlan, make_plans
from orchestrator.planning.recipes import load_recipe_file
from orchestrator.reporting.markdown import render_markdown
from orchestrator.results.store import read_samples
from orchestrator.results.summary import run_summary

GIB = 2**30
TOTAL = 80 * GIB


def _gpu(index: int, free: int, processes: list[dict] | None = None) -> dict:
    return {"name": f"Fake H100 #{index}", "uuid": f"GPU-fake-{index}", "total_bytes": TOTAL, "free_bytes": free,
            "processes": processes or []}


# ----------------------------------------------------------------------------- the placement rule


def _lanes(free: dict[int, int], idle: list[int]) -> dict[int, GpuSlots]:
    """GPUs of one worker each: those not idle run one."""
    return {gpu: GpuSlots(value, value, placed=int(gpu not in idle)) for gpu, value in free.items()}


def test_largest_first_onto_the_idle_gpu_with_most_free_memory_that_fits() -> None:
    free = {0: 30, 1: 50, 2: 100, 3: 40}
    jobs = [Job("small-a", 10), Job("big", 90), Job("small-b", 10), Job("mid", 45), Job("small-c", 10)]
    placed = {job.name: gpu for job, gpu in place(jobs, _lanes(free, idle=[0, 1, 2, 3]))}
    # big fits only GPU 2; mid fits 1 (and 2, taken); the smalls, in file order, take what is left by free memory
    assert placed == {"big": 2, "mid": 1, "small-a": 3, "small-b": 0}


def test_a_job_waits_for_the_busy_gpu_it_fits_while_smaller_ones_take_the_idle_gpus() -> None:
    free = {0: 30, 1: 100, 2: 40}
    jobs = [Job("big", 90), Job("small", 10)]
    assert [(j.name, g) for j, g in place(jobs, _lanes(free, idle=[0, 2]))] == [("small", 2)]  # GPU 1 is busy
    # GPU 1 idle again: big is first in line for it, whatever else waits
    assert [(j.name, g) for j, g in place(jobs, _lanes(free, idle=[1]))] == [("big", 1)]


def test_a_job_that_fits_no_gpu_goes_to_the_one_with_most_free_memory_to_be_refused_there() -> None:
    free = {0: 30, 1: 60, 2: 60}
    assert [(j.name, g) for j, g in place([Job("huge", 500)], _lanes(free, idle=[0, 1, 2]))] == [("huge", 1)]
    assert place([Job("huge", 500)], _lanes(free, idle=[0, 2])) == []  # waits for GPU 1 (equal free: lower index)
    assert [g for _, g in place([Job("unknown", 0), Job("x", 0)], _lanes({0: 5, 1: 5}, idle=[0, 1]))] == [0, 1]


def test_several_workers_at_once_only_when_asked_for_and_more_than_one_gpu(tmp_path: Path) -> None:
    path = tmp_path / "nvml.json"
    write_fake_nvml(path, [_gpu(i, 70 * GIB) for i in range(4)])
    nvml = FakeNvml(path)
    assert runs_concurrently(GpuPreflight(nvml), "all")
    assert runs_concurrently(GpuPreflight(nvml, gpus=[0, 2]), "0,2")
    assert not runs_concurrently(GpuPreflight(nvml), None)  # no --gpus, one worker per GPU: one at a time
    assert not runs_concurrently(GpuPreflight(nvml, gpus=[3]), "3")
    assert not runs_concurrently(None, "all")
    assert runs_concurrently(GpuPreflight(nvml), None, per_gpu=2)  # several on the one GPU
    assert not runs_concurrently(None, None, per_gpu=2)  # no preflight (a CPU run): nothing to judge memory by


def test_max_workers_per_gpu_takes_a_count_or_auto_and_defaults_to_auto() -> None:
    """As many as fit is the default (packed runs answered as one at a time on an H200 once the default-dtype
    race was fixed: BENCHMARKS.md, 2026-12-02, later); a bad value is a usage error."""
    from click.testing import CliRunner

    from orchestrator.cli import WorkersPerGpu, main

    kind = WorkersPerGpu()
    assert kind.convert("auto", None, None) is None and kind.convert("3", None, None) == 3
    option = next(p for p in main.commands["run"].params if p.name == "max_workers_per_gpu")
    assert kind.convert(option.default, None, None) is None
    for bad in ("0", "65", "many"):
        result = CliRunner().invoke(main, ["run", "recipes.toml", "--max-workers-per-gpu", bad])
        assert result.exit_code == 2 and "neither a count from 1 to 64 nor 'auto'" in result.output


def test_workers_per_gpu_by_default_are_what_the_host_cores_feed() -> None:
    assert workers_per_gpu(None, "cuda", gpus=1, cpus=16) == 4  # 4 CPU threads per GPU worker
    assert workers_per_gpu(None, "cuda", gpus=8, cpus=128) == 4
    assert workers_per_gpu(None, "cuda", gpus=1, cpus=2) == 1
    assert workers_per_gpu(None, "cpu", gpus=1, cpus=64) == 1  # CPU workers take every core each
    assert workers_per_gpu(3, "cuda", gpus=1, cpus=2) == 3  # asked for


def test_a_busy_gpu_takes_one_more_only_where_its_room_fits_the_full_batch() -> None:
    jobs = [Job("a", 10, 40), Job("b", 10, 40), Job("c", 10, 40)]
    one_gpu = {0: GpuSlots(free=100, room=100, slots=3)}
    # a alone, b beside it (100 - 40 >= 40), c not (20 left): it waits
    assert [(j.name, g) for j, g in place(jobs, one_gpu)] == [("a", 0), ("b", 0)]
    assert [j.name for j, _ in place(jobs, {0: GpuSlots(100, 100, slots=1)})] == ["a"]  # one slot: one at a time
    busy = {0: GpuSlots(free=100, room=45, placed=1, slots=3)}
    assert [j.name for j, _ in place(jobs, busy)] == ["a"]
    assert place([Job("unknown", 0)], busy) == []  # no estimate: never beside others
    assert place(jobs, {0: GpuSlots(free=100, room=90, placed=3, slots=3)}) == []  # no slot left
    # an idle GPU is preferred to sharing one, even with less free memory
    two = {0: GpuSlots(free=100, room=90, placed=1, slots=3), 1: GpuSlots(free=50, room=50)}
    assert [(j.name, g) for j, g in place(jobs[:1], two)] == [("a", 1)]


# ----------------------------------------------------------------------------- the preflight per GPU


@pytest.fixture
def two_plans(demo: dict, tmp_path: Path) -> list[RecipePlan]:
    models = demo["root"] / "models"
    body = "".join(f'[[recipe]]\nname = "{n}"\nmodel = "{models}/base"\n' for n in ("a", "b"))
    recipe_file = load_recipe_file(write_recipes(tmp_path, body, demo))
    return make_plans(recipe_file, recipe_file.recipes)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_the_preflight_decides_and_waits_per_gpu(two_plans: list[RecipePlan], tmp_path: Path) -> None:
    a, b = two_plans
    path = tmp_path / "nvml.json"
    write_fake_nvml(path, [_gpu(0, 70 * GIB), _gpu(1, 10 * GIB)])
    clock = _Clock()
    preflight = GpuPreflight(FakeNvml(path), release_timeout=30, poll=1, clock=clock, sleep=clock.sleep)
    on_1 = preflight.before_launch(a, gpu=1)
    assert on_1.ok and on_1.gpu == "GPU-fake-1" and on_1.record["gpu"] == 1  # not GPU 0, which has more free
    write_fake_nvml(path, [_gpu(0, 70 * GIB), _gpu(1, 6 * GIB, [{"pid": 999_101, "used_bytes": 4 * GIB}])])
    preflight.after_exit(a, 999_101)  # a's worker exited, but NVML still lists it on GPU 1
    assert preflight.expected_free(1) == 10 * GIB  # what GPU 1 will have once a's memory is back
    on_0 = preflight.before_launch(b, gpu=0)
    assert on_0.ok and on_0.record["gpu"] == 0 and clock.now == 0  # GPU 0 does not wait for GPU 1
    again = preflight.before_launch(a, gpu=1)
    assert not again.ok and "not released" in again.message and clock.now >= 30


def test_room_is_free_memory_less_what_the_placed_workers_will_still_take(two_plans: list[RecipePlan],
                                                                         tmp_path: Path) -> None:
    a, b = two_plans
    path = tmp_path / "nvml.json"
    write_fake_nvml(path, [_gpu(0, 60 * GIB)])
    preflight = GpuPreflight(FakeNvml(path))
    preflight.admit(a, 0, 10 * GIB)
    preflight.admit(b, 0, 4 * GIB)
    assert preflight.room(0) == 46 * GIB  # neither has started: each takes its whole estimate
    preflight.worker_started("a", 999_201)
    preflight.worker_started("b", 999_202)
    # a uses 6 of its 10 GiB; b more than its estimate: it will take nothing more (never below zero)
    write_fake_nvml(path, [_gpu(0, 49 * GIB, [{"pid": 999_201, "used_bytes": 6 * GIB},
                                              {"pid": 999_202, "used_bytes": 5 * GIB}])])
    assert preflight.room(0) == 45 * GIB
    beside = preflight.before_launch(b, gpu=0)  # b's own verdict, beside a: on what a leaves
    assert beside.ok and beside.record["beside"] == ["a"] and beside.record["reserved_bytes"] == 4 * GIB
    assert beside.record["release_wait"] == {"waited_s": 0.0, "beside": ["a"]}
    assert "free beside a" in beside.message
    preflight.dismiss("a")
    preflight.dismiss("b")
    assert preflight.room(0) == 49 * GIB


# ----------------------------------------------------------------------------- the real CLI, four fake GPUs


def _recipes(tmp_path: Path, demo: dict, recipes: dict[str, str], **defaults: object) -> Path:
    models = demo["root"] / "models"
    body = "".join(f'[[recipe]]\nname = "{n}"\nmodel = "{models}/base"\n{extra}' for n, extra in recipes.items())
    return write_recipes(tmp_path, body, demo, **{"batch_size": 2, "limit": 4, **defaults})


def _summary(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / name / "summary.json").read_text())


def _workers(out: Path) -> dict[str, str]:
    """Live workers of runs under `out`: recipe name -> the CUDA_VISIBLE_DEVICES it was given."""
    found = {}
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if "worker" not in cmdline or not any(str(out) in part for part in cmdline):
            continue
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE:
                spec = Path(cmdline[cmdline.index("--spec") + 1])
                found[spec.parent.name] = proc.environ().get("CUDA_VISIBLE_DEVICES", "")
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, IndexError):
            continue  # exited while we looked
    return found


def _run_watched(args: list[str], out: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, list]:
    """The CLI in a subprocess, with every worker alive at each moment recorded (a snapshot every 50 ms)."""
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *args], cwd=ROOT, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    snapshots = []
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if found := _workers(out):
            snapshots.append(found)
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr), snapshots


def test_recipes_are_placed_by_fit_and_run_at_once_one_worker_per_gpu(demo: dict, tmp_path: Path) -> None:
    big = "memory_margin = 1.0\n"  # twice the tiny model's footprint: only GPU 2 can take it
    names = {"s1": "", "big1": big, "s2": "", "big2": big, "s3": ""}
    recipes = _recipes(tmp_path, demo, names)
    plans = {p.recipe.name: p for p in make_plans(load_recipe_file(recipes), load_recipe_file(recipes).recipes)}
    small_2 = read_workload(plans["s1"].recipe, plans["s1"].chain, "cpu").estimate(2).total_bytes
    big_1 = read_workload(plans["big1"].recipe, plans["big1"].chain, "cpu").estimate(1).total_bytes
    step = (big_1 - small_2) // 10
    assert step > 0
    fake = tmp_path / "nvml.json"
    write_fake_nvml(fake, [_gpu(0, small_2 + 2 * step), _gpu(1, small_2 + 6 * step), _gpu(2, 4 * big_1),
                           _gpu(3, small_2 + 4 * step)])
    out = tmp_path / "runs"
    result, snapshots = _run_watched(["run", str(recipes), "--out", str(out), "--device", "cpu", "--gpus", "all"],
                                     out, {FAKE_ENV: str(fake), "EVALORCH_FAULT": "delay@each"})
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = only_run_dir(out)

    expected = {"big1": 2, "big2": 2, "s1": 1, "s2": 3, "s3": 0}  # largest first, then by free memory
    for name, gpu in expected.items():
        summary = _summary(run_dir, name)
        assert summary["status"] == "ok", (name, summary["detail"])
        assert summary["preflight"]["gpu"] == gpu, name
        assert summary["env_set"]["set"]["CUDA_VISIBLE_DEVICES"] == f"GPU-fake-{gpu}", name
        assert summary["metrics"]["n"] == 4 and "batch_lowered" not in summary["preflight"]
    # rows in the recipe file's order, whatever order they finished in
    assert [row["name"] for row in json.loads((run_dir / "summary.json").read_text())["recipes"]] == list(names)

    for snapshot in snapshots:  # never two workers on one GPU at once, never more than the GPUs
        assert len(set(snapshot.values())) == len(snapshot) <= 4, snapshot
    assert max(len(s) for s in snapshots) == 4, snapshots  # they did run at once: big1 and the three small
    assert any({"big1", "s1"} <= set(s) for s in snapshots)
    assert not any({"big1", "big2"} <= set(s) for s in snapshots)  # big2 waited for GPU 2
    assert "[GPU 2] big1: ok" in result.stdout and "starting on GPU 1" in result.stdout


def test_one_gpus_failure_does_not_stop_the_others_and_retries_and_resume_hold_per_gpu(demo: dict,
                                                                                       tmp_path: Path) -> None:
    retry = "retries = 1\nretry_backoff = 0.1\n"
    names = {"crash": "", "flaky": retry, "fine1": "", "fine2": ""}
    recipes = _recipes(tmp_path, demo, names)
    fake = tmp_path / "nvml.json"
    write_fake_nvml(fake, [_gpu(i, (70 - i) * GIB) for i in range(4)])
    out = tmp_path / "runs"
    env = {FAKE_ENV: str(fake), "EVALORCH_FAULT": "crash:segv@sample:2,flaky:segv@sample:3#1"}
    result = run_cli("run", str(recipes), "--out", str(out), "--device", "cpu", "--gpus", "all", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    run_dir = only_run_dir(out)
    crash = _summary(run_dir, "crash")
    assert crash["status"] == "crashed" and "SIGSEGV" in crash["detail"]
    assert len(read_samples(run_dir / "crash" / "samples.jsonl")) == 1
    flaky = _summary(run_dir, "flaky")
    assert [a["status"] for a in flaky["attempts"]] == ["crashed", "ok"] and flaky["metrics"]["n"] == 4
    assert "attempt 2" in (run_dir / "flaky" / "worker.log").read_text()
    gpus = {name: _summary(run_dir, name)["preflight"]["gpu"] for name in names}
    assert sorted(gpus.values()) == [0, 1, 2, 3]  # all four at once, one per GPU
    assert flaky["env_set"]["set"]["CUDA_VISIBLE_DEVICES"] == f"GPU-fake-{gpus['flaky']}"  # retried on its GPU
    for name in ("fine1", "fine2"):
        assert _summary(run_dir, name)["status"] == "ok"

    kept_pid = _summary(run_dir, "fine1")["pid"]
    resumed = run_cli("run", str(recipes), "--resume", str(run_dir), "--device", "cpu", "--gpus", "all",
                      env={FAKE_ENV: str(fake)})
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    crash = _summary(run_dir, "crash")
    assert crash["status"] == "ok" and crash["samples_received"] == 3  # only the missing samples
    assert sorted(s["id"] for s in read_samples(run_dir / "crash" / "samples.jsonl")) == [f"s{i:03d}" for i in
                                                                                         range(4)]
    assert _summary(run_dir, "fine1")["pid"] == kept_pid  # kept, not run again


@pytest.mark.parametrize("where", ["a GPU each", "two on one GPU"])
def test_an_interrupt_stops_every_lane_and_skips_the_waiting_recipes(demo: dict, tmp_path: Path, where: str) -> None:
    """Two recipes at once, on a GPU each or both on one GPU whose memory takes two (the third's worker then
    started ahead, held): one Ctrl-C stops both and skips the third, and no worker is left."""
    recipes = _recipes(tmp_path, demo, {"first": "", "second": "", "third": ""}, batch_size=1, limit=12)
    fake = tmp_path / "nvml.json"
    if where == "a GPU each":
        write_fake_nvml(fake, [_gpu(i, 70 * GIB) for i in range(4)])
        options = ["--gpus", "0,1"]
    else:
        plan = make_plans(load_recipe_file(recipes), load_recipe_file(recipes).recipes)[0]
        write_fake_nvml(fake, [_gpu(0, read_workload(plan.recipe, plan.chain, "cpu").estimate(1).total_bytes * 5 // 2)])
        options = ["--max-workers-per-gpu", "3"]
    out = tmp_path / "runs"
    env = {**os.environ, FAKE_ENV: str(fake), "EVALORCH_FAULT": "delay@each"}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", str(recipes), "--out", str(out),
                             "--device", "cpu", *options], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        runs = list(out.glob("*/")) if out.exists() else []
        if runs and all(len(read_samples(runs[0] / n / "samples.jsonl")) >= 1 for n in ("first", "second")):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    run_dir = only_run_dir(out)
    for name in ("first", "second"):  # both lanes finished their batch and stopped
        summary = _summary(run_dir, name)
        assert summary["status"] == "interrupted" and 1 <= summary["metrics"]["n"] < 12, summary["detail"]
    assert _summary(run_dir, "third")["status"] == "skipped"
    assert not _workers(out)


def test_workers_that_fit_together_run_at_once_on_one_gpu_and_the_next_waits_for_room(demo: dict,
                                                                                          tmp_path: Path) -> None:
    """a, b and c on one fake GPU with room for two at their full batch: a and b run at once (a waits at its first
    sample until b has reached its own: their overlap is not timing luck), c waits, started ahead, until one of
    them has finished; the record says who ran beside whom."""
    recipes = _recipes(tmp_path, demo, {"a": "", "b": "", "c": ""})
    plans = make_plans(load_recipe_file(recipes), load_recipe_file(recipes).recipes)
    full = read_workload(plans[0].recipe, plans[0].chain, "cpu").estimate(2).total_bytes  # batch_size 2
    fake = tmp_path / "nvml.json"
    write_fake_nvml(fake, [_gpu(0, full * 5 // 2)])
    out = tmp_path / "runs"
    env = {FAKE_ENV: str(fake), "EVALORCH_FAULT": "a:gate@sample:1,b:open-gate@sample:1",
           "EVALORCH_FAULT_GATE": str(tmp_path / "gate")}
    result = run_cli("run", str(recipes), "--out", str(out), "--device", "cpu", "--max-workers-per-gpu", "3",
                     env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = only_run_dir(out)
    a, b, c = (_summary(run_dir, name) for name in "abc")
    for summary in (a, b, c):
        assert summary["status"] == "ok" and summary["metrics"]["n"] == 4, summary["detail"]
        assert summary["preflight"]["batch_size"] == 2 and summary["oom_retries"] == 0
    assert "b" in a["concurrent_with"] and "a" in b["concurrent_with"]
    assert b["preflight"]["beside"] == ["a"] and b["preflight"]["reserved_bytes"] == full
    (a_span,), (b_span,), (c_span,) = a["device_spans"], b["device_spans"], c["device_spans"]
    assert c_span[0] >= min(a_span[1], b_span[1])  # c started only once a or b had ended
    assert not {"a", "b"} <= set(c["concurrent_with"])
    assert "held" in c["done"]["timings"]  # started ahead while the GPU was full
    assert json.loads((run_dir / "run.json").read_text())["max_workers_per_gpu"] == 3
    rows = json.loads((run_dir / "summary.json").read_text())["recipes"]
    assert [row["name"] for row in rows] == ["a", "b", "c"] and rows[0]["concurrent_with"] == a["concurrent_with"]
    assert "its worker ran at the same time as those of b" in (run_dir / "report.md").read_text()


def test_the_report_shows_cuda_out_of_memory_retries() -> None:
    row = RecipeRow(name="r1", status=Status.OK, metrics={"mean_iou": 0.5}, preflight={"gpu": 0, "batch_size": 8},
                    oom_retries=2, final_batch_size=2)
    text = render_markdown(run_summary([row], None))
    assert "## Workers" in text
    assert "r1 (GPU 0): CUDA ran out of memory 2 time(s); each time the batch was halved and retried, from 8 to 2" \
        in text


def test_plain_progress_names_the_gpu_of_each_line(tmp_path: Path) -> None:
    text = io.StringIO()
    listener = PlainProgress(Console(file=text, width=200), ["a", "b"], tmp_path)
    outcome = RecipeOutcome("b", pid=7)
    listener("started", outcome, {"pid": 7, "lane": Lane.gpu(3)})
    listener("loaded", outcome, {"seconds": 0.4, "dtype": "float32", "attn": "sdpa", "device": "cpu",
                                 "lane": Lane.gpu(3)})
    outcome.status = Status.OK
    listener("finished", outcome, {"lane": Lane.gpu(3)})
    lines = text.getvalue().splitlines()
    assert lines[0] == "[2/2] b: worker pid 7 starting on GPU 3"
    assert lines[1] == "    [GPU 3] b: loaded in 0.4s (float32, sdpa, cpu)"
    assert lines[2] == "    [GPU 3] b: ok, 0 samples"


def test_the_live_display_keeps_one_line_per_gpu(tmp_path: Path) -> None:
    console = Console(file=io.StringIO(), width=200, force_terminal=True, color_system=None)
    with LiveProgress(console, ["a", "b", "c"], tmp_path) as listener:
        for name, gpu in (("a", 0), ("b", 1), ("c", 2)):
            listener("started", RecipeOutcome(name, pid=gpu + 10), {"pid": gpu + 10, "lane": Lane.gpu(gpu)})
        listener("loaded", RecipeOutcome("b", pid=11), {"seconds": 0.1, "dtype": "float32", "attn": "sdpa",
                                                        "device": "cpu", "lane": Lane.gpu(1)})
        done = RecipeOutcome("c", "ok", pid=12)
        listener("finished", done, {"lane": Lane.gpu(2)})
        Console(file=(frame := io.StringIO()), width=200, color_system=None).print(listener.render())
    shown = frame.getvalue()
    assert "GPU 0 · 1/3 a · starting" in shown and "GPU 1 · 2/3 b · inferring" in shown
    assert "GPU 2 · idle" in shown and "waiting" not in shown  # no line for the one-recipe bar
    assert "[3/3] [GPU 2] c: ok" in console.file.getvalue()


def test_the_live_display_keeps_a_line_per_worker_of_a_shared_gpu(tmp_path: Path) -> None:
    console = Console(file=io.StringIO(), width=200, force_terminal=True, color_system=None)
    with LiveProgress(console, ["a", "b", "c"], tmp_path) as listener:
        for name, pid in (("a", 10), ("b", 11)):
            listener("started", RecipeOutcome(name, pid=pid), {"pid": pid, "lane": Lane.gpu(0)})
        listener("finished", RecipeOutcome("a", "ok", pid=10), {"lane": Lane.gpu(0)})
        listener("started", RecipeOutcome("c", pid=12), {"pid": 12, "lane": Lane.gpu(0)})  # takes a's line
        Console(file=(frame := io.StringIO()), width=200, color_system=None).print(listener.render())
    shown = frame.getvalue()
    assert "GPU 0 · 2/3 b · starting" in shown and "GPU 0 · 3/3 c · starting" in shown
    assert shown.count("GPU 0 ·") == 2
