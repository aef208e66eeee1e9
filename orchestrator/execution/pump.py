"""The one loop through which the parent hears a worker: read its result pipe to the end, decode each line into a
protocol message (contract/messages.py), and between reads let the reader act on the clock and the user.

An evaluation worker is read so by supervisor.RecipeRun (its messages become the recipe's record; the tick acts
on interrupts and phase timeouts), the merge worker by merge.py (its last message is its answer; the tick stops
it past --timeout). The worker may run here or on a Ray node: the pump sees only its WorkerHandle.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from contract import messages
from orchestrator.execution.process import WorkerHandle

PIPE_WAIT_S = 0.5  # how long one read waits for the pipe: how often the reader's tick runs while the worker is silent


class StreamReader(Protocol):
    """What the pump hands a worker's stream to."""

    def on_message(self, message: dict[str, Any]) -> None:
        """A protocol message, decoded (its "type" included)."""

    def on_unreadable(self, problem: str) -> None:
        """A line that is no protocol message, and why."""

    def on_tick(self, now: float, last_message: float) -> None:
        """After each read (`now`, and when the last bytes came, both time.monotonic()): act on limits and
        interrupts, e.g. stop the worker; raising ends the pump."""


def pump(worker: WorkerHandle, reader: StreamReader, since: float) -> bytes:
    """Feed `reader` the worker's messages until its result pipe closes (`since`: when the worker was last heard
    of, for the first tick). Returns the bytes of a last line the stream cut off mid-way, b"" when none."""
    splitter = messages.LineSplitter()
    last_message = since
    while (chunk := worker.read_results(wait=PIPE_WAIT_S)) is not None:
        now = time.monotonic()
        if chunk:
            last_message = now
            for line in splitter.feed(chunk):
                _deliver(line, reader)
        reader.on_tick(now, last_message)
    return splitter.pending if splitter.pending.strip() else b""


def _deliver(line: bytes, reader: StreamReader) -> None:
    try:
        message = messages.decode(line)
    except messages.ProtocolError as exc:
        reader.on_unreadable(str(exc))
        return
    reader.on_message(message)
