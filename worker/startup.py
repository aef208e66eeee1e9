"""What a fresh worker process sets up before its work, torch-free until asked: the device a spec's `device`
means here, the worker's share of the host's CPU threads, and the optional imports hidden while the model stack is
imported. The worker's entry point (worker/__main__.py) calls each once."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from contract.spec import GPU_WORKER_THREADS

if TYPE_CHECKING:
    from worker.device import Device


@contextmanager
def unused_optional_imports_hidden() -> Iterator[None]:
    """transformers imports scikit-learn where it is installed, for assisted generation's candidate threshold,
    which evaluation never uses: 2.15 s of the 17.5 s `python -X importtime` gave the worker's imports on the
    H200 host (transformers 5.17's candidate_generator imports sklearn.metrics at import time; later versions
    import it lazily). Hidden while transformers is imported (an entry of None in sys.modules makes it look
    absent), importable again afterwards."""
    hidden = [name for name in ("sklearn",) if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


def share_cpu(gpu: bool, torch: Any) -> None:
    """A GPU worker's CPU work is batch preparation (the image processor's torch ops), and up to three workers
    share the host (the running one and those started ahead). At torch's default of one thread per core they
    oversubscribe it: preparing 200 images took 1.2 s in one process and 16-17 s each in three at once on the
    16-core H100 host; at 4 threads 1.2 s alone and 1.4-1.6 s three at once. An explicit OMP_NUM_THREADS wins.
    The parent sizes how many GPU workers may share a GPU by the same number (orchestrator/execution/scheduler.py)."""
    if gpu and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(min(GPU_WORKER_THREADS, os.cpu_count() or 1))


def select_device(requested: str) -> Device:
    """The device a spec's `device` ("cpu" or "cuda") means in this process: a CUDA GPU, or the simulated one the
    tests ask for (worker/simulated_gpu.py: CI runs the GPU's wiring on a CPU)."""
    from worker.device import CPU, SIMULATED_ENV, Cuda

    if requested != "cuda":
        return CPU
    if os.environ.get(SIMULATED_ENV):
        from worker.simulated_gpu import SimulatedGpu

        return SimulatedGpu()
    return Cuda()
