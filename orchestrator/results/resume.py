"""Continuing an interrupted run in its own folder: exactly, or not at all.

A recorded sample depends on its recipe's settings, the chain's weights and side files (processor, tokenizer, chat
template, generation config: lineage fingerprints) and on the sample itself in the dataset (contract.dataset's
sample_key, recorded with every sample). Before a resume evaluates anything:
- a recipe whose settings, weights or side files changed is refused, naming what changed (exit 2); with --force it
  is evaluated again from scratch, its earlier files set aside under `.replaced/`, never mixed with the new ones;
- in every other recipe, a sample whose own inputs changed is evaluated again, and a sample the dataset no longer
  holds leaves the records (both set aside too), so the rows equal those of a fresh run on the inputs as they are;
- recipes the resume does not select (--only) stay as they were, in run.json and in the summary.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from contract.dataset import INPUT_KEY, DatasetError, open_dataset, sample_key
from contract.layout import REPLACED, RunFolder
from contract.recipe import Recipe
from contract.samples import id_text
from orchestrator.errors import UserError
from orchestrator.planning.plan import RecipePlan
from orchestrator.results.store import make_folder, read_json, read_samples, write_bytes

# Settings that change how fast a recipe runs, never what it produces: recorded, but a resume ignores them.
RESULT_NEUTRAL = frozenset({"image_cache", "cache_dir", "parity_check", "parity_generate"})


class ResumeError(UserError):
    """The run folder cannot be resumed as asked."""


def planned_recipe(plan: RecipePlan) -> dict[str, Any]:
    """What run.json records of a recipe, and what a resume compares: settings and the chain's fingerprints."""
    return {**plan.recipe.model_dump(), "problem": plan.problem,
            "chain": [link.__dict__ for link in plan.chain or []]}


def recorded_recipes(run_dir: Path) -> list[dict[str, Any]]:
    """The recipes run.json records, in its order; ResumeError where the folder is not a run."""
    record = RunFolder(run_dir).record
    if not record.exists():
        raise ResumeError(f"{run_dir} is not a run folder (no run.json)")
    recipes = read_json(record).get("recipes")
    if not isinstance(recipes, list) or not all(isinstance(r, dict) and "name" in r for r in recipes):
        raise ResumeError(f"{record}: its 'recipes' are not a list of recorded recipes; it cannot be resumed")
    return recipes


def prepare(run_dir: Path, plans: list[RecipePlan], force: bool) -> list[str]:
    """Make the run folder resumable for `plans` as described above; returns what was done, a line each. Raises
    ResumeError (nothing changed on disk) where a recipe changed and `force` is not given."""
    before = {r["name"]: r for r in recorded_recipes(run_dir)}
    changed = {plan.recipe.name: why for plan in plans if (why := recipe_changes(run_dir, plan, before))}
    if changed and not force:
        lines = "\n".join(f"  - recipe '{name}': {why}" for name, reasons in changed.items() for why in reasons)
        raise ResumeError(f"{run_dir} was started with other inputs:\n{lines}\nResults would mix two setups. Start a "
                          "new run, or pass --force to evaluate the changed recipes again from scratch.")
    aside = RunFolder(run_dir).path / REPLACED / datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    done = []
    for plan in plans:
        name = plan.recipe.name
        if name in changed:
            if _set_aside(run_dir, name, aside):
                done.append(f"recipe '{name}': evaluated again from scratch (--force: {changed[name][0]})")
        else:
            done += _drop_stale_samples(run_dir, plan, aside)
    return done


def recipe_changes(run_dir: Path, plan: RecipePlan, before: dict[str, dict[str, Any]]) -> list[str]:
    """Why `plan`'s recipe cannot continue from what the run recorded of it (settings, weights, side files, samples
    recorded without their keys), or nothing."""
    old = before.get(plan.recipe.name)
    if old is None:
        return ["new: not in the run it would resume"]
    now = planned_recipe(plan)
    found = [f"field '{key}': {was!r} -> {is_now!r}" for key, was, is_now in setting_changes(old, now, {"chain"})]
    found += _chain_changes(old.get("chain") or [], now["chain"])
    records = read_samples(RunFolder(run_dir).recipe(plan.recipe.name).samples)
    if any(INPUT_KEY not in record for record in records):
        found.append("its samples were recorded without what each depends on (an evalorch from before it was "
                     "recorded): whether the dataset changed cannot be told")
    return found


def _chain_changes(old: list[dict[str, Any]], now: list[dict[str, Any]]) -> list[str]:
    if [(link.get("path"), link.get("fingerprint")) for link in old] != \
            [(link["path"], link["fingerprint"]) for link in now]:
        return ["weights changed (lineage fingerprints differ)"]
    for was, is_now in zip(old, now, strict=True):
        if was.get("files_fingerprint") != is_now["files_fingerprint"]:
            why = "changed" if was.get("files_fingerprint") else "were not fingerprinted when the run started"
            return [f"{is_now['path']}: its processor, tokenizer, chat template or generation config {why}"]
    return []


def _drop_stale_samples(run_dir: Path, plan: RecipePlan, aside: Path) -> list[str]:
    """Records whose sample changed in the dataset, or left it, set aside (the recipe evaluates the changed ones
    again); a finished recipe that lost records, or lacks samples the dataset now holds, is continued."""
    name = plan.recipe.name
    folder = RunFolder(run_dir).recipe(name)
    records = read_samples(folder.samples)
    if not records:
        return []
    current = _sample_keys(plan.recipe)
    stale = [r for r in records if current.get(id_text(r["id"])) != r[INPUT_KEY]]
    changed = sum(id_text(r["id"]) in current for r in stale)
    unrecorded = set(current) - {id_text(r["id"]) for r in records}
    if stale:
        _keep_a_copy(folder.samples, aside / name)
        gone = {id_text(r["id"]) for r in stale}
        kept = [r for r in records if id_text(r["id"]) not in gone]
        write_bytes(folder.samples, b"".join(orjson.dumps(r) + b"\n" for r in kept))
    if (stale or unrecorded) and folder.summary.exists():
        _keep_a_copy(folder.summary, aside / name)
        folder.summary.unlink()  # not finished any more: the run continues it
    notes = []
    if changed:
        notes.append(f"recipe '{name}': {changed} sample(s) changed in the dataset since they were recorded: "
                     "evaluated again")
    if len(stale) > changed:
        notes.append(f"recipe '{name}': {len(stale) - changed} sample(s) no longer in the dataset: left out")
    return notes


def _sample_keys(recipe: Recipe) -> dict[str, str]:
    try:
        return {id_text(sample.id): sample_key(sample) for sample in open_dataset(recipe.dataset or "", recipe)}
    except (DatasetError, OSError) as exc:
        raise ResumeError(f"recipe '{recipe.name}': its dataset cannot be read to compare with what was recorded "
                          f"({exc})") from None


def _set_aside(run_dir: Path, name: str, aside: Path) -> bool:
    """The recipe's folder moved under `aside` (kept, never deleted); False where it has none."""
    folder = RunFolder(run_dir).recipe(name).path
    if not folder.exists():
        return False
    make_folder(aside)
    shutil.move(folder, aside / name)
    return True


def _keep_a_copy(path: Path, folder: Path) -> None:
    make_folder(folder)
    shutil.copy2(path, folder / path.name)


def merged_recipes(run_dir: Path, plans: list[RecipePlan]) -> list[dict[str, Any]]:
    """run.json's recipes after a resume of `plans`: each as planned now, in the order recorded; those not resumed
    (--only) as they were; new ones (--force) after them."""
    now = {plan.recipe.name: planned_recipe(plan) for plan in plans}
    merged = [now.pop(r["name"], r) for r in recorded_recipes(run_dir)]
    return merged + list(now.values())


def setting_changes(old: dict[str, Any], now: dict[str, Any],
                    ignore: frozenset[str] | set[str] = frozenset()) -> list[tuple[str, Any, Any]]:
    """(field, old value, new value) of each recorded recipe setting that differs, by field name, less those that
    never change what a recipe produces (RESULT_NEUTRAL) and `ignore`."""
    keys = sorted((set(now) | set(old)) - RESULT_NEUTRAL - set(ignore))
    return [(key, _recorded(old, key), _recorded(now, key)) for key in keys
            if _recorded(old, key) != _recorded(now, key)]


def _recorded(settings: dict[str, Any], key: str) -> Any:
    """A recorded value of a setting; one added since the run was recorded had its default then (a new setting's
    default keeps the behaviour from before it existed), so an older run.json still compares."""
    if key in settings or key not in Recipe.model_fields:
        return settings.get(key)
    return Recipe.model_fields[key].default
