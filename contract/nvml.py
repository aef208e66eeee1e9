"""What the NVIDIA driver says about the GPUs, through NVML (nvidia-ml-py); no CUDA context is ever created.

Everything goes through the `Nvml` interface so that tests on CPU machines can drive the same decisions with
a fake; the real implementation is exercised on the GPU machine (tests/gpu).

    EVALORCH_FAKE_NVML=/path/gpus.json    (tests only) open_nvml() returns a FakeNvml reading that file:
    {"gpus": [{"name": "Fake H100", "total_bytes": 85899345920, "free_bytes": 85000000000,
               "uuid": "GPU-fake-0", "processes": [{"pid": 4242, "used_bytes": 900000000, "name": "python"}]}]}

The fake file is re-read on every call, so a test can change it while a run is in progress (memory coming
back, a foreign process appearing). A process without a "name" is named the way the real one is: by psutil.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

from .units import format_bytes

FAKE_ENV = "EVALORCH_FAKE_NVML"


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_bytes: int | None  # NVML may not know (e.g. in containers)
    name: str | None = None  # from psutil; None when the pid is not visible here (another container)

    def describe(self) -> str:
        used = format_bytes(self.used_bytes) if self.used_bytes is not None else "unknown amount"
        return f"pid {self.pid} ({self.name or 'name unknown: not visible from here'}) {used}"


@dataclass(frozen=True)
class GpuState:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    processes: tuple[GpuProcess, ...]
    uuid: str | None = None  # CUDA_VISIBLE_DEVICES accepts it, and unlike an index it means the same GPU to CUDA

    def holds(self, pid: int) -> bool:
        return any(p.pid == pid for p in self.processes)


class Nvml(Protocol):
    def device_count(self) -> int: ...

    def state(self, index: int) -> GpuState: ...


class NvmlUnavailable(Exception):
    """No NVIDIA driver here (a CPU machine), or NVML failed to start."""


def process_name(pid: int) -> str | None:
    """The process's name as psutil sees it, or None when it is gone or in another pid namespace."""
    try:
        return psutil.Process(pid).name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


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
        processes = tuple(
            GpuProcess(p.pid, p.usedGpuMemory, process_name(p.pid))
            for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        )
        return GpuState(index, _text(nvml.nvmlDeviceGetName(handle)), memory.total, memory.free, processes,
                        _text(nvml.nvmlDeviceGetUUID(handle)))


def _text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode()


class FakeNvml:
    """NVML as described by a JSON file (see the module's docstring); for CPU machines, where NVML cannot exist."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._read()  # fail at once, naming the file, if it is missing or malformed

    def _read(self) -> list[dict]:
        try:
            return json.loads(self.path.read_text())["gpus"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise NvmlUnavailable(f"{FAKE_ENV}={self.path}: not a readable fake NVML file ({exc})") from exc

    def device_count(self) -> int:
        return len(self._read())

    def state(self, index: int) -> GpuState:
        gpu = self._read()[index]
        processes = tuple(
            GpuProcess(p["pid"], p.get("used_bytes"), p.get("name") or process_name(p["pid"]))
            for p in gpu.get("processes", [])
        )
        return GpuState(index, gpu.get("name", f"Fake GPU {index}"), gpu["total_bytes"], gpu["free_bytes"],
                        processes, gpu.get("uuid"))


def write_fake_nvml(path: Path, gpus: list[dict]) -> None:
    """Write a fake NVML file atomically, so a reader never sees half of it (tests rewrite it mid-run)."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps({"gpus": gpus}))
    os.replace(tmp, path)


def open_nvml() -> Nvml | None:
    """The fake when EVALORCH_FAKE_NVML is set, else the real NVML, or None on a machine without an NVIDIA driver."""
    fake = os.environ.get(FAKE_ENV)
    if fake:
        return FakeNvml(Path(fake))  # a bad fake file is an error, never silently the real GPUs
    try:
        return RealNvml()
    except NvmlUnavailable:
        return None


def default_device(nvml: Nvml | None) -> str:
    """`--device auto`: cuda where the driver sees a GPU, else cpu."""
    return "cuda" if nvml is not None and nvml.device_count() > 0 else "cpu"
