"""Policy for running recipes: one fresh worker each, in order; what to record; how an exit is judged.

Mechanics (start, read, signal, reap) live in process.py. A recipe's failure is recorded and the next one
runs: nothing here raises past a single recipe.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import protocol
from .plan import LaunchDecision, Preflight, RecipePlan
from .process import WorkerProcess, describe_exit
from .results import SampleLog, read_samples, write_json
from .stats import metrics

# Variables of distributed launchers that would make a library in the worker think it is part of a job.
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                  "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
_LAUNCHER_PREFIXES = ("SLURM_", "TORCHELASTIC_", "OMPI_", "PMI_")
_EXIT_GRACE_S = 10.0  # after the result pipe closes, how long a worker may take to exit
_LOG_TAIL_BYTES = 4000


@dataclass
class RecipeOutcome:
    """Everything the parent learned about one recipe's run."""

    name: str
    status: str = "pending"  # ok, error, crashed, killed, timeout, protocol, skipped
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
    log_tail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Listener = Callable[[str, RecipeOutcome, dict[str, Any]], None]


def worker_env(device: str, gpu: str | None = None, offline: bool = True) -> tuple[dict[str, str], dict]:
    """The worker's environment, built on purpose; returns it and what was set or removed."""
    env = {k: v for k, v in os.environ.items() if not _is_launcher_var(k)}
    removed = sorted(set(os.environ) - set(env))
    chosen = {
        "CUDA_VISIBLE_DEVICES": (gpu or "0") if device == "cuda" else "",
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if offline:
        chosen |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    project_root = str(Path(__file__).resolve().parent.parent)  # `-m worker` works uninstalled too
    chosen["PYTHONPATH"] = os.pathsep.join(p for p in (project_root, env.get("PYTHONPATH")) if p)
    env |= chosen
    return env, {"set": chosen, "removed": removed}


def _is_launcher_var(name: str) -> bool:
    return name in _LAUNCHER_VARS or name.startswith(_LAUNCHER_PREFIXES)


class RecipeRun:
    """One recipe's worker, from launch to a classified outcome."""

    def __init__(self, spec: protocol.WorkerSpec, recipe_dir: Path, env: dict[str, str],
                 timeout: float | None, listener: Listener | None = None) -> None:
        self.spec = spec
        self.dir = recipe_dir
        self.env = env
        self.timeout = timeout
        self.listener = listener or (lambda *_: None)
        self.outcome = RecipeOutcome(name=spec.recipe["name"])
        self.samples = SampleLog(recipe_dir / "samples.jsonl")
        self._splitter = protocol.LineSplitter()

    def run(self) -> RecipeOutcome:
        spec_path = self.dir / "spec.json"
        spec_path.write_bytes(self.spec.to_json())
        started = time.monotonic()
        proc = WorkerProcess(["--spec", str(spec_path)], self.env, self.dir / "worker.log")
        self.outcome.pid = proc.pid
        self._emit("started", {"pid": proc.pid})
        try:
            timed_out = self._pump(proc, started)
            returncode = self._reap(proc)
        finally:
            proc.cleanup()
            self.samples.close()
        self.outcome.seconds = time.monotonic() - started
        self._classify(returncode, timed_out)
        self.outcome.log_tail = _tail(self.dir / "worker.log")
        self._emit("finished", {})
        return self.outcome

    def _pump(self, proc: WorkerProcess, started: float) -> bool:
        """Read messages until the pipe closes; True if the recipe ran out of time."""
        while True:
            chunk = proc.read_results(wait=1.0)
            if chunk is None:
                break
            for line in self._splitter.feed(chunk):
                self._handle(line)
            if self.timeout is not None and time.monotonic() - started > self.timeout:
                proc.kill()
                return True
        if self._splitter.pending.strip():
            self.outcome.protocol_errors.append(f"stream cut mid-line: {self._splitter.pending[:200]!r}")
        return False

    def _handle(self, line: bytes) -> None:
        try:
            message = protocol.decode(line)
        except protocol.ProtocolError as exc:
            self.outcome.protocol_errors.append(str(exc))
            return
        kind = message.pop("type")
        if kind == "sample":
            self.samples.append(message)
            self.outcome.samples_received += 1
        elif kind == "lineage":
            self.outcome.lineage = message["links"]
        else:
            setattr(self.outcome, kind, message)
        self._emit(kind, message)

    def _reap(self, proc: WorkerProcess) -> int:
        returncode = proc.wait(_EXIT_GRACE_S)
        if returncode is None:  # closed its pipe but will not exit: stop it
            proc.kill()
            returncode = proc.wait(_EXIT_GRACE_S)
        return returncode if returncode is not None else -9

    def _classify(self, returncode: int, timed_out: bool) -> None:
        out = self.outcome
        info = describe_exit(returncode)
        out.exit = info.description
        if timed_out:
            out.status, out.detail = "timeout", f"recipe timeout of {self.timeout:g}s reached; worker killed"
        elif out.error is not None:
            out.status, out.detail = "error", f"{out.error['kind']}: {out.error['message']}"
        elif info.signal is not None:
            out.status = "killed" if info.signal == 9 else "crashed"
            out.detail = info.description
        elif out.done is not None and returncode == 0 and not out.protocol_errors:
            out.status = "ok"
        else:
            problems = out.protocol_errors or [f"stream ended without `done` ({info.description})"]
            out.status, out.detail = "protocol", "; ".join(problems)[:2000]

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        try:
            self.listener(event, self.outcome, data)
        except Exception as exc:  # a display problem must never cost a result
            print(f"evalorch: progress display failed: {exc!r}", file=sys.stderr)


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def record_outcome(recipe_dir: Path, outcome: RecipeOutcome, summary: dict[str, Any]) -> None:
    write_json(recipe_dir / "summary.json", {**outcome.to_dict(), **summary})


def run_suite(plans: list[RecipePlan], run_dir: Path, *, device: str, timeout: float | None,
              listener: Listener | None = None, preflight: Preflight | None = None) -> list[dict[str, Any]]:
    """Run each recipe in its own fresh worker, in order; one recipe's failure never stops the others."""
    rows = []
    for plan in plans:
        recipe_dir = run_dir / plan.recipe.name
        recipe_dir.mkdir(parents=True, exist_ok=True)
        decision = preflight.before_launch(plan) if preflight and plan.runnable else LaunchDecision(ok=True)
        if plan.runnable and decision.ok:
            outcome = _run_one(plan, recipe_dir, device, timeout, listener, decision)
            if preflight:
                preflight.after_exit(plan, outcome.pid)
        elif plan.runnable:
            outcome = RecipeOutcome(name=plan.recipe.name, status="refused", detail=decision.message)
            if listener:
                listener("finished", outcome, {})
        else:
            outcome = RecipeOutcome(name=plan.recipe.name, status="error", detail=plan.problem or "")
            outcome.error = {"kind": "lineage", "message": plan.problem}
            if listener:
                listener("finished", outcome, {})
        row = {
            "name": plan.recipe.name,
            "status": outcome.status,
            "detail": outcome.detail,
            "metrics": metrics(read_samples(recipe_dir / "samples.jsonl")),
            "lineage": outcome.lineage or [asdict(link) for link in plan.chain or []],
            "base_override": plan.overridden_base,
            "recipe": plan.recipe.model_dump(),
            "preflight": decision.record,
        }
        record_outcome(recipe_dir, outcome, row)
        rows.append(row)
    return rows


def _run_one(plan: RecipePlan, recipe_dir: Path, device: str, timeout: float | None,
             listener: Listener | None, decision: LaunchDecision) -> RecipeOutcome:
    recipe = plan.recipe
    settings = recipe.model_dump()
    if decision.batch_size is not None:
        settings["batch_size"] = decision.batch_size
    spec = protocol.WorkerSpec(recipe=settings, chain=plan.chain or [], dataset=str(recipe.dataset), device=device)
    env, env_record = worker_env(device, decision.gpu)
    run = RecipeRun(spec, recipe_dir, env, recipe.timeout or timeout, listener)
    run.outcome.env_set = env_record
    return run.run()
