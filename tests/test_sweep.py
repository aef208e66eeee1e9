"""Sweeping a training run's checkpoints (`checkpoints` in a recipe): one recipe per checkpoint-N/ and one for the
final adapter at the output folder's root, each evaluated as a recipe of its own through `python -m orchestrator`,
then the metric against the training step in the terminal, report.md and report.html, and `history` over two runs.

The run is built offline with the real libraries (tools/make_frameworks.py checkpoint_sweep: peft's
save_pretrained, the processor, transformers' TrainerState) from the committed demo family, whose trained LoRA
scaled by step stands in for training that goes past its best point; ms-swift's layout from the same builders as
tests/test_frameworks.py. What transformers' Trainer and ms-swift write: orchestrator/planning/sweep.py."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import pytest
from helpers import RECIPES, ROOT, make_run, only_run_dir, recipe_samples, run_cli
from PIL import Image

from contract.nvml import FAKE_ENV, write_fake_nvml
from contract.run_row import RunSummary, Status
from orchestrator.gpu.memory import read_workload
from orchestrator.planning.plan import make_plans
from orchestrator.planning.recipes import RecipeFileError, load_recipe_file
from orchestrator.reporting.history import read_history
from orchestrator.results.stats import paired_comparison
from orchestrator.results.store import read_samples
from tools import make_frameworks as frameworks
from tools.screenshot_report import find_browser, screenshot

FAMILY = ROOT / "examples" / "demo-family"
STEPS = (100, 200, 300)
SWEPT = ["lora@100", "lora@200", "lora@300", "lora@final"]


def _recipes(folder: Path, body: str, **defaults: object) -> Path:
    settings = {"dataset": str(FAMILY / "data" / "heldout.jsonl"), "prompt": "{prompt} Answer with its bounding box.",
                "box_format": "qwen2vl", "max_new_tokens": 32, "batch_size": 8, "limit": 16, **defaults}
    lines = ["[defaults]", *(f"{key} = {json.dumps(value)}" for key, value in settings.items())]
    path = folder / "recipes.toml"
    path.write_text("\n".join(lines) + "\n" + body)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training output folder: checkpoint-100/, -200/, -300/ and the final adapter at its root, each with the
    processor and trainer_state.json (an eval loss every 50 steps)."""
    root = tmp_path_factory.mktemp("sweep")
    return frameworks.checkpoint_sweep(FAMILY / "base", FAMILY / "r1-llm-only", root / "out", steps=STEPS)


SWEEP_FILE = f'[[recipe]]\nname = "base"\nmodel = "{FAMILY / "base"}"\nbaseline = true\n' \
             '[[recipe]]\nname = "lora"\nmodel = "{out}"\ncheckpoints = "all"\n'


# ----------------------------------------------------------------------------- one recipe per checkpoint


def test_a_sweep_is_one_recipe_per_checkpoint_named_by_its_step(trained: Path, tmp_path: Path) -> None:
    recipe_file = load_recipe_file(_recipes(tmp_path, SWEEP_FILE.format(out=trained)))
    assert [r.name for r in recipe_file.recipes] == ["base", *SWEPT]
    models = {r.name: Path(r.model) for r in recipe_file.recipes}
    assert [models[name] for name in SWEPT] == [*(trained / f"checkpoint-{s}" for s in STEPS), trained]
    assert all(r.checkpoints is None for r in recipe_file.recipes)  # each is a plain recipe now
    records = recipe_file.checkpoints
    assert set(records) == set(SWEPT)
    state = json.loads((trained / "checkpoint-200" / "trainer_state.json").read_text())
    losses = {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e}
    assert records["lora@200"].step == 200 and records["lora@200"].eval_losses == losses
    final_state = json.loads((trained / "trainer_state.json").read_text())
    assert records["lora@final"].step == final_state["global_step"] and records["lora@final"].label == "final"
    # each plan carries its record, which its row will hold
    plans = make_plans(recipe_file, recipe_file.recipes)
    assert all(p.runnable for p in plans), [p.problem for p in plans]
    assert [p.checkpoint.label if p.checkpoint else None for p in plans] == [None, "100", "200", "300", "final"]


@pytest.mark.parametrize(("setting", "names"), [('"last"', ["lora@300"]),
                                                ('[300, "final", 100]', ["lora@100", "lora@300", "lora@final"])])
def test_last_or_a_list_of_steps_picks_those_checkpoints_in_training_order(trained: Path, tmp_path: Path, setting: str,
                                                                           names: list[str]) -> None:
    body = f'[[recipe]]\nname = "lora"\nmodel = "{trained}"\ncheckpoints = {setting}\n'
    assert [r.name for r in load_recipe_file(_recipes(tmp_path, body)).recipes] == names


def test_a_root_with_configs_but_no_weights_yet_is_no_final_model(trained: Path, tmp_path: Path) -> None:
    """axolotl writes adapter_config.json and config.json into output_dir before training starts (train.py
    save_initial_configs); the final adapter's weights come when it ends. Meanwhile the checkpoints are the sweep."""
    running = tmp_path / "running"
    shutil.copytree(trained, running)
    (running / "adapter_model.safetensors").unlink()
    shutil.copy(FAMILY / "base" / "config.json", running / "config.json")
    body = f'[[recipe]]\nname = "lora"\nmodel = "{running}"\ncheckpoints = "all"\n'
    assert [r.name for r in load_recipe_file(_recipes(tmp_path, body)).recipes] == SWEPT[:3]
    with pytest.raises(RecipeFileError) as caught:
        load_recipe_file(_recipes(tmp_path, body.replace('"all"', '["final"]')))
    assert "no checkpoint final in" in str(caught.value) and "and the final model" not in str(caught.value)


def test_without_checkpoints_the_output_folder_is_its_final_adapter(trained: Path, tmp_path: Path) -> None:
    body = f'[[recipe]]\nname = "lora"\nmodel = "{trained}"\n'
    recipe_file = load_recipe_file(_recipes(tmp_path, body))
    assert [(r.name, r.model) for r in recipe_file.recipes] == [("lora", str(trained))]
    assert recipe_file.checkpoints == {}


def test_what_a_sweep_cannot_do_is_said_for_every_recipe_at_once(trained: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    body = (f'[[recipe]]\nname = "unknown-step"\nmodel = "{trained}"\ncheckpoints = [100, 150, 250]\n'
            f'[[recipe]]\nname = "nothing"\nmodel = "{empty}"\ncheckpoints = "all"\n'
            f'[[recipe]]\nname = "hub"\nmodel = "acme/tiny-vl"\ncheckpoints = "last"\n'
            f'[[recipe]]\nname = "base-line"\nmodel = "{trained}"\ncheckpoints = "all"\nbaseline = true\n'
            f'[[recipe]]\nname = "twice"\nmodel = "{trained}"\ncheckpoints = [100, 100]\n'
            f'[[recipe]]\nname = "mine@100"\nmodel = "{trained / "checkpoint-100"}"\n')
    path = _recipes(tmp_path, body)
    with pytest.raises(RecipeFileError) as caught:
        load_recipe_file(path)
    problems = caught.value.problems
    assert len(problems) == 6, problems
    unknown = next(p for p in problems if "'unknown-step'" in p)
    assert "field 'checkpoints'" in unknown and "no checkpoint 150, 250" in unknown
    assert "checkpoint-100, checkpoint-200, checkpoint-300 and the final model at its root" in unknown
    assert "nothing to sweep" in next(p for p in problems if "'nothing'" in p)
    assert "not a folder here" in next(p for p in problems if "'hub'" in p)
    assert "one baseline" in next(p for p in problems if "'base-line'" in p)
    assert "listed twice" in next(p for p in problems if "'twice'" in p)
    assert "'@' names a swept checkpoint" in next(p for p in problems if "'mine@100'" in p)
    # the command line says the same, as a usage error, without a traceback
    result = run_cli("plan", str(path), "--device", "cpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "no checkpoint 150, 250" in result.stderr


def _swift_output(base: Path, out: Path, run: str = frameworks.SWIFT_RUN) -> Path:
    """ms-swift's output/<run>/checkpoint-2/ and checkpoint-4/ (each with args.json and trainer_state.json, no
    processor): the builder's checkpoint, saved again at step 4."""
    built = frameworks.swift_checkpoint(base, out / "build", recorded_base=str(base), model_arg=str(base))
    target = out / "output" / run
    shutil.copytree(built.parent, target)
    shutil.copytree(target / "checkpoint-2", target / "checkpoint-4")
    frameworks.trainer_state(target / "checkpoint-4", 4, {2: 1.0, 4: 0.8})
    shutil.rmtree(out / "build")
    return out / "output"


def test_an_ms_swift_output_folder_is_swept_through_its_run_folder(tmp_path: Path) -> None:
    output = _swift_output(FAMILY / "base", tmp_path / "swift")
    body = f'[[recipe]]\nname = "swift"\nmodel = "{output}"\ncheckpoints = "all"\n'
    path = _recipes(tmp_path, body)
    recipe_file = load_recipe_file(path)
    run = output / frameworks.SWIFT_RUN
    assert [(r.name, Path(r.model)) for r in recipe_file.recipes] == [("swift@2", run / "checkpoint-2"),
                                                                     ("swift@4", run / "checkpoint-4")]
    assert recipe_file.checkpoints["swift@4"].eval_losses == {2: 1.0, 4: 0.8}
    plans = make_plans(recipe_file, recipe_file.recipes)
    assert all(p.runnable for p in plans), [p.problem for p in plans]
    assert all(p.processor and p.processor.which.startswith("the base's") for p in plans)  # ms-swift saves none
    # without `checkpoints`, the output folder is no model: the error says how to sweep it
    (tmp_path / "plain").mkdir()
    plain = _recipes(tmp_path / "plain", f'[[recipe]]\nname = "swift"\nmodel = "{output}"\n')
    result = run_cli("plan", str(plain), "--device", "cpu")
    assert result.returncode == 1 and "set `checkpoints` in the recipe" in result.stdout, result.stdout
    # a second run folder: which one to sweep is the user's to say
    shutil.copytree(run, output / "v1-20260102-090000")
    with pytest.raises(RecipeFileError) as caught:
        load_recipe_file(path)
    assert f"2 ms-swift runs with checkpoints ({frameworks.SWIFT_RUN}, v1-20260102-090000)" in str(caught.value)


def test_plan_lists_each_checkpoint_and_only_selects_a_sweep_by_its_name(trained: Path, tmp_path: Path) -> None:
    path = _recipes(tmp_path, SWEEP_FILE.format(out=trained))
    result = run_cli("plan", str(path), "--device", "cpu", "--only", "lora")
    assert result.returncode == 0, result.stdout + result.stderr
    listed = re.findall(r"^(\S+)$", result.stdout, re.M)
    assert listed == SWEPT  # each checkpoint's lineage tree, the baseline left out
    assert "checkpoint: step 200 of sweep lora" in result.stdout
    assert "checkpoint: the final adapter (step 300) of sweep lora" in result.stdout


# ----------------------------------------------------------------------------- evaluated end to end


@pytest.fixture(scope="module")
def swept_runs(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The sweep and its baseline run twice into one runs folder, as a nightly job would."""
    root = tmp_path_factory.mktemp("sweep-runs")
    recipes = _recipes(root, SWEEP_FILE.format(out=trained))
    out = root / "runs"
    results = []
    for _ in range(2):
        result = run_cli("run", str(recipes), "--out", str(out), "--device", "cpu")
        assert result.returncode == 0, result.stdout + result.stderr
        results.append(result)
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(runs) == 2
    return {"out": out, "run_dir": runs[0], "result": results[0]}


def test_each_checkpoint_is_a_row_of_its_own(swept_runs: dict, trained: Path) -> None:
    run_dir = swept_runs["run_dir"]
    summary = RunSummary.model_validate_json((run_dir / "summary.json").read_text())
    assert [row.name for row in summary.recipes] == ["base", *SWEPT]
    for name, folder in zip(SWEPT, [*(trained / f"checkpoint-{s}" for s in STEPS), trained], strict=True):
        row = summary.row(name)
        assert row is not None and row.status is Status.OK and row.metrics and row.metrics["n"] == 16
        assert row.lineage[-1]["path"] == str(folder) and row.lineage[-1]["kind"] == "adapter"  # its own weights
        assert row.checkpoint is not None and row.checkpoint.sweep == "lora"
        assert (run_dir / name / "samples.jsonl").is_file()
    # the workers of the checkpoints after the first were started ahead, while the one before ran
    for name in SWEPT[1:]:
        assert json.loads((run_dir / name / "summary.json").read_text())["ready"] is not None, name


def test_the_sweep_is_the_metric_by_step_with_the_best_paired_against_the_last(swept_runs: dict) -> None:
    run_dir = swept_runs["run_dir"]
    summary = RunSummary.model_validate_json((run_dir / "summary.json").read_text())
    (sweep,) = summary.sweeps
    assert [p.recipe for p in sweep.points] == SWEPT and [p.step for p in sweep.points] == [*STEPS, STEPS[-1]]
    rows = {row.name: row for row in summary.recipes}
    assert [p.mean_iou for p in sweep.points] == [rows[name].mean_iou for name in SWEPT]
    assert all(p.interval == (rows[p.recipe].intervals or {})["mean_iou"] for p in sweep.points)
    best = max(reversed(sweep.points), key=lambda p: p.mean_iou or 0.0)
    assert sweep.best == best.recipe and sweep.last == "lora@final"
    samples = {name: read_samples(run_dir / name / "samples.jsonl") for name in (sweep.best, sweep.last)}
    expected = None if sweep.best == sweep.last else paired_comparison(samples[sweep.best], samples[sweep.last])
    assert sweep.best_vs_last == expected
    record = rows["lora@final"].checkpoint
    assert record is not None
    state = json.loads((Path(record.output_dir) / "trainer_state.json").read_text())
    assert sweep.eval_losses == {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e}
    assert [p.eval_loss for p in sweep.points] == [sweep.eval_losses[s] for s in [*STEPS, STEPS[-1]]]
    # the same in the terminal and report.md
    stdout = re.sub(r"\s+", " ", swept_runs["result"].stdout)
    assert "lora: mean IoU by training step" in stdout and f"Best checkpoint of lora: {sweep.best}" in stdout
    report = (run_dir / "report.md").read_text()
    section = report.split("## Checkpoint sweeps", 1)[1].split("\n## ", 1)[0]
    assert "### lora: mean IoU by training step" in section
    for point in sweep.points:
        line = next(line for line in section.splitlines() if line.startswith(f"| {point.step} | {point.recipe}"))
        assert f"{point.mean_iou:.4f}" in line and f"{point.eval_loss:.4f}" in line
    if sweep.best == sweep.last:
        assert "it is the last one" in section
    else:
        ahead = expected is not None and expected["verdict"] == "better"
        assert ("clearly ahead of the last" if ahead else "not clearly ahead of the last") in section


def test_report_html_draws_the_metric_against_the_step(swept_runs: dict) -> None:
    page = (swept_runs["run_dir"] / "report.html").read_text()
    section = page.split("<h2>Checkpoint sweeps</h2>", 1)[1].split("</section>", 1)[0]
    chart = re.search(r'alt="mean IoU of each checkpoint of lora by training step" src="data:image/png;base64,([^"]+)"',
                      section)
    assert chart is not None
    with Image.open(io.BytesIO(base64.b64decode(chart[1]))) as image:
        assert image.size[0] >= 600 and len(image.convert("RGB").getcolors(1 << 20) or []) > 20  # a drawn chart
    assert all(f'href="#recipe-{name.replace("@", "_")}"' in section for name in SWEPT)  # rows link to each section


@pytest.mark.skipif(find_browser() is None, reason="no Chromium here (apt-get install -y chromium)")
def test_the_sweep_chart_renders_in_headless_chromium(swept_runs: dict, tmp_path: Path) -> None:
    shot = screenshot(swept_runs["run_dir"] / "report.html", tmp_path / "report.png", (1400, 2400))
    with Image.open(shot) as image:
        colours = image.convert("RGB").resize((140, 240)).getcolors(140 * 240) or []
    assert len(colours) > 20  # text, tables and charts, not a blank or an error page


def test_history_tracks_each_checkpoint_as_its_own_recipe(swept_runs: dict) -> None:
    history = read_history(swept_runs["out"])
    trends = {trend.recipe: trend for trend in history.trends}
    assert set(trends) == {"base", *SWEPT}
    for name in SWEPT:
        assert [p.status for p in trends[name].points] == [Status.OK, Status.OK]
        assert trends[name].points[1].change is not None  # the second run compared with the first, per checkpoint
    result = run_cli("history", str(swept_runs["out"]))
    assert result.returncode == 0, result.stdout + result.stderr
    markdown = (swept_runs["out"] / "history.md").read_text()
    assert all(name in markdown for name in SWEPT)


# ----------------------------------------------------------------------------- several on one GPU


def test_the_checkpoints_of_a_sweep_pack_on_one_gpu(trained: Path, tmp_path: Path) -> None:
    """On one fake GPU with room for every checkpoint at its full batch, all four are placed on it at once: each
    worker's preflight found the others beside it. Nothing keeps a sweep's workers apart."""
    recipes = _recipes(tmp_path, f'[[recipe]]\nname = "lora"\nmodel = "{trained}"\ncheckpoints = "all"\n',
                       batch_size=2, limit=4)
    recipe_file = load_recipe_file(recipes)
    plans = make_plans(recipe_file, recipe_file.recipes)
    full = max(read_workload(p.recipe, p.chain or [], "cpu").estimate(2).total_bytes for p in plans)
    fake = tmp_path / "nvml.json"
    write_fake_nvml(fake, [{"name": "Fake H100", "uuid": "GPU-fake-0", "total_bytes": 80 * 2**30,
                            "free_bytes": full * 9 // 2, "processes": []}])
    out = tmp_path / "runs"
    result = run_cli("run", str(recipes), "--out", str(out), "--device", "cpu", "--max-workers-per-gpu", "4",
                     env={FAKE_ENV: str(fake)})
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = only_run_dir(out)
    records = {name: json.loads((run_dir / name / "summary.json").read_text())["preflight"] for name in SWEPT}
    assert {record["gpu"] for record in records.values()} == {0}
    besides = {name: set(record.get("beside") or []) for name, record in records.items()}
    assert all(beside and beside <= set(SWEPT) - {name} for name, beside in besides.items()), besides


def test_a_run_folder_whose_rows_lack_their_records_still_shows_its_sweep(tmp_path: Path) -> None:
    """Rows rebuilt from samples (an interrupted run) carry no checkpoint record: the sweep is read from the names,
    the steps from the labels, the final model drawn after the last step; no eval loss is made up."""
    shifts = {"base": RECIPES["base"], "s@10": RECIPES["blind"], "s@20": RECIPES["good"], "s@final": RECIPES["same"]}
    run_dir = make_run(tmp_path, shifts)
    result = run_cli("report", str(run_dir), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = RunSummary.model_validate_json(result.stdout)
    (sweep,) = summary.sweeps
    assert [(p.label, p.step, p.eval_loss) for p in sweep.points] == [("10", 10, None), ("20", 20, None),
                                                                      ("final", None, None)]
    samples = {name: recipe_samples(shift) for name, shift in shifts.items()}
    assert sweep.best == "s@20" and sweep.last == "s@final"
    assert sweep.best_vs_last == paired_comparison(samples["s@20"], samples["s@final"])
    assert sweep.best_vs_last is not None and sweep.best_vs_last["verdict"] == "better"
    report = (run_dir / "report.md").read_text()
    assert "| - | s@final (last) |" in report and "clearly ahead of the last, s@final" in report
    assert "trainer's eval loss" not in report  # none recorded
    assert 'alt="mean IoU of each checkpoint of s by training step"' in (run_dir / "report.html").read_text()
