"""Continuing an interrupted run in its own folder, only when what it evaluates has not changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .plan import RecipePlan
from .results import read_json


class ResumeError(Exception):
    """The run folder cannot be resumed as asked."""


def planned_recipe(plan: RecipePlan) -> dict[str, Any]:
    """What run.json records of a recipe, and what a resume compares: settings and the chain's fingerprints."""
    return {**plan.recipe.model_dump(), "problem": plan.problem,
            "chain": [link.__dict__ for link in plan.chain or []]}


def differences(run_dir: Path, plans: list[RecipePlan]) -> list[str]:
    """How the recipes now differ from those the run started with (settings, weights), one line each."""
    record = run_dir / "run.json"
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
        for key in sorted(set(now) | set(old)):
            if key == "chain":
                if _fingerprints(now["chain"]) != _fingerprints(old.get("chain", [])):
                    found.append(f"recipe '{plan.recipe.name}': weights changed (lineage fingerprints differ)")
            elif now.get(key) != old.get(key):
                found.append(f"recipe '{plan.recipe.name}', field '{key}': {old.get(key)!r} -> {now.get(key)!r}")
    return found


def _fingerprints(chain: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(link["path"], link["fingerprint"]) for link in chain]
