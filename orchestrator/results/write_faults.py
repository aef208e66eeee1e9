"""Test-only write faults, for the parent alone (as worker/faults.py's EVALORCH_FAULT is for the worker).

The parent's entry point (orchestrator/cli.py) calls `install_from_env` once; the run folder's writer
(orchestrator/results/store.py) asks the installed object, before each write, whether that write is to fail. Without
EVALORCH_WRITE_FAULT (and in any process whose entry point installed nothing) no write fails.

    EVALORCH_WRITE_FAULT="samples.jsonl:5"         the 5th write to a file of that name writes half its bytes,
                                                   then fails with ENOSPC (no space left on device)
    EVALORCH_WRITE_FAULT="summary.json:1:EROFS"    another errno
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

ENV_VAR = "EVALORCH_WRITE_FAULT"


@dataclass(frozen=True)
class PlannedFailure:
    """A write that stops after `written` bytes with OSError(`code`)."""

    written: int
    code: int


@dataclass
class WriteFaults:
    """The writes an EVALORCH_WRITE_FAULT spec fails: (file name, its n-th write in this process) -> errno's name."""

    rules: dict[tuple[str, int], str] = field(default_factory=dict)
    writes: dict[str, int] = field(default_factory=dict)  # file name -> writes so far in this process

    @classmethod
    def parse(cls, spec: str) -> WriteFaults:
        rules: dict[tuple[str, int], str] = {}
        for rule in filter(None, (r.strip() for r in spec.split(","))):
            name, _, rest = rule.partition(":")
            number, _, code = rest.partition(":")
            if number.isdigit():
                rules.setdefault((name, int(number)), code or "ENOSPC")
        return cls(rules)

    def planned(self, path: Path, size: int) -> PlannedFailure | None:
        """How this write of `size` bytes to `path` fails, or None: it does not."""
        if not self.rules:
            return None
        self.writes[path.name] = count = self.writes.get(path.name, 0) + 1
        code = self.rules.get((path.name, count))
        return None if code is None else PlannedFailure(size // 2, getattr(errno, code))


_installed = WriteFaults()


def install_from_env() -> WriteFaults:
    """Install the write faults EVALORCH_WRITE_FAULT plans (none where it is unset); return them."""
    global _installed
    _installed = WriteFaults.parse(os.environ.get(ENV_VAR, ""))
    return _installed


def installed() -> WriteFaults:
    """The installed write faults (none unless the entry point installed EVALORCH_WRITE_FAULT's)."""
    return _installed
