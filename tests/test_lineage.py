"""Lineage: every recipe's chain of weights resolved exactly from real files, checked before launch, explained.

The demo family is real (tiny Qwen2-VL, real peft adapters); the odd cases (chains, cycles, caches, pickles) are
real folders built here from copies of it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from contract.spec import ChainLink
from contract.units import format_bytes
from orchestrator.planning.lineage import (
    LineageError,
    adapted_modules,
    checkpoint_modules,
    describe_chain,
    module_key,
    resolve_chain,
)
from orchestrator.planning.plan import make_plans
from orchestrator.planning.recipes import RecipeFile, load_recipe_file
from worker.device import CPU
from worker.loading.load import load_chain

TRAINING_PREFIX = "/ssd1/team/vlm_outputs"


def _recipe_file(folder: Path, demo: dict, recipes: str, *, remap: dict[str, str] | None = None,
                 lineage: str = "") -> RecipeFile:
    """A recipes.toml written the way a user writes one; `recipes` is the [[recipe]] part."""
    text = f'[defaults]\ndataset = "{demo["dataset"]}"\n[lineage]\n{lineage}\n'
    if remap:
        text += "remap = { " + ", ".join(f'"{k}" = "{v}"' for k, v in remap.items()) + " }\n"
    path = folder / "recipes.toml"
    path.write_text(text + recipes)
    return load_recipe_file(path)


def _recipe(name: str, model: Path | str, **fields: object) -> str:
    lines = ["[[recipe]]", f'name = "{name}"', f'model = "{model}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in fields.items()]  # JSON strings/bools are valid TOML here
    return "\n".join(lines) + "\n"


def _resolve(folder: Path, demo: dict, model: Path | str, *, remap: dict[str, str] | None = None,
             lineage: str = "", **fields: object) -> list[ChainLink]:
    recipe_file = _recipe_file(folder, demo, _recipe("r", model, **fields), remap=remap, lineage=lineage)
    return resolve_chain(recipe_file.recipes[0], recipe_file.lineage)


def _copy_adapter(source: Path, dest: Path, base: str, **config: object) -> Path:
    """A copy of a real adapter whose adapter_config.json records `base` (and any other given entries)."""
    shutil.copytree(source, dest)
    config_file = dest / "adapter_config.json"
    data = json.loads(config_file.read_text()) | {"base_model_name_or_path": base, **config}
    config_file.write_text(json.dumps(data, indent=2))
    return dest


def _models(demo: dict) -> Path:
    return demo["root"] / "models"


def _names(chain: list[ChainLink]) -> list[str]:
    return [Path(link.path).name for link in chain]


# ----------------------------------------------------------------------------- the seed's bug


def _logits(model, processor, demo: dict) -> torch.Tensor:
    """Next-token logits for the first demo sample (image + prompt): the vision tower counts."""
    sample = json.loads(Path(demo["dataset"]).read_text().splitlines()[0])
    image = Image.open(Path(demo["dataset"]).parent / sample["image"]).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["prompt"]}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.inference_mode():
        return model(**inputs).logits[0, -8:].float()


def _with_adapter(base: Path, adapter: Path):
    model = Qwen2VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).eval()


def test_the_two_stage_adapter_is_resolved_to_stage_one_and_the_wrong_base_changes_outputs(
        demo: dict, tmp_path: Path) -> None:
    """The seed's bug: r3-stage2 evaluated on the original base gave other numbers and no error. The chain the
    orchestrator resolves on its own ends at stage 1, and loading it gives stage 1's outputs, not the base's."""
    models = _models(demo)
    recipe_file = _recipe_file(tmp_path, demo, _recipe("r3-two-stage", models / "r3-stage2"),
                               remap={TRAINING_PREFIX: str(models)})
    plan = make_plans(recipe_file, recipe_file.recipes)[0]
    assert plan.runnable, plan.problem
    assert _names(plan.chain) == ["r3-stage1", "r3-stage2"]
    assert [link.kind for link in plan.chain] == ["full", "adapter"]
    assert plan.chain[0].source == "remap"
    assert plan.chain[1].recorded_base == f"{TRAINING_PREFIX}/r3-stage1"
    assert plan.chain[0].fingerprint != resolve_chain(recipe_file.recipes[0].model_copy(
        update={"model": str(models / "base")}), recipe_file.lineage)[0].fingerprint  # stage 1 is not the base

    processor = AutoProcessor.from_pretrained(models / "base")
    right = _logits(_with_adapter(models / "r3-stage1", models / "r3-stage2"), processor, demo)
    wrong = _logits(_with_adapter(models / "base", models / "r3-stage2"), processor, demo)
    assert (right - wrong).abs().max() > 1e-3, "stage 1 and the base must give different outputs"

    model, chain_processor, _ = load_chain(plan.chain, recipe_file.recipes[0], CPU)
    resolved = _logits(model, chain_processor, demo)
    torch.testing.assert_close(resolved, right, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- where a base is found


def test_a_training_machine_path_is_found_by_the_longest_remap_rule(demo: dict, tmp_path: Path) -> None:
    models = _models(demo)
    decoy = tmp_path / "decoy"  # what the shorter rule points at exists too: only the order picks stage 1
    shutil.copytree(models / "base", decoy / "team" / "vlm_outputs" / "r3-stage1")
    remap = {"/ssd1": str(decoy), TRAINING_PREFIX: str(models)}
    chain = _resolve(tmp_path, demo, models / "r3-stage2", remap=remap)
    assert chain[0].path == str((models / "r3-stage1").resolve())
    assert chain[0].source == "remap"
    recipe_file = _recipe_file(tmp_path, demo, _recipe("r", models / "r3-stage2"), remap=remap)
    label = describe_chain(chain, recipe_file.lineage)[1]
    assert f"remap {TRAINING_PREFIX} -> {models}" in label


def test_without_a_remap_rule_the_error_lists_every_candidate(demo: dict, tmp_path: Path) -> None:
    models = _models(demo)
    with pytest.raises(LineageError) as no_rule:
        _resolve(tmp_path, demo, models / "r3-stage2")
    message = str(no_rule.value)
    assert f"was trained on '{TRAINING_PREFIX}/r3-stage1', which was not found" in message
    assert f"    {TRAINING_PREFIX}/r3-stage1" in message
    assert "no remap rules are set" in message and "fix: add [lineage] remap" in message

    elsewhere = tmp_path / "elsewhere"
    with pytest.raises(LineageError) as wrong_rule:
        _resolve(tmp_path, demo, models / "r3-stage2", remap={TRAINING_PREFIX: str(elsewhere)})
    tried = str(wrong_rule.value)
    assert f"    {TRAINING_PREFIX}/r3-stage1" in tried and f"    {elsewhere}/r3-stage1" in tried
    assert f"remap rules in the recipe file: {TRAINING_PREFIX} -> {elsewhere}" in tried


def test_a_relative_base_is_found_next_to_the_adapter(demo: dict, tmp_path: Path) -> None:
    family = tmp_path / "family"
    shutil.copytree(_models(demo) / "base", family / "base")
    _copy_adapter(_models(demo) / "r1-llm-only", family / "tuned", "../base")
    chain = _resolve(tmp_path, demo, family / "tuned")
    assert chain[0].path == str((family / "base").resolve())
    assert chain[0].source == "relative"
    recipe_file = _recipe_file(tmp_path, demo, _recipe("r", family / "tuned"))
    assert "recorded ../base, relative to the adapter's folder" in describe_chain(chain, recipe_file.lineage)[1]


def test_a_hub_id_is_found_in_the_local_cache_only(demo: dict, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--acme--tiny-qwen2-vl"
    shutil.copytree(_models(demo) / "base", repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    adapter = _copy_adapter(_models(demo) / "r1-llm-only", tmp_path / "tuned", "acme/tiny-qwen2-vl")

    chain = _resolve(tmp_path, demo, adapter)
    assert chain[0].path == str((repo / "snapshots" / revision).resolve())
    assert chain[0].source == "hub-cache" and chain[0].kind == "full"
    assert _resolve(tmp_path, demo, "acme/tiny-qwen2-vl")[0].source == "hub-cache"  # the recipe's model itself

    _copy_adapter(_models(demo) / "r1-llm-only", tmp_path / "lost", "acme/not-downloaded")
    with pytest.raises(LineageError, match=re.escape(f"hub id acme/not-downloaded in {cache}")):
        _resolve(tmp_path, demo, tmp_path / "lost")


# ----------------------------------------------------------------------------- chains


def test_an_adapter_on_an_adapter_chains_down_to_the_full_checkpoint(demo: dict, tmp_path: Path) -> None:
    models = _models(demo)
    stacked = _copy_adapter(models / "r4-joint", tmp_path / "stacked", str(models / "r1-llm-only"))
    chain = _resolve(tmp_path, demo, stacked)
    assert _names(chain) == ["base", "r1-llm-only", "stacked"]
    assert [link.kind for link in chain] == ["full", "adapter", "adapter"]
    assert chain[1].recorded_base == str(models / "base")
    assert chain[2].recorded_base == str(models / "r1-llm-only")
    assert len({link.fingerprint for link in chain}) == 3


def test_a_cycle_is_an_error_naming_the_loop(demo: dict, tmp_path: Path) -> None:
    first = _copy_adapter(_models(demo) / "r1-llm-only", tmp_path / "a", "../b")
    second = _copy_adapter(_models(demo) / "r1-llm-only", tmp_path / "b", "../a")
    with pytest.raises(LineageError, match="the adapter chain loops") as err:
        _resolve(tmp_path, demo, first)
    assert f"{first.resolve()} -> {second.resolve()} -> {first.resolve()}" in str(err.value)


def test_a_chain_deeper_than_max_depth_is_refused(demo: dict, tmp_path: Path) -> None:
    models = _models(demo)
    stacked = _copy_adapter(models / "r4-joint", tmp_path / "stacked", str(models / "r1-llm-only"))
    with pytest.raises(LineageError, match=r"chain deeper than 2 links \(raise \[lineage\] max_depth"):
        _resolve(tmp_path, demo, stacked, lineage="max_depth = 2")
    assert len(_resolve(tmp_path, demo, stacked, lineage="max_depth = 3")) == 3


# ----------------------------------------------------------------------------- pre-launch checks


def test_the_demo_adapters_pass_the_checks_despite_renamed_checkpoint_keys(demo: dict, tmp_path: Path) -> None:
    """transformers 5 renames Qwen2-VL's checkpoint keys on load (model.layers.* -> model.language_model.layers.*):
    the check matches modules from the numbered block on, so the real adapters pass."""
    models = _models(demo)
    base_modules = checkpoint_modules(models / "base")
    adapted = adapted_modules(models / "r4-joint")
    assert "model.layers.0.self_attn.q_proj" in base_modules  # the checkpoint's (older) naming
    assert "model.language_model.layers.0.self_attn.q_proj" in adapted  # the loaded model's naming
    assert "model.visual.blocks.1.attn.qkv" in adapted and "visual.blocks.1.attn.qkv" in base_modules
    assert module_key("model.language_model.layers.0.self_attn.q_proj") == "layers.0.self_attn.q_proj"
    assert module_key("lm_head") == "lm_head"
    for name in ("r1-llm-only", "r3-stage2", "r4-joint"):
        assert _resolve(tmp_path, demo, models / name, remap={TRAINING_PREFIX: str(models)})[-1].kind == "adapter"


@pytest.mark.parametrize(("old", "new", "count", "missing"), [
    ("layers.1.", "layers.7.", 7, "model.language_model.layers.7.mlp.down_proj"),  # a bigger model's layer
    ("self_attn.q_proj", "self_attn.qkv_proj", 2, "model.language_model.layers.0.self_attn.qkv_proj"),  # other family
])
def test_an_adapter_for_modules_the_base_lacks_is_refused(demo: dict, tmp_path: Path, old: str, new: str,
                                                         count: int, missing: str) -> None:
    models = _models(demo)
    adapter = _copy_adapter(models / "r1-llm-only", tmp_path / "other", str(models / "base"))
    weights = adapter / "adapter_model.safetensors"
    save_file({name.replace(old, new): tensor for name, tensor in load_file(weights).items()}, weights)
    with pytest.raises(LineageError) as err:
        _resolve(tmp_path, demo, adapter)
    message = str(err.value)
    root = (models / "base").resolve()
    assert f"changes {count} module(s) that its root checkpoint {root} does not have" in message
    assert missing in message and "check its base_model_name_or_path" in message


def test_an_adapter_for_another_architecture_is_refused(demo: dict, tmp_path: Path) -> None:
    models = _models(demo)
    llama_config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    by_config = _copy_adapter(models / "r1-llm-only", tmp_path / "by-config", str(models / "base"))
    (by_config / "config.json").write_text(json.dumps(llama_config))
    with pytest.raises(LineageError, match=r"trained on a model with model_type llama .* has qwen2_vl") as err:
        _resolve(tmp_path, demo, by_config)
    assert "point it at the checkpoint it was trained on" in str(err.value)

    llama_mapping = {"base_model_class": "LlamaForCausalLM", "parent_library": "transformers.models.llama"}
    by_peft = _copy_adapter(models / "r1-llm-only", tmp_path / "by-peft", str(models / "base"),
                            auto_mapping=llama_mapping)
    with pytest.raises(LineageError, match=r"architecture LlamaForCausalLM .* has Qwen2VLForConditionalGeneration"):
        _resolve(tmp_path, demo, by_peft)

    qwen_mapping = {"base_model_class": "Qwen2VLForConditionalGeneration", "parent_library": "transformers"}
    lower = _copy_adapter(models / "r1-llm-only", tmp_path / "lower", str(models / "base"), auto_mapping=qwen_mapping)
    assert len(_resolve(tmp_path, demo, lower)) == 2  # a matching record passes
    upper = _copy_adapter(models / "r4-joint", tmp_path / "upper", str(lower), auto_mapping=llama_mapping)
    with pytest.raises(LineageError) as stacked:  # compared with the adapter beneath it, which records its class
        _resolve(tmp_path, demo, upper)
    assert f"beneath it has Qwen2VLForConditionalGeneration ({lower.resolve() / 'adapter_config.json'})" in str(
        stacked.value)


def test_pickle_weights_are_refused_unless_the_recipe_allows_them(demo: dict, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(_models(demo) / "base" / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled by the parent")
    with pytest.raises(LineageError, match=r"pickle files \(pytorch_model.bin\), which can run code") as err:
        _resolve(tmp_path, demo, pickled)
    assert "set `allow_pickle = true`" in str(err.value)
    chain = _resolve(tmp_path, demo, pickled, allow_pickle=True)
    assert chain[0].kind == "full" and chain[0].bytes == len(b"never unpickled by the parent")
    # an adapter on it: its module names cannot be read without unpickling, so loading is the check
    adapter = _copy_adapter(_models(demo) / "r1-llm-only", tmp_path / "on-pickled", str(pickled))
    assert _names(_resolve(tmp_path, demo, adapter, allow_pickle=True)) == ["pickled", "on-pickled"]


def test_an_explicit_base_must_agree_with_the_record_unless_overridden(demo: dict, tmp_path: Path) -> None:
    models = _models(demo)
    with pytest.raises(LineageError, match="disagrees with the adapter's recorded base") as err:
        _resolve(tmp_path, demo, models / "r1-llm-only", base=str(models / "r2-vision-only"))
    assert "set `base_override = true` to do it on purpose" in str(err.value)
    agreeing = _resolve(tmp_path, demo, models / "r1-llm-only", base=str(models / "base"))
    assert agreeing[0].source == "local"

    body = _recipe("r1-on-r2", models / "r1-llm-only", base=str(models / "r2-vision-only"), base_override=True)
    recipe_file = _recipe_file(tmp_path, demo, body)
    plan = make_plans(recipe_file, recipe_file.recipes)[0]
    assert plan.runnable, plan.problem
    assert _names(plan.chain) == ["r2-vision-only", "r1-llm-only"]
    assert plan.chain[0].source == "recipe-base"
    assert plan.chain[1].recorded_base == str(models / "base")  # both are recorded
    assert plan.overridden_base


# ----------------------------------------------------------------------------- the plan command


def test_plan_prints_each_chain_top_down_and_fails_on_any_problem(demo: dict, tmp_path: Path) -> None:
    models = _models(demo)
    body = (_recipe("r3-two-stage", models / "r3-stage2")
            + _recipe("on-purpose", models / "r1-llm-only", base=str(models / "r2-vision-only"), base_override=True)
            + _recipe("by-mistake", models / "r1-llm-only", base=str(models / "r2-vision-only")))
    _recipe_file(tmp_path, demo, body, remap={TRAINING_PREFIX: str(models)})
    result = run_cli("plan", str(tmp_path / "recipes.toml"), "--hash-weights")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 recipe(s) cannot run" in result.stderr
    out = re.sub(r"[\s│└├─]+", " ", result.stdout)  # undo the tree's guides and line wrapping
    stage2 = out.index(f"adapter {(models / 'r3-stage2').resolve()} sha256:")
    stage1 = out.index(f"full {(models / 'r3-stage1').resolve()} sha256:")
    assert stage2 < stage1 < out.index("on-purpose")  # stage 2 -> stage 1, the root last
    assert f"found: recorded {TRAINING_PREFIX}/r3-stage1, remap {TRAINING_PREFIX} -> {models}" in out
    for folder in ("r3-stage2", "r3-stage1"):  # the bytes each link adds, in the one unit rule
        weights = sum(f.stat().st_size for f in (models / folder).glob("*model*.safetensors"))
        assert format_bytes(weights) in out
    assert "(base overridden by the recipe)" in out
    assert "by-mistake lineage: recipe 'by-mistake': `base` =" in out
