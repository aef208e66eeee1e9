"""What the training frameworks write, evaluated on the GPU as it was trained (flash_attention_2, bfloat16): each
framework's folder (tools/make_frameworks.py, the same builders as tests/test_frameworks.py, on the trained demo
family's base, built on the CPU in a child process) and a sweep of a training run's checkpoints, in one run of
`python -m orchestrator run --device cuda`.

- LLaMA-Factory's output folder, swept (`checkpoints = "all"`): DoRA, 20 added tokens, its embeddings resized;
- ms-swift's checkpoint naming its base by a ModelScope cache folder of the training machine, its regex over the
  vision tower; and one naming it only in args.json (a hub id), with new special tokens;
- TRL's checkpoint whose saved processor resizes below the base's;
- a script's resize_token_embeddings that shrank the padded vocabulary;
- a sweep of the demo's trained LoRA (3 checkpoints and the final adapter), whose checkpoint at the trained step
  holds the trained adapter's weights: it must answer as that adapter does.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from gpu_helpers import LOADED_AS, build_offline, run_on_gpu, wait_for_release
from helpers import ROOT

pytestmark = pytest.mark.gpu
FAMILY = ROOT / "examples" / "demo-family"
REVISION = "0123456789abcdef0123456789abcdef01234567"
HUB_ID = "acme/tiny-qwen2-vl"
MODELSCOPE = ("acme", "Tiny-VL-2.5")
TRL_MAX_PIXELS = 28 * 28 * 8  # below every demo image's area
LIMIT = 32
SWEPT = ["sweep@100", "sweep@200", "sweep@300", "sweep@final"]
LF_SWEPT = ["llamafactory@2", "llamafactory@4", "llamafactory@final"]


def _caches(root: Path, base: Path) -> dict[str, str]:
    """This machine's Hugging Face and ModelScope caches holding the base, as their clients lay them out."""
    repo = root / "hf" / f"models--{HUB_ID.replace('/', '--')}"
    shutil.copytree(base, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    org, name = MODELSCOPE
    shutil.copytree(base, root / "ms" / "models" / org / name.replace(".", "___"))
    return {"HF_HUB_CACHE": str(root / "hf"), "MODELSCOPE_CACHE": str(root / "ms"), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def layouts(gpu, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("frameworks")
    base = FAMILY / "base"
    org, name = MODELSCOPE
    swift_cache = f"/root/.cache/modelscope/hub/models/{org}/{name.replace('.', '___')}"
    hf_cache = f"/home/trainer/.cache/huggingface/hub/models--acme--tiny-qwen2-vl/snapshots/{REVISION}"
    calls = {
        "llamafactory": ("llamafactory_run", {"out": root / "llamafactory"}),
        "swift-cache": ("swift_checkpoint", {"out": root / "swift-cache", "model_arg": f"{org}/{name}",
                                             "recorded_base": swift_cache}),
        "swift-args": ("swift_checkpoint", {"out": root / "swift-args", "recorded_base": None, "model_arg": HUB_ID,
                                            "new_tokens": ["<ref>", "</ref>"]}),
        "trl": ("trl_checkpoint", {"out": root / "trl", "max_pixels": TRL_MAX_PIXELS, "recorded_base": hf_cache}),
        "shrunk": ("shrunk_vocabulary_adapter", {"out": root / "shrunk"}),
        "sweep": ("checkpoint_sweep", {"out": root / "sweep", "trained": FAMILY / "r1-llm-only"}),
    }
    built = build_offline(*((builder, {"base": base, **kwargs}) for builder, kwargs in calls.values()))
    folders = {**dict(zip(calls, built, strict=True)), "trained": FAMILY / "r1-llm-only"}
    swept = ("llamafactory", "sweep")
    body = "".join(f'[[recipe]]\nname = "{recipe}"\nmodel = "{folder}"\n'
                   + ('checkpoints = "all"\n' if recipe in swept else "") for recipe, folder in folders.items())
    recipes = root / "recipes.toml"
    recipes.write_text(
        f'[defaults]\ndataset = "{FAMILY / "data" / "heldout.jsonl"}"\n'
        'prompt = "{prompt} Answer with its bounding box."\nbox_format = "qwen2vl"\nmax_new_tokens = 32\n'
        f'batch_size = 8\nlimit = {LIMIT}\n[lineage]\nremap = {{ "/ssd1/team/vlm_outputs" = "{FAMILY}" }}\n{body}')
    run = run_on_gpu(recipes, root / "runs", env=_caches(root, base))
    run["released"] = wait_for_release(gpu)
    run["root"] = root
    return run


def test_every_layout_is_evaluated_on_the_gpu_as_trained(layouts: dict) -> None:
    result, summaries = layouts["result"], layouts["summaries"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    expected = {*SWEPT, *LF_SWEPT, "swift-cache", "swift-args", "trl", "shrunk", "trained"}
    assert set(summaries) == expected, sorted(summaries)
    for name, summary in summaries.items():
        assert summary["status"] == "ok", (name, summary["detail"])
        loaded = summary["loaded"]
        assert (loaded["attn"], loaded["dtype"], loaded["device"]) == LOADED_AS, (name, loaded)
        assert loaded["placement_ok"] is True, (name, loaded)
        assert len(layouts["texts"][name]) == LIMIT, name
        parity = summary["parity"]
        assert parity["agreed"] == parity["checked"] > 0, (name, parity)


def test_the_processor_and_the_embeddings_are_those_it_trained_with(layouts: dict) -> None:
    summaries = layouts["summaries"]
    trl = summaries["trl"]["as_trained"]["processor"]
    assert trl["resolution"] == {"min_pixels": 3136, "max_pixels": TRL_MAX_PIXELS}, trl
    for name in ("llamafactory@final", "shrunk"):
        resized = summaries[name]["loaded"]["embeddings_resized"]
        assert len(resized) == 1 and resized[0]["from_rows"] != resized[0]["to_rows"], (name, resized)
    # ms-swift saved no processor: the base's, found in the local hub cache by args.json's hub id
    snapshot = layouts["root"] / "hf" / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / REVISION
    assert summaries["swift-args"]["as_trained"]["processor"]["path"] == str(snapshot.resolve())


def test_the_checkpoint_at_the_trained_step_answers_as_the_trained_adapter(layouts: dict) -> None:
    texts, summaries = layouts["texts"], layouts["summaries"]
    assert texts["sweep@200"] == texts["trained"]
    assert summaries["sweep@200"]["metrics"]["mean_iou"] == summaries["trained"]["metrics"]["mean_iou"]
