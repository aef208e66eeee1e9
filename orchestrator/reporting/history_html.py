"""history.html: one self-contained page (inline CSS, PNGs as base64) that answers "what changed since last week?":
the changes beyond noise first, then the metric of each recipe in each run, a trend chart per recipe with its
marks, and every run folder with its time, commit, command and state."""

from __future__ import annotations

from typing import Any

from contract.run_row import Status
from orchestrator.reporting.cells import interval_text
from orchestrator.reporting.history import BETTER, FINISHED, NEW_SETUP, NOT_COMPARED, WORSE, History, RunEntry, Trend
from orchestrator.reporting.history_text import (
    LEGEND,
    SYMBOLS,
    bounds_text,
    change_text,
    commit_text,
    delta_text,
    marked_lines,
    skipped,
    state_text,
    time_text,
    value_text,
)
from orchestrator.reporting.page import anchor, escape, figure, page, png_bytes, png_img

_COLOURS = {BETTER: "#16a34a", WORSE: "#dc2626", NEW_SETUP: "#d97706", NOT_COMPARED: "#6b7280"}
_LINE = "#2563eb"
_CSS_CLASS = {BETTER: "good", WORSE: "bad", NEW_SETUP: "warn", NOT_COMPARED: "unclear"}


def render_history_html(history: History) -> str:
    parts = [_header(history), _headline(history), _changes(history), _values(history),
             *[_trend_section(t, history) for t in history.trends], _runs(history),
             f'<p class="note">{escape(LEGEND)}</p>']
    return page(f"evalorch history: {history.folder.name}", _CSS, "\n".join(p for p in parts if p))


def _header(history: History) -> str:
    finished = history.finished
    span = f" · {escape(time_text(finished[0]))} to {escape(time_text(finished[-1]))} UTC" if finished else ""
    return (f"<header><h1>Evaluation history</h1><p class=\"meta\">runs folder <code>{escape(history.folder)}"
            f"</code> · metric <b>{escape(history.metric)}</b> · {len(finished)} finished run(s){span}</p></header>")


def _headline(history: History) -> str:
    counts = {mark: sum(1 for m, _, _ in marked_lines(history) if m == mark) for mark in SYMBOLS}
    if counts[WORSE]:
        cls, text = "bad", f"{counts[WORSE]} change(s) worse beyond noise with the same weights, settings and software."
    elif counts[BETTER]:
        cls, text = "", f"{counts[BETTER]} change(s) better beyond noise with the same setup; none worse."
    elif not history.finished:
        cls, text = "bad", "No finished run to compare."
    else:
        cls, text = "", "No change beyond noise with the same setup between consecutive runs."
    notes = [f"{counts[BETTER]} change(s) better beyond noise with the same setup."] if counts[WORSE] and \
        counts[BETTER] else []
    if counts[NEW_SETUP]:
        notes.append(f"{counts[NEW_SETUP]} change(s) came with a new setup (weights, settings or software): not"
                     " read as the same model getting better or worse.")
    if counts[NOT_COMPARED]:
        notes.append(f"{counts[NOT_COMPARED]} pair(s) of runs were not compared (scored differently, or no sample in"
                     " common).")
    if skipped(history):
        notes.append(f"{len(skipped(history))} folder(s) skipped: not a run, or a run that did not finish.")
    extra = "".join(f"<p class=\"warn\">{escape(n)}</p>" for n in notes)
    return f'<section class="headline {cls}"><p class="best">{escape(text)}</p>{extra}</section>'


def _changes(history: History) -> str:
    marked = marked_lines(history)
    if not marked:
        return ""
    rows = []
    for mark, trend, point in marked:
        change = point.marked_change
        cells = (f"<td>{_mark_span(mark)}</td><td><a href=\"#{anchor(trend.recipe)}\">{escape(trend.recipe)}</a></td>"
                 f"<td><code>{escape(point.run)}</code></td><td><code>{escape(change.previous)}</code></td>")
        if change.paired is None:
            cells += f"<td class=\"num\">-</td><td>{escape(change.not_compared)}</td>"
        else:
            cells += (f"<td class=\"num\">{_delta_cell(change.paired, history.metric)}</td>"
                      f"<td>{'<br>'.join(escape(s) for s in change.setup) or 'same setup'}</td>")
        rows.append(f"<tr>{cells}</tr>")
    return ("<section><h2>Marked changes</h2><table class=\"results\"><thead><tr><th>Mark</th><th>Recipe</th>"
            f"<th>Run</th><th>Compared with</th><th>Paired Δ {escape(history.metric)}<br><small>95% interval</small>"
            f"</th><th>Setup</th></tr></thead><tbody>{''.join(rows)}</tbody></table></section>")


def _mark_span(mark: str) -> str:
    return f'<span class="mark {_CSS_CLASS[mark]}">{SYMBOLS[mark]} {escape(mark)}</span>'


def _delta_cell(paired: dict[str, Any], metric: str) -> str:
    bounds = bounds_text(paired["interval"], metric)
    return (f"{escape(delta_text(paired['difference'], metric))}<span class=\"ci\">{escape(bounds)}, n={paired['n']}"
            f"</span><span class=\"verdict\">{escape(paired['verdict'])}</span>")


def _values(history: History) -> str:
    if not history.trends:
        return ""
    head = "".join(f"<th><a href=\"#{anchor(t.recipe)}\">{escape(t.recipe)}</a></th>" for t in history.trends)
    rows = []
    for i, entry in enumerate(history.finished):
        cells = "".join(_value_td(t, i, history.metric) for t in history.trends)
        rows.append(f"<tr><th scope=\"row\"><code>{escape(entry.name)}</code><span class=\"ci\">"
                    f"{escape(time_text(entry))}</span></th>{cells}</tr>")
    return (f"<section><h2>{escape(history.metric)} by run</h2><table class=\"results\"><thead><tr><th>Run</th>"
            f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></section>")


def _value_td(trend: Trend, index: int, metric: str) -> str:
    point = trend.points[index]
    mark = point.change.mark if point.change else ""
    bounds = ""
    if point.interval and point.status is Status.OK:
        bounds = f'<span class="ci">{escape(interval_text(point.interval, percent=metric != "mean_iou"))}</span>'
    title = f' title="{escape(change_text(point.change, metric))}"' if point.change else ""
    cls = _CSS_CLASS.get(mark, "failed" if point.status not in (None, Status.OK) else "")
    return f'<td class="num {cls}"{title}>{escape(value_text(point, metric))}{bounds}</td>'


def _trend_section(trend: Trend, history: History) -> str:
    has_values = any(p.value is not None and p.status is Status.OK for p in trend.points)
    chart = png_img(_trend_png(trend, history), f"{history.metric} of {trend.recipe} by run", "chart") \
        if has_values else "<p>No scored run.</p>"
    items = "".join(f"<li>{_mark_span(p.marked_change.mark)} <code>{escape(p.run)}</code>: "
                    f"{escape(change_text(p.marked_change, history.metric))}</li>" for p in trend.marked)
    marks = f'<ul class="marks">{items}</ul>' if items else '<p class="note">No marked change.</p>'
    return f'<section class="trend" id="{anchor(trend.recipe)}"><h2>{escape(trend.recipe)}</h2>{chart}{marks}</section>'


def _runs(history: History) -> str:
    rows = []
    for index, entry in enumerate(history.runs, 1):
        badge = "ok" if entry.state == FINISHED else "bad"
        rows.append(f"<tr class=\"{'' if entry.state == FINISHED else 'skipped'}\"><td class=\"num\">{index}</td>"
                    f"<td>{escape(time_text(entry))}</td><td><code>{escape(entry.name)}</code></td>"
                    f"<td><code>{escape(commit_text(entry))}</code></td><td class=\"command\"><code>"
                    f"{escape(entry.command or '-')}</code></td><td><span class=\"badge {badge}\">"
                    f"{escape(state_text(entry))}</span></td></tr>")
    return ("<section><h2>Runs, oldest first</h2><table class=\"results runs\"><thead><tr><th>#</th><th>Time (UTC)"
            "</th><th>Run</th><th>Commit</th><th>Command</th><th>State</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></section>")


# ---------------------------------------------------------------------------------------------- the chart

def _trend_png(trend: Trend, history: History) -> bytes:
    """The metric in each finished run with its 95% interval; a line joins runs that were compared; each mark
    drawn where it happened, a dashed line where two runs were not compared."""
    runs: list[RunEntry] = history.finished
    fig = figure(8.0, 2.9)
    ax = fig.add_subplot()
    last = None  # (x, y) of the previous scored run
    for x, point in enumerate(trend.points):
        if point.status is None:
            continue  # the run has no such recipe
        if point.status is not Status.OK or point.value is None:
            shown = str(point.status) if point.status is not Status.OK else "no value"
            ax.annotate(shown, (x, 0.02), ha="center", fontsize=7, color=_COLOURS[WORSE])
            continue
        mark = point.change.mark if point.change else ""
        if mark == NOT_COMPARED:
            ax.axvline(x - 0.5, color=_COLOURS[NOT_COMPARED], linestyle="--", linewidth=1)
        elif mark == NEW_SETUP:  # another model from here on: the line into it is not a trend of one model
            ax.axvline(x - 0.5, color=_COLOURS[NEW_SETUP], linestyle=":", linewidth=1)
            assert last is not None  # a change is from an earlier scored run of these points, drawn before it
            ax.plot([last[0], x], [last[1], point.value], color=_COLOURS[NEW_SETUP], linewidth=1.2, linestyle=":")
        elif last is not None:
            ax.plot([last[0], x], [last[1], point.value], color=_LINE, linewidth=1.5)
        low, high = point.interval or (point.value, point.value)
        ax.plot([x, x], [low, high], color=_LINE, linewidth=1, alpha=0.5)
        _marker(ax, x, point.value, mark)
        last = (x, point.value)
    _axes(ax, runs, history.metric)
    return png_bytes(fig)


_MARKERS = {BETTER: ("^", 10), WORSE: ("v", 10), NEW_SETUP: ("D", 8), NOT_COMPARED: ("X", 8)}


def _marker(ax: Any, x: int, y: float, mark: str) -> None:
    shape, size = _MARKERS.get(mark, ("o", 5))
    colour = _COLOURS.get(mark, _LINE)
    ax.plot([x], [y], shape, color=colour, markersize=size, label=mark or None)
    if mark:
        ax.annotate(SYMBOLS[mark], (x, y), textcoords="offset points", xytext=(0, 9), ha="center", fontsize=8,
                    color=colour)


def _axes(ax: Any, runs: list[RunEntry], metric: str) -> None:
    labels = [e.started.strftime("%m-%d\n%H:%M") if e.started else e.name[:12] for e in runs]
    ax.set_xticks(range(len(runs)), labels, fontsize=7, rotation=0 if len(runs) <= 12 else 45)
    ax.set_xlim(-0.6, max(len(runs) - 0.4, 0.6))
    ax.set_ylim(-0.02, 1.08)
    ax.set_ylabel(metric, fontsize=8)
    ax.yaxis.set_major_formatter(lambda value, _pos: f"{value:.2f}" if metric == "mean_iou" else f"{value:.0%}")
    ax.grid(axis="y", color="#e5e7eb", linewidth=0.8)
    ax.spines[["top", "right"]].set_visible(False)
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=True))
    if unique:
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", frameon=False, ncol=len(unique))


_CSS = """
.mark{font-weight:600;white-space:nowrap}
.results td.good{background:#f0fdf4}.results td.bad{background:#fef2f2}.results td.warn{background:#fffbeb}
.results td.unclear{color:#6b7280}.results td.failed{color:#b91c1c}
.results tr.skipped{color:#6b7280}.runs td{white-space:nowrap}
.runs td.command{white-space:normal}.runs td.command code{white-space:pre-wrap;word-break:break-all}
.trend ul.marks{font-size:13px;margin:6px 0;padding-left:20px}
"""
