"""A GPU worker takes a share of the host's CPU threads, so that the workers started ahead do not starve it."""

from __future__ import annotations

import os

import pytest

from worker.startup import share_cpu


class _Torch:
    def __init__(self) -> None:
        self.threads: list[int] = []

    def set_num_threads(self, count: int) -> None:
        self.threads.append(count)


@pytest.mark.parametrize("gpu,omp,expected", [
    (True, None, [min(4, os.cpu_count() or 1)]),
    (True, "2", []),  # the user's OMP_NUM_THREADS stands
    (False, None, []),  # inference on the CPU needs every thread
])
def test_gpu_workers_use_at_most_four_cpu_threads(monkeypatch, gpu: bool, omp: str | None,
                                                  expected: list[int]) -> None:
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    torch = _Torch()
    share_cpu(gpu, torch)
    assert torch.threads == expected


def test_sklearn_is_hidden_only_while_transformers_is_imported() -> None:
    """transformers imports scikit-learn for assisted generation, which evaluation never uses (seconds of a
    fresh worker's start-up); the worker hides it for its imports only."""
    import importlib.util
    import sys

    from worker.startup import unused_optional_imports_hidden

    before = "sklearn" in sys.modules
    with unused_optional_imports_hidden():
        assert importlib.util.find_spec("sklearn") is None or before
        if not before:
            with pytest.raises(ImportError):
                import sklearn  # noqa: F401
    assert ("sklearn" in sys.modules) == before  # no None entry left behind
