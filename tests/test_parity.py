"""Batch invariance: the worker checks the first batch's first samples again one at a time (teacher-forced where
it can, else generated alone) and compares; a disagreement is a warning naming the samples, in the terminal,
report.md, report.html and summary.json. A real batching bug (right padding) is found exactly as generating every
sample alone finds it. The demo
family agrees (tests/test_run_e2e.py, tests/test_families.py); a disagreement is made with the test-only fault
switch (worker/faults.py: alter@parity:N changes the N-th text generated alone)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import only_run_dir, run_cli, write_recipes

from contract.dataset import open_dataset
from contract.recipe import Recipe
from contract.spec import ChainLink
from worker.device import CPU
from worker.inference.generation import generate
from worker.inference.infer import prepare_batch, processor_inputs
from worker.inference.parity import check_parity
from worker.loading.load import load_chain

BODY = """
[[recipe]]
name = "checked"
model = "{models}/base"
[[recipe]]
name = "off"
model = "{models}/base"
parity_check = 0
[[recipe]]
name = "few"
model = "{models}/r1-llm-only"
parity_check = 2
"""


def test_a_disagreement_is_a_warning_naming_the_sample(demo: dict, tmp_path: Path) -> None:
    recipes = write_recipes(tmp_path, BODY.format(models=demo["root"] / "models"), demo, limit=4, batch_size=4)
    result = run_cli("run", str(recipes), "--out", str(tmp_path / "runs"), "--device", "cpu",
                     env={"EVALORCH_FAULT": "checked:alter@parity:3"})
    assert result.returncode == 0, result.stdout + result.stderr  # a warning, not a failure
    run_dir = only_run_dir(tmp_path / "runs")
    rows = {r["name"]: r for r in json.loads((run_dir / "summary.json").read_text())["recipes"]}
    checked = rows["checked"]["parity"]
    assert checked["enabled"] and checked["checked"] == 4 and checked["agreed"] == 3 and checked["batch_size"] == 4
    (wrong,) = checked["disagreements"]
    samples = [json.loads(line) for line in (run_dir / "checked" / "samples.jsonl").read_text().splitlines()]
    third = samples[2]  # the third sample of the first (only) batch, in the order the worker sent them
    assert wrong["id"] == third["id"] and wrong["batched"] == third["text"] and wrong["alone"] != third["text"]
    assert rows["off"]["parity"] == {"enabled": False}
    few = rows["few"]["parity"]
    assert few["checked"] == 2 and few["agreed"] == 2 and few["disagreements"] == []
    stdout = " ".join(result.stdout.split())  # rich wraps long lines
    assert "Warning: checked: batch parity FAILED: 1 of 4 sample(s)" in stdout and third["id"] in stdout
    report = (run_dir / "report.md").read_text()
    assert "## Batch parity" in report and "batch parity FAILED" in report and third["id"] in report
    assert "few: batch parity: 2 of 2 sample(s)" in report
    assert "batch parity FAILED" in (run_dir / "report.html").read_text()


@pytest.fixture(scope="module")
def base_model(demo: dict) -> tuple:
    recipe = Recipe(name="base", model=str(demo["models"]["base"]), dataset=str(demo["dataset"]))
    model, processor, _ = load_chain([ChainLink(str(demo["models"]["base"]), "full", "quick:0", 1)], recipe, CPU)
    return model, processor, recipe


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_the_forced_check_finds_what_generating_alone_finds(base_model: tuple, padding_side: str) -> None:
    """Left padding is right; right padding is a real batching bug (the pads sit between prompt and answer). Both
    ways, check_parity's verdict for each sample (teacher-forced where it can) is the one that generating every
    sample alone gives, and it forces most of them rather than generating them."""
    model, processor, recipe = base_model
    items, batched = _first_batch(model, processor, recipe, padding_side)
    alone = _alone_texts(model, processor, recipe, items)
    expected = {item.sample.id for item, text, one in zip(items, batched.texts, alone, strict=True) if text != one}
    assert bool(expected) == (padding_side == "right")  # the bug is real, and left padding has none
    every = recipe.model_copy(update={"parity_check": len(items), "parity_generate": len(items)})
    parity = _check(model, processor, items, batched, every)
    assert {d["id"] for d in parity["disagreements"]} == expected
    assert parity["checked"] == len(items) and parity["agreed"] == len(items) - len(expected)
    assert parity["forced_agreed"] + parity["generated_alone"] == len(items)
    # a forced disagreement is confirmed by generating alone; with left padding most samples need no generation
    assert parity["generated_alone"] >= len(expected)
    if padding_side == "left":
        assert parity["forced_agreed"] >= len(items) // 2, parity["generated_alone_because"]
        assert parity["forced_batch_declined"] is None and parity["forced_in_batch"] >= len(items) // 2
    for wrong in parity["disagreements"]:
        assert wrong["alone"] == alone[[item.sample.id for item in items].index(wrong["id"])]


def test_the_forced_check_applies_generates_processors_step_by_step(base_model: tuple) -> None:
    """With a repetition penalty and a minimum length in the generation config, each forced step's scores are
    processed as generate processed them (seeing the prompt and the row before that step): under left padding
    the forced check confirms every sample it can model exactly (a row holding an image placeholder is generated
    alone instead), none at a tie, and no sample disagrees."""
    model, processor, recipe = base_model
    config = model.generation_config
    saved = (config.repetition_penalty, config.min_new_tokens)
    config.repetition_penalty, config.min_new_tokens = 1.3, 3
    try:
        items, batched = _first_batch(model, processor, recipe, "left")
        alone = _alone_texts(model, processor, recipe, items)
        every = recipe.model_copy(update={"parity_check": len(items), "parity_generate": len(items)})
        parity = _check(model, processor, items, batched, every)
    finally:
        config.repetition_penalty, config.min_new_tokens = saved
    assert batched.texts == alone  # float32: a correct batch is the sample alone
    assert parity["checked"] == parity["agreed"] == len(items) and parity["forced_tied"] == 0
    unforced = parity["generated_alone_because"]
    assert parity["forced_agreed"] + len(unforced) == len(items) and parity["generated_alone"] == len(unforced)
    assert parity["forced_agreed"] >= len(items) // 2, unforced


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_the_batched_forced_pass_gives_each_sample_its_verdict_alone(base_model: tuple, padding_side: str) -> None:
    """Forcing the samples in one right-padded pass (prompts of different lengths) gives each the verdict forcing
    it alone gives: agreement, the first difference, the closest margin up to float32 rounding; for the rows of a
    correct batch and for the rows the right-padding bug changed."""
    from worker.inference.forcing import forced_batch, forced_check, greedy_config

    model, processor, recipe = base_model
    items, batched = _first_batch(model, processor, recipe, padding_side)
    inputs = [processor_inputs(processor, [item], CPU) for item in items]
    assert len({each["input_ids"].shape[1] for each in inputs}) > 1  # the batch pads
    config = greedy_config(model, processor, "cpu", max_new_tokens=recipe.max_new_tokens)
    usable = [i for i, row in enumerate(batched.rows) if not set(row) & {processor.tokenizer.convert_tokens_to_ids(
        processor.image_token)}]  # a row holding an image placeholder is never forced
    alone = [forced_check(model, processor, inputs[i], batched.rows[i], None, "cpu", config) for i in usable]
    together = forced_batch(model, processor, [inputs[i] for i in usable], [batched.rows[i] for i in usable], "cpu",
                            config)
    assert [(v.agrees, v.first_difference) for v in together] == [(v.agrees, v.first_difference) for v in alone]
    assert [v.closest_margin for v in together] == pytest.approx([v.closest_margin for v in alone], abs=1e-3)
    assert any(not v.agrees for v in alone) == (padding_side == "right")


def test_where_the_samples_do_not_stack_they_are_forced_alone(base_model: tuple,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A family whose per-sample inputs cannot be stacked into one batch (images of different tile counts) makes the
    batched forced pass decline, with torch's own error recorded: every sample is then forced alone, and the check
    settles them as before."""
    import torch

    from worker.inference import forcing

    def unstackable(entries: Any, pad_token_id: int, side: str = "left") -> Any:
        return torch.cat([torch.zeros(1, 2, 3), torch.zeros(1, 4, 3)], dim=0)  # what torch says to such inputs

    model, processor, recipe = base_model
    items, batched = _first_batch(model, processor, recipe, "left")
    monkeypatch.setattr(forcing, "collate", unstackable)
    every = recipe.model_copy(update={"parity_check": len(items), "parity_generate": len(items)})
    parity = _check(model, processor, items, batched, every)
    assert parity["forced_in_batch"] == 0 and "RuntimeError" in parity["forced_batch_declined"]
    assert parity["checked"] == parity["agreed"] == len(items) and parity["forcing_stopped"] is None
    assert parity["forced_agreed"] + len(parity["generated_alone_because"]) == len(items)


def test_a_bug_every_batch_shares_is_found_by_the_sample_forced_alone(base_model: tuple,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug that shows wherever several images share a pass (here each image's features halved) changes the
    batched answers, and the batched forced pass shares it: it confirms the rows it changed. The first sample,
    forced alone, does not, and generating it alone finds the disagreement: the check fails loudly."""
    model, processor, recipe = base_model
    inner = model.model
    original = inner.get_image_features

    def halved_when_batched(pixel_values: Any, image_grid_thw: Any = None, **kwargs: Any) -> Any:
        out = original(pixel_values, image_grid_thw, **kwargs)
        if image_grid_thw.shape[0] > 1:
            out.pooler_output = tuple(features * 0.5 for features in out.pooler_output)
        return out

    monkeypatch.setattr(inner, "get_image_features", halved_when_batched)
    items, batched = _first_batch(model, processor, recipe, "left")
    alone = _alone_texts(model, processor, recipe, items)
    changed = {item.sample.id for item, text, one in zip(items, batched.texts, alone, strict=True) if text != one}
    assert items[0].sample.id in changed and len(changed) >= 3  # the bug is real
    every = recipe.model_copy(update={"parity_check": len(items), "parity_generate": len(items)})
    parity = _check(model, processor, items, batched, every)
    found = {d["id"] for d in parity["disagreements"]}
    assert items[0].sample.id in found and found <= changed
    assert changed - found and parity["forced_in_batch"] >= len(changed - found)  # the batch confirmed the others


def test_generating_alone_is_bounded_and_the_rest_is_unsettled_not_agreed(base_model: tuple) -> None:
    """Right padding disagrees under forcing on several samples; with parity_generate = 1 one of them is generated
    alone (and found wrong), the others are recorded as unsettled with where forcing differed, and no sample is
    counted as agreeing that was not confirmed."""
    model, processor, recipe = base_model
    items, batched = _first_batch(model, processor, recipe, "right")
    one = recipe.model_copy(update={"parity_check": len(items), "parity_generate": 1})
    parity = _check(model, processor, items, batched, one)
    unforced = len(items) - parity["forced_agreed"]
    assert unforced >= 3, parity  # the bug makes forcing disagree on most samples
    assert parity["generated_alone"] == 1 and len(parity["unsettled"]) == unforced - 1
    assert parity["checked"] == parity["forced_agreed"] + 1 == len(items) - len(parity["unsettled"])
    assert parity["agreed"] + len(parity["disagreements"]) == parity["checked"]
    assert all(u["first_difference"] is not None and u["margin"] is not None for u in parity["unsettled"])
    settled = {d["id"] for d in parity["disagreements"]} | {u["id"] for u in parity["unsettled"]}
    assert len(settled) == len(parity["disagreements"]) + len(parity["unsettled"])  # disjoint


def test_unsettled_samples_are_said_with_what_to_raise() -> None:
    from contract.run_row import RecipeRow, RunSummary, Status
    from orchestrator.reporting.cells import parity_notes

    parity = {"enabled": True, "checked": 5, "agreed": 5, "batch_size": 8, "disagreements": [], "forced_agreed": 1,
              "generated_alone": 2, "closest_margin": 0.0004, "generated_alone_because": [], "forcing_stopped": None,
              "forced_tied": 2, "forced_in_batch": 2, "ties": [{"id": "s1", "first_difference": 3, "gap": 0.0},
                                          {"id": "s2", "first_difference": 0, "gap": 0.03125}],
              "unsettled": [{"id": "s7", "first_difference": 4, "margin": 0.0004, "gap": 0.25},
                            {"id": "s8", "first_difference": 1, "margin": 0.002, "gap": 0.5}]}
    notes = parity_notes(RunSummary(recipes=[RecipeRow(name="r", status=Status.OK, parity=parity)]))
    (unsettled, agreed) = notes
    assert unsettled == (True, "r: batch parity unsettled for 2 sample(s) (s7, s8): teacher forcing differed from "
                               "the batched answer by more than a tie (the batched token behind greedy's pick by "
                               "up to 0.5) after parity_generate's generations alone were spent; raise "
                               "parity_generate to decide them")
    assert agreed[0] and agreed[1].startswith("r: batch parity: 5 of 5 sample(s)")
    assert ("(3 by teacher forcing (2 in one batched pass, 2 at ties within the logits' rounding), 2 generated"
            in agreed[1])


@pytest.fixture(scope="module")
def base_bfloat16(demo: dict) -> tuple:
    recipe = Recipe(name="base", model=str(demo["models"]["base"]), dataset=str(demo["dataset"]), dtype="bfloat16")
    model, processor, _ = load_chain([ChainLink(str(demo["models"]["base"]), "full", "quick:0", 1)], recipe, CPU)
    return model, processor, recipe


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_in_bfloat16_ties_settle_by_forcing_and_a_batching_bug_is_no_tie(base_bfloat16: tuple,
                                                                           padding_side: str) -> None:
    """In bfloat16 a correct batch (left padding) and the sample alone may pick different tokens where the logits
    tie at their precision; the forced check settles those samples as ties, recorded, without generating any.
    Right padding moves the logits by far more than a tie: every sample it changes is a disagreement found by
    generating alone, and none is settled as a tie."""
    model, processor, recipe = base_bfloat16
    items, batched = _first_batch(model, processor, recipe, padding_side)
    budget = 0 if padding_side == "left" else len(items)
    every = recipe.model_copy(update={"parity_check": len(items), "parity_generate": budget})
    parity = _check(model, processor, items, batched, every)
    assert parity["forced_tied"] == len(parity["ties"])
    assert all(tie["gap"] <= 8 * 2.0 ** -7 * 2.0 ** 3 for tie in parity["ties"])  # eight units at |logit| < 8
    if padding_side == "left":
        assert parity["unsettled"] == [] and parity["disagreements"] == [] and parity["generated_alone"] == 0
        assert parity["checked"] == parity["agreed"] == len(items) == parity["forced_agreed"] + parity["forced_tied"]
        return
    alone = _alone_texts(model, processor, recipe, items)
    changed = {item.sample.id for item, text, one in zip(items, batched.texts, alone, strict=True) if text != one}
    assert len(changed) >= len(items) // 2  # the bug is real in bfloat16 too
    assert {d["id"] for d in parity["disagreements"]} == changed and parity["ties"] == []


def test_a_tie_is_eight_units_of_the_logits_last_place() -> None:
    """bfloat16 keeps 8 significant bits: at 4-8 one unit is 2**-5, at 0.25-0.5 it is 2**-9; float32 is far finer."""
    import torch

    from worker.inference.forcing import step_gaps, tie_tolerance

    assert tie_tolerance(5.0, torch.bfloat16) == 8 * 2.0 ** -5 == tie_tolerance(-7.9, torch.bfloat16)
    assert tie_tolerance(0.3, torch.bfloat16) == 8 * 2.0 ** -9
    assert tie_tolerance(5.0, torch.float32) == 8 * 2.0 ** -21
    assert tie_tolerance(0.0, torch.bfloat16) > 0
    scores = torch.tensor([1.0, 3.0, 3.0, 2.96875]).expand(4, 4)  # four steps, each scoring four tokens alike
    assert step_gaps(scores, torch.tensor([1, 2, 3, 0])).tolist() == [0.0, 0.0, 0.03125, 2.0]


def _first_batch(model: Any, processor: Any, recipe: Recipe, padding_side: str) -> tuple[list, Any]:
    """The demo set as one batch, generated with `padding_side` padding (right: a real batching bug)."""
    items = prepare_batch(processor, list(open_dataset(recipe.dataset, recipe)), recipe.prompt, CPU).items
    processor.tokenizer.padding_side = padding_side
    try:
        batched = generate(model, processor, processor_inputs(processor, items, CPU), "cpu",
                           max_new_tokens=recipe.max_new_tokens)
    finally:
        processor.tokenizer.padding_side = "left"
    return items, batched


def _alone_texts(model: Any, processor: Any, recipe: Recipe, items: list) -> list[str]:
    """Every sample generated alone: what the parity check's verdicts are held against."""
    return [generate(model, processor, processor_inputs(processor, [item], CPU), "cpu",
                     max_new_tokens=recipe.max_new_tokens).texts[0] for item in items]


def _check(model: Any, processor: Any, items: list, batched: Any, recipe: Recipe) -> dict:
    return check_parity(model, processor, items, batched, lambda item: processor_inputs(processor, [item], CPU),
                        recipe, "cpu", len(items))
