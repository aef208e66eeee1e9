"""What the GPU suite's tests share: GPU 0 as the driver sees it (NVML, never a CUDA context in the test process),
waiting for memory to come back, the CLI as a user runs it on the GPU, and the README's promised figures.

The suite also runs as a dry run on a CPU (tests/test_gpu_wiring.py, in CI), so that its own code never lands
unrun: the simulated GPU (EVALORCH_SIMULATED_GPU) behind a fake NVML (EVALORCH_FAKE_NVML). `SIMULATED` says which;
what differs is only what that device loads as, and what a fake NVML cannot show (a process's own memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from helpers import ROOT, only_run_dir, run_cli

from contract.nvml import FAKE_ENV, GpuState, open_nvml
from orchestrator.results.store import read_samples

SIMULATED = bool(os.environ.get("EVALORCH_SIMULATED_GPU")) and bool(os.environ.get(FAKE_ENV))
# (attention, dtype, device) a recipe's "auto" settings load as: flash-attn in bfloat16 on the GPU; on the simulated
# GPU as on the CPU (worker/simulated_gpu.py)
LOADED_AS = ("sdpa", "float32", "cpu") if SIMULATED else ("flash_attention_2", "bfloat16", "cuda:0")


def gpu_state() -> GpuState | None:
    """GPU 0 as the driver sees it (NVML: no CUDA context in this process), or None without one."""
    nvml = open_nvml()
    return nvml.state(0) if nvml is not None and nvml.device_count() > 0 else None


def wait_for_release(baseline: GpuState, slack_bytes: int = 256 << 20, timeout_s: float = 30.0) -> GpuState:
    """GPU 0 once its free memory is back within `slack_bytes` of `baseline` (or as it is at `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = gpu_state()
        assert state is not None
        if state.free_bytes >= baseline.free_bytes - slack_bytes or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def our_workers_on_the_gpu() -> list[str]:
    """Processes on GPU 0 that are evalorch workers (their command line says `-m worker`)."""
    import psutil

    state = gpu_state()
    found = []
    for proc in state.processes if state is not None else ():
        try:
            cmdline = " ".join(psutil.Process(proc.pid).cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "-m worker" in cmdline:
            found.append(proc.describe())
    return found


def run_on_gpu(recipes: Path, out: Path, *args: str, env: dict | None = None) -> dict:
    """`python -m orchestrator run RECIPES --device cuda`, and what it left: the result, the run folder, each
    recipe's summary.json and its answers by sample id."""
    result = run_cli("run", str(recipes), "--device", "cuda", "--out", str(out), *args, env=env, timeout=400)
    run_dir = only_run_dir(out)
    names = [row["name"] for row in json.loads((run_dir / "summary.json").read_text())["recipes"]]
    return {"result": result, "run_dir": run_dir,
            "summaries": {n: json.loads((run_dir / n / "summary.json").read_text()) for n in names},
            "texts": {n: {s["id"]: s["text"] for s in read_samples(run_dir / n / "samples.jsonl")} for n in names}}


def readme_figures() -> dict[str, float]:
    """The demo family's mean IoU per recipe, from README.md's table (the figures a user is promised)."""
    figures = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[1][:1].isdigit() and "[" in cells[1]:
            figures[cells[0].split(" (")[0]] = float(cells[1].split()[0])
    return figures


def build_offline(*calls: tuple[str, dict]) -> list[Path]:
    """Folders built by tools/make_frameworks' builders (name, keyword arguments; paths as strings) in a child process
    that sees no GPU: peft imports bitsandbytes where it is installed, and bitsandbytes' import opens a CUDA context,
    which this process must never hold (it would count as memory a worker left behind)."""
    spec = json.dumps([[name, {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}]
                       for name, kwargs in calls])
    done = subprocess.run([sys.executable, "-m", "tools.make_frameworks", spec], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [Path(line) for line in done.stdout.splitlines()[-len(calls):]]


def held_by_this_process() -> bool:
    """Whether this process holds a CUDA context on GPU 0 (as NVML lists it)."""
    state = gpu_state()
    return state is not None and any(proc.pid == os.getpid() for proc in state.processes)
