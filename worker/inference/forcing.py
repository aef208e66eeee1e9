"""Teacher forcing: whether greedy decoding of one sample alone would pick every token a batched run produced, from
one forward pass instead of one pass per token, with generate's own logits processors applied at every step.

forced_check forces one sample alone. forced_batch forces several in one right-padded pass: in a causal model, pads
after a sequence never reach its positions, and its positions are numbered from its first token whatever the
mask, so each row's logits are the sample's alone up to the rounding of a batch's kernels (what the tie rule
measures). Neither of the ways left padding breaks batched generation (positions shifted by the pads, pads
attended, stale rope deltas) exists in that layout. worker/inference/parity.py decides which samples go which way."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch

from worker.inference.generation import generation_options, is_encoder_decoder
from worker.inference.image_cache import collate

# How generate() extends each per-token input by one column per new token (GenerationMixin.
# _update_model_kwargs_for_generation): the forced pass must see the sequence as the cached decode did. Another
# per-token input (one this module does not know) makes the forced check decline: its answer would be a guess.
_EXTENSIONS = {
    "attention_mask": lambda value, n: value.new_ones(value.shape[0], n),
    "token_type_ids": lambda value, n: value[:, -1:].expand(value.shape[0], n),
    "mm_token_type_ids": lambda value, n: value.new_zeros(value.shape[0], n),
}

# How far behind greedy's pick a batched token may be and still be a tie, in units of the logits' last place: the
# logits' own rounding and their kernels' (a batch's matmuls sum in another order than one sample's, through every
# layer). Measured in bfloat16, a correct batch against the sample alone: at most 2 units on the CPU demo family
# (tests/test_parity.py); on the 7B random family on H100s 0-5 units over 240 checked samples, every 5-unit sample
# generated alone agreeing with its batch (BENCHMARKS.md); the right-padding bug: 16-100 units. Eight sits between:
# above the correct batches' widest by more than half again, at half the bug's narrowest.
TIE_UNITS = 8

# A forced batch keeps the logits of every position from its shortest prompt's end: where those would span more
# than this many answers (prompts differing by more than three), the rows are forced alone instead of paying for
# the positions between.
_WINDOW_ANSWERS = 4


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

    @property
    def settles(self) -> bool:
        """The batched row is confirmed: exactly, or at ties."""
        return self.agrees or self.tied


class Unforceable(Exception):
    """The forced check cannot reproduce generate's view of this sample (or, `whole_check`, of any sample of this
    model): generate it alone."""

    def __init__(self, reason: str, *, whole_check: bool = False) -> None:
        super().__init__(reason)
        self.whole_check = whole_check


def tie_tolerance(value: float, dtype: torch.dtype) -> float:
    """TIE_UNITS units in the last place of `dtype` at |value| (bfloat16 at 4-8: one unit is 0.03125, a tie 0.25).
    Scores are compared in float32, but a bfloat16 model's logits were rounded to bfloat16 before that."""
    info = torch.finfo(dtype)
    magnitude = max(abs(value), info.tiny)
    return TIE_UNITS * info.eps * 2.0 ** math.floor(math.log2(magnitude))


def step_gaps(scores: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """How far each step's token (`tokens[step]`) is behind that step's highest score (0 where it is the highest,
    or tied): `scores` is steps x vocabulary."""
    return scores.max(dim=-1).values - scores.gather(-1, tokens[:, None])[:, 0]


def greedy_config(model: Any, processor: Any, device: str, *, max_new_tokens: int,
                  min_new_tokens: int | None = None) -> Any:
    """The generation config generate() decodes with for these options (generation_options merged into the
    model's own generation config, its special tokens made tensors on `device`), from generate's own helpers. It is
    the same for every sample, and preparing it costs more than a 7B's forced pass (transformers validates the
    model's whole config again): the forced checks take it built once. The helpers are private, so a transformers
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


def forced_check(model: Any, processor: Any, inputs: Any, row: list[int], decoder_prefix: list[int] | None,
                 device: str, config: Any) -> Forced:
    """One sample alone: one forward pass over its prompt followed by `row` (the tokens a batched run generated for
    it) gives the logits greedy decoding alone would see at every step, provided it had picked the same tokens so
    far; the sample alone agrees with the batch exactly when the processed argmax is the row's token at every step.
    `config` is greedy_config's. Raises Unforceable where this model's inputs cannot be extended as generate
    extends them."""
    _no_placeholders(processor, row)
    inputs = inputs.to(device)
    tokens = torch.tensor([row], dtype=torch.long, device=device)
    with torch.inference_mode():
        if is_encoder_decoder(model):
            prompt = torch.tensor([decoder_prefix or []], dtype=torch.long, device=device)
            decoder = torch.cat([prompt, tokens[:, :-1]], dim=1)
            logits = model(**inputs, decoder_input_ids=decoder, use_cache=False).logits[0, -len(row):]
        else:
            prompt = inputs["input_ids"]
            logits = _forward(model, _extended(inputs, tokens[:, :-1]), len(row))[0]
        return _verdict(model, config, prompt, inputs["input_ids"], tokens[0], logits)


def forced_batch(model: Any, processor: Any, inputs: list[Any], rows: list[list[int]], device: str,
                 config: Any) -> list[Forced]:
    """Several samples (decoder-only) forced in one pass: each sample's own inputs extended by its row, padded on
    the right and collated as a batch (image_cache.collate, the batch's order reversed from the generated batch's,
    so that a row's neighbours differ from its neighbours there). Each row's verdict as forced_check gives it.
    Raises Unforceable (for this batch: the samples can still be forced alone) where a row cannot be forced, the
    prompts differ too much in length, the inputs do not stack, or the pass fails (out of memory)."""
    if is_encoder_decoder(model):
        raise Unforceable("an encoder-decoder's samples are forced alone")
    for row in rows:
        _no_placeholders(processor, row)
    ends = [each["input_ids"].shape[1] for each in reversed(inputs)]  # each prompt's length, in the batch's order
    if max(ends) - min(ends) > (_WINDOW_ANSWERS - 1) * max(len(row) for row in rows):
        raise Unforceable(f"the prompts differ by {max(ends) - min(ends)} tokens: forced alone")
    tokens = [torch.tensor(row, dtype=torch.long, device=device) for row in reversed(rows)]
    entries = [_extended(each.to(device), row[None, :-1]) for each, row in zip(reversed(inputs), tokens, strict=True)]
    tokenizer = getattr(processor, "tokenizer", processor)
    with torch.inference_mode():
        try:  # a family whose inputs do not stack (images of different tile counts), or memory running out
            batch = collate(entries, tokenizer.pad_token_id, side="right")
            # every position from the shortest prompt's last on: row k's answer logits start at ends[k] - min(ends)
            logits = _forward(model, batch, batch["input_ids"].shape[1] - min(ends) + 1)
        except (RuntimeError, TypeError, ValueError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            raise Unforceable(f"the forced batch of {len(rows)} failed ({type(exc).__name__}: {exc})") from None
        verdicts = [_verdict(model, config, entry["input_ids"][:, :end], entry["input_ids"][:, :end], row,
                             logits[k, end - min(ends): end - min(ends) + len(row)])
                    for k, (entry, end, row) in enumerate(zip(entries, ends, tokens, strict=True))]
    return verdicts[::-1]  # back in the order given


def _verdict(model: Any, config: Any, prompt: torch.Tensor, encoder_ids: torch.Tensor, tokens: torch.Tensor,
             logits: torch.Tensor) -> Forced:
    """Whether the processed argmax is `tokens` (the row) at every step of `logits` (steps x vocabulary, one per
    row token), and where not, whether each such step is a tie. Every step's figures are read back at once: a read
    per step would wait on the GPU each time."""
    processors = _greedy_processors(model, config, prompt, encoder_ids)
    scores = _processed_scores(processors, prompt, tokens[None], logits)
    picked = scores.argmax(dim=-1)  # as generate picks: the first of tied maxima, which topk is not
    top = torch.topk(scores, 2, dim=-1).values
    margins, gaps, leaders = torch.stack([top[:, 0] - top[:, 1], step_gaps(scores, tokens), top[:, 0]]).tolist()
    differing = [i for i, (a, b) in enumerate(zip(picked.tolist(), tokens.tolist(), strict=True)) if a != b]
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


def _no_placeholders(processor: Any, row: list[int]) -> None:
    """Raise Unforceable where the batched answer holds the tokens a processor expands into image or video
    features: the forward pass would take them for the places of images it was not given."""
    tokenizer = getattr(processor, "tokenizer", processor)
    names = [getattr(processor, attribute, None) for attribute in ("image_token", "video_token")]
    placeholders = set(row) & {tokenizer.convert_tokens_to_ids(name) for name in names if isinstance(name, str)}
    if placeholders:
        raise Unforceable(f"the batched answer holds image placeholder token(s) {sorted(placeholders)}")


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


def _forward(model: Any, inputs: Any, count: int) -> torch.Tensor:
    """The last `count` positions' logits of one forward pass (only those computed, where the model can)."""
    keep = {"logits_to_keep": count} if _accepts(model, "logits_to_keep") else {}
    return model(**inputs, use_cache=False, **keep).logits[:, -count:]


def _accepts(model: Any, name: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(base.forward).parameters


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
