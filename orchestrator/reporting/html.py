"""report.html: one self-contained file (inline CSS, PNGs as base64) that a person opens in the morning.

It answers, without JSON: which recipe is best, by how much, how sure we are (intervals, paired comparison),
and what the worst failures look like (each image with the ground-truth box in green and the predicted box in
red, and the model's raw text). matplotlib (Agg, no pyplot state) and Pillow are imported here only.
"""

from __future__ import annotations

import io
import itertools
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson

from contract.dataset import DatasetError, ImageSource, dataset_exists, open_dataset, read_image
from contract.layout import RunFolder
from contract.recipe import FINAL, Settings
from contract.run_row import RecipeRow, RunSummary, Status, Sweep
from contract.samples import id_text
from orchestrator.reporting.cells import (
    RELATIVE_CHANGE_NOTE,
    SWEEP_COLUMNS,
    as_trained_notes,
    best_lead_unclear,
    best_line,
    best_versus_others_line,
    change_cell,
    interval_text,
    label,
    metric_columns,
    override_notes,
    parity_notes,
    problems,
    processor_text,
    status_text,
    sweep_cells,
    sweep_line,
    sweep_title,
    worker_notes,
)
from orchestrator.reporting.page import anchor as _anchor
from orchestrator.reporting.page import escape as _e
from orchestrator.reporting.page import figure as _figure
from orchestrator.reporting.page import page
from orchestrator.reporting.page import png_bytes as _save
from orchestrator.reporting.page import png_img as _png
from orchestrator.results.stats import VERDICT_BETTER, VERDICT_WORSE
from orchestrator.results.store import DamagedRunFile, read_json

GALLERY_SIZE = 6  # worst samples shown per recipe
_THUMB_MIN, _THUMB_MAX = 224, 320  # longer side of a gallery picture, in pixels
GT_COLOUR, PRED_COLOUR, _EDGE = (34, 197, 94), (239, 68, 68), (17, 24, 39)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def render_html(summary: RunSummary, run_dir: Path, samples: dict[str, list[dict[str, Any]]]) -> str:
    record = _run_record(run_dir)
    parts = [
        _header(summary, run_dir, record),
        _headline(summary),
        _table(summary),
        _forest(summary),
        _sweeps(summary),
        _gates(summary),
        _problems(summary),
        *[_recipe_section(row, summary, samples.get(row.name, []), run_dir) for row in summary.recipes],
    ]
    return page(f"evalorch: {run_dir.name}", _CSS, "\n".join(p for p in parts if p))


def _run_record(run_dir: Path) -> dict[str, Any]:
    try:
        return read_json(RunFolder(run_dir).record)
    except (OSError, DamagedRunFile):
        return {}


# ------------------------------------------------------------------------------------------- top of the page

def _header(summary: RunSummary, run_dir: Path, record: dict[str, Any]) -> str:
    meta = [f"run folder <code>{_e(run_dir)}</code>"]
    if record.get("device"):
        meta.append(f"device {_e(record['device'])}")
    if record.get("host"):
        meta.append(f"host {_e(record['host'])}")
    if record.get("rescore_of"):
        meta.append(f"rescored from <code>{_e(record['rescore_of'])}</code> ({_e(record.get('rescore', ''))})")
    return f"<header><h1>Evaluation results</h1><p class=\"meta\">{' · '.join(meta)}</p></header>"


def _headline(summary: RunSummary) -> str:
    row = summary.row(summary.best)
    if row is None:
        return '<section class="headline bad">No recipe finished with scored samples.</section>'
    paired = row.vs_baseline_paired
    if paired is None:
        sure = ""
    elif paired["verdict"] == VERDICT_BETTER:
        sure = f"<p class=\"good\">Clearly better than {_e(summary.baseline)}: the paired 95% interval of the" \
               " per-sample IoU difference lies above 0.</p>"
    else:
        sure = f"<p class=\"warn\">Not clearly better than {_e(summary.baseline)}: the paired 95% interval" \
               " of the per-sample IoU difference includes 0 (or lies below it).</p>"
    tied = [r.name for r in summary.recipes if r.name not in (row.name, summary.baseline)
            and r.ok and r.mean_iou == row.mean_iou]
    if tied:  # "best" is then only the first of equals
        sure += f"<p class=\"warn\">Tied on mean IoU with {_e(', '.join(tied))}.</p>"
    versus = best_versus_others_line(summary)
    if versus:
        sure += f"<p class=\"{'warn' if best_lead_unclear(summary) else 'good'}\">{_e(versus)}</p>"
    clear = paired is None or paired["verdict"] == VERDICT_BETTER
    return (f'<section class="headline{"" if clear else " unsure"}"><p class="best">{_e(best_line(summary))}</p>{sure}'
            f"<p class=\"note\">{_e(_NOTE)}</p></section>")


_NOTE = ("Intervals are 95% percentile-bootstrap intervals (2000 resamples, fixed seed). Paired Δ is the mean of"
         " (recipe IoU - baseline IoU) over the samples both scored; it is called better or worse only when its"
         f" interval excludes 0. {RELATIVE_CHANGE_NOTE}.")


def _table(summary: RunSummary) -> str:
    columns = metric_columns(summary)
    head = "".join(f"<th>{_e(title)}</th>" for _, title, _ in columns)
    rows = []
    for row in summary.recipes:
        cls = "best" if row.name == summary.best else ("failed" if not row.ok else "")
        cells = "".join(_metric_td(row, key, fmt) for key, _, fmt in columns)
        name = f'<a href="#{_anchor(row.name)}">{_e(label(row, summary))}</a>'
        status = f'<span class="badge {"ok" if row.ok else "bad"}">{_e(status_text(row))}</span>'
        rows.append(f'<tr class="{cls}"><th scope="row">{name}</th>{cells}<td class="num">{_e(change_cell(row))}'
                    f"</td>{_paired_td(row)}<td>{status}</td></tr>")
    return (f'<section><h2>Results</h2><table class="results"><thead><tr><th>Model</th>{head}'
            f"<th>vs baseline</th><th>Paired Δ IoU vs baseline<br><small>95% interval</small></th><th>Status</th>"
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table></section>")


def _metric_td(row: RecipeRow, key: str, fmt: str) -> str:
    value = (row.metrics or {}).get(key)
    if value is None:
        return '<td class="num">-</td>'
    bounds = (row.intervals or {}).get(key)
    ci = f'<span class="ci">{_e(interval_text(bounds, percent=fmt.endswith("%}")))}</span>' if bounds else ""
    return f'<td class="num">{_e(fmt.format(value))}{ci}</td>'


def _paired_td(row: RecipeRow) -> str:
    paired = row.vs_baseline_paired
    if not paired:
        return '<td class="num"></td>'
    verdict = paired["verdict"]
    cls = {VERDICT_BETTER: "good", VERDICT_WORSE: "bad"}.get(verdict, "unclear")
    return (f'<td class="num">{paired["difference"]:+.4f}<span class="ci">'
            f"{_e(interval_text(paired['interval'], signed=True))}, n={paired['n']}</span>"
            f'<span class="verdict {cls}">{_e(verdict)}</span></td>')


def _forest(summary: RunSummary) -> str:
    rows = [r for r in summary.recipes if r.mean_iou is not None]
    if not rows:
        return ""
    alt = "Mean IoU of each recipe with its 95% interval"
    return f'<section><h2>Mean IoU with 95% intervals</h2>{_png(_forest_png(summary, rows), alt, "chart")}</section>'


def _sweeps(summary: RunSummary) -> str:
    """Each sweep: mean IoU against the training step (chart and table) beside the trainer's eval loss, and whether
    the best checkpoint is clearly ahead of the last."""
    if not summary.sweeps:
        return ""
    parts = ["<section><h2>Checkpoint sweeps</h2>"]
    for sweep in summary.sweeps:
        head = "".join(f"<th>{_e(title)}</th>" for title in SWEEP_COLUMNS)
        rows = []
        for point in sweep.points:
            cls = "best" if point.recipe == sweep.best else "" if point.status is Status.OK else "failed"
            cells = sweep_cells(point, sweep)
            link = f'<a href="#{_anchor(point.recipe)}">{_e(cells[1])}</a>'
            numbers = "".join(f'<td class="num">{_e(cell)}</td>' for cell in cells[2:4])
            rows.append(f'<tr class="{cls}"><td class="num">{_e(cells[0])}</td><td>{link}</td>{numbers}'
                        f"<td>{_e(cells[4])}</td></tr>")
        chart = _png(_sweep_png(sweep), f"mean IoU of each checkpoint of {sweep.name} by training step", "chart") \
            if any(p.mean_iou is not None for p in sweep.points) else ""
        ahead = (sweep.best_vs_last or {}).get("verdict") == VERDICT_BETTER or sweep.best == sweep.last
        parts.append(f"<h3>{_e(sweep_title(sweep))}</h3>{chart}<p class=\"{'good' if ahead else 'warn'}\">"
                     f"{_e(sweep_line(sweep))}</p><table class=\"results sweep\"><thead><tr>{head}</tr></thead>"
                     f"<tbody>{''.join(rows)}</tbody></table>")
    return "".join(parts) + "</section>"


def _gates(summary: RunSummary) -> str:
    gates = summary.gates
    if not gates:
        return ""
    failures = gates.get("failures") or []
    if not failures:
        return f'<section><h2>Quality gates</h2><p class="good">All {gates.get("checked", 0)} checks passed.</p>' \
               "</section>"
    compared = any(f.get("previous") is not None for f in failures)  # --compare: show what it was before
    rows = "".join(f"<tr><td>{_e(f['recipe'])}</td><td>{_e(f['metric'])}</td><td class=\"num\">{_num(f['value'])}"
                   + (f"</td><td class=\"num\">{_num(f.get('previous'))}" if compared else "")
                   + f"</td><td class=\"num\">{_num(f['limit'])}</td><td>{_e(f['rule'])}</td></tr>" for f in failures)
    previous = "<th>Previous</th>" if compared else ""
    return (f'<section><h2 class="bad">Quality gates failed</h2><table class="results gates"><thead><tr>'
            f"<th>Recipe</th><th>Metric</th><th>Value</th>{previous}<th>Limit</th><th>Rule</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></section>")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _problems(summary: RunSummary) -> str:
    html = ""
    notes = override_notes(summary)
    if notes:
        items = "".join(f"<li>{_e(n)}</li>" for n in notes)
        html += f'<section><h2>Base overrides</h2><ul class="problems">{items}</ul></section>'
    trained = as_trained_notes(summary)
    if trained:
        items = "".join(f"<li>{_e(n)}</li>" for n in trained)
        html += f'<section><h2>Evaluated as trained</h2><ul class="problems">{items}</ul></section>'
    parity = parity_notes(summary)
    if parity:
        items = "".join(f"<li>{_e(n)}</li>" if ok else f'<li class="bad"><b>⚠ {_e(n)}</b></li>' for ok, n in parity)
        html += f'<section><h2>Batch parity</h2><ul class="problems">{items}</ul></section>'
    workers = worker_notes(summary)
    if workers:
        items = "".join(f'<li class="bad">{_e(n)}</li>' if oom else f"<li>{_e(n)}</li>" for oom, n in workers)
        html += f'<section><h2>Workers</h2><ul class="problems">{items}</ul></section>'
    found = problems(summary)
    if not found:
        return html
    items = "".join(f"<li><pre>{_e(p)}</pre></li>" for p in found)
    return html + f'<section><h2 class="bad">Problems</h2><ul class="problems">{items}</ul></section>'


# -------------------------------------------------------------------------------------------- each recipe

def _recipe_section(row: RecipeRow, summary: RunSummary, samples: list[dict[str, Any]], run_dir: Path) -> str:
    scored = [s for s in samples if s.get("status") == "ok"]
    parts = [f'<section class="recipe" id="{_anchor(row.name)}"><h2>{_e(label(row, summary))}</h2>']
    if scored:
        ious = [float(s["iou"]) for s in scored]
        missed = sum(1 for s in scored if not s.get("detected"))
        counts = f"<p>{len(scored)} scored sample(s); {missed} without a parsable box (IoU 0).</p>"
        picture = _png(_histogram_png(ious), "IoU histogram of " + row.name, "chart")
        parts.append(f'<div class="overview"><div>{_lineage(row)}{counts}</div><div>{picture}</div></div>')
        parts.append(_gallery(row, scored, run_dir))
    else:
        parts += [_lineage(row), "<p>No scored samples.</p>"]
    parts.append(_sample_errors(samples))
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def _lineage(row: RecipeRow) -> str:
    links = list(reversed(row.lineage))  # top (what the recipe names) first, down to the root
    if not links:
        return ""
    items = "".join(f"<li><span class=\"kind\">{_e(link.get('kind'))}</span> <code>{_e(link.get('path'))}</code> "
                    f"<small>{_e(link.get('fingerprint'))}</small></li>" for link in links)
    note = ' <span class="warn">(base overridden by the recipe)</span>' if row.base_override else ""
    processor = processor_text(row)
    processor_line = f"<p>processor: {_e(processor)}</p>" if processor else ""
    return f'<div class="lineage"><h3>Lineage{note}</h3><ol>{items}</ol>{processor_line}</div>'


def _sample_errors(samples: list[dict[str, Any]]) -> str:
    errors = [s for s in samples if s.get("status") != "ok"]
    if not errors:
        return ""
    items = "".join(f"<li><code>{_e(s.get('id'))}</code>: {_e(s.get('error'))}</li>" for s in errors[:10])
    more = f"<li>… and {len(errors) - 10} more</li>" if len(errors) > 10 else ""
    return f'<div class="errors"><h3>{len(errors)} sample error(s)</h3><ul>{items}{more}</ul></div>'


def _gallery(row: RecipeRow, scored: list[dict[str, Any]], run_dir: Path) -> str:
    worst = sorted(scored, key=lambda s: (float(s["iou"]), str(s["id"])))[:GALLERY_SIZE]
    recipe = row.recipe or {}
    images = dataset_images(str(recipe.get("dataset") or ""), str(run_dir), _reading(recipe))
    exif = "ignore" if recipe.get("exif") == "ignore" else "apply"  # the image as the worker read it
    cards = []
    for sample in worst:
        source = images.get(id_text(sample["id"]))
        picture = _sample_png(source, exif, sample.get("gt"), sample.get("pred")) if source else None
        shown = _png(picture, f"sample {sample['id']}", "sample") if picture else \
            '<div class="noimage">image not available</div>'
        found = "no parsable box" if not sample.get("detected") else f"predicted {_box_text(sample.get('pred'))}"
        cards.append(f'<figure class="card">{shown}<figcaption><b>{_e(sample["id"])}</b> · IoU '
                     f"{float(sample['iou']):.3f} · {_e(found)}<br><small>truth {_e(_box_text(sample.get('gt')))}"
                     f"</small><pre class=\"text\">{_e(_visible(sample.get('text') or ''))}</pre></figcaption>"
                     "</figure>")
    legend = ('<p class="legend"><span class="swatch gt"></span>ground truth <span class="swatch pred"></span>'
              "prediction · raw model text below each picture</p>")
    return f"<h3>Worst {len(worst)} samples</h3>{legend}<div class=\"gallery\">{''.join(cards)}</div>"


def _box_text(box: Any) -> str:
    return "-" if not box else "(" + ", ".join(f"{float(v):.0f}" for v in box) + ")"


def _visible(text: str) -> str:
    """Control characters shown as their Unicode pictures (␅), so a garbled output stays visible and valid."""
    return _CONTROL.sub(lambda m: chr(0x2400 + ord(m.group())) if ord(m.group()) < 32 else "␡", text)


def _reading(recipe: dict[str, Any]) -> str:
    """How the recipe's dataset is read (format, image folder), as a cache key."""
    return orjson.dumps({k: recipe.get(k) for k in ("dataset_format", "image_root", "bbox_format")}).decode()


@lru_cache(maxsize=16)
def dataset_images(dataset: str, run_dir: str, reading: str = "{}") -> dict[str, ImageSource]:
    """id -> where its image is, from the dataset as the recipe read it; {} when it is gone. Embedded images
    are not read here: each source reads its own row when the gallery draws it (only the worst samples).

    A relative dataset path was relative to where the run started: the current folder, or the folder that
    holds runs/ (the usual --out)."""
    if not dataset:
        return {}
    candidates = [Path(dataset)] if Path(dataset).is_absolute() else \
        [Path.cwd() / dataset, Path(run_dir).resolve().parent.parent / dataset]
    path = next((p for p in candidates if dataset_exists(p)), None)
    if path is None:
        return {}
    try:
        settings = Settings.model_validate({k: v for k, v in orjson.loads(reading).items() if v is not None})
        return {id_text(s.id): s.image for s in open_dataset(path, settings).samples(images=False)
                if s.image is not None}
    except (OSError, ValueError, DatasetError):
        return {}


# ---------------------------------------------------------------------------------------------- pictures

def _sample_png(source: ImageSource, exif: str, gt: Any, pred: Any) -> bytes | None:
    """The image as the worker read it (upright unless exif was "ignore": the boxes are in its pixels) scaled to a
    gallery size, ground truth (green) and prediction (red) drawn on it."""
    from PIL import Image, ImageDraw

    try:
        image = read_image(source, exif)[0]
    except (OSError, ValueError):
        return None
    longer = max(image.size)
    scale = min(max(1.0, _THUMB_MIN / longer), _THUMB_MAX / longer) if longer else 1.0
    if scale != 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for box, colour in ((gt, GT_COLOUR), (pred, PRED_COLOUR)):
        if box and len(box) == 4:
            x1, y1, x2, y2 = (float(v) * scale for v in box)
            corners = [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]
            # a dark line on each side of the colour keeps the box visible on a region of its own colour
            draw.rectangle([corners[0] - 1, corners[1] - 1, corners[2] + 1, corners[3] + 1], outline=_EDGE, width=5)
            draw.rectangle(corners, outline=colour, width=3)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _histogram_png(ious: list[float]) -> bytes:
    fig = _figure(4.6, 2.4)
    ax = fig.add_subplot()
    ax.hist(ious, bins=20, range=(0.0, 1.0), color="#2563eb", edgecolor="white")
    mean = sum(ious) / len(ious)
    ax.axvline(mean, color="#111827", linestyle="--", linewidth=1)
    ax.set_title(f"IoU of {len(ious)} scored samples (dashed: mean {mean:.3f})", fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_xlabel("IoU")
    ax.set_ylabel("samples")
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig)


def _forest_png(summary: RunSummary, rows: list[RecipeRow]) -> bytes:
    """Each recipe's mean IoU as a dot with its 95% interval; the baseline's mean as a dashed line."""
    fig = _figure(8.0, 0.45 * len(rows) + 1.0)
    ax = fig.add_subplot()
    for y, row in enumerate(reversed(rows)):
        mean = row.mean_iou or 0.0
        low, high = (row.intervals or {}).get("mean_iou") or (mean, mean)
        colour = "#16a34a" if row.name == summary.best else "#2563eb"
        ax.plot([low, high], [y, y], color=colour, linewidth=2.5, solid_capstyle="butt")
        ax.plot([mean], [y], "o", color=colour)
        ax.text(high, y, f"  {mean:.3f}", va="center", fontsize=8)
        if row.name == summary.baseline:
            ax.axvline(mean, color="#6b7280", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(rows)), [r.name for r in reversed(rows)])
    ax.set_xlim(0, 1.08)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlabel("mean IoU (dashed: baseline)")
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig)


def _sweep_png(sweep: Sweep) -> bytes:
    """Mean IoU of each checkpoint at its training step with its 95% interval (the best in green, the final model
    after the last step), and the trainer's eval loss on a second axis (dashed, grey)."""
    fig = _figure(8.0, 3.2)
    ax = fig.add_subplot()
    xs, ticks = _sweep_positions(sweep)
    scored = [(xs[p.recipe], p) for p in sweep.points if p.status is Status.OK and p.mean_iou is not None]
    ax.plot([x for x, _ in scored], [p.mean_iou for _, p in scored], "-o", color=_SWEEP_BLUE, linewidth=1.5,
            markersize=5, label="mean IoU (95% interval)")
    for x, point in scored:
        low, high = point.interval or (point.mean_iou, point.mean_iou)
        ax.plot([x, x], [low, high], color=_SWEEP_BLUE, linewidth=1, alpha=0.45)
        if point.recipe == sweep.best:
            ax.plot([x], [point.mean_iou], "o", color=_SWEEP_GREEN, markersize=10, label="best checkpoint")
    for point in sweep.points:
        if point.status is not Status.OK:
            ax.annotate(str(point.status), (xs[point.recipe], 0.02), xycoords=("data", "axes fraction"),
                        ha="center", fontsize=7, color="#dc2626")
    ax.set_xticks(list(ticks), list(ticks.values()), fontsize=8)
    ax.set_xlabel("training step", fontsize=8)
    ax.set_ylabel("mean IoU", fontsize=8)
    ax.yaxis.set_major_formatter(lambda value, _pos: f"{value:.2f}")
    ax.grid(axis="y", color="#e5e7eb", linewidth=0.8)
    ax.spines[["top", "right"]].set_visible(False)
    handles, names = ax.get_legend_handles_labels()
    if sweep.eval_losses:
        loss_ax = ax.twinx()
        loss_ax.plot(list(sweep.eval_losses), list(sweep.eval_losses.values()), "--s", color=_LOSS_GREY,
                     linewidth=1, markersize=3, label="trainer eval loss")
        loss_ax.set_ylabel("trainer eval loss", fontsize=8, color=_LOSS_GREY)
        loss_ax.tick_params(axis="y", labelsize=7, colors=_LOSS_GREY)
        loss_ax.spines[["top"]].set_visible(False)
        more_handles, more_names = loss_ax.get_legend_handles_labels()
        handles, names = handles + more_handles, names + more_names
    ax.legend(handles, names, fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False,
              ncol=len(names))
    return _save(fig)


def _sweep_positions(sweep: Sweep) -> tuple[dict[str, float], dict[float, str]]:
    """Where each checkpoint is drawn (its step) and the ticks: the final model one step's spacing after the
    last checkpoint, labelled 'final' (with its step where its trainer_state.json says it)."""
    steps = sorted(p.step for p in sweep.points if p.step is not None and p.label != FINAL)
    gaps = [b - a for a, b in itertools.pairwise(steps) if b > a]
    spacing = min(gaps) if gaps else max(1, (steps[-1] if steps else 1) // 10)
    xs: dict[str, float] = {}
    ticks: dict[float, str] = {}
    for point in sweep.points:
        if point.label == FINAL:
            x = (steps[-1] if steps else 0) + spacing
            ticks[x] = "final" + (f"\n(step {point.step})" if point.step is not None else "")
        else:
            x = point.step if point.step is not None else 0
            ticks[x] = str(point.step)
        xs[point.recipe] = x
    return xs, ticks


_SWEEP_BLUE, _SWEEP_GREEN, _LOSS_GREY = "#2563eb", "#16a34a", "#6b7280"
_CSS = """
.recipe{margin-top:8px}.lineage ol{margin:4px 0;padding-left:22px;font-size:13px}
.kind{display:inline-block;min-width:56px;font-weight:600}
.overview{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}.overview>div:first-child{flex:1;min-width:420px}
.overview p{color:#374151;font-size:13px;margin:6px 0}
.legend{font-size:13px;color:#374151}.swatch{display:inline-block;width:14px;height:10px;margin:0 4px 0 10px;
 border:3px solid}.swatch.gt{border-color:#22c55e}.swatch.pred{border-color:#ef4444}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:14px}
.card{margin:0;border:1px solid #e5e7eb;border-radius:6px;padding:8px;background:#fafafa}
.card img.sample{display:block;max-width:100%;margin:0 auto 6px;image-rendering:auto}
.card figcaption{font-size:13px}
.noimage{height:120px;display:flex;align-items:center;justify-content:center;color:#9ca3af;background:#f3f4f6}
pre.text{white-space:pre-wrap;word-break:break-all;font-size:12px;background:#fff;border:1px solid #e5e7eb;
 padding:6px;margin:6px 0 0;max-height:120px;overflow:auto}
.problems pre{white-space:pre-wrap;margin:0}
table.results.sweep{width:auto;min-width:640px}
"""
