"""The whole pipeline through the CLI: real subprocesses, real tiny transformers/peft models, real files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import demo_recipes, only_run_dir, run_cli, write_recipes

from orchestrator.results.store import read_samples

NAMES = ["base", "r1-llm-only", "r2-vision-only", "r3-two-stage", "r4-joint"]


@pytest.fixture(scope="module")
def demo_run(demo: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("suite")
    recipes = write_recipes(folder, demo_recipes(demo["root"] / "models", NAMES), demo)
    result = run_cli("run", str(recipes), "--out", str(folder / "runs"), "--device", "cpu")
    return {"result": result, "run_dir": only_run_dir(folder / "runs"), "recipes": recipes}


def test_the_demo_suite_prints_the_table_and_exits_0(demo_run: dict) -> None:
    result = demo_run["result"]
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for header in ("Model", "Mean IoU", "Det Rate", "IoU≥0.5", "IoU≥0.7", "vs baseline"):
        assert header in out
    for name in NAMES:
        assert name in out
    assert "Best recipe:" in out


def test_the_run_folder_holds_every_record(demo_run: dict, demo: dict) -> None:
    run_dir = demo_run["run_dir"]
    n_samples = sum(1 for line in Path(demo["dataset"]).read_text().splitlines() if line.strip())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["name"] for r in summary["recipes"]] == NAMES
    assert summary["baseline"] == "base" and summary["best"] in NAMES[1:]
    assert (run_dir / "report.md").read_text().count("|") > 30
    run_record = json.loads((run_dir / "run.json").read_text())
    assert [r["name"] for r in run_record["recipes"]] == NAMES
    for name in NAMES:
        samples = read_samples(run_dir / name / "samples.jsonl")
        assert len(samples) == n_samples
        assert {s["status"] for s in samples} == {"ok"}
        assert all(isinstance(s["text"], str) and 0.0 <= s["iou"] <= 1.0 for s in samples)
        # the demo's images are multiples of 28 within the processor's bounds: the model saw them unresized
        assert all(s["input_size"] == s["image_size"] for s in samples)
        recipe_summary = json.loads((run_dir / name / "summary.json").read_text())
        assert recipe_summary["status"] == "ok"
        assert recipe_summary["recipe"]["box_format"] == "qwen2vl"  # "auto", resolved from the demo's family
        assert recipe_summary["box_format_from"].startswith("auto: model_type 'qwen2_vl'")
        assert recipe_summary["metrics"]["n"] == n_samples
        assert recipe_summary["done"]["counts"]["scored"] == n_samples
        parity = recipe_summary["parity"]  # the first batch of 4, generated again one at a time: the same answers
        assert parity["checked"] == parity["agreed"] == 4 and parity["disagreements"] == []
        assert (run_dir / name / "worker.log").exists()


def test_each_recipe_ran_in_its_own_process(demo_run: dict) -> None:
    run_dir = demo_run["run_dir"]
    pids = [json.loads((run_dir / n / "summary.json").read_text())["hello"]["pid"] for n in NAMES]
    assert len(set(pids)) == len(NAMES)
    assert os.getpid() not in pids


def test_the_two_stage_recipe_loaded_stage_one_not_the_base(demo_run: dict, demo: dict) -> None:
    summary = json.loads((demo_run["run_dir"] / "r3-two-stage" / "summary.json").read_text())
    paths = [Path(link["path"]).name for link in summary["lineage"]]
    assert paths == ["r3-stage1", "r3-stage2"]
    assert summary["lineage"][1]["recorded_base"] == "/ssd1/team/vlm_outputs/r3-stage1"
    assert summary["lineage"][0]["source"] == "remap"


def test_outputs_differ_between_recipes(demo_run: dict) -> None:
    """The adapters and fine-tunes are real: they change what the model writes."""
    run_dir = demo_run["run_dir"]
    texts = {n: [s["text"] for s in read_samples(run_dir / n / "samples.jsonl")] for n in NAMES}
    assert len({tuple(t) for t in texts.values()}) == len(NAMES)


def test_faults_are_recorded_and_the_next_recipe_still_runs(demo: dict, tmp_path: Path) -> None:
    """A worker that raises mid-run keeps the samples it sent; garbage on stdout does not disturb the stream;
    a missing image and a bad dataset line are per-sample errors; a recipe whose base cannot be found
    is refused without stopping the others."""
    data = tmp_path / "data"
    shutil.copytree(Path(demo["dataset"]).parent, data)
    lines = (data / "grounding.jsonl").read_text().splitlines()[:6]
    lines[1] = lines[1].replace(".png", "-missing.png")
    lines.append("{this line is not json")
    (data / "grounding.jsonl").write_text("\n".join(lines) + "\n")
    models = demo["root"] / "models"
    body = (f'[[recipe]]\nname = "boom"\nmodel = "{models}/r1-llm-only"\n'
            f'[[recipe]]\nname = "lost-base"\nmodel = "{models}/r3-stage2"\n'
            f'[[recipe]]\nname = "after"\nmodel = "{models}/base"\nmax_sample_errors = 2\n')
    recipes = write_recipes(tmp_path, body, None, dataset=str(data / "grounding.jsonl"),
                            prompt="{prompt}", batch_size=2)  # no remap rule: lost-base cannot resolve
    result = run_cli("run", str(recipes), "--out", str(tmp_path / "runs"), "--device", "cpu",
                     env={"EVALORCH_FAULT": "boom:raise@sample:4,garbage-stdout"})
    assert result.returncode == 1, result.stdout + result.stderr
    run_dir = only_run_dir(tmp_path / "runs")

    boom = json.loads((run_dir / "boom" / "summary.json").read_text())
    assert boom["status"] == "error" and boom["error"]["kind"] == "internal"
    assert "fault injected at sample:4" in boom["detail"]
    kept = [s["id"] for s in read_samples(run_dir / "boom" / "samples.jsonl")]
    assert len(set(kept)) == len(kept) == 3  # the three sent before the fault

    lost = json.loads((run_dir / "lost-base" / "summary.json").read_text())
    assert lost["status"] == "error" and "/ssd1/team/vlm_outputs/r3-stage1" in lost["detail"]
    assert lost["pid"] is None  # refused before any worker started

    after = json.loads((run_dir / "after" / "summary.json").read_text())
    assert after["status"] == "ok", after["detail"]
    samples = read_samples(run_dir / "after" / "samples.jsonl")
    assert len(samples) == 7
    errors = {s["id"]: s["error"] for s in samples if s["status"] == "error"}
    assert set(errors) == {"s001", "line7"}
    assert "missing.png" in errors["s001"] and "not JSON" in errors["line7"]
    assert after["metrics"]["n"] == 5 and after["metrics"]["errors"] == 2
    assert "garbage on stdout" in (run_dir / "after" / "worker.log").read_text()
    assert "lost-base: error" in result.stdout


def test_each_worker_says_when_its_first_batch_was_ready_and_where_its_time_went(demo_run: dict) -> None:
    """The first batch's preparation in pieces (images and texts, the processor, pinning), and when it was
    ready, on the worker's clock from its first import: made after the imports, from pieces that fit in that span."""
    for name in NAMES:
        timings = json.loads((demo_run["run_dir"] / name / "summary.json").read_text())["done"]["timings"]
        pieces = [timings[f"first_batch_{piece}"] for piece in ("samples", "processor", "pin")]
        assert min(pieces) >= 0 and timings["first_batch_processor"] > 0, (name, timings)
        assert timings["first_batch_ready_at"] >= timings["hello_at"] + sum(pieces), (name, timings)
        assert timings["first_batch_ready_at"] <= timings["total"], (name, timings)


def test_a_config_error_exits_2_naming_the_field(tmp_path: Path) -> None:
    recipes = tmp_path / "recipes.toml"
    recipes.write_text('[[recipe]]\nname = "x"\nmodel = "nowhere/"\nbatch_size = -1\n')
    result = run_cli("run", str(recipes), "--out", str(tmp_path / "runs"))
    assert result.returncode == 2
    assert "recipe 'x' (#1), field 'batch_size'" in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_the_next_worker_starts_while_the_previous_recipe_runs(demo_run: dict) -> None:
    """Hidden start-up: each later worker was spawned, imported its libraries and read its weights while the
    one before it ran, and touched the device only when released."""
    run_dir = demo_run["run_dir"]
    for name in NAMES[1:]:
        summary = json.loads((run_dir / name / "summary.json").read_text())
        # spawned a whole recipe before its turn came (a worker started at its turn waits milliseconds)
        assert summary["timings"]["hidden_startup"] > 0.25, name
        assert "held" in summary["done"]["timings"] and "page_cache" in summary["done"]["timings"]
    first = json.loads((run_dir / NAMES[0] / "summary.json").read_text())
    assert "held" not in first["done"]["timings"] and first["timings"]["hidden_startup"] < 0.25
    # the first worker, with nothing to hide behind, imported the model stack while its first batch was made:
    # that batch was begun before its imports ended
    assert first["done"]["timings"]["hello_at"] < first["done"]["timings"]["imports"]
    # two recipes ahead (prestart_depth 2): the third worker was started with the second, when the first began:
    # its spawn (its turn on the device less the start-up it hid) came before the second's turn. An order of
    # events, not a margin of time: a loaded machine stretches every duration alike
    summaries = [json.loads((run_dir / n / "summary.json").read_text()) for n in NAMES]
    turns = [s["device_spans"][0][0] for s in summaries]
    spawned = [turn - s["timings"]["hidden_startup"] for turn, s in zip(turns, summaries, strict=True)]
    assert spawned[2] < turns[1] and spawned[1] < turns[1]
