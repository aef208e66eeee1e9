"""Greedy generation for a batch: each row's text and token ids, with generate's options in one home (the forced
check, worker/inference/forcing.py, applies exactly what generation applied)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from worker.decode import graph_decode
from worker.decode.decode_attention import left_padded


@dataclass
class Generated:
    texts: list[str]
    rows: list[list[int]]  # each row's new token ids through its first end-of-turn token (the rest is padding)
    new_tokens: int  # output positions decoded, padding included (the decode's work)
    decoder_prefix: list[list[int]] | None = None  # an encoder-decoder's decoder start, per row
    graphs: list[graph_decode.Outcome] = field(default_factory=list)  # each generate call's decode steps


def generate(model: Any, processor: Any, inputs: Any, device: str, *, max_new_tokens: int,
             min_new_tokens: int | None = None) -> Generated:
    """Greedy generation for a left-padded batch: each row's new text and token ids."""
    tokenizer = getattr(processor, "tokenizer", processor)
    # an encoder-decoder's mask is the encoder's: its decoder's cache is not padded like the prompt
    prompt_mask = None if is_encoder_decoder(model) else inputs.get("attention_mask")
    inputs = inputs.to(device, non_blocking=True)
    with (torch.inference_mode(), left_padded(prompt_mask, device) as routed,
          graph_decode.session(model, max_new_tokens, routed) as graph):
        output = model.generate(**inputs, **generation_options(tokenizer, max_new_tokens, min_new_tokens))
    # a decoder-only model returns the prompt and the answer; an encoder-decoder (Florence-2) the decoder's start
    # token and the answer
    start = 1 if is_encoder_decoder(model) else inputs["input_ids"].shape[1]
    ends = end_token_ids(model, tokenizer)
    rows = [_through_end(row, ends) for row in output[:, start:].tolist()]
    texts = [_decode(tokenizer, row, ends) for row in rows]
    prefix = output[:, :start].tolist() if start == 1 else None
    return Generated(texts, rows, int(output[:, start:].numel()), prefix, [graph] if graph is not None else [])


def generation_options(tokenizer: Any, max_new_tokens: int, min_new_tokens: int | None) -> dict:
    """generate()'s options for greedy decoding (the model's generation config supplies the rest, e.g. a
    repetition penalty): one home, so that the forced check applies exactly what generation applied."""
    extra = {"min_new_tokens": min_new_tokens} if min_new_tokens else {}
    return {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1,
            "pad_token_id": tokenizer.pad_token_id, **extra}


def is_encoder_decoder(model: Any) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def end_token_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    ends = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    ends.add(tokenizer.eos_token_id)
    return ends


def _through_end(ids: list[int], ends: set[int]) -> list[int]:
    for index, token in enumerate(ids):
        if token in ends:
            return ids[: index + 1]
    return ids


def _decode(tokenizer: Any, ids: list[int], ends: set[int]) -> str:
    """The generated text up to the end of turn, special tokens kept (the box markers are special tokens)."""
    kept = [token for token in ids if token not in ends and token != tokenizer.pad_token_id]
    return tokenizer.decode(kept, skip_special_tokens=False).strip()
