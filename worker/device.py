"""What the worker asks of its device, in one place: the one seam between "the device is a GPU" and the code that
acts on it.

A worker runs on one device (DESIGN.md, rule 2). Everything that differs on a GPU is a method here: creating its
context, the pinned buffers and copy streams the staged weights go through (loading/weights.py), pinning a batch's
inputs, the kernel decode steps attend with (worker/decode/decode_attention.py), the recorder of decode steps
(worker/decode/graph_decode.py) and the memory readings the `loaded` and `done` messages carry. The rest of the worker
asks `device.is_gpu` and these methods, never "cuda" in a string, so the same wiring runs wherever the device
comes from:

- `Cpu`: none of it (a plain CPU run: tensors read straight into place, transformers' attention, no graphs);
- `Cuda`: the real thing (on the GPU machine: tests/gpu);
- `worker.simulated_gpu.SimulatedGpu` (tests only, `EVALORCH_SIMULATED_GPU=1` with `--device cuda`;
  worker/startup.py's select_device chooses among the three): CPU tensors through every GPU branch, with the CPU
  stand-ins of what cannot exist there (a recorder that replays eagerly, a reference kvcache kernel, unpinned
  staging), so CI runs the GPU's wiring end to end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

SIMULATED_ENV = "EVALORCH_SIMULATED_GPU"  # tests only: `--device cuda` workers run on a SimulatedGpu


@dataclass(frozen=True)
class MemoryReading:
    """What the device's allocator counted (None on a CPU: no such allocator)."""

    allocated_bytes: int | None
    peak_bytes: int | None
    peak_reserved_bytes: int | None


class Device:
    """A plain CPU: the base of the others, and what every GPU method does where there is no GPU."""

    tensors = "cpu"  # where tensors go (torch's device string)
    settings = "cpu"  # what a recipe's "auto" attention and dtype resolve for (contract.recipe.run_attn, run_dtype)
    is_gpu = False  # takes the GPU's branches: staged copies, pinned inputs, kvcache route, graphs, memory readings
    kvcache_attention: str | None = None  # the attention whose decode steps the kvcache kernel takes
    kvcache_dtypes: tuple[torch.dtype, ...] = ()

    def __eq__(self, other: object) -> bool:  # a worker has one device: its kind is all there is to compare
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))

    def usable(self) -> bool:
        return True

    def start(self) -> float:
        """Create the device's context; the seconds it took (a phase of the load's timings; none on a CPU)."""
        if not self.is_gpu:
            return 0.0
        started = time.perf_counter()
        torch.empty(1, device=self.tensors)
        return time.perf_counter() - started

    def kvcache_kernel(self) -> Callable[..., Any] | None:
        return None

    def graph_recorder(self) -> Callable[[], Any] | None:
        """A factory of decode-step recorders (graph_decode.CudaGraphReplay's contract), or None: no graphs."""
        return None

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A staging buffer the copies to the device read from."""
        return torch.empty(nbytes, dtype=torch.uint8)

    def copy_stream(self) -> Any:
        """A stream of its own for one reader thread's copies (something with synchronize())."""
        return _Immediate()

    def on_stream(self, stream: Any) -> AbstractContextManager[Any]:
        return nullcontext()

    def mark(self, stream: Any) -> Any:
        """An event recorded on `stream`: synchronize() waits for the copies queued before it."""
        return _Immediate()

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        """A batch's input tensor as the prefetch thread hands it over (pinned on a GPU)."""
        return tensor

    def memory(self) -> MemoryReading:
        return MemoryReading(None, None, None)

    def free_cached(self) -> None:
        """Give the allocator's cache back (after running out of memory, before a smaller retry)."""


class Cpu(Device):
    """A plain CPU run."""


class Cuda(Device):
    """The worker's one GPU (CUDA_VISIBLE_DEVICES names it; it is device 0 inside the worker)."""

    tensors = "cuda:0"
    settings = "cuda"
    is_gpu = True
    kvcache_attention = "flash_attention_2"
    kvcache_dtypes = (torch.bfloat16, torch.float16)  # flash-attn's

    def usable(self) -> bool:
        return torch.cuda.is_available()

    def kvcache_kernel(self) -> Callable[..., Any] | None:
        from worker.decode.decode_attention import flash_kvcache_kernel

        return flash_kvcache_kernel()

    def graph_recorder(self) -> Callable[[], Any] | None:
        from worker.decode.graph_decode import CudaGraphReplay

        return CudaGraphReplay

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def copy_stream(self) -> Any:
        return torch.cuda.Stream(device=self.tensors)

    def on_stream(self, stream: Any) -> AbstractContextManager[Any]:
        return torch.cuda.stream(stream)

    def mark(self, stream: Any) -> Any:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory()

    def memory(self) -> MemoryReading:
        return MemoryReading(torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated(),
                             torch.cuda.max_memory_reserved())

    def free_cached(self) -> None:
        torch.cuda.empty_cache()


class _Immediate:
    """A stream or event where every copy has finished when it returns (the CPU's)."""

    def synchronize(self) -> None:
        pass


CPU = Cpu()
