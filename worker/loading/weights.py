"""Reading safetensors files onto the device at host-to-device speed.

transformers' own loader materialises each tensor from a memory map and copies it to the GPU from pageable memory:
about 4-7 GB/s on an H100 host, whatever the page cache holds. Copies from pinned memory run at about 55 GB/s. So
here several threads read the files (from the page cache a held worker warmed) into pinned staging buffers and copy
them asynchronously, each on its own CUDA stream, into tensors allocated on the device up front; transformers then
builds the model from that state dict (`from_pretrained(state_dict=...)`), keeping its key renaming, tied weights and
dtype rules. Tensors whose dtype is not the one the model is loaded in are left to transformers as lazy safetensors
slices, so that its per-module dtype rules (e.g. modules kept in float32) apply to them exactly as before.

On a CPU the same plan reads straight into the destination tensors (no staging); what a GPU does differently (pinned
buffers, copy streams, events) is worker/device.py's, so a simulated GPU runs the staging on a CPU too.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from contract.checkpoint import CheckpointError, safetensors_header
from contract.recipe import run_dtype
from worker.device import Device
from worker.errors import WorkerError

# safetensors' dtype names; anything else is left to transformers as a lazy slice
_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# Reading from the page cache scales with threads up to about 16 at 16-32 MB chunks (larger chunks are slower: fewer
# chunks to spread over the threads); docs/benchmarks-history.md has the measurement
THREADS = min(16, os.cpu_count() or 4)
CHUNK_BYTES = 16 << 20  # one staging read; two per thread, so a thread reads one while the other copies


class UnstageableError(Exception):
    """A file this reader cannot stage (a dtype it does not know); transformers' own reader takes it."""


@dataclass(frozen=True)
class Span:
    """One tensor in a safetensors file: where its bytes are, and what they are."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int


@dataclass
class Piece:
    """A part of one tensor's bytes that sits inside one chunk."""

    target: torch.Tensor  # the destination tensor's bytes, flat uint8
    target_offset: int
    chunk_offset: int
    nbytes: int


@dataclass
class Chunk:
    """A contiguous byte range of one file, read with one call, and the tensor pieces it fills."""

    path: Path
    start: int
    nbytes: int
    pieces: list[Piece] = field(default_factory=list)


@dataclass
class LoadedWeights:
    """A state dict for from_pretrained: device tensors, plus lazy slices for what transformers must convert."""

    state_dict: dict[str, Any]
    fast_bytes: int  # bytes read by the staged readers
    lazy_names: list[str]  # tensors left to transformers
    handles: list[Any]  # open safe_open handles the lazy slices read from; close() them after loading

    def close(self) -> None:
        for handle in self.handles:
            handle.__exit__(None, None, None)
        self.handles.clear()


def read_spans(path: Path) -> list[Span]:
    """The tensors of a safetensors file with absolute offsets; a dtype this module cannot stage raises
    UnstageableError."""
    try:
        header = safetensors_header(path)
    except CheckpointError as exc:
        raise WorkerError("lineage", str(exc)) from None
    base = header.data_start
    spans = []
    for name, info in header.tensors.items():
        begin, end = info["data_offsets"]
        if info["dtype"] not in _DTYPES:
            raise UnstageableError(f"{path.name}: tensor {name} has dtype {info['dtype']}")
        spans.append(Span(name, _DTYPES[info["dtype"]], tuple(info["shape"]), base + begin, end - begin))
    return sorted(spans, key=lambda s: s.start)


def load_safetensors(paths: list[Path], device: Device, dtype: torch.dtype, *, threads: int = THREADS,
                     chunk_bytes: int = CHUNK_BYTES) -> LoadedWeights:
    """Every tensor of `paths`: those already in `dtype` (or not floating point) read onto `device` by staged
    threads, the others as safetensors slices for transformers to convert."""
    state_dict: dict[str, Any] = {}
    lazy: dict[Path, list[str]] = {}
    fast: list[tuple[Path, Span, torch.Tensor]] = []
    for path in paths:
        for span in read_spans(path):
            if span.dtype.is_floating_point and span.dtype != dtype:
                lazy.setdefault(path, []).append(span.name)
                continue
            tensor = torch.empty(span.shape, dtype=span.dtype, device=device.tensors)
            state_dict[span.name] = tensor
            fast.append((path, span, tensor))
    chunks = list(plan_chunks(fast, chunk_bytes))
    if chunks:
        _run_chunks(chunks, device, threads, chunk_bytes)
    handles = []
    for path, names in lazy.items():
        handle = safe_open(str(path), framework="pt", device="cpu")
        handles.append(handle)
        state_dict.update({name: handle.get_slice(name) for name in names})
    return LoadedWeights(state_dict, sum(s.nbytes for _, s, _ in fast), sorted(n for v in lazy.values() for n in v),
                         handles)


def plan_chunks(tensors: list[tuple[Path, Span, torch.Tensor]], chunk_bytes: int) -> Iterator[Chunk]:
    """Group file-ordered tensors into reads of at most chunk_bytes; a tensor larger than that spans several."""
    current: Chunk | None = None
    for path, span, tensor in tensors:
        if span.nbytes == 0:
            continue
        flat = tensor.view(-1).view(torch.uint8) if tensor.dim() else tensor.reshape(1).view(torch.uint8)
        done = 0
        while done < span.nbytes:
            offset = span.start + done
            if (current is None or current.path != path or current.start + current.nbytes != offset
                    or current.nbytes >= chunk_bytes):
                if current is not None:
                    yield current
                current = Chunk(path, offset, 0)
            take = min(span.nbytes - done, chunk_bytes - current.nbytes)
            current.pieces.append(Piece(flat, done, current.nbytes, take))
            current.nbytes += take
            done += take
    if current is not None:
        yield current


def _run_chunks(chunks: list[Chunk], device: Device, threads: int, chunk_bytes: int) -> None:
    """Read and place every chunk, `threads` at a time; on a GPU through per-thread pinned buffers and streams."""
    fds = {path: os.open(path, os.O_RDONLY) for path in {c.path for c in chunks}}
    local = threading.local()
    streams: list[Any] = []
    lock = threading.Lock()

    def place(chunk: Chunk) -> None:
        if not device.is_gpu:
            for piece in chunk.pieces:
                _pread_into(fds[chunk.path], piece.target[piece.target_offset: piece.target_offset + piece.nbytes],
                            chunk.start + piece.chunk_offset)
            return
        if not hasattr(local, "stager"):
            local.stager = _Stager(device, chunk_bytes)
            with lock:
                streams.append(local.stager.stream)
        local.stager.place(fds[chunk.path], chunk)

    try:
        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="weights") as pool:
            for _ in pool.map(place, chunks):
                pass
        for stream in streams:
            stream.synchronize()
    finally:
        for fd in fds.values():
            os.close(fd)


class _Stager:
    """One reader thread's two pinned buffers and its stream: read into one while the other's copy is in flight."""

    def __init__(self, device: Device, chunk_bytes: int) -> None:
        self.device = device
        self.stream = device.copy_stream()
        self.buffers = [device.host_buffer(chunk_bytes) for _ in range(2)]
        self.events: list[Any] = [None, None]
        self.turn = 0

    def place(self, fd: int, chunk: Chunk) -> None:
        slot, self.turn = self.turn, 1 - self.turn
        if self.events[slot] is not None:
            self.events[slot].synchronize()  # that buffer's previous copy has left it
        buffer = self.buffers[slot]
        _pread_into(fd, buffer[: chunk.nbytes], chunk.start)
        with self.device.on_stream(self.stream):
            for piece in chunk.pieces:
                target = piece.target[piece.target_offset: piece.target_offset + piece.nbytes]
                target.copy_(buffer[piece.chunk_offset: piece.chunk_offset + piece.nbytes], non_blocking=True)
        self.events[slot] = self.device.mark(self.stream)


def _pread_into(fd: int, target: torch.Tensor, offset: int) -> None:
    """Fill a CPU uint8 tensor from the file at `offset`, however many calls the kernel needs."""
    view = target.numpy().data.cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(f"unexpected end of file at byte {offset + done} (the file is shorter than its header says)")
        done += got


def read_through(paths: list[Path], *, threads: int = 8, block: int = CHUNK_BYTES) -> int:
    """Read every byte of `paths` once, `threads` at a time, into throw-away buffers: what is on disk lands in the
    page cache (a held worker does this before it may touch the GPU). Fewer threads than a load uses: another
    worker is running meanwhile. Returns the bytes read."""
    fds = {path: os.open(path, os.O_RDONLY) for path in paths}
    local = threading.local()

    def read(job: tuple[Path, int]) -> int:
        if not hasattr(local, "buffer"):
            local.buffer = bytearray(block)
        return os.preadv(fds[job[0]], [local.buffer], job[1])

    jobs = [(path, offset) for path in paths for offset in range(0, os.fstat(fds[path]).st_size, block)]
    try:
        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="page-cache") as pool:
            return sum(pool.map(read, jobs))
    finally:
        for fd in fds.values():
            os.close(fd)


_RUN_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(name: str, device: Device) -> torch.dtype:
    """The torch dtype a recipe's `dtype` setting runs in on `device`."""
    return _RUN_DTYPES[run_dtype(name, device.settings)]


def root_weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files a root checkpoint's weights are staged from (one home for the pattern)."""
    return sorted(Path(folder).glob("model*.safetensors"))
