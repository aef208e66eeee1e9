"""Policy for running recipes: one fresh worker each, in order; what to record; how an exit is judged.

Mechanics (start, read, signal, reap) live in process.py. A recipe's failure is recorded and the next one
runs: nothing here raises past a single recipe.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from contract import messages
from contract.layout import RecipeFolder, RunFolder
from contract.recipe import UNCHECKED_AUTO_BATCH, Recipe
from contract.run_row import NEW_RUN_RULE, RecipeRow, Status
from contract.spec import WorkerSpec
from orchestrator.execution.environment import worker_env
from orchestrator.execution.process import WorkerHandle, WorkerProcess, describe_exit, kill_step, log_tail
from orchestrator.execution.pump import pump
from orchestrator.planning.plan import LaunchDecision, Preflight, RecipePlan
from orchestrator.results.stats import metrics, sample_error_verdict
from orchestrator.results.store import (
    SampleLog,
    make_folder,
    read_json,
    read_samples,
    repair_samples,
    write_bytes,
    write_json,
)
from orchestrator.results.summary import read_row

_EXIT_GRACE_S = 10.0  # after the result pipe closes, how long a worker may take to exit
TICK_S = 0.1  # how often a waiting loop (the drivers of lanes.py, a retry's back-off) looks at the interrupt flags


@dataclass
class RecipeOutcome:
    """Everything the parent learned about one recipe's run."""

    name: str
    status: Status = Status.PENDING  # a lost one is retried (LOST_RETRIES)
    detail: str = ""
    pid: int | None = None
    exit: str | None = None
    hello: dict[str, Any] | None = None
    lineage: list[dict[str, Any]] | None = None
    loaded: dict[str, Any] | None = None
    done: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    protocol_errors: list[str] = field(default_factory=list)
    samples_received: int = 0
    seconds: float = 0.0
    env_set: dict[str, Any] = field(default_factory=dict)
    ready: dict[str, Any] | None = None  # a held worker's `ready` (it had imported and warmed its weights)
    timings: dict[str, float] = field(default_factory=dict)  # parent-side: hidden start-up, teardown
    shutdown: list[dict[str, Any]] = field(default_factory=list)  # how the parent stopped it (process.stop)
    log_tail: str = ""
    sample_errors: dict[str, Any] | None = None  # the verdict on its errored samples (stats.sample_error_verdict)
    ran_on: dict[str, Any] | None = None  # a remote backend's node and GPU (backends/ray/backend.py); None when local

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Listener = Callable[[str, RecipeOutcome, dict[str, Any]], None]
# Starts one worker: (spec, the spec file written in the run folder, environment, log file) -> its handle. The
# default is a local `python -m worker`; backends/ray starts it on a Ray node behind the same interface.
Launcher = Callable[[WorkerSpec, Path, dict[str, str], Path], WorkerHandle]


def local_worker(spec: WorkerSpec, spec_path: Path, env: dict[str, str], log_path: Path) -> WorkerProcess:
    return WorkerProcess(["--spec", str(spec_path)], env, log_path)


@dataclass(frozen=True)
class Limits:
    """Seconds allowed for each phase of a worker's life; None means no limit."""

    startup: float | None = None  # spawn -> hello (imports)
    load: float | None = None  # hello -> loaded
    stall: float | None = None  # longest silence once samples run
    total: float | None = None  # the whole recipe

    @classmethod
    def of(cls, recipe: Recipe, total: float | None) -> Limits:
        return cls(recipe.startup_timeout, recipe.load_timeout, recipe.stall_timeout, recipe.timeout or total)


class Interrupts:
    """Signal handlers only record what arrived; the supervision loop acts on it (gunicorn's arbiter does this).
    One Ctrl-C: finish the running batch, start nothing new. A second Ctrl-C, or SIGTERM: kill now."""

    def __init__(self) -> None:
        self.sigint = 0
        self.sigterm = False

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigint(self, *_: object) -> None:
        self.sigint += 1

    def _on_sigterm(self, *_: object) -> None:
        self.sigterm = True

    @property
    def stop_requested(self) -> bool:
        return self.sigint > 0 or self.sigterm

    @property
    def kill_now(self) -> bool:
        return self.sigint > 1 or self.sigterm


class RecipeRun:
    """One attempt of one recipe's worker, from launch to a classified outcome."""

    def __init__(self, spec: WorkerSpec, recipe_dir: Path, env: dict[str, str], limits: Limits,
                 interrupts: Interrupts, listener: Listener | None = None, launcher: Launcher = local_worker) -> None:
        self.spec = spec
        self.launcher = launcher
        self.dir = recipe_dir
        self.env = env
        self.limits = limits
        self.interrupts = interrupts
        self.listener = listener or (lambda *_: None)
        self.outcome = RecipeOutcome(name=spec.recipe.name)
        self._phase = "startup"
        self._expired: str | None = None  # the phase whose time ran out
        self._done_at: float | None = None
        self._interrupted = False
        self._stop_sent = self._killed = False

    def start(self) -> None:
        """Spawn the worker. A held one (spec.hold) prepares but waits for release() to touch the device."""
        spec_path = RecipeFolder(self.dir).spec
        write_bytes(spec_path, self.spec.to_json())
        self.samples = SampleLog(RecipeFolder(self.dir).samples)
        self._spawned = time.monotonic()
        self.proc = self.launcher(self.spec, spec_path, self.env, RecipeFolder(self.dir).log)

    def release(self, batch_size: int | None = None) -> None:
        """Let a held worker load onto the device (the preflight has just said the GPU is free for it)."""
        fields = {"batch_size": batch_size} if batch_size is not None else {}
        self.proc.send(messages.control(messages.CONTROL_GO, **fields))

    def abandon(self) -> None:
        """A held worker that will not run after all (refused, interrupted): stop it and forget it."""
        self.proc.cleanup()
        self.samples.close()

    def run(self) -> RecipeOutcome:
        """Supervise the (started, released) worker to its end and classify the outcome."""
        self._started = started = time.monotonic()
        self.outcome.timings["hidden_startup"] = started - self._spawned
        self.outcome.pid = self.proc.pid
        self.outcome.ran_on = self.proc.where
        if self.proc.env_record is not None:  # built where the worker runs (a Ray node), not here
            self.outcome.env_set = self.proc.env_record
        self._emit("started", {"pid": self.proc.pid})
        try:
            cut = pump(self.proc, self, started)
            if cut:
                self.outcome.protocol_errors.append(f"stream cut mid-line: {cut[:200]!r}")
            returncode = self._reap(self.proc)
            if self._done_at is not None:  # from `done` to the process reaped: interpreter and CUDA shutdown
                self.outcome.timings["teardown"] = time.monotonic() - self._done_at
        finally:
            self.proc.cleanup()
            self.samples.close()
        self.outcome.seconds = time.monotonic() - started
        self._classify(returncode)
        self.outcome.log_tail = log_tail(RecipeFolder(self.dir).log)
        self._emit("finished", {})
        return self.outcome

    # ------------------------------------------------------------------ the worker's stream (pump.StreamReader)

    def on_tick(self, now: float, last_message: float) -> None:
        """Act on interrupts and expired phases, once a read of the pipe."""
        if self.interrupts.kill_now and not self._killed:  # a second Ctrl-C after a first: kill now
            self._interrupted = self._killed = True
            self.proc.kill()
            self.outcome.shutdown.append(kill_step("interrupted twice"))
        elif self.interrupts.stop_requested and not self._stop_sent:
            self._stop_sent = self.proc.send(messages.control(messages.CONTROL_STOP))
            self._interrupted = True
        if self._expired is None and (phase := self._expired_phase(now, last_message)):
            self._expired = phase
            self.outcome.shutdown += self.proc.stop(f"{phase} timeout")

    def on_unreadable(self, problem: str) -> None:
        self.outcome.protocol_errors.append(problem)

    def _expired_phase(self, now: float, last_message: float) -> str | None:
        limits = self.limits
        if limits.total is not None and now - self._started > limits.total:
            return "recipe"
        limit = {"startup": limits.startup, "load": limits.load, "inference": limits.stall}[self._phase]
        if limit is not None and now - last_message > limit:
            return {"inference": "stall"}.get(self._phase, self._phase)
        return None

    def on_message(self, message: dict[str, Any]) -> None:
        """Record a message of the worker's (samples to samples.jsonl, the rest on the outcome) and pass it on."""
        kind = message.pop("type")
        if kind == "hello" and not self.spec.hold:  # a held worker's pipe is read only once released
            self.outcome.timings["spawn_to_hello"] = time.monotonic() - self._spawned
        elif kind == "done":
            self._done_at = time.monotonic()
        if kind == "sample":
            self.samples.append(message)
            self.outcome.samples_received += 1
        elif kind == "lineage":
            self.outcome.lineage = message["links"]
        else:
            setattr(self.outcome, kind, message)
        self._phase = {"hello": "load", "loaded": "inference"}.get(kind, self._phase)
        self._emit(kind, message)

    def _reap(self, proc: WorkerHandle) -> int:
        if proc.lost is not None:  # nothing left to wait for or to stop: the node or its Ray worker is gone
            return -9
        returncode = proc.wait(_EXIT_GRACE_S)
        if returncode is None:  # closed its pipe but will not exit: stop it
            self.outcome.shutdown += proc.stop("no exit after its result pipe closed")
            returncode = proc.poll()
        return returncode if returncode is not None else -9

    def _classify(self, returncode: int) -> None:
        out = self.outcome
        info = describe_exit(returncode)
        out.exit = info.description
        if self._expired is not None:
            limit = {"recipe": self.limits.total, "stall": self.limits.stall}.get(
                self._expired, getattr(self.limits, self._expired, None))
            out.status, out.detail = Status.TIMEOUT, f"{self._expired} timeout ({limit:g}s) reached; worker killed"
        elif out.error is not None:
            out.status, out.detail = Status.ERROR, f"{out.error['kind']}: {out.error['message']}"
        elif self.proc.lost is not None:
            out.status, out.detail = Status.LOST, f"{self.proc.lost} after {out.samples_received} samples"
            out.exit = "unknown: the worker's node or Ray worker was lost"
        elif self._interrupted:
            out.status = Status.INTERRUPTED
            out.detail = f"stopped by the user after {out.samples_received} samples"
        elif info.signal is not None:
            out.status = Status.KILLED if info.signal == signal.SIGKILL else Status.CRASHED
            out.detail = info.description
        elif out.done is not None and returncode == 0 and not out.protocol_errors:
            out.status = Status.OK
            self._judge_samples()
        else:
            problems = out.protocol_errors or [f"stream ended without `done` ({info.description})"]
            out.status, out.detail = Status.PROTOCOL, "; ".join(problems)[:2000]

    def _judge_samples(self) -> None:
        """A worker that finished may still have errored on too many samples (a broken data mount: every image
        missing), or scored none: then the recipe fails, its metrics kept."""
        verdict = sample_error_verdict(read_samples(RecipeFolder(self.dir).samples),
                                       self.spec.recipe.max_sample_errors)
        self.outcome.sample_errors = verdict
        if not verdict["passed"]:
            quoted = "; ".join(f"{e['id']}: {e['error']}" for e in verdict["first"])
            self.outcome.status = Status.SAMPLE_ERRORS
            self.outcome.detail = verdict["problem"] + (f". First: {quoted}" if quoted else "")

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        try:
            self.listener(event, self.outcome, data)
        except Exception as exc:  # a display problem must never cost a result
            print(f"evalorch: progress display failed: {exc!r}", file=sys.stderr)


Span = tuple[float, float | None]  # a worker's time on its device: (begin, end), end None while it is there


class Overlaps:
    """When each recipe's worker was on its device: from its launch (or the release of a worker started ahead) to
    its reaping, an interval per attempt, in wall-clock seconds. Shared by every recipe thread of a run (the
    scheduler's, the Ray lanes'), so each recipe's record can name the recipes whose workers ran at the same time.
    A recipe that has ended knows them all: any later one starts after its end."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: dict[str, list[Span]] = {}

    def begin(self, name: str) -> None:
        with self._lock:
            self._spans.setdefault(name, []).append((time.time(), None))

    def end(self, name: str) -> None:
        with self._lock:
            spans = self._spans[name]
            spans[-1] = (spans[-1][0], time.time())

    def spans(self, name: str) -> list[list[float | None]]:
        with self._lock:
            return [list(span) for span in self._spans.get(name, [])]

    def concurrent_with(self, name: str) -> list[str]:
        """The other recipes with a worker on a device while one of `name`'s was, in the order they began."""
        with self._lock:
            mine = self._spans.get(name, [])
            others = sorted(((spans[0][0], other) for other, spans in self._spans.items() if other != name),
                            key=lambda pair: pair[0])
            return [other for _, other in others
                    if any(_overlap(a, b) for a in mine for b in self._spans[other])]


def _overlap(a: Span, b: Span) -> bool:
    """Two intervals [begin, end] (end None: still running) overlap."""
    return (b[1] is None or a[0] < b[1]) and (a[1] is None or b[0] < a[1])


# never config or lineage errors: those fail the same way again
RETRYABLE = frozenset({Status.CRASHED, Status.KILLED, Status.TIMEOUT})
# A lost node or Ray worker says nothing about the recipe: retried this many more times, whatever its `retries`.
LOST_RETRIES = 2


@dataclass
class SuiteOptions:
    device: str
    timeout: float | None = None
    offline: bool = True
    resume: bool = False  # keep recipes already finished in this run folder; continue the others
    prestart: bool = True  # start the next recipes' workers (held off the device) while this one runs
    # how many: a fresh worker's imports (11-15 s on the H100 host) outlast one fast recipe (about 10 s)
    prestart_depth: int = 2
    # GPU workers at once on one GPU, room permitting (scheduler.py); None: as many as the host's cores feed
    max_workers_per_gpu: int | None = None


def _batch_size(plan: RecipePlan, decision: LaunchDecision) -> int:
    """The batch size a worker runs at: the preflight's, else the recipe's, else (auto, no preflight) the default."""
    if decision.batch_size is not None:
        return decision.batch_size
    batch = plan.recipe.batch_size
    return batch if isinstance(batch, int) else UNCHECKED_AUTO_BATCH


class Suite:
    """Runs each recipe in its own fresh worker, in order; one recipe's failure never stops the others.
    With `gpu` set it serves scheduler.py: each recipe it is given (in a thread of its own) runs on that GPU."""

    def __init__(self, plans: list[RecipePlan], run_dir: Path, options: SuiteOptions, *,
                 listener: Listener | None = None, preflight: Preflight | None = None,
                 interrupts: Interrupts | None = None, gpu: int | None = None,
                 launcher: Launcher = local_worker, overlaps: Overlaps | None = None) -> None:
        self.plans = plans
        self.launcher = launcher
        self.run_dir = run_dir
        self.options = options
        self.listener = listener or (lambda *_: None)
        self.preflight = preflight
        self.interrupts = interrupts or Interrupts()
        self.gpu = gpu
        self.overlaps = overlaps or Overlaps()  # shared by the recipes that may run at once
        # The next recipes' workers, started ahead and held off the device (by this suite, or by the scheduler
        # through start_ahead: then only the scheduler's thread adds, and each recipe's thread takes its own).
        self._held: dict[str, RecipeRun] = {}
        self._held_lock = threading.Lock()

    def run(self) -> list[RecipeRow]:
        try:
            return [self.run_recipe(plan) for plan in self.plans]
        finally:
            self.abandon_held()

    def finished_before(self, plan: RecipePlan) -> bool:
        previous = RunFolder(self.run_dir).recipe(plan.recipe.name).summary
        return self.options.resume and previous.exists() and read_json(previous).get("status") == Status.OK

    def run_recipe(self, plan: RecipePlan) -> RecipeRow:
        """One recipe to its recorded end (kept, skipped, error, refused, or its attempts); returns its row."""
        recipe_dir = make_folder(self.run_dir / plan.recipe.name)
        if self.finished_before(plan):
            return read_row(RecipeFolder(recipe_dir).summary)
        decision = LaunchDecision(ok=True)
        attempts: list[dict[str, Any]] = []
        if self.interrupts.stop_requested:
            outcome = RecipeOutcome(plan.recipe.name, Status.SKIPPED, "interrupted before it started")
        elif not plan.runnable:
            outcome = RecipeOutcome(plan.recipe.name, Status.ERROR, plan.problem or "")
            outcome.error = {"kind": plan.problem_kind, "message": plan.problem}
        elif self.preflight and not (decision := self._before_launch(self.preflight, plan)).ok:
            outcome = RecipeOutcome(plan.recipe.name, Status.REFUSED, decision.message)
        else:
            outcome, attempts, decision = self._attempts(plan, recipe_dir, decision)
        self.abandon_held(plan.recipe.name)  # started ahead, but the recipe did not run after all
        if outcome.pid is None:
            self.listener("finished", outcome, {})
        return self._record(plan, recipe_dir, outcome, decision, attempts)

    def _before_launch(self, preflight: Preflight, plan: RecipePlan) -> LaunchDecision:
        """The preflight's decision (the caller has one), on this lane's GPU when the suite has one."""
        if self.gpu is None:
            return preflight.before_launch(plan)
        return preflight.before_launch(plan, gpu=self.gpu)  # GpuPreflight: this lane's GPU only

    def _attempts(self, plan: RecipePlan, recipe_dir: Path,
                  decision: LaunchDecision) -> tuple[RecipeOutcome, list[dict[str, Any]], LaunchDecision]:
        """The first attempt and, after a crash, kill or timeout, up to `retries` more with a back-off (after a
        lost node, up to LOST_RETRIES more); each retry continues with the samples not yet recorded, after the
        preflight's verdict again (the last worker's memory must come back; on Ray it may be another node)."""
        attempts: list[dict[str, Any]] = []
        retries, lost_retries = plan.recipe.retries, LOST_RETRIES
        for attempt in itertools.count(1):
            if attempt > 1:
                _note(RecipeFolder(recipe_dir).log, f"=== evalorch: attempt {attempt} ===")
                if not self._sleep(plan.recipe.retry_backoff * 2 ** (len(attempts) - 1)):
                    break
                if self.preflight and not (decision := self._before_launch(self.preflight, plan)).ok:
                    outcome = RecipeOutcome(plan.recipe.name, Status.REFUSED, decision.message)
                    attempts.append({"attempt": attempt, "status": Status.REFUSED, "detail": decision.message})
                    break
            outcome = self._launch(plan, recipe_dir, decision, attempt)
            if self.preflight:
                self.preflight.after_exit(plan, outcome.pid)
            attempts.append({"attempt": attempt, "status": outcome.status, "detail": outcome.detail,
                             "pid": outcome.pid, "seconds": outcome.seconds, "samples": outcome.samples_received,
                             "ran_on": outcome.ran_on})
            if self.interrupts.stop_requested:
                break
            if outcome.status == Status.LOST and lost_retries:
                lost_retries -= 1
            elif outcome.status in RETRYABLE and retries:
                retries -= 1
            else:
                break
        return outcome, attempts, decision

    def _launch(self, plan: RecipePlan, recipe_dir: Path, decision: LaunchDecision, attempt: int) -> RecipeOutcome:
        run = self._take_held(plan, decision) if attempt == 1 else None
        self.overlaps.begin(plan.recipe.name)
        try:
            if run is not None:
                run.release(_batch_size(plan, decision))  # it may have been started with another guess
            else:
                run = self._new_run(plan, decision, attempt, hold=False)
                run.start()
            self._prestart_after(plan, decision)
            return run.run()
        finally:
            self.overlaps.end(plan.recipe.name)

    def _new_run(self, plan: RecipePlan, decision: LaunchDecision, attempt: int, *, hold: bool) -> RecipeRun:
        recipe = plan.recipe
        recipe_dir = make_folder(self.run_dir / recipe.name)
        settings = recipe.model_copy(update={"batch_size": _batch_size(plan, decision)})
        done_ids = sorted({s["id"] for s in repair_samples(RecipeFolder(recipe_dir).samples)}, key=str)
        spec = WorkerSpec(recipe=settings, chain=plan.chain or [], dataset=str(recipe.dataset),
                                   device=self.options.device, skip_ids=done_ids, attempt=attempt, hold=hold)
        env, env_record = worker_env(self.options.device, decision.gpu, offline=self.options.offline,
                                     pinned=self.gpu is not None)
        run = RecipeRun(spec, recipe_dir, env, Limits.of(recipe, self.options.timeout), self.interrupts,
                        self.listener, self.launcher)
        run.outcome.env_set = env_record
        return run

    def _take_held(self, plan: RecipePlan, decision: LaunchDecision) -> RecipeRun | None:
        """The worker started ahead for this recipe, if it was put on the GPU the preflight chose now."""
        with self._held_lock:
            held = self._held.pop(plan.recipe.name, None)
        if held is None:
            return None
        if held.env.get("CUDA_VISIBLE_DEVICES") == worker_env(self.options.device, decision.gpu,
                                                              offline=self.options.offline,
                                                              pinned=self.gpu is not None)[0]["CUDA_VISIBLE_DEVICES"]:
            return held
        held.abandon()
        return None

    def start_ahead(self, plan: RecipePlan, gpu: int | None, device_id: str | None) -> None:
        """Start `plan`'s worker now, held off the device (GPU `gpu`, CUDA_VISIBLE_DEVICES `device_id`), at the
        batch size the preflight expects there once it is free: its run takes it over when the recipe starts."""
        expected = self.preflight.expected_batch(plan, gpu) if self.preflight else None
        guess = LaunchDecision(ok=True, gpu=device_id, batch_size=expected)
        run = self._new_run(plan, guess, 1, hold=True)
        run.start()
        with self._held_lock:
            self._held[plan.recipe.name] = run

    def held(self) -> set[str]:
        with self._held_lock:
            return set(self._held)

    def abandon_held(self, name: str | None = None) -> None:
        """Stop the workers started ahead (or `name`'s alone) that will not run."""
        with self._held_lock:
            runs = [self._held.pop(key) for key in ([name] if name is not None else list(self._held))
                    if key in self._held]
        for run in runs:
            run.abandon()

    def _prestart_after(self, plan: RecipePlan, decision: LaunchDecision) -> None:
        """Start the next runnable recipes' workers now (prestart_depth of them), held off the device: their
        imports, data, page-cache warming and first batches overlap this recipe's run. Each is assumed to go to
        the same GPU, at the batch size the preflight expects once the GPU is free; if not, it is abandoned
        (another GPU) or re-batches when released (another batch size)."""
        if not self.options.prestart or self.interrupts.stop_requested:
            return
        index = self.plans.index(plan)
        upcoming = [p for p in self.plans[index + 1:] if p.runnable and not self.finished_before(p)]
        for nxt in upcoming[: self.options.prestart_depth]:
            if nxt.recipe.name not in self.held():
                self.start_ahead(nxt, decision.record.get("gpu"), decision.gpu)

    def _sleep(self, seconds: float) -> bool:
        """Wait out a back-off; False if the user interrupted it."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.interrupts.stop_requested:
                return False
            time.sleep(TICK_S)
        return True

    def _record(self, plan: RecipePlan, recipe_dir: Path, outcome: RecipeOutcome, decision: LaunchDecision,
                attempts: list[dict[str, Any]]) -> RecipeRow:
        """The recipe's row (contract/run_row.py), written with everything the parent learned into its
        summary.json."""
        counts = (outcome.done or {}).get("counts") or {}
        row = RecipeRow(
            name=plan.recipe.name, status=outcome.status, detail=outcome.detail,
            metrics=metrics(read_samples(RecipeFolder(recipe_dir).samples)), iou_rule=NEW_RUN_RULE,
            parity=(outcome.done or {}).get("parity"),
            lineage=outcome.lineage or [asdict(link) for link in plan.chain or []],
            base_override=plan.overridden_base, as_trained=plan.as_trained(), quantization=plan.quantization,
            recipe=plan.recipe.model_dump(), preflight=decision.record,
            attempts=attempts, sample_errors=outcome.sample_errors,
            concurrent_with=self.overlaps.concurrent_with(plan.recipe.name),
            oom_retries=counts.get("oom_retries"), final_batch_size=counts.get("batch_size"),
            decode_graph=counts.get("decode_graph"), checkpoint=plan.checkpoint)
        write_json(RecipeFolder(recipe_dir).summary,
                   {**outcome.to_dict(), **row.recorded(), "box_format_from": plan.box_format_from,
                    "device_spans": self.overlaps.spans(plan.recipe.name)})
        return row


def _note(log: Path, text: str) -> None:
    """A line for the worker's log; a log that cannot take it (a full disk) loses only the line: the attempt's
    results are written, and checked, apart."""
    with contextlib.suppress(OSError), open(log, "a") as f:
        f.write(f"\n{text}\n")
