"""The command line checks what it is given as strictly as the recipe file does (issue 30): the recipe schema's
own rule for a setting both take, fractions for gates and thresholds, a list that names something, a report path
that can be written; each refused before anything is evaluated, naming the option."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_run, run_cli, write_recipes

from orchestrator.planning.recipes import RecipeFileError, load_recipe_file


@pytest.fixture(scope="module")
def recipes(demo: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    return write_recipes(folder, f'[[recipe]]\nname = "base"\nmodel = "{demo["models"]["base"]}"\n', demo)


def _refused(*args: str) -> str:
    result = run_cli(*args)
    assert result.returncode == 2, (args, result.stdout + result.stderr)
    assert "Traceback" not in result.stderr
    return " ".join(result.stderr.split())


@pytest.mark.parametrize("value,says", [("nan", "greater than 0"), ("0", "greater than 0"),
                                        ("-5", "greater than 0"), ("soon", "valid number")])
def test_run_timeout_is_checked_as_a_recipes_timeout(recipes: Path, tmp_path: Path, value: str, says: str) -> None:
    said = _refused("run", str(recipes), "--device", "cpu", "--out", str(tmp_path), "--timeout", value)
    assert "'--timeout'" in said and says in said
    assert not any(tmp_path.iterdir())  # no run folder: nothing started


def test_a_list_that_names_nothing_is_refused(recipes: Path, tmp_path: Path) -> None:
    assert "--only '' names no recipe" in _refused("run", str(recipes), "--device", "cpu", "--out", str(tmp_path),
                                                   "--only", "")
    assert "--recipes ' , ' names no recipe" in _refused("history", str(tmp_path), "--recipes", " , ")


@pytest.mark.parametrize("given,says", [("nan,0.5", "must lie between 0 and 1, not nan"),
                                        ("0.5,-1", "not -1"), ("2", "not 2"), ("", "names no threshold"),
                                        ("half", "expected numbers")])
def test_rescore_thresholds_are_fractions(tmp_path: Path, given: str, says: str) -> None:
    run_dir = make_run(tmp_path)
    said = _refused("rescore", str(run_dir), "--thresholds", given)
    assert f"--thresholds {given!r}" in said and says in said
    assert not list(run_dir.glob("rescore-*"))


@pytest.mark.parametrize("rule,says", [("mean_iou=nan", "between 0 and 1, not nan"), ("mean_iou=1.5", "not 1.5"),
                                       ("mean_iou=inf", "not inf"), ("mean_iou=high", "is not a number")])
def test_gate_values_are_fractions(tmp_path: Path, rule: str, says: str) -> None:
    said = _refused("report", str(make_run(tmp_path)), "--fail-under", rule)
    assert f"--fail-under '{rule}'" in said and says in said


def test_a_junit_path_that_cannot_be_written_is_refused_before_the_run(recipes: Path, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    said = _refused("run", str(recipes), "--device", "cpu", "--out", str(tmp_path / "runs"),
                    "--junit", str(tmp_path / "a-file" / "junit.xml"))
    assert f"--junit {tmp_path / 'a-file' / 'junit.xml'}: {tmp_path / 'a-file'} is not a folder" in said
    assert not (tmp_path / "runs").exists()


def test_a_recipe_file_with_a_byte_order_mark_reads_as_without(demo: dict, tmp_path: Path) -> None:
    path = write_recipes(tmp_path, f'[[recipe]]\nname = "base"\nmodel = "{demo["models"]["base"]}"\n', demo)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [r.name for r in load_recipe_file(path).recipes] == ["base"]


def test_at_least_more_tokens_than_at_most_is_refused(demo: dict, tmp_path: Path) -> None:
    path = write_recipes(tmp_path, f'[[recipe]]\nname = "base"\nmodel = "{demo["models"]["base"]}"\n'
                                   "min_new_tokens = 40\n", demo, max_new_tokens=32)
    with pytest.raises(RecipeFileError) as info:
        load_recipe_file(path)
    assert any("recipe 'base' (#1), field 'min_new_tokens': 40 is more than max_new_tokens (32)" in p
               for p in info.value.problems), info.value.problems
