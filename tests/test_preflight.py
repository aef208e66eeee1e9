"""The GPU preflight's decisions, driven by the file-based fake NVML (a CPU machine has no NVML): fits, refuse
naming the holder, lower the batch, wait for the last worker's memory, give up waiting; and the same through
the real CLI (with real workers where one is meant to start)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import only_run_dir, run_cli, write_recipes

from contract.nvml import FAKE_ENV, FakeNvml, GpuState, write_fake_nvml
from contract.recipe import AUTO_BATCH_CAP
from contract.units import format_bytes
from orchestrator.gpu.memory import read_workload
from orchestrator.gpu.preflight import GpuPreflight, PreflightError, largest_batch, parse_gpus
from orchestrator.planning.plan import RecipePlan, make_plans
from orchestrator.planning.recipes import load_recipe_file

GIB = 2**30
TOTAL = 80 * GIB


def _gpu(free: int, processes: list[dict] | None = None, index: int = 0) -> dict:
    return {"name": f"Fake H100 #{index}", "uuid": f"GPU-fake-{index}", "total_bytes": TOTAL, "free_bytes": free,
            "processes": processes or []}


@pytest.fixture
def plan(demo: dict, tmp_path: Path) -> RecipePlan:
    """The two-stage recipe (stage-1 checkpoint + LoRA): weights, adapter, KV and activations all count."""
    body = f'[[recipe]]\nname = "r3"\nmodel = "{demo["root"] / "models" / "r3-stage2"}"\n'
    recipe_file = load_recipe_file(write_recipes(tmp_path, body, demo, batch_size=4))
    (plan,) = make_plans(recipe_file, recipe_file.recipes)
    assert plan.runnable, plan.problem
    return plan


@pytest.fixture
def holder():
    """A real process to stand for a foreign program holding GPU memory: its name comes from psutil."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc
    proc.kill()
    proc.wait()


def _fake(tmp_path: Path, gpus: list[dict]) -> FakeNvml:
    path = tmp_path / "nvml.json"
    write_fake_nvml(path, gpus)
    return FakeNvml(path)


def _workload(plan: RecipePlan, device: str = "cuda"):
    return read_workload(plan.recipe, plan.chain, device)


def test_a_recipe_that_fits_runs_on_the_gpu_with_most_free_memory(plan: RecipePlan, tmp_path: Path) -> None:
    nvml = _fake(tmp_path, [_gpu(10 * GIB, index=0), _gpu(70 * GIB, index=1), _gpu(40 * GIB, index=2)])
    decision = GpuPreflight(nvml).before_launch(plan)
    assert decision.ok and decision.batch_size is None
    assert decision.gpu == "GPU-fake-1"  # the UUID: CUDA and NVML may number GPUs differently
    assert decision.record["gpu"] == 1 and decision.record["batch_size"] == 4
    estimate = decision.record["estimate"]
    assert estimate["total_bytes"] == _workload(plan).estimate(4).total_bytes
    assert estimate["adapter_bytes"] > 0 and estimate["kv_cache_bytes"] > 0

    only_first = GpuPreflight(nvml, gpus=[0, 2]).before_launch(plan)  # --gpus 0,2: GPU 1 is not allowed
    assert only_first.ok and only_first.gpu == "GPU-fake-2"


def test_weights_that_do_not_fit_are_refused_naming_who_holds_the_memory(plan: RecipePlan, tmp_path: Path,
                                                                         holder: subprocess.Popen) -> None:
    workload = _workload(plan)
    fixed = workload.estimate(1).fixed_bytes
    free = fixed  # the weights alone, without the margin: not enough
    nvml = _fake(tmp_path, [_gpu(free, [{"pid": holder.pid, "used_bytes": TOTAL - free - GIB}])])
    decision = GpuPreflight(nvml).before_launch(plan)
    assert not decision.ok
    assert "weights do not fit" in decision.message
    assert f"pid {holder.pid} (sleep)" in decision.message  # named by psutil, as the real NVML's holders are
    assert f"only {format_bytes(free)} of 80.00 GiB is free" in decision.message
    assert decision.record["holders"] == [{"pid": holder.pid, "name": "sleep", "used_bytes": TOTAL - free - GIB}]


def test_when_the_weights_fit_but_the_batch_does_not_the_batch_is_lowered(plan: RecipePlan, tmp_path: Path) -> None:
    workload = _workload(plan)
    free = workload.estimate(2).total_bytes + 1  # batch 2 fits, 3 does not
    assert workload.estimate(3).total_bytes > free
    decision = GpuPreflight(_fake(tmp_path, [_gpu(free)])).before_launch(plan)
    assert decision.ok and decision.batch_size == 2
    assert decision.record["batch_lowered"] and decision.record["requested_batch_size"] == 4
    assert decision.record["estimate_used"]["batch_size"] == 2
    assert "lowered from 4 to 2" in decision.message


def test_a_lowered_batch_is_told_as_the_batches_that_run(demo: dict, tmp_path: Path) -> None:
    """10 samples do not fit at batch 10; at 9 they run as 5 + 5 (contract/batching.py), so the message names
    the batches of 5 the worker forms, not a batch of 9 that never runs."""
    body = f'[[recipe]]\nname = "r3"\nmodel = "{demo["root"] / "models" / "r3-stage2"}"\n'
    recipe_file = load_recipe_file(write_recipes(tmp_path, body, demo, batch_size=10, limit=10))
    (plan,) = make_plans(recipe_file, recipe_file.recipes)
    workload = _workload(plan)
    free = workload.estimate(9).total_bytes
    assert workload.prompts.samples == 10 and workload.estimate(10).total_bytes > free
    decision = GpuPreflight(_fake(tmp_path, [_gpu(free)])).before_launch(plan)
    assert decision.ok and decision.batch_size == 9 and decision.record["estimate_used"]["batch_size"] == 5
    assert (f"batch size lowered from 10 to 9 to fit {format_bytes(free)} free, so its 10 samples run as "
            "2 batches of 5 (a batch of 10 needs") in decision.message
    assert "one of 5 needs" in decision.message and "batch 9" not in decision.message


def test_weights_that_fit_without_room_for_one_sample_are_refused(plan: RecipePlan, tmp_path: Path) -> None:
    workload = _workload(plan)
    fixed = workload.estimate(1).fixed_bytes
    free = fixed + int(fixed * workload.margin) + 1
    assert largest_batch(workload, 4, free) is None
    decision = GpuPreflight(_fake(tmp_path, [_gpu(free)])).before_launch(plan)
    assert not decision.ok and "not even a batch of 1" in decision.message


def test_the_next_launch_waits_until_the_last_worker_has_released_its_memory(plan: RecipePlan,
                                                                          tmp_path: Path) -> None:
    path = tmp_path / "nvml.json"
    write_fake_nvml(path, [_gpu(70 * GIB)])
    preflight = GpuPreflight(FakeNvml(path), release_timeout=60, poll=0.02)
    assert preflight.before_launch(plan).ok
    worker_pid = 999_001
    write_fake_nvml(path, [_gpu(60 * GIB, [{"pid": worker_pid, "used_bytes": 10 * GIB, "name": "python"}])])
    preflight.after_exit(plan, worker_pid)
    # The driver takes a moment to release an exited process's memory: first the pid goes, then the memory.
    steps = [(0.2, [_gpu(62 * GIB)]), (0.2, [_gpu(70 * GIB)])]

    def release() -> None:
        for delay, gpus in steps:
            time.sleep(delay)
            write_fake_nvml(path, gpus)

    thread = threading.Thread(target=release)
    thread.start()
    decision = preflight.before_launch(plan)
    thread.join()
    wait = decision.record["release_wait"]
    assert decision.ok and wait["previous_pid"] == worker_pid and not wait.get("timed_out")
    assert wait["free_bytes"] == 70 * GIB  # it did not go on at 62 GiB free
    assert decision.record["free_bytes"] == 70 * GIB


class _Clock:
    """Time that passes only when the preflight sleeps: the timeout is reached at once, deterministically."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_worker_that_never_leaves_the_gpu_stops_the_next_launch(plan: RecipePlan, tmp_path: Path) -> None:
    path = tmp_path / "nvml.json"
    write_fake_nvml(path, [_gpu(70 * GIB)])
    clock = _Clock()
    preflight = GpuPreflight(FakeNvml(path), release_timeout=120, poll=1, clock=clock, sleep=clock.sleep)
    assert preflight.before_launch(plan).ok
    write_fake_nvml(path, [_gpu(60 * GIB, [{"pid": 999_002, "used_bytes": 10 * GIB, "name": "python"}])])
    preflight.after_exit(plan, 999_002)
    decision = preflight.before_launch(plan)
    assert not decision.ok
    assert "worker pid 999002 of recipe 'r3'" in decision.message and "not released" in decision.message
    assert decision.record["release_wait"]["timed_out"] and clock.now >= 120


def test_memory_taken_by_another_program_meanwhile_is_not_waited_for(plan: RecipePlan, tmp_path: Path,
                                                                      holder: subprocess.Popen) -> None:
    path = tmp_path / "nvml.json"
    write_fake_nvml(path, [_gpu(70 * GIB)])
    clock = _Clock()
    preflight = GpuPreflight(FakeNvml(path), clock=clock, sleep=clock.sleep)
    assert preflight.before_launch(plan).ok
    preflight.after_exit(plan, 999_003)  # gone already; a foreign program now holds 30 GiB
    write_fake_nvml(path, [_gpu(40 * GIB, [{"pid": holder.pid, "used_bytes": 30 * GIB}])])
    decision = preflight.before_launch(plan)
    assert decision.ok and clock.now == 0 and decision.record["free_bytes"] == 40 * GIB


def test_memory_that_never_comes_back_is_recorded_and_the_fit_decides(plan: RecipePlan, tmp_path: Path) -> None:
    path = tmp_path / "nvml.json"
    write_fake_nvml(path, [_gpu(70 * GIB)])
    clock = _Clock()
    messages: list[str] = []
    preflight = GpuPreflight(FakeNvml(path), release_timeout=30, clock=clock, sleep=clock.sleep,
                             report=messages.append)
    assert preflight.before_launch(plan).ok
    preflight.after_exit(plan, 999_004)
    write_fake_nvml(path, [_gpu(50 * GIB)])  # pid gone, 20 GiB held by something NVML does not list
    decision = preflight.before_launch(plan)
    wait = decision.record["release_wait"]
    assert decision.ok and wait["timed_out"] and wait["missing_bytes"] == 20 * GIB
    assert any("stayed 20.00 GiB below its baseline" in m for m in messages)


def test_gpu_choices_are_checked(tmp_path: Path) -> None:
    assert parse_gpus(None) is None and parse_gpus("all") is None
    assert parse_gpus("0,2") == [0, 2]
    for bad in ("x", "-1", ","):
        with pytest.raises(PreflightError, match="nvidia-smi"):
            parse_gpus(bad)
    with pytest.raises(PreflightError, match="sees 1"):
        GpuPreflight(_fake(tmp_path, [_gpu(GIB)]), gpus=[3])
    with pytest.raises(PreflightError, match="no GPU"):
        GpuPreflight(_fake(tmp_path, []))


def test_the_fake_is_reread_on_every_call(tmp_path: Path) -> None:
    path = tmp_path / "nvml.json"
    write_fake_nvml(path, [_gpu(GIB)])
    nvml = FakeNvml(path)
    assert nvml.state(0).free_bytes == GIB
    write_fake_nvml(path, [_gpu(2 * GIB), _gpu(3 * GIB, index=1)])
    assert nvml.device_count() == 2 and nvml.state(0).free_bytes == 2 * GIB
    assert isinstance(nvml.state(1), GpuState)


# ----------------------------------------------------------------------------- through the CLI


def _words(text: str) -> str:
    """The CLI's output with rich's line wrapping undone."""
    return " ".join(text.split())


def _cli_recipes(tmp_path: Path, demo: dict, **defaults: object) -> Path:
    body = f'[[recipe]]\nname = "r3"\nmodel = "{demo["root"] / "models" / "r3-stage2"}"\n'
    return write_recipes(tmp_path, body, demo, **{"batch_size": 4, **defaults})


def test_cli_refuses_a_recipe_that_does_not_fit_and_starts_no_worker(demo: dict, tmp_path: Path,
                                                                     holder: subprocess.Popen) -> None:
    recipes = _cli_recipes(tmp_path, demo)
    fake = tmp_path / "nvml.json"
    write_fake_nvml(fake, [_gpu(300 * 2**20, [{"pid": holder.pid, "used_bytes": TOTAL - GIB}])])
    # --device cuda on a CPU machine: the fake says there is a GPU, and a refused recipe never needs one.
    result = run_cli("run", str(recipes), "--out", str(tmp_path / "runs"), "--device", "cuda",
                     env={FAKE_ENV: str(fake)})
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"pid {holder.pid} (sleep)" in _words(result.stdout)
    run_dir = only_run_dir(tmp_path / "runs")
    summary = json.loads((run_dir / "r3" / "summary.json").read_text())
    assert summary["status"] == "refused" and "weights do not fit" in summary["detail"]
    assert summary["pid"] is None and summary["hello"] is None
    assert not (run_dir / "r3" / "worker.log").exists() and not (run_dir / "r3" / "spec.json").exists()
    assert summary["preflight"]["holders"][0]["pid"] == holder.pid


def test_cli_lowers_the_batch_and_the_real_worker_runs_with_it(demo: dict, tmp_path: Path) -> None:
    """4 samples that do not fit at batch 4 fit at 3, which the worker runs as 2 + 2: the printed message says so,
    and the worker's own count of batches agrees."""
    recipes = _cli_recipes(tmp_path, demo, limit=4)
    (plan,) = make_plans(load_recipe_file(recipes), load_recipe_file(recipes).recipes)
    fake = tmp_path / "nvml.json"
    # --device cpu with the fake: the decisions are made on the CPU's sizes (float32) and a real worker runs.
    write_fake_nvml(fake, [_gpu(_workload(plan, "cpu").estimate(3).total_bytes)])
    result = run_cli("run", str(recipes), "--out", str(tmp_path / "runs"), "--device", "cpu",
                     env={FAKE_ENV: str(fake)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "batch size lowered from 4 to 3" in _words(result.stdout)
    assert "so its 4 samples run as 2 batches of 2 (a batch of 4 needs" in _words(result.stdout)
    run_dir = only_run_dir(tmp_path / "runs")
    summary = json.loads((run_dir / "r3" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["preflight"]["batch_lowered"]
    assert json.loads((run_dir / "r3" / "spec.json").read_text())["recipe"]["batch_size"] == 3
    assert summary["done"]["counts"]["batch_size"] == 3 and summary["done"]["counts"]["batches"] == 2


def test_cli_plan_shows_the_estimate_and_the_verdict(demo: dict, tmp_path: Path, holder: subprocess.Popen) -> None:
    recipes = _cli_recipes(tmp_path, demo)
    fake = tmp_path / "nvml.json"
    write_fake_nvml(fake, [_gpu(70 * GIB)])
    fits = run_cli("plan", str(recipes), env={FAKE_ENV: str(fake)})
    assert fits.returncode == 0, fits.stdout + fits.stderr
    assert "memory: " in fits.stdout and "bfloat16" in fits.stdout and "verdict: runs, GPU 0" in fits.stdout
    write_fake_nvml(fake, [_gpu(GIB // 4, [{"pid": holder.pid, "used_bytes": TOTAL - GIB}])])
    refused = run_cli("plan", str(recipes), env={FAKE_ENV: str(fake)})
    assert refused.returncode == 1 and f"pid {holder.pid} (sleep)" in _words(refused.stdout)
    no_gpu = run_cli("plan", str(recipes), "--device", "cpu", env={FAKE_ENV: ""})
    assert no_gpu.returncode == 0 and "float32" in no_gpu.stdout and "verdict" not in no_gpu.stdout


def test_cli_rejects_gpus_that_do_not_exist(demo: dict, tmp_path: Path) -> None:
    fake = tmp_path / "nvml.json"
    write_fake_nvml(fake, [_gpu(70 * GIB)])
    result = run_cli("run", str(_cli_recipes(tmp_path, demo)), "--out", str(tmp_path / "runs"), "--device", "cuda",
                     "--gpus", "3", env={FAKE_ENV: str(fake)})
    assert result.returncode == 2 and "--gpus names GPU(s) [3]" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_batch_size_auto_stops_at_the_cap(demo: dict, tmp_path: Path) -> None:
    """A dataset larger than the cap (the demo's records repeated under new ids, the images shared)."""
    records = [json.loads(line) for line in Path(demo["dataset"]).read_text().splitlines()]
    large = tmp_path / "large.jsonl"
    image_dir = Path(demo["dataset"]).parent
    large.write_text("".join(json.dumps({**r, "id": f"{r['id']}-{i}", "image": str(image_dir / r["image"])}) + "\n"
                             for i in range(AUTO_BATCH_CAP // len(records) + 2) for r in records))
    body = f'[[recipe]]\nname = "auto"\nmodel = "{demo["root"] / "models" / "base"}"\nbatch_size = "auto"\n'
    recipe_file = load_recipe_file(write_recipes(tmp_path, body, demo, dataset=str(large)))
    (auto,) = make_plans(recipe_file, recipe_file.recipes)
    assert _workload(auto).prompts.samples > AUTO_BATCH_CAP
    roomy = GpuPreflight(_fake(tmp_path, [_gpu(70 * GIB)])).before_launch(auto)
    assert roomy.ok and roomy.batch_size == AUTO_BATCH_CAP


def test_batch_size_auto_takes_the_largest_batch_that_fits_up_to_the_cap(demo: dict, tmp_path: Path) -> None:
    body = f'[[recipe]]\nname = "auto"\nmodel = "{demo["root"] / "models" / "base"}"\nbatch_size = "auto"\n'
    recipe_file = load_recipe_file(write_recipes(tmp_path, body, demo))
    (auto,) = make_plans(recipe_file, recipe_file.recipes)
    workload = _workload(auto)
    roomy = GpuPreflight(_fake(tmp_path, [_gpu(70 * GIB)])).before_launch(auto)
    samples = len(Path(demo["dataset"]).read_text().splitlines())
    assert roomy.ok and roomy.batch_size == samples < AUTO_BATCH_CAP  # no batch beyond the dataset's size
    room_for_5 = (workload.estimate(5).total_bytes + workload.estimate(6).total_bytes) // 2
    tight = GpuPreflight(_fake(tmp_path, [_gpu(room_for_5)])).before_launch(auto)
    assert tight.ok and tight.batch_size == 5 and "batch_lowered" not in tight.record
    assert "batch size auto -> 5" in tight.message


def test_a_worker_started_ahead_prepares_batches_at_the_size_the_preflight_will_choose(demo: dict,
                                                                                         tmp_path: Path) -> None:
    """The second recipe's worker is spawned (held) while the first runs, when the GPU is busy: it is given the
    batch size expected once the GPU is free again, so the batches it prepares in advance are the ones it runs."""
    models = demo["root"] / "models"
    body = "".join(f'[[recipe]]\nname = "{n}"\nmodel = "{models / n}"\n' for n in ("base", "r1-llm-only"))
    recipes = write_recipes(tmp_path, body, demo, batch_size="auto", limit=5)
    fake = tmp_path / "nvml.json"
    write_fake_nvml(fake, [_gpu(70 * GIB)])
    result = run_cli("run", str(recipes), "--out", str(tmp_path / "runs"), "--device", "cpu",
                     env={FAKE_ENV: str(fake)})
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    held = json.loads((run_dir / "r1-llm-only" / "summary.json").read_text())
    assert held["preflight"]["batch_size"] == 5  # auto, at most the dataset (limit = 5)
    assert "held" in held["done"]["timings"]  # it was started ahead
    spec = json.loads((run_dir / "r1-llm-only" / "spec.json").read_text())
    assert spec["recipe"]["batch_size"] == 5 and spec["hold"]  # not the CPU default of 8, re-batched at release
