"""Continuing an interrupted run in its own folder, only when what it evaluates has not changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from contract.layout import RunFolder
from contract.recipe import Recipe

from .errors import UserError
from .plan import RecipePlan
from .results import read_json

# Settings that change how fast a recipe runs, never what it produces: recorded, but a resume ignores them.
RESULT_NEUTRAL = frozenset({"image_cache", "cache_dir", "parity_check"})


class ResumeError(UserError):
    """The run folder cannot be resumed as asked."""


def planned_recipe(plan: RecipePlan) -> dict[str, Any]:
    """What run.json records of a recipe, and what a resume compares: settings and the chain's fingerprints."""
    return {**plan.recipe.model_dump(), "problem": plan.problem,
            "chain": [link.__dict__ for link in plan.chain or []]}


def differences(run_dir: Path, plans: list[RecipePlan]) -> list[str]:
    """How the recipes now differ from those the run started with (settings, weights), one line each."""
    record = RunFolder(run_dir).record
    if not record.exists():
        raise ResumeError(f"{run_dir} is not a run folder (no run.json)")
    before = {r["name"]: r for r in read_json(record)["recipes"]}
    found = []
    for plan in plans:
        old = before.get(plan.recipe.name)
        if old is None:
            found.append(f"recipe '{plan.recipe.name}' is new")
            continue
        now = planned_recipe(plan)
        if _fingerprints(now["chain"]) != _fingerprints(old.get("chain", [])):
            found.append(f"recipe '{plan.recipe.name}': weights changed (lineage fingerprints differ)")
        found += [f"recipe '{plan.recipe.name}', field '{key}': {before!r} -> {after!r}"
                  for key, before, after in setting_changes(old, now, ignore={"chain"})]
    return found


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


def _fingerprints(chain: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(link["path"], link["fingerprint"]) for link in chain]
