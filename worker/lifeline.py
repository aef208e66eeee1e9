"""What every worker process (`python -m worker`, `python -m worker.merge`) sets up first: the lifeline on stdin,
the control lines that come on it, and faulthandler, so that a crash or the parent's traceback signal leaves
every thread's Python stack in the log."""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading

import orjson

from contract import messages
from contract.exits import WorkerExit

# The parent sends this before it kills a worker that timed out (orchestrator/execution/process.py TRACEBACK_SIGNAL).
TRACEBACK_SIGNAL = signal.SIGUSR1


class Control:
    """What the parent said on stdin: `stop` (finish the batch and end) and `go` (a held worker may load)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.go = threading.Event()
        self.go_fields: dict = {}

    def wait_for_go(self) -> dict:
        while not self.go.wait(0.5):
            if self.stop.is_set():
                return {}
        return self.go_fields


def start() -> Control:
    """Arm faulthandler (crashes, and TRACEBACK_SIGNAL: dump every thread's stack to stderr, the log, and carry
    on) and watch stdin in a daemon thread."""
    faulthandler.enable(file=sys.stderr, all_threads=True)
    faulthandler.register(TRACEBACK_SIGNAL, file=sys.stderr, all_threads=True, chain=False)
    control = Control()
    threading.Thread(target=_watch, args=(control,), daemon=True, name="lifeline").start()
    return control


def _watch(control: Control) -> None:
    """Read control lines from stdin; EOF means the parent died, so leave now (no orphan holding a GPU).
    Raw os.read, not sys.stdin: a daemon thread parked inside a buffered reader aborts interpreter shutdown."""
    splitter = messages.LineSplitter()
    while chunk := os.read(0, 4096):
        for line in splitter.feed(chunk):
            try:
                message = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if message.get("type") == messages.CONTROL_STOP:
                control.stop.set()
            elif message.get("type") == messages.CONTROL_GO:
                control.go_fields = message
                control.go.set()
    os._exit(WorkerExit.LIFELINE_LOST)
