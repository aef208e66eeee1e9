"""Every tested family through the GPU path: tiny random checkpoints (tools/make_families.py, built in a child
process: this one never touches CUDA), each with a LoRA adapter, evaluated with `--device cuda`. The decoder-only
families whose decode steps can be recorded replay them from CUDA graphs over the kvcache kernel; the others say
why not, as a note. Random weights: no figure to meet, only every recipe evaluated and the route each took."""

from __future__ import annotations

import subprocess
import sys

import pytest
from gpu_helpers import LOADED_AS, run_on_gpu
from helpers import ROOT, write_recipes

from contract.messages import DECODE_GRAPH_ON
from tools.make_families import FAMILIES

pytestmark = pytest.mark.gpu
REPLAYED = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl")  # flash_attention_2, kvcache kernel, CUDA graphs
# The rest in sdpa: Gemma 3's sliding-window layers and the others' need kernels the forward-only flash-attn
# build of the GPU machine leaves out; they decode eagerly
FORMATS = {"gemma3": "json_norm1000"}  # Gemma 3 has no native box format: its recipe says one
CACHED = ("internvl", "paligemma")  # batches collated from the image cache


@pytest.fixture(scope="module")
def families_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("families")
    subprocess.run([sys.executable, "-m", "tools.make_families", "--out", str(folder / "models"), "--samples", "8"],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    body = ""
    for name in FAMILIES:
        settings = "" if name in REPLAYED else 'attn = "sdpa"\n'
        settings += f'box_format = "{FORMATS[name]}"\n' if name in FORMATS else ""
        settings += "image_cache = true\n" if name in CACHED else ""
        body += f'[[recipe]]\nname = "{name}"\nmodel = "{folder / "models" / name / "lora"}"\n{settings}'
    (dataset,) = (folder / "models" / "data").glob("*.jsonl")
    recipes = write_recipes(folder, body, None, dataset=str(dataset), prompt="{prompt} Answer with its bounding box.",
                            batch_size=4, max_new_tokens=8, min_new_tokens=4)
    return run_on_gpu(recipes, folder / "runs")


def test_every_family_is_evaluated_on_the_gpu(families_run: dict) -> None:
    assert set(families_run["summaries"]) == set(FAMILIES)
    for name, summary in families_run["summaries"].items():
        assert summary["status"] == "ok", (name, summary["detail"])
        assert (summary["loaded"]["dtype"], summary["loaded"]["device"]) == LOADED_AS[1:], (name, summary["loaded"])
        assert len(families_run["texts"][name]) == 8, name


def test_decoder_families_replay_their_decode_steps(families_run: dict) -> None:
    for name in REPLAYED:
        summary = families_run["summaries"][name]
        loaded, counts = summary["loaded"], summary["done"]["counts"]
        assert loaded["decode_attention"] == "kvcache" and loaded["decode_graph"] == DECODE_GRAPH_ON, (name, loaded)
        graphs = counts["decode_graph"]
        assert graphs["replayed"] == counts["batches"] and graphs["declined"] == 0, (name, graphs)
