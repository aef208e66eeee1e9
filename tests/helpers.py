"""Helpers shared by the test files (no test file imports another): running the CLI as a user does, writing
recipe files, and run folders made by hand as `run` leaves them, for the reporting tests. (The CPU reference of
flash-attn's kvcache kernel lives with the simulated GPU, worker/simulated_gpu.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

from contract.boxes import score_text
from contract.run_row import IouRule, RecipeRow
from orchestrator.results.stats import metrics
from orchestrator.results.store import read_samples
from orchestrator.results.summary import run_summary

ROOT = Path(__file__).resolve().parent.parent


def write_recipes(folder: Path, body: str, demo: dict | None = None, **defaults: object) -> Path:
    """A recipes.toml in `folder`: [defaults] pointing at the demo data, a remap for the demo's training paths."""
    lines = ["[defaults]"]
    settings = {"max_new_tokens": 8, "batch_size": 4, **defaults}
    if demo is not None:
        settings.setdefault("dataset", str(demo["dataset"]))
        settings.setdefault("prompt", "{prompt} Answer with its bounding box.")
    for key, value in settings.items():
        lines.append(f"{key} = {_toml(value)}")
    if demo is not None:
        lines += ["[lineage]", f'remap = {{ "/ssd1/team/vlm_outputs" = "{demo["root"] / "models"}" }}']
    path = folder / "recipes.toml"
    path.write_text("\n".join(lines) + "\n" + body)
    return path


DEMO_FOLDERS = {"base": "base", "r1-llm-only": "r1-llm-only", "r2-vision-only": "r2-vision-only",
                "r3-two-stage": "r3-stage2", "r4-joint": "r4-joint"}  # recipe -> the demo family's folder


def demo_recipes(models: Path, names: list[str]) -> str:
    """[[recipe]] entries for these recipes of the demo family under `models`, the first the baseline."""
    return "".join(f'[[recipe]]\nname = "{name}"\nmodel = "{models / DEMO_FOLDERS[name]}"\n'
                   + ("baseline = true\n" if index == 0 else "") for index, name in enumerate(names))


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m orchestrator ...` as a user types it, in a real subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def only_run_dir(out: Path) -> Path:
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def wait_for_samples(out: Path, name: str, count: int, timeout: float = 180) -> Path:
    """The run folder under `out` once recipe `name` has recorded `count` samples (a CLI run in the background)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = list(out.glob("*/")) if out.exists() else []
        if runs and len(read_samples(runs[0] / name / "samples.jsonl")) >= count:
            return runs[0]
        time.sleep(0.2)
    raise AssertionError(f"{name} never reached {count} samples")


# ------------------------------------------------------------------------- run folders made by hand

IMAGE_SIZE = (64, 48)
N_SAMPLES = 20
Shift = Callable[[int], float | None]  # sample index -> horizontal shift of the predicted box, None: no box
RECIPES: dict[str, Shift] = {
    "base": lambda i: 10 + i % 5,  # a mediocre baseline
    "good": lambda i: i % 2,  # nearly exact boxes: clearly better
    "same": lambda i: 10 + i % 5 + (1 if i % 4 == 0 else -1 if i % 4 == 2 else 0),  # the baseline, give or take
    "blind": lambda i: None if i % 3 else 20,  # mostly no box at all
}


def gt_box(i: int) -> list[float]:
    x1, y1 = 6 + i % 10, 5 + i % 8
    return [float(x1), float(y1), float(x1 + 30), float(y1 + 22)]


def qwen_text(box: list[float]) -> str:
    w, h = IMAGE_SIZE
    x1, y1, x2, y2 = (round(v * 1000 / s) for v, s in zip(box, (w, h, w, h), strict=True))
    return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"


def make_dataset(folder: Path, n: int = N_SAMPLES) -> Path:
    """Grey images with a blue rectangle where the ground truth is; the jsonl names them relative to itself."""
    (folder / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        image = Image.new("RGB", IMAGE_SIZE, (200, 200, 200))
        ImageDraw.Draw(image).rectangle(gt_box(i), fill=(40, 60, 200))
        image.save(folder / "images" / f"s{i:03d}.png")
        lines.append(json.dumps({"id": f"s{i:03d}", "image": f"images/s{i:03d}.png", "bbox": gt_box(i),
                                 "prompt": "Find the blue rectangle."}))
    path = folder / "grounding.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def sample_record(i: int, text: str) -> dict:
    gt = gt_box(i)
    return {"id": f"s{i:03d}", "status": "ok", "gt": gt, "text": text, "image_size": list(IMAGE_SIZE),
            "seconds": 0.05, "error": None, **score_text(text, "qwen2vl", IMAGE_SIZE, gt)}


def recipe_samples(shift: Shift, n: int = N_SAMPLES) -> list[dict]:
    records = []
    for i in range(n):
        dx = shift(i)
        box = gt_box(i)
        text = "I cannot find it." if dx is None else qwen_text([box[0] + dx, box[1], box[2] + dx, box[3]])
        records.append(sample_record(i, text))
    return records


def make_run(root: Path, recipes: dict[str, Shift] | None = None, *, name: str = "20260101T000000Z",
             dataset: Path | None = None, failed: dict[str, str] | None = None,
             texts: dict[tuple[str, int], str] | None = None, legacy: bool = False,
             fingerprints: dict[str, str] | None = None, settings: dict[str, dict] | None = None,
             extra: dict | None = None) -> Path:
    """A run folder as `run` leaves it: run.json, <recipe>/samples.jsonl + summary.json, summary.json. `legacy`:
    as a run from before the IoU rule was recorded (rates counting IoU > t under iou_gt_ keys, no iou_rule).
    `fingerprints` and `settings` (per recipe) replace a recipe's weights' fingerprint and add to its recorded
    settings; `extra` adds to the run's summary.json. The dataset is made once under `root` and reused."""
    recipes = recipes or RECIPES
    if dataset is None:
        dataset = root / "data" / "grounding.jsonl" if (root / "data").exists() else make_dataset(root / "data")
    run_dir = root / "runs" / name
    run_dir.mkdir(parents=True)
    rows = []
    for recipe, shift in recipes.items():
        samples = recipe_samples(shift)
        for (which, index), text in (texts or {}).items():
            if which == recipe:
                samples[index] = sample_record(index, text)
        (run_dir / recipe).mkdir()
        (run_dir / recipe / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
        status, detail = ("error", (failed or {})[recipe]) if recipe in (failed or {}) else ("ok", "")
        rule = {} if legacy else {"iou_rule": ">="}
        row = {"name": recipe, "status": status, "detail": detail, **rule,
               "metrics": metrics(samples, rule=IouRule.ABOVE if legacy else IouRule.AT_LEAST),
               "lineage": [{"kind": "full", "path": f"/models/{recipe}",
                            "fingerprint": (fingerprints or {}).get(recipe, f"quick:{recipe}")}],
               "base_override": False, "preflight": None, "attempts": [],
               "recipe": {"name": recipe, "dataset": str(dataset), "box_format": "qwen2vl", "limit": None,
                          "baseline": recipe == "base", **(settings or {}).get(recipe, {})}}
        (run_dir / recipe / "summary.json").write_text(json.dumps({**row, "seconds": 2.5, "pid": 4242}))
        rows.append(row)
    (run_dir / "run.json").write_text(json.dumps({"device": "cpu", "host": "test",
                                                  "recipes": [r["recipe"] for r in rows]}))
    summary = run_summary([RecipeRow.model_validate(row) for row in rows], "base").to_json()
    if legacy:  # no rule recorded in the rows: readers tell it from their iou_gt_ keys
        summary["recipes"] = [{k: v for k, v in row.items() if k != "iou_rule"} for row in summary["recipes"]]
    (run_dir / "summary.json").write_text(json.dumps({**summary, **(extra or {})}))
    return run_dir
