"""Recompute every metric of a stored run from the raw texts in samples.jsonl: no model, no GPU.

A parser fix or a new IoU threshold never needs a rerun. The result goes into a new folder beside the original
summary, RUN_DIR/rescore-<UTC time>/, laid out like a run folder (run.json, <recipe>/samples.jsonl and
summary.json, summary.json, report.md, report.html), so `report` and the gates work on it too; nothing of the
original run is overwritten.

Each recipe is read in its declared box format (or the one --box-format names): never guessed from the numbers,
never the better of two readings. Each sample record keeps the original image's size (`image_size`) and the size
of the image the model saw after the processor's resize (`input_size`), so every format converts without the
model. Run folders written before `input_size` was recorded rescore in every format but those in input pixels
(qwen25vl): those are refused with the reason, not recomputed from the processor files as they are today (they may
have changed since, and the resize rule differs between transformers versions).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from contract.boxes import BOX_FORMATS, InputSizeMissing, score_text
from contract.layout import RESCORE_PREFIX, RunFolder
from contract.run_row import IouRule, RecipeRow, Rescore, RunSummary
from orchestrator.errors import UserError
from orchestrator.results.stats import DEFAULT_THRESHOLDS, metrics, thresholds_of
from orchestrator.results.store import make_folder, new_folder, read_json, read_samples, write_bytes, write_json
from orchestrator.results.summary import load_run, run_summary


class RescoreError(UserError):
    """The run cannot be rescored as asked."""


def rescore(run_dir: Path, box_format: str | None = None, thresholds: Sequence[float] | None = None,
            iou_rule: str | None = None) -> tuple[Path, RunSummary]:
    """Rescore every recipe of `run_dir` into a new rescore folder; returns it and the new run summary (which
    the caller publishes: summary.json, reports). Each recipe keeps its own IoU rule unless `iou_rule` says."""
    if box_format is not None and box_format not in BOX_FORMATS:
        raise RescoreError(f"unknown box format {box_format!r}; known: {', '.join(BOX_FORMATS)}")
    if iou_rule is not None and iou_rule not in tuple(IouRule):
        raise RescoreError(f"unknown IoU rule {iou_rule!r}; known: {', '.join(IouRule)}")
    summary = load_run(run_dir)
    out = new_folder(run_dir, RESCORE_PREFIX)
    try:
        rows = [_rescore_recipe(RunFolder(run_dir), RunFolder(out), row, box_format, thresholds,
                                IouRule(iou_rule) if iou_rule is not None else None) for row in summary.recipes]
    except RescoreError:
        shutil.rmtree(out)  # our own new folder: no half rescore is left beside the run
        raise
    source = RunFolder(run_dir).record
    record = read_json(source) if source.is_file() else {}
    shown = ", ".join(f"{t:g}" for t in thresholds) if thresholds else "as recorded"
    write_json(RunFolder(out).record, {**record, "rescore_of": str(run_dir),
                                  "rescore": f"box format {box_format or 'as recorded'}, thresholds {shown}, "
                                             f"IoU rule {iou_rule or 'as recorded'}"})
    return out, run_summary(rows, summary.baseline)


def _rescore_recipe(run: RunFolder, out: RunFolder, row: RecipeRow, box_format: str | None,
                    thresholds: Sequence[float] | None, iou_rule: IouRule | None) -> RecipeRow:
    name = row.name
    fmt = box_format or (row.recipe or {}).get("box_format")
    if fmt not in BOX_FORMATS:
        raise RescoreError(f"recipe '{name}': no known box format recorded ({fmt!r}); pass --box-format")
    try:
        samples = [rescore_sample(s, fmt) for s in read_samples(run.recipe(name).samples)]
    except InputSizeMissing as exc:
        raise RescoreError(f"recipe '{name}': {exc}. Rerun the recipe to rescore it in {fmt!r}: the size of the "
                           "image the model saw is not recomputed from today's processor files") from None
    target = out.recipe(name)
    make_folder(target.path)
    write_bytes(target.samples, b"".join(orjson.dumps(s) + b"\n" for s in samples))
    used = list(thresholds or thresholds_of(row.metrics or {}) or DEFAULT_THRESHOLDS)
    changed = sum(1 for s in samples if "iou_before" in s and s["iou_before"] != s["iou"])
    rule = iou_rule or row.iou_rule
    new_row = RecipeRow.model_validate({**row.recorded(), "metrics": metrics(samples, used, rule), "iou_rule": rule})
    new_row.rescore = Rescore(box_format=fmt, thresholds=used, iou_rule=rule, samples_changed=changed)
    stored = run.recipe(name).summary
    write_json(target.summary, {**(read_json(stored) if stored.is_file() else {}), **new_row.recorded()})
    return new_row


def rescore_sample(sample: dict[str, Any], box_format: str) -> dict[str, Any]:
    """The sample scored again from its raw text and image size; an error record is kept as it was."""
    if sample.get("status") != "ok" or sample.get("text") is None or not sample.get("image_size"):
        return sample
    width, height = sample["image_size"]
    seen = sample.get("input_size")  # absent in run folders written before it was recorded
    scored = score_text(sample["text"], box_format, (int(width), int(height)), sample["gt"],
                        (int(seen[0]), int(seen[1])) if seen else None)
    return {**sample, **scored, "iou_before": sample.get("iou")}
