"""The one driver of recipes supervised at once: each placed recipe's Suite.run_recipe in a thread of its own, on
a lane, while the main thread places the next ones and keeps the signal handlers (which only set the flags every
RecipeRun reads). Supervising a worker is waiting on its pipe, so threads suffice.

A lane is where a recipe runs: a GPU of this host, by its NVML index (scheduler.py places recipes on those, one
or several at once on each), or a Ray lane, a placement-group bundle numbered in its run (backends/ray places
one recipe at a time on each). Its identity is a `Lane`; each lane has its Suite, whose events reach the listener
tagged with it (`tagged`: data["lane"]), so the progress display shows a line per worker and names its lane.
Where the waiting recipes go is the caller's `Placer`; the rest is the same for every lane: rows come back in the
recipe file's order, whatever order the recipes finished in; after an interrupt nothing new starts (the waiting
recipes are recorded as skipped); after a recipe thread's exception neither, and it is raised again once the
running ones are done.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from contract.run_row import RecipeRow
from orchestrator.execution.supervisor import TICK_S, Interrupts, Listener, RecipeOutcome, Suite
from orchestrator.planning.plan import RecipePlan


class LaneKind(Enum):
    """What a lane's index counts; the value is how the progress display names it."""

    GPU = "GPU"  # a GPU of this host: its NVML index
    RAY = "lane"  # a Ray lane (a placement-group bundle, on whichever node Ray finds it): its number in the run


@dataclass(frozen=True)
class Lane:
    """Where a recipe runs when several run at once (see the module's docstring)."""

    kind: LaneKind
    index: int

    @classmethod
    def gpu(cls, nvml_index: int) -> Lane:
        return cls(LaneKind.GPU, nvml_index)

    @classmethod
    def ray(cls, number: int) -> Lane:
        return cls(LaneKind.RAY, number)

    @property
    def label(self) -> str:
        """"GPU 2", "lane 1": how progress lines name it."""
        return f"{self.kind.value} {self.index}"

    @property
    def slug(self) -> str:
        """"gpu2", "ray1": for thread names."""
        return f"{self.kind.name.lower()}{self.index}"


def tagged(listener: Listener, lane: Lane,
           on_start: Callable[[RecipeOutcome, dict[str, Any]], None] | None = None) -> Listener:
    """The listener, told which lane each event comes from (data["lane"]); and `on_start` told each worker's
    `started` event (its pid) first."""

    def tagged_listener(event: str, outcome: RecipeOutcome, data: dict[str, Any]) -> None:
        if event == "started" and on_start is not None:
            on_start(outcome, data)
        listener(event, outcome, {**data, "lane": lane})

    return tagged_listener


class Placer(Protocol):
    """Where the waiting recipes go; asked in the main thread, once a tick."""

    def place(self, waiting: list[str], running: Mapping[str, Lane]) -> list[tuple[str, Lane]]:
        """Which of the waiting recipes (in the recipe file's order) start now, and on which lane; `running`: the
        lane of each recipe running now."""

    def ended(self, name: str) -> None:
        """`name` will use its lane no more: its thread ended, or it waited and was skipped."""


class _Running:
    """One recipe placed on a lane, supervised in its thread."""

    def __init__(self, lane: Lane, suite: Suite, plan: RecipePlan) -> None:
        self.lane = lane
        self.row: RecipeRow | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(suite, plan), daemon=True,
                                       name=f"evalorch-{lane.slug}-{plan.recipe.name}")
        self.thread.start()

    def _run(self, suite: Suite, plan: RecipePlan) -> None:
        try:
            self.row = suite.run_recipe(plan)
        except BaseException as exc:  # raised again in the main thread, once the other recipes are done
            self.error = exc

    def finished(self) -> bool:
        return not self.thread.is_alive()


class LaneDriver:
    """Runs `plans` on the lanes of `suites`, where `placer` puts them; the same rows as Suite.run(). Recipes that
    need no lane (kept by --resume, a lineage error) and those skipped after an interrupt are recorded by
    `recorder`, a Suite of no lane."""

    def __init__(self, plans: list[RecipePlan], suites: Mapping[Lane, Suite], recorder: Suite, placer: Placer,
                 interrupts: Interrupts) -> None:
        self.plans = {plan.recipe.name: plan for plan in plans}
        self.suites = suites
        self.recorder = recorder
        self.placer = placer
        self.interrupts = interrupts
        self.running: dict[str, _Running] = {}

    def run(self) -> list[RecipeRow]:
        rows: dict[str, RecipeRow] = {}
        waiting: list[str] = []
        for name, plan in self.plans.items():
            if plan.runnable and not self.recorder.finished_before(plan):
                waiting.append(name)
            else:
                rows[name] = self.recorder.run_recipe(plan)
        try:
            errors = self._drive(waiting, rows)
        finally:
            for suite in self.suites.values():
                suite.abandon_held()
        if errors:
            raise errors[0]
        return [rows[name] for name in self.plans]

    def _drive(self, waiting: list[str], rows: dict[str, RecipeRow]) -> list[BaseException]:
        """Place recipes and collect finished ones until none waits or runs."""
        errors: list[BaseException] = []
        while waiting or self.running:
            errors += self._collect(rows)
            if self.interrupts.stop_requested and not errors:
                for name in waiting:
                    self.placer.ended(name)
                    rows[name] = self.recorder.run_recipe(self.plans[name])  # recorded as skipped
            if self.interrupts.stop_requested or errors:
                waiting = []
            if waiting:
                lanes = {name: running.lane for name, running in self.running.items()}
                for name, lane in self.placer.place(list(waiting), lanes):
                    waiting.remove(name)
                    self.running[name] = _Running(lane, self.suites[lane], self.plans[name])
            time.sleep(TICK_S)
        return errors

    def _collect(self, rows: dict[str, RecipeRow]) -> list[BaseException]:
        """The rows of the recipes whose threads ended; the exceptions that ended any."""
        errors = []
        for name, running in list(self.running.items()):
            if running.finished():
                del self.running[name]
                self.placer.ended(name)
                if running.error is not None:
                    errors.append(running.error)
                else:
                    assert running.row is not None  # its thread ended without an exception: it has the row
                    rows[name] = running.row
        return errors
