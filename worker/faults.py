"""Test-only fault injection: one object the worker's entry point installs, whose named points the product calls.

The entry points (worker/__main__.py, worker/merge.py) call `install_from_env` once, with the recipe, the attempt
and the result stream; everything else asks `points()` for the installed object and calls a named point
(`before_load`, `before_merge`, `before_sample`, `parity_text`). Without EVALORCH_FAULT (and in any process whose
entry point installed nothing: a test calling the inference in-process) the object is `NoFaults`, which does
nothing, so no product signature carries a test hook.

    EVALORCH_FAULT="raise@sample:2,garbage-stdout"
    EVALORCH_FAULT="r1-llm-only:raise@sample:2"      (only the worker of that recipe)

    EVALORCH_FAULT="r1:segv@sample:3#1"                (only on the recipe's first attempt)

Points: `load` (before weights load), `merge` (before `python -m worker.merge` loads the chain), `sample:N`
(before the N-th sample of this attempt, counting from 1, is sent), `each` (before every sample), `parity:N`
(the N-th sample the batch-parity check generates alone). Actions: raise, segv, abort, hang, exit (exit 0 without
`done`), bad-line (a malformed result line), delay (sleep 0.5 s), alter (at parity:N: change the text generated
alone, so that it disagrees with the batched one), garbage-stdout (junk on stdout at every point, which must not
disturb the result stream), open-gate (create the file EVALORCH_FAULT_GATE names) and gate (wait until that file
exists, at most GATE_TIMEOUT_S, then raise): one recipe's worker waits at a point until another's has reached one,
so a test of workers running at once does not depend on their timing.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Protocol

ENV_VAR = "EVALORCH_FAULT"
GATE_ENV = "EVALORCH_FAULT_GATE"
GATE_TIMEOUT_S = 120.0

WriteRaw = Callable[[bytes], None]  # writes bytes onto the result stream as they are (a bad-line fault's line)


class FaultPoints(Protocol):
    """The points where the worker lets a test's fault in; each returns normally unless a fault is planned there."""

    def before_load(self) -> None: ...

    def before_merge(self) -> None: ...

    def before_sample(self, number: int) -> None:
        """Before the `number`-th sample of this attempt (counting from 1) is sent."""

    def parity_text(self, number: int, text: str) -> str:
        """The text the batch-parity check compares for its `number`-th sample, given the text generated alone."""


class NoFaults:
    """The product's points: nothing happens at any of them."""

    def before_load(self) -> None:
        pass

    def before_merge(self) -> None:
        pass

    def before_sample(self, number: int) -> None:
        pass

    def parity_text(self, number: int, text: str) -> str:
        return text


class Faults:
    """The faults an EVALORCH_FAULT spec plans for one recipe's attempt; `write_raw` takes a bad-line fault's line."""

    def __init__(self, spec: str, recipe: str, attempt: int, write_raw: WriteRaw) -> None:
        self.rules: dict[str, str] = {}
        self.garbage = False
        self.write_raw = write_raw
        for item in filter(None, (s.strip() for s in spec.split(","))):
            target, colon, rest = item.partition(":")
            if colon and "@" not in target:  # "recipe:action@point" applies to that recipe only
                if target != recipe:
                    continue
                item = rest
            item, _, only_attempt = item.partition("#")
            if only_attempt and int(only_attempt) != attempt:
                continue
            if item == "garbage-stdout":
                self.garbage = True
                continue
            action, _, point = item.partition("@")
            self.rules[point] = action

    def before_load(self) -> None:
        self.hit("load")

    def before_merge(self) -> None:
        self.hit("merge")

    def before_sample(self, number: int) -> None:
        self.hit(f"sample:{number}")

    def parity_text(self, number: int, text: str) -> str:
        """Changed where `alter@parity:N` says."""
        return text + " (altered by EVALORCH_FAULT)" if self.rules.get(f"parity:{number}") == "alter" else text

    def hit(self, point: str) -> None:
        """Carry out what is planned at `point` (a hang's stack names this function: tests look for it)."""
        if self.garbage:
            print('{"type": "sample", "id": "fake"} <- garbage on stdout', flush=True)
            sys.stdout.write("\x00\xff not json\n")
            sys.stdout.flush()
        if self.rules.get("each") == "delay" and point.startswith("sample:"):
            time.sleep(0.5)
        action = self.rules.get(point)
        if action is None:
            return
        if action == "raise":
            raise RuntimeError(f"fault injected at {point}")
        if action == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        if action == "abort":
            os.abort()
        if action == "hang":
            while True:
                time.sleep(60)
        if action == "exit":
            os._exit(0)
        if action == "bad-line":
            self.write_raw(b"{this is not json\n")
        if action in ("gate", "open-gate"):
            _gate(action, point)


_installed: FaultPoints = NoFaults()


def install_from_env(recipe: str, attempt: int, write_raw: WriteRaw) -> FaultPoints:
    """Install the faults EVALORCH_FAULT plans for this recipe's attempt (none where it is unset); return them.
    Called once, by the worker's entry point."""
    global _installed
    spec = os.environ.get(ENV_VAR, "")
    _installed = Faults(spec, recipe, attempt, write_raw) if spec else NoFaults()
    return _installed


def points() -> FaultPoints:
    """The installed fault points (NoFaults unless the entry point installed EVALORCH_FAULT's)."""
    return _installed


def _gate(action: str, point: str) -> None:
    gate = os.environ[GATE_ENV]
    if action == "open-gate":
        open(gate, "a").close()
        return
    deadline = time.monotonic() + GATE_TIMEOUT_S
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise RuntimeError(f"fault gate at {point}: {gate} was not opened within {GATE_TIMEOUT_S:g}s")
        time.sleep(0.05)
