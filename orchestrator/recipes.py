"""The recipe file: a closed schema, validated whole before anything runs.

    [defaults]            settings every recipe inherits
    [lineage]             remap = { "/training/machine/prefix" = "/here" }, allow_network = false
    [[recipe]]            name, model, and any setting from [defaults]

Every error names the file, the recipe and the field, and all of them are reported together.
Relative paths are relative to the recipe file's folder.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# A decode step of a 7B model costs about the same at batch 1 and 256 on an H100 (30-36 ms: generate's per-step host
# work and syncs, not the GPU, set it), so per-sample time keeps falling with the batch: 29 ms at 64, 22 ms at 128,
# 18 ms at 256 (BENCHMARKS.md). The preflight lowers it to what fits, and to the dataset's size.
AUTO_BATCH_CAP = 256
UNCHECKED_AUTO_BATCH = 8  # "auto" without a GPU preflight to size it (CPU runs, no estimate)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class RecipeFileError(Exception):
    """Everything wrong with a recipe file, one line per problem."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{path}: {len(problems)} problem(s):\n{lines}")


class Settings(BaseModel):
    """What [defaults] may set, and every recipe may override."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str | None = None
    prompt: str = "{prompt}"
    box_format: Literal["qwen2vl", "json_pixels"] = "qwen2vl"
    max_new_tokens: int = Field(64, gt=0, le=8192)
    batch_size: int | Literal["auto"] = Field("auto", description="samples per generate; auto: the largest the "
                                            "GPU's free memory allows (at most 256), or 8 without a GPU preflight")
    min_new_tokens: int | None = Field(None, ge=0, description="force at least this many new tokens (benchmarks)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    attn: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    limit: int | None = Field(None, gt=0, description="evaluate only the first N samples")
    timeout: float | None = Field(None, gt=0, description="seconds for the whole recipe")
    startup_timeout: float = Field(300.0, gt=0, description="seconds from spawn to the worker's hello")
    load_timeout: float = Field(1800.0, gt=0, description="seconds from hello to weights loaded")
    stall_timeout: float = Field(900.0, gt=0, description="seconds without a message once samples run")
    retries: int = Field(0, ge=0, le=10, description="re-runs after a crash, a kill or a timeout")
    retry_backoff: float = Field(5.0, ge=0, description="seconds before the first retry; doubles each time")
    memory_margin: float = Field(0.10, ge=0, le=1, description="safety margin on the memory estimate (0.1 = 10%)")
    loader: Literal["staged", "transformers"] = Field(
        "staged", description="staged: threads read safetensors through pinned buffers onto the device; "
        "transformers: its own from_pretrained reads (slower on a GPU; a fallback for checkpoints staging can't read)")
    merge_adapters: bool = Field(False, description="merge the top adapter into the weights too, as the lower ones "
                                 "always are: decoding runs as fast as the base model's, while the results may "
                                 "differ from the unmerged adapter's in the last bits (bf16 rounding of W + BA)")
    trust_remote_code: bool = False
    allow_pickle: bool = False
    image_cache: bool = Field(False, description="keep each sample's processor output on disk (in cache_dir/"
                              "preprocessed), shared by every recipe whose processor has the same settings; off by "
                              "default: entries are large (float32 pixels), never evicted, and batch preparation "
                              "already runs ahead of the GPU")
    cache_dir: str | None = Field(None, description="evalorch's cache folder; default $EVALORCH_CACHE, else "
                                  "$XDG_CACHE_HOME/evalorch, else ~/.cache/evalorch")

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 0 < value <= 4096:
            raise ValueError("must be between 1 and 4096, or \"auto\"")
        return value

    @property
    def requested_batch(self) -> int:
        """The batch size to aim for: the recipe's, or for "auto" the cap the preflight may lower to fit."""
        return AUTO_BATCH_CAP if self.batch_size == "auto" else self.batch_size

    @field_validator("prompt")
    @classmethod
    def _prompt_fields(cls, value: str) -> str:
        unknown = set(re.findall(r"{(\w*)}", value)) - {"prompt", "id"}
        if unknown:
            raise ValueError(f"unknown placeholder(s) {sorted(unknown)}; allowed: {{prompt}}, {{id}}")
        return value


class Recipe(Settings):
    """One model to evaluate."""

    name: str
    model: str
    base: str | None = None
    base_override: bool = False
    baseline: bool = False

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("use letters, digits, '.', '_' and '-' (it names a folder)")
        return value


class LineageRules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    remap: dict[str, str] = Field(default_factory=dict)
    allow_network: bool = False
    max_depth: int = Field(8, gt=0)


class RecipeFile(BaseModel):
    """A validated recipe file; paths in it are absolute."""

    model_config = ConfigDict(frozen=True)

    path: Path
    recipes: list[Recipe]
    lineage: LineageRules

    def select(self, only: list[str] | None) -> list[Recipe]:
        if not only:
            return list(self.recipes)
        known = {r.name for r in self.recipes}
        unknown = [n for n in only if n not in known]
        if unknown:
            raise RecipeFileError(self.path, [f"--only names unknown recipe(s): {', '.join(unknown)}"])
        return [r for r in self.recipes if r.name in only]

    @property
    def baseline(self) -> Recipe | None:
        return next((r for r in self.recipes if r.baseline), None)


def load_recipe_file(path: Path) -> RecipeFile:
    """Read, merge defaults into each recipe, validate everything; raise RecipeFileError with every problem."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RecipeFileError(path, ["file not found"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeFileError(path, [f"not valid TOML: {exc}"]) from None
    problems: list[str] = []
    unknown = sorted(set(raw) - {"defaults", "lineage", "recipe"})
    problems += [f"unknown table [{name}] (known: [defaults], [lineage], [[recipe]])" for name in unknown]
    defaults = _table(raw, "defaults", problems)
    lineage = _validate_lineage(_table(raw, "lineage", problems), problems)
    folder = path.parent.resolve()
    lineage = lineage.model_copy(update={"remap": {k: str(folder / v) for k, v in lineage.remap.items()}})
    entries = raw.get("recipe", [])
    if not isinstance(entries, list) or not entries:
        problems.append("no [[recipe]] entries")
        entries = []
    recipes = [_validate_recipe(i, entry, defaults, path, problems) for i, entry in enumerate(entries, 1)]
    recipes = [r for r in recipes if r is not None]
    problems += _duplicate_names(entries) + _cross_recipe_problems(recipes)
    if problems:
        raise RecipeFileError(path, problems)
    return RecipeFile(path=path.resolve(), recipes=recipes, lineage=lineage)


def _table(raw: dict, name: str, problems: list[str]) -> dict:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        problems.append(f"[{name}] must be a table")
        return {}
    return value


def _describe(exc: ValidationError, where: str) -> list[str]:
    out = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(entry)"
        given = "" if err["type"] == "missing" else f" (got {err.get('input')!r})"
        message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        out.append(f"{where}, field '{field}': {message}{given}")
    return out


def _validate_lineage(table: dict, problems: list[str]) -> LineageRules:
    try:
        return LineageRules(**table)
    except ValidationError as exc:
        problems += _describe(exc, "[lineage]")
        return LineageRules()


def _validate_recipe(
    index: int, entry: Any, defaults: dict, path: Path, problems: list[str]
) -> Recipe | None:
    if not isinstance(entry, dict):
        problems.append(f"recipe #{index}: must be a table")
        return None
    where = f"recipe '{entry.get('name', '?')}' (#{index})"
    try:
        Settings(**defaults)
    except ValidationError as exc:
        if index == 1:  # report [defaults] problems once, not once per recipe
            problems += _describe(exc, "[defaults]")
        return None
    try:
        recipe = Recipe(**{**defaults, **entry})
    except ValidationError as exc:
        problems += _describe(exc, where)
        return None
    return _resolve_paths(recipe, path.parent.resolve(), where, problems)


def _resolve_paths(recipe: Recipe, folder: Path, where: str, problems: list[str]) -> Recipe:
    """Make local paths absolute and check they exist; hub ids stay as they are for lineage to find."""
    updates: dict[str, str] = {}
    if recipe.dataset is None:
        problems.append(f"{where}, field 'dataset': no dataset (set it in the recipe or in [defaults])")
    else:
        dataset = folder / recipe.dataset
        if not dataset.is_file():
            problems.append(f"{where}, field 'dataset': file not found: {dataset}")
        updates["dataset"] = str(dataset)
    for field in ("model", "base"):
        value = getattr(recipe, field)
        if value is None:
            continue
        local = folder / value
        if local.is_dir():
            updates[field] = str(local)
        elif not _HUB_ID.match(value) or value.startswith((".", "/")):
            problems.append(f"{where}, field '{field}': no such directory: {local}")
    updates["cache_dir"] = str(cache_root(recipe.cache_dir, folder))
    return recipe.model_copy(update=updates)


def cache_root(value: str | None, folder: Path) -> Path:
    """evalorch's cache folder (created when first written): the recipe's `cache_dir` (relative to the recipe
    file's folder, like every path in it), else $EVALORCH_CACHE, else $XDG_CACHE_HOME/evalorch, else
    ~/.cache/evalorch."""
    if value is not None:
        return folder / Path(value).expanduser()
    if os.environ.get("EVALORCH_CACHE"):
        return Path(os.environ["EVALORCH_CACHE"]).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache") / "evalorch"


def _duplicate_names(entries: list) -> list[str]:
    """From the raw entries, so a duplicate is reported even when one of the pair has other problems."""
    problems, seen = [], set()
    for index, entry in enumerate(entries, 1):
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str) and name in seen:
            problems.append(f"recipe '{name}' (#{index}), field 'name': duplicate name")
        seen.add(name)
    return problems


def _cross_recipe_problems(recipes: list[Recipe]) -> list[str]:
    problems = []
    baselines = [r.name for r in recipes if r.baseline]
    if len(baselines) > 1:
        problems.append(f"field 'baseline': set on {len(baselines)} recipes ({', '.join(baselines)}); one at most")
    for recipe in recipes:
        if recipe.base_override and recipe.base is None:
            problems.append(f"recipe '{recipe.name}', field 'base_override': needs 'base' to be set")
    return problems
