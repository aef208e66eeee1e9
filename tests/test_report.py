"""report.md / report.html, rescore and live progress, from run folders built by hand (real files: samples.jsonl,
summaries, PNG images made with Pillow); the CLI runs in a real subprocess, no worker is launched."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import IMAGE_SIZE, RECIPES, gt_box, make_dataset, make_run, run_cli
from PIL import Image
from rich.console import Console

from contract.run_row import RecipeRow, RunSummary, Status
from orchestrator.execution.progress import LiveProgress, PlainProgress, expected_samples
from orchestrator.execution.supervisor import RecipeOutcome
from orchestrator.reporting.html import GALLERY_SIZE, GT_COLOUR, PRED_COLOUR
from orchestrator.results.store import read_samples


@pytest.fixture
def stored_run(tmp_path: Path) -> Path:
    return make_run(tmp_path, texts={("blind", 1): '<script>alert("x")</script>\x05 no box'})


def _section(html: str, recipe: str) -> str:
    start = html.index(f'<section class="recipe" id="recipe-{recipe}">')
    return html[start:html.index("</section>", start)]


def _pictures(html: str) -> dict[str, Image.Image]:
    found = re.findall(r'alt="sample ([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    return {sid: Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB") for sid, data in found}


def _colour_bbox(image: Image.Image, colour: tuple[int, int, int]) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero((np.asarray(image) == colour).all(axis=2))
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if xs.size else None


# ------------------------------------------------------------------------------------------------- report

def test_report_html_has_the_table_the_pictures_and_the_gallery(stored_run: Path) -> None:
    (stored_run / "report.md").unlink(missing_ok=True)
    summary_before = (stored_run / "summary.json").read_bytes()
    result = run_cli("report", str(stored_run))
    assert result.returncode == 0, result.stdout + result.stderr
    html = (stored_run / "report.html").read_text()
    assert '<table class="results">' in html
    for recipe in RECIPES:
        assert f'<a href="#recipe-{recipe}">' in html and f'id="recipe-{recipe}"' in html
    # every picture is embedded and is a real PNG: 1 interval chart, 1 histogram per recipe, the galleries
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(embedded) == 1 + len(RECIPES) + GALLERY_SIZE * len(RECIPES)
    for data in embedded:
        assert Image.open(io.BytesIO(base64.b64decode(data))).format == "PNG"
    assert not re.search(r'(?:src|href)="(?!data:|#)', html), "the report must not reference outside files"
    # the gallery shows each recipe's worst samples, worst first
    good = read_samples(stored_run / "good" / "samples.jsonl")
    worst = [s["id"] for s in sorted(good, key=lambda s: (s["iou"], s["id"]))[:GALLERY_SIZE]]
    section = _section(html, "good")
    assert re.findall(r"<figcaption><b>([^<]+)</b>", section) == worst
    assert "Best recipe: good" in html and "Clearly better than base" in html
    assert (stored_run / "report.md").is_file()
    assert (stored_run / "summary.json").read_bytes() == summary_before  # `report` only re-renders


def test_gallery_pictures_carry_truth_and_prediction_where_they_are(stored_run: Path) -> None:
    assert run_cli("report", str(stored_run)).returncode == 0
    html = (stored_run / "report.html").read_text()
    good, blind = _pictures(_section(html, "good")), _pictures(_section(html, "blind"))
    sid, picture = next(iter(good.items()))
    index = int(sid[1:])
    scale = picture.width / IMAGE_SIZE[0]
    assert picture.width >= 224
    truth = _colour_bbox(picture, GT_COLOUR)
    expected = [v * scale for v in gt_box(index)]
    assert truth is not None
    assert truth[:2] == pytest.approx(expected[:2], abs=2) and truth[2:] == pytest.approx(expected[2:], abs=3)
    assert _colour_bbox(picture, PRED_COLOUR) is not None
    undetected = [s for s in read_samples(stored_run / "blind" / "samples.jsonl") if not s["detected"]]
    shown = [blind[s["id"]] for s in undetected if s["id"] in blind]
    assert shown and all(_colour_bbox(p, PRED_COLOUR) is None for p in shown)  # no box: nothing red drawn
    assert all(_colour_bbox(p, GT_COLOUR) is not None for p in shown)


def test_raw_model_text_is_escaped(stored_run: Path) -> None:
    assert run_cli("report", str(stored_run)).returncode == 0
    html = (stored_run / "report.html").read_text()
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;␅ no box" in html


def test_report_md_has_intervals_and_paired_verdicts(stored_run: Path) -> None:
    assert run_cli("report", str(stored_run)).returncode == 0
    lines = (stored_run / "report.md").read_text().splitlines()
    row = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ")}
    assert re.search(r"\| 0\.\d{4} \[0\.\d{3}, 0\.\d{3}\] \|", row["good"])
    assert "better" in row["good"] and "no clear difference" in row["same"] and "worse" in row["blind"]
    assert "no clear difference" not in row["good"]
    assert row["base (baseline)"].count("difference") == 0
    assert "**Best recipe: good" in "\n".join(lines)


def _vs_baseline_cells(report_md: str) -> dict[str, tuple[str, str]]:
    """Each recipe's 'vs baseline' and 'Paired Δ' cells in report.md's table."""
    lines = [line.split("|")[1:-1] for line in report_md.splitlines() if line.startswith("| ")]
    head = [cell.strip() for cell in lines[0]]
    change, paired = head.index("vs baseline"), head.index("Paired Δ IoU vs baseline (95% CI)")
    return {cells[0].strip(): (cells[change].strip(), cells[paired].strip()) for cells in lines[1:]}


def test_the_change_relative_to_a_baseline_near_zero_is_left_out_and_the_paired_difference_kept(
        tmp_path: Path) -> None:
    """A baseline that scores almost nothing (mean IoU under MIN_BASELINE_FOR_RELATIVE) makes "+9000% over base"
    out of noise: the report leaves the relative change out, even where summary.json recorded one (a folder written
    before the rule), and gives the paired Δ; over a baseline that scores, the relative change is shown."""
    from orchestrator.results.stats import MIN_BASELINE_FOR_RELATIVE

    weak = make_run(tmp_path, {"base": lambda i: None if i % 10 else 25, "good": RECIPES["good"]}, name="weak")
    summary = json.loads((weak / "summary.json").read_text())
    base_mean = summary["recipes"][0]["metrics"]["mean_iou"]
    assert 0 < base_mean < MIN_BASELINE_FOR_RELATIVE
    summary["best_change_vs_baseline"] = summary["recipes"][1]["change_vs_baseline"] = 90.0  # as once recorded
    (weak / "summary.json").write_text(json.dumps(summary))
    result = run_cli("report", str(weak))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "over base" not in result.stdout and "Best recipe: good" in result.stdout
    assert re.search(r"paired difference \+0\.\d{4} \[\+0\.\d{3}, \+0\.\d{3}\] better", result.stdout)
    change, paired = _vs_baseline_cells((weak / "report.md").read_text())["good"]
    assert change == "" and paired.endswith("better")
    assert "over base" not in (weak / "report.html").read_text()

    scoring = make_run(tmp_path, {"base": RECIPES["base"], "good": RECIPES["good"]}, name="scoring")
    assert run_cli("report", str(scoring)).returncode == 0
    change, paired = _vs_baseline_cells((scoring / "report.md").read_text())["good"]
    assert re.fullmatch(r"\+\d+\.\d%", change) and paired.endswith("better")
    assert f"{change} over base" in (scoring / "report.md").read_text()


def test_report_rebuilds_an_interrupted_run_from_its_folders(stored_run: Path) -> None:
    (stored_run / "summary.json").unlink()
    (stored_run / "blind" / "summary.json").unlink()  # the parent died while this recipe ran
    result = run_cli("report", str(stored_run))
    assert result.returncode == 1, result.stdout + result.stderr  # a recipe did not finish
    html = (stored_run / "report.html").read_text()
    assert "incomplete" in html and 'id="recipe-blind"' in html
    assert "Best recipe: good" in html


def test_report_without_the_dataset_still_renders(stored_run: Path, tmp_path: Path) -> None:
    shutil.rmtree(tmp_path / "data")
    result = run_cli("report", str(stored_run))
    assert result.returncode == 0, result.stderr
    html = (stored_run / "report.html").read_text()
    assert html.count("image not available") == GALLERY_SIZE * len(RECIPES)


def test_report_of_a_folder_that_is_no_run_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli("report", str(tmp_path))
    assert result.returncode == 2 and "not a run folder" in result.stderr


def test_json_goes_alone_to_stdout(stored_run: Path) -> None:
    result = run_cli("report", str(stored_run), "--json")
    assert result.returncode == 0
    document = json.loads(result.stdout)  # nothing else on stdout
    assert [r["name"] for r in document["recipes"]] == list(RECIPES)
    good = next(r for r in document["recipes"] if r["name"] == "good")
    assert good["vs_baseline_paired"]["verdict"] == "better"
    assert set(good["intervals"]) == {"mean_iou", "detection_rate", "iou_ge_0.5", "iou_ge_0.7"}
    assert document["exit_code"] == 0 and document["best"] == "good"
    assert "Evaluation results" in result.stderr


def test_step_summary_is_appended(stored_run: Path, tmp_path: Path) -> None:
    target = tmp_path / "step_summary.md"
    target.write_text("earlier step\n")
    assert run_cli("report", str(stored_run), env={"GITHUB_STEP_SUMMARY": str(target)}).returncode == 0
    text = target.read_text()
    assert text.startswith("earlier step\n")
    assert "| Model | Mean IoU |" in text and "| good |" in text and "**Best recipe: good" in text


# ------------------------------------------------------------------------------------------------ rescore

def test_rescore_with_a_new_threshold_writes_a_new_folder(stored_run: Path) -> None:
    original = {p: p.read_bytes() for p in stored_run.rglob("*") if p.is_file()}
    result = run_cli("rescore", str(stored_run), "--thresholds", "0.5,0.7,0.9")
    assert result.returncode == 0, result.stdout + result.stderr
    (out,) = [p for p in stored_run.iterdir() if p.name.startswith("rescore-")]
    for path, data in original.items():
        if path.name not in ("report.md", "report.html"):
            assert path.read_bytes() == data, f"{path} changed"
    summary = json.loads((out / "summary.json").read_text())
    for row in summary["recipes"]:
        samples = read_samples(stored_run / row["name"] / "samples.jsonl")
        expected = sum(1 for s in samples if s["iou"] >= 0.9) / len(samples)
        assert row["metrics"]["iou_ge_0.9"] == pytest.approx(expected)
        assert row["metrics"]["mean_iou"] == pytest.approx(sum(s["iou"] for s in samples) / len(samples))
    assert "IoU≥0.9" in (out / "report.html").read_text()
    assert "IoU≥0.9" in (out / "report.md").read_text()


def test_rescore_recomputes_from_the_raw_text(stored_run: Path) -> None:
    path = stored_run / "good" / "samples.jsonl"
    samples = read_samples(path)
    # as an old parser that missed every box would have recorded them
    path.write_text("".join(json.dumps({**s, "pred": None, "iou": 0.0, "detected": False}) + "\n" for s in samples))
    assert run_cli("rescore", str(stored_run)).returncode == 0
    (out,) = [p for p in stored_run.iterdir() if p.name.startswith("rescore-")]
    row = next(r for r in json.loads((out / "summary.json").read_text())["recipes"] if r["name"] == "good")
    assert row["metrics"]["mean_iou"] == pytest.approx(sum(s["iou"] for s in samples) / len(samples))
    assert row["metrics"]["detection_rate"] == 1.0
    assert row["rescore"]["samples_changed"] == len(samples)
    assert [s["iou"] for s in read_samples(out / "good" / "samples.jsonl")] == [s["iou"] for s in samples]


def test_rescore_reads_the_box_format_it_is_told_never_a_guess(stored_run: Path) -> None:
    result = run_cli("rescore", str(stored_run), "--box-format", "json_pixels", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert all(r["metrics"]["detection_rate"] == 0.0 for r in document["recipes"])  # qwen2vl texts: no bbox_2d
    assert run_cli("rescore", str(stored_run), "--thresholds", "0.5,x").returncode == 2


# ----------------------------------------------------------------------------------------------- progress

def _spec(recipe_dir: Path, dataset: Path, limit: int | None, skip: list[str]) -> None:
    recipe_dir.mkdir(parents=True, exist_ok=True)
    (recipe_dir / "spec.json").write_text(json.dumps({"dataset": str(dataset), "recipe": {"limit": limit},
                                                      "skip_ids": skip}))


def test_expected_samples_counts_up_to_the_limit_less_those_recorded(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path / "data", n=10)
    _spec(tmp_path / "a", dataset, None, [])
    _spec(tmp_path / "b", dataset, 6, ["s000", "s001", "s007"])  # s007 lies past the limit
    assert expected_samples(tmp_path / "a") == 10
    assert expected_samples(tmp_path / "b") == 4
    assert expected_samples(tmp_path / "missing") is None


def _events(listener: PlainProgress | LiveProgress, run_dir: Path, names: list[str]) -> None:
    for index, name in enumerate(names):
        outcome = RecipeOutcome(name, pid=100 + index)
        listener("started", outcome, {"pid": outcome.pid})
        listener("hello", outcome, {})
        listener("loaded", outcome, {"seconds": 0.4, "dtype": "float32", "attn": "sdpa", "device": "cpu"})
        for sample in read_samples(run_dir / name / "samples.jsonl"):
            listener("sample", outcome, sample)
        outcome.status, outcome.seconds = "ok", 1.5
        listener("finished", outcome, {})


def test_plain_progress_is_a_few_lines_per_recipe(stored_run: Path, tmp_path: Path) -> None:
    for name in ("base", "good"):
        _spec(stored_run / name, tmp_path / "data" / "grounding.jsonl", 8, [])
    out = io.StringIO()
    with PlainProgress(Console(file=out, width=200), ["base", "good"], stored_run) as listener:
        _events(listener, stored_run, ["base", "good"])
    lines = out.getvalue().splitlines()
    assert lines[0] == "[1/2] base: worker pid 100 starting, 8 samples to evaluate"
    assert lines[1] == "    loaded in 0.4s (float32, sdpa, cpu)"
    assert lines[2].startswith("    base: ok, 20 samples, mean IoU 0.")
    assert lines[3].startswith("[2/2] good:") and len(lines) == 6


def test_live_progress_shows_recipe_phase_bar_and_finished_rows(stored_run: Path, tmp_path: Path) -> None:
    names = ["base", "good", "same"]
    for name in names:
        _spec(stored_run / name, tmp_path / "data" / "grounding.jsonl", None, [])
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=True, color_system=None)
    with LiveProgress(console, names, stored_run) as listener:
        _events(listener, stored_run, names[:2])
        outcome = RecipeOutcome("same", pid=7)
        listener("started", outcome, {"pid": 7})
        listener("loaded", outcome, {"seconds": 0.4, "dtype": "float32", "attn": "sdpa", "device": "cpu"})
        for sample in read_samples(stored_run / "same" / "samples.jsonl")[:5]:
            listener("sample", outcome, sample)
        Console(file=(frame := io.StringIO()), width=200, color_system=None).print(listener.render())
    shown = frame.getvalue()
    assert "Recipe 3/3 same · inferring" in shown
    assert "5/20" in shown and "samples/s" in shown and "ETA" in shown
    rows = {line.split("│")[1].strip(): line for line in shown.splitlines() if line.count("│") > 3}
    assert "ok" in rows["base"] and re.search(r"0\.\d{4}", rows["good"])
    assert "inferring" in rows["same"]
    assert "[1/3] base: ok in 1.5s" in out.getvalue()  # each finished recipe also leaves a line


def test_a_base_override_is_compared_with_the_same_adapter_on_its_recorded_base() -> None:
    """The seed's bug, measured: the overridden row is paired with the row that loads the same adapter on the
    base it records, and the report says how much the wrong base costs."""
    from orchestrator.reporting.cells import override_notes
    from orchestrator.results.summary import add_statistics

    def rows(name: str, override: bool) -> RecipeRow:
        return RecipeRow(name=name, status=Status.OK, base_override=override, metrics={"mean_iou": 0.5},
                         recipe={"model": "/m/r3-stage2"})

    summary = RunSummary(recipes=[rows("r3", False), rows("r3-wrong", True)])
    samples = {"r3": [{"id": f"s{i}", "status": "ok", "iou": 0.9, "detected": True} for i in range(30)],
               "r3-wrong": [{"id": f"s{i}", "status": "ok", "iou": 0.4, "detected": True} for i in range(30)]}
    add_statistics(summary, samples)
    paired = summary.recipes[1].vs_recorded_base_paired
    assert paired is not None and paired["against"] == "r3" and paired["difference"] == pytest.approx(-0.5)
    assert paired["verdict"] == "worse" and summary.recipes[0].vs_recorded_base_paired is None
    (note,) = override_notes(summary)
    assert note.startswith("r3-wrong loads its adapter on a base it was not trained on; against r3") and "worse" in note


def test_the_best_recipe_is_paired_with_each_other_one_so_a_win_by_noise_is_said() -> None:
    """The seed's r4 against r1/r2/r3: the best is clearly ahead of one recipe and only ahead by noise of another;
    the line says which, with each paired interval, in the terminal's and report.md's words alike."""
    from orchestrator.reporting.cells import best_versus_others_line
    from orchestrator.reporting.markdown import markdown_table
    from orchestrator.results.summary import add_statistics, run_summary

    best = [0.6 + 0.3 * (i % 2) for i in range(40)]
    ious = {"base": [0.1] * 40, "r4": best, "r1": [v - 0.2 for v in best],
            "r3": [v + (0.04 if i % 2 else -0.05) for i, v in enumerate(best)]}
    rows = [RecipeRow(name=n, status=Status.OK, metrics={"mean_iou": sum(v) / len(v)}) for n, v in ious.items()]
    summary = run_summary(rows, "base")
    samples = {n: [{"id": f"s{i}", "status": "ok", "iou": v, "detected": True} for i, v in enumerate(values)]
               for n, values in ious.items()}
    add_statistics(summary, samples)
    assert summary.best == "r4"
    versus = {c["against"]: c for c in summary.best_vs_others}
    assert set(versus) == {"r1", "r3"}  # neither the best itself nor the baseline
    assert versus["r1"]["verdict"] == "better" and versus["r1"]["difference"] == pytest.approx(0.2)
    assert versus["r3"]["verdict"] == "no clear difference"
    line = best_versus_others_line(summary)
    assert line is not None
    assert line.index("clearly ahead of r1") < line.index("not clearly ahead of r3")
    assert line in markdown_table(summary)
