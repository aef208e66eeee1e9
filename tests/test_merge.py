"""`merge`: a recipe's adapter chain becomes one standalone checkpoint that loads without peft and gives the
chain's outputs, with the lineage it came from written next to it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import ROOT, run_cli
from peft import PeftModel
from PIL import Image
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from contract.checkpoint import fingerprint, weight_files
from orchestrator.execution.merge import MergeError, merge_recipe
from orchestrator.gpu.memory import estimate_recipe
from orchestrator.planning.lineage import resolve_chain
from orchestrator.planning.recipes import load_recipe_file
from worker.device import CPU
from worker.loading.load import load_chain

# Loads the merged folder in an interpreter where `import peft` fails, and saves its logits for the inputs given.
_WITHOUT_PEFT = """
import sys
sys.modules["peft"] = None  # any use of peft now raises ImportError
import torch
from transformers import Qwen2VLForConditionalGeneration
folder, inputs, out = sys.argv[1:]
model = Qwen2VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
assert not any("lora" in name for name, _ in model.named_parameters())
with torch.inference_mode():
    torch.save(model(**torch.load(inputs)).logits, out)
"""


@pytest.fixture(scope="module")
def merged(demo: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An adapter on an adapter (r4-joint's weights trained, say, on base + r1) merged through the CLI: both
    adapters must end up in the weights."""
    folder = tmp_path_factory.mktemp("merge")
    models = demo["root"] / "models"
    stacked = folder / "stacked"
    shutil.copytree(models / "r4-joint", stacked)
    config = json.loads((stacked / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(models / "r1-llm-only")
    (stacked / "adapter_config.json").write_text(json.dumps(config))
    recipes = folder / "recipes.toml"
    recipes.write_text(f'[defaults]\ndataset = "{demo["dataset"]}"\n'
                       f'[[recipe]]\nname = "stacked"\nmodel = "{stacked}"\n'
                       f'[[recipe]]\nname = "base"\nmodel = "{models / "base"}"\n')
    out = folder / "merged"
    result = run_cli("merge", "stacked", str(recipes), "--out", str(out))
    return {"result": result, "out": out, "recipes": recipes, "folder": folder}


def _inputs(processor, demo: dict) -> dict:
    sample = json.loads(Path(demo["dataset"]).read_text().splitlines()[0])
    image = Image.open(Path(demo["dataset"]).parent / sample["image"]).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["prompt"]}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return dict(processor(text=[text], images=[image], return_tensors="pt"))


def _stacked_with_peft(chain: list) -> PeftModel:
    """The reference, computed apart from the code under test: the root with every adapter of the chain loaded and
    active at once in peft, none merged (LoRA deltas add up, so this is what merging in order must reproduce)."""
    root, *adapters = chain
    model = PeftModel.from_pretrained(Qwen2VLForConditionalGeneration.from_pretrained(root.path), adapters[0].path,
                                      adapter_name="a0")
    for index, link in enumerate(adapters[1:], 1):
        model.load_adapter(link.path, adapter_name=f"a{index}")
    model.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    return model.eval()


def test_the_merged_checkpoint_gives_the_chain_outputs_without_peft(merged: dict, demo: dict) -> None:
    result = merged["result"]
    assert result.returncode == 0, result.stdout + result.stderr
    out = merged["out"]
    assert "Merged 2 adapter(s) of 'stacked'" in result.stdout
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert not (out / "adapter_config.json").exists()  # nothing for transformers to hand to peft

    inputs = _inputs(AutoProcessor.from_pretrained(out), demo)  # the merged folder's own processor
    torch.save(inputs, merged["folder"] / "inputs.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    loaded = subprocess.run([sys.executable, "-c", _WITHOUT_PEFT, str(out), str(merged["folder"] / "inputs.pt"),
                             str(merged["folder"] / "logits.pt")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    without_peft = torch.load(merged["folder"] / "logits.pt")

    recipe_file = load_recipe_file(merged["recipes"])
    chain = resolve_chain(recipe_file.recipes[0], recipe_file.lineage)
    reference = _stacked_with_peft(chain)
    evaluated, _, _ = load_chain(chain, recipe_file.recipes[0], CPU)  # what `run` evaluates
    with torch.inference_mode():
        with_peft = reference(**inputs).logits
        by_worker = evaluated(**inputs).logits
        reference.base_model.set_adapter(["a0"])
        lower_only = reference(**inputs).logits
        with reference.disable_adapter():
            root_only = reference(**inputs).logits
    torch.testing.assert_close(without_peft, with_peft, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(by_worker, with_peft, atol=1e-4, rtol=1e-4)
    # both adapters matter, so the comparisons above mean something
    assert (with_peft - root_only).abs().max() > 1e-2 and (with_peft - lower_only).abs().max() > 1e-2


def test_lineage_json_records_the_chain_it_came_from(merged: dict) -> None:
    assert merged["result"].returncode == 0, merged["result"].stderr
    out = merged["out"]
    record = json.loads((out / "lineage.json").read_text())
    recipe_file = load_recipe_file(merged["recipes"])
    chain = resolve_chain(recipe_file.recipes[0], recipe_file.lineage)
    assert record["merged_from"] == "stacked"
    assert record["chain"] == [link.__dict__ for link in chain]
    assert [Path(link["path"]).name for link in record["chain"]] == ["base", "r1-llm-only", "stacked"]
    assert record["adapters_merged"] == 2 and record["dtype"] == "float32"
    # the merged folder's own fingerprint, as `plan` would compute it for a recipe that uses it
    assert record["fingerprint"] == fingerprint(out / "config.json", weight_files(out, "full", allow_pickle=False),
                                                hash_weights=False)
    assert not Path(str(out) + ".partial").exists()


def test_merge_refuses_what_it_cannot_do_with_exit_codes(merged: dict, demo: dict) -> None:
    recipes = str(merged["recipes"])
    again = run_cli("merge", "stacked", recipes, "--out", str(merged["out"]))
    assert again.returncode == 2 and "exists and is not an empty folder" in again.stderr
    full = run_cli("merge", "base", recipes, "--out", str(merged["folder"] / "x"))
    assert full.returncode == 2 and "no adapter to merge" in full.stderr
    unknown = run_cli("merge", "nope", recipes, "--out", str(merged["folder"] / "x"))
    assert unknown.returncode == 2 and "no recipe named 'nope'" in unknown.stderr and "stacked, base" in unknown.stderr
    lost = merged["folder"] / "lost"
    shutil.copytree(demo["root"] / "models" / "r3-stage2", lost)  # its training-machine base, and no remap rule
    (merged["folder"] / "lost.toml").write_text(f'[defaults]\ndataset = "{demo["dataset"]}"\n'
                                                f'[[recipe]]\nname = "lost"\nmodel = "{lost}"\n')
    failed = run_cli("merge", "lost", str(merged["folder"] / "lost.toml"), "--out", str(merged["folder"] / "x"))
    assert failed.returncode == 1 and "/ssd1/team/vlm_outputs/r3-stage1" in failed.stderr
    assert not (merged["folder"] / "x").exists()


def test_merge_adapters_evaluates_the_chain_as_plain_weights(merged: dict, demo: dict) -> None:
    """`merge_adapters = true`: the top adapter is merged too; the model is a plain one (no LoRA layers left to
    slow each decode step) whose outputs match the unmerged chain's, and the estimate drops LoRA's temporaries."""
    recipe_file = load_recipe_file(merged["recipes"])
    recipe = recipe_file.recipes[0]
    chain = resolve_chain(recipe, recipe_file.lineage)
    unmerged, processor, _ = load_chain(chain, recipe, CPU)
    plain, _, loaded = load_chain(chain, recipe.model_copy(update={"merge_adapters": True}), CPU)
    assert isinstance(unmerged, PeftModel) and not isinstance(plain, PeftModel)
    assert not [name for name, _ in plain.named_modules() if "lora" in name.lower()]
    assert loaded["model_class"] == type(plain).__name__
    inputs = _inputs(processor, demo)
    with torch.inference_mode():
        torch.testing.assert_close(plain(**inputs).logits, unmerged(**inputs).logits, atol=1e-4, rtol=1e-4)
    assert estimate_recipe(recipe, chain, "cuda", 4).lora_bytes > 0
    assert estimate_recipe(recipe.model_copy(update={"merge_adapters": True}), chain, "cuda", 4).lora_bytes == 0


@pytest.mark.parametrize(("fault", "expected"), [
    ("raise", "merging failed: RuntimeError: fault injected at merge"),
    ("segv", "the merge worker crashed with SIGSEGV"),
])
def test_a_failing_merge_worker_is_reported_through_the_launcher(merged: dict, fault: str, expected: str) -> None:
    """The merge worker is started like an evaluation worker: its error comes back as a protocol message, a crash
    as a decoded exit with the end of its log (faulthandler's stack), and nothing of it is left behind."""
    out = merged["folder"] / f"never-{fault}"
    result = run_cli("merge", "stacked", str(merged["recipes"]), "--out", str(out),
                     env={"EVALORCH_FAULT": f"stacked:{fault}@merge"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Error:" in result.stderr and expected in result.stderr
    assert "Traceback" not in result.stderr.split("its last output")[0]  # no traceback of ours reaches the user
    if fault == "segv":
        assert "Segmentation fault" in result.stderr  # the log's tail: faulthandler's report
    assert not out.exists() and not Path(f"{out}.partial").exists()
    assert not [p for p in psutil.process_iter(["cmdline"]) if "worker.merge" in " ".join(p.info["cmdline"] or [])
                and str(out) in " ".join(p.info["cmdline"] or [])]


def test_a_merge_worker_past_its_timeout_is_stopped_and_the_merge_fails(merged: dict,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The merge worker is read through the supervisor's pump: past `timeout` it is stopped, none of it is left."""
    monkeypatch.setenv("EVALORCH_FAULT", "stacked:hang@merge")
    out = merged["folder"] / "never-timeout"
    started = time.monotonic()
    with pytest.raises(MergeError, match="merging took longer than 3s and was stopped"):
        merge_recipe(load_recipe_file(merged["recipes"]), "stacked", out, timeout=3)
    assert time.monotonic() - started < 60
    assert not out.exists() or not any(out.iterdir())
    assert not [p for p in psutil.process_iter(["cmdline"]) if "worker.merge" in " ".join(p.info["cmdline"] or [])
                and str(out) in " ".join(p.info["cmdline"] or [])]
