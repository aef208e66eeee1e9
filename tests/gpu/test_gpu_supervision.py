"""The parent's GPU decisions on a real GPU: the preflight refuses a recipe beside a process that holds nearly
all the memory, naming it, and starts no worker; a worker that hangs is asked for its stacks, then killed, and
its memory comes back."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from gpu_helpers import SIMULATED, our_workers_on_the_gpu, run_on_gpu, wait_for_release
from helpers import ROOT, write_recipes

from benchmarks.gpu_check import Holder
from contract.nvml import FAKE_ENV

pytestmark = pytest.mark.gpu
DEMO = ROOT / "examples" / "demo-family"


def _recipes(folder: Path, **settings: object) -> Path:
    defaults = {"dataset": str(DEMO / "data" / "heldout.jsonl"), "prompt": "{prompt} Answer with its bounding box.",
                "box_format": "qwen2vl", "max_new_tokens": 32, "batch_size": 4, **settings}
    return write_recipes(folder, f'[[recipe]]\nname = "base"\nmodel = "{DEMO / "base"}"\n', None, **defaults)


@contextmanager
def _holding(leave: int) -> Iterator[Holder]:
    """A second process that holds all but `leave` bytes of the GPU (benchmarks/gpu_check.py's); on the simulated GPU a
    process the fake NVML says holds them, the fake's file put back afterwards."""
    fake = Path(os.environ[FAKE_ENV]) if SIMULATED else None
    before = fake.read_bytes() if fake is not None else None
    holder = Holder(leave, small=SIMULATED, fake=fake)
    try:
        yield holder
    finally:
        holder.close()
        if fake is not None and before is not None:
            fake.write_bytes(before)


def test_the_preflight_refuses_beside_a_holder_and_names_it(gpu, tmp_path: Path) -> None:
    with _holding(leave=256 << 20) as holder:  # less than a CUDA context alone
        run = run_on_gpu(_recipes(tmp_path, limit=8), tmp_path / "runs")
    summary = run["summaries"]["base"]
    assert run["result"].returncode == 1, run["result"].stdout[-3000:]
    assert summary["status"] == "refused", summary
    assert f"pid {holder.pid} " in " ".join(summary["detail"].split()), summary["detail"]
    assert summary.get("pid") is None and summary.get("hello") is None  # no worker was started
    assert wait_for_release(gpu).free_bytes >= gpu.free_bytes - (256 << 20)


def test_a_hung_worker_is_asked_for_its_stacks_then_killed_and_its_memory_freed(gpu, tmp_path: Path) -> None:
    recipes = _recipes(tmp_path, limit=16, stall_timeout=10)
    started = time.monotonic()
    run = run_on_gpu(recipes, tmp_path / "runs", env={"EVALORCH_FAULT": "base:hang@sample:6"})
    took = time.monotonic() - started
    summary = run["summaries"]["base"]
    assert run["result"].returncode == 1 and summary["status"] == "timeout", summary["detail"]
    assert "stall timeout" in summary["detail"] and took < 120
    steps = [(step["action"], step["signal"]) for step in summary["shutdown"]]
    assert steps == [("traceback", "SIGUSR1"), ("kill", "SIGKILL")], summary["shutdown"]
    log = (run["run_dir"] / "base" / "worker.log").read_text(errors="replace")
    assert "most recent call first" in log and "faults.py" in log  # every thread's stack, from faulthandler
    assert len(run["texts"]["base"]) == 5  # the samples before the hang are kept
    released = wait_for_release(gpu)
    assert our_workers_on_the_gpu() == [] and released.free_bytes >= gpu.free_bytes - (256 << 20)
    assert json.loads((run["run_dir"] / "summary.json").read_text())["recipes"][0]["status"] == "timeout"
