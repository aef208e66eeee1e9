"""Test-only: a CPU that takes every GPU branch of the worker (worker/device.py's seam), so that CI, which has no
GPU, runs the GPU's wiring end to end: `EVALORCH_SIMULATED_GPU=1` with `--device cuda` (and a fake NVML for the
parent: contract/nvml.py).

What cannot exist on a CPU has a stand-in with the same contract: decode steps are "recorded" by
graph_decode.EagerReplay (a replay runs the recorded step again, on the same buffers), they attend through
`ReferenceKernel` (flash-attn's kvcache kernel in plain torch) routed in for sdpa, the staged weights go through
unpinned buffers and streams whose copies are done when they return, and memory is read as the process's resident
set. Recipes resolve "auto" as on the CPU (sdpa, float32). The real GPU runs the other side of the seam
(tests/gpu)."""

from __future__ import annotations

import resource
from collections.abc import Callable
from typing import Any

import psutil
import torch

from worker.device import Device, MemoryReading


class SimulatedGpu(Device):
    """CPU tensors through every GPU branch; the base's staging (unpinned buffers, copies done on return)."""

    is_gpu = True
    kvcache_attention = "sdpa"
    kvcache_dtypes = (torch.float32, torch.bfloat16, torch.float16)

    def kvcache_kernel(self) -> Callable[..., Any] | None:
        return ReferenceKernel()

    def graph_recorder(self) -> Callable[[], Any] | None:
        from worker.decode.graph_decode import EagerReplay

        return EagerReplay

    def memory(self) -> MemoryReading:
        """The process's resident set now and at its peak (Linux counts ru_maxrss in KiB)."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return MemoryReading(psutil.Process().memory_info().rss, peak, peak)


class ReferenceKernel:
    """flash_attn_with_kvcache's contract for a single query token, in plain torch; counts its calls. Each row
    attends to exactly its keys [cache_leftpad, cache_seqlens), sliced out: the result does not depend on how long
    the cache's buffer is (as flash-attn's does not with one split of the keys). `ignore_padding` (tests): a kernel
    that attends to the pads too, which must change the answers."""

    def __init__(self, ignore_padding: bool = False) -> None:
        self.calls = 0
        self.ignore_padding = ignore_padding

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                 cache_seqlens: torch.Tensor, cache_leftpad: torch.Tensor, softmax_scale: float | None,
                 causal: bool, num_splits: int = 0) -> torch.Tensor:
        self.calls += 1
        assert q.shape[1] == 1 and causal and num_splits == 1
        groups = q.shape[2] // k_cache.shape[2]
        rows = []
        for row in range(q.shape[0]):
            start = 0 if self.ignore_padding else int(cache_leftpad[row])
            end = int(cache_seqlens[row])
            k, v = (t[row, start:end].transpose(0, 1).repeat_interleave(groups, dim=0) for t in (k_cache, v_cache))
            out = torch.nn.functional.scaled_dot_product_attention(q[row].transpose(0, 1), k, v, scale=softmax_scale)
            rows.append(out.transpose(0, 1))
        return torch.stack(rows)
