"""A resume is exact or refused (issue 30): after an interrupt and a change to any input (a sample's box, prompt or
image, a sample removed or added, the processor, the generation config, a setting), `--resume` gives what a fresh
run on the inputs as they are now gives, sample for sample, or refuses naming what changed; never a third outcome.
Real runs of the tiny demo family, one sample a batch so that a resumed recipe's batches cannot differ from a
fresh run's by their padding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import only_run_dir, run_cli, write_recipes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from contract.layout import REPLACED, RunFolder
from orchestrator.results.store import read_samples

NAMES = ("base", "r1-llm-only")
BODY = "".join(f'[[recipe]]\nname = "{n}"\nmodel = "{{models}}/{n}"\n' for n in NAMES)


def _copy_of_demo(demo: dict, folder: Path) -> dict:
    """The demo's models and data under `folder`, free to edit, and a recipe file over them."""
    shutil.copytree(demo["root"] / "models", folder / "models")
    shutil.copytree(Path(demo["dataset"]).parent, folder / "data")
    copy = {"root": folder, "dataset": folder / "data" / Path(demo["dataset"]).name}
    copy["recipes"] = write_recipes(folder, BODY.format(models=folder / "models"), copy, batch_size=1,
                                    max_new_tokens=6)
    return copy


def _run(recipes: Path, *args: str) -> tuple[int, str]:
    result = run_cli("run", str(recipes), "--device", "cpu", *args)
    return result.returncode, " ".join((result.stdout + result.stderr).split())


def _outcome(run_dir: Path) -> dict:
    """What a run folder says each recipe gave: every sample's status, text and IoU, and the metrics."""
    summary = json.loads(RunFolder(run_dir).summary.read_text())
    return {row["name"]: {"metrics": row["metrics"], "status": row["status"],
                          "samples": {s["id"]: (s["status"], s["text"], s["iou"], s["gt"])
                                      for s in read_samples(RunFolder(run_dir).recipe(row["name"]).samples)}}
            for row in summary["recipes"]}


def _interrupt(run_dir: Path, kept: dict[str, int]) -> None:
    """The folder as a killed parent leaves it: each recipe with its first `kept` records, unfinished ones
    without a summary, no run summary."""
    RunFolder(run_dir).summary.unlink()
    for name, count in kept.items():
        folder = RunFolder(run_dir).recipe(name)
        lines = folder.samples.read_bytes().splitlines(keepends=True)
        if count < len(lines):
            folder.samples.write_bytes(b"".join(lines[:count]))
            folder.summary.unlink()


def _fresh(copy: dict, folder: Path) -> dict:
    code, said = _run(copy["recipes"], "--out", str(folder))
    assert code == 0, said
    return _outcome(only_run_dir(folder))


# ----------------------------------------------------------------------------- the changes


def _lines(copy: dict) -> list[dict]:
    return [json.loads(line) for line in copy["dataset"].read_text().splitlines()]


def _write(copy: dict, lines: list[dict]) -> None:
    copy["dataset"].write_text("".join(json.dumps(line) + "\n" for line in lines))


def move_boxes(copy: dict, which: list[int]) -> None:
    lines = _lines(copy)
    for i in which:
        x1, y1, x2, y2 = lines[i]["bbox"]
        lines[i]["bbox"] = [x1 + 3, y1 + 2, x2 + 3, y2 + 2]
    _write(copy, lines)


def remove_samples(copy: dict, which: list[int]) -> None:
    _write(copy, [line for i, line in enumerate(_lines(copy)) if i not in which])


def add_a_sample(copy: dict, which: list[int]) -> None:
    lines = _lines(copy)
    _write(copy, [*lines, {**lines[which[0]], "id": "added"}])


def reword_prompts(copy: dict, which: list[int]) -> None:
    lines = _lines(copy)
    for i in which:
        lines[i]["prompt"] = "Where is it? " + lines[i]["prompt"]
    _write(copy, lines)


def repaint_images(copy: dict, which: list[int]) -> None:
    for i in which:
        path = copy["dataset"].parent / _lines(copy)[i]["image"]
        Image.open(path).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path)


def _edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def stop_normalizing(copy: dict, which: list[int]) -> None:
    """The base's image processor changed (every recipe is on that base)."""
    path = copy["root"] / "models" / "base" / "processor_config.json"
    config = json.loads(path.read_text())
    config["image_processor"]["do_normalize"] = False
    path.write_text(json.dumps(config))


def penalize_repeats(copy: dict, which: list[int]) -> None:
    _edit_json(copy["root"] / "models" / "base" / "generation_config.json", repetition_penalty=1.3)


def longer_answers(copy: dict, which: list[int]) -> None:
    copy["recipes"].write_text(copy["recipes"].read_text().replace("max_new_tokens = 6", "max_new_tokens = 7"))


SAMPLE_CHANGES = (move_boxes, remove_samples, add_a_sample, reword_prompts, repaint_images)  # resume, exactly
RECIPE_CHANGES = (stop_normalizing, penalize_repeats, longer_answers)  # refused; --force evaluates them again


# ----------------------------------------------------------------------------- the cases


@pytest.fixture()
def started(demo: dict, tmp_path: Path) -> dict:
    """A finished run of two recipes on a copy of the demo, then interrupted: base finished, r1 at 5 of 12."""
    copy = _copy_of_demo(demo, tmp_path / "demo")
    code, said = _run(copy["recipes"], "--out", str(tmp_path / "runs"))
    assert code == 0, said
    copy["run_dir"] = only_run_dir(tmp_path / "runs")
    _interrupt(copy["run_dir"], {"base": 12, "r1-llm-only": 5})
    return copy


def test_a_resume_after_boxes_were_edited_scores_them_as_a_fresh_run(started: dict, tmp_path: Path) -> None:
    move_boxes(started, [0, 1, 2, 9])  # in base's records: all four; in r1's: those recorded before the interrupt
    code, said = _run(started["recipes"], "--resume", str(started["run_dir"]))
    assert code == 0, said
    assert "recipe 'base': 4 sample(s) changed in the dataset since they were recorded: evaluated again" in said
    assert _outcome(started["run_dir"]) == _fresh(started, tmp_path / "fresh")
    kept = list((started["run_dir"] / REPLACED).glob("*/base/samples.jsonl"))
    assert len(kept) == 1 and len(read_samples(kept[0])) == 12  # what was set aside is kept, whole


def test_removed_samples_leave_every_recipe_and_its_comparisons(started: dict, tmp_path: Path) -> None:
    remove_samples(started, [3, 7])
    code, said = _run(started["recipes"], "--resume", str(started["run_dir"]))
    assert code == 0, said
    assert "recipe 'base': 2 sample(s) no longer in the dataset: left out" in said
    resumed = _outcome(started["run_dir"])
    assert {name: len(row["samples"]) for name, row in resumed.items()} == {"base": 10, "r1-llm-only": 10}
    assert resumed == _fresh(started, tmp_path / "fresh")


def test_a_processor_changed_since_is_refused_then_evaluated_again_with_force(started: dict, tmp_path: Path) -> None:
    stop_normalizing(started, [])
    code, said = _run(started["recipes"], "--resume", str(started["run_dir"]))
    assert code == 2, said
    assert "its processor, tokenizer, chat template or generation config changed" in said
    assert not (started["run_dir"] / REPLACED).exists()  # refused: nothing moved
    code, said = _run(started["recipes"], "--resume", str(started["run_dir"]), "--force")
    assert code == 0, said
    assert "recipe 'base': evaluated again from scratch (--force:" in said
    assert _outcome(started["run_dir"]) == _fresh(started, tmp_path / "fresh")


def test_resume_only_keeps_every_other_recipe(started: dict) -> None:
    code, said = _run(started["recipes"], "--resume", str(started["run_dir"]), "--only", "r1-llm-only")
    assert code == 0, said
    run_record = json.loads(RunFolder(started["run_dir"]).record.read_text())
    assert [r["name"] for r in run_record["recipes"]] == list(NAMES)
    assert list(_outcome(started["run_dir"])) == list(NAMES)
    code, said = _run(started["recipes"], "--resume", str(started["run_dir"]))  # not "new": it never left
    assert code == 0 and "is new" not in said, said


def test_samples_recorded_before_their_keys_cannot_be_compared_and_are_refused(started: dict) -> None:
    samples = RunFolder(started["run_dir"]).recipe("r1-llm-only").samples
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    samples.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "input_key"}) + "\n" for r in records))
    code, said = _run(started["recipes"], "--resume", str(started["run_dir"]))
    assert code == 2 and "recipe 'r1-llm-only': its samples were recorded without what each depends on" in said


@settings(max_examples=5, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(change=st.sampled_from(SAMPLE_CHANGES + RECIPE_CHANGES),
       which=st.lists(st.integers(0, 11), min_size=1, max_size=4, unique=True),
       kept=st.tuples(st.integers(0, 12), st.integers(0, 12)))
def test_any_change_after_any_interrupt_resumes_exactly_or_is_refused(demo: dict, tmp_path_factory, change, which,
                                                                      kept: tuple[int, int]) -> None:
    folder = tmp_path_factory.mktemp("fuzz-resume")
    copy = _copy_of_demo(demo, folder / "demo")
    code, said = _run(copy["recipes"], "--out", str(folder / "runs"))
    assert code == 0, said
    run_dir = only_run_dir(folder / "runs")
    _interrupt(run_dir, dict(zip(NAMES, kept, strict=True)))
    change(copy, which)
    code, said = _run(copy["recipes"], "--resume", str(run_dir))
    fresh = _fresh(copy, folder / "fresh")
    if code == 2:  # refused, naming what changed; --force then evaluates the changed recipes again
        assert change in RECIPE_CHANGES and "was started with other inputs" in said, said
        code, said = _run(copy["recipes"], "--resume", str(run_dir), "--force")
    assert code == 0, said
    assert _outcome(run_dir) == fresh, change.__name__
