"""The verdict for each recipe before anything runs: its resolved chain, or why it cannot run."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from contract.boxes import AUTO, BOX_FORMATS, native_format
from contract.checkpoint import CONFIG, CheckpointError, read_json_object
from contract.processor import ProcessorSource, processor_source
from contract.quantization import Quantization, recipe_quantization, refusal
from contract.recipe import Recipe
from contract.run_row import TrainedCheckpoint
from contract.spec import ChainLink
from orchestrator.errors import UserError
from orchestrator.planning.lineage import LineageError, resolve_chain
from orchestrator.planning.recipes import RecipeFile


class BoxFormatError(UserError):
    """box_format = "auto" for a model family with no single native convention: a config error (exit code 2)."""


@dataclass
class RecipePlan:
    recipe: Recipe
    chain: list[ChainLink] | None = None
    problem: str | None = None  # set when the recipe must not run
    box_format_from: str = "recipe"  # how recipe.box_format was chosen: "recipe", or auto's reading of config.json
    processor: ProcessorSource | None = None  # where its processor comes from, and the resolution it resizes to
    checkpoint: TrainedCheckpoint | None = None  # a swept checkpoint's step and trainer's eval losses (sweep.py)
    quantization: Quantization | None = None  # its base's bitsandbytes quantization, as the recipe evaluates it

    @property
    def runnable(self) -> bool:
        return self.problem is None

    @property
    def problem_kind(self) -> str:
        """The error kind a problem is recorded as: "config" (a setting, or the device, does not fit the model), else
        "lineage" (the chain of weights)."""
        return "config" if (self.problem or "").startswith("config:") else "lineage"

    def as_trained(self) -> dict[str, Any] | None:
        """What the recipe's row records of how it is evaluated as it was trained (beside its lineage, which says
        where each link came from): its processor's folder and resolution, a note where that resolution is not
        its base's, and the adapters whose embeddings the worker resizes first."""
        if self.chain is None or self.processor is None:
            return None
        return {"processor": asdict(self.processor), "processor_text": self.processor.describe(),
                "resolution_note": self.processor.resolution_note(),
                "embeddings_resized": [{"adapter": link.path, "rows": link.embedding_rows}
                                       for link in self.chain if link.embedding_rows is not None]}

    @property
    def overridden_base(self) -> bool:
        """The recipe loads its adapter on a base other than the one the adapter records."""
        return self.chain is not None and any(link.source == "recipe-base" for link in self.chain)


def make_plans(recipe_file: RecipeFile, recipes: list[Recipe], *, hash_weights: bool = False,
               box_formats: bool = True) -> list[RecipePlan]:
    """Resolve every recipe's lineage up front, so every problem is known before the first worker starts, and
    (with `box_formats`) each "auto" box format from the root checkpoint's model family. A family without one
    native convention under "auto" raises BoxFormatError naming every such recipe."""
    plans, unresolved = [], []
    for recipe in recipes:
        checkpoint = recipe_file.checkpoints.get(recipe.name)
        try:
            chain = resolve_chain(recipe, recipe_file.lineage, hash_weights=hash_weights)
            processor = processor_source([link.path for link in chain], recipe.image_bounds)
            quantization = recipe_quantization(Path(chain[0].path), recipe)
        except LineageError as exc:
            plans.append(RecipePlan(recipe, problem=f"lineage: {exc}", checkpoint=checkpoint))
            continue
        except CheckpointError as exc:  # a damaged processor file, a quantization evalorch cannot evaluate
            plans.append(RecipePlan(recipe, problem=f"lineage: recipe '{recipe.name}': {exc}", checkpoint=checkpoint))
            continue
        plan = RecipePlan(recipe, chain=chain, processor=processor, checkpoint=checkpoint, quantization=quantization)
        if box_formats and recipe.box_format == AUTO:
            try:
                plan = _with_native_format(plan)
            except BoxFormatError as exc:
                unresolved.append(str(exc))
        plans.append(plan)
    if unresolved:
        raise BoxFormatError("\n".join(unresolved) + f"\nSet box_format to one of: {', '.join(BOX_FORMATS)} "
                             "(docs/models.md: Box formats); evalorch never guesses it from the numbers.")
    return plans


def for_device(plans: list[RecipePlan], device: str, *, bitsandbytes: bool | None) -> list[RecipePlan]:
    """The plans as they stand on `device`: a recipe whose quantized base cannot be evaluated there as it asks
    (contract/quantization.py: a CPU, no bitsandbytes) becomes that recipe's config error, saying what to install
    or set, before any worker starts; the others are unchanged. `bitsandbytes`: whether the workers can import it
    (bitsandbytes_installed() for workers on this host; None where they run elsewhere: their worker checks)."""
    return [replace(plan, problem=f"config: recipe '{plan.recipe.name}': {reason}")
            if plan.runnable and plan.quantization is not None
            and (reason := refusal(plan.quantization, device=device, bitsandbytes=bitsandbytes)) is not None
            else plan for plan in plans]


def bitsandbytes_installed() -> bool:
    """Whether this interpreter (the one the local workers run) has bitsandbytes, found without importing it."""
    return importlib.util.find_spec("bitsandbytes") is not None


def _with_native_format(plan: RecipePlan) -> RecipePlan:
    """The plan with box_format = the native format of its root checkpoint's family (config.json model_type). A
    config that cannot say its family (damaged: unreadable, no model_type) fails its own recipe; a family with no
    single native convention raises BoxFormatError (the recipe file must name a format)."""
    config_file = Path((plan.chain or [])[0].path) / CONFIG
    try:
        model_type = read_json_object(config_file).get("model_type")
    except CheckpointError as exc:
        return replace(plan, problem=f"config: box_format = \"auto\" cannot read the family: {exc}")
    if not isinstance(model_type, str) or not model_type:
        return replace(plan, problem=f"config: {config_file}: model_type is {model_type!r}, so box_format = "
                       "\"auto\" cannot tell the family; restore the file, or set box_format")
    found = native_format(model_type)
    if found is None:
        raise BoxFormatError(f"recipe '{plan.recipe.name}': box_format = \"auto\", but model_type {model_type!r} "
                             f"({config_file}) has no single native box convention")
    recipe = plan.recipe.model_copy(update={"box_format": found})
    return replace(plan, recipe=recipe, box_format_from=f"auto: model_type {model_type!r} in {config_file}")



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
