"""The environment a worker process starts with, built on purpose rather than inherited whole: one GPU (or
none), the hub offline unless the recipe file allows the network, and the variables of distributed launchers
removed so that no library in the worker thinks it is part of a job. What was set and removed is recorded."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

# Variables of distributed launchers that would make a library in the worker think it is part of a job.
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                  "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
_LAUNCHER_PREFIXES = ("SLURM_", "TORCHELASTIC_", "OMPI_", "PMI_")
# The CUDA caching allocator's settings: a user's own (under either name) are kept. Otherwise the worker grows its
# segments in place (expandable_segments), so that what NVML sees of it follows what torch holds instead of rising
# by whole segments: the memory estimate is then a closer bound, and workers packed on one GPU waste less of it.
# The older name is set because torch 2.9 reads expandable_segments only from it (pytorch/pytorch#183387).
_ALLOC_CONF_NAMES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
EXPANDABLE_SEGMENTS = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def worker_env(device: str, gpu: str | None = None, offline: bool = True, pinned: bool = False,
               base: Mapping[str, str] | None = None) -> tuple[dict[str, str], dict]:
    """The worker's environment, built on purpose from `base` (default: this process's); returns it and what was
    set or removed. `pinned` (a scheduler's lane) gives the worker its GPU even with --device cpu: only the fake
    NVML makes lanes on a CPU machine, and there the tests read where each worker was put."""
    base = os.environ if base is None else base
    env = {k: v for k, v in base.items() if not _is_launcher_var(k)}
    removed = sorted(set(base) - set(env))
    # A CPU worker gets no GPU, unless a lane pinned one.
    visible = (gpu or "0") if device == "cuda" else (gpu if pinned and gpu else "")
    chosen = {
        "CUDA_VISIBLE_DEVICES": visible,
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if device == "cuda" and not any(name in base for name in _ALLOC_CONF_NAMES):
        chosen |= EXPANDABLE_SEGMENTS
    if offline:
        chosen |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    project_root = str(Path(__file__).resolve().parents[2])  # `-m worker` works uninstalled too
    chosen["PYTHONPATH"] = os.pathsep.join(p for p in (project_root, env.get("PYTHONPATH")) if p)
    env |= chosen
    return env, {"set": chosen, "removed": removed}


def _is_launcher_var(name: str) -> bool:
    return name in _LAUNCHER_VARS or name.startswith(_LAUNCHER_PREFIXES)
