"""`merge`: turn a recipe's adapter chain into one standalone checkpoint that loads without peft.

The chain is resolved here, torch-free, with the same checks as `plan` and `run`; the weights are merged by a
fresh `python -m worker.merge` process on the CPU (see worker/merge.py), which writes lineage.json into the output
so the merged checkpoint can be traced to the chain it came from.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import protocol
from .plan import make_plans
from .recipes import RecipeFile
from .supervisor import worker_env

EXIT_FAILED, EXIT_CONFIG = 1, 2
_TAIL_LINES = 20


class MergeError(Exception):
    """A merge that cannot start or did not finish; `exit_code` is 2 for configuration problems, 1 otherwise."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def merge_recipe(recipe_file: RecipeFile, name: str, out: Path, *, hash_weights: bool = False,
                 timeout: float | None = None) -> dict[str, Any]:
    """Merge recipe `name`'s chain into `out` (a new or empty folder); return what its lineage.json records."""
    recipe = next((r for r in recipe_file.recipes if r.name == name), None)
    if recipe is None:
        known = ", ".join(r.name for r in recipe_file.recipes)
        raise MergeError(f"{recipe_file.path} has no recipe named '{name}' (its recipes: {known})", EXIT_CONFIG)
    plan = make_plans(recipe_file, [recipe], hash_weights=hash_weights)[0]
    if plan.problem:
        raise MergeError(f"recipe '{name}' cannot be merged: {plan.problem}")
    chain = plan.chain or []
    if all(link.kind == "full" for link in chain):
        raise MergeError(f"recipe '{name}' is a full checkpoint with no adapter to merge: use {chain[-1].path} "
                         "as it is", EXIT_CONFIG)
    out = out.resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"{out} exists and is not an empty folder: choose a new folder, or remove it", EXIT_CONFIG)
    spec = protocol.WorkerSpec(recipe=recipe.model_dump(), chain=chain, dataset=str(recipe.dataset or ""),
                               device="cpu")
    with tempfile.TemporaryDirectory(prefix="evalorch-merge-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_bytes(spec.to_json())
        _run_worker(spec_path, out, hash_weights, timeout, offline=not recipe_file.lineage.allow_network)
    return json.loads((out / "lineage.json").read_text())


def _run_worker(spec_path: Path, out: Path, hash_weights: bool, timeout: float | None, *, offline: bool) -> None:
    """A fresh interpreter does the torch work (the parent never imports torch); its output is kept for errors."""
    env, _ = worker_env("cpu", offline=offline)
    command = [sys.executable, "-m", "worker.merge", "--spec", str(spec_path), "--out", str(out)]
    if hash_weights:
        command.append("--hash-weights")
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MergeError(f"merging took longer than {timeout:g}s and was stopped; raise --timeout") from None
    if done.returncode != 0:
        raise MergeError(_failure_message(done), EXIT_CONFIG if done.returncode == EXIT_CONFIG else EXIT_FAILED)


def _failure_message(done: subprocess.CompletedProcess) -> str:
    """The worker's own "Error: ..." line where it wrote one; else the tail of what it printed."""
    lines = (done.stdout + done.stderr).splitlines()
    errors = [line.removeprefix("Error: ") for line in lines if line.startswith("Error: ")]
    if errors:
        return errors[-1]
    tail = "\n".join(lines[-_TAIL_LINES:])
    return f"the merge worker exited with code {done.returncode} without saying why; its last output:\n{tail}"
