"""The run folder as a careless or unlucky user meets it (issue 30): its files read strictly (a torn or foreign line
is named, and no figure is printed as if whole), one writer at a time, folder names taken atomically, recipe names
that cannot collide with its own files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import make_run, run_cli, write_recipes
from pydantic import ValidationError

from contract.layout import RunFolder, stamped_folder
from contract.recipe import Recipe
from orchestrator.results.folder_lock import FolderBusy, writing
from orchestrator.results.store import DamagedRunFile, read_samples, repair_samples


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")


def _damage(run_dir: Path, recipe: str, number: int, line: bytes) -> Path:
    """Line `number` (from 1) of the recipe's samples.jsonl replaced by `line`."""
    path = RunFolder(run_dir).recipe(recipe).samples
    lines = _lines(path)
    lines[number - 1] = line
    path.write_bytes(b"\n".join(lines))
    return path


@pytest.mark.parametrize("line,says", [
    (None, "not a whole JSON line"),  # None: the line's first half (a write cut short, then another appended)
    (b"[1, 2, 3]", "a JSON list where a sample record (an object) belongs"),
    (b'{"id": "s004", "text": "no score"}', "not a sample record (no status, pred, gt, iou, detected"),
])
def test_every_reader_names_a_damaged_line_and_prints_no_figure(tmp_path: Path, line: bytes | None,
                                                                says: str) -> None:
    run_dir = make_run(tmp_path)
    samples = RunFolder(run_dir).recipe("good").samples
    torn = _lines(samples)[4][:30] if line is None else line
    _damage(run_dir, "good", 5, torn)
    for command in (["report", str(run_dir)], ["rescore", str(run_dir)], ["history", str(run_dir.parent)]):
        result = run_cli(*command)
        assert result.returncode == 1, (command, result.stdout + result.stderr)
        assert f"{samples}, line 5: {says}" in " ".join(result.stderr.split()), (command, result.stderr)
        assert "Traceback" not in result.stderr and "Mean IoU" not in result.stdout, command
    with pytest.raises(DamagedRunFile, match="line 5"):  # what --resume reads before it continues a recipe
        repair_samples(samples)


def test_a_write_cut_short_at_the_end_is_left_out_and_cut_off_by_resume(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    samples = RunFolder(run_dir).recipe("good").samples
    whole = samples.read_bytes()
    samples.write_bytes(whole + b'{"id": "s020", "sta')  # a crash mid-write: no newline after it
    assert len(read_samples(samples)) == 20
    assert run_cli("report", str(run_dir)).returncode == 0
    assert len(repair_samples(samples)) == 20 and samples.read_bytes() == whole


@pytest.mark.parametrize("which", ["summary", "record"])
def test_a_truncated_json_file_is_named_not_a_traceback(tmp_path: Path, which: str) -> None:
    run_dir = make_run(tmp_path)
    folder = RunFolder(run_dir)
    if which == "record":
        folder.summary.unlink()  # report rebuilds the summary from run.json then
    path = getattr(folder, which)
    path.write_bytes(path.read_bytes()[:40])
    for command in ("report", "rescore"):
        result = run_cli(command, str(run_dir))
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"{path}: not whole JSON" in result.stderr and "Traceback" not in result.stderr


def test_a_second_writer_is_refused_naming_the_first(demo: dict, tmp_path: Path) -> None:
    recipes = write_recipes(tmp_path, f'[[recipe]]\nname = "base"\nmodel = "{demo["models"]["base"]}"\n', demo)
    run_dir = stamped_folder(tmp_path / "runs")
    with writing(RunFolder(run_dir).lock, "run (this test)"):
        result = run_cli("run", str(recipes), "--device", "cpu", "--resume", str(run_dir))
        with pytest.raises(FolderBusy, match=f"pid {os.getpid()}, run \\(this test\\)"), \
                writing(RunFolder(run_dir).lock, "another"):
            pass
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"is being written by another evalorch (pid {os.getpid()}, run (this test)" in result.stderr
    assert not RunFolder(run_dir).recipe("base").path.exists()  # nothing was evaluated


def test_a_writer_that_dies_leaves_no_lock(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    holder = ("import os, signal, sys; from pathlib import Path; from orchestrator.results.folder_lock import writing\n"
              f"with writing(Path({str(lock)!r}), 'doomed'):\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", holder], cwd=Path(__file__).parent.parent, timeout=60)
    assert done.returncode == -9 and "doomed" in lock.read_text()
    with writing(lock, "after the crash"):
        assert "after the crash" in lock.read_text()


def test_run_folders_made_at_once_are_all_different(tmp_path: Path) -> None:
    made: list[Path] = []
    barrier = threading.Barrier(12)

    def make() -> None:
        barrier.wait()
        made.append(stamped_folder(tmp_path))

    threads = [threading.Thread(target=make) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(made)) == 12 and all(folder.is_dir() for folder in made)


@pytest.mark.parametrize("name", ["summary.json", "run.json", "Report.MD", "report.html", "summary.json.tmp",
                                  "rescore-20260101T000000Z", "history.md"])
def test_a_recipe_may_not_take_a_name_of_the_run_folders_own(name: str, demo: dict, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cannot name a recipe"):
        Recipe(name=name, model="m")
    recipes = write_recipes(tmp_path, f'[[recipe]]\nname = "{name}"\nmodel = "{demo["models"]["base"]}"\n', demo)
    result = run_cli("plan", str(recipes))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"recipe '{name}' (#1), field 'name'" in result.stderr and "cannot name a recipe" in result.stderr


@pytest.mark.parametrize("field,value,says", [
    (("recipes", 0, "metrics", "mean_iou"), "high", "recipes.0.metrics.mean_iou: Input should be a valid number"),
    (("recipes", 0, "metrics"), [1, 2], "recipes.0.metrics: Input should be a valid dictionary"),
    (("recipes",), {"a": 1}, "recipes: Input should be a valid list"),
    (("recipes", 0, "name"), 5, "recipes.0.name: Input should be a valid string"),
    (("recipes", 0, "lineage"), "x", "recipes.0.lineage: Input should be a valid list"),
])
def test_a_summary_of_the_wrong_shape_is_named_by_its_field(tmp_path: Path, field: tuple, value: object,
                                                            says: str) -> None:
    run_dir = make_run(tmp_path, name="20260101T000000Z")
    make_run(tmp_path, name="20260102T000000Z")
    summary = json.loads(RunFolder(run_dir).summary.read_text())
    target = summary
    for key in field[:-1]:
        target = target[key]
    target[field[-1]] = value
    RunFolder(run_dir).summary.write_text(json.dumps(summary))
    report = run_cli("report", str(run_dir))
    assert report.returncode == 1 and "Traceback" not in report.stderr, report.stderr
    assert f"{RunFolder(run_dir).summary}: {says}" in " ".join(report.stderr.split())
    history = run_cli("history", str(tmp_path / "runs"))  # the other run is still shown; this one is named
    assert history.returncode == 0 and "Traceback" not in history.stderr, history.stdout + history.stderr
    assert "unreadable" in history.stdout
