"""Decode steps that attend over the left-padded cache in place (decode/decode_attention.py). flash-attn's kvcache
kernel needs a GPU, so here a reference kernel with the same contract (row i attends to keys [cache_leftpad[i],
cache_seqlens[i]), flash-attn's layout) is routed in for sdpa on the CPU: what is tested is the routing (which
steps, which padding, which layout), with transformers' own path as the truth. The real kernel is checked against
that path on the GPU (tests/gpu)."""

from __future__ import annotations

import pytest
import torch

from contract.dataset import open_dataset
from contract.recipe import Recipe
from contract.spec import ChainLink
from worker.decode import decode_attention
from worker.device import CPU
from worker.inference.generation import generate
from worker.inference.infer import prepare_batch, processor_inputs
from worker.loading.load import load_chain
from worker.simulated_gpu import ReferenceKernel


@pytest.fixture(scope="module")
def base_batch(demo: dict) -> tuple:
    recipe = Recipe(name="base", model=str(demo["models"]["base"]), dataset=str(demo["dataset"]))
    model, processor, _ = load_chain([ChainLink(str(demo["models"]["base"]), "full", "quick:0", 1)], recipe, CPU)
    items = prepare_batch(processor, list(open_dataset(recipe.dataset, recipe)), recipe.prompt, CPU).items
    return model, processor, recipe, items


def _generate(base_batch: tuple, padding_side: str = "left") -> list[str]:
    model, processor, recipe, items = base_batch
    processor.tokenizer.padding_side = padding_side
    try:
        inputs = processor_inputs(processor, items, CPU)
        return generate(model, processor, inputs, "cpu", max_new_tokens=recipe.max_new_tokens).texts
    finally:
        processor.tokenizer.padding_side = "left"


def test_routed_decode_steps_answer_as_transformers_does(base_batch: tuple, routed: callable) -> None:
    model, processor, _, items = base_batch
    mask = processor_inputs(processor, items, CPU)["attention_mask"]
    pads = decode_attention.left_padding(mask)
    assert pads is not None and pads.max() > 0 and pads.min() == 0  # rows of several lengths: the padding matters
    expected = _generate(base_batch)
    kernel = routed(ReferenceKernel())
    assert _generate(base_batch) == expected
    # every decode step of every layer went to the kernel (the prefill did not): layers x (new tokens - 1) at least
    layers = model.config.get_text_config().num_hidden_layers
    assert kernel.calls >= layers * 2


def test_a_kernel_that_ignored_the_padding_would_change_the_answers(base_batch: tuple, routed: callable) -> None:
    """The routing's padding is what keeps the answers: without it the short rows attend to pad positions."""
    expected = _generate(base_batch)
    kernel = routed(ReferenceKernel(ignore_padding=True))
    assert _generate(base_batch) != expected and kernel.calls > 0


def test_right_padding_keeps_transformers_own_path(base_batch: tuple, routed: callable) -> None:
    expected = _generate(base_batch, "right")
    kernel = routed(ReferenceKernel(ignore_padding=True))  # would change the answers if it were called
    assert _generate(base_batch, "right") == expected and kernel.calls == 0


def test_only_a_left_padded_mask_counts_its_padding() -> None:
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    assert decode_attention.left_padding(left).tolist() == [2, 0, 1]
    assert decode_attention.left_padding(torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])) is None  # right padding
    assert decode_attention.left_padding(torch.tensor([[0, 1, 0, 1]])) is None  # a hole
    assert decode_attention.left_padding(None) is None


def test_a_recipe_may_keep_transformers_own_decode_attention(demo: dict) -> None:
    recipe = Recipe(name="b", model=str(demo["models"]["base"]), decode_attention="transformers")
    assert recipe.decode_attention == "transformers"
    assert Recipe(name="b", model=str(demo["models"]["base"])).decode_attention == "kvcache"
    with pytest.raises(ValueError, match="decode_attention"):
        Recipe(name="b", model=str(demo["models"]["base"]), decode_attention="fast")
