"""Sample errors count: above a recipe's `max_sample_errors` (a count or a fraction; 0 by default) the recipe
fails, its metrics still computed and shown, marked in the table, the reports and JUnit, and the run exits 1; a
recipe with no scored sample always fails. A broken data mount never passes CI green."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers import only_run_dir, run_cli, write_recipes

from contract.run_row import RecipeRow, Status
from orchestrator.planning.recipes import RecipeFileError, load_recipe_file
from orchestrator.reporting.cells import status_text
from orchestrator.results.stats import sample_error_verdict


def _samples(scored: int, errored: int) -> list[dict]:
    ok = [{"id": f"s{i}", "status": "ok", "iou": 0.5, "detected": True} for i in range(scored)]
    bad = [{"id": f"e{i}", "status": "error", "error": f"image e{i}.png: not found"} for i in range(errored)]
    return ok + bad


@pytest.mark.parametrize(("scored", "errored", "limit", "passed", "allowed"), [
    (10, 0, 0, True, 0),
    (9, 1, 0, False, 0),
    (8, 2, 2, True, 2),
    (7, 3, 2, False, 2),
    (75, 25, 0.25, True, 25),  # a fraction of the samples, the limit included
    (74, 26, 0.25, False, 25),
    (9, 1, 0.05, False, 0),  # 5% of 10 is no whole sample
    (0, 5, 100, False, 100),  # nothing scored: fails whatever the limit
    (0, 0, 100, False, 100),  # nothing read at all
])
def test_the_verdict_counts_errored_samples_against_the_limit(scored: int, errored: int, limit: int | float,
                                                              passed: bool, allowed: int) -> None:
    verdict = sample_error_verdict(_samples(scored, errored), limit)
    assert verdict["passed"] is passed and verdict["allowed"] == allowed
    assert verdict["errors"] == errored and verdict["samples"] == scored + errored
    assert (verdict["problem"] is None) is passed
    assert [e["id"] for e in verdict["first"]] == [f"e{i}" for i in range(min(errored, 3))]
    if not scored:
        assert verdict["problem"].startswith("no sample was scored")


def test_max_sample_errors_takes_a_count_or_a_fraction(tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_text("")
    (tmp_path / "model").mkdir()
    path = tmp_path / "r.toml"
    path.write_text('[defaults]\ndataset = "data.jsonl"\nmax_sample_errors = 0.02\n'
                    '[[recipe]]\nname = "a"\nmodel = "model"\n[[recipe]]\nname = "b"\nmodel = "model"\n'
                    "max_sample_errors = 5\n")
    assert [r.max_sample_errors for r in load_recipe_file(path).recipes] == [0.02, 5]
    path.write_text('[defaults]\ndataset = "data.jsonl"\n'
                    '[[recipe]]\nname = "a"\nmodel = "model"\nmax_sample_errors = 1.5\n'
                    '[[recipe]]\nname = "b"\nmodel = "model"\nmax_sample_errors = -1\n'
                    '[[recipe]]\nname = "c"\nmodel = "model"\nmax_sample_errors = "some"\n')
    with pytest.raises(RecipeFileError) as info:
        load_recipe_file(path)
    assert info.value.problems == [
        "recipe 'a' (#1), field 'max_sample_errors': a fraction must lie between 0 and 1 (0.02: 2% of the samples); "
        "for a count, give a whole number, got 1.5",
        "recipe 'b' (#2), field 'max_sample_errors': must be a count of samples (0 or more) or a fraction between 0 "
        "and 1, got -1",
        "recipe 'c' (#3), field 'max_sample_errors': expected a number, got 'some'",
    ]


def test_the_status_says_how_many_errored_and_how_many_were_allowed() -> None:
    failing = RecipeRow(name="r", status=Status.SAMPLE_ERRORS, metrics={"errors": 4},
                        sample_errors=sample_error_verdict(_samples(6, 4), 1))
    assert status_text(failing) == "failed: 4 of 10 samples errored (1 allowed)"
    nothing = RecipeRow(name="r", status=Status.SAMPLE_ERRORS, metrics={"errors": 3},
                        sample_errors=sample_error_verdict(_samples(0, 3), 0))
    assert status_text(nothing) == "failed: no sample scored (3 errored)"
    assert status_text(RecipeRow(name="r", status=Status.OK, metrics={"errors": 1})) == "ok, 1 sample error(s)"


@pytest.fixture(scope="module")
def broken_mount(demo: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A dataset whose every image is missing (a data mount that is not there), and one with one image missing
    in three, under a count and under a fraction that allow it."""
    folder = tmp_path_factory.mktemp("broken-mount")
    data = folder / "data"
    shutil.copytree(Path(demo["dataset"]).parent, data)
    lines = (data / "grounding.jsonl").read_text().splitlines()[:3]
    (data / "gone.jsonl").write_text("".join(line.replace("images/", "/mnt/unmounted/") + "\n" for line in lines))
    lines[2] = lines[2].replace(".png", "-missing.png")
    (data / "one-missing.jsonl").write_text("\n".join(lines) + "\n")
    models = demo["root"] / "models"
    body = (f'[[recipe]]\nname = "under-a-count"\nmodel = "{models}/base"\ndataset = "{data}/one-missing.jsonl"\n'
            "max_sample_errors = 1\n"
            f'[[recipe]]\nname = "unmounted"\nmodel = "{models}/base"\ndataset = "{data}/gone.jsonl"\n'
            "max_sample_errors = 0.5\n"
            f'[[recipe]]\nname = "under-a-fraction"\nmodel = "{models}/base"\n'
            f'dataset = "{data}/one-missing.jsonl"\nmax_sample_errors = 0.34\n')
    recipes = write_recipes(folder, body, demo, batch_size=3, max_new_tokens=4)
    result = run_cli("run", str(recipes), "--out", str(folder / "runs"), "--device", "cpu",
                     "--junit", str(folder / "junit.xml"))
    run_dir = only_run_dir(folder / "runs")
    rows = {r["name"]: r for r in json.loads((run_dir / "summary.json").read_text())["recipes"]}
    return {"result": result, "rows": rows, "run_dir": run_dir, "junit": folder / "junit.xml"}


def test_a_dataset_whose_every_image_is_missing_fails_the_run(broken_mount: dict) -> None:
    result, row = broken_mount["result"], broken_mount["rows"]["unmounted"]
    assert result.returncode == 1, result.stdout + result.stderr
    assert row["status"] == "sample_errors" and row["metrics"]["n"] == 0 and row["metrics"]["errors"] == 3
    assert row["detail"].startswith("no sample was scored (3 errored). First: ")
    assert "/mnt/unmounted/" in row["detail"]
    table = "".join(result.stdout.split())
    assert "│failed:nosamplescored(3│" in table and "unmounted:sample_errors:nosamplewasscored" in table
    cases = {c.get("name"): c for c in ET.parse(broken_mount["junit"]).getroot().iter("testcase")}
    failure = cases["unmounted"].find("failure")
    assert failure is not None and failure.get("type") == "sample_errors"
    assert "no sample was scored" in failure.get("message")
    assert cases["under-a-count"].find("failure") is None
    report = (broken_mount["run_dir"] / "report.md").read_text()
    assert "unmounted: sample_errors: no sample was scored (3 errored)" in report


def test_a_few_missing_images_within_the_limit_pass_with_their_count_shown(broken_mount: dict) -> None:
    for name in ("under-a-count", "under-a-fraction"):  # 1 of 3: a count of 1, and 34% of 3 (1.02) allow it
        row = broken_mount["rows"][name]
        assert row["status"] == "ok", row
        assert row["metrics"]["n"] == 2 and row["metrics"]["errors"] == 1
        assert row["sample_errors"] == {**row["sample_errors"], "passed": True, "allowed": 1, "errors": 1}
    assert broken_mount["rows"]["under-a-count"]["sample_errors"]["first"][0]["id"] == "s002"
    assert "ok, 1 sample error(s)" in broken_mount["result"].stdout


def test_report_and_its_gates_read_the_recorded_verdict(broken_mount: dict, tmp_path: Path) -> None:
    """`report` re-renders from the run folder alone: the same verdict, the same exit code."""
    run_dir = tmp_path / "copy"
    shutil.copytree(broken_mount["run_dir"], run_dir)
    result = run_cli("report", str(run_dir), "--fail-under", "mean_iou=0")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "unmounted: --fail-under mean_iou=0 not checked (sample_errors)" in result.stdout
