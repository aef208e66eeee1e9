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
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from contract.recipe import Recipe, Settings

from .errors import UserError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class RecipeFileError(UserError):
    """Everything wrong with a recipe file, one line per problem."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{path}: {len(problems)} problem(s):\n{lines}")



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


def load_recipe_file(path: Path, *, paths_on_nodes: bool = False) -> RecipeFile:
    """Read, merge defaults into each recipe, validate everything; raise RecipeFileError with every problem.
    `paths_on_nodes` (--backend ray): a model or dataset path missing here is kept, made absolute, for the
    nodes that run the workers to resolve (ray_node.py); they refuse what they cannot find."""
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
    recipes = [_validate_recipe(i, entry, defaults, path, problems, paths_on_nodes)
               for i, entry in enumerate(entries, 1)]
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
    index: int, entry: Any, defaults: dict, path: Path, problems: list[str], paths_on_nodes: bool = False
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
    return _resolve_paths(recipe, path.parent.resolve(), where, problems, missing_ok=paths_on_nodes)


def _resolve_paths(recipe: Recipe, folder: Path, where: str, problems: list[str], missing_ok: bool = False) -> Recipe:
    """Make local paths absolute and check they exist (unless `missing_ok`); hub ids stay as they are for
    lineage to find."""
    updates: dict[str, str] = {}
    if recipe.dataset is None:
        problems.append(f"{where}, field 'dataset': no dataset (set it in the recipe or in [defaults])")
    else:
        dataset = folder / recipe.dataset
        if not dataset.is_file() and not missing_ok:
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
            if not missing_ok:
                problems.append(f"{where}, field '{field}': no such directory: {local}")
            updates[field] = str(local)
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
