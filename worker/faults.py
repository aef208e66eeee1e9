"""Test-only fault injection, read from EVALORCH_FAULT by the worker alone.

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

ENV_VAR = "EVALORCH_FAULT"
GATE_ENV = "EVALORCH_FAULT_GATE"
GATE_TIMEOUT_S = 120.0


class Faults:
    def __init__(self, spec: str, recipe: str = "", attempt: int = 1) -> None:
        self.rules: dict[str, str] = {}
        self.garbage = False
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

    @classmethod
    def from_env(cls, recipe: str, attempt: int) -> Faults:
        return cls(os.environ.get(ENV_VAR, ""), recipe, attempt)

    def alter_parity(self, number: int, text: str) -> str:
        """The parity check's text for its `number`-th sample, changed where `alter@parity:N` says."""
        return text + " (altered by EVALORCH_FAULT)" if self.rules.get(f"parity:{number}") == "alter" else text

    def hit(self, point: str, write_raw: Callable[[bytes], None]) -> None:
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
            write_raw(b"{this is not json\n")
        if action in ("gate", "open-gate"):
            _gate(action, point)


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
