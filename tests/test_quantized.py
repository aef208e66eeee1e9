"""Bases quantized with bitsandbytes, as QLoRA and Unsloth train on them (contract/quantization.py), on the CPU: the
trained demo family's base with a bitsandbytes quantization_config in its config.json, its weights in full precision
(transformers quantizes them as they load) or packed as bitsandbytes saves them (tools/make_frameworks.py; files
only where bitsandbytes is not installed), under the demo's trained LoRA (r1-llm-only) recording it as its base.

`plan` shows the quantization; `run --device cpu` fails each quantized recipe alone with a message naming what to
install or set, and evaluates those that set `dequantize = true`, recorded in the row and noted in the report. With
bitsandbytes installed, packed weights are unpacked and still ground. The GPU side (evaluated quantized, as
trained) is tests/gpu/test_gpu_quantized.py.
"""

from __future__ import annotations

import html
import importlib.util
import json
import re
from pathlib import Path

import pytest
from helpers import ROOT, only_run_dir, run_cli

from contract.checkpoint import CheckpointError, safetensors_header
from contract.quantization import INSTALL, Quantization, read_quantization, refusal
from contract.recipe import Recipe
from contract.spec import ChainLink
from orchestrator.gpu.memory import read_workload
from orchestrator.planning.plan import for_device, make_plans
from orchestrator.planning.recipes import load_recipe_file
from tools import make_frameworks as frameworks

FAMILY = ROOT / "examples" / "demo-family"
BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None
NF4 = "bitsandbytes 4-bit nf4 (double quant), compute bfloat16"
DIFFERS = "its numbers will differ from the quantized base's"


def _settings(**extra: object) -> str:
    settings = {"dataset": str(FAMILY / "data" / "heldout.jsonl"), "prompt": "{prompt} Answer with its bounding box.",
                "box_format": "qwen2vl", "max_new_tokens": 32, "batch_size": 8, "limit": 16, **extra}
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    return "[defaults]\n" + "\n".join(lines) + f'\n[lineage]\nremap = {{ "/ssd1/team/vlm_outputs" = "{FAMILY}" }}\n'


def _recipes(folder: Path, models: dict[str, tuple[Path, bool]], more: str = "") -> Path:
    """A recipe file: name -> (model, dequantize); `more`: further [[recipe]] entries as written."""
    body = "".join(f'[[recipe]]\nname = "{name}"\nmodel = "{model}"\n' + ("dequantize = true\n" if dequantize else "")
                   for name, (model, dequantize) in models.items())
    path = folder / "recipes.toml"
    path.write_text(_settings() + body + more)
    return path


def _requested(name: str, model: Path, quantize: str = "nf4") -> str:
    """A recipe that asks for its full-precision base quantized as it loads (`quantize`)."""
    return f'[[recipe]]\nname = "{name}"\nmodel = "{model}"\nquantize = "{quantize}"\n'


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("quantized")
    base, r1 = FAMILY / "base", FAMILY / "r1-llm-only"
    bases = {"full": frameworks.quantization_config_only(base, root / "base-4bit"),
             "packed": frameworks.packed_layout(base, root / "base-4bit-packed"),
             "packed8": frameworks.packed_layout(base, root / "base-8bit-packed", bits=8)}
    qlora = frameworks.qlora_adapter(r1, bases["full"], root / "qlora")
    qlora_packed = frameworks.qlora_adapter(r1, bases["packed"], root / "qlora-packed")
    recipes = _recipes(root, {"r1": (r1, False), "qlora": (qlora, False), "qlora-dequantized": (qlora, True),
                              "packed-dequantized": (qlora_packed, True), "packed8": (bases["packed8"], False)},
                       _requested("requested", r1))
    return {"root": root, "bases": bases, "recipes": recipes}


@pytest.fixture(scope="module")
def planned(built: dict) -> tuple[int, str]:
    result = run_cli("plan", str(built["recipes"]), "--device", "cpu")
    return result.returncode, re.sub(r"[\s│└├─]+", " ", result.stdout + result.stderr)


@pytest.fixture(scope="module")
def ran(built: dict) -> dict:
    out = built["root"] / "runs"
    result = run_cli("run", str(built["recipes"]), "--device", "cpu", "--out", str(out))
    run_dir = only_run_dir(out)
    rows = {row["name"]: row for row in json.loads((run_dir / "summary.json").read_text())["recipes"]}
    return {"result": result, "run_dir": run_dir, "rows": rows,
            "texts": {name: [json.loads(line)["text"] for line in (run_dir / name / "samples.jsonl").read_text()
                             .splitlines()] for name in rows if (run_dir / name / "samples.jsonl").exists()}}


# ----------------------------------------------------------------------------- plan and run on the CPU


def test_plan_shows_the_quantization_and_what_the_cpu_cannot_do(planned: tuple[int, str]) -> None:
    code, text = planned
    assert code == 1, text  # the quantized recipes cannot run here
    assert (f"quantization: {NF4}, full-precision weights quantized as they load; evaluated on its full-precision "
            f"weights, not quantized (dequantize = true): {DIFFERS}") in text
    assert (f"config: recipe 'qlora': its base is quantized ({NF4}, full-precision weights quantized as they load): "
            f"it is evaluated as it was trained only on a CUDA GPU with bitsandbytes ({INSTALL}); to evaluate it on "
            "this device, set dequantize = true in the recipe") in text
    assert "config: recipe 'packed8': its base is quantized (bitsandbytes 8-bit int8, packed weights)" in text
    if not BITSANDBYTES:
        assert (f"config: recipe 'packed-dequantized': its base is quantized ({NF4}, packed weights) and dequantize ="
                f" true, but unpacking its weights needs bitsandbytes, which is not installed: {INSTALL}") in text


def test_the_cpu_fails_each_quantized_recipe_alone_with_what_to_install_or_set(ran: dict) -> None:
    rows, result = ran["rows"], ran["result"]
    assert result.returncode == 1, result.stdout + result.stderr
    assert rows["r1"]["status"] == rows["qlora-dequantized"]["status"] == "ok", result.stdout
    refused = ["qlora", "packed8"] + ([] if BITSANDBYTES else ["packed-dequantized"])
    for name in refused:
        summary = json.loads((ran["run_dir"] / name / "summary.json").read_text())
        assert summary["status"] == "error" and summary["error"]["kind"] == "config", summary["error"]
        assert INSTALL in summary["detail"] and "Traceback" not in summary["detail"], summary["detail"]
        assert summary["pid"] is None  # refused before launch: no worker started
    assert "dequantize = true" in rows["qlora"]["detail"]
    assert rows["qlora"]["quantization"] == {"method": "bitsandbytes", "bits": 4, "quant_type": "nf4",
                                             "compute_dtype": "bfloat16", "double_quant": True, "packed": False,
                                             "skip_modules": frameworks.BNB_SKIP, "dequantized": False,
                                             "requested": False}


def test_a_plain_qlora_base_is_quantized_as_the_recipe_asks_and_refused_on_the_cpu(planned: tuple[int, str],
                                                                                    ran: dict) -> None:
    """`quantize = "nf4"` over the demo's full-precision base (its config.json records no quantization, as a plain
    QLoRA run leaves it): planned and recorded as QLoRA quantizes, and refused on the CPU like any quantized base."""
    requested = f"{NF4}, full-precision weights quantized as they load (the recipe's quantize)"
    assert (f"config: recipe 'requested': its base is quantized ({requested}): it is evaluated as it was trained only "
            f"on a CUDA GPU with bitsandbytes ({INSTALL}); to evaluate it on this device, remove quantize from the "
            "recipe to evaluate the base in full precision") in planned[1]
    row = json.loads((ran["run_dir"] / "requested" / "summary.json").read_text())
    assert row["status"] == "error" and row["error"]["kind"] == "config" and INSTALL in row["detail"], row["detail"]
    assert row["quantization"] == {"method": "bitsandbytes", "bits": 4, "quant_type": "nf4",
                                   "compute_dtype": "bfloat16", "double_quant": True, "packed": False,
                                   "skip_modules": [], "dequantized": False, "requested": True}


def test_quantize_over_a_base_that_records_its_own_or_with_dequantize_is_refused(built: dict,
                                                                                 tmp_path: Path) -> None:
    recipes = _recipes(tmp_path, {"r1": (FAMILY / "r1-llm-only", False)},
                       _requested("twice", built["bases"]["full"], "int8"))
    recipe_file = load_recipe_file(recipes)
    r1, twice = make_plans(recipe_file, recipe_file.recipes)
    assert r1.runnable and not twice.runnable
    assert twice.problem is not None and "records its own quantization (bitsandbytes 4-bit nf4" in twice.problem
    assert "remove quantize = 'int8' from the recipe" in twice.problem
    both = _recipes(tmp_path, {}, _requested("both", FAMILY / "base") + "dequantize = true\n")
    result = run_cli("plan", str(both), "--device", "cpu")
    text = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2 and "Traceback" not in text, text
    assert "'both'" in text and "quantize" in text and "cannot be set with dequantize = true" in text, text


def test_dequantized_full_precision_weights_answer_as_the_model_unquantized(ran: dict) -> None:
    """dequantize = true over full-precision weights reads them as stored: the recipe is the demo's r1 in all but
    its base's config, and answers every sample as r1 does; the row and the report say how it was evaluated."""
    assert len(ran["texts"]["r1"]) == 16
    assert ran["texts"]["qlora-dequantized"] == ran["texts"]["r1"]
    row = ran["rows"]["qlora-dequantized"]
    assert row["quantization"]["dequantized"] is True and row["quantization"]["packed"] is False
    assert ran["rows"]["r1"]["quantization"] is None
    note = (f"qlora-dequantized: its base is quantized ({NF4}, full-precision weights quantized as they load); "
            f"evaluated on its full-precision weights, not quantized (dequantize = true): {DIFFERS}")
    assert note in (ran["run_dir"] / "report.md").read_text()
    assert html.escape(note) in (ran["run_dir"] / "report.html").read_text()


@pytest.mark.skipif(not BITSANDBYTES, reason="bitsandbytes is not installed: packed weights cannot be unpacked")
def test_packed_weights_are_unpacked_with_bitsandbytes_and_still_ground(tmp_path: Path) -> None:
    """The demo's base saved quantized by bitsandbytes (on the CPU), under r1's LoRA, dequantize = true: it still
    finds the rectangles (the base alone finds almost none), and its answers are not r1's (4-bit rounding)."""
    quantized = frameworks.quantized_base(FAMILY / "base", tmp_path / "base-4bit")
    qlora = frameworks.qlora_adapter(FAMILY / "r1-llm-only", quantized, tmp_path / "qlora")
    recipes = _recipes(tmp_path, {"base": (FAMILY / "base", False), "packed-dequantized": (qlora, True)})
    result = run_cli("run", str(recipes), "--device", "cpu", "--out", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    summary = json.loads((run_dir / "packed-dequantized" / "summary.json").read_text())
    base = json.loads((run_dir / "base" / "summary.json").read_text())
    assert summary["metrics"]["mean_iou"] > base["metrics"]["mean_iou"] + 0.3, (summary["metrics"], base["metrics"])
    loaded = summary["loaded"]["quantization"]
    assert loaded["dequantized_modules"] > 0 and loaded["quantized_modules"] == 0, loaded
    assert summary["quantization"]["packed"] is True and summary["quantization"]["dequantized"] is True


# ----------------------------------------------------------------------------- the estimate


def _weights(folder: Path, device: str = "cuda", **settings: object) -> int:
    recipe = Recipe(name="x", model=str(folder), dataset=str(FAMILY / "data" / "heldout.jsonl"), limit=4,
                    **settings)  # type: ignore[arg-type]
    return read_workload(recipe, [ChainLink(str(folder), "full", "quick:0", 0)], device).weights_bytes


def _data_bytes(folder: Path) -> int:
    """The bytes of tensor data a safetensors file holds: its size less its header."""
    path = folder / "model.safetensors"
    return path.stat().st_size - safetensors_header(path).data_start


def test_the_estimate_counts_packed_weights_as_stored(built: dict) -> None:
    """The demo's base is stored in bfloat16, as a CUDA recipe runs: a packed base takes on the GPU what its file
    holds (uint8 4-bit pairs, int8 rows, their float32 constants, the rest in bfloat16)."""
    plain = _weights(FAMILY / "base")
    assert plain == _data_bytes(FAMILY / "base")
    for name in ("packed", "packed8"):
        assert _weights(built["bases"][name]) == _data_bytes(built["bases"][name]) < plain, name
    assert _weights(built["bases"]["packed"]) < _weights(built["bases"]["packed8"])


def test_full_precision_weights_are_counted_at_the_bits_they_load_in(built: dict) -> None:
    """Quantized as they load, the base takes what the same base saved packed holds, but for each weight's
    quant_state record (a short JSON text); dequantized, what it takes unquantized."""
    packed = safetensors_header(built["bases"]["packed"] / "model.safetensors").tensors
    records = [name for name in packed if ".quant_state." in name]
    on_load = _weights(built["bases"]["full"])
    assert 0 < _weights(built["bases"]["packed"]) - on_load <= 200 * len(records), (on_load, len(records))
    assert _weights(built["bases"]["full"], dequantize=True) == _weights(FAMILY / "base")
    # asked for by the recipe: the same bits, the aligner quantized too (no skip list), 8-bit between 4 and none
    nf4, int8 = _weights(FAMILY / "base", quantize="nf4"), _weights(FAMILY / "base", quantize="int8")
    assert nf4 < on_load and nf4 < int8 < _weights(FAMILY / "base"), (nf4, on_load, int8)


# ----------------------------------------------------------------------------- the rules


def _quantization(packed: bool, dequantized: bool) -> Quantization:
    return Quantization(bits=4, quant_type="nf4", compute_dtype="bfloat16", packed=packed, dequantized=dequantized)


@pytest.mark.parametrize(("packed", "dequantize", "device", "bitsandbytes", "expected"), [
    (True, False, "cuda", True, None),  # as trained
    (False, False, "cuda", None, None),  # a Ray node's worker checks bitsandbytes itself
    (True, False, "cpu", True, "only on a CUDA GPU with bitsandbytes"),
    (True, False, "cuda", False, "needs bitsandbytes, which is not installed"),
    (False, True, "cpu", False, None),  # full-precision weights read as stored: nothing to unpack
    (True, True, "cpu", True, None),
    (True, True, "cpu", False, "unpacking its weights needs bitsandbytes"),
])
def test_where_a_recipe_can_evaluate_a_quantized_base(packed: bool, dequantize: bool, device: str,
                                                      bitsandbytes: bool | None, expected: str | None) -> None:
    reason = refusal(_quantization(packed, dequantize), device=device, bitsandbytes=bitsandbytes)
    assert reason is None if expected is None else expected in (reason or "") and INSTALL in (reason or "")


def test_for_device_turns_only_the_quantized_recipes_into_config_errors(built: dict) -> None:
    recipe_file = load_recipe_file(built["recipes"])
    plans = {plan.recipe.name: plan for plan in for_device(make_plans(recipe_file, recipe_file.recipes), "cuda",
                                                           bitsandbytes=False)}
    assert plans["r1"].runnable and plans["r1"].quantization is None
    assert not plans["qlora"].runnable and plans["qlora"].problem_kind == "config"
    assert plans["qlora-dequantized"].runnable  # full-precision weights need no bitsandbytes
    assert "not installed" in (plans["packed-dequantized"].problem or "")


@pytest.mark.parametrize(("settings", "message"), [
    ({"quant_method": "gptq", "bits": 4}, 'quantized with "gptq", which evalorch cannot evaluate'),
    ({"quant_method": "bitsandbytes", "load_in_4bit": False, "load_in_8bit": False}, "sets neither of load_in_4bit"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "llm_int8_skip_modules": "lm_head"}, "list of module"),
    ("4bit", "expected a JSON object"),
])
def test_a_quantization_evalorch_cannot_evaluate_is_that_recipes_lineage_error(
        tmp_path: Path, settings: object, message: str) -> None:
    folder = tmp_path / "base"
    folder.mkdir()
    config = json.loads((FAMILY / "base" / "config.json").read_text()) | {"quantization_config": settings}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").symlink_to(FAMILY / "base" / "model.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        read_quantization(folder)
    recipes = _recipes(tmp_path, {"odd": (folder, False), "r1": (FAMILY / "r1-llm-only", False)})
    recipe_file = load_recipe_file(recipes)
    odd, r1 = make_plans(recipe_file, recipe_file.recipes)
    assert odd.problem is not None and odd.problem.startswith("lineage: recipe 'odd'") and message in odd.problem
    assert r1.runnable
