"""Checkpoint files, read torch-free and bounded: configs, safetensors headers, weight files, fingerprints.

Every read here is checked: a file cut short, a header that claims more bytes than the file has, JSON that is
not JSON, an index naming a shard that is not there, a dangling symlink. Each raises CheckpointError naming
the file and what is wrong, so a damaged checkpoint fails its own recipe with a message, never the run with
a traceback. The parent (lineage, memory estimate) and the worker (staged loading, merge) read through here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# safetensors itself refuses headers over 100 MB; a config or an index is never near this size
MAX_HEADER_BYTES = 100_000_000
MAX_JSON_BYTES = 64 * 2**20
_SAMPLE_BYTES = 4096  # per tensor, for the quick fingerprint
_HEADER_LENGTH = struct.Struct("<Q")
CONFIG = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
SHARD_INDEX = "model.safetensors.index.json"
# ms-swift's record of a training run (`swift sft`'s arguments): written in its vN-YYYYMMDD-HHMMSS/ run folder and
# copied into each checkpoint-N/ (swift/trainers/mixin.py `_save`); `swift infer --adapters` reads its `model`
SWIFT_ARGS = "args.json"
# The JSON files of a checkpoint folder that loading it reads (transformers' config, generation config,
# processor and tokenizer; peft's adapter config): each is checked before the worker hands the folder over.
LOADED_JSON = (CONFIG, ADAPTER_CONFIG, SHARD_INDEX, "generation_config.json", "preprocessor_config.json",
               "processor_config.json", "video_preprocessor_config.json", "tokenizer_config.json", "tokenizer.json",
               "special_tokens_map.json", "added_tokens.json", "chat_template.json", "vocab.json", SWIFT_ARGS)
# The files beside the weights that change what the model is given or how it answers: its processor, tokenizer,
# chat template and generation config, and ms-swift's args.json (the base and the new tokens it names). A resume
# compares their fingerprint (files_fingerprint) as it does the weights': a processor edited between an interrupt
# and a resume would otherwise mix two setups in one row.
SIDE_FILES = ("generation_config.json", "preprocessor_config.json", "processor_config.json",
              "video_preprocessor_config.json", "tokenizer_config.json", "tokenizer.json", "tokenizer.model",
              "special_tokens_map.json", "added_tokens.json", "chat_template.json", "chat_template.jinja", "vocab.json",
              "merges.txt", "spiece.model", "sentencepiece.bpe.model", SWIFT_ARGS)
# Bytes per element of safetensors' dtypes (the sub-byte float formats are left out: their sizes are not checked)
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


class CheckpointError(Exception):
    """A checkpoint file that cannot be read as what it claims to be; the message names the file."""


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from a checkpoint file (config, adapter config, index, processor config)."""
    data = _read_bounded(path, MAX_JSON_BYTES)
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); restore the file from where the model was saved"
                              ) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}; restore the file "
                              "from where the model was saved")
    return value


def as_written(value: Any) -> str:
    """A value of a checkpoint's JSON as the file has it, cut short: for messages naming a wrong value."""
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _read_bounded(path: Path, limit: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > limit:
            raise CheckpointError(f"{path}: {size} bytes, more than a file of its kind can sensibly be ({limit})")
        return path.read_bytes()
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({_os_reason(exc)})") from None


def _os_reason(exc: OSError) -> str:
    """'a dangling or looping symlink' where that is why, else the OS's words."""
    import errno

    if exc.errno == errno.ELOOP:
        return "a symlink that loops"
    if exc.errno == errno.ENOENT and exc.filename and Path(exc.filename).is_symlink():
        return f"a dangling symlink to {Path(exc.filename).readlink()}"
    return exc.strerror or str(exc)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A safetensors file's header: `raw` as stored (with __metadata__), and where the tensor data begins."""

    raw: dict[str, Any]
    data_start: int

    @property
    def tensors(self) -> dict[str, dict[str, Any]]:
        """name -> {"dtype", "shape", "data_offsets"}, without __metadata__."""
        return {name: info for name, info in self.raw.items() if name != "__metadata__"}


def safetensors_header(path: Path) -> SafetensorsHeader:
    """The checked header of a safetensors file (u64 little-endian length, then JSON): names, dtypes, shapes
    and offsets, each offset inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(_HEADER_LENGTH.size)
            if len(prefix) < _HEADER_LENGTH.size:
                raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file (cut off while "
                                      "copying?)")
            (length,) = _HEADER_LENGTH.unpack(prefix)
            if length > min(MAX_HEADER_BYTES, size - _HEADER_LENGTH.size):
                raise CheckpointError(f"{path}: the header claims {length} bytes but the file has {size}: not a "
                                      "safetensors file, or cut off while copying")
            text = f.read(length)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({_os_reason(exc)})") from None
    try:
        raw = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    header = SafetensorsHeader(raw, _HEADER_LENGTH.size + length)
    _check_tensors(path, header, size - header.data_start)
    return header


def _check_tensors(path: Path, header: SafetensorsHeader, data_bytes: int) -> None:
    for name, info in header.tensors.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = isinstance(dtype, str) and isinstance(shape, list) and all(_natural(d) for d in [*shape, begin, end])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {str(info)[:200]}")
        if not 0 <= begin <= end <= data_bytes:
            raise CheckpointError(f"{path}: tensor {name!r} lies at bytes {begin}-{end} of the data, but the file "
                                  f"holds {data_bytes}: cut off while copying?")
        if dtype in DTYPE_BYTES and (size := math.prod(shape) * DTYPE_BYTES[dtype]) != end - begin:
            raise CheckpointError(f"{path}: tensor {name!r} ({dtype}, shape {shape}) needs {size} bytes, but its "
                                  f"header gives it {end - begin}: a damaged header")


def _natural(value: Any) -> bool:
    """0, 1, 2...: a size or an offset (JSON's true is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def weight_files(folder: Path, kind: str, *, allow_pickle: bool) -> list[Path]:
    """The weight files of a full checkpoint ("full") or an adapter ("adapter"); pickle files only where the
    recipe allows them. A shard index must name only shards that are there."""
    stem = "adapter_model" if kind == "adapter" else "model"
    if kind == "full" and (folder / SHARD_INDEX).exists():
        return _indexed_shards(folder / SHARD_INDEX)
    safe = sorted(folder.glob(f"{stem}*.safetensors"))
    if safe:
        return safe
    pickles = sorted(folder.glob("adapter_model.bin" if kind == "adapter" else "pytorch_model*.bin"))
    if pickles and not allow_pickle:
        raise CheckpointError(
            f"{folder}: weights are pickle files ({pickles[0].name}), which can run code when loaded; "
            "convert them to safetensors, or set `allow_pickle = true` in the recipe if you trust them"
        )
    if pickles:
        return pickles
    raise CheckpointError(f"{folder}: {kind} folder with no weights ({stem}*.safetensors)")


def _indexed_shards(index: Path) -> list[Path]:
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map: not a safetensors shard index")
    shards = sorted({str(shard) for shard in weight_map.values()})
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"{index} names {len(missing)} shard(s) that are not there: {', '.join(missing[:5])}"
                              " (an incomplete download or copy?)")
    return [index.parent / s for s in shards]


def check_folder(folder: Path, kind: str, *, allow_pickle: bool) -> None:
    """Every file of a checkpoint folder that loading it reads, read bounded and checked, before a library that
    would fail on it less clearly (or take the run down) is handed the folder: the JSON files (LOADED_JSON) that
    are there, the weight files, and each safetensors header. Raise CheckpointError naming the file."""
    for name in LOADED_JSON:
        if present(folder / name):
            read_json_object(folder / name)
    for weight in weight_files(folder, kind, allow_pickle=allow_pickle):
        if weight.suffix == ".safetensors":
            safetensors_header(weight)
            continue
        try:  # a pickle (allowed by the recipe) is read by torch alone: here only that it opens
            with open(weight, "rb"):
                pass
        except OSError as exc:
            raise CheckpointError(f"{weight}: cannot be read ({_os_reason(exc)})") from None


def swift_args(adapter_dir: Path) -> dict[str, Any] | None:
    """ms-swift's args.json for an adapter folder: its own (every checkpoint-N/ has a copy), else its run folder's
    (the folder above); None where neither is there. A damaged one raises CheckpointError naming it."""
    for folder in (adapter_dir, adapter_dir.parent):
        if present(folder / SWIFT_ARGS):
            return read_json_object(folder / SWIFT_ARGS)
    return None


def present(path: Path) -> bool:
    """There is an entry of that name: a file, or a symlink even when dangling or looping (that is damage to
    report, not a file that is absent)."""
    return path.is_symlink() or path.exists()


def fingerprint(config_file: Path, weights: list[Path], *, hash_weights: bool = False) -> str:
    """A link's identity. Quick by default: the config, each weight file's name, size and safetensors header, and
    the first few kB of every tensor's data (a fine-tune keeps its config, names and shapes: only the values tell
    it from its base, and any trained tensor changes in its first bytes). hash_weights: every byte, for audits."""
    digest = hashlib.sha256(_read_bounded(config_file, MAX_JSON_BYTES))
    for weight in weights:
        digest.update(weight.name.encode())
        try:
            digest.update(str(weight.stat().st_size).encode())
            if hash_weights:
                with open(weight, "rb") as f:
                    for block in iter(functools.partial(f.read, 1 << 24), b""):
                        digest.update(block)
            elif weight.suffix == ".safetensors":
                header = safetensors_header(weight)
                digest.update(json.dumps(header.raw, sort_keys=True).encode())
                _sample_tensors(weight, header, digest)
        except OSError as exc:
            raise CheckpointError(f"{weight}: cannot be read ({_os_reason(exc)})") from None
    return ("sha256:" if hash_weights else "quick:") + digest.hexdigest()[:16]


def files_fingerprint(folder: Path) -> str:
    """The identity of a link's side files (SIDE_FILES, and any additional_chat_templates/): every byte of each one
    present, with its name; "files:none" where it has none."""
    templates = folder / "additional_chat_templates"
    found = [folder / name for name in SIDE_FILES if present(folder / name)]
    found += sorted(templates.glob("*")) if templates.is_dir() else []
    if not found:
        return "files:none"
    digest = hashlib.sha256()
    for path in found:
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        digest.update(_read_bounded(path, MAX_HEADER_BYTES))
    return "files:" + digest.hexdigest()[:16]


def _sample_tensors(path: Path, header: SafetensorsHeader, digest: Any) -> None:
    """Feed the first _SAMPLE_BYTES of each tensor's data into `digest`: a few MB of reads even for a 70B model."""
    with open(path, "rb") as f:
        for name in sorted(header.tensors):
            begin, end = header.tensors[name]["data_offsets"]
            f.seek(header.data_start + begin)
            digest.update(f.read(min(end - begin, _SAMPLE_BYTES)))
