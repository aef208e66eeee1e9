"""A base quantized by bitsandbytes, evaluated on the GPU as it was trained (QLoRA, Unsloth's -bnb-4bit): the
trained demo family's base saved 4-bit (nf4, double quant) by bitsandbytes on the GPU, in a subprocess (this
process never touches CUDA), under the demo's trained LoRA (r1-llm-only), run with `python -m orchestrator run
--device cuda` (sdpa). The row records the 4-bit quantization, the worker's placement check passed with
bitsandbytes' layers on the GPU, the estimate counted the packed weights as stored, and the adapter still grounds.

Needs bitsandbytes where the suite runs (`pip install evalorch[quant]`, or its wheel carried into the copied tree):
skipped without it. On the simulated GPU (tests/test_gpu_wiring.py's dry run) the base is the same files, written
without bitsandbytes (tools/make_frameworks.packed_layout), and the recipe must be refused with what to install.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from gpu_helpers import SIMULATED, run_on_gpu, wait_for_release
from helpers import ROOT

from contract.checkpoint import safetensors_header
from contract.quantization import INSTALL
from contract.recipe import Recipe
from contract.spec import ChainLink
from orchestrator.gpu.memory import read_workload
from tools import make_frameworks as frameworks

pytestmark = pytest.mark.gpu
FAMILY = ROOT / "examples" / "demo-family"
BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None


def _quantized_base(out: Path) -> Path:
    """The demo's base saved 4-bit by bitsandbytes on the GPU, in a process of its own; files only on the
    simulated GPU."""
    if SIMULATED:
        return frameworks.packed_layout(FAMILY / "base", out)
    code = ("import sys; from pathlib import Path; from tools.make_frameworks import quantized_base; "
            "quantized_base(Path(sys.argv[1]), Path(sys.argv[2]), device='cuda')")
    done = subprocess.run([sys.executable, "-c", code, str(FAMILY / "base"), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def quantized(gpu, tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not SIMULATED and not BITSANDBYTES:
        pytest.skip(f"bitsandbytes is not installed here ({INSTALL}, or carry its wheel): a quantized base cannot be"
                    " evaluated as trained")
    root = tmp_path_factory.mktemp("quantized")
    base = _quantized_base(root / "base-4bit")
    qlora = frameworks.qlora_adapter(FAMILY / "r1-llm-only", base, root / "qlora")
    plain = frameworks.qlora_adapter(FAMILY / "r1-llm-only", FAMILY / "base", root / "plain-qlora")
    recipes = root / "recipes.toml"
    recipes.write_text(
        f'[defaults]\ndataset = "{FAMILY / "data" / "heldout.jsonl"}"\n'
        'prompt = "{prompt} Answer with its bounding box."\nbox_format = "qwen2vl"\nmax_new_tokens = 32\n'
        f'attn = "sdpa"\nlimit = 64\n[[recipe]]\nname = "base"\nmodel = "{FAMILY / "base"}"\n'
        f'[[recipe]]\nname = "qlora"\nmodel = "{qlora}"\n'
        f'[[recipe]]\nname = "requested"\nmodel = "{plain}"\nquantize = "nf4"\n')
    run = run_on_gpu(recipes, root / "runs")
    run["released"] = wait_for_release(gpu)
    run["base_path"] = base
    return run


def test_the_quantized_base_is_evaluated_as_trained_on_the_gpu(quantized: dict) -> None:
    summary = quantized["summaries"]["qlora"]
    if SIMULATED:  # no bitsandbytes, or no CUDA behind the simulated GPU: refused, saying what to install
        assert summary["status"] == "error" and summary["error"]["kind"] == "config", summary["error"]
        assert INSTALL in summary["detail"], summary["detail"]
        return
    assert quantized["result"].returncode == 0, quantized["result"].stdout[-3000:] + quantized["result"].stderr[-3000:]
    assert summary["status"] == "ok", summary["detail"]
    recorded = summary["quantization"]
    assert (recorded["method"], recorded["bits"], recorded["quant_type"], recorded["compute_dtype"]) == (
        "bitsandbytes", 4, "nf4", "bfloat16"), recorded
    assert recorded["packed"] is True and recorded["dequantized"] is False, recorded
    loaded = summary["loaded"]
    assert loaded["placement_ok"] is True and loaded["device"] == "cuda:0", loaded
    assert loaded["quantization"]["quantized_modules"] > 0 and "dequantized_modules" not in loaded["quantization"]
    base = quantized["summaries"]["base"]
    assert summary["metrics"]["mean_iou"] > base["metrics"]["mean_iou"] + 0.3, (summary["metrics"], base["metrics"])


def test_the_estimate_counted_the_packed_weights(quantized: dict) -> None:
    """The packed base is stored in bfloat16 and uint8, as it runs on the GPU: its estimate is the data its file
    holds, less than the unquantized base's; the preflight decided by that figure, and the load took less than the
    unquantized base's weights."""
    path = quantized["base_path"] / "model.safetensors"
    packed = path.stat().st_size - safetensors_header(path).data_start
    recipe = Recipe(name="qlora", model=str(quantized["base_path"]), dataset=str(FAMILY / "data" / "heldout.jsonl"))
    link = ChainLink(str(quantized["base_path"]), "full", "quick:0", 0)
    plain = quantized["summaries"]["base"]["preflight"]["estimate"]
    assert read_workload(recipe, [link], "cuda").weights_bytes == packed < plain["weights_bytes"], (packed, plain)
    if SIMULATED:  # refused before launch: no preflight, no load
        return
    summary = quantized["summaries"]["qlora"]
    assert summary["preflight"]["estimate"]["weights_bytes"] == packed, summary["preflight"]
    assert summary["loaded"]["bytes_allocated"] < plain["weights_bytes"], summary["loaded"]


def test_a_full_precision_base_is_quantized_as_the_recipe_asks(quantized: dict) -> None:
    """A plain QLoRA adapter names the full-precision base its trainer quantized as it loaded: `quantize = "nf4"`
    quantizes it so on the GPU, recorded as asked for; the adapter still grounds."""
    summary = quantized["summaries"]["requested"]
    if SIMULATED:
        assert summary["status"] == "error" and summary["error"]["kind"] == "config", summary["error"]
        assert INSTALL in summary["detail"] and "remove quantize" in summary["detail"], summary["detail"]
        return
    assert summary["status"] == "ok", summary["detail"]
    assert summary["quantization"]["requested"] is True and summary["quantization"]["packed"] is False
    loaded = summary["loaded"]
    assert loaded["placement_ok"] is True and loaded["quantization"]["requested"] is True, loaded
    assert loaded["quantization"]["quantized_modules"] > 0, loaded["quantization"]
    base = quantized["summaries"]["base"]
    assert summary["metrics"]["mean_iou"] > base["metrics"]["mean_iou"] + 0.3, (summary["metrics"], base["metrics"])
    assert summary["preflight"]["estimate"]["weights_bytes"] < base["preflight"]["estimate"]["weights_bytes"]
