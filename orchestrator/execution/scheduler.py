"""Several workers at once on the GPUs of one host: one per GPU (`run --gpus all`, `--gpus 0,2,3`), several on one
GPU where its memory takes them (`--max-workers-per-gpu`), or both.

Each recipe still runs in its own fresh worker with its own CUDA context, supervised by a Suite pinned to its GPU
(supervisor.py) in a thread of its own, each GPU a lane of lanes.LaneDriver: the same preflight (asked for that
GPU), release wait, timeouts, retries and records as one worker at a time.

Placement, each tick (see `place`): the largest estimate first. A GPU with no worker of this run takes a recipe
whose smallest footprint fits what it will have free (there its preflight may lower the batch, or refuse naming
the holders); a GPU with workers of this run and a free slot takes one more when its free memory less what those
workers will still take (GpuPreflight.room) fits the recipe's estimate at its full batch. A GPU of its own is
preferred to a shared one. The main thread admits each placed recipe to the preflight before its thread starts,
so two placements never count on the same memory. Each row names the recipes whose workers ran at the same time
(`concurrent_with`).

With one GPU, the next recipes' workers are started ahead while it is full (held: imports, data, page cache, no
device), as Suite does with one worker at a time, and released when their recipe is placed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from contract.run_row import RecipeRow
from contract.spec import GPU_WORKER_THREADS
from orchestrator.execution.lanes import Lane, LaneDriver, tagged
from orchestrator.execution.supervisor import Interrupts, Listener, Overlaps, RecipeOutcome, Suite, SuiteOptions
from orchestrator.gpu.preflight import GpuPreflight
from orchestrator.planning.plan import RecipePlan


@dataclass(frozen=True)
class Job:
    """A recipe waiting for a GPU. `need`: its smallest footprint in bytes (weights, context, a batch of one,
    margin), what it needs on a GPU of its own, 0 when it cannot be estimated (it fits anywhere; the worker's
    placement check still guards); `share`: its estimate at its full batch, what it needs beside other workers,
    None when unknown (it then runs only on a GPU of its own)."""

    name: str
    need: int
    share: int | None = None


@dataclass
class GpuSlots:
    """What placement knows of one GPU: `free`, what it has free with none of this run's workers on it (for a
    recipe alone there); `room`, its free memory now less what this run's workers on it will still take (for one
    more beside them); how many of this run's workers are on it, and how many it may take."""

    free: int
    room: int = 0
    placed: int = 0
    slots: int = 1

    def takes(self, job: Job) -> bool:
        if self.placed == 0:
            return True
        return self.placed < self.slots and job.share is not None and self.room >= job.share

    def take(self, job: Job) -> None:
        self.room = self.room - job.share if job.share is not None else -1  # unknown: nothing is judged beside it
        self.placed += 1


def place(jobs: Sequence[Job], gpus: Mapping[int, GpuSlots]) -> list[tuple[Job, int]]:
    """Which waiting jobs start now, and where. Largest need first (file order among equals), each onto a GPU it
    fits (`free` at least its need) that takes it now: one with none of this run's workers, the one with the most
    free memory (the lowest index among equals), else one where it fits beside them (GpuSlots.takes), the one with
    the most room. A job that fits only GPUs that cannot take it now waits, and smaller jobs may go meanwhile:
    being first in line, it goes as soon as one can. A job that fits no GPU goes to the one with the most free
    memory once none of this run's workers is on it, where the preflight refuses it with the reasons."""
    gpus = {gpu: replace(slots) for gpu, slots in gpus.items()}  # copies: each placement changes them

    def preference(gpu: int) -> tuple:
        slots = gpus[gpu]
        return slots.placed == 0, slots.free if slots.placed == 0 else slots.room, -gpu

    placed = []
    for job in sorted(jobs, key=lambda j: -j.need):  # sorted() is stable: file order among equal needs
        fitting = [g for g in gpus if gpus[g].free >= job.need] or [max(gpus, key=lambda g: (gpus[g].free, -g))]
        candidates = [g for g in fitting if gpus[g].takes(job)]
        if candidates:
            gpu = max(candidates, key=preference)
            gpus[gpu].take(job)
            placed.append((job, gpu))
    return placed


def workers_per_gpu(requested: int | None, device: str, gpus: int, cpus: int | None = None) -> int:
    """`--max-workers-per-gpu` N, or for `auto` (the default) as many as the host's cores feed: each GPU worker
    prepares its batches on GPU_WORKER_THREADS CPU threads, so cores // (that x GPUs), at least 1 (16 cores, one
    GPU: 4). On --device cpu (the fake NVML of tests) 1: a CPU worker's threads take every core."""
    if requested is not None:
        return requested
    if device != "cuda":
        return 1
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // (GPU_WORKER_THREADS * gpus))


def runs_concurrently(preflight: GpuPreflight | None, gpus_option: str | None, per_gpu: int = 1) -> bool:
    """Several workers at once: on several GPUs when asked for (`--gpus all` or a list) and more than one GPU is
    allowed, or on one GPU when more than one may share it; else one worker at a time, as before, on the GPU with
    the most free memory, the next ones started ahead (supervisor.Suite)."""
    if preflight is None:
        return False
    return (gpus_option is not None and len(preflight.gpus) > 1) or per_gpu > 1


def scheduled_gpus(preflight: GpuPreflight, gpus_option: str | None) -> list[int]:
    """The GPUs the scheduler places on: those --gpus allows; without it the one with the most free memory now."""
    if gpus_option is not None:
        return list(preflight.gpus)
    return [max(preflight.gpus, key=lambda g: (preflight.expected_free(g), -g))]


class GpuScheduler:
    """Runs the suite with several workers at once on the scheduled GPUs, a lane each (lanes.LaneDriver); the same
    outputs as Suite.run(). It is the driver's Placer: `place` above, with the preflight's admissions."""

    def __init__(self, plans: list[RecipePlan], run_dir: Path, options: SuiteOptions, *, preflight: GpuPreflight,
                 gpus: list[int] | None = None, listener: Listener | None = None,
                 interrupts: Interrupts | None = None) -> None:
        self.plans = {plan.recipe.name: plan for plan in plans}
        self.preflight = preflight
        listener = listener or (lambda *_: None)
        interrupts = interrupts or Interrupts()
        self.interrupts = interrupts
        self.gpus = gpus if gpus is not None else list(preflight.gpus)
        self.per_gpu = workers_per_gpu(options.max_workers_per_gpu, options.device, len(self.gpus))
        overlaps = Overlaps()
        # Recipes that need no GPU (kept by --resume, a lineage error, skipped) are recorded by a plain Suite.
        recorder = Suite(plans, run_dir, options, listener=listener, preflight=preflight, interrupts=interrupts,
                         overlaps=overlaps)
        # A worker started ahead must be released on the GPU it was started for: with one GPU that is known, so
        # the scheduler starts them (start_ahead); a Suite would start them for the recipes that follow its own.
        self.ahead = options.prestart_depth if options.prestart and len(self.gpus) == 1 else 0
        suite_options = replace(options, prestart=False)
        self.suites = {Lane.gpu(gpu): Suite(plans, run_dir, suite_options, preflight=preflight, interrupts=interrupts,
                                            gpu=gpu, overlaps=overlaps,
                                            listener=tagged(listener, Lane.gpu(gpu), self._started))
                       for gpu in self.gpus}
        self.free = {gpu: preflight.expected_free(gpu) for gpu in self.gpus}  # as each was when last idle
        self.jobs: dict[str, Job] = {}  # each waiting recipe's, once asked for
        self.driver = LaneDriver(plans, self.suites, recorder, self, interrupts)

    def run(self) -> list[RecipeRow]:
        return self.driver.run()

    def place(self, waiting: list[str], running: Mapping[str, Lane]) -> list[tuple[str, Lane]]:
        """`place` on the GPUs as they are now; each recipe placed admitted to the preflight before its thread
        starts, so two placements never count on the same memory. Then, with one GPU, workers started ahead for
        the first recipes still in line."""
        jobs = [self._job(name) for name in waiting]
        placed = []
        for job, gpu in self._placements(jobs, running):
            self.preflight.admit(self.plans[job.name], gpu, job.share)
            jobs.remove(job)
            placed.append((job.name, Lane.gpu(gpu)))
        self._start_ahead(jobs)
        return placed

    def ended(self, name: str) -> None:
        self.preflight.dismiss(name)
        for suite in self.suites.values():
            suite.abandon_held(name)  # started ahead, for a recipe skipped after all

    def _job(self, name: str) -> Job:
        if name not in self.jobs:
            footprint = self.preflight.footprint(self.plans[name])
            self.jobs[name] = Job(name, footprint.alone, footprint.full) if footprint else Job(name, 0)
        return self.jobs[name]

    def _placements(self, jobs: list[Job], running: Mapping[str, Lane]) -> list[tuple[Job, int]]:
        gpus = {}
        for gpu in self.gpus:
            placed = sum(1 for lane in running.values() if lane == Lane.gpu(gpu))
            if not placed:
                self.free[gpu] = self.preflight.expected_free(gpu)
            # room from NVML's free memory now, even on a GPU of none of ours: memory an exited worker has not
            # released yet is not there for a second recipe placed beside the first in the same tick
            gpus[gpu] = GpuSlots(self.free[gpu], self.preflight.room(gpu), placed, self.per_gpu)
        if all(slots.placed >= slots.slots for slots in gpus.values()):
            return []
        return place(jobs, gpus)

    def _start_ahead(self, waiting: list[Job]) -> None:
        """With one GPU: the first recipes in line (the order `place` takes them) get their workers started, held,
        while the GPU cannot take them."""
        if not self.ahead or self.interrupts.stop_requested:
            return
        gpu = self.gpus[0]
        suite = self.suites[Lane.gpu(gpu)]
        held = suite.held()
        for job in sorted(waiting, key=lambda j: -j.need)[: self.ahead]:
            if job.name not in held:
                suite.start_ahead(self.plans[job.name], gpu, self.preflight.device_id(gpu))

    def _started(self, outcome: RecipeOutcome, data: dict[str, Any]) -> None:
        self.preflight.worker_started(outcome.name, data.get("pid"))
