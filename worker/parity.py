"""Batch parity: the first batch's first samples checked one at a time against their batched answers. Batched,
left-padded generation must give what the model gives a sample alone (position ids under left padding and stale
rope deltas break this in the transformers and Qwen trackers).

Each sample is first checked by teacher forcing (generation.forced_check: one forward pass of the sample alone
over its prompt and its batched tokens, generate's logits processors applied at every step). Where greedy alone
would pick every batched token, the two agree exactly (up to the rounding of a pass over the whole sequence
against a cached step-by-step decode, which the recorded closest margin measures). Where it would not, or where
the forced check cannot model this model's inputs, the sample is generated alone, token by token, and its text
decides: a disagreement is always one that generation alone produced. On an H200, 8 samples of a 7B model: one
forward each instead of 32 decode steps each (BENCHMARKS.md)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from contract.recipe import Recipe

from .generation import Generated, Unforceable, forced_check, generate

Alter = Callable[[int, str], str]  # (n-th parity sample, its text alone) -> the text to compare; faults only
InputsFor = Callable[[Any], Any]  # one prepared sample -> its processor tensors alone


def check_parity(model: Any, processor: Any, items: list[Any], batched: Generated, inputs_for: InputsFor,
                 recipe: Recipe, device: str, batch_size: int, alter: Alter | None = None) -> dict:
    """Check the first `recipe.parity_check` of `items` (the first batch, whose generation is `batched`) one at a
    time. `alter` is the test-only fault switch's hook (worker/faults.py: alter@parity:N)."""
    if recipe.parity_check == 0:
        return {"enabled": False}
    if batch_size <= 1:
        return {"enabled": True, "checked": 0, "batch_size": batch_size,
                "note": "the first batch had one sample: nothing to compare"}
    started = time.perf_counter()
    count = min(recipe.parity_check, len(items))
    disagreements, margins, declined, unforced = [], [], None, []
    forced_agreed = generated_alone = 0
    for number, item in enumerate(items[:count], 1):
        text = batched.texts[number - 1]
        inputs = inputs_for(item)
        forced = None
        prefix = batched.decoder_prefix[number - 1] if batched.decoder_prefix else None
        if declined is None:
            try:
                forced = forced_check(model, processor, inputs, batched.rows[number - 1], prefix, device,
                                      max_new_tokens=recipe.max_new_tokens, min_new_tokens=recipe.min_new_tokens)
                margins.append(forced.closest_margin)
            except Unforceable as exc:  # this sample only, or the whole check (generate's helpers differ)
                unforced.append({"id": item.sample.id, "reason": str(exc)})
                declined = str(exc) if exc.whole_check else None
        if forced is not None and forced.agrees:
            alone = text
            forced_agreed += 1
        else:
            (alone,) = generate(model, processor, inputs, device, max_new_tokens=recipe.max_new_tokens,
                                min_new_tokens=recipe.min_new_tokens).texts
            generated_alone += 1
        alone = alter(number, alone) if alter else alone
        if alone != text:
            disagreements.append({"id": item.sample.id, "batched": text, "alone": alone})
    return {"enabled": True, "checked": count, "agreed": count - len(disagreements), "batch_size": batch_size,
            "disagreements": disagreements, "seconds": time.perf_counter() - started,
            "forced_agreed": forced_agreed, "generated_alone": generated_alone,
            "closest_margin": min(margins) if margins else None, "generated_alone_because": unforced}
