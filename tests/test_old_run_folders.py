"""Run folders written by an older evalorch, and by today's, are still read, reported, rescored and resumed.

tests/data/run_1542703/ was written by the code at commit 1542703 (before the run row was typed, issue 31): the
demo family as conftest.py builds it (12 samples, seed 0), recipes `base` and `r2-vision-only` at batch size 1,
the parent interrupted once `r2-vision-only` had recorded samples (its README says how it was made). Its paths
name the demo where it was built; the test moves them to this session's demo (same builder, same seed: the same
weights, so the same fingerprints) before it reads the folder, as a user who moved a run folder with its inputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import demo_recipes, only_run_dir, run_cli, write_recipes

from contract.layout import REPLACED
from contract.run_row import IouRule, Status
from orchestrator.results.store import read_samples
from orchestrator.results.summary import load_run

OLD_RUN = Path(__file__).resolve().parent / "data" / "run_1542703"
OLD_DEMO_ROOT = "/tmp/old1542703-demo"  # where the demo was when the folder was written
RECIPES = ["base", "r2-vision-only"]
N_SAMPLES = 12  # the demo's dataset (conftest.py)


def _old_run(demo: dict, tmp_path: Path) -> Path:
    """A copy of the old run folder whose recorded paths name this session's demo."""
    run_dir = tmp_path / "old-run"
    shutil.copytree(OLD_RUN, run_dir)
    for path in run_dir.rglob("*.json"):
        path.write_text(path.read_text().replace(OLD_DEMO_ROOT, str(demo["root"])))
    return run_dir


def _recipes(demo: dict, folder: Path) -> Path:
    """The recipe file the old run was started with (batch size 1), for this session's demo."""
    return write_recipes(folder, demo_recipes(demo["root"] / "models", RECIPES), demo, batch_size=1)


def test_an_old_run_folder_is_read_with_its_rows_typed(demo: dict, tmp_path: Path) -> None:
    summary = load_run(_old_run(demo, tmp_path))
    assert [row.name for row in summary.recipes] == RECIPES
    base, second = summary.recipes
    assert (base.status, second.status) == (Status.OK, Status.INTERRUPTED)
    assert base.iou_rule == second.iou_rule == IouRule.AT_LEAST
    assert base.metrics is not None and base.metrics["n"] == N_SAMPLES
    assert second.metrics is not None and 0 < second.metrics["n"] < N_SAMPLES
    assert summary.baseline == "base" and summary.best == "base"


def test_an_old_run_folder_is_reported_without_changing_it(demo: dict, tmp_path: Path) -> None:
    run_dir = _old_run(demo, tmp_path)
    summary_before = (run_dir / "summary.json").read_bytes()
    result = run_cli("report", str(run_dir))
    assert result.returncode == 1, result.stdout + result.stderr  # a recipe did not finish: exit 1, as recorded
    assert "r2-vision-only: interrupted: stopped by the user" in result.stdout
    html = (run_dir / "report.html").read_text()
    assert all(f'id="recipe-{name}"' in html for name in RECIPES)
    assert "| base (baseline) |" in (run_dir / "report.md").read_text()
    assert (run_dir / "summary.json").read_bytes() == summary_before


def test_an_old_run_folder_is_rescored(demo: dict, tmp_path: Path) -> None:
    run_dir = _old_run(demo, tmp_path)
    result = run_cli("rescore", str(run_dir), "--thresholds", "0.3,0.5")
    assert result.returncode == 1, result.stdout + result.stderr  # still a recipe that did not finish
    rescored = only_run_dir_named(run_dir, "rescore-")
    summary = json.loads((rescored / "summary.json").read_text())
    assert [row["name"] for row in summary["recipes"]] == RECIPES
    for row in summary["recipes"]:
        assert {"iou_ge_0.3", "iou_ge_0.5"} <= set(row["metrics"]) and row["iou_rule"] == ">="
        assert row["rescore"]["thresholds"] == [0.3, 0.5]
        recipe_summary = json.loads((rescored / row["name"] / "summary.json").read_text())
        assert recipe_summary["metrics"] == row["metrics"] and "hello" in recipe_summary  # the worker's record kept
    assert load_run(rescored).recipes[1].status == Status.INTERRUPTED


def test_an_old_run_is_resumed_only_from_scratch_as_it_recorded_too_little(demo: dict, tmp_path: Path) -> None:
    """1542703 recorded neither the side files' fingerprints nor what each sample depends on: a resume cannot tell
    whether they changed, so it is refused, naming why (and nothing is touched); with --force each recipe is
    evaluated again from scratch, its old files set aside, and the run ends whole."""
    run_dir = _old_run(demo, tmp_path)
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    recipes = _recipes(demo, tmp_path)
    refused = run_cli("run", str(recipes), "--device", "cpu", "--resume", str(run_dir))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    said = " ".join(refused.stderr.split())
    for name in RECIPES:
        assert f"recipe '{name}': {demo['root'] / 'models' / name}: its processor, tokenizer, chat template or " \
               "generation config were not fingerprinted when the run started" in said
        assert f"recipe '{name}': its samples were recorded without what each depends on" in said
    assert "weights changed" not in said  # the same builder and seed: the same weights
    assert {path: path.read_bytes() for path in before} == before  # (the folder's lock file aside)

    forced = run_cli("run", str(recipes), "--device", "cpu", "--resume", str(run_dir), "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    summary = load_run(run_dir)
    assert [(row.name, row.status) for row in summary.recipes] == [(name, Status.OK) for name in RECIPES]
    for name in RECIPES:
        ids = [s["id"] for s in read_samples(run_dir / name / "samples.jsonl")]
        assert len(set(ids)) == len(ids) == N_SAMPLES
        aside = list((run_dir / REPLACED).glob(f"*/{name}/samples.jsonl"))
        assert len(aside) == 1 and aside[0].read_bytes() == before[run_dir / name / "samples.jsonl"]


@pytest.fixture(scope="module")
def todays_run(demo: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as today's code writes it: the same two recipes, four samples each."""
    folder = tmp_path_factory.mktemp("today")
    recipes = write_recipes(folder, demo_recipes(demo["root"] / "models", RECIPES), demo, batch_size=2, limit=4)
    result = run_cli("run", str(recipes), "--out", str(folder / "runs"), "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    return only_run_dir(folder / "runs")


def test_todays_run_folder_is_read_reported_rescored_and_resumed(todays_run: Path, tmp_path: Path,
                                                                demo: dict) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(todays_run, run_dir)
    summary = load_run(run_dir)
    assert [(row.name, row.status) for row in summary.recipes] == [(name, Status.OK) for name in RECIPES]
    assert run_cli("report", str(run_dir)).returncode == 0
    assert run_cli("rescore", str(run_dir), "--iou-rule", ">").returncode == 0
    rescored = load_run(only_run_dir_named(run_dir, "rescore-"))
    assert all(row.iou_rule == IouRule.ABOVE and "iou_gt_0.5" in (row.metrics or {}) for row in rescored.recipes)
    recipes = write_recipes(tmp_path, demo_recipes(demo["root"] / "models", RECIPES), demo, batch_size=2, limit=4)
    before = {name: (run_dir / name / "samples.jsonl").read_bytes() for name in RECIPES}
    result = run_cli("run", str(recipes), "--device", "cpu", "--resume", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert {name: (run_dir / name / "samples.jsonl").read_bytes() for name in RECIPES} == before  # both kept


def test_todays_files_hold_every_key_the_old_ones_did(todays_run: Path) -> None:
    """A reader written for 1542703's summary.json files finds each key it read there (no key renamed or lost)."""
    old, new = json.loads((OLD_RUN / "summary.json").read_text()), json.loads((todays_run / "summary.json").read_text())
    assert set(old) <= set(new)
    assert all(set(old["recipes"][0]) <= set(row) for row in new["recipes"])
    old_recipe = json.loads((OLD_RUN / "base" / "summary.json").read_text())
    for name in RECIPES:
        assert set(old_recipe) <= set(json.loads((todays_run / name / "summary.json").read_text()))


def only_run_dir_named(run_dir: Path, prefix: str) -> Path:
    found = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(prefix)]
    assert len(found) == 1, found
    return found[0]
