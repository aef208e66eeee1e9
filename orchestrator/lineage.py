"""Resolving a recipe's `model` into the exact chain of weights to load: a pure function of files on disk.

A link is a full checkpoint (config.json + weights) or a PEFT adapter (adapter_config.json + weights). An
adapter's `base_model_name_or_path` is followed until a full checkpoint ends the chain. The chain is returned
root first, in the order the worker loads it, and each link carries a cheap fingerprint so every number in a
report can be traced to the weights that produced it.

No torch here: the parent (and `plan`, on a CPU-only CI runner) runs this.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .protocol import ChainLink
from .recipes import LineageRules, Recipe


class LineageError(Exception):
    """A chain that cannot be resolved, or should not be loaded; the message says what to do."""


@dataclass
class Located:
    path: Path
    source: str  # how it was found: local, relative, remap, hub-cache, recipe-base
    tried: list[str] = field(default_factory=list)


def resolve_chain(recipe: Recipe, rules: LineageRules, *, hash_weights: bool = False) -> list[ChainLink]:
    """The recipe's chain, root (a full checkpoint) first; raise LineageError on any problem."""
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
    return links


def _locate_model(ref: str, rules: LineageRules) -> Located:
    path = Path(ref)
    if path.is_dir():
        return Located(path, "local")
    found = _from_hub_cache(ref, rules.allow_network)
    if found is None:
        raise LineageError(
            f"model {ref!r} is neither a local directory nor in the local Hugging Face cache "
            f"({_hub_cache_dir()}); download it first or give a local path"
        )
    return Located(found, "hub-cache")


def _locate_base(adapter: ChainLink, recipe: Recipe, rules: LineageRules, *, is_top: bool) -> Located:
    recorded = adapter.recorded_base
    if not recorded:
        raise LineageError(
            f"adapter {adapter.path}: adapter_config.json has no base_model_name_or_path; "
            "set `base` in the recipe to say which checkpoint it was trained on"
        )
    found = find_recorded_base(recorded, Path(adapter.path), rules)
    if is_top and recipe.base is not None:
        return _apply_recipe_base(recipe, recorded, found, rules)
    if found.path is None:
        raise LineageError(_not_found_message(adapter.path, recorded, found.tried, rules))
    return found


def _apply_recipe_base(recipe: Recipe, recorded: str, found: Located, rules: LineageRules) -> Located:
    """An explicit `base` must agree with the adapter's record, unless the recipe says base_override."""
    explicit = _locate_model(recipe.base, rules)
    agrees = found.path is not None and found.path.resolve() == explicit.path.resolve()
    if not agrees and not recipe.base_override:
        where = f"found at {found.path}" if found.path else "not found here"
        raise LineageError(
            f"recipe '{recipe.name}': `base` = {recipe.base} disagrees with the adapter's recorded base "
            f"{recorded!r} ({where}). Evaluating an adapter on another base silently changes its results; "
            "remove `base`, or set `base_override = true` to do it on purpose (the report marks it)"
        )
    return Located(explicit.path, "recipe-base" if not agrees else found.source)


def find_recorded_base(recorded: str, adapter_dir: Path, rules: LineageRules) -> Located:
    """Where an adapter's recorded base lives here. `path` is None when nowhere; `tried` lists every candidate."""
    tried: list[str] = []
    candidates: list[tuple[Path, str]] = []
    recorded_path = Path(recorded)
    if recorded_path.is_absolute():
        candidates.append((recorded_path, "local"))
    else:
        candidates.append(((adapter_dir / recorded_path), "relative"))
    for prefix, target in sorted(rules.remap.items(), key=lambda kv: len(kv[0]), reverse=True):
        if recorded == prefix or recorded.startswith(prefix.rstrip("/") + "/"):
            rest = recorded[len(prefix.rstrip("/")) :].lstrip("/")
            candidates.append((Path(target) / rest, f"remap {prefix} -> {target}"))
    for path, source in candidates:
        tried.append(str(path))
        if path.is_dir():
            return Located(path, "remap" if source.startswith("remap") else source, tried)
    if not recorded_path.is_absolute() and "/" in recorded and not recorded.startswith("."):
        tried.append(f"hub id {recorded} in {_hub_cache_dir()}")
        cached = _from_hub_cache(recorded, rules.allow_network)
        if cached is not None:
            return Located(cached, "hub-cache", tried)
    return Located(None, "", tried)  # type: ignore[arg-type]


def _not_found_message(adapter: str, recorded: str, tried: list[str], rules: LineageRules) -> str:
    lines = [f"adapter {adapter} was trained on {recorded!r}, which was not found. Tried:"]
    lines += [f"    {t}" for t in tried]
    if rules.remap:
        lines.append("  remap rules in the recipe file: " + ", ".join(f"{k} -> {v}" for k, v in rules.remap.items()))
    else:
        lines.append("  no remap rules are set")
    lines.append(
        '  fix: add [lineage] remap = { "<training-machine prefix>" = "<where it is here>" } to the recipe file'
    )
    return "\n".join(lines)


def _hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return home / "hub"


def _from_hub_cache(repo_id: str, allow_network: bool) -> Path | None:
    """A hub model's snapshot folder from the local cache (or downloaded, only if the recipe file allows)."""
    from huggingface_hub import snapshot_download  # torch-free; imported late to keep start-up light
    from huggingface_hub.errors import HFValidationError

    try:
        folder = snapshot_download(repo_id, cache_dir=_hub_cache_dir(), local_files_only=not allow_network)
    except (HFValidationError, OSError, ValueError):
        return None
    except Exception as exc:  # huggingface_hub raises its own classes for "not cached" and network errors
        if type(exc).__module__.startswith("huggingface_hub"):
            return None
        raise
    return Path(folder)


def _make_link(located: Located, recipe: Recipe, hash_weights: bool) -> ChainLink:
    path = located.path
    if (path / "adapter_config.json").is_file():
        config_file, kind = path / "adapter_config.json", "adapter"
    elif (path / "config.json").is_file():
        config_file, kind = path / "config.json", "full"
    else:
        raise LineageError(f"{path}: neither adapter_config.json nor config.json: not a model folder")
    weights = weight_files(path, kind, allow_pickle=recipe.allow_pickle)
    recorded = None
    if kind == "adapter":
        recorded = json.loads(config_file.read_text()).get("base_model_name_or_path")
    return ChainLink(
        path=str(path.resolve()),
        kind=kind,
        fingerprint=fingerprint(config_file, weights, hash_weights=hash_weights),
        bytes=sum(w.stat().st_size for w in weights),
        recorded_base=recorded,
        source=located.source,
    )


def weight_files(folder: Path, kind: str, *, allow_pickle: bool) -> list[Path]:
    """The weight files of a link; pickle files only where the recipe allows them."""
    stem = "adapter_model" if kind == "adapter" else "model"
    safe = sorted(folder.glob(f"{stem}*.safetensors"))
    if safe:
        return safe
    pickles = sorted(folder.glob("adapter_model.bin" if kind == "adapter" else "pytorch_model*.bin"))
    if pickles and not allow_pickle:
        raise LineageError(
            f"{folder}: weights are pickle files ({pickles[0].name}), which can run code when loaded; "
            "convert them to safetensors, or set `allow_pickle = true` in the recipe if you trust them"
        )
    if pickles:
        return pickles
    raise LineageError(f"{folder}: {kind} folder with no weights ({stem}*.safetensors)")


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (u64 little-endian length, then JSON): names, dtypes, shapes."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def fingerprint(config_file: Path, weights: list[Path], *, hash_weights: bool) -> str:
    """Cheap by default (config + safetensors headers + sizes); the full content with hash_weights."""
    digest = hashlib.sha256(config_file.read_bytes())
    for weight in weights:
        digest.update(weight.name.encode())
        digest.update(str(weight.stat().st_size).encode())
        if hash_weights:
            with open(weight, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
        elif weight.suffix == ".safetensors":
            digest.update(json.dumps(safetensors_header(weight), sort_keys=True).encode())
    return ("sha256:" if hash_weights else "meta:") + digest.hexdigest()[:16]
