"""torch's default dtype is one per process, not one per thread, and two parts of a worker use it at once.

transformers sets it to the model's dtype while it builds a model (`local_torch_dtype` in from_pretrained:
bfloat16 on a GPU). The image processors take it too: their fused rescale-and-normalise makes its mean and std
tensors with `torch.tensor` on the first call and caches them for the process (`lru_cache`). A worker's first
batch, prepared in the prefetch thread while the main thread built the model, made them bfloat16 for every later
batch of the run: every pixel of every image off by up to 0.01 (reproduced on the CPU: tests/test_default_dtype.py).
On a GPU that changed a few answers of the trained demo family's adapter recipes, depending only on whether the
worker had prepared its first batch before loading (started ahead) or during it. So building modules and running the
processor exclude each other, and a processor call checks that
the default is torch's own float32.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from worker.errors import WorkerError

_LOCK = threading.RLock()


@contextmanager
def building_modules() -> Iterator[None]:
    """Around whatever may change the default dtype while it runs: from_pretrained, applying adapters."""
    with _LOCK:
        yield


@contextmanager
def preparing_inputs() -> Iterator[None]:
    """Around every processor call: no model is being built meanwhile, and the default dtype is float32."""
    with _LOCK:
        if torch.get_default_dtype() != torch.float32:  # left changed by something else: never compute in it
            raise WorkerError("internal", f"torch's default dtype is {torch.get_default_dtype()} outside a model's "
                                          "construction; the processor's arithmetic would take it")
        yield


def lock_held() -> bool:
    """Whether this thread is inside building_modules or preparing_inputs (holds the lock the two share)."""
    return bool(_LOCK._is_owned())  # type: ignore[attr-defined]  # RLock's own check; typeshed omits it
