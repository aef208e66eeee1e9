"""Writing and reading the run folder's files durably (its layout, every name in it: contract/layout.py).

Sample lines are flushed to the OS as they arrive and fsynced at least once a second, so a crash of the
worker or of the parent loses nothing already received.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import orjson

from contract.layout import stamped_folder

_FSYNC_EVERY_S = 1.0


def write_json(path: Path, data: Any) -> None:
    """Atomically: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return orjson.loads(path.read_bytes())


def new_run_dir(out: Path) -> Path:
    """runs/<UTC time>/, created."""
    return stamped_folder(out)


class SampleLog:
    """Appends one recipe's sample records to samples.jsonl."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "ab")  # noqa: SIM115 - held open for the recipe's life, closed in close()
        self._last_sync = time.monotonic()
        self.count = 0

    def append(self, record: dict[str, Any]) -> None:
        self._file.write(orjson.dumps(record) + b"\n")
        self._file.flush()
        self.count += 1
        if time.monotonic() - self._last_sync >= _FSYNC_EVERY_S:
            self.sync()

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()


def read_samples(path: Path) -> list[dict[str, Any]]:
    """Every complete record of a samples.jsonl, the first of each id; a truncated last line is ignored."""
    if not path.exists():
        return []
    records, seen = [], set()
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # only a cut-off last line can be malformed: we write whole lines
        if record.get("id") not in seen:
            seen.add(record.get("id"))
            records.append(record)
    return records


def repair_samples(path: Path) -> list[dict[str, Any]]:
    """Cut a line left half-written by a crash off the end of samples.jsonl (so appends start on a fresh
    line), and return the complete records."""
    if path.exists():
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with open(path, "r+b") as f:
                f.truncate(end)
    return read_samples(path)
