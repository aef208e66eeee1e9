"""No offload, ever: after loading, every parameter and buffer must sit on the one device the worker was given.
A CPU machine has no second device to offload from, so one module is moved to "meta" (what accelerate leaves
behind for offloaded weights) and the check must name it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import write_recipes

from orchestrator.planning.plan import make_plans
from orchestrator.planning.recipes import load_recipe_file
from worker.device import CPU
from worker.errors import WorkerError
from worker.loading.load import check_placement, load_chain


def _load(demo: dict, tmp_path: Path, model: str):
    body = f'[[recipe]]\nname = "x"\nmodel = "{demo["root"] / "models" / model}"\n'
    recipe_file = load_recipe_file(write_recipes(tmp_path, body, demo))
    (plan,) = make_plans(recipe_file, recipe_file.recipes)
    model, _processor, loaded = load_chain(plan.chain, plan.recipe, CPU)
    return model, loaded


def test_a_whole_model_on_its_device_passes(demo: dict, tmp_path: Path) -> None:
    model, loaded = _load(demo, tmp_path, "r3-stage2")  # stage-1 checkpoint with a LoRA adapter on top
    assert loaded["placement_ok"]
    check_placement(model, "cpu")
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cpu"}


def test_a_module_left_behind_is_an_offload_error_naming_it(demo: dict, tmp_path: Path) -> None:
    model, _ = _load(demo, tmp_path, "base")
    model.model.visual.merger.to("meta")
    with pytest.raises(WorkerError) as caught:
        check_placement(model, "cpu")
    assert caught.value.kind == "offload"
    message = str(caught.value)
    assert "model.visual.merger.mlp.0 (meta)" in message and "model.visual.merger.ln_q (meta)" in message
    assert "model.language_model" not in message  # only the stray modules are named
    assert "not on cpu" in message


def test_an_adapter_module_left_behind_is_named_too(demo: dict, tmp_path: Path) -> None:
    model, _ = _load(demo, tmp_path, "r4-joint")
    lora = model.base_model.model.model.visual.blocks[1].attn.qkv.lora_A
    lora.to("meta")
    with pytest.raises(WorkerError, match=r"visual\.blocks\.1\.attn\.qkv\.lora_A\.default \(meta\)"):
        check_placement(model, "cpu")


def test_a_model_on_the_cpu_when_cuda_was_asked_for_is_refused(demo: dict, tmp_path: Path) -> None:
    """What the seed's failure looked like from the inside: weights on the CPU under a CUDA run."""
    model, _ = _load(demo, tmp_path, "base")
    with pytest.raises(WorkerError, match=r"module\(s\) are not on cuda:0: .* \(cpu\).* and \d+ more") as caught:
        check_placement(model, "cuda:0")
    assert caught.value.kind == "offload"


def test_a_quantized_layers_constants_left_behind_are_named_too(demo: dict, tmp_path: Path) -> None:
    """bitsandbytes keeps a 4-bit weight's constants (absmax, code, double quant's nested state) on its
    `quant_state` and an 8-bit weight's row scales on the weight itself, neither a parameter nor a buffer: the check
    reads them there, as bitsandbytes.nn's Params4bit and Int8Params hold them, and accepts them on the device."""
    model, _ = _load(demo, tmp_path, "base")
    attention = model.model.language_model.layers[0].self_attn
    four, eight = attention.q_proj.weight, attention.k_proj.weight
    four.quant_state = SimpleNamespace(absmax=torch.zeros(4), code=torch.zeros(16),
                                       state2=SimpleNamespace(absmax=torch.zeros(1), code=torch.zeros(256)))
    eight.SCB = torch.zeros(eight.shape[0])
    check_placement(model, "cpu")
    four.quant_state.state2.absmax = torch.zeros(1, device="meta")
    eight.SCB = torch.zeros(eight.shape[0], device="meta")
    with pytest.raises(WorkerError) as caught:
        check_placement(model, "cpu")
    assert caught.value.kind == "offload"
    message = str(caught.value)
    assert "self_attn.q_proj.weight.quant_state.state2 (meta)" in message, message
    assert "self_attn.k_proj.weight (meta)" in message and "2 module(s)" in message, message
