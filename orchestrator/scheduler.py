"""Every allowed GPU of the host at once (`run --gpus all`, `--gpus 0,2,3`): one lane per GPU, one worker per lane.

Each lane is a Suite pinned to its GPU (supervisor.py): the same preflight (asked for that GPU), release wait,
timeouts, retries and records as one worker at a time. A lane's current recipe runs in a thread: supervising a
worker is waiting on its pipe, so threads suffice, and signal handlers stay in the main thread, where they only
set the flags every RecipeRun already reads.

Placement, each time a lane is idle: the largest estimate first, onto the idle GPU with the most free memory
that fits it (see `place`). Rows come back in the recipe file's order, whatever order the recipes finished in.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .memory import EstimateError, read_workload
from .plan import RecipePlan
from .preflight import GpuPreflight
from .supervisor import Interrupts, Listener, RecipeOutcome, Suite, SuiteOptions

_TICK_S = 0.1  # how often the main thread looks at the lanes (and lets signal handlers run)


@dataclass(frozen=True)
class Job:
    """A recipe waiting for a GPU: `need` is its smallest footprint in bytes (weights, context, a batch of one,
    margin), 0 when it cannot be estimated (it fits anywhere; the worker's placement check still guards)."""

    name: str
    need: int


def place(jobs: Sequence[Job], free: Mapping[int, int], idle: Collection[int]) -> list[tuple[Job, int]]:
    """Which waiting jobs start now, and where. Largest need first (file order among equals), each onto the idle
    GPU with the most free memory that fits it (the lowest index among equals). A job that fits only busy GPUs
    waits for one, and smaller jobs may take the idle GPUs meanwhile: being first in line, it gets the GPU it
    fits as soon as that is idle. A job that fits no GPU goes to the one with the most free memory, where the
    preflight refuses it with the reasons. `free` covers every GPU; for a busy one, what it had when idle."""
    open_gpus = set(idle)
    placed = []
    for job in sorted(jobs, key=lambda j: -j.need):  # sorted() is stable: file order among equal needs
        fitting = [g for g in free if free[g] >= job.need] or [max(free, key=lambda g: (free[g], -g))]
        candidates = [g for g in fitting if g in open_gpus]
        if candidates:
            gpu = max(candidates, key=lambda g: (free[g], -g))
            placed.append((job, gpu))
            open_gpus.discard(gpu)
    return placed


def runs_concurrently(preflight: GpuPreflight | None, gpus_option: str | None) -> bool:
    """Several workers at once only when asked for (`--gpus all` or a list) and more than one GPU is allowed;
    without --gpus, one worker at a time on the GPU with the most free memory, as before."""
    return preflight is not None and gpus_option is not None and len(preflight.gpus) > 1


class _Lane:
    """One GPU: its Suite, and the recipe running there now (in a thread), if any."""

    def __init__(self, gpu: int, suite: Suite, free: int) -> None:
        self.gpu = gpu
        self.suite = suite
        self.free = free  # its expected free memory when last idle: what placement compares
        self.thread: threading.Thread | None = None
        self.name: str | None = None
        self.row: dict[str, Any] | None = None
        self.error: BaseException | None = None

    @property
    def busy(self) -> bool:
        return self.thread is not None

    def start(self, plan: RecipePlan) -> None:
        self.name, self.row, self.error = plan.recipe.name, None, None
        self.thread = threading.Thread(target=self._run, args=(plan,), name=f"evalorch-gpu{self.gpu}", daemon=True)
        self.thread.start()

    def _run(self, plan: RecipePlan) -> None:
        try:
            self.row = self.suite.run_recipe(plan)
        except BaseException as exc:  # raised again in the main thread, once the other lanes are done
            self.error = exc

    def finished(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()

    def collect(self) -> tuple[str, dict[str, Any] | None, BaseException | None]:
        assert self.thread is not None and self.name is not None
        self.thread.join()
        done = (self.name, self.row, self.error)
        self.thread, self.name = None, None
        return done


class GpuScheduler:
    """Runs the suite with one worker per allowed GPU at once; the same outputs as Suite.run()."""

    def __init__(self, plans: list[RecipePlan], run_dir: Path, options: SuiteOptions, *, preflight: GpuPreflight,
                 listener: Listener | None = None, interrupts: Interrupts | None = None) -> None:
        self.plans = plans
        self.preflight = preflight
        self.listener = listener or (lambda *_: None)
        self.interrupts = interrupts or Interrupts()
        # Recipes that need no GPU (kept by --resume, a lineage error, skipped) are recorded by a plain Suite.
        self.suite = Suite(plans, run_dir, options, listener=self.listener, preflight=preflight,
                           interrupts=self.interrupts)
        # A held worker assumes the next recipe goes to the same GPU; with lanes that is rarely so: no prestart.
        lane_options = replace(options, prestart=False)
        self.lanes = {gpu: _Lane(gpu, Suite(plans, run_dir, lane_options, listener=_tagged(self.listener, gpu),
                                            preflight=preflight, interrupts=self.interrupts, gpu=gpu),
                                 preflight.expected_free(gpu))
                      for gpu in preflight.gpus}

    def run(self) -> list[dict[str, Any]]:
        rows: dict[str, dict[str, Any]] = {}
        waiting: list[Job] = []
        for plan in self.plans:
            if plan.runnable and not self.suite.finished_before(plan):
                waiting.append(Job(plan.recipe.name, self._need(plan)))
            else:
                rows[plan.recipe.name] = self.suite.run_recipe(plan)
        errors = self._drive(waiting, rows)
        if errors:
            raise errors[0]
        return [rows[plan.recipe.name] for plan in self.plans]

    def _drive(self, waiting: list[Job], rows: dict[str, dict[str, Any]]) -> list[BaseException]:
        """Start recipes on idle lanes and collect finished ones until none waits or runs. After an interrupt
        nothing new starts (the waiting recipes are recorded as skipped); after a lane's exception neither."""
        plans = {plan.recipe.name: plan for plan in self.plans}
        errors: list[BaseException] = []
        while waiting or any(lane.busy for lane in self.lanes.values()):
            for lane in self.lanes.values():
                if lane.finished():
                    name, row, error = lane.collect()
                    if error is not None:
                        errors.append(error)
                    else:
                        rows[name] = row
            if self.interrupts.stop_requested and not errors:
                for job in waiting:
                    rows[job.name] = self.suite.run_recipe(plans[job.name])  # recorded as skipped
            if self.interrupts.stop_requested or errors:
                waiting = []
            for job, gpu in self._placements(waiting):
                waiting.remove(job)
                self.lanes[gpu].start(plans[job.name])
            time.sleep(_TICK_S)
        return errors

    def _placements(self, waiting: list[Job]) -> list[tuple[Job, int]]:
        idle = [gpu for gpu, lane in self.lanes.items() if not lane.busy]
        if not waiting or not idle:
            return []
        for gpu in idle:
            self.lanes[gpu].free = self.preflight.expected_free(gpu)
        return place(waiting, {gpu: lane.free for gpu, lane in self.lanes.items()}, idle)

    def _need(self, plan: RecipePlan) -> int:
        try:
            workload = read_workload(plan.recipe, plan.chain or [], self.preflight.device)
        except EstimateError:
            return 0
        return workload.estimate(1).total_bytes


def _tagged(listener: Listener, gpu: int) -> Listener:
    """The listener, told which GPU each event comes from (the progress display shows a line per GPU)."""

    def tagged(event: str, outcome: RecipeOutcome, data: dict[str, Any]) -> None:
        listener(event, outcome, {**data, "gpu": gpu})

    return tagged
