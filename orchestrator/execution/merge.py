"""`merge`: turn a recipe's adapter chain into one standalone checkpoint that loads without peft.

The chain is resolved here, torch-free, with the same checks as `plan` and `run`; the weights are merged by a
fresh `python -m worker.merge` process on the CPU (see worker/merge.py), started and stopped through the same
launcher as an evaluation worker (process.py: process group, lifeline, result pipe, escalating stop) and read
through the same pump (pump.py). It answers with one protocol message: `merged` with what lineage.json records,
or `error`.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from contract.exits import Exit
from contract.layout import MERGE_LOCK_SUFFIX, SPEC, WORKER_LOG
from contract.recipe import Recipe
from contract.spec import ChainLink, WorkerSpec
from orchestrator.errors import UserError
from orchestrator.execution.environment import worker_env
from orchestrator.execution.process import WorkerProcess, describe_exit, log_tail
from orchestrator.execution.pump import pump
from orchestrator.planning.plan import make_plans
from orchestrator.planning.recipes import RecipeFile
from orchestrator.results.folder_lock import writing
from orchestrator.results.store import make_folder

_TAIL_LINES = 20  # how much of the merge worker's log its failure shows


class MergeError(UserError):
    """A merge that cannot start or did not finish; `exit_code` is 2 for configuration problems, 1 otherwise."""

    exit_code = Exit.RECIPE_FAILED


def merge_recipe(recipe_file: RecipeFile, name: str, out: Path, *, hash_weights: bool = False,
                 timeout: float | None = None) -> dict[str, Any]:
    """Merge recipe `name`'s chain into `out` (a new or empty folder); return what its lineage.json records."""
    recipe = next((r for r in recipe_file.recipes if r.name == name), None)
    if recipe is None:
        known = ", ".join(r.name for r in recipe_file.recipes)
        raise MergeError(f"{recipe_file.path} has no recipe named '{name}' (its recipes: {known})", Exit.USAGE)
    plan = make_plans(recipe_file, [recipe], hash_weights=hash_weights, box_formats=False)[0]  # no scoring here
    if plan.problem:
        raise MergeError(f"recipe '{name}' cannot be merged: {plan.problem}")
    chain = plan.chain or []
    if all(link.kind == "full" for link in chain):
        raise MergeError(f"recipe '{name}' is a full checkpoint with no adapter to merge: use {chain[-1].path} "
                         "as it is", Exit.USAGE)
    out = out.resolve()
    lock = make_folder(out.parent) / (out.name + MERGE_LOCK_SUFFIX)
    with writing(lock, f"merge of recipe '{name}' into {out.name}"):  # two merges into one folder: one waits out
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise MergeError(f"{out} exists and is not an empty folder: choose a new folder, or remove it",
                             Exit.USAGE)
        return _merge(recipe, chain, out, hash_weights, recipe_file.lineage.allow_network, timeout)


def _merge(recipe: Recipe, chain: list[ChainLink], out: Path, hash_weights: bool, allow_network: bool,
           timeout: float | None) -> dict[str, Any]:
    """The merge worker, started on the chain, writing `out`."""
    spec = WorkerSpec(recipe=recipe, chain=chain, dataset=str(recipe.dataset or ""), device="cpu")
    with tempfile.TemporaryDirectory(prefix="evalorch-merge-") as tmp:
        spec_path = Path(tmp) / SPEC
        spec_path.write_bytes(spec.to_json())
        args = ["--spec", str(spec_path), "--out", str(out), *(["--hash-weights"] if hash_weights else [])]
        env, _ = worker_env("cpu", offline=not allow_network)
        return _supervise(WorkerProcess(args, env, Path(tmp) / WORKER_LOG, module="worker.merge"), timeout)


def _supervise(proc: WorkerProcess, timeout: float | None) -> dict[str, Any]:
    """Read the merge worker's messages to its end; its `merged` record, else MergeError."""
    reader = _MergeReader(proc, timeout)
    try:
        pump(proc, reader, time.monotonic())  # a last line cut mid-way is no answer: the exit tells what happened
        returncode = proc.wait(10.0)
        log = log_tail(proc.log_path, lines=_TAIL_LINES)
    finally:
        proc.cleanup()
    answer = reader.answer
    if answer is not None and answer["type"] == "merged" and returncode == 0:
        return answer["record"]
    if answer is not None and answer["type"] == "error":
        raise MergeError(answer["message"], Exit.USAGE if answer["kind"] == "config" else Exit.RECIPE_FAILED)
    ended = describe_exit(returncode) if returncode is not None else None
    raise MergeError(f"the merge worker {ended.description if ended else 'did not exit'} without saying why; its "
                     f"last output:\n{log}")


class _MergeReader:
    """The merge worker's stream (pump.StreamReader): its last message is its answer (a line that is none, an
    internal error); past `timeout` seconds it is stopped and the merge fails."""

    def __init__(self, proc: WorkerProcess, timeout: float | None) -> None:
        self.proc = proc
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.answer: dict[str, Any] | None = None

    def on_message(self, message: dict[str, Any]) -> None:
        self.answer = message

    def on_unreadable(self, problem: str) -> None:
        self.answer = {"type": "error", "kind": "internal", "message": f"protocol: {problem}"}

    def on_tick(self, now: float, last_message: float) -> None:
        if self.deadline is not None and now > self.deadline:
            self.proc.stop("merge timeout")
            raise MergeError(f"merging took longer than {self.timeout:g}s and was stopped; raise --timeout")
