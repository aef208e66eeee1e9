"""Greedy generation for a batch, and its exact check by teacher forcing: whether greedy decoding of one sample
alone would pick every token a batched run produced, from one forward pass instead of one pass per token."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.decode import graph_decode
from worker.decode.decode_attention import left_padded

# How generate() extends each per-token input by one column per new token (GenerationMixin.
# _update_model_kwargs_for_generation): the forced pass must see the sequence as the cached decode did. Another
# per-token input (one this module does not know) makes the forced check decline: its answer would be a guess.
_EXTENSIONS = {
    "attention_mask": lambda value, n: value.new_ones(value.shape[0], n),
    "token_type_ids": lambda value, n: value[:, -1:].expand(value.shape[0], n),
    "mm_token_type_ids": lambda value, n: value.new_zeros(value.shape[0], n),
}


@dataclass
class Generated:
    texts: list[str]
    rows: list[list[int]]  # each row's new token ids through its first end-of-turn token (the rest is padding)
    new_tokens: int  # output positions decoded, padding included (the decode's work)
    decoder_prefix: list[list[int]] | None = None  # an encoder-decoder's decoder start, per row
    graphs: list[graph_decode.Outcome] = field(default_factory=list)  # each generate call's decode steps


@dataclass(frozen=True)
class Forced:
    """The teacher-forced answer for one sample: whether greedy alone picks every token of the batched row, the
    first position where it would not, and the smallest lead of the picked token over the runner-up (in logits
    after generate's processors: how close the closest call was). Where it would not, `tied` says whether the
    batched token was, at every such position, within the logits' rounding of greedy's pick (tie_tolerance: a tie
    their precision cannot order), and `widest_gap` how far behind the batched token was at its worst."""

    agrees: bool
    first_difference: int | None
    closest_margin: float
    tied: bool = False
    widest_gap: float = 0.0


# How far behind greedy's pick a batched token may be and still be a tie, in units of the logits' last place: the
# logits' own rounding and their kernels' (a batch's matmuls sum in another order than one sample's, through every
# layer). Measured in bfloat16, a correct batch against the sample alone: at most 2 units on the CPU demo family
# (tests/test_parity.py), 3 on the 7B random family on an H100 (BENCHMARKS.md); the right-padding bug: 16-100 units.
TIE_UNITS = 4


def tie_tolerance(value: float, dtype: torch.dtype) -> float:
    """TIE_UNITS units in the last place of `dtype` at |value| (bfloat16 at 4-8: one unit is 0.03125). Scores are
    compared in float32, but a bfloat16 model's logits were rounded to bfloat16 before that."""
    info = torch.finfo(dtype)
    magnitude = max(abs(value), info.tiny)
    return TIE_UNITS * info.eps * 2.0 ** math.floor(math.log2(magnitude))


def step_gaps(scores: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """How far each step's token (`tokens[step]`) is behind that step's highest score (0 where it is the highest,
    or tied): `scores` is steps x vocabulary."""
    return scores.max(dim=-1).values - scores.gather(-1, tokens[:, None])[:, 0]


class Unforceable(Exception):
    """The forced check cannot reproduce generate's view of this sample (or, `whole_check`, of any sample of this
    model): generate it alone."""

    def __init__(self, reason: str, *, whole_check: bool = False) -> None:
        super().__init__(reason)
        self.whole_check = whole_check


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


def forced_check(model: Any, processor: Any, inputs: Any, row: list[int], decoder_prefix: list[int] | None,
                 device: str, config: Any) -> Forced:
    """Teacher forcing: one forward pass over one sample's prompt followed by `row` (the tokens a batched run
    generated for it) gives the logits greedy decoding alone would see at every step, provided it had picked
    the same tokens so far; with generate's own logits processors applied at each step, the sample alone agrees
    with the batch exactly when its argmax is the row's token at every step. `config` is greedy_config's, for the
    options the batch was generated with. Raises Unforceable where this model's inputs cannot be extended as
    generate extends them."""
    tokenizer = getattr(processor, "tokenizer", processor)
    placeholders = set(row) & _placeholder_ids(processor, tokenizer)
    if placeholders:  # the forward pass would take them for the places of images it was not given
        raise Unforceable(f"the batched answer holds image placeholder token(s) {sorted(placeholders)}")
    inputs = inputs.to(device)
    tokens = torch.tensor([row], dtype=torch.long, device=device)
    with torch.inference_mode():
        if is_encoder_decoder(model):
            context = torch.tensor([decoder_prefix or []], dtype=torch.long, device=device)
            decoder = torch.cat([context, tokens[:, :-1]], dim=1)
            logits = model(**inputs, decoder_input_ids=decoder, use_cache=False).logits[0, -len(row):]
            prompt = context
        else:
            prompt = inputs["input_ids"]
            logits = _forced_logits(model, _extended(inputs, tokens[:, :-1]), len(row))
        processors = _greedy_processors(model, config, prompt, inputs["input_ids"])
        scores = _processed_scores(processors, prompt, tokens, logits)
        # every step's figures at once, read back in one transfer: a read per step would wait on the GPU each time
        picked = scores.argmax(dim=-1)  # as generate picks: the first of tied maxima, which topk is not
        top = torch.topk(scores, 2, dim=-1).values
        figures = torch.stack([top[:, 0] - top[:, 1], step_gaps(scores, tokens[0]), top[:, 0]]).tolist()
        picked_ids = picked.tolist()
    margins, gaps, leaders = figures
    differing = [i for i, (a, b) in enumerate(zip(picked_ids, row, strict=True)) if a != b]
    if not differing:
        return Forced(True, None, min(margins))
    tied = all(gaps[i] <= tie_tolerance(leaders[i], logits.dtype) for i in differing)
    return Forced(False, differing[0], min(margins), tied=tied, widest_gap=max(gaps[i] for i in differing))


def _processed_scores(processors: Any, prompt: torch.Tensor, tokens: torch.Tensor, logits: torch.Tensor
                      ) -> torch.Tensor:
    """Each step's scores (steps x vocabulary, float32) as generate's processors leave them, each step seeing the
    prompt and the row's tokens before it, as the cached decode saw them."""
    scores = logits.to(dtype=torch.float32, copy=True)
    if not processors:  # nothing to apply (the common greedy case): no step loop
        return scores
    return torch.cat([processors(torch.cat([prompt, tokens[:, :step]], dim=1), scores[step: step + 1])
                      for step in range(scores.shape[0])])


def _placeholder_ids(processor: Any, tokenizer: Any) -> set[int]:
    """The ids of the tokens a processor expands into image or video features."""
    names = [getattr(processor, attribute, None) for attribute in ("image_token", "video_token")]
    return {tokenizer.convert_tokens_to_ids(name) for name in names if isinstance(name, str)}


def _extended(inputs: Any, extra: torch.Tensor) -> dict:
    """The sample's inputs with `extra` tokens appended, every per-token input extended as generate does."""
    ids = inputs["input_ids"]
    extended = dict(inputs)
    extended["input_ids"] = torch.cat([ids, extra], dim=1)
    for key, value in inputs.items():
        if key == "input_ids" or not torch.is_tensor(value) or value.dim() != 2 or value.shape != ids.shape:
            continue
        if key not in _EXTENSIONS:
            raise Unforceable(f"the per-token input {key!r} (generate's extension of it is not known here)",
                              whole_check=True)
        extended[key] = torch.cat([value, _EXTENSIONS[key](value, extra.shape[1])], dim=1)
    return extended


def _forced_logits(model: Any, inputs: dict, count: int) -> torch.Tensor:
    """The last `count` positions' logits of one forward pass (only those computed, where the model can)."""
    keep = {"logits_to_keep": count} if _accepts(model, "logits_to_keep") else {}
    return model(**inputs, use_cache=False, **keep).logits[0, -count:]


def _accepts(model: Any, name: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(base.forward).parameters


def greedy_config(model: Any, processor: Any, device: str, *, max_new_tokens: int,
                  min_new_tokens: int | None = None) -> Any:
    """The generation config generate() decodes with for these options (generation_options merged into the
    model's own generation config, its special tokens made tensors on `device`), from generate's own helpers. It is
    the same for every sample, and preparing it costs more than a 7B's forced pass (transformers validates the
    model's whole config again): forced_check takes it built once. The helpers are private, so a transformers
    that renamed them makes the whole check decline."""
    tokenizer = getattr(processor, "tokenizer", processor)
    options = generation_options(tokenizer, max_new_tokens, min_new_tokens)
    try:
        config, _ = model._prepare_generation_config(None, **options)
        model._prepare_special_tokens(config, True, device=device)
    except (AttributeError, TypeError) as exc:
        raise Unforceable(f"this transformers' generate helpers differ ({type(exc).__name__}: {exc})",
                          whole_check=True) from None
    return config


def _greedy_processors(model: Any, config: Any, prompt: torch.Tensor, encoder_ids: torch.Tensor) -> Any:
    """The logits processors generate() builds for `config` (greedy_config's: a repetition penalty, a minimum
    length...) and this sample, from generate's own helper: a list written here could drift from what generation
    applied. `prompt` is what generate decodes after (a decoder-only model's prompt, an encoder-decoder's decoder
    start), `encoder_ids` the input ids it was given."""
    from transformers import LogitsProcessorList

    try:
        return model._get_logits_processor(generation_config=config, input_ids_seq_length=prompt.shape[1],
                                           encoder_input_ids=encoder_ids, prefix_allowed_tokens_fn=None,
                                           logits_processor=LogitsProcessorList(), device=prompt.device,
                                           model_kwargs={})
    except (AttributeError, TypeError) as exc:
        raise Unforceable(f"this transformers' generate helpers differ ({type(exc).__name__}: {exc})",
                          whole_check=True) from None
