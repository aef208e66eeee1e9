"""Damaged checkpoints between good ones: each fails its own recipe, as a lineage error whose message names the
damaged file and what is wrong with it; `plan` says so without a traceback; `run` runs the good recipes and
exits 1. The damage is done to copies of the demo family's real checkpoints."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import only_run_dir, run_cli, write_recipes

from contract.checkpoint import check_folder
from contract.recipe import Recipe
from contract.spec import ChainLink
from orchestrator.gpu.memory import EstimateError, read_workload
from orchestrator.planning.plan import make_plans
from orchestrator.planning.recipes import load_recipe_file

WEIGHTS, CONFIG = "model.safetensors", "config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _header(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8 : 8 + length])


def _rewrite_header(path: Path, change: Callable[[dict], None]) -> None:
    """Change the header in place, the tensor data left where it is (padded with spaces, as safetensors does)."""
    data = path.read_bytes()
    length, header = _header(path)
    change(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    path.write_bytes(data[:8] + text.ljust(length) + data[8 + length :])


def _cut(name: str, keep: Callable[[bytes], int]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: keep(data)])
    return damage


def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_text(text)


def _dangling(folder: Path) -> None:
    (folder / WEIGHTS).unlink()
    (folder / WEIGHTS).symlink_to(folder / "gone" / WEIGHTS)


def _looping(folder: Path) -> None:
    (folder / CONFIG).unlink()
    (folder / CONFIG).symlink_to(folder / CONFIG)


def _garbage_header(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", 64) + bytes(range(200, 256)) + b"\x00" * 8 + data[72:])


def _claims_2_pow_40(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", 2**40) + data[8:])


def _missing_shard(folder: Path) -> None:
    tensors = _header(folder / WEIGHTS)[1]
    names = sorted(n for n in tensors if n != "__metadata__")
    shards = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
    (folder / WEIGHTS).rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shards}))


def _wrong_size(folder: Path) -> None:
    """A shape that does not match the bytes the header gives the tensor (one digit flipped in copying)."""
    def change(header: dict) -> None:
        name = next(n for n, info in header.items() if n != "__metadata__" and len(info["shape"]) == 2)
        header[name]["shape"][0] *= 2
    _rewrite_header(folder / WEIGHTS, change)


# name: (demo model copied, damage, the file the message names, what it says)
DAMAGES: dict[str, tuple[str, Callable[[Path], None], str, str]] = {
    "empty-weights": ("base", _write(WEIGHTS, ""), WEIGHTS, "0 bytes, too short"),
    "cut-before-header": ("base", _cut(WEIGHTS, lambda d: 5), WEIGHTS, "5 bytes, too short"),
    "cut-in-header": ("base", _cut(WEIGHTS, lambda d: 8 + struct.unpack("<Q", d[:8])[0] // 2), WEIGHTS,
                      "the header claims"),
    "cut-in-data": ("base", _cut(WEIGHTS, lambda d: len(d) - 100), WEIGHTS, "cut off while copying"),
    "garbage-header": ("base", _garbage_header, WEIGHTS, "header is not valid JSON"),
    "header-claims-2-pow-40": ("base", _claims_2_pow_40, WEIGHTS, f"the header claims {2**40} bytes"),
    "wrong-tensor-size": ("base", _wrong_size, WEIGHTS, "a damaged header"),
    "config-not-json": ("base", _write(CONFIG, '{"model_type": "qwen2_vl",'), CONFIG, "not valid JSON"),
    "config-not-an-object": ("base", _write(CONFIG, "[1, 2, 3]"), CONFIG, "expected a JSON object, found list"),
    "config-empty": ("base", _write(CONFIG, ""), CONFIG, "not valid JSON"),
    "index-names-a-missing-shard": ("base", _missing_shard, "model.safetensors.index.json",
                                    "names 1 shard(s) that are not there: model-00002-of-00002.safetensors"),
    "dangling-symlink": ("base", _dangling, WEIGHTS, "a dangling symlink to"),
    "looping-symlink": ("base", _looping, CONFIG, "a symlink that loops"),
    "tokenizer-not-json": ("base", _write("tokenizer.json", '{"version": "1.0", "model": '), "tokenizer.json",
                           "not valid JSON"),
    "processor-config-not-an-object": ("base", _write("processor_config.json", "7"), "processor_config.json",
                                       "expected a JSON object, found int"),
    "adapter-config-not-json": ("r1-llm-only", _write("adapter_config.json", "{"), "adapter_config.json",
                                "not valid JSON"),
    "adapter-weights-cut": ("r1-llm-only", _cut(ADAPTER_WEIGHTS, lambda d: len(d) // 2), ADAPTER_WEIGHTS,
                            "cut off while copying"),
}


@pytest.fixture(scope="module")
def damaged(demo: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One damaged copy of a demo checkpoint per entry of DAMAGES, each in its own folder."""
    root = tmp_path_factory.mktemp("damaged")
    for name, (source, damage, _, _) in DAMAGES.items():
        shutil.copytree(demo["root"] / "models" / source, root / name)
        damage(root / name)
    return root


def _between_good_ones(folder: Path, demo: dict, damaged: Path, names: list[str], **defaults: object) -> Path:
    models = demo["root"] / "models"
    body = f'[[recipe]]\nname = "good-before"\nmodel = "{models}/base"\n'
    body += "".join(f'[[recipe]]\nname = "{name}"\nmodel = "{damaged / name}"\n' for name in names)
    body += f'[[recipe]]\nname = "good-after"\nmodel = "{models}/r1-llm-only"\n'
    return write_recipes(folder, body, demo, **defaults)


@pytest.mark.parametrize("name", list(DAMAGES))
def test_each_damaged_checkpoint_fails_its_own_plan_naming_the_file(name: str, demo: dict, damaged: Path,
                                                                     tmp_path: Path) -> None:
    recipe_file = load_recipe_file(_between_good_ones(tmp_path, demo, damaged, [name]))
    plans = make_plans(recipe_file, recipe_file.recipes)
    assert [p.runnable for p in plans] == [True, False, True]
    _, _, file, says = DAMAGES[name]
    problem = plans[1].problem
    assert problem.startswith(f"lineage: recipe '{name}': ") and str(damaged / name / file) in problem, problem
    assert says in problem, problem


@pytest.mark.parametrize("name", ["cut-in-data", "garbage-header", "header-claims-2-pow-40", "config-not-json",
                                  "wrong-tensor-size", "processor-config-not-an-object"])
def test_a_checkpoint_damaged_after_planning_is_an_estimate_error_naming_the_file(
        name: str, demo: dict, damaged: Path, tmp_path: Path) -> None:
    """The preflight reads the files again just before the launch: a copy that was still under way is caught."""
    shutil.copytree(demo["root"] / "models" / "base", tmp_path / "model")
    recipe_file = load_recipe_file(write_recipes(tmp_path, f'[[recipe]]\nname = "r"\nmodel = "{tmp_path}/model"\n',
                                                 demo))
    plan = make_plans(recipe_file, recipe_file.recipes)[0]
    read_workload(plan.recipe, plan.chain, "cuda")  # readable before the damage
    _, _, file, _ = DAMAGES[name]
    (tmp_path / "model" / file).unlink()
    shutil.copy(damaged / name / file, tmp_path / "model" / file)
    with pytest.raises(EstimateError, match=str(tmp_path / "model" / file)):
        read_workload(plan.recipe, plan.chain, "cuda")


@pytest.mark.parametrize(("field", "value", "says"), [
    ("num_hidden_layers", "many", "num_hidden_layers is \"many\", expected a positive integer"),
    ("num_attention_heads", 0, "num_attention_heads is 0, expected a positive integer"),
    ("hidden_size", [64], "hidden_size is [64], expected a positive integer"),
])
def test_a_config_with_mistyped_sizes_is_an_estimate_error(field: str, value: object, says: str, demo: dict,
                                                           tmp_path: Path) -> None:
    shutil.copytree(demo["root"] / "models" / "base", tmp_path / "model")
    config = json.loads((tmp_path / "model" / CONFIG).read_text())
    config["text_config"][field] = value
    (tmp_path / "model" / CONFIG).write_text(json.dumps(config))
    recipe_file = load_recipe_file(write_recipes(tmp_path, f'[[recipe]]\nname = "r"\nmodel = "{tmp_path}/model"\n',
                                                 demo))
    plan = make_plans(recipe_file, recipe_file.recipes)[0]
    with pytest.raises(EstimateError, match=str(tmp_path / "model" / CONFIG)) as info:
        read_workload(plan.recipe, plan.chain, "cuda")
    assert says in str(info.value)


def test_check_folder_accepts_every_good_demo_checkpoint(demo: dict) -> None:
    for folder in sorted((demo["root"] / "models").iterdir()):
        kind = "adapter" if (folder / "adapter_config.json").exists() else "full"
        check_folder(folder, kind, allow_pickle=False)


def test_the_worker_checks_the_files_again_before_loading(damaged: Path) -> None:
    """The worker reads through the same checks (a file may break between plan and load): a lineage error naming
    the file, before transformers is handed the folder."""
    from worker.errors import WorkerError
    from worker.loading.chain_files import check_chain_files

    for name, (_, _, file, says) in DAMAGES.items():
        kind = "adapter" if (damaged / name / "adapter_config.json").exists() else "full"
        chain = [ChainLink(str(damaged / name), kind, "quick:0", 1)]
        with pytest.raises(WorkerError) as info:
            check_chain_files(chain, Recipe(name="r", model=str(damaged / name)))
        assert info.value.kind == "lineage" and str(damaged / name / file) in str(info.value), name
        assert says in str(info.value), name


def test_plan_reports_every_damaged_checkpoint_without_a_traceback(demo: dict, damaged: Path,
                                                                  tmp_path: Path) -> None:
    recipes = _between_good_ones(tmp_path, demo, damaged, list(DAMAGES))
    result = run_cli("plan", str(recipes), "--device", "cpu")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    assert f"Error: {len(DAMAGES)} recipe(s) cannot run" in " ".join(result.stderr.split())
    flat = "".join(output.split())  # the table wraps long lines
    for name, (_, _, file, says) in DAMAGES.items():
        assert f"lineage:recipe'{name}':{damaged / name / file}" in flat, name
        assert "".join(says.split()) in flat, name
    assert output.count("memory: ") == 2  # the good recipes, before and after


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def damaged_run(demo: dict, damaged: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`run` with damaged recipes between good ones: some caught by the parent, one only transformers can see
    (a tokenizer.json that is JSON, but no tokenizer), one whose shapes do not fit its config; and a recipe
    with one missing image where none may be missing."""
    folder = tmp_path_factory.mktemp("damaged-run")
    wrong = folder / "wrong-shape"
    shutil.copytree(demo["root"] / "models" / "base", wrong)

    def swap(header: dict) -> None:  # the same bytes, another shape: only the model's own checks see it
        name = next(n for n, info in header.items() if n != "__metadata__" and len(info["shape"]) == 2
                    and info["shape"][0] % 2 == 0)
        header[name]["shape"] = [header[name]["shape"][0] // 2, header[name]["shape"][1] * 2]
    _rewrite_header(wrong / WEIGHTS, swap)
    not_a_tokenizer = folder / "not-a-tokenizer"
    shutil.copytree(demo["root"] / "models" / "base", not_a_tokenizer)
    (not_a_tokenizer / "tokenizer.json").write_text('{"what": "not a tokenizer"}')
    data = folder / "data"
    shutil.copytree(Path(demo["dataset"]).parent, data)
    lines = (data / "grounding.jsonl").read_text().splitlines()[:3]
    lines[1] = lines[1].replace(".png", "-missing.png")
    (data / "one-missing.jsonl").write_text("\n".join(lines) + "\n")

    models = demo["root"] / "models"
    body = "".join(f'[[recipe]]\nname = "{name}"\nmodel = "{model}"\n' for name, model in [
        ("good-before", models / "base"), ("empty-weights", damaged / "empty-weights"),
        ("not-a-tokenizer", not_a_tokenizer), ("header-claims-2-pow-40", damaged / "header-claims-2-pow-40"),
        ("wrong-shape", wrong), ("adapter-config-not-json", damaged / "adapter-config-not-json"),
        ("good-after", models / "r1-llm-only")])
    body += (f'[[recipe]]\nname = "one-missing"\nmodel = "{models}/base"\n'
             f'dataset = "{data / "one-missing.jsonl"}"\n')
    recipes = write_recipes(folder, body, demo, limit=3, batch_size=3, max_new_tokens=4)
    result = run_cli("run", str(recipes), "--out", str(folder / "runs"), "--device", "cpu")
    run_dir = only_run_dir(folder / "runs")
    rows = {r["name"]: r for r in json.loads((run_dir / "summary.json").read_text())["recipes"]}
    return {"result": result, "rows": rows, "run_dir": run_dir, "wrong": wrong, "tokenizer": not_a_tokenizer}


def test_run_runs_the_good_recipes_and_exits_1(damaged_run: dict) -> None:
    result, rows = damaged_run["result"], damaged_run["rows"]
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for name in ("good-before", "good-after"):
        assert rows[name]["status"] == "ok" and rows[name]["metrics"]["n"] == 3, rows[name]
    failed = {name: row for name, row in rows.items() if row["status"] != "ok"}
    assert set(failed) == {"empty-weights", "not-a-tokenizer", "header-claims-2-pow-40", "wrong-shape",
                           "adapter-config-not-json", "one-missing"}


def test_each_damaged_recipe_is_a_lineage_error_naming_its_checkpoint(damaged_run: dict, damaged: Path) -> None:
    rows, run_dir = damaged_run["rows"], damaged_run["run_dir"]
    for name, file in [("empty-weights", WEIGHTS), ("header-claims-2-pow-40", WEIGHTS),
                       ("adapter-config-not-json", "adapter_config.json")]:
        assert rows[name]["status"] == "error" and rows[name]["detail"].startswith("lineage: "), rows[name]
        assert str(damaged / name / file) in rows[name]["detail"]
        assert json.loads((run_dir / name / "summary.json").read_text())["pid"] is None  # no worker started
    # damage only transformers sees: the worker's own lineage error, naming the folder and what failed
    for name, folder, what in [("not-a-tokenizer", damaged_run["tokenizer"], "its processor"),
                               ("wrong-shape", damaged_run["wrong"], "its weights")]:
        stored = json.loads((run_dir / name / "summary.json").read_text())
        assert stored["pid"] is not None and stored["error"]["kind"] == "lineage", stored["error"]
        assert rows[name]["detail"].startswith(f"lineage: {folder}: {what}"), rows[name]
        assert "could not be loaded (" in rows[name]["detail"] and "worker.log" in rows[name]["detail"]
    problems = "".join(damaged_run["result"].stdout.split())
    for name in ("empty-weights", "not-a-tokenizer", "wrong-shape"):
        assert f"{name}:error:lineage:" in problems


def test_a_missing_image_over_the_allowed_count_fails_the_recipe_with_its_metrics(damaged_run: dict) -> None:
    row = damaged_run["rows"]["one-missing"]
    assert row["status"] == "sample_errors"
    assert row["metrics"]["n"] == 2 and row["metrics"]["errors"] == 1 and row["metrics"]["mean_iou"] is not None
    assert row["sample_errors"]["allowed"] == 0 and row["sample_errors"]["passed"] is False
    assert row["detail"].startswith("1 of 3 samples errored; max_sample_errors = 0 allows 0. First: ")
    assert "-missing.png" in row["detail"]
    table = "".join(damaged_run["result"].stdout.split())  # the table wraps its cells
    assert "│failed:1of3samples│" in table and "│errored(0allowed)│" in table
    assert "-missing.png" in (damaged_run["run_dir"] / "report.md").read_text()
    assert "failed: 1 of 3 samples errored" in (damaged_run["run_dir"] / "report.html").read_text()
