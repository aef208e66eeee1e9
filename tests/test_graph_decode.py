"""Decode steps replayed from a recorded step (worker/decode/graph_decode.py). A CUDA graph needs a GPU: here the same
sessions run with EagerReplay (a replay runs the recorded step again, on the same buffers), over the reference
kvcache kernel of test_decode_attention routed in for sdpa. What is tested is everything but the recording:
the cache moved into fixed buffers and written in place, the positions advanced by the step itself, the mask
left out, the first step checked against the eager one, and the way back to eager decoding. The real graphs run
on the GPU (tests/gpu)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from contract.dataset import open_dataset
from contract.recipe import Recipe
from contract.run_row import RecipeRow, RunSummary, Status
from contract.spec import ChainLink
from orchestrator.reporting.cells import worker_notes
from worker.decode import decode_attention, graph_decode
from worker.device import CPU
from worker.inference.generation import generate
from worker.inference.infer import prepare_batch, processor_inputs
from worker.loading.load import load_chain
from worker.simulated_gpu import ReferenceKernel

NEW_TOKENS = 12


@pytest.fixture(scope="module", params=["base", "r1"])
def batch(request: pytest.FixtureRequest, demo: dict) -> tuple:
    """The base model, and r1 (a LoRA adapter, unmerged, under peft), each with the demo set's first batch."""
    models = demo["models"]
    chain = [ChainLink(str(models["base"]), "full", "quick:0", 1)]
    if request.param == "r1":
        chain.append(ChainLink(str(models["r1-llm-only"]), "adapter", "quick:1", 1))
    recipe = Recipe(name=request.param, model=str(models["base"]), dataset=str(demo["dataset"]))
    model, processor, _ = load_chain(chain, recipe, CPU)
    items = prepare_batch(processor, list(open_dataset(recipe.dataset, recipe)), recipe.prompt, CPU).items
    return model, processor, items


@pytest.fixture()
def attached(batch: tuple) -> Iterator[None]:
    assert graph_decode.attach(batch[0], graph_decode.EagerReplay) is None
    yield
    graph_decode.detach(batch[0])


def _generate(batch: tuple, rows: slice = slice(None)):
    model, processor, items = batch
    inputs = processor_inputs(processor, items[rows], CPU)
    return generate(model, processor, inputs, "cpu", max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)


def test_replayed_steps_answer_as_the_eager_steps(batch: tuple, routed: callable) -> None:
    kernel = routed(ReferenceKernel())
    eager = _generate(batch)
    assert eager.graphs == []  # not attached: not attempted
    graph_decode.attach(batch[0], graph_decode.EagerReplay)
    try:
        replayed = _generate(batch)
    finally:
        graph_decode.detach(batch[0])
    (outcome,) = replayed.graphs
    assert outcome.replayed and outcome.declined is None, outcome
    # the first decode step ran eagerly and once recorded; every later one was a replay
    assert outcome.steps == NEW_TOKENS - 2
    assert replayed.rows == eager.rows and replayed.texts == eager.texts
    assert kernel.calls > 0


def test_the_replay_advances_positions_itself(batch: tuple, routed: callable, attached: None) -> None:
    """Were the position not advanced inside the replayed step, every replay would write over the same key and
    attend to the same keys: a kernel that sees where each step ends shows the ends moving one a step."""
    ends: list[int] = []

    class Recording(ReferenceKernel):
        def __call__(self, q, k_cache, v_cache, *, cache_seqlens, **kwargs):
            ends.append(int(cache_seqlens.max()))
            return super().__call__(q, k_cache, v_cache, cache_seqlens=cache_seqlens, **kwargs)

    routed(Recording())
    (outcome,) = _generate(batch).graphs
    assert outcome.replayed
    layers = batch[0].config.get_text_config().num_hidden_layers
    per_step = [ends[i] for i in range(0, len(ends), layers)]
    # the first step three times (eager, the warm-up, the checked replay), the second twice (replayed, and run
    # again eagerly to check the replay), then one token further each replay
    first = per_step[0]
    assert per_step == [first] * 3 + [first + 1] * 2 + list(range(first + 2, first + NEW_TOKENS - 1))


def test_a_recorded_step_that_differs_goes_on_eagerly_and_says_why(batch: tuple, routed: callable) -> None:
    """A step that would answer differently from its buffers than from the eager cache (here a kernel that
    rounds differently when the cache is longer than the keys it reads) must not be replayed."""

    class LengthSensitive(ReferenceKernel):
        def __call__(self, q, k_cache, v_cache, *, cache_seqlens, **kwargs):
            out = super().__call__(q, k_cache, v_cache, cache_seqlens=cache_seqlens, **kwargs)
            return out * 1.001 if k_cache.shape[1] > int(cache_seqlens.max()) else out

    routed(ReferenceKernel())
    eager = _generate(batch)
    decode_attention.uninstall()
    routed(LengthSensitive())
    graph_decode.attach(batch[0], graph_decode.EagerReplay)
    try:
        declined = _generate(batch)
    finally:
        graph_decode.detach(batch[0])
    (outcome,) = declined.graphs
    assert not outcome.replayed and outcome.steps == 0
    assert "differs from the eager one" in outcome.declined
    assert declined.rows == eager.rows  # went on from the eager cache, its first step's keys restored


def test_a_batch_of_one_and_an_unpadded_batch_replay_too(batch: tuple, routed: callable, attached: None) -> None:
    kernel = routed(ReferenceKernel())
    alone = _generate(batch, slice(0, 1))
    (outcome,) = alone.graphs
    assert outcome.replayed and kernel.calls > 0


def test_right_padding_is_not_attempted(batch: tuple, routed: callable, attached: None) -> None:
    """Without a left-padded batch announced there is no kvcache routing, so no session."""
    processor = batch[1]
    processor.tokenizer.padding_side = "right"
    try:
        assert _generate(batch).graphs == []
    finally:
        processor.tokenizer.padding_side = "left"


def test_a_declined_batch_is_a_warning_in_the_report_and_a_model_that_cannot_be_recorded_a_note() -> None:
    row = RecipeRow(name="r1", status=Status.OK,
                    decode_graph={"replayed": 3, "declined": 1, "steps": 90, "record_s": 0.2,
                                  "reasons": {"the recorded step differs from the eager one (x)": 1}})
    model = RecipeRow(name="g3", status=Status.OK,
                      decode_graph={"reasons": {}, "not_recordable": "the cache is not a plain dynamic cache"})
    base = RecipeRow(name="base", status=Status.OK, decode_graph={"reasons": {}})
    notes = worker_notes(RunSummary(recipes=[row, base, model]))
    assert notes == [(True, "r1: 1 batch(es) decoded eagerly instead of from a CUDA graph (same answers, slower): "
                            "the recorded step differs from the eager one (x) (1)"),
                     (False, "g3: decoded eagerly, not from CUDA graphs: the cache is not a plain dynamic cache")]


def test_a_decline_midway_goes_on_eagerly_from_the_replayed_cache(batch: tuple, routed: callable, attached: None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a later step is not as recorded, the eager steps go on from the cache the replays wrote (its layers
    show it up to the tokens cached): the answers do not change."""
    routed(ReferenceKernel())
    graph_decode.detach(batch[0])
    eager = _generate(batch)
    graph_decode.attach(batch[0], graph_decode.EagerReplay)
    calls = []

    def differs_at_the_fifth(*args: object) -> str | None:
        calls.append(1)
        return "changed (test)" if len(calls) == 5 else None

    monkeypatch.setattr(graph_decode, "step_difference", differs_at_the_fifth)
    midway = _generate(batch)
    (outcome,) = midway.graphs
    assert outcome.declined == "changed (test)" and outcome.steps == 4
    assert midway.rows == eager.rows


class FrozenReplay(graph_decode.EagerReplay):
    """A recording that froze the step's output: every replay runs (writes its keys, advances the positions) but
    gives the first replay's output, as a graph would where the output depended on a value the host computed
    while recording."""

    def replay(self) -> object:
        output = super().replay()
        if not hasattr(self, "_first"):
            self._first = output
        return self._first


def test_a_replay_that_froze_a_value_goes_on_eagerly_and_says_why(batch: tuple, routed: callable) -> None:
    routed(ReferenceKernel())
    eager = _generate(batch)
    graph_decode.attach(batch[0], FrozenReplay)
    try:
        frozen = _generate(batch)
    finally:
        graph_decode.detach(batch[0])
    (outcome,) = frozen.graphs
    assert not outcome.replayed and "differs from the same step run eagerly" in outcome.declined
    assert frozen.rows == eager.rows
