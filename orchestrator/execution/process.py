"""Mechanics of one worker process: start it, read its result pipe, signal it, reap it, read its log's end. No
policy here.

The worker runs in its own session (process group), so a signal meant for the group reaches everything it
started, and the terminal's Ctrl-C reaches only the parent, which decides what the workers do.
The worker's stdin is a pipe the parent holds open: the lifeline. When the parent dies, for any reason, the
kernel closes it and the worker sees EOF and exits.

Stopping a worker that will not stop by itself (a timeout) escalates, as jupyter_client's kernel manager does:
first TRACEBACK_SIGNAL, on which the worker's faulthandler writes every thread's Python stack into its log (so
a hang says where it hung), then SIGKILL to the whole group after a grace period. Each step is returned, for
the recipe's summary.json.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

# The worker registers faulthandler on this signal (worker/lifeline.py): it dumps the stacks and carries on.
TRACEBACK_SIGNAL = signal.SIGUSR1
TRACEBACK_GRACE_S = 2.0  # after the dump, how long a worker may take to exit by itself before SIGKILL
LOG_TAIL_BYTES = 4000  # how much of the end of a worker's log its record keeps
_LINES_SPAN_BYTES = 1 << 16  # how far back from the end of a log its last lines are looked for

_SIGNAL_HINTS: dict[int, str] = {  # keyed by number: a Popen returncode is an int
    signal.SIGKILL: "killed by SIGKILL: perhaps the kernel's out-of-memory killer (see dmesg)",
    signal.SIGSEGV: "crashed with SIGSEGV (segmentation fault)",
    signal.SIGABRT: "crashed with SIGABRT (abort, often a failed assertion in native code)",
    signal.SIGBUS: "crashed with SIGBUS",
    signal.SIGILL: "crashed with SIGILL",
    signal.SIGFPE: "crashed with SIGFPE",
}


@dataclass
class ExitInfo:
    code: int | None  # the exit code, or None when killed by a signal
    signal: int | None
    description: str


def describe_exit(returncode: int) -> ExitInfo:
    """Decode a Popen returncode into words (gunicorn's arbiter does the same for its workers)."""
    if returncode >= 0:
        return ExitInfo(returncode, None, f"exited with code {returncode}")
    sig = -returncode
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    return ExitInfo(None, sig, _SIGNAL_HINTS.get(sig, f"killed by {name}"))


class WorkerHandle(Protocol):
    """What the parent drives a worker through, wherever it runs: a local WorkerProcess, or
    backends/ray/backend.RayWorkerProcess for one on a Ray node (whose pid, placement and environment come from its
    node, and may never come). Its life: started by a launcher (supervisor.Launcher), read to the end of its result
    pipe (`read_results`, through pump.py), told to go (`send` a control line, `kill`, `stop`), reaped (`wait`,
    `poll`: the returncode), then `cleanup`."""

    @property
    def pid(self) -> int | None: ...
    @property
    def where(self) -> dict | None: ...
    @property
    def env_record(self) -> dict | None: ...
    @property
    def lost(self) -> str | None: ...
    def read_results(self, wait: float = 0.0) -> bytes | None: ...
    def send(self, line: bytes) -> bool: ...
    def poll(self) -> int | None: ...
    def kill(self) -> None: ...
    def stop(self, reason: str, grace: float = TRACEBACK_GRACE_S) -> list[dict]: ...
    def wait(self, timeout: float) -> int | None: ...
    def cleanup(self) -> None: ...


class WorkerProcess:
    """A `python -m worker` (or `-m worker.merge`...) child with a result pipe, a lifeline and a log file.

    The parent drives a worker through this interface only (WorkerHandle, above); backends/ray's RayWorkerProcess
    implements it for a worker on a Ray node. What such a backend knows beyond it, a local process leaves None:"""

    where: dict | None = None  # the node and GPU the worker runs on
    env_record: dict | None = None  # the environment as built there (what was set, what was removed)
    lost: str | None = None  # why the node or its Ray worker is gone (then the process is beyond reach)

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, *, module: str = "worker") -> None:
        read_fd, write_fd = os.pipe()
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - the child writes here; closed in cleanup()
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", module, *args, "--result-fd", str(write_fd)],
                stdin=subprocess.PIPE,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=(write_fd,),
                start_new_session=True,
            )
        finally:
            os.close(write_fd)  # only the child holds the write end: its exit gives us EOF
        self.result_fd = read_fd
        os.set_blocking(read_fd, False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def _lifeline(self) -> IO[bytes]:
        """The worker's stdin, the pipe whose EOF tells it the parent is gone."""
        assert self.popen.stdin is not None  # started with stdin=subprocess.PIPE: Popen always opens it
        return self.popen.stdin

    def read_results(self, wait: float = 0.0) -> bytes | None:
        """Whatever the pipe holds, waiting up to `wait` seconds: b"" when nothing came, None at EOF."""
        if wait > 0:
            select.select([self.result_fd], [], [], wait)
        try:
            chunk = os.read(self.result_fd, 1 << 16)
        except BlockingIOError:
            return b""
        return chunk if chunk else None

    def send(self, line: bytes) -> bool:
        """Write a control line to the worker's stdin; False if it is gone."""
        try:
            self._lifeline.write(line)
            self._lifeline.flush()
            return True
        except (BrokenPipeError, ValueError, OSError):
            return False

    def poll(self) -> int | None:
        return self.popen.poll()

    def signal_group(self, sig: int) -> None:
        """Signal the worker and everything it started; harmless if they are gone."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)

    def stop(self, reason: str, grace: float = TRACEBACK_GRACE_S) -> list[dict]:
        """Escalate until the worker is gone: TRACEBACK_SIGNAL to the worker (its stacks go to its log), up to
        `grace` seconds for it to exit, then SIGKILL to its group. Returns the steps, each with when it was
        taken (seconds from the start of the stop) and whether the worker had exited by the end of it."""
        started = time.monotonic()
        steps = []
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.popen.pid, TRACEBACK_SIGNAL)  # the worker alone: its children have no such handler
            exited = self.wait(grace) is not None
            steps.append(_step(reason, "traceback", TRACEBACK_SIGNAL, started, exited))
        if self.popen.poll() is None:
            self.kill()
            exited = self.wait(5.0) is not None
            steps.append(_step(reason, "kill", signal.SIGKILL, started, exited))
        return steps

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def cleanup(self) -> None:
        """Kill what is left of the group, reap, close our ends. Safe to call twice."""
        if self.popen.poll() is None:
            self.kill()
            self.popen.wait()
        self.signal_group(signal.SIGKILL)  # grandchildren the worker left behind
        for closer in (self._lifeline.close, self._log.close):
            with contextlib.suppress(OSError):
                closer()
        if self.result_fd >= 0:
            os.close(self.result_fd)
            self.result_fd = -1  # never close a number the OS may since have given to another file


def _step(reason: str, action: str, sig: int, started: float, exited: bool) -> dict:
    return {"reason": reason, "action": action, "signal": signal.Signals(sig).name,
            "at_s": round(time.monotonic() - started, 3), "exited": exited}


def log_tail(path: Path, *, lines: int | None = None) -> str:
    """The end of a worker's log, for its record or an error message: its last `lines` lines, else its last
    LOG_TAIL_BYTES bytes; "" when the log cannot be read."""
    span = LOG_TAIL_BYTES if lines is None else _LINES_SPAN_BYTES
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - span))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return text if lines is None else "\n".join(text.splitlines()[-lines:])


def kill_step(reason: str) -> dict:
    """The record of an immediate SIGKILL (a second Ctrl-C): no traceback asked for."""
    return {"reason": reason, "action": "kill", "signal": "SIGKILL", "at_s": 0.0, "exited": None}
