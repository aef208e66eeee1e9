"""Exit codes: of `python -m orchestrator` (what CI acts on) and of the worker processes it starts."""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    """`python -m orchestrator`'s exit codes."""

    OK = 0  # every recipe evaluated (and every gate passed)
    RECIPE_FAILED = 1  # a recipe failed, was refused, or errored on too many samples
    USAGE = 2  # usage or configuration error: nothing was evaluated
    GATE_FAILED = 3  # a quality gate failed (--fail-under, --compare)
    INTERRUPTED = 130  # Ctrl-C or SIGTERM


class WorkerExit(IntEnum):
    """A worker's own exit codes (a signal shows as a negative return code instead)."""

    OK = 0
    FAILED = 1  # it sent an `error` message first
    LIFELINE_LOST = 3  # its stdin closed: the parent is gone
