"""Resolving a recipe's `model` into the exact chain of weights to load: a pure function of files on disk.

A link is a full checkpoint (config.json + weights) or a PEFT adapter (adapter_config.json + weights). An
adapter's `base_model_name_or_path` is followed until a full checkpoint ends the chain; where it records none, or
one not found here, ms-swift's args.json beside it (its `model`, which `swift infer --adapters` reads) names the
base. A recorded path is looked for as it is, relative to the adapter, through the recipe file's remap rules, and
where it is a hub id or a training machine's cache folder in the local caches (caches.py). The chain is returned
root first, in the order the worker loads it, and each link carries a cheap fingerprint so every number in a
report can be traced to the weights that produced it; each adapter's vocabulary is checked against the model
beneath it (vocabulary.py).

No torch here: the parent (and `plan`, on a CPU-only CI runner) runs this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.checkpoint import (
    ADAPTER_CONFIG,
    CONFIG,
    SHARD_INDEX,
    CheckpointError,
    as_written,
    check_folder,
    files_fingerprint,
    fingerprint,
    present,
    read_json_object,
    safetensors_header,
    swift_args,
    weight_files,
)
from contract.recipe import Recipe
from contract.spec import ChainLink
from contract.units import format_bytes
from orchestrator.planning.caches import (
    CachedName,
    cached_name,
    from_hub_cache,
    from_modelscope_cache,
    hub_cache_dir,
    modelscope_cache_dir,
    modelscope_folders,
)
from orchestrator.planning.recipes import LineageRules
from orchestrator.planning.sweep import holds_checkpoints
from orchestrator.planning.vocabulary import VocabularyError, check_vocabulary


class LineageError(Exception):
    """A chain that cannot be resolved, or should not be loaded; the message says what to do."""


@dataclass
class Located:
    path: Path | None  # None: not found (then `tried` says where it was looked for)
    source: str  # how it was found: local, relative, remap, hub-cache, modelscope-cache, recipe-base
    tried: list[str] = field(default_factory=list)


@dataclass
class Found:
    """A checkpoint folder the chain goes on with: unlike a Located, always found (not found raises LineageError)."""

    path: Path
    source: str


def resolve_chain(recipe: Recipe, rules: LineageRules, *, hash_weights: bool = False) -> list[ChainLink]:
    """The recipe's chain, root (a full checkpoint) first; raise LineageError on any problem (a damaged
    checkpoint file included: its message names the file)."""
    try:
        return _resolve_chain(recipe, rules, hash_weights)
    except (CheckpointError, VocabularyError) as exc:
        raise LineageError(f"recipe '{recipe.name}': {exc}") from None


def _resolve_chain(recipe: Recipe, rules: LineageRules, hash_weights: bool) -> list[ChainLink]:
    links: list[ChainLink] = []
    seen: list[Path] = []
    located = _locate_model(recipe.model, rules)
    while True:
        real = located.path.resolve()
        if real in seen:
            loop = " -> ".join(str(p) for p in [*seen, real])
            raise LineageError(f"recipe '{recipe.name}': the adapter chain loops: {loop}")
        if len(seen) >= rules.max_depth:
            raise LineageError(
                f"recipe '{recipe.name}': chain deeper than {rules.max_depth} links "
                f"(raise [lineage] max_depth if this is intended): {' -> '.join(map(str, seen))}"
            )
        seen.append(real)
        link = _make_link(located, recipe, hash_weights)
        links.append(link)
        if link.kind == "full":
            break
        located = _locate_base(link, recipe, rules, is_top=len(links) == 1)
    links.reverse()
    check_chain(links)
    check_vocabulary(links)
    return links


def _locate_model(ref: str, rules: LineageRules) -> Found:
    path = Path(ref)
    if path.is_dir():
        return Found(path, "local")
    found = from_hub_cache(ref, rules.allow_network)
    if found is None:
        raise LineageError(
            f"model {ref!r} is neither a local directory nor in the local Hugging Face cache "
            f"({hub_cache_dir()}); download it first or give a local path"
        )
    return Found(found, "hub-cache")


def _locate_base(adapter: ChainLink, recipe: Recipe, rules: LineageRules, *, is_top: bool) -> Found:
    """The base an adapter records (adapter_config.json, else ms-swift's args.json), found here; with the recipe's
    `base` checked against it (top adapter only)."""
    folder = Path(adapter.path)
    recorded = adapter.recorded_base
    found = find_recorded_base(recorded, folder, rules) if recorded else Located(None, "")
    args_model = _args_model(folder) if found.path is None else None
    if args_model:
        from_args = find_recorded_base(args_model, folder, rules)
        found.tried += [f"{tried}  (args.json's model)" for tried in from_args.tried]
        if from_args.path is not None:
            adapter.base_from_args = args_model
            found = Located(from_args.path, from_args.source, found.tried)
    if not recorded and not args_model:
        raise LineageError(
            f"adapter {adapter.path}: adapter_config.json has no base_model_name_or_path (and no ms-swift args.json "
            "beside it names a `model`); set `base` in the recipe to say which checkpoint it was trained on"
        )
    named = adapter.base_from_args or recorded or args_model or ""
    if is_top and recipe.base is not None:
        return _apply_recipe_base(recipe, recipe.base, named, found, rules)
    if found.path is None:
        raise LineageError(_not_found_message(adapter.path, recorded, args_model, found.tried, rules))
    return Found(found.path, found.source)


def _args_model(adapter_dir: Path) -> str | None:
    """The base ms-swift's args.json names (`model`: a hub id or the path it was given), where there is one."""
    model = (swift_args(adapter_dir) or {}).get("model")
    return model if isinstance(model, str) and model else None


def _apply_recipe_base(recipe: Recipe, base: str, recorded: str, found: Located, rules: LineageRules) -> Found:
    """An explicit `base` (the recipe's) must agree with the adapter's record, unless the recipe says base_override."""
    explicit = _locate_model(base, rules)
    agrees = found.path is not None and found.path.resolve() == explicit.path.resolve()
    if not agrees and not recipe.base_override:
        if found.path is not None:
            where, fix = f"found at {found.path}", "remove `base`"
        else:  # the record may well mean the same checkpoint: a remap rule lets the two be compared
            where = "not found here; tried " + ", ".join(found.tried)
            fix = "add a [lineage] remap rule so the recorded base is found (then `base` is checked against it)"
        raise LineageError(
            f"recipe '{recipe.name}': `base` = {base} disagrees with the adapter's recorded base "
            f"{recorded!r} ({where}). Evaluating an adapter on another base silently changes its results; "
            f"{fix}, or set `base_override = true` to do it on purpose (the report marks it)"
        )
    return Found(explicit.path, "recipe-base" if not agrees else found.source)


def find_recorded_base(recorded: str, adapter_dir: Path, rules: LineageRules) -> Located:
    """Where an adapter's recorded base lives here. `path` is None when nowhere; `tried` lists every candidate."""
    tried: list[str] = []
    candidates: list[tuple[Path, str]] = []
    recorded_path = Path(recorded)
    if recorded_path.is_absolute():
        candidates.append((recorded_path, "local"))
    else:
        candidates.append(((adapter_dir / recorded_path), "relative"))
    candidates += [(path, f"remap {prefix} -> {target}") for path, prefix, target in remap_candidates(recorded, rules)]
    for path, source in candidates:
        tried.append(str(path))
        if path.is_dir():
            return Located(path, "remap" if source.startswith("remap") else source, tried)
    if not recorded_path.is_absolute() and "/" in recorded and not recorded.startswith("."):
        tried.append(f"hub id {recorded} in {hub_cache_dir()}")
        cached = from_hub_cache(recorded, rules.allow_network)
        if cached is not None:
            return Located(cached, "hub-cache", tried)
    name = cached_name(recorded) if recorded_path.is_absolute() else None
    if name is not None:
        return _from_local_caches(name, tried)
    return Located(None, "", tried)


def _from_local_caches(name: CachedName, tried: list[str]) -> Located:
    """A training machine's cache folder, looked for in this machine's caches by the hub id it names: the kind of
    cache it was recorded in first. Never the network: the record named a folder, not a download."""
    lookups = [("modelscope-cache", lambda: from_modelscope_cache(name.repo_id),
                " or ".join(str(f) for f in modelscope_folders(name.repo_id))),
               ("hub-cache", lambda: from_hub_cache(name.repo_id, False, name.revision),
                f"hub id {name.repo_id}" + (f" at revision {name.revision}" if name.revision else "")
                + f" in {hub_cache_dir()}")]
    for source, look, where in lookups if name.cache == "modelscope" else reversed(lookups):
        tried.append(where)
        found = look()
        if found is not None:
            return Located(found, source, tried)
    return Located(None, "", tried)


def remap_candidates(recorded: str, rules: LineageRules) -> list[tuple[Path, str, str]]:
    """Where the remap rules put a recorded path, longest prefix first: (path, prefix, target) for each rule."""
    out = []
    for prefix, target in sorted(rules.remap.items(), key=lambda kv: len(kv[0]), reverse=True):
        if recorded == prefix or recorded.startswith(prefix.rstrip("/") + "/"):
            rest = recorded[len(prefix.rstrip("/")) :].lstrip("/")
            out.append((Path(target) / rest, prefix, target))
    return out


def _not_found_message(adapter: str, recorded: str | None, args_model: str | None, tried: list[str],
                       rules: LineageRules) -> str:
    records = [repr(recorded)] if recorded else []
    records += [f"{args_model!r} (ms-swift's args.json)"] if args_model else []
    named = " and ".join(records)
    lines = [f"adapter {adapter} was trained on {named}, which was not found. Tried:"]
    lines += [f"    {t}" for t in tried]
    if rules.remap:
        lines.append("  remap rules in the recipe file: " + ", ".join(f"{k} -> {v}" for k, v in rules.remap.items()))
    else:
        lines.append("  no remap rules are set")
    lines.append(
        '  fix: add [lineage] remap = { "<training-machine prefix>" = "<where it is here>" } to the recipe file'
    )
    return "\n".join(lines)


def _make_link(located: Found, recipe: Recipe, hash_weights: bool) -> ChainLink:
    path = located.path
    if present(path / ADAPTER_CONFIG):
        config_file, kind = path / ADAPTER_CONFIG, "adapter"
    elif present(path / CONFIG):
        config_file, kind = path / CONFIG, "full"
    else:
        hint = (": a training output folder (checkpoint-N/ inside): set `checkpoints` in the recipe to evaluate them "
                "(docs/trainers.md)" if holds_checkpoints(path) else "")
        raise LineageError(f"{path}: neither adapter_config.json nor config.json: not a model folder{hint}")
    check_folder(path, kind, allow_pickle=recipe.allow_pickle)  # what the worker will read, checked now
    weights = weight_files(path, kind, allow_pickle=recipe.allow_pickle)
    recorded = None
    if kind == "adapter":
        recorded = _read_json(config_file).get("base_model_name_or_path")
        if recorded is not None and not isinstance(recorded, str):
            raise LineageError(f"{config_file}: base_model_name_or_path is {as_written(recorded)}, not a path or a "
                               "hub id")
    return ChainLink(
        path=str(path.resolve()),
        kind=kind,
        fingerprint=fingerprint(config_file, weights, hash_weights=hash_weights),
        bytes=sum(w.stat().st_size for w in weights),
        recorded_base=recorded,
        source=located.source,
        files_fingerprint=files_fingerprint(path),
    )


# ----------------------------------------------------------------------------- checks on a resolved chain

# The part of an adapter tensor's name where the adapted module's path ends (lora_A, lora_embedding_B,
# lora_magnitude_vector, ia3_l, hada_w1_a...).
_ADAPTER_MARKERS = ("lora_", "ia3_", "hada_", "lokr_", "oft_", "boft_", "vera_")


def check_chain(chain: list[ChainLink]) -> None:
    """Every adapter must fit the model beneath it: same family, and every module it adapts exists in the root.
    Raise LineageError otherwise; a mismatch found here would be a load failure or, worse, silently skipped
    adapter weights in the worker."""
    _check_model_identity(chain)
    _check_target_modules(chain)


def model_identity(folder: Path, kind: str) -> dict[str, tuple[Any, str]]:
    """What a link says about the model it is (full) or was trained on (adapter): `model_type` and
    `architecture` (a set of class names), each with the file that says so. Adapters often record neither;
    an adapter folder may carry its base's config.json, and peft records the class it wrapped in
    adapter_config.json's `auto_mapping` (the exact class, so it wins over config.json)."""
    found: dict[str, tuple[Any, str]] = {}
    config_file = folder / CONFIG
    config = _read_json(config_file) if present(config_file) else {}
    if model_type := _named(config, "model_type", config_file):
        found["model_type"] = (model_type, str(config_file))
    architectures = config.get("architectures")
    if architectures:
        if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
            raise LineageError(f"{config_file}: architectures is {as_written(architectures)}, expected a list of "
                               "class names")
        found["architecture"] = (frozenset(architectures), str(config_file))
    if kind == "adapter":
        adapter_file = folder / ADAPTER_CONFIG
        adapter = _read_json(adapter_file)
        mapping = adapter.get("auto_mapping") or {}
        if not isinstance(mapping, dict):
            raise LineageError(f"{adapter_file}: auto_mapping is {as_written(mapping)}, expected a JSON object")
        cls = _named(mapping, "base_model_class", adapter_file) or _named(adapter, "base_model_class", adapter_file)
        if cls:
            found["architecture"] = (frozenset([cls]), str(adapter_file))
    return found


def _named(config: dict, key: str, source: Path) -> str | None:
    """A name a config records (model_type, a class): a string, or None when it records none."""
    value = config.get(key)
    if value is not None and not isinstance(value, str):
        raise LineageError(f"{source}: {key} is {as_written(value)}, expected a name (a string)")
    return value or None


def _check_model_identity(chain: list[ChainLink]) -> None:
    """Compare what each adapter records with the nearest link beneath it that records the same thing."""
    known: dict[str, tuple[Any, str]] = {}
    for link in chain:
        for key, (value, source) in model_identity(Path(link.path), link.kind).items():
            if key in known and not _same_identity(key, known[key][0], value):
                raise LineageError(
                    f"adapter {link.path} was trained on a model with {key} {_show(value)} ({source}), but the "
                    f"model beneath it has {_show(known[key][0])} ({known[key][1]}). An adapter on another "
                    "architecture fails to load or silently skips weights: point it at the checkpoint it was "
                    "trained on (its base_model_name_or_path, a [lineage] remap rule, or the recipe's `base`)"
                )
            known[key] = (value, source)


def _same_identity(key: str, below: Any, above: Any) -> bool:
    return bool(below & above) if key == "architecture" else below == above


def _show(value: Any) -> str:
    return "/".join(sorted(value)) if isinstance(value, frozenset) else str(value)


def _check_target_modules(chain: list[ChainLink]) -> None:
    """Each module an adapter changes must exist in the root checkpoint (lower adapters add no modules: they
    are merged into the root's weights before the next one is applied)."""
    root = chain[0]
    base_modules = checkpoint_modules(Path(root.path))
    if base_modules is None:  # pickle weights, allowed by the recipe: their names need unpickling; loading checks
        return
    keys = {module_key(m) for m in base_modules}
    if _ties_embeddings(Path(root.path)):
        keys.add("lm_head")  # a tied lm_head is not saved: it is the embedding
    for link in chain[1:]:
        adapted = adapted_modules(Path(link.path))
        missing = sorted(m for m in adapted or () if module_key(m) not in keys)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise LineageError(
                f"adapter {link.path} changes {len(missing)} module(s) that its root checkpoint {root.path} "
                f"does not have: {shown}. It was trained on another model (another size or family), or the "
                "chain found the wrong base: check its base_model_name_or_path, the [lineage] remap rules and "
                "the recipe's `base`"
            )


def module_key(path: str) -> str:
    """The part of a module path that survives checkpoint renames: from the numbered block on
    ('model.language_model.layers.0.self_attn.q_proj' and the older checkpoint name 'model.layers.0.self_attn.q_proj'
    both give 'layers.0.self_attn.q_proj'), or the last name for a module outside any numbered block ('lm_head')."""
    parts = path.split(".")
    for index, part in enumerate(parts[1:], 1):
        if part.isdigit():
            return ".".join(parts[index - 1 :])
    return parts[-1]


def adapted_modules(folder: Path) -> set[str] | None:
    """The module paths an adapter changes, read from its safetensors header(s); None when it has none.
    'base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight' adapts
    'model.language_model.layers.0.self_attn.q_proj'. Tensors without an adapter marker are whole modules
    (modules_to_save), possibly new heads the base never had: not checked."""
    files = sorted(folder.glob("adapter_model*.safetensors"))
    if not files:
        return None
    modules = set()
    for file in files:
        for name in safetensors_header(file).tensors:
            parts = name.split(".")
            cut = next((i for i, part in enumerate(parts) if part.startswith(_ADAPTER_MARKERS)), None)
            if cut:
                modules.add(".".join(parts[:cut]).removeprefix("base_model.model."))
    return modules


def checkpoint_modules(folder: Path) -> set[str] | None:
    """The module paths that own a tensor in a full checkpoint: from the shard index, else the safetensors
    headers; None when its weights are not safetensors."""
    index = folder / SHARD_INDEX
    if index.is_file():
        names = list(_read_json(index).get("weight_map", {}))
    else:
        files = sorted(folder.glob("model*.safetensors"))
        if not files:
            return None
        names = [name for file in files for name in safetensors_header(file).tensors]
    return {name.rsplit(".", 1)[0] for name in names if "." in name}


def _ties_embeddings(folder: Path) -> bool:
    config = _read_json(folder / CONFIG)
    text = config.get("text_config") or {}
    if not isinstance(text, dict):
        raise LineageError(f"{folder / CONFIG}: text_config is {as_written(text)}, expected a JSON object")
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def _read_json(path: Path) -> dict:
    try:
        return read_json_object(path)
    except CheckpointError as exc:
        raise LineageError(str(exc)) from None


# ----------------------------------------------------------------------------- explaining a chain


def describe_chain(chain: list[ChainLink], rules: LineageRules) -> list[str]:
    """One label per link, top (what the recipe names) first, down to the root: kind, path, fingerprint and the
    bytes the link adds, then on a second line how it was found."""
    labels = []
    top_down = list(reversed(chain))
    for index, link in enumerate(top_down):
        above = top_down[index - 1] if index else None
        labels.append(f"{link.kind} {link.path}  {link.fingerprint}  {format_bytes(link.bytes)}\n"
                      f"found: {describe_source(link, above, rules)}")
    return labels


def describe_source(link: ChainLink, above: ChainLink | None, rules: LineageRules) -> str:
    """How a link was found: the recipe's model, or the base recorded by the adapter above it (in its
    adapter_config.json, or ms-swift's args.json), and by which rule."""
    if above is None:
        return "the recipe's model" + (", from the local Hugging Face cache" if link.source == "hub-cache" else "")
    recorded = above.base_from_args or above.recorded_base or ""
    named = f"ms-swift's args.json model {recorded}" if above.base_from_args else f"recorded {recorded}"
    if above.base_from_args and above.recorded_base:
        named += f" (adapter_config.json's {above.recorded_base} is not here)"
    if link.source == "remap":
        rule = next(((p, t) for path, p, t in remap_candidates(recorded, rules) if path.resolve() == Path(link.path)),
                    None)
        return f"{named}, remap {rule[0]} -> {rule[1]}" if rule else f"{named}, remapped"
    if link.source == "relative":
        return f"{named}, relative to the adapter's folder"
    cached = cached_name(recorded)
    if cached is not None and link.source in ("hub-cache", "modelscope-cache"):
        kind = "ModelScope" if cached.cache == "modelscope" else "Hugging Face"
        named += f" (a {kind} cache folder of {cached.repo_id} on the training machine)"
    elif link.source == "hub-cache":
        named = named.replace(recorded, f"hub id {recorded}", 1)
    if link.source == "hub-cache":
        return f"{named}, from the local Hugging Face cache {hub_cache_dir()}"
    if link.source == "modelscope-cache":
        return f"{named}, from the local ModelScope cache {modelscope_cache_dir()}"
    if link.source == "recipe-base":
        return f"the recipe's `base`, overriding the base {named}"
    return named
