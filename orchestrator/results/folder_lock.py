"""A run folder has one writer: `run`, `run --resume` and `merge` hold an exclusive advisory lock on it while they
write (flock on its lock file, contract/layout.py). The kernel releases it when the process ends, however it ends,
so a crash leaves no stale lock; a second writer is told who holds it instead of evaluating the same recipes twice
into one samples.jsonl."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestrator.errors import UserError
from orchestrator.results.store import ResultsWriteError


class FolderBusy(UserError):
    """Another process writes the folder now (a usage error: exit 2, nothing evaluated)."""


@contextmanager
def writing(lock_file: Path, what: str) -> Iterator[None]:
    """Hold `lock_file`'s exclusive lock while the block runs; FolderBusy, naming the holder, where another process
    holds it. `what` says what this process does there (written into the file for the next one to read)."""
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by the workers (O_CLOEXEC)
    except OSError as exc:
        raise ResultsWriteError.of(lock_file, exc) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process that did not say"
            raise FolderBusy(f"{lock_file.parent} is being written by another evalorch ({holder}). Wait for it "
                             "to finish (or stop it), or write elsewhere (another --out)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, {what}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays, empty of meaning until the next writer rewrites it
