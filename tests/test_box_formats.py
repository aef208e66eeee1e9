"""Box formats on real run folders: records keep the size the model saw (`input_size`), `rescore` converts with it
and without a model, and an old folder without it is refused for the one format that needs it, never guessed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import IMAGE_SIZE, gt_box, make_run, run_cli, write_recipes

from orchestrator.results.store import read_samples

INPUT_SIZE = (56, 28)  # what a Qwen2.5-VL processor would make of the 64x48 images (multiples of 28)


def _qwen25_text(box: list[float]) -> str:
    """The ground truth as Qwen2.5-VL answers it: pixels of the resized input."""
    sx, sy = INPUT_SIZE[0] / IMAGE_SIZE[0], INPUT_SIZE[1] / IMAGE_SIZE[1]
    x1, y1, x2, y2 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
    return f'```json\n[{{"bbox_2d": [{x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}], "label": "rectangle"}}]\n```'


def _declare(run_dir: Path, recipe: str, box_format: str) -> None:
    """Record `box_format` as the recipe's, where `run` records it (the run summary's row)."""
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text())
    for row in summary["recipes"]:
        if row["name"] == recipe:
            row["recipe"]["box_format"] = box_format
    path.write_text(json.dumps(summary))


def _only_rescore(run_dir: Path) -> Path:
    (out,) = [p for p in run_dir.iterdir() if p.name.startswith("rescore-")]
    return out


def test_rescore_converts_input_pixels_with_the_recorded_input_size(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, {"base": lambda i: 0, "qwen25": lambda i: 0})
    path = run_dir / "qwen25" / "samples.jsonl"
    samples = [{**s, "text": _qwen25_text(gt_box(i)), "input_size": list(INPUT_SIZE), "iou": 0.0, "pred": None,
                "detected": False} for i, s in enumerate(read_samples(path))]
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    _declare(run_dir, "qwen25", "qwen25vl")
    result = run_cli("rescore", str(run_dir), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    row = next(r for r in json.loads(result.stdout)["recipes"] if r["name"] == "qwen25")
    assert row["rescore"]["box_format"] == "qwen25vl"
    assert row["metrics"]["mean_iou"] > 0.99 and row["metrics"]["detection_rate"] == 1.0
    # read as pixels of the original image (the json_pixels mistake), the same answers are far off
    wrong = run_cli("rescore", str(run_dir), "--box-format", "json_pixels", "--json")
    assert wrong.returncode == 0, wrong.stderr
    rows = {r["name"]: r for r in json.loads(wrong.stdout)["recipes"]}
    assert rows["qwen25"]["metrics"]["mean_iou"] < 0.6


def test_an_old_folder_without_input_size_is_refused_for_input_pixels_only(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, {"base": lambda i: 0})
    result = run_cli("rescore", str(run_dir), "--box-format", "qwen25vl")
    assert result.returncode == 2
    assert "recipe 'base'" in result.stderr and "input_size" in result.stderr and "Traceback" not in result.stderr
    assert not any(p.name.startswith("rescore-") for p in run_dir.iterdir())  # no half rescore left behind
    # every other format still rescores such a folder
    assert run_cli("rescore", str(run_dir), "--box-format", "qwen3vl").returncode == 0


@pytest.mark.parametrize("box_format", ["qwen2vl", "json_norm1000"])
def test_relative_formats_need_no_input_size(tmp_path: Path, box_format: str) -> None:
    run_dir = make_run(tmp_path, {"base": lambda i: 0})
    assert run_cli("rescore", str(run_dir), "--box-format", box_format).returncode == 0


# ------------------------------------------------------------------------------ box_format = "auto"

def _family_copy(demo: dict, folder: Path, model_type: str) -> Path:
    """The demo's base checkpoint with another family's model_type in its config.json (weights linked)."""
    base = demo["root"] / "models" / "base"
    folder.mkdir()
    for item in base.iterdir():
        (folder / item.name).symlink_to(item)
    config = json.loads((base / "config.json").read_text())
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    return folder


def test_auto_resolves_the_family_format_before_launch(demo: dict, tmp_path: Path) -> None:
    body = f'[[recipe]]\nname = "base"\nmodel = "{demo["root"] / "models" / "base"}"\n'
    result = run_cli("plan", str(write_recipes(tmp_path, body, demo)), "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "box format: qwen2vl (auto: model_type 'qwen2_vl'" in result.stdout


def test_auto_for_a_family_without_a_native_format_is_a_config_error(demo: dict, tmp_path: Path) -> None:
    llava = _family_copy(demo, tmp_path / "llava", "llava")
    body = (f'[[recipe]]\nname = "ok"\nmodel = "{demo["root"] / "models" / "base"}"\n'
            f'[[recipe]]\nname = "mine"\nmodel = "{llava}"\n'
            f'[[recipe]]\nname = "told"\nmodel = "{llava}"\nbox_format = "json_norm1000"\n')
    recipes = write_recipes(tmp_path, body, demo)
    for command in (["plan", str(recipes), "--device", "cpu"],
                    ["run", str(recipes), "--device", "cpu", "--out", str(tmp_path / "runs")]):
        result = run_cli(*command)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "recipe 'mine'" in result.stderr and "'llava'" in result.stderr
        assert "recipe 'told'" not in result.stderr and "recipe 'ok'" not in result.stderr
        assert "qwen25vl" in result.stderr and "paligemma" in result.stderr  # the formats, listed
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing ran


# ------------------------------------------------------------------------------ thresholds: IoU >= t

HALF = "<|box_start|>(0,0),(250,500)<|box_end|>"  # (0, 0)-(16, 24) on 64x48 against (0, 0)-(32, 24): IoU 0.5 exactly


def _with_half_iou(run_dir: Path, recipe: str, count: int) -> None:
    """The first `count` samples of `recipe` answer with a box of IoU exactly 0.5 against a (0, 0, 32, 24) truth."""
    path = run_dir / recipe / "samples.jsonl"
    samples = read_samples(path)
    for sample in samples[:count]:
        sample.update(gt=[0.0, 0.0, 32.0, 24.0], text=HALF, pred=[0.0, 0.0, 16.0, 24.0], iou=0.5, detected=True)
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))


def test_a_new_run_counts_iou_at_least_t_and_titles_the_column_so(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, {"base": lambda i: 30})  # 30 px off: IoU 0 everywhere ...
    _with_half_iou(run_dir, "base", 5)  # ... but for 5 of 20 at exactly 0.5
    result = run_cli("rescore", str(run_dir), "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    (row,) = document["recipes"]
    assert row["iou_rule"] == ">=" and document["iou_rule"] == ">="
    assert row["metrics"]["iou_ge_0.5"] == pytest.approx(5 / 20) and "iou_gt_0.5" not in row["metrics"]
    out = _only_rescore(run_dir)
    assert "IoU≥0.5" in (out / "report.md").read_text() and "IoU>0.5" not in (out / "report.md").read_text()


def test_rescore_reproduces_an_old_folder_with_its_own_rule(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, {"base": lambda i: 30}, legacy=True)
    _with_half_iou(run_dir, "base", 5)
    result = run_cli("rescore", str(run_dir), "--json")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["recipes"]
    assert row["iou_rule"] == ">" and row["metrics"]["iou_gt_0.5"] == 0.0  # IoU 0.5 is not > 0.5
    assert "IoU>0.5" in (_only_rescore(run_dir) / "report.md").read_text()
    # asked for the new rule, the same folder counts them
    result = run_cli("rescore", str(run_dir), "--iou-rule", ">=", "--json")
    (row,) = json.loads(result.stdout)["recipes"]
    assert row["iou_rule"] == ">=" and row["metrics"]["iou_ge_0.5"] == pytest.approx(5 / 20)
