"""What the NVIDIA driver says about the GPUs, through NVML (nvidia-ml-py); no CUDA context is ever created.

Everything goes through the `Nvml` interface so that tests on CPU machines can drive the same decisions with
a fake; the real implementation is exercised on the GPU machine (scripts/gpu_check.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_bytes: int | None  # NVML may not know (e.g. in containers)


@dataclass(frozen=True)
class GpuState:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    processes: tuple[GpuProcess, ...]


class Nvml(Protocol):
    def device_count(self) -> int: ...

    def state(self, index: int) -> GpuState: ...


class NvmlUnavailable(Exception):
    """No NVIDIA driver here (a CPU machine), or NVML failed to start."""


class RealNvml:
    """NVML through pynvml; initialised once per process."""

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a dependency
            raise NvmlUnavailable(f"nvidia-ml-py is not installed: {exc}") from exc
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise NvmlUnavailable(f"NVML unavailable: {exc}") from exc

    def device_count(self) -> int:
        return self._nvml.nvmlDeviceGetCount()

    def state(self, index: int) -> GpuState:
        nvml = self._nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        name = nvml.nvmlDeviceGetName(handle)
        processes = tuple(
            GpuProcess(p.pid, p.usedGpuMemory) for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        )
        return GpuState(index, name if isinstance(name, str) else name.decode(), memory.total, memory.free, processes)


def open_nvml() -> Nvml | None:
    """The real NVML, or None on a machine without an NVIDIA driver."""
    try:
        return RealNvml()
    except NvmlUnavailable:
        return None


def default_device(nvml: Nvml | None) -> str:
    """`--device auto`: cuda where the driver sees a GPU, else cpu."""
    return "cuda" if nvml is not None and nvml.device_count() > 0 else "cpu"
