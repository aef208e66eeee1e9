"""Before each launch: which GPU, has the last worker's memory come back, and does the recipe fit.

One worker at a time: the GPU with the most free memory among the allowed ones (`--gpus`) is chosen. With
several workers at once (scheduler.py), the decision is asked for the GPU the scheduler placed the recipe on, and
the waiting below is per GPU. After a worker exits, the next launch on a GPU where no other worker of this run is
placed waits until the exited workers' pids have left NVML's process list and free memory is back near its
baseline (what was free before the run, less what other processes took since). Then the estimate (memory.py) is
compared with the free memory:

- the weights (with the context and margin) do not fit: refused, naming the estimate, the free memory, and
  every process holding the rest (pid, name, bytes);
- the weights fit but the recipe's batch does not: the batch size is lowered to the largest that fits;
- even a batch of one does not fit: refused.

Beside other workers of this run (`--max-workers-per-gpu` above 1), "free" is NVML's free memory less what the
workers placed on that GPU will still take: each one's estimate less what NVML already shows it using, never
below zero (`reserved_bytes`). There is no wait for the baseline then (it cannot come back while they run): memory
an exited worker has not yet released is simply not free. The scheduler places a recipe beside others only where
its estimate at its full batch fits that (`footprint`), so beside others a batch is never lowered to squeeze in.

The decision's record (estimate, free memory, reserved memory, holders, wait) lands in the recipe's summary.json.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from contract.batching import batch_counts
from contract.dataset import DatasetError, open_dataset
from contract.nvml import FAKE_ENV, GpuProcess, GpuState, Nvml, NvmlUnavailable, open_nvml
from contract.units import format_bytes
from orchestrator.errors import UserError
from orchestrator.gpu.memory import EstimateError, MemoryEstimate, Workload, estimate_recipe, read_workload
from orchestrator.planning.plan import LaunchDecision, RecipePlan

RELEASE_TIMEOUT_S = 120.0
POLL_S = 0.25
# Free memory counts as "back" within this much of the baseline: the driver's own bookkeeping moves a little.
RELEASE_TOLERANCE_BYTES = 256 * 2**20


class PreflightError(UserError):
    """The preflight cannot work with what it was given (no GPU, a bad --gpus); the message says what to do."""


class NoGpuDriver(PreflightError):
    """--device cuda where NVML finds no NVIDIA driver."""


def parse_gpus(value: str | None) -> list[int] | None:
    """`--gpus 0,1` -> [0, 1]; None or "all" -> None (every GPU)."""
    if value is None or value.strip() in ("", "all"):
        return None
    try:
        indices = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        indices = []
    if not indices or min(indices) < 0:
        raise PreflightError(f"--gpus {value!r}: give GPU indices as nvidia-smi numbers them, e.g. --gpus 0,1")
    return indices


@dataclass
class _LastWorker:
    gpu: int
    pid: int | None
    recipe: str


@dataclass
class _Admitted:
    """A recipe the scheduler placed on a GPU, from its placement to the end of its last attempt."""

    gpu: int
    reserved: int | None  # its estimate at the batch it runs, margin included; None: no estimate
    pid: int | None = None  # its current attempt's worker, once spawned


@dataclass(frozen=True)
class Footprint:
    """A recipe's estimate (margin included) at a batch of one, what it needs alone on a GPU whose preflight may
    lower its batch, and at its full batch, what it needs to run beside other workers."""

    alone: int
    full: int


class GpuPreflight:
    """The Preflight of plan.py over NVML (real, or the fake of gpu.py on CPU machines)."""

    def __init__(self, nvml: Nvml, *, device: str = "cuda", gpus: list[int] | None = None,
                 release_timeout: float = RELEASE_TIMEOUT_S, poll: float = POLL_S,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 report: Callable[[str], None] | None = None) -> None:
        count = nvml.device_count()
        if count == 0:
            raise PreflightError("NVML sees no GPU: use --device cpu, or check the driver with nvidia-smi")
        unknown = [i for i in gpus or [] if i >= count]
        if unknown:
            raise PreflightError(f"--gpus names GPU(s) {unknown}, but NVML sees {count} (0..{count - 1})")
        self.nvml = nvml
        self.device = device
        self.gpus = gpus if gpus is not None else list(range(count))
        self.release_timeout = release_timeout
        self.poll = poll
        self.clock = clock
        self.sleep = sleep
        self.report = report or (lambda _message: None)
        # The workers started on each GPU since it was last clear of this run's workers, whose memory the next
        # launch there waits for; and where each recipe went: after_exit is told the recipe, not the GPU.
        self._last: dict[int, list[_LastWorker]] = {}
        self._gpu_of: dict[str, int] = {}
        # The recipes the scheduler placed (several on one GPU at once): what each will still take.
        self._admitted: dict[str, _Admitted] = {}
        self._lock = threading.Lock()  # the scheduler's thread admits; the recipes' threads decide and exit
        # What was free, and what other processes held, before any worker of this run started.
        self._baseline = {i: self._snapshot(nvml.state(i)) for i in self.gpus}

    # ------------------------------------------------------------------ the Preflight protocol

    def before_launch(self, plan: RecipePlan, gpu: int | None = None) -> LaunchDecision:
        """The decision on the best allowed GPU, or on `gpu` alone (the scheduler placed it there), once the
        workers that ran there have released their memory; beside other workers of this run, on what they leave."""
        name = plan.recipe.name
        beside = self.sharing(gpu, name) if gpu is not None else []
        wait: dict[str, Any] = {"waited_s": 0.0, "beside": beside} if beside else self._wait_for_release(gpu)
        if wait.get("still_held_by_previous"):
            return LaunchDecision(ok=False, message=wait["message"], record={"release_wait": wait})
        decision = self.assess(plan, gpu, beside=name if beside else None)
        decision.record["release_wait"] = wait
        if decision.ok:  # a refusal is reported by the suite, with the recipe's status
            index = decision.record["gpu"]
            with self._lock:
                self._last.setdefault(index, []).append(_LastWorker(index, None, name))
                self._gpu_of[name] = index
                if name in self._admitted and "estimate" in decision.record:  # what it takes at the batch it got
                    used = decision.record.get("estimate_used") or decision.record["estimate"]
                    self._admitted[name].reserved = used["total_bytes"]
            self.report(f"preflight {name}: {decision.message}")
        return decision

    def after_exit(self, plan: RecipePlan, pid: int | None) -> None:
        with self._lock:
            started = self._last.get(self._gpu_of.get(plan.recipe.name, -1), [])
            last = next((w for w in reversed(started) if w.recipe == plan.recipe.name and w.pid is None), None)
            if last is not None:
                last.pid = pid

    # ------------------------------------------------------------------ several workers on one GPU (scheduler.py)

    def footprint(self, plan: RecipePlan) -> Footprint | None:
        """What `plan` needs alone on a GPU and beside others (see Footprint); None without an estimate."""
        try:
            workload = read_workload(plan.recipe, plan.chain or [], self.device)
        except EstimateError:
            return None
        return Footprint(workload.estimate(1).total_bytes,
                         workload.estimate(_aimed_batch(plan, workload)).total_bytes)

    def admit(self, plan: RecipePlan, gpu: int, reserved: int | None) -> None:
        """The scheduler placed `plan` on `gpu`: until dismiss(), it counts as taking `reserved` bytes there."""
        with self._lock:
            self._admitted[plan.recipe.name] = _Admitted(gpu, reserved)

    def worker_started(self, name: str, pid: int | None) -> None:
        """The admitted recipe's worker (this attempt's) is `pid`: what NVML shows it using is no longer free."""
        with self._lock:
            if name in self._admitted:
                self._admitted[name].pid = pid

    def dismiss(self, name: str) -> None:
        with self._lock:
            self._admitted.pop(name, None)

    def sharing(self, gpu: int, excluding: str = "") -> list[str]:
        """The recipes placed on `gpu` now, but `excluding`."""
        with self._lock:
            return [n for n, a in self._admitted.items() if a.gpu == gpu and n != excluding]

    def reserved_bytes(self, state: GpuState, excluding: str = "") -> int | None:
        """What the recipes placed on this GPU (but `excluding`) will still take: each one's estimate less what
        NVML shows its worker using, never below zero. None when one of them has no estimate."""
        used = {p.pid: p.used_bytes or 0 for p in state.processes}
        with self._lock:
            placed = [a for n, a in self._admitted.items() if a.gpu == state.index and n != excluding]
        total = 0
        for admitted in placed:
            if admitted.reserved is None:
                return None
            in_use = used.get(admitted.pid, 0) if admitted.pid is not None else 0  # no worker yet: nothing in use
            total += max(0, admitted.reserved - in_use)
        return total

    def room(self, gpu: int) -> int:
        """Free memory on `gpu` now, less what the recipes placed there will still take (0 when one has no
        estimate: nothing can be judged beside it)."""
        state = self.nvml.state(gpu)
        reserved = self.reserved_bytes(state)
        return 0 if reserved is None else max(0, state.free_bytes - reserved)

    def device_id(self, gpu: int) -> str:
        """The CUDA_VISIBLE_DEVICES value for `gpu` (its UUID: CUDA and NVML may number GPUs differently)."""
        state = self.nvml.state(gpu)
        return state.uuid or str(state.index)

    def expected_batch(self, plan: RecipePlan, gpu: int | None = None) -> int | None:
        """The batch size `plan` will most likely run at once the GPU is back to its baseline: a worker started
        ahead prepares its first batches at this size while the GPU is still busy. None without an estimate."""
        return expected_batch(plan, self.device, self.expected_free(gpu if gpu is not None else self.gpus[0]))

    def carry_over(self, gpu: int, baseline: dict | None, last_pid: int | None, last_recipe: str = "") -> None:
        """What an earlier preflight knew of `gpu`: its memory before this run's first worker there (`baseline`,
        as `baseline_of` gives it) and the last worker started on it, whose memory must come back before the
        next launch. A Ray actor's preflight is new for every recipe (backends/ray/node.py); the driver keeps these."""
        if baseline is not None:
            self._baseline[gpu] = dict(baseline)
        if last_pid is not None:
            self._last[gpu] = [_LastWorker(gpu, last_pid, last_recipe)]

    def baseline_of(self, gpu: int) -> dict:
        return dict(self._baseline[gpu])

    def expected_free(self, gpu: int) -> int:
        """What `gpu` will have free once our last worker's memory is back (the scheduler places by it): free
        memory now, or its baseline less what other programs took since, whichever is more; a GPU whose worker
        has just exited is not back yet."""
        state = self.nvml.state(gpu)
        with self._lock:
            ours = {w.pid for w in self._last.get(gpu, [])} | {a.pid for a in self._admitted.values() if a.gpu == gpu}
        others = sum(p.used_bytes or 0 for p in state.processes if p.pid not in ours)
        baseline = self._baseline[gpu]
        return max(state.free_bytes, baseline["free"] - max(0, others - baseline["held"]))

    # ------------------------------------------------------------------ the decision

    def assess(self, plan: RecipePlan, gpu: int | None = None, beside: str | None = None) -> LaunchDecision:
        """The verdict for `plan` on the best allowed GPU (or on `gpu`) as it is now; no waiting (`plan` uses
        this). With `beside` (the recipe's name), on what the other recipes placed on `gpu` leave."""
        state = max((self.nvml.state(i) for i in ([gpu] if gpu is not None else self.gpus)),
                    key=lambda s: s.free_bytes)
        record = {"gpu": state.index, "gpu_name": state.name, "gpu_uuid": state.uuid, "free_bytes": state.free_bytes,
                  "total_bytes": state.total_bytes, "baseline_free_bytes": self._baseline[state.index]["free"],
                  "holders": [_holder(p) for p in state.processes], "requested_batch_size": plan.recipe.batch_size}
        visible = state.uuid or str(state.index)  # the worker's CUDA_VISIBLE_DEVICES
        free = state.free_bytes
        if beside is not None:
            reserved = self.reserved_bytes(state, beside)
            free = 0 if reserved is None else max(0, free - reserved)
            record |= {"beside": self.sharing(state.index, beside), "reserved_bytes": reserved}
        try:
            workload = read_workload(plan.recipe, plan.chain or [], self.device)
        except EstimateError as exc:  # the worker's placement check still guards against offload
            record["estimate_error"] = str(exc)
            return LaunchDecision(ok=True, gpu=visible, message=f"no estimate ({exc}); running unchecked",
                                  record=record)
        decision = _verdict(plan.recipe.name, workload, _aimed_batch(plan, workload), state, free, visible, record)
        if plan.recipe.batch_size == "auto" and decision.ok:  # "auto" is sized here, not lowered
            decision.batch_size = record["batch_size"]
            record.pop("batch_lowered", None)
            decision.message = f"GPU {state.index}: batch size auto -> {decision.batch_size}; " + decision.message
        return decision

    # ------------------------------------------------------------------ waiting for the last worker's memory

    def _wait_for_release(self, gpu: int | None) -> dict:
        """Wait until the workers that ran on `gpu` (or anywhere when one worker runs at a time) have left it and
        the memory they held is free again."""
        with self._lock:
            workers = self._last.pop(gpu, []) if gpu is not None else self._pop_any()
        exited = [w for w in workers if w.pid is not None]
        if not exited:
            return {"waited_s": 0.0}
        started = self.clock()
        while True:
            state = self.nvml.state(exited[-1].gpu)
            listed = [w for w in exited if w.pid is not None and state.holds(w.pid)]
            missing = self._missing_bytes(state)
            waited = self.clock() - started
            if not listed and missing <= RELEASE_TOLERANCE_BYTES:
                return {"waited_s": round(waited, 3), "previous_pid": exited[-1].pid, "free_bytes": state.free_bytes}
            if waited >= self.release_timeout:
                return self._release_timed_out((listed or exited)[-1], state, bool(listed), missing, waited)
            self.sleep(self.poll)

    def _pop_any(self) -> list[_LastWorker]:
        return self._last.pop(next(iter(self._last))) if self._last else []

    def _missing_bytes(self, state: GpuState) -> int:
        """How far free memory is below the baseline, not counting what other processes took since."""
        baseline = self._baseline[state.index]
        others_now = sum(p.used_bytes or 0 for p in state.processes)
        taken_by_others = max(0, others_now - baseline["held"])
        return baseline["free"] - taken_by_others - state.free_bytes

    def _release_timed_out(self, last: _LastWorker, state: GpuState, listed: bool, missing: int,
                           waited: float) -> dict:
        record: dict[str, Any] = {"waited_s": round(waited, 3), "previous_pid": last.pid, "timed_out": True,
                  "free_bytes": state.free_bytes, "missing_bytes": missing}
        if listed:
            record["still_held_by_previous"] = True
            record["message"] = (
                f"worker pid {last.pid} of recipe '{last.recipe}' exited, but NVML still lists it on GPU "
                f"{state.index} after {waited:.0f}s ({format_bytes(state.free_bytes)} free of "
                f"{format_bytes(state.total_bytes)}): its memory was not released. Check `nvidia-smi`, end that "
                "process (kill -9 the pid), then run the remaining recipes again.")
            return record
        # The worker is gone but memory is not back: a process NVML cannot list holds it. Go on and let the
        # comparison with the free memory decide, with this on record.
        record["message"] = (f"free memory on GPU {state.index} stayed {format_bytes(missing)} below its baseline "
                             f"for {waited:.0f}s after worker pid {last.pid} exited")
        self.report(f"warning: {record['message']}")
        return record

    @staticmethod
    def _snapshot(state: GpuState) -> dict:
        return {"free": state.free_bytes, "held": sum(p.used_bytes or 0 for p in state.processes)}


def _verdict(name: str, workload: Workload, batch_size: int, state: GpuState, free: int, gpu: str,
             record: dict) -> LaunchDecision:
    """The verdict with `free` bytes to use on the GPU of `state` (its free memory, or beside other workers of
    this run what they leave of it)."""
    requested = workload.estimate(batch_size)
    record["estimate"] = requested.record()
    if _with_margin(requested.fixed_bytes, requested.margin) > free:
        return _refuse(name, "its weights do not fit", requested, state, free, record)
    fitting = largest_batch(workload, batch_size, free)
    if fitting is None:
        return _refuse(name, "its weights fit, but not even a batch of 1", workload.estimate(1), state, free, record)
    beside = record.get("beside")
    free_text = f"{format_bytes(free)} free" + (f" beside {', '.join(beside)}" if beside else "")
    if fitting == batch_size:
        record["batch_size"] = batch_size
        message = f"GPU {state.index}: needs {requested.describe()}; {free_text}"
        return LaunchDecision(ok=True, gpu=gpu, message=message, record=record)
    lowered = workload.estimate(fitting)
    record |= {"batch_size": fitting, "batch_lowered": True, "estimate_used": lowered.record()}
    message = (f"GPU {state.index}: batch size lowered from {batch_size} to {fitting} to fit {free_text}"
               f"{_runs_as(workload.prompts.samples, fitting)} (a batch of {requested.batch_size} needs "
               f"{format_bytes(requested.total_bytes)}; one of {lowered.batch_size} needs {lowered.describe()})")
    return LaunchDecision(ok=True, gpu=gpu, batch_size=fitting, message=message, record=record)


def _runs_as(samples: int, batch_size: int) -> str:
    """", so its 12 samples run as 2 batches of 6": the batches the worker forms at `batch_size`
    (contract/batching.py), which can be smaller than the size itself; empty when the count is unknown."""
    if samples <= 0:
        return ""
    counts = sorted(batch_counts(samples, batch_size).items(), reverse=True)
    batches = " and ".join(f"{count} batch{'es' if count > 1 else ''} of {size}" for size, count in counts)
    return f", so its {samples} samples run as {batches}"


def _aimed_batch(plan: RecipePlan, workload: Workload) -> int:
    """The recipe's batch size, or for "auto" the cap, but never more than the dataset (memory it would not use)."""
    batch = plan.recipe.requested_batch
    if plan.recipe.batch_size == "auto" and workload.prompts.samples:
        batch = min(batch, workload.prompts.samples)
    return batch


def expected_batch(plan: RecipePlan, device: str, free_bytes: int) -> int | None:
    """The batch size `plan` gets where `free_bytes` are free (see GpuPreflight.expected_batch)."""
    try:
        workload = read_workload(plan.recipe, plan.chain or [], device)
    except EstimateError:
        return None
    return largest_batch(workload, _aimed_batch(plan, workload), free_bytes)


def largest_batch(workload: Workload, batch_size: int, free_bytes: int) -> int | None:
    """The largest batch size up to `batch_size` whose estimate fits `free_bytes`; None if not even 1."""
    low, high = 0, batch_size  # memory grows with the batch: bisect for the last size that fits
    while low < high:
        middle = (low + high + 1) // 2
        if workload.estimate(middle).total_bytes <= free_bytes:
            low = middle
        else:
            high = middle - 1
    return low or None


def _with_margin(value: int, margin: float) -> int:
    return value + int(value * margin)


def _refuse(name: str, why: str, estimate: MemoryEstimate, state: GpuState, free: int,
            record: dict) -> LaunchDecision:
    holders = "; ".join(p.describe() for p in state.processes) or "no process NVML can list"
    unlisted = state.total_bytes - state.free_bytes - sum(p.used_bytes or 0 for p in state.processes)
    if state.processes and unlisted > RELEASE_TOLERANCE_BYTES * 4:
        holders += f"; {format_bytes(unlisted)} more held by processes NVML does not list (other containers?)"
    if record.get("beside"):
        holders += (f"; of the {format_bytes(state.free_bytes)} free, {format_bytes(state.free_bytes - free)} is "
                    f"kept for this run's workers on it ({', '.join(record['beside'])})")
    message = (
        f"recipe '{name}' refused on GPU {state.index} ({state.name}): {why}. It needs {estimate.describe()}, "
        f"but only {format_bytes(free)} of {format_bytes(state.total_bytes)} is free. "
        f"Held by: {holders}. Free that memory, pick another GPU with --gpus, or lower batch_size or "
        "memory_margin in the recipe. Nothing was started: a model is never split between GPU and CPU."
    )
    record["refused"] = why
    return LaunchDecision(ok=False, message=message, record=record)


def _holder(process: GpuProcess) -> dict:
    return {"pid": process.pid, "name": process.name, "used_bytes": process.used_bytes}


# ----------------------------------------------------------------------------- what the CLI uses


def nvml_for(device: str, where: str = "here") -> Nvml | None:
    """NVML for the preflight of a run on `device`, here or on a Ray node (`where`, for the message): on cuda
    always; with the fake NVML (EVALORCH_FAKE_NVML) on cpu too, so that CPU tests drive the decisions through the
    real CLI and real workers; else None. PreflightError when NVML fails to start, NoGpuDriver when cuda finds no
    driver."""
    if device != "cuda" and not os.environ.get(FAKE_ENV):
        return None
    try:
        nvml = open_nvml()
    except NvmlUnavailable as exc:
        raise PreflightError(str(exc)) from exc
    if nvml is None:  # the fake is never None: this is cuda
        raise NoGpuDriver(f"--device cuda, but NVML finds no NVIDIA driver {where}")
    return nvml


def preflight_for(device: str, gpus: str | None, *, required: bool = True,
                  report: Callable[[str], None] | None = None) -> GpuPreflight | None:
    """The preflight for `run` (required: a CUDA run without NVML is an error) or `plan` (no GPU, no verdict)."""
    try:
        nvml = nvml_for(device)
    except NoGpuDriver as exc:
        if not required:
            return None
        raise NoGpuDriver(f"{exc}: run on a GPU machine, or use --device cpu") from None
    if nvml is None:
        return None
    return GpuPreflight(nvml, device=device, gpus=parse_gpus(gpus), report=report)


def plan_lines(plan: RecipePlan, device: str, preflight: GpuPreflight | None) -> tuple[list[str], bool]:
    """What `plan` prints under a recipe's lineage: its memory estimate and, where a GPU is visible, the
    verdict; and whether it may run."""
    if not plan.runnable:
        return [], False
    try:
        reading = [f"dataset: {open_dataset(plan.recipe.dataset or '', plan.recipe).describe()}"]
    except DatasetError as exc:
        reading = [f"dataset: {exc}"]
    try:
        estimate = estimate_recipe(plan.recipe, plan.chain or [], device)
    except EstimateError as exc:
        return [*reading, f"memory: cannot estimate ({exc})"], True
    lines = [*reading, f"memory: {estimate.describe()}"]
    if preflight is None:
        return lines, True
    decision = preflight.assess(plan)
    lines.append(("verdict: runs, " if decision.ok else "verdict: ") + decision.message)
    return lines, decision.ok
