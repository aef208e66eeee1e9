"""Writing and reading the run folder's files durably (its layout, every name in it: contract/layout.py).

Sample lines are written whole or not at all (a write cut short by a full disk is cut back off the file), as
they arrive, and fsynced at least once a second, so a crash of the worker or of the parent loses nothing already
received, and what is on disk always reads back. JSON files and reports are replaced atomically. A write that
fails (a full disk, a read-only or unwritable run folder) raises ResultsWriteError naming the path: the run stops
there, and `--resume` continues it once the folder can be written again. Every write passes the test-only write
faults (orchestrator/results/write_faults.py: EVALORCH_WRITE_FAULT), which fail none unless a test planned one.
"""

from __future__ import annotations

import os
import time
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from contract.exits import Exit
from contract.layout import stamped_folder
from contract.messages import REQUIRED_FIELDS
from orchestrator.errors import UserError
from orchestrator.results import write_faults

_FSYNC_EVERY_S = 1.0
Record = TypeVar("Record", bound=BaseModel)


class ResultsWriteError(UserError):
    """A file of the run folder cannot be written; the message names it and says why, and how to continue."""

    exit_code = Exit.RECIPE_FAILED

    def __init__(self, path: Path, reason: str, *, resume: Path | None = None) -> None:
        self.path, self.reason = path, reason
        message = f"cannot write {path}: {reason}"
        if resume is not None:
            message += (f". What was recorded before is intact; free space (or make {resume} writable), then "
                        f"continue with --resume {resume}")
        super().__init__(message)

    @classmethod
    def of(cls, path: Path, exc: OSError) -> ResultsWriteError:
        return cls(path, exc.strerror or str(exc))


def _write_all(fd: int, data: bytes, path: Path) -> None:
    """Write every byte of `data` (the kernel may take fewer per call); OSError when it cannot."""
    view, done = memoryview(data), 0
    failure = write_faults.installed().planned(path, len(data))
    while done < len(view):
        if failure is not None and done >= failure.written:
            raise OSError(failure.code, os.strerror(failure.code), str(path))
        end = len(view) if failure is None else failure.written
        done += os.write(fd, view[done:end])


def write_bytes(path: Path, data: bytes) -> None:
    """Atomically: a reader never sees half a file; a failed write leaves the previous file as it was."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data, path)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with suppress(OSError):
            tmp.unlink()
        raise ResultsWriteError.of(path, exc) from None


def write_json(path: Path, data: Any) -> None:
    """Atomically, as write_bytes."""
    write_bytes(path, orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))


class DamagedRunFile(UserError):
    """A file of a run folder that is not what evalorch writes (cut short, written over, edited): the message names
    the file, the line where there is one, and what is wrong. Nothing computed from it would be whole: exit 1."""

    exit_code = Exit.RECIPE_FAILED

    def __init__(self, path: Path, problem: str, line: int | None = None) -> None:
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}. Figures computed without it would not be whole, so none are: "
                         "restore the file from a copy, or evaluate again into a new run folder")


def read_json(path: Path) -> Any:
    """A JSON file of the run folder; DamagedRunFile where it is not whole JSON."""
    try:
        return orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise DamagedRunFile(path, f"not whole JSON ({exc})") from None


def read_record(path: Path, shape: type[Record]) -> Record:
    """A JSON file of the run folder read as `shape` (contract/run_row.py); DamagedRunFile naming the first field
    that has not its shape (a hand-edited or foreign file: a figure read from it would be a guess)."""
    try:
        return shape.model_validate(read_json(path))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the file"
        raise DamagedRunFile(path, f"{where}: {first['msg']}") from None


def make_folder(path: Path) -> Path:
    """The folder, created (with its parents) if need be; ResultsWriteError when it cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResultsWriteError.of(Path(exc.filename) if exc.filename else path, exc) from None
    return path


def new_folder(parent: Path, prefix: str = "") -> Path:
    """`parent/<prefix><UTC time>`, created; ResultsWriteError when it cannot be."""
    try:
        return stamped_folder(parent, prefix)
    except OSError as exc:
        raise ResultsWriteError.of(Path(exc.filename) if exc.filename else parent, exc) from None


def new_run_dir(out: Path) -> Path:
    """runs/<UTC time>/, created."""
    return new_folder(out)


class SampleLog:
    """Appends one recipe's sample records to samples.jsonl, each line whole or not at all."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._size = os.fstat(self._fd).st_size
        except OSError as exc:
            raise ResultsWriteError.of(path, exc) from None
        self._last_sync = time.monotonic()
        self._failed = False
        self.count = 0

    def append(self, record: dict[str, Any]) -> None:
        line = orjson.dumps(record) + b"\n"
        try:
            _write_all(self._fd, line, self.path)
        except OSError as exc:
            self._failed = True
            with suppress(OSError):  # cut the part-written line back off: the file ends on a whole line
                os.ftruncate(self._fd, self._size)
            raise ResultsWriteError.of(self.path, exc) from None
        self._size += len(line)
        self.count += 1
        if time.monotonic() - self._last_sync >= _FSYNC_EVERY_S:
            self.sync()

    def sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self._failed = True
            raise ResultsWriteError.of(self.path, exc) from None
        self._last_sync = time.monotonic()

    def close(self) -> None:
        """Sync and close; after a failed write only close (its error is the one that is raised)."""
        if self._fd < 0:
            return
        try:
            if not self._failed:
                self.sync()
        finally:
            os.close(self._fd)
            self._fd = -1


def read_samples(path: Path) -> list[dict[str, Any]]:
    """Every record of a samples.jsonl, the first of each id. What follows the last newline is a write a crash cut
    short (SampleLog writes whole lines), and is left out (`--resume` cuts it off); any other line that is not a
    whole sample record raises DamagedRunFile naming it."""
    if not path.exists():
        return []
    *whole, _cut_short = path.read_bytes().split(b"\n")
    records, seen = [], set()
    for number, line in enumerate(whole, 1):
        if not line.strip():
            continue
        record = _sample_record(path, number, line)
        if record["id"] not in seen:
            seen.add(record["id"])
            records.append(record)
    return records


def _sample_record(path: Path, number: int, line: bytes) -> dict[str, Any]:
    """One line of a samples.jsonl as the sample message it was (contract.messages: its required fields)."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise DamagedRunFile(path, "not a whole JSON line (cut short or written over)", number) from None
    if not isinstance(record, dict):
        raise DamagedRunFile(path, f"a JSON {type(record).__name__} where a sample record (an object) belongs",
                             number)
    missing = [name for name in REQUIRED_FIELDS["sample"] if name not in record]
    if missing:
        raise DamagedRunFile(path, f"not a sample record (no {', '.join(missing)})", number)
    return record


def repair_samples(path: Path) -> list[dict[str, Any]]:
    """Cut a line left half-written by a crash off the end of samples.jsonl (so appends start on a fresh
    line), and return the complete records."""
    if path.exists():
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            try:
                with open(path, "r+b") as f:
                    f.truncate(end)
            except OSError as exc:
                raise ResultsWriteError.of(path, exc) from None
    return read_samples(path)
