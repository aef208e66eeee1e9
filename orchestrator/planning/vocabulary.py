"""Each adapter's vocabulary against the model beneath it, read from files alone (safetensors headers, tokenizer.json,
ms-swift's args.json).

Trainers change the vocabulary in two ways an adapter folder shows:
- its saved embeddings have another number of rows than the model beneath: the tokenizer grew (LLaMA-Factory
  `resize_vocab` and added tokens, padded to a multiple of 64; ms-swift `new_special_tokens`, to a multiple of 128;
  axolotl special tokens, with `lora_modules_to_save`; Unsloth's new tokens), or a script called
  `resize_token_embeddings(len(tokenizer))`, which for Qwen's padded vocabulary shrinks it. peft saves such
  embeddings as modules_to_save (`...embed_tokens.weight`, `...lm_head.weight`), or, with a LoRA on the embedding,
  as the embedding itself (`...embed_tokens.base_layer.weight`) beside `lora_embedding_A` (r x rows). The worker
  then resizes the model's embeddings to those rows before applying the adapter (`ChainLink.embedding_rows`);
  without that, peft's load fails on the shapes.
- its tokenizer grew (a tokenizer.json with tokens the one beneath lacks, or ms-swift's args.json listing
  `new_special_tokens`, which ms-swift adds again when it loads): the new tokens were trained with embedding rows
  of their own, which an adapter without embeddings did not keep. That is an error here, naming what is missing,
  never a number computed with rows the training never saw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from contract.checkpoint import present, read_json_object, safetensors_header, weight_files
from contract.processor import swift_new_tokens
from contract.spec import ChainLink

# The last name of a module that holds one row per token: the input embedding and the output head, as the families
# transformers has name them (Florence-2's BART shares `shared` between its encoder and decoder).
VOCABULARY_MODULES = frozenset({"embed_tokens", "lm_head", "wte", "word_embeddings", "tok_embeddings", "embed_in",
                                "embed_out", "shared"})
_ADAPTER_PREFIX = "base_model.model."
_WRAPPERS = ("base_layer", "modules_to_save", "original_module")  # peft's names around a wrapped module


class VocabularyError(Exception):
    """An adapter whose vocabulary cannot be loaded as it was trained; the message says what is missing."""


def check_vocabulary(chain: list[ChainLink]) -> None:
    """Set `embedding_rows` on each adapter of `chain` (root first) whose embeddings have other rows than the model
    beneath it; raise VocabularyError where an adapter grew the vocabulary without keeping what it trained."""
    root_rows = vocabulary_rows(Path(chain[0].path))
    if not root_rows:  # pickle weights (read by torch alone) or no embedding found: loading checks the shapes
        return
    rows = max(root_rows.values())
    below = Path(chain[0].path)  # the nearest link beneath with a tokenizer (read only when one above has its own)
    kept = False  # whether an adapter above that link kept embeddings
    for link in chain[1:]:
        folder = Path(link.path)
        carried = carried_rows(folder)
        if carried:
            rows = _resized_rows(folder, carried, root_rows, rows, link)
            kept = True
        tokens = tokenizer_vocabulary(folder)
        if tokens is not None:
            _check_tokenizer(folder, tokens, tokenizer_vocabulary(below), rows, kept)
            below, kept = folder, False
        elif (added := swift_new_tokens(folder)) and not carried:
            raise VocabularyError(_unkept(folder, f"ms-swift's args.json lists {len(added)} new_special_tokens "
                                          f"({_listed(added)}), which it adds to the tokenizer"))


def _resized_rows(folder: Path, carried: dict[str, int], root_rows: dict[str, int], rows: int,
                  link: ChainLink) -> int:
    """The rows the model has once this adapter is applied; sets link.embedding_rows where that is a resize."""
    sizes = sorted(set(carried.values()))
    if len(sizes) > 1:
        shown = ", ".join(f"{key} {count}" for key, count in sorted(carried.items()))
        raise VocabularyError(f"adapter {folder} carries embeddings of different sizes ({shown} rows): one "
                              "vocabulary cannot hold both; the adapter is damaged or was saved half-way")
    new = sizes[0]
    uncarried = sorted(key for key in root_rows if key not in carried)
    if new > rows and uncarried:
        raise VocabularyError(
            f"adapter {folder} carries {', '.join(sorted(carried))} at {new} rows, the model beneath it has {rows}, "
            f"but not {', '.join(uncarried)}: the rows its {new - rows} new token(s) had there in training were not "
            f"saved, so they are unknown here. Save the adapter with {' and '.join(sorted({*carried, *uncarried}))} "
            "in modules_to_save")
    if new != rows:
        link.embedding_rows = new
    return new


def _check_tokenizer(folder: Path, tokens: dict[str, int], below: dict[str, int] | None, rows: int,
                     kept: bool) -> None:
    needed = max(tokens.values(), default=-1) + 1
    if needed > rows:
        raise VocabularyError(
            f"adapter {folder}: its tokenizer has token ids up to {needed - 1}, but the model it loads onto has "
            f"{rows} embedding rows" + ("" if kept else " and the adapter carries no embeddings of its own")
            + ": its new tokens have no rows. Save the adapter with embed_tokens and lm_head in modules_to_save")
    new = sorted(set(tokens) - set(below or {}) - _padding(folder)) if below is not None else []
    if new and not kept:
        raise VocabularyError(_unkept(folder, f"its tokenizer has {len(new)} token(s) the one beneath lacks "
                                              f"({_listed(new)})"))


def _unkept(folder: Path, grown: str) -> str:
    return (f"adapter {folder}: {grown}, but the adapter carries no embeddings (no embed_tokens or lm_head among its "
            "weights): the new tokens were trained with rows it did not keep, so it cannot be evaluated as trained. "
            "Save it with embed_tokens and lm_head in modules_to_save (LLaMA-Factory: resize_vocab; ms-swift: "
            "--modules_to_save embed_tokens lm_head; axolotl: lora_modules_to_save)")


def vocabulary_rows(folder: Path) -> dict[str, int]:
    """A full checkpoint's per-token modules (VOCABULARY_MODULES) and their rows, by module key; {} where its
    weights are not safetensors."""
    found: dict[str, int] = {}
    for path in weight_files(folder, "full", allow_pickle=True):
        if path.suffix != ".safetensors":
            return {}
        for name, info in safetensors_header(path).tensors.items():
            module = name.rsplit(".", 1)[0]
            if _is_vocabulary(module) and len(info["shape"]) == 2:
                found[_key(module)] = info["shape"][0]
    return found


def carried_rows(folder: Path) -> dict[str, int]:
    """The per-token modules an adapter carries whole (modules_to_save, or a LoRA'd embedding's own weight) and
    their rows, by module key; a `lora_embedding_A` (r x rows) says its embedding's rows too."""
    found: dict[str, int] = {}
    for path in sorted(folder.glob("adapter_model*.safetensors")):
        for name, info in safetensors_header(path).tensors.items():
            module, _, last = name.removeprefix(_ADAPTER_PREFIX).rpartition(".")
            shape = info["shape"]
            if last.startswith("lora_embedding_A") and len(shape) == 2:
                found[_key(module)] = shape[1]
            elif last == "weight" and len(shape) == 2 and _is_vocabulary(module) and ".lora_" not in name:
                found[_key(module)] = shape[0]
    return found


def tokenizer_vocabulary(folder: Path) -> dict[str, int] | None:
    """token -> id of a folder's tokenizer.json (its model's vocabulary and its added tokens); None where the folder
    has none (a tokenizer saved only as sentencepiece or vocab files is not read)."""
    path = folder / "tokenizer.json"
    if not present(path):
        return None
    data = read_json_object(path)
    model = data.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    tokens: dict[str, int] = {}
    if isinstance(vocab, dict):
        tokens |= {str(token): int(index) for token, index in vocab.items() if isinstance(index, int)}
    elif isinstance(vocab, list):  # Unigram: [piece, score] pairs, the id being the position
        tokens |= {str(entry[0]): index for index, entry in enumerate(vocab) if isinstance(entry, list) and entry}
    for added in data.get("added_tokens") or []:
        if isinstance(added, dict) and isinstance(added.get("id"), int):
            tokens[str(added.get("content"))] = added["id"]
    return tokens


def _padding(folder: Path) -> set[str]:
    """The tokenizer's padding token: added only to pad batches, it is masked out, so its row never counts."""
    config = folder / "tokenizer_config.json"
    pad: Any = read_json_object(config).get("pad_token") if present(config) else None
    pad = pad.get("content") if isinstance(pad, dict) else pad
    return {pad} if isinstance(pad, str) else set()


def _is_vocabulary(module: str) -> bool:
    parts = [part for part in module.split(".") if part not in _WRAPPERS and part != "default"]
    return bool(parts) and parts[-1] in VOCABULARY_MODULES


def _key(module: str) -> str:
    """The module's last name, past peft's wrappers: 'model.language_model.embed_tokens.base_layer' -> 'embed_tokens'
    (checkpoints rename the path above it; a per-token module sits outside the numbered blocks)."""
    return [part for part in module.split(".") if part not in _WRAPPERS and part != "default"][-1]


def _listed(tokens: list[str]) -> str:
    return ", ".join(tokens[:5]) + (f" and {len(tokens) - 5} more" if len(tokens) > 5 else "")
