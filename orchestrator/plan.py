"""The verdict for each recipe before anything runs: its resolved chain, or why it cannot run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from contract.recipe import Recipe
from contract.spec import ChainLink

from .lineage import LineageError, resolve_chain
from .recipes import RecipeFile


@dataclass
class RecipePlan:
    recipe: Recipe
    chain: list[ChainLink] | None = None
    problem: str | None = None  # set when the recipe must not run

    @property
    def runnable(self) -> bool:
        return self.problem is None

    @property
    def overridden_base(self) -> bool:
        """The recipe loads its adapter on a base other than the one the adapter records."""
        return self.chain is not None and any(link.source == "recipe-base" for link in self.chain)


def make_plans(recipe_file: RecipeFile, recipes: list[Recipe], *, hash_weights: bool = False) -> list[RecipePlan]:
    """Resolve every recipe's lineage up front, so every problem is known before the first worker starts."""
    plans = []
    for recipe in recipes:
        try:
            chain = resolve_chain(recipe, recipe_file.lineage, hash_weights=hash_weights)
        except LineageError as exc:
            plans.append(RecipePlan(recipe, problem=f"lineage: {exc}"))
        else:
            plans.append(RecipePlan(recipe, chain=chain))
    return plans


@dataclass
class LaunchDecision:
    """The preflight's verdict just before a recipe's worker starts (see Preflight)."""

    ok: bool
    message: str = ""
    gpu: str | None = None  # the CUDA_VISIBLE_DEVICES value for the worker
    batch_size: int | None = None  # set when the preflight lowered the recipe's batch size to fit
    record: dict = field(default_factory=dict)  # estimate, free memory, holders...: kept in the recipe's summary


class Preflight(Protocol):
    """Decides, before each launch, whether and where a recipe runs; told when each worker has exited."""

    def before_launch(self, plan: RecipePlan, gpu: int | None = None) -> LaunchDecision:
        """The verdict for `plan`; on `gpu` only when the scheduler placed it there (several GPUs at once)."""
        ...

    def after_exit(self, plan: RecipePlan, pid: int | None) -> None: ...

    def expected_batch(self, plan: RecipePlan, gpu: int | None = None) -> int | None:
        """The batch size `plan` will most likely be given once the GPU is free again (None: unknown)."""
        ...
