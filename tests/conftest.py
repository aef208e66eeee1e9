"""Shared fixtures: a tiny real Qwen2-VL family built offline once per session (helpers: tests/helpers.py)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The tiny models' matmuls are so small that two threads on a two-core runner only fight (0.05 s vs up to 3 s
# per generate); workers inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.make_demo import build_demo


@pytest.fixture(scope="session", autouse=True)
def evalorch_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The image cache of every run in the session's temporary folder, never the user's ~/.cache: recipes
    resolve their cache_dir from $EVALORCH_CACHE (session-wide, so that module-scoped runs get it too)."""
    folder = tmp_path_factory.mktemp("evalorch-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EVALORCH_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The demo family (base, r1..r4 with the two-stage chain) and a small grounding set, real files."""
    out = tmp_path_factory.mktemp("demo")
    built = build_demo(out, n_samples=12, seed=0)
    return {"root": out, **built}


@pytest.fixture()
def routed() -> Iterator[object]:
    """Route decode steps of sdpa through a given kernel (worker.simulated_gpu.ReferenceKernel) in float32, as
    the worker routes flash_attention_2's through flash-attn's on a GPU; transformers' own function back after."""
    import torch

    from worker.decode import decode_attention

    def route(kernel: object) -> object:
        assert decode_attention.install("sdpa", kernel, dtypes=(torch.float32,))
        return kernel

    yield route
    decode_attention.uninstall()
