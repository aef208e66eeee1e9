"""Where a model a training machine recorded lives in this machine's local caches: the Hugging Face hub cache and
the ModelScope cache. Never the network, unless the recipe file allows it for a hub id it names.

An adapter records its base as its trainer loaded it: a hub id (`Qwen/Qwen2.5-VL-7B-Instruct`), or the folder a
hub client put it in on the training machine, which does not exist here:
- a Hugging Face cache snapshot, `.../models--Qwen--Qwen2.5-VL-7B-Instruct/snapshots/<revision>`;
- a ModelScope cache folder (ms-swift downloads from ModelScope by default), `.../modelscope/hub/models/Qwen/
  Qwen2___5-VL-7B-Instruct` (modelscope's snapshot_download writes a name's dots as "___", under `models/` of
  $MODELSCOPE_CACHE, by default ~/.cache/modelscope/hub; before modelscope 1.2x without the `models/`).
Either names the model; this module finds that model's folder here, if a cache holds it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

_DOTS = "___"  # how modelscope writes a '.' of a model's name in its cache folders


@dataclass(frozen=True)
class CachedName:
    """What a recorded base names: a hub id, with a revision where the record pins one, and the cache it was in."""

    repo_id: str
    revision: str | None
    cache: str  # "hf" or "modelscope": the kind of cache path it was recorded as


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return home / "hub"


def modelscope_cache_dir() -> Path:
    """modelscope's cache root: $MODELSCOPE_CACHE, else ~/.cache/modelscope/hub (modelscope.hub.utils)."""
    return Path(os.environ.get("MODELSCOPE_CACHE") or Path.home() / ".cache" / "modelscope" / "hub")


def from_hub_cache(repo_id: str, allow_network: bool, revision: str | None = None) -> Path | None:
    """A hub model's snapshot folder from the local cache (or downloaded, only if the recipe file allows)."""
    from huggingface_hub import snapshot_download  # torch-free; imported late to keep start-up light
    from huggingface_hub.errors import HFValidationError

    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=hub_cache_dir(),
                                   local_files_only=not allow_network)
    except (HFValidationError, OSError, ValueError):
        return None
    except Exception as exc:  # huggingface_hub raises its own classes for "not cached" and network errors
        if type(exc).__module__.startswith("huggingface_hub"):
            return None
        raise
    return Path(folder)


def cached_name(recorded: str) -> CachedName | None:
    """The hub id a recorded cache path names (see the module's docstring); None for any other path."""
    parts = PurePosixPath(recorded).parts
    for index, part in enumerate(parts):
        if part.startswith("models--") and part.count("--") >= 2:
            revision = parts[index + 2] if len(parts) > index + 2 and parts[index + 1] == "snapshots" else None
            return CachedName(part.removeprefix("models--").replace("--", "/", 1), revision, "hf")
    if "modelscope" in parts:
        rest = list(parts[parts.index("modelscope") + 1:])
        for prefix in ("hub", "models"):
            if len(rest) > 2 and rest[0] == prefix:
                rest = rest[1:]
        if len(rest) == 2:
            return CachedName(f"{rest[0]}/{rest[1].replace(_DOTS, '.')}", None, "modelscope")
    return None


def modelscope_folders(repo_id: str) -> list[Path]:
    """Where the local ModelScope cache keeps a model: under models/ (now) or the root (before), its name's dots
    written as "___" (modelscope's snapshot_download) or as they are."""
    org, name = repo_id.split("/", 1)
    root = modelscope_cache_dir()
    names = dict.fromkeys([name.replace(".", _DOTS), name])
    return [base / org / written for base in (root / "models", root) for written in names]


def from_modelscope_cache(repo_id: str) -> Path | None:
    """A model's folder in the local ModelScope cache (one with a config.json), or None."""
    return next((folder for folder in modelscope_folders(repo_id) if (folder / "config.json").is_file()), None)
