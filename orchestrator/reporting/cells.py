"""The text of each cell and line a person reads, one definition for the terminal, report.md and report.html:
metric columns, intervals, the paired difference, labels, statuses, the best line, problems, checkpoint sweeps."""

from __future__ import annotations

from typing import Any

from contract.run_row import NEW_RUN_RULE, RecipeRow, RunSummary, Status, Sweep, SweepPoint, parse_threshold_key
from orchestrator.results.stats import DEFAULT_THRESHOLDS, MIN_BASELINE_FOR_RELATIVE, VERDICT_BETTER

# What the "vs baseline" column and the best line's "% over" hold, for the notes under the tables.
RELATIVE_CHANGE_NOTE = (f"vs baseline: the change in mean IoU relative to the baseline's, given only where the "
                        f"baseline's mean IoU is at least {MIN_BASELINE_FOR_RELATIVE:g} (below it the ratio is noise)")


def metric_columns(summary: RunSummary) -> list[tuple[str, str, str]]:
    """(key, title, format) of each metric column: mean IoU, detection rate, then the rate at every IoU threshold
    any recipe was scored with (a rescore may add 0.9), titled by its rule: IoU≥0.5 (a folder from before the rule
    was recorded: IoU>0.5)."""
    found = {parsed for row in summary.recipes for key in (row.metrics or {})
             if (parsed := parse_threshold_key(key)) is not None}
    rates = sorted(found) or [(t, NEW_RUN_RULE) for t in DEFAULT_THRESHOLDS]
    keys = [("mean_iou", "Mean IoU"), ("detection_rate", "Det Rate"),
            *[(rule.key(t), rule.column(t)) for t, rule in rates]]
    return [(key, title, metric_format(key)) for key, title in keys]


def metric_format(key: str) -> str:
    """Mean IoU with four decimals; every other metric is a rate, shown as a percentage."""
    return "{:.4f}" if key == "mean_iou" else "{:.2%}"


def metric_cell(row: RecipeRow, key: str, fmt: str, *, interval: bool = False) -> str:
    value = (row.metrics or {}).get(key)
    if value is None:
        return "-"
    text = fmt.format(value)
    bounds = (row.intervals or {}).get(key)
    if interval and bounds:
        text += " " + interval_text(bounds, percent=fmt.endswith("%}"))
    return text


def interval_text(bounds: list[float], *, percent: bool = False, signed: bool = False) -> str:
    if percent:
        return f"[{bounds[0]:.0%}, {bounds[1]:.0%}]"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"[{fmt.format(bounds[0])}, {fmt.format(bounds[1])}]"


def change_cell(row: RecipeRow) -> str:
    """'+12.3%', or nothing where no relative change is given (stats.relative_change)."""
    change = row.change_vs_baseline
    return f"{change:+.1%}" if change is not None else ""


def paired_cell(row: RecipeRow) -> str:
    """'+0.0019 [-0.012, +0.016] no clear difference' (recipe - baseline, per sample, same samples)."""
    paired = row.vs_baseline_paired
    if not paired:
        return ""
    return f"{paired['difference']:+.4f} {interval_text(paired['interval'], signed=True)} {paired['verdict']}"


def label(row: RecipeRow, summary: RunSummary) -> str:
    marks = []
    if row.name == summary.baseline:
        marks.append("baseline")
    if row.base_override:
        marks.append("base overridden")
    return row.name + (f" ({', '.join(marks)})" if marks else "")


def status_text(row: RecipeRow) -> str:
    """'ok', 'ok, 2 sample error(s)', or where its sample errors fail the recipe (the verdict recorded in its row)
    'failed: 12 of 200 samples errored (0 allowed)'."""
    verdict = row.sample_errors or {}
    if row.status is Status.SAMPLE_ERRORS and verdict:
        if verdict["errors"] == verdict["samples"]:
            return f"failed: no sample scored ({verdict['errors']} errored)"
        return f"failed: {verdict['errors']} of {verdict['samples']} samples errored ({verdict['allowed']} allowed)"
    errors = (row.metrics or {}).get("errors")
    return f"{row.status}, {errors} sample error(s)" if errors else str(row.status)


def problems(summary: RunSummary) -> list[str]:
    return [f"{r.name}: {r.status}: {r.detail}" for r in summary.recipes if not r.ok]


def best_line(summary: RunSummary) -> str:
    """Which recipe is best, by how much (the relative change where the baseline carries one, the paired Δ
    always), and whether the difference is more than noise."""
    row = summary.row(summary.best)
    if row is None:
        return "Best recipe: none (no recipe finished with scored samples)"
    bounds = (row.intervals or {}).get("mean_iou")
    text = f"Best recipe: {row.name} (Mean IoU: {row.mean_iou or 0.0:.4f}"
    text += f" {interval_text(bounds)}" if bounds else ""
    change = summary.best_change_vs_baseline
    text += f", {change:+.1%} over {summary.baseline}" if change is not None else ""
    paired = row.vs_baseline_paired
    if paired:
        text += f"; paired difference {paired_cell(row)}"
    return text + ")"


def best_versus_others_line(summary: RunSummary) -> str | None:
    """'r4, paired with the others (best - other, per sample): clearly ahead of r1 (+0.0496 [+0.010, +0.089]); not
    clearly ahead of r3 (+0.0334 [-0.007, +0.072])': whether picking the best is more than picking noise. None with
    nothing to compare."""
    compared = summary.best_vs_others
    if not compared:
        return None
    ahead = [c for c in compared if c["verdict"] == VERDICT_BETTER]
    unclear = best_lead_unclear(summary)
    parts = [f"clearly ahead of {_paired_items(ahead)}"] if ahead else []
    parts += [f"not clearly ahead of {_paired_items(unclear)}"] if unclear else []
    return f"{summary.best}, paired with the others (best - other, per sample): " + "; ".join(parts)


def best_lead_unclear(summary: RunSummary) -> list[dict[str, Any]]:
    """The recipes the best is not clearly ahead of (paired interval includes 0, or lies below it)."""
    return [c for c in summary.best_vs_others if c["verdict"] != VERDICT_BETTER]


def _paired_items(compared: list[dict[str, Any]]) -> str:
    return ", ".join(f"{c['against']} ({c['difference']:+.4f} {interval_text(c['interval'], signed=True)})"
                     for c in compared)


def override_notes(summary: RunSummary) -> list[str]:
    """One line per recipe evaluated on an overridden base, with its paired difference from the recorded base."""
    notes = []
    for row in summary.recipes:
        paired = row.vs_recorded_base_paired
        if paired:
            notes.append(f"{row.name} loads its adapter on a base it was not trained on; against "
                         f"{paired['against']} (the same adapter on its recorded base): {paired['difference']:+.4f} "
                         f"{interval_text(paired['interval'], signed=True)} {paired['verdict']}")
    return notes


def as_trained_notes(summary: RunSummary) -> list[str]:
    """One line per recipe evaluated otherwise than its base would be: at the resolution its adapter's processor was
    saved with, or with embeddings resized to its adapter's vocabulary (each row's `as_trained`); and one per recipe
    evaluated on a quantized base, saying whether quantized, as it was trained, or dequantized, whose numbers differ
    from the quantized base's (each row's `quantization`)."""
    notes = []
    for row in summary.recipes:
        if row.quantization is not None and row.mean_iou is not None:
            notes.append(f"{row.name}: its base is quantized ({row.quantization.describe()}); "
                         f"{row.quantization.evaluated()}")
        record = row.as_trained or {}
        if record.get("resolution_note"):
            notes.append(f"{row.name}: {record['resolution_note']}")
        notes += [f"{row.name}: embeddings resized to {resized['rows']} rows before the adapter "
                  f"{resized['adapter']} (its saved embed_tokens/lm_head have them)"
                  for resized in record.get("embeddings_resized") or []]
    return notes


def processor_text(row: RecipeRow) -> str | None:
    """'the adapter's own, /runs/x: resizes images to 3136-589824 pixels': where a row's processor came from."""
    return (row.as_trained or {}).get("processor_text")


def parity_notes(summary: RunSummary) -> list[tuple[bool, str]]:
    """(agreed, line) per recipe whose worker checked batch parity: its first batch's samples checked again one
    at a time. A disagreement names the samples: the batched numbers may not be what the model gives alone."""
    notes = []
    for row in summary.recipes:
        parity = row.parity or {}
        if parity.get("enabled") and parity.get("unsettled"):
            notes.append((True, _unsettled_note(row.name, parity)))
        if not parity.get("enabled") or not parity.get("checked"):
            continue
        checked, batch = parity["checked"], parity.get("batch_size")
        wrong = parity.get("disagreements") or []
        if not wrong:
            notes.append((True, f"{row.name}: batch parity: {checked} of {checked} sample(s) of the first batch "
                                f"(batch {batch}) give the same answer alone{_parity_how(parity)}"))
            continue
        ids = ", ".join(str(d["id"]) for d in wrong[:10]) + (f" and {len(wrong) - 10} more" if len(wrong) > 10 else "")
        notes.append((False, f"{row.name}: batch parity FAILED: {len(wrong)} of {checked} sample(s) of the first "
                             f"batch (batch {batch}) answer differently when generated alone: {ids}. Batched "
                             "numbers may not be the model's (left padding, position ids): compare with "
                             "batch_size = 1"))
    return notes


def _unsettled_note(name: str, parity: dict[str, Any]) -> str:
    """The samples the parity check left undecided: teacher forcing disagreed, no generation alone was left."""
    unsettled = parity["unsettled"]
    gaps = [u["gap"] for u in unsettled if u.get("gap") is not None]  # run folders from before the tie rule lack it
    closest = f" (the batched token behind greedy's pick by up to {max(gaps):.3g})" if gaps else ""
    ids = ", ".join(str(u["id"]) for u in unsettled[:10]) + (f" and {len(unsettled) - 10} more"
                                                              if len(unsettled) > 10 else "")
    return (f"{name}: batch parity unsettled for {len(unsettled)} sample(s) ({ids}): teacher forcing differed from "
            f"the batched answer by more than a tie{closest} after parity_generate's generations alone were spent; "
            "raise parity_generate to decide them")


def _parity_how(parity: dict[str, Any]) -> str:
    """How the samples were checked alone (inference/parity.py); run folders from before the forced check lack it."""
    if "forced_agreed" not in parity:
        return ""
    tied = parity.get("forced_tied") or 0  # run folders from before the tie rule lack it
    in_batch = parity.get("forced_in_batch") or 0  # and from before the batched forced pass
    how = ([f"{in_batch} in one batched pass"] if in_batch else []) + (
        [f"{tied} at ties within the logits' rounding"] if tied else [])
    forced = f"{parity['forced_agreed'] + tied} by teacher forcing" + (f" ({', '.join(how)})" if how else "")
    return (f" ({forced}, {parity['generated_alone']} generated; closest margin {parity['closest_margin']:.3g})"
            if parity.get("closest_margin") is not None else f" ({parity['generated_alone']} generated)")


def worker_notes(summary: RunSummary) -> list[tuple[bool, str]]:
    """(worth a warning, line) per recipe whose worker ran at the same time as others (several on one GPU, or
    on other GPUs), whose batches CUDA ran out of memory on and the worker retried at half the size (a warning),
    or whose decode steps went on eagerly where a CUDA graph was to replay them (a warning for a batch's reason,
    a note for the model's: slower, and why)."""
    notes = []
    for row in summary.recipes:
        gpu = (row.preflight or {}).get("gpu")
        where = f" (GPU {gpu})" if gpu is not None else ""
        if row.concurrent_with:
            notes.append((False, f"{row.name}{where}: its worker ran at the same time as those of "
                                 f"{', '.join(row.concurrent_with)}"))
        if row.oom_retries:
            first = (row.preflight or {}).get("batch_size")
            notes.append((True, f"{row.name}{where}: CUDA ran out of memory {row.oom_retries} time(s); each "
                                f"time the batch was halved and retried, "
                                f"{f'from {first} ' if first else ''}to {row.final_batch_size}"))
        graphs = row.decode_graph or {}
        if graphs.get("not_recordable"):
            notes.append((False, f"{row.name}{where}: decoded eagerly, not from CUDA graphs: "
                                 f"{graphs['not_recordable']}"))
        declined = graphs.get("reasons") or {}
        if declined:
            reasons = "; ".join(f"{reason} ({count})" for reason, count in declined.items())
            notes.append((True, f"{row.name}{where}: {sum(declined.values())} batch(es) decoded eagerly instead "
                                f"of from a CUDA graph (same answers, slower): {reasons}"))
    return notes


SWEEP_COLUMNS = ("Step", "Checkpoint", "Mean IoU (95% CI)", "Trainer eval loss", "Status")


def sweep_title(sweep: Sweep) -> str:
    return f"{sweep.name}: mean IoU by training step"


def sweep_cells(point: SweepPoint, sweep: Sweep) -> list[str]:
    """A checkpoint's cells under SWEEP_COLUMNS: its step, its recipe (marked best or last), mean IoU with its
    interval, the trainer's eval loss at that step, its status."""
    marks = [word for word, name in (("best", sweep.best), ("last", sweep.last)) if name == point.recipe]
    mean = "-" if point.mean_iou is None else f"{point.mean_iou:.4f}"
    if point.interval and point.mean_iou is not None:
        mean += " " + interval_text(point.interval)
    return ["-" if point.step is None else str(point.step),
            point.recipe + (f" ({', '.join(marks)})" if marks else ""), mean,
            "-" if point.eval_loss is None else f"{point.eval_loss:.4f}", str(point.status)]


def sweep_line(sweep: Sweep) -> str:
    """'Best checkpoint of lora: lora@400 (0.5123); clearly ahead of the last, lora@final (+0.0412 [+0.010, +0.070],
    paired); the trainer's eval loss is lowest at step 400 (0.3120)'."""
    best = next((p for p in sweep.points if p.recipe == sweep.best), None)
    if best is None:
        return f"Best checkpoint of {sweep.name}: none (no checkpoint finished with scored samples)"
    text = f"Best checkpoint of {sweep.name}: {best.recipe} (mean IoU {best.mean_iou or 0.0:.4f})"
    paired = sweep.best_vs_last
    if sweep.best == sweep.last:
        text += "; it is the last one"
    elif paired:
        ahead = "clearly ahead of" if paired["verdict"] == VERDICT_BETTER else "not clearly ahead of"
        text += (f"; {ahead} the last, {sweep.last} ({paired['difference']:+.4f} "
                 f"{interval_text(paired['interval'], signed=True)}, paired)")
    if sweep.eval_losses:
        step, loss = min(sweep.eval_losses.items(), key=lambda item: (item[1], item[0]))
        text += f"; the trainer's eval loss is lowest at step {step} ({loss:.4f})"
    return text


def link_text(link: dict[str, Any]) -> str:
    return f"{link['kind']} `{link['path']}` ({link['fingerprint']})"
