"""`history` on run folders made by hand (tests/helpers.py make_run): what it marks and what it refuses to
compare, fast; history.md and history.html checked structurally, and rendered in headless Chromium where one is
installed. The same command on folders made by real runs: tests/test_nightly.py."""

from __future__ import annotations

import base64
import io
import json
import os
import re
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import pytest
from helpers import RECIPES, make_run, recipe_samples, run_cli
from PIL import Image

from orchestrator.reporting.history import (
    BETTER,
    FINISHED,
    NEW_SETUP,
    NOT_A_RUN,
    NOT_COMPARED,
    UNFINISHED,
    WORSE,
    HistoryError,
    read_history,
)
from orchestrator.results.stats import sample_values
from tools.screenshot_report import find_browser, screenshot

BASE, GOOD, SAME = RECIPES["base"], RECIPES["good"], RECIPES["same"]


def _night(root: Path, day: int, recipes: dict, **options) -> Path:
    return make_run(root, recipes, name=f"202601{day:02d}T020000Z", **options)


def _marks(history, recipe: str) -> list[str | None]:
    trend = next(t for t in history.trends if t.recipe == recipe)
    return [p.change.mark if p.change else None for p in trend.points]


def _point(history, recipe: str, index: int):
    return next(t for t in history.trends if t.recipe == recipe).points[index]


def test_a_real_change_is_marked_and_noise_is_not(tmp_path: Path) -> None:
    _night(tmp_path, 1, {"base": BASE, "m": BASE, "n": BASE})
    _night(tmp_path, 2, {"base": BASE, "m": GOOD, "n": SAME})  # m improves; n moves by a pixel either way
    _night(tmp_path, 3, {"base": BASE, "m": BASE, "n": BASE})  # m falls back
    history = read_history(tmp_path / "runs")
    assert [r.state for r in history.runs] == [FINISHED] * 3
    assert _marks(history, "m") == [None, BETTER, WORSE]
    assert _marks(history, "n") == [None, "", ""]
    assert _marks(history, "base") == [None, "", ""]
    # the paired difference is the mean per-sample IoU change on the same samples, computed here from the records
    before, after = sample_values(recipe_samples(BASE)), sample_values(recipe_samples(GOOD))
    paired = _point(history, "m", 1).change.paired
    assert paired["difference"] == pytest.approx(sum(after[k] - before[k] for k in after) / len(after))
    assert paired["interval"][0] > 0 and paired["n"] == len(after)
    noise = _point(history, "n", 1).change.paired
    assert noise["interval"][0] < 0 < noise["interval"][1]


def test_changed_weights_or_settings_are_a_new_setup_not_an_improvement(tmp_path: Path) -> None:
    _night(tmp_path, 1, {"m": BASE})
    _night(tmp_path, 2, {"m": GOOD}, fingerprints={"m": "quick:retrained"})
    _night(tmp_path, 3, {"m": GOOD}, fingerprints={"m": "quick:retrained"}, settings={"m": {"max_new_tokens": 16}})
    _night(tmp_path, 4, {"m": GOOD}, fingerprints={"m": "quick:retrained"},
           settings={"m": {"max_new_tokens": 16, "cache_dir": "/elsewhere"}})  # where the cache is: no new setup
    history = read_history(tmp_path / "runs")
    assert _marks(history, "m") == [None, NEW_SETUP, NEW_SETUP, ""]
    weights = _point(history, "m", 1).change
    assert weights.paired["verdict"] == BETTER  # the jump is real, and it is another model's
    assert weights.setup == ("weights changed: full /models/m quick:m → quick:retrained",)
    settings = _point(history, "m", 2).change
    assert settings.setup == ("recipe setting max_new_tokens: 64 → 16",)  # 64: the default, not recorded in night 2


def test_runs_scored_differently_are_never_compared(tmp_path: Path) -> None:
    _night(tmp_path, 1, {"m": BASE, "r": BASE}, legacy=True)  # no rule recorded: IoU > t (iou_gt_ keys)
    _night(tmp_path, 2, {"m": GOOD, "r": GOOD}, settings={"m": {"box_format": "xyxy"}}, legacy=True,
           extra={"iou_rule": ">"})
    _night(tmp_path, 3, {"m": GOOD, "r": BASE}, settings={"m": {"box_format": "xyxy"}})  # IoU >= t, recorded
    history = read_history(tmp_path / "runs")
    box = _point(history, "m", 1).change
    assert box.mark == NOT_COMPARED and box.paired is None
    assert box.not_compared == "scored differently (box format qwen2vl → xyxy)"
    assert _point(history, "r", 1).change.mark == BETTER  # a recorded ">" is the rule a run without one used
    rule = _point(history, "r", 2).change
    assert rule.mark == NOT_COMPARED and "threshold rule > → >=" in rule.not_compared
    assert _point(history, "m", 2).change.not_compared == "scored differently (threshold rule > → >=)"


def test_threshold_rates_are_paired_with_the_rule_the_run_scored_with() -> None:
    samples = [{"id": "a", "status": "ok", "iou": 0.5, "detected": True},
               {"id": "b", "status": "ok", "iou": 0.2, "detected": False},
               {"id": "c", "status": "error", "iou": 0.0, "detected": False}]
    assert sample_values(samples, "iou_gt_0.5", ">") == {"a": 0.0, "b": 0.0}
    assert sample_values(samples, "iou_gt_0.5", ">=") == {"a": 1.0, "b": 0.0}
    assert sample_values(samples, "detection_rate") == {"a": 1.0, "b": 0.0}
    with pytest.raises(ValueError):
        sample_values(samples, "accuracy")


def test_unfinished_runs_and_other_folders_are_listed_and_skipped(tmp_path: Path) -> None:
    _night(tmp_path, 1, {"m": BASE})
    stopped = _night(tmp_path, 2, {"m": GOOD})
    (stopped / "summary.json").unlink()  # the parent was killed: no summary
    interrupted = _night(tmp_path, 3, {"m": GOOD, "k": GOOD})
    summary = json.loads((interrupted / "summary.json").read_text())
    summary["recipes"][1]["status"] = "interrupted"
    (interrupted / "summary.json").write_text(json.dumps(summary))
    adhoc = _night(tmp_path, 4, {"m": BASE}).rename(tmp_path / "runs" / "adhoc")  # a name that is no time
    day = datetime(2026, 1, 1, 12, tzinfo=UTC).timestamp()  # its run.json written between nights 1 and 2
    os.utime(adhoc / "run.json", (day, day))
    (tmp_path / "runs" / "notes").mkdir()
    (tmp_path / "runs" / "notes" / "README").write_text("not a run")
    (tmp_path / "runs" / "history.md").write_text("an old history")
    _night(tmp_path, 5, {"m": GOOD})

    history = read_history(tmp_path / "runs")
    assert [(r.name, r.state) for r in history.runs] == [
        ("20260101T020000Z", FINISHED), ("adhoc", FINISHED), ("20260102T020000Z", UNFINISHED),
        ("20260103T020000Z", UNFINISHED), ("20260105T020000Z", FINISHED), ("notes", NOT_A_RUN)]
    assert "interrupted before k finished" in history.runs[3].note
    assert "no summary.json" in history.runs[2].note
    assert [p.run for p in history.trends[0].points] == ["20260101T020000Z", "adhoc", "20260105T020000Z"]
    assert _point(history, "m", 2).change.previous == "adhoc" and _marks(history, "m") == [None, "", BETTER]


def test_last_recipes_and_metric_select_and_bad_requests_say_why(tmp_path: Path) -> None:
    for day, shift in enumerate([BASE, GOOD, BASE, GOOD], 1):
        _night(tmp_path, day, {"m": shift, "n": BASE})
    runs = tmp_path / "runs"
    last = read_history(runs, last=2, recipes=["m"], metric="iou>0.5")
    assert [r.name for r in last.finished] == ["20260103T020000Z", "20260104T020000Z"]
    assert [t.recipe for t in last.trends] == ["m"] and last.metric == "iou_ge_0.5"  # the rate at 0.5, as gates name it
    assert _marks(last, "m") == [None, BETTER]
    detection = read_history(runs, metric="detection_rate", recipes=["m"])
    assert _point(detection, "m", 1).value == 1.0 and _point(detection, "m", 1).change.paired["difference"] == 0
    with pytest.raises(HistoryError, match=r"no recipe 'x' .*recipes: m, n"):
        read_history(runs, recipes=["x"])
    with pytest.raises(HistoryError, match=r"--metric accuracy: .*mean_iou"):
        read_history(runs, metric="accuracy")
    with pytest.raises(HistoryError, match="is a run folder"):
        read_history(runs / "20260101T020000Z")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HistoryError, match="holds no run folder"):
        read_history(tmp_path / "empty")


# ------------------------------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def history_site(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Four nights and a folder that is no run, through the CLI as a user runs it."""
    root = tmp_path_factory.mktemp("history")
    _night(root, 1, {"base": BASE, "m": BASE, "n": BASE})
    _night(root, 2, {"base": BASE, "m": GOOD, "n": SAME})
    _night(root, 3, {"base": BASE, "m": BASE, "n": SAME}, fingerprints={"n": "quick:retrained"})
    _night(root, 4, {"base": BASE, "m": BASE, "n": SAME}, fingerprints={"n": "quick:retrained"},
           settings={"m": {"box_format": "xyxy"}})
    (root / "runs" / "scratch").mkdir()
    result = run_cli("history", str(root / "runs"), "--out", str(root / "site"))
    return {"root": root, "result": result, "md": root / "site" / "history.md", "html": root / "site" / "history.html"}


def test_the_history_command_prints_the_table_and_writes_both_files(history_site: dict) -> None:
    result = history_site["result"]
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "mean_iou by run" in out and "scratch" in out and "not a run" in out
    assert "▲ m, 20260102T020000Z: +" in out and "▼ m, 20260103T020000Z: -" in out
    assert "⚑ n, 20260103T020000Z:" in out and "weights changed: full /models/n quick:n → quick:retrained" in out
    assert "✕ m, 20260104T020000Z: not compared with 20260103T020000Z: scored differently" in out
    md = history_site["md"].read_text()
    assert md.startswith("# Evaluation history")
    assert re.search(r"\| `20260102T020000Z` \| 0\.\d{4} \| 0\.\d{4} ▲ \| 0\.\d{4} \|", md)  # base, m, n
    assert md.count("\n- ") == 4 and "## Marked changes" in md


class _Tags(HTMLParser):
    """Every start tag with its attributes, and whether each element that must be closed was, in order."""

    VOID = frozenset({"meta", "img", "br", "hr", "link", "input"})

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.open: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open.pop() != tag:
            self.errors.append(f"</{tag}> closes nothing open")


def test_the_history_page_is_self_contained_with_a_chart_per_recipe(history_site: dict) -> None:
    page = history_site["html"].read_text()
    parser = _Tags()
    parser.feed(page)
    assert parser.errors == [] and parser.open == []
    links = [v for _, attrs in parser.tags for k, v in attrs.items() if k in ("src", "href")]
    assert all(v.startswith(("data:image/png;base64,", "#")) for v in links), links  # nothing fetched
    charts = [attrs for tag, attrs in parser.tags if tag == "img"]
    assert [c["alt"] for c in charts] == [f"mean_iou of {r} by run" for r in ("base", "m", "n")]
    for chart in charts:
        with Image.open(io.BytesIO(base64.b64decode(chart["src"].split(",", 1)[1]))) as image:
            assert image.format == "PNG" and image.width >= 600
    ids = {attrs.get("id") for _, attrs in parser.tags}
    assert {"recipe-base", "recipe-m", "recipe-n"} <= ids
    assert "1 change(s) worse beyond noise" in page
    assert re.search(r'class="mark bad">▼ worse</span>', page)
    assert "weights changed: full /models/n quick:n → quick:retrained" in page


@pytest.mark.skipif(find_browser() is None, reason="no Chromium here (apt-get install -y chromium)")
def test_the_history_page_renders_in_headless_chromium(history_site: dict, tmp_path: Path) -> None:
    shot = screenshot(history_site["html"], tmp_path / "history.png", (1400, 2400))
    with Image.open(shot) as image:
        pixels = image.convert("RGB").resize((140, 240))
    colours = pixels.getcolors(140 * 240)
    assert len(colours) > 20  # text, tables and charts, not a blank or an error page
    reds = sum(n for n, (r, g, b) in colours if r > 180 and g < 120 and b < 120)
    assert reds > 0  # the worse mark is drawn in red
