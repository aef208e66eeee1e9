"""Recipe file validation: every problem names the file, the recipe and the field, all reported together."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_cli

from orchestrator.planning.recipes import RecipeFileError, load_recipe_file


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "data.jsonl").write_text("")
    (tmp_path / "model").mkdir()
    return tmp_path


def _problems(path: Path) -> list[str]:
    with pytest.raises(RecipeFileError) as info:
        load_recipe_file(path)
    assert str(path) in str(info.value)
    return info.value.problems


def test_a_valid_file_merges_defaults_and_makes_paths_absolute(folder: Path) -> None:
    path = folder / "r.toml"
    path.write_text('[defaults]\ndataset = "data.jsonl"\nmax_new_tokens = 10\n'
                    '[[recipe]]\nname = "a"\nmodel = "model"\nbaseline = true\n'
                    '[[recipe]]\nname = "b"\nmodel = "model"\nmax_new_tokens = 20\n')
    loaded = load_recipe_file(path)
    assert [r.max_new_tokens for r in loaded.recipes] == [10, 20]
    assert loaded.recipes[0].dataset == str(folder / "data.jsonl")
    assert loaded.recipes[0].model == str(folder / "model")
    assert loaded.baseline.name == "a"


def test_all_problems_are_reported_together_with_recipe_and_field(folder: Path) -> None:
    path = folder / "r.toml"
    path.write_text('[defaults]\ndataset = "data.jsonl"\n'
                    '[[recipe]]\nname = "a"\nmodel = "model"\nmax_new_tokens = "many"\n'
                    '[[recipe]]\nname = "b"\nmodel = "model"\ntemperature = 0.1\n'
                    '[[recipe]]\nname = "c"\nmodel = "nowhere/"\n'
                    '[[recipe]]\nname = "a"\nmodel = "model"\n'
                    '[[recipe]]\nname = "d"\nmodel = "model"\nbox_format = "yolo"\n'
                    '[[recipe]]\nmodel = "model"\n')
    problems = _problems(path)
    text = "\n".join(problems)
    assert "recipe 'a' (#1), field 'max_new_tokens': expected an integer, got 'many'" in text
    assert "recipe 'b' (#2), field 'temperature': unknown field" in text
    assert "recipe 'c' (#3), field 'model': no such directory" in text
    assert "recipe 'a' (#4), field 'name': duplicate name" in text
    assert "recipe 'd' (#5), field 'box_format'" in text
    assert "recipe '?' (#6), field 'name': required, but not set" in text
    assert len(problems) == 6


def test_missing_dataset_and_bad_defaults(folder: Path) -> None:
    path = folder / "r.toml"
    path.write_text('[defaults]\ndataset = "missing.jsonl"\n[[recipe]]\nname = "a"\nmodel = "model"\n')
    assert any("field 'dataset': file not found" in p for p in _problems(path))
    path.write_text('[defaults]\nbatch_size = 0\n[[recipe]]\nname = "a"\nmodel = "model"\n')
    assert any("[defaults], field 'batch_size'" in p for p in _problems(path))


def test_unknown_tables_bad_toml_and_empty_files(folder: Path) -> None:
    path = folder / "r.toml"
    path.write_text('[default]\ndataset = "data.jsonl"\n')
    problems = _problems(path)
    assert any("unknown table [default]" in p for p in problems)
    assert any("no [[recipe]] entries" in p for p in problems)
    path.write_text("[[recipe]\nname=")
    assert any("not valid TOML" in p for p in _problems(path))
    assert _problems(folder / "absent.toml") == ["file not found"]


def test_prompt_placeholders_names_and_baselines(folder: Path) -> None:
    path = folder / "r.toml"
    (folder / "data.jsonl").write_text('{"id": "a", "image": "a.png", "bbox": [0, 0, 1, 1], "prompt": "x", '
                                       '"colour": "red"}\n')
    path.write_text('[defaults]\ndataset = "data.jsonl"\n'
                    '[[recipe]]\nname = "a b"\nmodel = "model"\nprompt = "Find {label.__class__}"\nbaseline = true\n'
                    '[[recipe]]\nname = "c"\nmodel = "model"\nbaseline = true\nprompt = "Find {label}"\n'
                    '[[recipe]]\nname = "d"\nmodel = "model"\nprompt = "Find the {colour} one: {prompt}"\n'
                    '[[recipe]]\nname = "e"\nmodel = "model"\nbase_override = true\n')
    text = "\n".join(_problems(path))
    assert "recipe 'a b' (#1), field 'name': use letters" in text
    assert "recipe 'a b' (#1), field 'prompt': {label.__class__} is not a field name" in text
    assert "recipe 'c' (#2), field 'prompt': uses {label}, which no sample of" in text  # a field of no sample
    assert "recipe 'd'" not in text  # the dataset's own field
    assert "field 'base_override': needs 'base'" in text


def test_hub_ids_are_left_for_lineage_to_resolve(folder: Path) -> None:
    path = folder / "r.toml"
    path.write_text('[defaults]\ndataset = "data.jsonl"\n[[recipe]]\nname = "a"\nmodel = "Qwen/Qwen2-VL-2B-Instruct"\n')
    assert load_recipe_file(path).recipes[0].model == "Qwen/Qwen2-VL-2B-Instruct"


def test_messages_keep_their_brackets_on_the_command_line(folder: Path) -> None:
    """User text is never read as rich markup: `[defaults]`, `[lineage]` and `[[recipe]]` reach the user."""
    path = folder / "r.toml"
    path.write_text('[default]\ndataset = "data.jsonl"\n[defaults]\nbox_format = "yolo"\n'
                    '[[recipe]]\nname = "a"\nmodel = "model"\n')
    result = run_cli("plan", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Error:" in result.stderr and "Traceback" not in result.stderr
    assert "unknown table [default] (known: [defaults], [lineage], [[recipe]])" in result.stderr
    assert "[defaults], field 'box_format'" in result.stderr
