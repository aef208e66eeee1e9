"""The processor's output per sample, kept on disk and shared by every recipe whose processor has the same settings.

    <cache_dir>/preprocessed/<fingerprint[:16]>/<key[:2]>/<key>.safetensors

`fingerprint` hashes the processor's settings (processor_fingerprint); `key` hashes the fingerprint, the rendered
chat text and the image file's bytes (its content, not its path or mtime), with the EXIF orientation applied when
one was. An entry is what the processor returns for ONE text and ONE image, unpadded; collate() turns a batch of
entries into exactly what the batched call returns.
Entries are safetensors (never pickle), written to a temporary file in their folder and renamed into place, so
several workers (one per GPU) can fill one cache at once. An entry that cannot be read is a miss, computed and
written again: the cache never fails a recipe. Nothing is ever evicted: delete the folder to reclaim the space.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes
from transformers import BatchFeature

from contract.recipe import Recipe
from contract.trainer_resize import TrainerResize
from worker.inference.families import encode

ENTRY_FORMAT = 1  # part of the fingerprint: bump it when what an entry holds changes, and old entries are never read
# Not per-token whatever their shape: a [1, 3] image_grid_thw must not be padded when a text has 3 tokens.
_NOT_PER_TOKEN = frozenset({"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"})
# Libraries whose code turns a file and a text into these tensors: an upgrade may change them.
_LIBRARIES = ("transformers", "tokenizers", "torch", "torchvision", "pillow", "numpy")


class ProcessorCache:
    """One processor's per-sample outputs under `folder`; counts hits and misses (read by the batch that asks)."""

    def __init__(self, folder: Path, processor: Any, resize: TrainerResize | None = None) -> None:
        self.processor = processor
        self.fingerprint = processor_fingerprint(processor, resize)
        self.folder = Path(folder) / self.fingerprint[:16]
        self.hits = 0
        self.misses = 0
        self._warned = False

    @classmethod
    def for_recipe(cls, processor: Any, recipe: Recipe, resize: TrainerResize | None = None) -> ProcessorCache | None:
        """The cache the recipe asks for, or None (off). The parent resolves `cache_dir` (recipes.py). `resize`: the
        trainer's resize before the processor, which decides the pixels as much as the processor's settings."""
        if not recipe.image_cache or not recipe.cache_dir:
            return None
        return cls(Path(recipe.cache_dir) / "preprocessed", processor, resize)

    def features(self, text: str, image: Any, source: Any, orientation: int = 1) -> BatchFeature:
        """The processor's output for one sample: read from disk, or computed and stored. `source` is the image's
        file or ImageSource (its bytes are hashed); `orientation` the EXIF orientation applied in decoding it."""
        try:
            data = source.read_bytes() if hasattr(source, "read_bytes") else Path(source).read_bytes()
            key = self.key(text, data, orientation)
        except OSError as exc:  # the file went away after it was decoded: compute, store nothing
            self._warn(f"cannot read {source} to hash it ({exc})")
            key = None
        path = self.folder / key[:2] / f"{key}.safetensors" if key else None
        cached = read_entry(path, key) if path and key else None
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        computed = encode(self.processor, [text], [image])
        if path is not None and key is not None:
            self._store(path, key, computed)
        return computed

    def key(self, text: str, image_bytes: bytes, orientation: int = 1) -> str:
        """The entry's key. The same file turned upright by its EXIF orientation gives other pixels: the
        orientation applied is part of the key (left out when none was, so the keys of upright files stay)."""
        digest = hashlib.sha256()
        parts = [self.fingerprint.encode(), text.encode(), hashlib.sha256(image_bytes).digest()]
        parts += [f"exif-orientation-{orientation}".encode()] if orientation != 1 else []
        for part in parts:
            digest.update(len(part).to_bytes(8, "little") + part)  # length-prefixed: no two inputs run together
        return digest.hexdigest()

    def _store(self, path: Path, key: str, features: Mapping[str, Any]) -> None:
        try:
            write_entry(path, key, features)
        except (OSError, TypeError, ValueError, SafetensorError) as exc:  # full disk, read-only folder, no tensor
            self._warn(f"not stored ({exc})")

    def _warn(self, message: str) -> None:
        if not self._warned:  # once per worker: the log should not get a line per sample
            self._warned = True
            print(f"evalorch worker: image cache {self.folder}: {message}; the run goes on", file=sys.stderr)


def processor_fingerprint(processor: Any, resize: TrainerResize | None = None) -> str:
    """sha256 of everything that decides the processor's output for a given text and image file.

    Built from the loaded processor's own settings, not from the bytes of the files it was loaded from: the
    worker may pick the processor from any link of a chain (an adapter may ship its own tokenizer), settings can
    be changed after loading, and equivalent files differ in bytes (key order, a re-save by a newer transformers,
    preprocessor_config.json vs processor_config.json). So: the processor's to_dict() (image and video processor
    settings: size/min/max pixels, mean, std, patch and merge sizes), its chat template and special-token
    attributes, the tokenizer's full serialised state (vocabulary, merges, added tokens, normalizer, pre- and
    post-processor) and its class, and the versions of the libraries that do the work. Paths are left out, so
    recipes whose checkpoints carry identical processors share entries. A trainer's resize before the processor
    (`resize`) is part of it, left out where there is none so that those entries keep their fingerprints."""
    tokenizer = getattr(processor, "tokenizer", None)
    settings = {
        "entry_format": ENTRY_FORMAT,
        "class": f"{type(processor).__module__}.{type(processor).__qualname__}",
        "processor": processor.to_dict() if hasattr(processor, "to_dict") else None,
        "chat_template": getattr(processor, "chat_template", None),
        "attributes": {k: v for k, v in vars(processor).items() if isinstance(v, str | int | float | bool)},
        "tokenizer": _tokenizer_state(tokenizer) if tokenizer is not None else None,
        "versions": {name: _version(name) for name in _LIBRARIES},
    }
    if resize is not None:
        settings["resize_before"] = resize.key()
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=repr).encode()).hexdigest()


def _tokenizer_state(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        for transient in ("padding", "truncation"):  # what the last call asked for, set again by every call
            state.pop(transient, None)
    else:
        state = sorted(tokenizer.get_vocab().items())
    return {
        "class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
        "state": state,
        "special_tokens": repr(getattr(tokenizer, "special_tokens_map", None)),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "split_special_tokens": getattr(tokenizer, "split_special_tokens", None),
    }


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def read_entry(path: Path, key: str) -> BatchFeature | None:
    """The entry at `path`, or None when it is missing, damaged (truncated, not safetensors) or another key's."""
    try:  # read whole, not memory-mapped: a file cut short under a mapping kills the process (SIGBUS)
        data = path.read_bytes()
        meta = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
        names = json.loads(meta.get("order", "[]"))
        loaded = safetensors_load(data)
        if meta.get("key") != key or sorted(names) != sorted(loaded):
            return None
    except (OSError, ValueError, TypeError, RuntimeError, AttributeError, SafetensorError):
        return None
    tensors = {name: loaded[name] for name in names}
    ids = tensors.get("input_ids")
    return BatchFeature(tensors) if ids is not None and ids.dim() == 2 and ids.shape[0] == 1 else None


def write_entry(path: Path, key: str, features: Mapping[str, Any]) -> None:
    """Store one sample's tensors atomically: a reader sees the old file, the new one or none, never a part."""
    tensors = {}
    for name, value in features.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"'{name}' is a {type(value).__name__}, not a tensor")
        tensors[name] = value.contiguous()
    data = safetensors_bytes(tensors, metadata={"key": key, "order": json.dumps(list(tensors))})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:16]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temporary, path)  # atomic within one file system: the last writer wins, whole
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def collate(entries: Sequence[Mapping[str, torch.Tensor]], pad_token_id: int,
            side: Literal["left", "right"] = "left") -> BatchFeature:
    """Per-sample processor outputs as one batch, exactly as the batched call with padding=True and the tokenizer
    padding on `side` returns it (generation pads on the left; the parity check's batched forced pass on the
    right). A key is per-token when every sample's tensor is [1, that sample's input_ids length] (input_ids,
    attention_mask, token_type_ids, mm_token_type_ids, ...), and not one of the image keys: those are padded to the
    longest (input_ids with pad_token_id, the others with 0) and stacked. Everything else (pixel_values,
    image_grid_thw, ...) is concatenated along dim 0."""
    lengths = [entry["input_ids"].shape[-1] for entry in entries]
    longest = max(lengths)
    batch = {}
    for name in entries[0]:
        values = [entry[name] for entry in entries]
        if name not in _NOT_PER_TOKEN and all(_per_token(v, n) for v, n in zip(values, lengths, strict=True)):
            fill = pad_token_id if name == "input_ids" else 0
            values = [_padded(v, longest, fill, side) for v in values]
        batch[name] = torch.cat(values)
    kind = type(entries[0]) if isinstance(entries[0], BatchFeature) else BatchFeature
    return kind(batch)


def _per_token(value: torch.Tensor, length: int) -> bool:
    return value.dim() == 2 and value.shape[0] == 1 and value.shape[1] == length


def _padded(value: torch.Tensor, length: int, fill: int, side: Literal["left", "right"]) -> torch.Tensor:
    missing = length - value.shape[1]
    if not missing:
        return value
    pads = torch.full((1, missing), fill, dtype=value.dtype, device=value.device)
    return torch.cat([pads, value] if side == "left" else [value, pads], dim=1)
