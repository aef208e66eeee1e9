"""What the training frameworks write, evaluated as it was trained: each framework's folder (tools/make_frameworks.py
builds them with the real libraries, as each framework's code lays them out) resolved, planned and run end to end
on the CPU through `python -m orchestrator`.

Verified in the frameworks' code (LLaMA-Factory ff6d4d1, ms-swift 3602360, TRL f2cd577, Unsloth 015bdef, axolotl
067b021, modelscope 2905da1, transformers 5.25, peft 0.21):
- LLaMA-Factory saves the processor into every checkpoint-N/ and into output_dir/ with the final adapter
  (train/callbacks.py SaveProcessorCallback); added tokens force resize_vocab (model/patcher.py), which resizes to
  len(tokenizer) padded to 64 (model/model_utils/embedding.py) and adds embed_tokens and lm_head to
  modules_to_save (model/adapter.py); `use_dora` goes into LoraConfig. Its image_max_pixels is an attribute of the
  processor object (patch_processor) that save_pretrained does not write (ProcessorMixin.to_dict keeps __init__'s
  arguments only): its saved processor resizes as the base's.
- ms-swift copies args.json into each checkpoint and saves no tokenizer or processor beside an adapter
  (swift/trainers/mixin.py _save); `swift infer --adapters` reads args.json's `model` and `new_special_tokens`
  (swift/arguments/base_args/base_args.py load_args_from_ckpt) and adds those tokens (swift/model/register.py
  _add_new_special_tokens, resizing to a multiple of 128 where the tokenizer outgrew the embeddings); its LoRA
  target is a regex over the language model and the vision tower (swift/utils/transformers_utils.py); the base
  peft records is modelscope's download folder, <MODELSCOPE_CACHE or ~/.cache/modelscope/hub>/models/<org>/<name
  with dots as ___> (modelscope/hub/file_download.py create_temporary_directory_and_cache).
- TRL's trainers (Unsloth's too) save the processing class into every checkpoint-N/ with trainer_state.json
  (transformers' Trainer._save); the processor is the script's, as built.
- peft saves modules_to_save as `...embed_tokens.weight` / `...lm_head.weight`, and a LoRA'd embedding as
  `...embed_tokens.base_layer.weight` beside `lora_embedding_A` (r x rows); DoRA adds `lora_magnitude_vector`.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import pytest
from helpers import only_run_dir, run_cli
from safetensors import safe_open

from contract.processor import processor_source
from contract.recipe import Recipe
from contract.spec import ChainLink
from orchestrator.gpu.memory import read_workload
from orchestrator.planning.caches import cached_name
from orchestrator.planning.lineage import LineageError, resolve_chain
from orchestrator.planning.plan import make_plans
from orchestrator.planning.recipes import load_recipe_file
from tools import make_frameworks as frameworks
from worker.loading.processor import load_processor

REVISION = "0123456789abcdef0123456789abcdef01234567"
HUB_ID = "acme/tiny-qwen2-vl"  # the base, as a Hugging Face hub id
MODELSCOPE_ID = "acme/Tiny-VL-2.5"  # the base, as a ModelScope id (a dot: written "___" in its cache)
TRL_MAX_PIXELS = 28 * 28 * 8  # below every demo image's area: the TRL processor resizes each one down
# Below the demo images' 112 x 112 = 12544 pixels: each bound shrinks every image before the processor
WEB_UI_PIXELS = (1024, 9000)  # LLaMA-Factory's (image_min_pixels, image_max_pixels), as its web UI records them
SWIFT_RESCALE = 8000  # ms-swift's --max_pixels (args.json)
SWIFT_MAX_PIXELS = 5000  # ms-swift's model_kwargs MAX_PIXELS (qwen_vl_utils' bound)
RECIPE_MAX_PIXELS = 4704  # a recipe's image_max_pixels


def _caches(root: Path, base: Path) -> dict[str, str]:
    """This machine's caches holding the base: the Hugging Face hub cache and the ModelScope cache, as their
    clients lay them out; the environment that points the CLI at them (and never at the network)."""
    repo = root / "hf" / f"models--{HUB_ID.replace('/', '--')}"
    shutil.copytree(base, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    org, name = MODELSCOPE_ID.split("/")
    shutil.copytree(base, root / "ms" / "models" / org / name.replace(".", "___"))
    return {"HF_HUB_CACHE": str(root / "hf"), "MODELSCOPE_CACHE": str(root / "ms"), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def built(demo: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every framework's folder on the demo's base, the caches, and a recipe file naming each."""
    root = tmp_path_factory.mktemp("frameworks")
    base = demo["models"]["base"]
    org, name = MODELSCOPE_ID.split("/")
    folders = {
        "llamafactory": frameworks.llamafactory_run(base, root / "llamafactory"),
        "llamafactory-step2": root / "llamafactory" / "checkpoint-2",
        # the base as modelscope put it on the training machine, which is not this one
        "swift-cache": frameworks.swift_checkpoint(
            base, root / "swift-cache", model_arg=MODELSCOPE_ID,
            recorded_base=f"/root/.cache/modelscope/hub/models/{org}/{name.replace('.', '___')}"),
        # no base in adapter_config.json: args.json's `model` (a hub id) names it; two tokens added, kept
        "swift-args": frameworks.swift_checkpoint(base, root / "swift-args", recorded_base=None, model_arg=HUB_ID,
                                                  new_tokens=["<ref>", "</ref>"]),
        "trl": frameworks.trl_checkpoint(
            base, root / "trl", max_pixels=TRL_MAX_PIXELS,
            recorded_base=f"/home/trainer/.cache/huggingface/hub/models--acme--tiny-qwen2-vl/snapshots/{REVISION}"),
        "shrunk": frameworks.shrunk_vocabulary_adapter(base, root / "shrunk"),
        "grown-bare": frameworks.grown_tokenizer_without_embeddings(base, root / "grown-bare"),
        "swift-bare": frameworks.swift_checkpoint(base, root / "swift-bare", recorded_base=str(base), model_arg=HUB_ID,
                                                  new_tokens=["<ref>"], embeddings=False),
        # the training resolution outside the processor: LLaMA-Factory's web UI, ms-swift's args.json, a recipe's
        "llamafactory-webui": frameworks.llamafactory_run(base, root / "lf-webui", steps=(2,),
                                                          web_ui_pixels=WEB_UI_PIXELS),
        "swift-rescale": frameworks.swift_checkpoint(base, root / "swift-rescale", recorded_base=str(base),
                                                     model_arg=HUB_ID, max_pixels=SWIFT_RESCALE),
        "swift-kwargs": frameworks.swift_checkpoint(base, root / "swift-kwargs", recorded_base=str(base),
                                                    model_arg=HUB_ID, model_kwargs={"max_pixels": SWIFT_MAX_PIXELS}),
        "bounded": frameworks.trl_checkpoint(base, root / "bounded", recorded_base=str(base), max_pixels=25088),
    }
    env = _caches(root, base)
    extra = {"bounded": f"image_max_pixels = {RECIPE_MAX_PIXELS}\n"}
    body = "".join(f'[[recipe]]\nname = "{recipe}"\nmodel = "{folder}"\n{extra.get(recipe, "")}'
                   for recipe, folder in folders.items())
    recipes = root / "recipes.toml"
    recipes.write_text(f'[defaults]\ndataset = "{demo["dataset"]}"\nmax_new_tokens = 8\nbatch_size = 4\n{body}')
    return {"root": root, "base": base, "folders": folders, "env": env, "recipes": recipes}


@pytest.fixture(scope="module")
def planned(built: dict) -> str:
    result = run_cli("plan", str(built["recipes"]), "--device", "cpu", env=built["env"])
    assert result.returncode == 1, result.stdout + result.stderr  # the two adapters that lost their embeddings
    return re.sub(r"[\s│└├─]+", " ", result.stdout)  # undo the tree's guides and line wrapping


@pytest.fixture(scope="module")
def ran(built: dict) -> dict:
    out = built["root"] / "runs"
    result = run_cli("run", str(built["recipes"]), "--out", str(out), "--device", "cpu", env=built["env"])
    assert result.returncode == 1, result.stdout + result.stderr
    run_dir = only_run_dir(out)
    summaries = {name: json.loads((run_dir / name / "summary.json").read_text()) for name in built["folders"]}
    return {"run_dir": run_dir, "rows": summaries, "result": result}


def _samples(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / name / "samples.jsonl").read_text().splitlines()]


def _rows_of(folder: Path, module: str) -> int:
    """The rows of the first tensor of `module` in an adapter's safetensors file, read with safetensors itself."""
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        names = f.keys()  # a safe_open handle is not iterable
        name = next(k for k in names if k.endswith(f"{module}.weight"))
        return f.get_slice(name).get_shape()[0]


# ----------------------------------------------------------------------------- end to end


def test_every_framework_layout_runs_end_to_end_on_the_cpu(demo: dict, built: dict, ran: dict) -> None:
    rows = ran["rows"]
    samples = len(Path(demo["dataset"]).read_text().splitlines())
    runnable = [n for n in built["folders"] if not n.endswith("-bare")]
    assert {n: rows[n]["status"] for n in runnable} == dict.fromkeys(runnable, "ok"), ran["result"].stdout
    for name in runnable:
        assert len(_samples(ran["run_dir"], name)) == samples
        assert rows[name]["lineage"][-1]["path"] == str(Path(built["folders"][name]).resolve())


def test_plan_says_where_each_base_and_processor_came_from_and_the_resolution(built: dict, planned: str) -> None:
    root = built["root"]
    org, name = MODELSCOPE_ID.split("/")
    swift_base = (root / "ms" / "models" / org / name.replace(".", "___")).resolve()
    assert (f"full {swift_base} " in planned and f"a ModelScope cache folder of {MODELSCOPE_ID} on the training "
            f"machine), from the local ModelScope cache {root / 'ms'}" in planned)
    assert f"found: ms-swift's args.json model hub id {HUB_ID}, from the local Hugging Face cache {root / 'hf'}" \
        in planned
    assert f"a Hugging Face cache folder of {HUB_ID} on the training machine), from the local Hugging Face cache" \
        in planned
    lf = built["folders"]["llamafactory"].resolve()
    assert f"processor: the adapter's own, {lf}: resizes images to 3136-25088 pixels" in planned
    assert f"processor: the base's, {swift_base}: resizes images to 3136-25088 pixels" in planned
    assert "adds the trainer's 2 new special token(s) (<ref>, </ref>)" in planned
    assert (f"resolution: the processor saved with the adapter resizes images to 3136-{TRL_MAX_PIXELS} pixels, its "
            "base's to 3136-25088 pixels: evaluated at the adapter's (the resolution it was trained at)") in planned


def test_the_worker_evaluates_at_the_resolution_the_adapter_saved(built: dict, ran: dict) -> None:
    """TRL's checkpoint saved a processor of smaller max_pixels than its base's: every image the model saw was
    resized within it, where the base's processor (LLaMA-Factory saved the base's settings) keeps them whole."""
    trl = _samples(ran["run_dir"], "trl")
    assert all(s["input_size"][0] * s["input_size"][1] <= TRL_MAX_PIXELS for s in trl)
    assert all(s["image_size"][0] * s["image_size"][1] > TRL_MAX_PIXELS for s in trl)
    assert all(s["input_size"] == s["image_size"] for s in _samples(ran["run_dir"], "llamafactory"))
    record = ran["rows"]["trl"]["as_trained"]
    assert record["processor"]["path"] == str(built["folders"]["trl"].resolve())
    assert record["processor"]["resolution"] == {"min_pixels": 3136, "max_pixels": TRL_MAX_PIXELS}
    assert record["processor"]["root_resolution"] == {"min_pixels": 3136, "max_pixels": 25088}
    report = (ran["run_dir"] / "report.md").read_text()
    assert f"- trl: {record['resolution_note']}" in report
    assert html.escape(record["resolution_note"]) in (ran["run_dir"] / "report.html").read_text()
    assert ran["rows"]["swift-cache"]["as_trained"]["resolution_note"] is None


def test_embeddings_are_resized_to_the_adapters_rows_before_it_loads(built: dict, ran: dict) -> None:
    """LLaMA-Factory's 20 new tokens outgrew the base's padded vocabulary: its embeddings were resized to a multiple
    of 64; a script's resize_token_embeddings(len(tokenizer)) shrank them. The worker resizes the base to the rows
    the adapter saved (read here with safetensors), and the row and the worker's `loaded` record it."""
    base_rows = json.loads((built["base"] / "config.json").read_text())["text_config"]["vocab_size"]
    for name in ("llamafactory", "llamafactory-step2", "shrunk"):
        folder = Path(built["folders"][name]).resolve()
        rows = _rows_of(folder, "embed_tokens")
        assert rows == _rows_of(folder, "lm_head") != base_rows
        row = ran["rows"][name]
        assert row["as_trained"]["embeddings_resized"] == [{"adapter": str(folder), "rows": rows}]
        assert row["loaded"]["embeddings_resized"] == [{"adapter": str(folder), "from_rows": base_rows,
                                                        "to_rows": rows}]
        assert f"- {name}: embeddings resized to {rows} rows before the adapter {folder}" in \
            (ran["run_dir"] / "report.md").read_text()
    assert _rows_of(Path(built["folders"]["llamafactory"]), "embed_tokens") > base_rows
    assert _rows_of(Path(built["folders"]["shrunk"]), "embed_tokens") < base_rows


def test_an_adapter_that_grew_the_tokenizer_without_its_embeddings_is_a_lineage_error(ran: dict) -> None:
    rows = ran["rows"]
    assert rows["grown-bare"]["status"] == "error"
    assert "its tokenizer has 2 token(s) the one beneath lacks (</obj>, <obj>), but the adapter carries no " \
           "embeddings" in rows["grown-bare"]["detail"]
    assert rows["swift-bare"]["status"] == "error"
    assert "ms-swift's args.json lists 1 new_special_tokens (<ref>)" in rows["swift-bare"]["detail"]
    assert "may be damaged" not in rows["grown-bare"]["detail"] + rows["swift-bare"]["detail"]


# ----------------------------------------------------------------------------- in process


def _plans(built: dict, monkeypatch: pytest.MonkeyPatch, *names: str):
    for key, value in built["env"].items():
        monkeypatch.setenv(key, value)
    recipe_file = load_recipe_file(built["recipes"])
    return {p.recipe.name: p for p in make_plans(recipe_file, recipe_file.select(list(names)))}


def test_ms_swifts_new_tokens_are_added_to_the_tokenizer_the_worker_loads(built: dict,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _plans(built, monkeypatch, "swift-args")["swift-args"]
    assert plan.chain is not None and plan.chain[1].base_from_args == HUB_ID
    assert plan.chain[1].recorded_base is None
    processor = load_processor(plan.chain, plan.recipe)
    base = load_processor(plan.chain[:1], plan.recipe)
    assert len(processor.tokenizer) == len(base.tokenizer) + 2
    assert processor.tokenizer.convert_tokens_to_ids("<ref>") == len(base.tokenizer)


def test_a_base_named_nowhere_here_lists_both_records_and_where_it_looked(demo: dict, built: dict, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "empty-ms"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf"))
    recorded = "/root/.cache/modelscope/hub/models/acme/Other-VL-7B"
    checkpoint = frameworks.swift_checkpoint(built["base"], tmp_path, recorded_base=recorded, model_arg="acme/Other")
    recipes = tmp_path / "recipes.toml"
    recipes.write_text(f'[[recipe]]\nname = "r"\nmodel = "{checkpoint}"\ndataset = "{demo["dataset"]}"\n')
    recipe_file = load_recipe_file(recipes)
    with pytest.raises(LineageError) as caught:
        resolve_chain(recipe_file.recipes[0], recipe_file.lineage)
    message = str(caught.value)
    assert f"trained on '{recorded}' and 'acme/Other' (ms-swift's args.json), which was not found" in message
    assert f"{tmp_path / 'empty-ms' / 'models' / 'acme' / 'Other-VL-7B'}" in message
    assert f"hub id acme/Other in {tmp_path / 'empty-hf'}  (args.json's model)" in message


@pytest.mark.parametrize(("recorded", "expected"), [
    ("/root/.cache/modelscope/hub/models/Qwen/Qwen2___5-VL-7B-Instruct", ("Qwen/Qwen2.5-VL-7B-Instruct", None)),
    ("/root/.cache/modelscope/hub/Qwen/Qwen2-VL-2B", ("Qwen/Qwen2-VL-2B", None)),  # before modelscope's models/
    (f"/h/.cache/huggingface/hub/models--Qwen--Qwen2.5-VL-3B/snapshots/{REVISION}", ("Qwen/Qwen2.5-VL-3B", REVISION)),
    ("/data/models/Qwen2.5-VL-7B-Instruct", None),
])
def test_a_training_machines_cache_folder_names_its_hub_id(recorded: str, expected: tuple | None) -> None:
    name = cached_name(recorded)
    assert (name and (name.repo_id, name.revision)) == expected


def test_dora_and_regex_targets_are_counted_by_the_memory_estimate(built: dict,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """LLaMA-Factory's adapter is DoRA: at its widest layer peft holds that layer's weight and LoRA product in
    float32, at least four times the layer's float32 size (from the base's own header). ms-swift's regex covers the
    vision tower: its LoRA temporaries are counted there. Merged (merge_adapters), DoRA leaves none."""
    plans = _plans(built, monkeypatch, "llamafactory", "swift-cache", "trl")
    dora = read_workload(plans["llamafactory"].recipe, plans["llamafactory"].chain, "cuda")
    with safe_open(str(built["base"] / "model.safetensors"), "pt") as f:
        names = f.keys()  # the language model's linear layers (a safe_open handle is not iterable)
        widest = max(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in names
                     if ".layers." in k and k.endswith("proj.weight"))
    assert dora.dora_bytes >= 4 * widest * 4
    estimate, plain = dora.estimate(4), read_workload(plans["trl"].recipe, plans["trl"].chain, "cuda").estimate(4)
    assert estimate.dora_bytes == dora.dora_bytes and plain.dora_bytes == 0
    assert estimate.activation_bytes >= max(estimate.vision_bytes, estimate.prefill_bytes) + dora.dora_bytes
    merged = plans["llamafactory"].recipe.model_copy(update={"merge_adapters": True})
    assert read_workload(merged, plans["llamafactory"].chain, "cuda").dora_bytes == 0
    swift = read_workload(plans["swift-cache"].recipe, plans["swift-cache"].chain, "cuda")
    assert swift.lora_widths[1] > 0 and swift.lora_widths[0] > 0  # the vision tower's and the language model's


def test_the_processor_comes_from_the_nearest_link_that_saved_one(built: dict) -> None:
    base, lf = built["base"], built["folders"]["llamafactory"]
    swift = built["folders"]["swift-cache"]
    assert processor_source([str(base), str(swift)]).path == str(base)  # ms-swift saved none
    assert processor_source([str(base), str(lf)]).path == str(lf)
    stacked = processor_source([str(base), str(lf), str(swift)])  # an ms-swift adapter above LLaMA-Factory's
    assert (stacked.path, stacked.which) == (str(lf), f"the adapter {lf.name}'s (link 2 of 3)")
    link = ChainLink(str(base), "full", "quick:0", 1)
    assert load_processor([link], Recipe(name="r", model=str(base))).image_processor.size["longest_edge"] == 25088


def test_saved_whole_modules_take_the_dtype_of_the_model_they_join(built: dict,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """peft assigns modules_to_save as the adapter file stores them (float32); under a bfloat16 model, as on a GPU,
    the float32 lm_head met bfloat16 hidden states: "mat1 and mat2 must have the same dtype". Applied by the
    worker's own apply_adapters, the saved embed_tokens and lm_head are bfloat16 and a forward pass runs."""
    import torch
    from peft.utils import ModulesToSaveWrapper
    from transformers import Qwen2VLForConditionalGeneration

    from worker.loading.load import apply_adapters

    plan = _plans(built, monkeypatch, "shrunk")["shrunk"]
    assert plan.chain is not None
    model = Qwen2VLForConditionalGeneration.from_pretrained(built["base"], dtype=torch.bfloat16)
    model, resized = apply_adapters(model, plan.chain[1:])
    assert resized and resized[0]["to_rows"] < resized[0]["from_rows"]
    wrappers = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    assert len(wrappers) == 2
    assert {p.dtype for w in wrappers for p in w.modules_to_save.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.dtype == torch.bfloat16 and logits.shape[-1] == resized[0]["to_rows"]


# ----------------------------------------------------------------------------- the trainer's resize


def _expected_input(name: str, width: int, height: int) -> tuple[int, int]:
    """The size the model saw, as each trainer resized the image (its formula, transcribed from its code into this
    test) and then the base's processor (transformers' own smart_resize: 28-pixel steps within 3136-25088)."""
    import math

    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    if name == "llamafactory-webui" and width * height > WEB_UI_PIXELS[1]:  # MMPluginMixin._preprocess_image
        factor = math.sqrt(WEB_UI_PIXELS[1] / (width * height))
        width, height = int(width * factor), int(height * factor)
    elif name == "swift-rescale" and width * height > SWIFT_RESCALE:  # vision_utils.rescale_image
        rows = math.sqrt(SWIFT_RESCALE / (width / height))
        width, height = int(rows * width / height), int(rows)
    elif name in ("swift-kwargs", "bounded"):  # qwen_vl_utils.fetch_image's smart_resize
        bound = SWIFT_MAX_PIXELS // 784 * 784 if name == "swift-kwargs" else RECIPE_MAX_PIXELS
        height, width = smart_resize(height, width, 28, 3136 if name == "bounded" else 4 * 784, bound)
    height, width = smart_resize(height, width, 28, 3136, 25088)
    return width, height


@pytest.mark.parametrize("name", ["llamafactory-webui", "swift-rescale", "swift-kwargs", "bounded", "llamafactory"])
def test_images_are_resized_as_the_trainer_resized_them_before_its_processor(ran: dict, name: str) -> None:
    samples = _samples(ran["run_dir"], name)
    assert samples and ran["rows"][name]["status"] == "ok", ran["rows"][name]["detail"]
    for sample in samples:
        assert tuple(sample["input_size"]) == _expected_input(name, *sample["image_size"]), (name, sample)
    # the base's processor alone gives other sizes, but under LLaMA-Factory's defaults (768 x 768, above the
    # demo's images)
    alone = [tuple(s["input_size"]) == _expected_input("base", *s["image_size"]) for s in samples]
    assert all(alone) if name == "llamafactory" else not all(alone), name


def test_plan_and_report_say_where_the_training_resolution_came_from(built: dict, planned: str, ran: dict) -> None:
    webui = (Path(built["folders"]["llamafactory-webui"]) / "training_args.yaml").resolve()
    assert (f"LLaMA-Factory resized training images to at most {WEB_UI_PIXELS[1]} and at least {WEB_UI_PIXELS[0]} "
            f"pixels before its processor ({webui}): evaluated the same way") in planned
    default = (Path(built["folders"]["llamafactory"]) / "trainer_log.jsonl").resolve()
    assert ("LLaMA-Factory resized training images to at most 589824 and at least 1024 pixels before its processor "
            f"(LLaMA-Factory's defaults: {default} marks its run, which recorded no image_max_pixels (set it in the "
            "recipe if the run did))") in planned
    assert f"ms-swift resized training images to at most {SWIFT_RESCALE} pixels" in planned
    assert f"ms-swift resized training images to at most {SWIFT_MAX_PIXELS // 784 * 784} pixels" in planned
    assert (f"the recipe resized training images to at most {RECIPE_MAX_PIXELS} pixels before its processor (the "
            "recipe's image_max_pixels)") in planned
    record = ran["rows"]["swift-rescale"]["as_trained"]
    assert record["processor"]["trainer_resize"]["rule"] == "swift"
    assert record["processor"]["trainer_resize"]["max_pixels"] == SWIFT_RESCALE
    assert f"- swift-rescale: {record['resolution_note']}" in (ran["run_dir"] / "report.md").read_text()


@pytest.mark.parametrize(("rule", "bounds", "expected"), [
    ("llamafactory", (1024, 589824), (858, 686)),  # sqrt(589824 / 800000) = 0.8587: 858.66 x 686.93, truncated
    ("swift", (None, 589824), (858, 686)),  # rows int(sqrt(589824 / 1.25)) = 686, columns int(686.93 x 1.25)
    ("qwen", (None, 589824), (840, 672)),  # floor to 28-pixel steps within the bound
])
def test_each_trainers_rule_on_an_image_larger_than_its_bound(rule: str, bounds: tuple, expected: tuple) -> None:
    from PIL import Image

    from contract.trainer_resize import TrainerResize

    resize = TrainerResize(trainer="t", rule=rule, source="s", min_pixels=bounds[0], max_pixels=bounds[1], factor=28)
    assert resize.apply(Image.new("RGB", (1000, 800))).size == expected
    # below the minimum: LLaMA-Factory enlarges by sqrt(1024 / 200) to 45 x 22, then 28 a side for Qwen; ms-swift
    # leaves it; qwen_vl_utils' ceil to 28-pixel steps above its 3136
    small = Image.new("RGB", (20, 10))
    assert resize.apply(small).size == {"llamafactory": (45, 28), "swift": (20, 10), "qwen": (84, 56)}[rule]


def test_a_recipes_bound_needs_a_processor_that_resizes_within_pixels(tmp_path: Path) -> None:
    from contract.trainer_resize import trainer_resize

    with pytest.raises(Exception, match="resizes to a fixed size"):
        trainer_resize(tmp_path, None, (None, 4096))
    assert trainer_resize(tmp_path, None, (None, None)) is None
