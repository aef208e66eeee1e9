"""The messages that cross the process boundary, defined once for both sides.

Worker -> parent: JSON lines on a dedicated pipe (never stdout: libraries print there).
Parent -> worker: JSON lines on the worker's stdin, which doubles as the lifeline (EOF = the parent is gone).
Parent -> worker at start: the spec file (contract/spec.py).
"""

from __future__ import annotations

import os
from typing import Any

import orjson

PROTOCOL_VERSION = 1

# Worker -> parent message types, and the fields each must carry.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "hello": ("version", "pid", "versions", "device"),
    "lineage": ("links",),
    "ready": ("seconds",),  # a held worker has done everything short of touching the GPU (spec.hold)
    "loaded": ("seconds", "attn", "dtype", "device", "placement_ok"),
    "sample": ("id", "status", "pred", "gt", "iou", "detected", "text", "seconds"),
    "done": ("counts", "timings"),
    "error": ("kind", "message"),
    "merged": ("record",),  # worker.merge: the checkpoint is written; what its lineage.json records
}
ERROR_KINDS = ("config", "lineage", "memory", "offload", "cuda_oom", "data", "internal")

# Parent -> worker control messages (JSON lines on the worker's stdin).
CONTROL_STOP = "stop"  # finish the current batch, send `done`, exit
CONTROL_GO = "go"  # a held worker may load onto the device now; may carry "batch_size"
DECODE_GRAPH_ON = "cuda graph"  # `loaded`'s decode_graph where decode steps replay from CUDA graphs


def control(type_: str, **fields: Any) -> bytes:
    """A parent -> worker control line."""
    return encode({"type": type_, **fields})


class ProtocolError(Exception):
    """A line from the worker that is not a valid message."""


def encode(message: dict[str, Any]) -> bytes:
    """One message as one line."""
    return orjson.dumps(message) + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """Parse and check one line; raise ProtocolError naming what is wrong."""
    try:
        message = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"not JSON: {line[:200]!r} ({exc})") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"not a JSON object: {line[:200]!r}")
    kind = message.get("type")
    if kind not in REQUIRED_FIELDS:
        raise ProtocolError(f"unknown message type {kind!r}: {line[:200]!r}")
    missing = [name for name in REQUIRED_FIELDS[kind] if name not in message]
    if missing:
        raise ProtocolError(f"{kind} message lacks {', '.join(missing)}: {line[:200]!r}")
    if kind == "hello" and message["version"] != PROTOCOL_VERSION:
        raise ProtocolError(f"worker speaks protocol {message['version']}, parent {PROTOCOL_VERSION}")
    return message


class LineSplitter:
    """Turns the chunks read from a pipe into complete lines; keeps a partial last line for later."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._pending + chunk
        *lines, self._pending = data.split(b"\n")
        return [line for line in lines if line.strip()]

    @property
    def pending(self) -> bytes:
        """Bytes after the last newline: non-empty at EOF means the stream was cut mid-line."""
        return self._pending


class MessageWriter:
    """The worker's end of the result pipe: unbuffered, one write per message."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def send(self, type_: str, **fields: Any) -> None:
        self.write_raw(encode({"type": type_, **fields}))

    def write_raw(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def close(self) -> None:
        os.close(self._fd)
