"""Batch parity: the first batch's first samples checked against what the model gives each alone. Batched,
left-padded generation must give what the model gives a sample alone (position ids under left padding and stale
rope deltas break this in the transformers and Qwen trackers).

Each sample is first checked by teacher forcing (worker/inference/forcing.py: one forward pass over its prompt and
its batched tokens, generate's logits processors applied at every step). Where greedy would pick every batched
token, the two agree exactly (up to the rounding of a pass over the whole sequence against a cached step-by-step
decode, which the recorded closest margin measures). The first sample is forced alone. The others are forced
together in one right-padded pass (forcing.forced_batch), whose rows are each sample alone but for the rounding of
a batch's kernels: none of the ways left padding breaks generation exists in it, and its rows sit in the reverse
order of the generated batch's, so a row's neighbours differ there. The first sample, alone, guards against what
any batch might share. A row the batched pass does not confirm is forced again alone, which decides.

Where greedy would pick another token, but the batched token's logit is within eight units of the logits' last
place of it (forcing.tie_tolerance; bfloat16 at 4-8: 0.25) at every such step, the two are tied: the logits'
precision cannot order them, and which one a decode picks depends on the rounding of its kernels, not on batching.
The sample agrees at a tie; the ties are recorded (`forced_tied`, `ties`: where and by how much). A batching bug
(pads between prompt and answer, wrong positions) moves logits by far more: in bfloat16, a correct batch differed
from the sample alone by at most 2 units on the demo family and 5 on the 7B random family, right padding by 16-100.
A model whose logits tie (random weights in bfloat16) then settles by forcing instead of by generation.

Where the gap is wider, or the forced check cannot model this model's inputs, the sample is generated alone, token
by token, and its text decides: a disagreement is always one that generation alone produced. Generating alone costs
a whole decode per sample, so it is bounded: at most `recipe.parity_generate` samples are generated alone; beyond
that a forced difference is recorded as unsettled, with where the forced pass differed and by how much, never
counted as agreeing. The samples generated after forcing are recorded with their gap (`wider_than_tie`): what the
tie rule's width is held against. The check's cost is two forward passes (one alone, one batched) where forcing
settles, and a bounded number of decodes, whatever the weights."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from contract.recipe import Recipe
from worker import faults
from worker.inference.forcing import Forced, Unforceable, forced_batch, forced_check, greedy_config
from worker.inference.generation import Generated, generate

InputsFor = Callable[[Any], Any]  # one prepared sample -> its processor tensors alone


def check_parity(model: Any, processor: Any, items: list[Any], batched: Generated, inputs_for: InputsFor,
                 recipe: Recipe, device: str, batch_size: int) -> dict:
    """Check the first `recipe.parity_check` of `items` (the first batch, whose generation is `batched`) against
    what the model gives each alone. The text generated alone passes the `parity_text` fault point
    (worker/faults.py: alter@parity:N)."""
    if recipe.parity_check == 0:
        return {"enabled": False}
    if batch_size <= 1:
        return {"enabled": True, "checked": 0, "batch_size": batch_size,
                "note": "the first batch had one sample: nothing to compare"}
    started = time.perf_counter()
    checked = items[: min(recipe.parity_check, len(items))]
    tally = _Tally(budget=recipe.parity_generate)
    try:
        tally.config = greedy_config(model, processor, device, max_new_tokens=recipe.max_new_tokens,
                                     min_new_tokens=recipe.min_new_tokens)
    except Unforceable as exc:
        tally.stop_forcing = str(exc)
    inputs = [inputs_for(item) for item in checked]
    verdicts = _forced_verdicts(model, processor, inputs, batched, [item.sample.id for item in checked], device,
                                tally)
    disagreements = []
    for number, (item, sample_inputs, forced) in enumerate(zip(checked, inputs, verdicts, strict=True), 1):
        text = batched.texts[number - 1]
        alone = _settled(model, processor, sample_inputs, text, forced, item.sample.id, recipe, device, tally)
        if alone is None:  # unsettled: the forced pass differed, and no generation alone was left to decide
            continue
        alone = faults.points().parity_text(number, alone)
        if alone != text:
            disagreements.append({"id": item.sample.id, "batched": text, "alone": alone})
    settled = len(checked) - len(tally.unsettled)
    return {"enabled": True, "checked": settled, "agreed": settled - len(disagreements), "batch_size": batch_size,
            "disagreements": disagreements, "seconds": time.perf_counter() - started, **tally.record()}


@dataclass
class _Tally:
    """How the samples were settled, and whether forcing is still worth trying in this worker."""

    budget: int  # generations alone still allowed (recipe.parity_generate)
    config: Any = None  # generate's generation config for the recipe's options (greedy_config), for every sample
    forced_agreed: int = 0  # exactly: greedy alone picks every batched token
    ties: list[dict] = field(default_factory=list)  # agreeing at ties within the logits' rounding
    in_batch: int = 0  # settled (exactly or at ties) by the batched forced pass
    batch_declined: str | None = None  # why the batched forced pass was not used, where it was not
    generated_alone: int = 0
    wider_than_tie: list[dict] = field(default_factory=list)  # generated alone after forcing differed beyond a tie
    margins: list[float] = field(default_factory=list)
    unforced: list[dict] = field(default_factory=list)  # samples the forced pass could not model, and why
    unsettled: list[dict] = field(default_factory=list)  # forced disagreements left undecided: no generation left
    stop_forcing: str | None = None

    def record(self) -> dict:
        return {"forced_agreed": self.forced_agreed, "forced_tied": len(self.ties), "ties": self.ties,
                "forced_in_batch": self.in_batch, "forced_batch_declined": self.batch_declined,
                "generated_alone": self.generated_alone, "wider_than_tie": self.wider_than_tie,
                "closest_margin": min(self.margins) if self.margins else None,
                "generated_alone_because": self.unforced, "forcing_stopped": self.stop_forcing,
                "unsettled": self.unsettled}


def _forced_verdicts(model: Any, processor: Any, inputs: list[Any], batched: Generated, ids: list[str], device: str,
                     tally: _Tally) -> list[Forced | None]:
    """Each sample's forced verdict (None where it could not be forced): the first alone; the others from one
    batched pass where it confirms them, else forced alone."""
    rest = len(inputs) - 1
    in_batch = _batch_verdicts(model, processor, inputs[1:], batched.rows[1: len(inputs)], device, tally) \
        if rest >= 2 else [None] * rest
    verdicts: list[Forced | None] = []
    for index, sample_inputs in enumerate(inputs):
        forced = in_batch[index - 1] if index else None
        if forced is not None and forced.settles:
            tally.in_batch += 1
        else:
            forced = _forced_alone(model, processor, sample_inputs, batched, index, ids[index], device, tally)
        verdicts.append(forced)
    return verdicts


def _batch_verdicts(model: Any, processor: Any, inputs: list[Any], rows: list[list[int]], device: str,
                    tally: _Tally) -> list[Forced | None]:
    """The batched forced pass's verdicts, or Nones (each sample then forced alone) where it declines."""
    if tally.stop_forcing is None:
        try:
            return list(forced_batch(model, processor, inputs, rows, device, tally.config))
        except Unforceable as exc:
            tally.batch_declined = str(exc)
            tally.stop_forcing = str(exc) if exc.whole_check else None
    return [None] * len(inputs)


def _forced_alone(model: Any, processor: Any, inputs: Any, batched: Generated, index: int, sample_id: str,
                  device: str, tally: _Tally) -> Forced | None:
    """The sample forced alone, or None where it cannot be (recorded; a reason that holds for every sample of this
    model stops forcing in this worker)."""
    if tally.stop_forcing is not None:
        return None
    prefix = batched.decoder_prefix[index] if batched.decoder_prefix else None
    try:
        return forced_check(model, processor, inputs, batched.rows[index], prefix, device, tally.config)
    except Unforceable as exc:  # this sample only, or every sample (generate's helpers differ)
        tally.unforced.append({"id": sample_id, "reason": str(exc)})
        tally.stop_forcing = str(exc) if exc.whole_check else None
        return None


def _settled(model: Any, processor: Any, inputs: Any, text: str, forced: Forced | None, sample_id: str,
             recipe: Recipe, device: str, tally: _Tally) -> str | None:
    """What the model answers this sample alone: the batched `text` where forcing confirmed it (exactly, or at ties
    within the logits' rounding), else the text generated alone while the budget of generations lasts, else None
    (unsettled, recorded in the tally with where the forced pass differed)."""
    if forced is not None:
        tally.margins.append(forced.closest_margin)
        if forced.agrees:
            tally.forced_agreed += 1
            return text
        if forced.tied:
            tally.ties.append({"id": sample_id, "first_difference": forced.first_difference,
                               "gap": forced.widest_gap})
            return text
    difference = {"id": sample_id, "first_difference": forced.first_difference if forced else None,
                  "margin": forced.closest_margin if forced else None, "gap": forced.widest_gap if forced else None}
    if tally.budget <= 0:
        tally.unsettled.append(difference)
        return None
    tally.budget -= 1
    (alone,) = generate(model, processor, inputs, device, max_new_tokens=recipe.max_new_tokens,
                        min_new_tokens=recipe.min_new_tokens).texts
    tally.generated_alone += 1
    if forced is not None:
        tally.wider_than_tie.append(difference)
    return alone
