"""Batch parity: the first batch's first samples checked one at a time against their batched answers. Batched,
left-padded generation must give what the model gives a sample alone (position ids under left padding and stale
rope deltas break this in the transformers and Qwen trackers).

Each sample is first checked by teacher forcing (generation.forced_check: one forward pass of the sample alone
over its prompt and its batched tokens, generate's logits processors applied at every step). Where greedy alone
would pick every batched token, the two agree exactly (up to the rounding of a pass over the whole sequence
against a cached step-by-step decode, which the recorded closest margin measures).

Where greedy alone would pick another token, but the batched token's logit is within four units of the logits'
last place of it (generation.tie_tolerance; bfloat16 at 4-8: 0.125) at every such step, the two are tied: the
logits' precision cannot order them, and which one a decode picks depends on the rounding of its kernels, not on
batching. The sample agrees at a tie; the ties are recorded (`forced_tied`, `ties`: where and by how much). A
batching bug (pads between prompt and answer, wrong positions) moves logits by far more: in bfloat16, a correct
batch differed from the sample alone by at most 2 units on the demo family and 3 on the 7B random family, right
padding by 16-100. A model whose logits tie (random weights in bfloat16) then settles by forcing instead of by
generation.

Where the gap is wider, or the forced check cannot model this model's inputs, the sample is generated alone, token
by token, and its text decides: a disagreement is always one that generation alone produced. Generating alone costs
a whole decode per sample, so it is bounded: at most `recipe.parity_generate` samples are generated alone; beyond
that a forced difference is recorded as unsettled, with where the forced pass differed and by how much, never
counted as agreeing. The check's cost is one forward pass per sample and a bounded number of decodes, whatever the
weights."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from contract.recipe import Recipe
from worker import faults
from worker.inference.generation import Generated, Unforceable, forced_check, generate, greedy_config

InputsFor = Callable[[Any], Any]  # one prepared sample -> its processor tensors alone


def check_parity(model: Any, processor: Any, items: list[Any], batched: Generated, inputs_for: InputsFor,
                 recipe: Recipe, device: str, batch_size: int) -> dict:
    """Check the first `recipe.parity_check` of `items` (the first batch, whose generation is `batched`) one at a
    time. The text generated alone passes the `parity_text` fault point (worker/faults.py: alter@parity:N)."""
    if recipe.parity_check == 0:
        return {"enabled": False}
    if batch_size <= 1:
        return {"enabled": True, "checked": 0, "batch_size": batch_size,
                "note": "the first batch had one sample: nothing to compare"}
    started = time.perf_counter()
    count = min(recipe.parity_check, len(items))
    tally = _Tally(budget=recipe.parity_generate)
    try:
        tally.config = greedy_config(model, processor, device, max_new_tokens=recipe.max_new_tokens,
                                     min_new_tokens=recipe.min_new_tokens)
    except Unforceable as exc:
        tally.stop_forcing = str(exc)
    disagreements = []
    for number, item in enumerate(items[:count], 1):
        text = batched.texts[number - 1]
        alone = _alone(model, processor, inputs_for(item), batched, number - 1, item.sample.id, recipe, device, tally)
        if alone is None:  # unsettled: the forced pass differed, and no generation alone was left to decide
            continue
        alone = faults.points().parity_text(number, alone)
        if alone != text:
            disagreements.append({"id": item.sample.id, "batched": text, "alone": alone})
    checked = count - len(tally.unsettled)
    return {"enabled": True, "checked": checked, "agreed": checked - len(disagreements), "batch_size": batch_size,
            "disagreements": disagreements, "seconds": time.perf_counter() - started, **tally.record()}


@dataclass
class _Tally:
    """How the samples were settled, and whether the forced pass is still worth trying in this worker."""

    budget: int  # generations alone still allowed (recipe.parity_generate)
    forced_agreed: int = 0  # exactly: greedy alone picks every batched token
    ties: list[dict] = field(default_factory=list)  # agreeing at ties within the logits' rounding
    generated_alone: int = 0
    margins: list[float] = field(default_factory=list)
    unforced: list[dict] = field(default_factory=list)  # samples the forced pass could not model, and why
    unsettled: list[dict] = field(default_factory=list)  # forced disagreements left undecided: no generation left
    stop_forcing: str | None = None
    config: Any = None  # generate's generation config for the recipe's options (greedy_config), for every sample

    def record(self) -> dict:
        return {"forced_agreed": self.forced_agreed, "forced_tied": len(self.ties), "ties": self.ties,
                "generated_alone": self.generated_alone,
                "closest_margin": min(self.margins) if self.margins else None,
                "generated_alone_because": self.unforced, "forcing_stopped": self.stop_forcing,
                "unsettled": self.unsettled}


def _alone(model: Any, processor: Any, inputs: Any, batched: Generated, index: int, sample_id: str, recipe: Recipe,
           device: str, tally: _Tally) -> str | None:
    """What the model answers this sample alone: the batched text where the forced pass confirms it (exactly, or
    at ties within the logits' rounding), else the text generated alone while the budget of generations lasts,
    else None (unsettled, recorded in the tally with where the forced pass differed). A forced pass this model's
    inputs defeat for every sample stops being tried."""
    forced = None
    if tally.stop_forcing is None:
        prefix = batched.decoder_prefix[index] if batched.decoder_prefix else None
        try:
            forced = forced_check(model, processor, inputs, batched.rows[index], prefix, device, tally.config)
        except Unforceable as exc:  # this sample only, or every sample (generate's helpers differ)
            tally.unforced.append({"id": sample_id, "reason": str(exc)})
            tally.stop_forcing = str(exc) if exc.whole_check else None
        else:
            tally.margins.append(forced.closest_margin)
            if forced.agrees:
                tally.forced_agreed += 1
                return batched.texts[index]
            if forced.tied:
                tally.ties.append({"id": sample_id, "first_difference": forced.first_difference,
                                   "gap": forced.widest_gap})
                return batched.texts[index]
    if tally.budget <= 0:
        tally.unsettled.append({"id": sample_id, "first_difference": forced.first_difference if forced else None,
                                "margin": forced.closest_margin if forced else None,
                                "gap": forced.widest_gap if forced else None})
        return None
    tally.budget -= 1
    (alone,) = generate(model, processor, inputs, device, max_new_tokens=recipe.max_new_tokens,
                        min_new_tokens=recipe.min_new_tokens).texts
    tally.generated_alone += 1
    return alone
