"""The recipe file: a closed schema, validated whole before anything runs.

    [defaults]            settings every recipe inherits
    [lineage]             remap = { "/training/machine/prefix" = "/here" }, allow_network = false
    [[recipe]]            name, model, and any setting from [defaults]

A recipe that sweeps a training run's checkpoints (`checkpoints`) becomes one recipe per checkpoint here
(sweep.py), so everything downstream sees plain recipes. Every error names the file, the recipe and the field,
and all of them are reported together.
Relative paths are relative to the recipe file's folder.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from difflib import get_close_matches
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

from contract.dataset import dataset_exists, dataset_problems, is_glob
from contract.recipe import CHECKPOINT_MARK, Recipe, Settings
from contract.run_row import TrainedCheckpoint
from orchestrator.errors import UserError
from orchestrator.planning.sweep import SweepError, sweep_recipes

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
    """A validated recipe file; paths in it are absolute. A sweep's recipes are one per checkpoint, and
    `checkpoints` holds each one's record by its name (`<recipe>@<step>`)."""

    model_config = ConfigDict(frozen=True)

    path: Path
    recipes: list[Recipe]
    lineage: LineageRules
    checkpoints: dict[str, TrainedCheckpoint] = Field(default_factory=dict)

    def select(self, only: list[str] | None) -> list[Recipe]:
        """The recipes `only` names (all without it); a sweep's name selects each of its checkpoints."""
        if not only:
            return list(self.recipes)
        known = {r.name for r in self.recipes} | {c.sweep for c in self.checkpoints.values()}
        unknown = [n for n in only if n not in known]
        if unknown:
            raise RecipeFileError(self.path, [f"--only names unknown recipe(s): {', '.join(unknown)}"])
        return [r for r in self.recipes if r.name in only or self._sweep_of(r.name) in only]

    def _sweep_of(self, name: str) -> str | None:
        found = self.checkpoints.get(name)
        return found.sweep if found is not None else None

    @property
    def baseline(self) -> Recipe | None:
        return next((r for r in self.recipes if r.baseline), None)


def load_recipe_file(path: Path, *, paths_on_nodes: bool = False) -> RecipeFile:
    """Read, merge defaults into each recipe, validate everything; raise RecipeFileError with every problem.
    `paths_on_nodes` (--backend ray): a model or dataset path missing here is kept, made absolute, for the
    nodes that run the workers to resolve (backends/ray/node.py); they refuse what they cannot find."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_bytes().decode("utf-8-sig"))  # a BOM (Windows editors write one) is dropped
    except FileNotFoundError:
        raise RecipeFileError(path, ["file not found"]) from None
    except OSError as exc:
        raise RecipeFileError(path, [f"cannot be read ({exc.strerror or exc})"]) from None
    except UnicodeDecodeError as exc:
        raise RecipeFileError(path, [f"not UTF-8 text (byte {exc.start}): a TOML file is UTF-8"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeFileError(path, [f"not valid TOML: {exc}"]) from None
    problems: list[str] = []
    unknown = sorted(set(raw) - {"defaults", "lineage", "recipe"})
    problems += [f"unknown table [{name}] (known: [defaults], [lineage], [[recipe]])" for name in unknown]
    defaults = _valid_defaults(_table(raw, "defaults", problems), problems)
    lineage = _validate_lineage(_table(raw, "lineage", problems), problems)
    folder = path.parent.resolve()
    lineage = lineage.model_copy(update={"remap": {k: str(folder / v) for k, v in lineage.remap.items()}})
    entries = raw.get("recipe", [])
    if isinstance(entries, dict):
        problems.append("[recipe] is one table: write each recipe as [[recipe]] (an array of tables)")
        entries = []
    elif not isinstance(entries, list) or not entries:
        problems.append("no [[recipe]] entries")
        entries = []
    validated = [_validate_recipe(i, entry, defaults, path, problems, paths_on_nodes)
                 for i, entry in enumerate(entries, 1)]
    recipes, checkpoints = _swept(validated, problems)
    problems += _duplicate_names(entries) + _cross_recipe_problems(recipes)
    if problems:
        raise RecipeFileError(path, problems)
    return RecipeFile(path=path.resolve(), recipes=recipes, lineage=lineage, checkpoints=checkpoints)


def _table(raw: dict, name: str, problems: list[str]) -> dict:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        problems.append(f"[{name}] must be a table")
        return {}
    return value


def _describe(exc: ValidationError, where: str, model: type[BaseModel]) -> list[str]:
    """One line per mistaken field, written for a person: pydantic reports a value that fits no member of a union
    (`int | "auto"`) once per member; those are one mistake, said as what was expected and what was given."""
    by_field: dict[tuple, list[ErrorDetails]] = {}
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = loc[:1] if loc and _is_union(model, loc[0]) else loc  # the rest of a union's loc names its members
        by_field.setdefault(key, []).append(err)
    out = []
    for loc, errors in by_field.items():
        field = ".".join(str(p) for p in loc) or "(entry)"
        out.append(f"{where}, field '{field}': {_mistake(errors, model, loc)}")
    return out


def _is_union(model: type[BaseModel], name: object) -> bool:
    info = model.model_fields.get(name) if isinstance(name, str) else None
    return info is not None and get_origin(info.annotation) in (Union, UnionType)


def _mistake(errors: list[ErrorDetails], model: type[BaseModel], loc: tuple) -> str:
    """What is wrong with one field's value. A value of the right type that breaks a rule (a range, a name)
    says the rule; a value of no allowed type says which types are allowed."""
    kind = errors[0]["type"]
    if kind == "extra_forbidden":
        close = get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
        return "unknown field" + (f" (did you mean '{close[0]}'?)" if close else "")
    if kind == "missing":
        return "required, but not set"
    given = _shown(errors[0].get("input"))
    ruled = [e for e in errors if not _is_type_error(e["type"])]
    if ruled or len(loc) != 1 or loc[0] not in model.model_fields:
        rule = (ruled or errors)[0]["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
        return rule if given in rule else f"{rule}, got {given}"
    return f"expected {_expected(model.model_fields[loc[0]].annotation)}, got {given}"


def _is_type_error(kind: str) -> bool:
    return kind.endswith(("_type", "_parsing")) or kind in ("literal_error", "int_from_float", "enum")


def _expected(annotation: Any) -> str:
    """An annotation in words: `int | Literal["auto"]` -> 'an integer or "auto"'."""
    if get_origin(annotation) in (Union, UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]  # TOML has no null: leave the field out
        if float in members:
            members = [a for a in members if a is not int]  # a number includes the integers
        return " or ".join(_expected(a) for a in members)
    if get_origin(annotation) is Literal:
        options = [json.dumps(v) for v in get_args(annotation)]
        return options[0] if len(options) == 1 else ", ".join(options[:-1]) + " or " + options[-1]
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a table",
             list: "a list"}
    return words.get(get_origin(annotation) or annotation, getattr(annotation, "__name__", str(annotation)))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _validate_lineage(table: dict, problems: list[str]) -> LineageRules:
    try:
        return LineageRules(**table)
    except ValidationError as exc:
        problems += _describe(exc, "[lineage]", LineageRules)
        return LineageRules()


def _valid_defaults(defaults: dict, problems: list[str]) -> dict:
    """[defaults] without its mistaken fields (reported here, once), so that each recipe is still checked whole
    and its own mistakes are not hidden behind those of [defaults]."""
    try:
        Settings(**defaults)
    except ValidationError as exc:
        problems += _describe(exc, "[defaults]", Settings)
        bad = {err["loc"][0] for err in exc.errors() if err["loc"]}
        return {key: value for key, value in defaults.items() if key not in bad}
    return defaults


def _validate_recipe(index: int, entry: Any, defaults: dict, path: Path, problems: list[str],
                     paths_on_nodes: bool = False) -> Recipe | None:
    """The recipe with its paths made absolute, or None; every problem of its fields and of its paths is added
    to `problems`, the paths' too when a field is wrong."""
    if not isinstance(entry, dict):
        problems.append(f"recipe #{index}: must be a table")
        return None
    name = entry.get("name")
    where = f"recipe '{name if isinstance(name, str) else '?'}' (#{index})"
    merged = {**defaults, **entry}
    path_problems: list[str] = []
    missing_ok = paths_on_nodes
    updates, dataset_found = _resolve_paths(merged, path.parent.resolve(), where, path_problems, missing_ok)
    try:
        recipe = Recipe(**merged)
    except ValidationError as exc:
        problems += _describe(exc, where, Recipe)
        recipe = None
    problems += path_problems
    if recipe is None:
        return None
    resolved = recipe.model_copy(update=updates)
    if dataset_found and not missing_ok:  # then what would fail every sample: the reader's own checks
        problems += [f"{where}, field '{field}': {problem}" for field, problem in dataset_problems(resolved)]
    return resolved


def _resolve_paths(fields: dict[str, Any], folder: Path, where: str, problems: list[str],
                   missing_ok: bool = False) -> tuple[dict[str, str], bool]:
    """Local paths made absolute, each checked to exist (from the raw fields: a recipe with another mistake has
    its paths checked too) unless `missing_ok` (--backend ray: the nodes resolve them); hub ids stay as they are
    for lineage to find. Fields that are not strings are the schema's to report. Also says whether the dataset
    was found (then the reader's own checks can run)."""
    updates: dict[str, str] = {}
    known_problems = len(problems)
    dataset = fields.get("dataset")
    if dataset is None:
        problems.append(f"{where}, field 'dataset': no dataset (set it in the recipe or in [defaults])")
    elif isinstance(dataset, str):
        found = folder / Path(dataset).expanduser()  # a file, a folder or a glob of parquet files
        updates["dataset"] = str(found)
        if not dataset_exists(found) and not missing_ok:
            missing = "no files match" if is_glob(str(found)) else "file not found"
            problems.append(f"{where}, field 'dataset': {missing}: {found}")
    image_root = fields.get("image_root")
    if isinstance(image_root, str):
        updates["image_root"] = str(folder / Path(image_root).expanduser())
        if not Path(updates["image_root"]).is_dir():
            problems.append(f"{where}, field 'image_root': no such directory: {updates['image_root']}")
    ids = fields.get("ids")
    if isinstance(ids, str):  # a file of ids
        updates["ids"] = str(folder / Path(ids).expanduser())
        if not Path(updates["ids"]).is_file():
            problems.append(f"{where}, field 'ids': file not found: {updates['ids']}")
    dataset_found = len(problems) == known_problems and isinstance(dataset, str)
    for field in ("model", "base"):
        value = fields.get(field)
        if not isinstance(value, str):
            continue
        local = folder / value
        if local.is_dir():
            updates[field] = str(local)
        elif not _HUB_ID.match(value) or value.startswith((".", "/")):
            if not missing_ok:
                problems.append(f"{where}, field '{field}': no such directory: {local}")
            updates[field] = str(local)
    cache_dir = fields.get("cache_dir")
    if cache_dir is None or isinstance(cache_dir, str):
        updates["cache_dir"] = str(cache_root(cache_dir, folder))
    return updates, dataset_found


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


def _swept(validated: list[Recipe | None], problems: list[str]) -> tuple[list[Recipe], dict[str, TrainedCheckpoint]]:
    """The recipes in file order, a sweep's (`checkpoints`) as one recipe per checkpoint, and each checkpoint's
    record by its recipe's name; what a sweep cannot carry out is added to `problems`."""
    recipes: list[Recipe] = []
    checkpoints: dict[str, TrainedCheckpoint] = {}
    for index, recipe in enumerate(validated, 1):
        if recipe is None:
            continue
        if recipe.checkpoints is None:
            recipes.append(recipe)
            continue
        where = f"recipe '{recipe.name}' (#{index})"
        if recipe.baseline:
            problems.append(f"{where}, field 'baseline': a sweep is one recipe per checkpoint, and a run has one "
                            "baseline: set it on a recipe of its own (its model one checkpoint-N folder)")
            continue
        try:
            swept = sweep_recipes(recipe)
        except SweepError as exc:
            problems.append(f"{where}, field 'checkpoints': {exc}")
            continue
        recipes += [checkpoint for checkpoint, _ in swept]
        checkpoints |= {checkpoint.name: record for checkpoint, record in swept}
    return recipes, checkpoints


def _duplicate_names(entries: list) -> list[str]:
    """From the raw entries, so a duplicate is reported even when one of the pair has other problems; a name
    with '@' is a sweep's (`<recipe>@<step>`), never a recipe file's."""
    problems, seen = [], set()
    for index, entry in enumerate(entries, 1):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            continue
        if name in seen:
            problems.append(f"recipe '{name}' (#{index}), field 'name': duplicate name")
        if CHECKPOINT_MARK in name:
            problems.append(f"recipe '{name}' (#{index}), field 'name': '{CHECKPOINT_MARK}' names a swept "
                            f"checkpoint (<recipe>{CHECKPOINT_MARK}<step>, from `checkpoints`); choose a name "
                            "without it")
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
