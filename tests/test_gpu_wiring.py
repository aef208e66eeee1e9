"""The GPU's wiring, run on the CPU: `--device cuda` with a simulated GPU (worker/simulated_gpu.py behind
worker/device.py's seam) and a fake NVML for the parent. Every branch a GPU run takes in the worker runs here
through the same code (the staged weights' buffers and streams, the held worker's gate on pinning, pinned
inputs, the kvcache route, decode steps recorded and replayed, the memory readings), with CPU
stand-ins only below the seam. Its answers must be the plain CPU run's, sample for sample: a broken branch fails
its recipe or changes an answer. The other side of the seam (CUDA itself) is tests/gpu's, on the GPU machine; the
last test runs that suite here too, on the simulated GPU, so that its own code is never first run on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, demo_recipes, only_run_dir, run_cli, write_recipes
from safetensors.torch import load_file, save_file

from contract.messages import DECODE_GRAPH_ON
from contract.nvml import FAKE_ENV, write_fake_nvml
from orchestrator.results.store import read_samples
from worker.device import SIMULATED_ENV
from worker.loading.weights import load_safetensors
from worker.simulated_gpu import SimulatedGpu
from worker.startup import select_device

GIB = 2**30
NAMES = ["base", "r1-llm-only", "r3-two-stage"]


def _run(folder: Path, demo: dict, device: str) -> dict:
    folder.mkdir()
    recipes = write_recipes(folder, demo_recipes(demo["root"] / "models", NAMES), demo, max_new_tokens=10)
    env = {}
    if device == "cuda":
        write_fake_nvml(folder / "nvml.json", [{"name": "Fake H100", "uuid": "GPU-fake-0", "total_bytes": 80 * GIB,
                                                "free_bytes": 79 * GIB, "processes": []}])
        env = {FAKE_ENV: str(folder / "nvml.json"), SIMULATED_ENV: "1"}
    result = run_cli("run", str(recipes), "--out", str(folder / "runs"), "--device", device, env=env)
    run_dir = only_run_dir(folder / "runs")
    return {"result": result, "run_dir": run_dir,
            "summaries": {n: json.loads((run_dir / n / "summary.json").read_text()) for n in NAMES},
            "texts": {n: {s["id"]: s["text"] for s in read_samples(run_dir / n / "samples.jsonl")} for n in NAMES}}


@pytest.fixture(scope="module")
def runs(demo: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("wiring")
    return {device: _run(folder / device, demo, device) for device in ("cpu", "cuda")}


def test_the_gpu_path_evaluates_every_recipe_and_answers_as_the_cpu_does(runs: dict) -> None:
    for device, run in runs.items():
        assert run["result"].returncode == 0, (device, run["result"].stdout + run["result"].stderr)
        assert [run["summaries"][n]["status"] for n in NAMES] == ["ok"] * len(NAMES), device
    cpu, gpu = runs["cpu"]["texts"], runs["cuda"]["texts"]
    for name in NAMES:
        assert gpu[name] and gpu[name] == cpu[name], name


def test_each_gpu_branch_was_taken(runs: dict) -> None:
    for name in NAMES:
        summary = runs["cuda"]["summaries"][name]
        loaded, counts = summary["loaded"], summary["done"]["counts"]
        assert loaded["loader"] == "staged" and loaded["staged_bytes"] > 0, loaded  # buffers and copy streams
        assert loaded["cuda_init_s"] > 0, loaded  # the device's context, a phase of its own
        assert loaded["decode_attention"] == "kvcache", loaded
        assert loaded["decode_graph"] == DECODE_GRAPH_ON, loaded
        assert counts["kvcache_calls"] > 0, counts
        graphs = counts["decode_graph"]
        assert graphs["replayed"] == counts["batches"] and graphs["declined"] == 0 and graphs["steps"] > 0, graphs
        # the memory readings of `loaded` and `done`: the simulated device's (the process's resident set)
        assert loaded["bytes_allocated"] > 0 and loaded["peak_bytes"] > 0, loaded
        assert summary["done"]["peak_bytes"] >= loaded["bytes_allocated"], summary["done"]
    # the first worker's first batch was made while it loaded; the others were started ahead and held, their
    # first batches made (and pinned once released) before their go
    first, *later = (runs["cuda"]["summaries"][n] for n in NAMES)
    assert "held" not in first["done"]["timings"] and all("held" in s["done"]["timings"] for s in later)
    assert all(s["done"]["timings"]["first_batch_ready_at"] > 0 for s in (first, *later))


def test_the_cpu_path_takes_none_of_them(runs: dict) -> None:
    for name in NAMES:
        summary = runs["cpu"]["summaries"][name]
        loaded, counts = summary["loaded"], summary["done"]["counts"]
        assert loaded["decode_attention"] == "transformers" and loaded["decode_graph"].startswith("off")
        assert loaded["cuda_init_s"] == 0
        assert counts["decode_graph"] is None and counts["kvcache_calls"] == 0
        assert loaded["bytes_allocated"] is None and summary["done"]["peak_bytes"] is None


def test_the_simulated_gpu_is_chosen_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SIMULATED_ENV, raising=False)
    assert not select_device("cpu").is_gpu and type(select_device("cuda")).__name__ == "Cuda"
    monkeypatch.setenv(SIMULATED_ENV, "1")
    assert isinstance(select_device("cuda"), SimulatedGpu) and not select_device("cpu").is_gpu


class _CountingGpu(SimulatedGpu):
    """Counts the staging buffers and the copies' events, so a test sees the staged path was the one taken."""

    def __init__(self) -> None:
        self.buffers = 0
        self.marks = 0

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        self.buffers += 1
        return super().host_buffer(nbytes)

    def mark(self, stream: object) -> object:
        self.marks += 1
        return super().mark(stream)


@pytest.mark.parametrize("threads,chunk_bytes", [(1, 64), (3, 100), (4, 1 << 20)])
def test_staged_copies_through_two_buffers_equal_the_files(tmp_path: Path, threads: int, chunk_bytes: int) -> None:
    """The double-buffered staging (a thread reads into one buffer while the other's copy is in flight), with
    tensors larger than a chunk and chunks holding several tensors: every byte lands where the file says."""
    generator = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn((i * 7 + 3, 5), generator=generator).to(torch.bfloat16) for i in range(12)}
    tensors["ids"] = torch.arange(50, dtype=torch.int64)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    device = _CountingGpu()
    weights = load_safetensors([path], device, torch.bfloat16, threads=threads, chunk_bytes=chunk_bytes)
    expected = load_file(str(path))
    assert weights.state_dict.keys() == expected.keys()
    assert all(torch.equal(weights.state_dict[name], expected[name]) for name in expected)
    assert device.buffers >= 2 and device.marks > 0  # the staged path, not the CPU's direct read


def test_the_gpu_acceptance_suite_passes_on_the_simulated_gpu(tmp_path: Path) -> None:
    """tests/gpu runs on the GPU machine only; here it runs as a dry run on the simulated GPU behind a fake NVML,
    so that the suite's own code never lands unrun. It must pass whole, and write no .gpu-verified (no GPU ran)."""
    fake = tmp_path / "nvml.json"
    write_fake_nvml(fake, [{"name": "Fake H100", "uuid": "GPU-fake-0", "total_bytes": 80 * GIB,
                            "free_bytes": 79 * GIB, "processes": []}])
    verified = ROOT / ".gpu-verified"
    before = verified.read_bytes() if verified.exists() else None
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider",
                           f"--basetemp={tmp_path / 'suite'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, FAKE_ENV: str(fake), SIMULATED_ENV: "1"})
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "deselected" not in summary, summary
    assert (verified.read_bytes() if verified.exists() else None) == before
