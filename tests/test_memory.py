"""The memory estimate for the tiny demo family, checked against a hand computation from its configs and
against the real processor; and the worker's answer to CUDA running out of memory: halve the batch, retry."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import write_recipes
from PIL import Image
from transformers import AutoProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

from contract.dataset import read_dataset
from contract.trainer_resize import smart_resize
from orchestrator.gpu.memory import (
    ALLOCATOR_FIXED_BYTES,
    ALLOCATOR_SAMPLES,
    CHAT_TOKENS,
    CUDA_CONTEXT_BYTES,
    MemoryEstimate,
    ModelShape,
    Prompts,
    estimate_recipe,
    lora_beside_mlp,
    model_shape,
    prefill_bytes,
    read_workload,
    vision_bytes,
)
from orchestrator.planning.plan import RecipePlan, make_plans
from orchestrator.planning.recipes import load_recipe_file
from worker.device import CPU
from worker.errors import WorkerError
from worker.inference.infer import run_inference
from worker.loading.load import load_chain

PROMPT = "{prompt} Answer with its bounding box."


def _plan(demo: dict, tmp_path: Path, model: str, **settings: object) -> RecipePlan:
    body = f'[[recipe]]\nname = "x"\nmodel = "{demo["root"] / "models" / model}"\n'
    recipe_file = load_recipe_file(write_recipes(tmp_path, body, demo, **settings))
    (plan,) = make_plans(recipe_file, recipe_file.recipes)
    return plan


def _parameters_by_hand(config: dict) -> int:
    """Qwen2-VL's parameter count, layer by layer, from config.json."""
    text, vision = config["text_config"], config["vision_config"]
    hidden, inter, vocab = text["hidden_size"], text["intermediate_size"], text["vocab_size"]
    head_dim = hidden // text["num_attention_heads"]
    kv = text["num_key_value_heads"] * head_dim
    attention = (hidden * hidden + hidden) + 2 * (hidden * kv + kv) + hidden * hidden  # q, k, v with bias; o
    layer = attention + 3 * hidden * inter + 2 * hidden  # gate, up, down; two RMSNorms
    language = vocab * hidden + text["num_hidden_layers"] * layer + hidden + vocab * hidden  # embed, norm, head
    embed, mlp = vision["embed_dim"], vision["embed_dim"] * vision["mlp_ratio"]
    patch = 3 * vision["temporal_patch_size"] * vision["patch_size"] ** 2 * embed  # Conv3d, no bias
    block = 2 * 2 * embed + (embed * 3 * embed + 3 * embed) + (embed * embed + embed) + (embed * mlp + mlp) + (
        mlp * embed + embed)  # two LayerNorms, qkv, proj, fc1, fc2
    merged = embed * vision["spatial_merge_size"] ** 2
    merger = 2 * embed + (merged * merged + merged) + (merged * hidden + hidden)
    return language + patch + vision["depth"] * block + merger


def _lora_by_hand(config: dict, rank: int, vision_too: bool) -> int:
    text, vision = config["text_config"], config["vision_config"]
    hidden, inter = text["hidden_size"], text["intermediate_size"]
    kv = text["num_key_value_heads"] * hidden // text["num_attention_heads"]
    pairs = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter), (hidden, inter),
             (inter, hidden)]  # q, k, v, o, gate, up, down: A is rank x in, B is out x rank
    total = text["num_hidden_layers"] * sum(rank * (a + b) for a, b in pairs)
    if vision_too:
        embed, mlp = vision["embed_dim"], vision["embed_dim"] * vision["mlp_ratio"]
        blocks = [(embed, 3 * embed), (embed, embed), (embed, mlp), (mlp, embed)]  # qkv, proj, fc1, fc2
        total += vision["depth"] * sum(rank * (a + b) for a, b in blocks)
    return total


def _demo_image_tokens(demo: dict) -> int:
    """The demo's images are multiples of 28 inside the processor's bounds: no resize, one token per 28x28."""
    dataset = Path(demo["dataset"])
    sizes = [Image.open(dataset.parent / json.loads(line)["image"]).size for line in dataset.read_text().splitlines()]
    return max((w // 28) * (h // 28) for w, h in sizes)


def _longest_prompt(demo: dict) -> int:
    prompts = [json.loads(line)["prompt"] for line in Path(demo["dataset"]).read_text().splitlines()]
    return max(len(PROMPT.format(prompt=p).encode()) for p in prompts) + CHAT_TOKENS


def test_weights_adapter_and_kv_cache_match_a_hand_computation(demo: dict, tmp_path: Path) -> None:
    config = json.loads((demo["root"] / "models" / "base" / "config.json").read_text())
    text = config["text_config"]
    plan = _plan(demo, tmp_path, "r4-joint", batch_size=4, max_new_tokens=8)
    estimate = estimate_recipe(plan.recipe, plan.chain, "cuda")
    assert estimate.dtype == "bfloat16" and estimate.attn == "flash_attention_2"
    assert estimate.weights_bytes == _parameters_by_hand(config) * 2  # bf16 on CUDA
    assert estimate.adapter_bytes == _lora_by_hand(config, rank=8, vision_too=True) * 4  # peft keeps it in fp32
    tokens = _longest_prompt(demo) + _demo_image_tokens(demo) + 8
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    kv = text["num_hidden_layers"] * 2 * text["num_key_value_heads"] * head_dim * tokens * 4 * 2
    assert estimate.kv_cache_bytes == kv
    assert estimate.context_bytes == CUDA_CONTEXT_BYTES
    slack = ALLOCATOR_FIXED_BYTES + int(ALLOCATOR_SAMPLES * ((kv + estimate.activation_bytes) // estimate.batch_size))
    assert estimate.allocator_bytes == slack  # what the caching allocator holds beyond the live peak
    needed = (estimate.weights_bytes + estimate.adapter_bytes + kv + estimate.activation_bytes + slack
              + CUDA_CONTEXT_BYTES)
    assert estimate.total_bytes == needed + int(needed * 0.10)


def test_on_cpu_the_estimate_is_float32_without_a_cuda_context(demo: dict, tmp_path: Path) -> None:
    config = json.loads((demo["root"] / "models" / "base" / "config.json").read_text())
    plan = _plan(demo, tmp_path, "r1-llm-only", memory_margin=0.25)
    estimate = estimate_recipe(plan.recipe, plan.chain, "cpu")
    assert estimate.weights_bytes == _parameters_by_hand(config) * 4
    assert estimate.adapter_bytes == _lora_by_hand(config, rank=8, vision_too=False) * 4
    assert estimate.context_bytes == 0 and estimate.allocator_bytes == 0 and estimate.margin == 0.25


def test_a_two_stage_chain_counts_the_stage_one_checkpoint_and_the_top_adapter(demo: dict, tmp_path: Path) -> None:
    config = json.loads((demo["root"] / "models" / "r3-stage1" / "config.json").read_text())
    plan = _plan(demo, tmp_path, "r3-stage2")
    estimate = estimate_recipe(plan.recipe, plan.chain, "cuda")
    assert [Path(link.path).name for link in plan.chain] == ["r3-stage1", "r3-stage2"]
    assert estimate.weights_bytes == _parameters_by_hand(config) * 2
    assert estimate.adapter_bytes == _lora_by_hand(config, rank=8, vision_too=False) * 4


def test_image_and_text_tokens_agree_with_the_real_processor(demo: dict, tmp_path: Path) -> None:
    """Image tokens exactly as the processor makes them; the text bound never below the real token count."""
    plan = _plan(demo, tmp_path, "base")
    workload = read_workload(plan.recipe, plan.chain, "cuda")
    processor = AutoProcessor.from_pretrained(plan.chain[0].path)
    samples = read_dataset(Path(demo["dataset"]))
    most_image, most_text = 0, 0
    for sample in samples:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT.format(
            prompt=sample.prompt)}]}]
        chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[chat], images=[Image.open(sample.image_path).convert("RGB")], return_tensors="pt")
        image = int(inputs["image_grid_thw"].prod()) // 4
        most_image = max(most_image, image)
        most_text = max(most_text, inputs["input_ids"].shape[1] - image)
    assert workload.prompts.image_tokens == most_image == _demo_image_tokens(demo)
    assert workload.prompts.patches == most_image * 4
    assert most_text <= workload.prompts.text_tokens


@pytest.mark.parametrize("size", [(112, 112), (1000, 30), (30, 1000), (4000, 3000), (57, 57), (28, 28), (640, 480)])
def test_the_resize_matches_qwen2_vl(size: tuple[int, int]) -> None:
    height, width = size
    for bounds in [(56 * 56, 28 * 28 * 32), (56 * 56, 28 * 28 * 1280)]:
        assert smart_resize(height, width, 28, *bounds) == hf_smart_resize(height, width, 28, *bounds)


def test_more_samples_per_batch_need_more_memory(demo: dict, tmp_path: Path) -> None:
    plan = _plan(demo, tmp_path, "base")
    workload = read_workload(plan.recipe, plan.chain, "cuda")
    one, eight = workload.estimate(1), workload.estimate(8)
    assert one.fixed_bytes == eight.fixed_bytes
    assert workload.prompts.samples == 12 and eight.batch_size == 6  # the worker runs 12 at batch 8 as 6 + 6
    assert eight.kv_cache_bytes == eight.batch_size * one.kv_cache_bytes
    assert eight.total_bytes > one.total_bytes


# ----------------------------------------------------------------------------- CUDA out of memory in the worker


class _GpuLimit:
    """Stands for a GPU that holds at most `most` samples per generate: CUDA cannot exist on a CPU machine, so
    this raises the error torch raises there, and otherwise lets the real model generate."""

    def __init__(self, model, most: int) -> None:
        self.generate = model.generate
        self.most = most
        self.sizes: list[int] = []

    def __call__(self, **inputs):
        size = inputs["input_ids"].shape[0]
        self.sizes.append(size)
        if size > self.most:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (batch {size})")
        return self.generate(**inputs)


@pytest.fixture(scope="module")
def loaded(demo: dict, tmp_path_factory: pytest.TempPathFactory):
    # parity_check off: these tests count the generate calls of the batches alone
    plan = _plan(demo, tmp_path_factory.mktemp("oom"), "base", batch_size=8, max_new_tokens=4, parity_check=0)
    recipe = plan.recipe
    model, processor, _ = load_chain(plan.chain, recipe, CPU)
    return model, processor, recipe


def test_out_of_memory_halves_the_batch_and_keeps_it_halved(loaded, demo: dict, monkeypatch) -> None:
    model, processor, recipe = loaded
    limit = _GpuLimit(model, most=3)
    monkeypatch.setattr(model, "generate", limit)
    samples = read_dataset(Path(demo["dataset"]))  # 12 at a batch size of 8: two batches of 6
    sent: list[dict] = []
    stats = run_inference(model, processor, samples, recipe, CPU, lambda _type, **m: sent.append(m), lambda: False)
    assert recipe.batch_size == 8 and len(samples) == 12
    assert limit.sizes == [6, 3, 3, 3, 3]  # 6 fails, 3 fits: the rest of that batch and the next one at 3
    assert stats.oom_retries == 1 and stats.batch_size == 3
    assert sorted(m["id"] for m in sent) == sorted(s.id for s in samples) and stats.scored == len(samples)


def test_out_of_memory_with_one_sample_fails_as_cuda_oom(loaded, demo: dict, monkeypatch) -> None:
    model, processor, recipe = loaded
    monkeypatch.setattr(model, "generate", _GpuLimit(model, most=0))
    with pytest.raises(WorkerError, match="batch of 1") as caught:
        run_inference(model, processor, read_dataset(Path(demo["dataset"]), limit=2), recipe, CPU,
                      lambda *_a, **_m: None, lambda: False)
    assert caught.value.kind == "cuda_oom"


def test_a_lora_counts_its_float32_temporaries_at_the_widest_adapted_layer(demo: dict, tmp_path: Path) -> None:
    """peft runs LoRA in float32: a float32 copy of the input and a float32 output per token, at the widest
    adapted layer (the LLM adapters here adapt the MLP, whose widest side is the intermediate size)."""
    text = json.loads((demo["root"] / "models" / "base" / "config.json").read_text())["text_config"]
    base = estimate_recipe(_plan(demo, tmp_path, "base").recipe, _plan(demo, tmp_path, "base").chain, "cuda", 4)
    plan = _plan(demo, tmp_path, "r1-llm-only")
    lora = estimate_recipe(plan.recipe, plan.chain, "cuda", 4)
    assert base.lora_bytes == 0
    assert lora.lora_bytes == 4 * lora.prompt_tokens * max(text["intermediate_size"], text["hidden_size"]) * 8
    assert lora.lora_alongside and lora.activation_bytes == base.activation_bytes + lora.lora_bytes


def test_an_attention_only_lora_peaks_apart_from_the_mlp() -> None:
    """A q/v LoRA's temporaries are live while the attention runs, not at the MLP's peak (on the H200 a q/v LoRA
    left Qwen2.5-VL's and InternVL's peaks unchanged at batch 32): counted as the larger of the two, not the sum.
    An adapter on an MLP layer (wider than the residual stream) is counted on top."""
    config = {"model_type": "qwen2_vl", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 256, "vocab_size": 100,
              "vision_config": {"embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 4}}
    shape = model_shape(config)
    assert shape is not None
    assert not lora_beside_mlp(shape, (64, 0)) and not lora_beside_mlp(shape, (64, 32))
    assert lora_beside_mlp(shape, (256, 0)) and lora_beside_mlp(shape, (64, 128))
    parts = {"dtype": "bfloat16", "attn": "sdpa", "batch_size": 1, "weights_bytes": 0, "adapter_bytes": 0,
             "kv_cache_bytes": 0, "vision_bytes": 300, "prefill_bytes": 500, "context_bytes": 0, "margin": 0.0,
             "prompt_tokens": 1, "image_tokens": 1, "lora_bytes": 200}
    assert MemoryEstimate(**parts, lora_alongside=False).activation_bytes == 500
    assert MemoryEstimate(**parts, lora_alongside=True).activation_bytes == 700


def test_the_vision_tower_is_sized_by_the_largest_images_a_batch_can_hold() -> None:
    """A dataset of 1-tile and 13-tile images (InternVL, 448x448 and 560x420): a batch of all of them holds 16 x 13
    + 16 x 1 tiles, not 32 x 13 (the H200 measured the former). KV and prefill stay at the longest prompt for
    every row: left padding makes every row of a batch as long as its longest."""
    shape = ModelShape(layers=2, heads=4, kv_heads=2, head_dim=16, hidden=64, intermediate=256, vocab=100,
                       vision_embed=32, vision_mlp=128, vision_heads=2)
    mixed = Prompts(text_tokens=40, image_tokens=13 * 256, patches=13 * 1025, samples=32,
                    patch_counts=(13 * 1025,) * 16 + (1025,) * 16)
    uniform = replace(mixed, patch_counts=())
    for batch, tiles in ((8, 8 * 13), (16, 16 * 13), (20, 16 * 13 + 4), (32, 16 * 13 + 16)):
        assert mixed.batch_patches(batch) == tiles * 1025
        assert uniform.batch_patches(batch) == batch * 13 * 1025
        ratio = vision_bytes(shape, mixed, batch, 2, "flash_attention_2") / vision_bytes(
            shape, uniform, batch, 2, "flash_attention_2")
        assert ratio == pytest.approx(tiles / (batch * 13), rel=1e-6)
        assert prefill_bytes(shape, mixed, batch, 2, "sdpa") == prefill_bytes(shape, uniform, batch, 2, "sdpa")
