"""Trends across runs: every run folder under one folder (what `run --out` fills night after night), oldest first,
and for each recipe its metric in every run, each change from the recipe's previous run judged per sample.

What it may not do is as important as what it does:
- it reads only what the run folders hold (no model, no GPU);
- a folder that is not a run, and a run that did not finish, are listed as such and never compared;
- a change is called better or worse only when the paired 95% interval of the per-sample difference, on the samples
  both runs scored, excludes 0; when the weights (lineage fingerprints), the recipe's settings or the software
  changed in between, the change is marked as a new setup, so that a jump is not read as the same model regressing;
- two runs scored differently (box format, threshold rule) are never compared: the change says why.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypedDict

from contract.layout import RunFolder, stamp_time
from contract.run_row import RecipeRow, RunSummary, Status
from orchestrator.errors import UserError
from orchestrator.reporting.gates import metric_name
from orchestrator.results.resume import setting_changes
from orchestrator.results.stats import paired_difference, sample_values
from orchestrator.results.store import DamagedRunFile, read_json, read_samples
from orchestrator.results.summary import read_summary

FINISHED, UNFINISHED, NOT_A_RUN, UNREADABLE = "finished", "did not finish", "not a run", "unreadable"
BETTER, WORSE, NEW_SETUP, NOT_COMPARED = "better", "worse", "new setup", "not compared"
# How a run scored its samples (the box format, the row's IoU rule): two runs that differ here are never compared,
# so these are left out of the settings that make a new setup.
_SCORING_SETTINGS = frozenset({"box_format", "iou_rule"})
# What a recipe's own summary.json says of the software and device it ran with (a change is a new setup too).
_VERSIONS = ("python", "torch", "transformers", "peft", "accelerate", "flash-attn")
_LOADED = ("device", "dtype", "attn")


class HistoryError(UserError):
    """The history cannot be made as asked (no run folders, an unknown recipe or metric)."""


@dataclass(frozen=True)
class RunEntry:
    """One folder under RUNS_DIR: a finished run, or why it is not compared."""

    folder: Path
    state: str  # FINISHED, UNFINISHED, NOT_A_RUN, UNREADABLE
    note: str = ""
    started: datetime | None = None
    command: str | None = None
    commit: str | None = None
    summary: RunSummary | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def finished_summary(self) -> RunSummary:
        """A finished run's summary (every finished run has one: only those are compared)."""
        if self.summary is None:
            raise ValueError(f"{self.folder}: {self.state}, no summary to compare")
        return self.summary


class _Facts(TypedDict):
    """What run.json and the folder say of any run, finished or not."""

    started: datetime | None
    command: str | None
    commit: str | None


@dataclass(frozen=True)
class Change:
    """From the recipe's previous scored run to this one."""

    previous: str  # the run folder compared with
    paired: dict[str, Any] | None = None  # n, difference, interval, verdict; None when not compared
    setup: tuple[str, ...] = ()  # what differs between the two setups (weights, settings, software)
    not_compared: str = ""  # why no comparison was made

    @property
    def mark(self) -> str:
        """NOT_COMPARED, NEW_SETUP, BETTER, WORSE, or "" (no change beyond noise on the same setup)."""
        if self.paired is None:
            return NOT_COMPARED
        if self.setup:
            return NEW_SETUP
        verdict = self.paired["verdict"]
        return verdict if verdict in (BETTER, WORSE) else ""


@dataclass(frozen=True)
class Point:
    """A recipe in one finished run."""

    run: str
    status: Status | None  # None: the run has no such recipe
    value: float | None = None
    interval: list[float] | None = None
    change: Change | None = None

    @property
    def marked_change(self) -> Change:
        """The change of a point Trend.marked lists (each has one)."""
        if self.change is None:
            raise ValueError(f"run {self.run}: not compared with an earlier run")
        return self.change


@dataclass(frozen=True)
class Trend:
    recipe: str
    points: tuple[Point, ...]  # one per finished run, oldest first

    @property
    def marked(self) -> list[Point]:
        return [p for p in self.points if p.change is not None and p.change.mark]


@dataclass(frozen=True)
class History:
    folder: Path
    metric: str
    runs: tuple[RunEntry, ...]  # every folder: finished runs oldest first, then the rest
    trends: tuple[Trend, ...]

    @property
    def finished(self) -> list[RunEntry]:
        return [r for r in self.runs if r.state == FINISHED]


def read_history(folder: Path, *, metric: str = "mean_iou", recipes: Iterable[str] | None = None,
                 last: int | None = None) -> History:
    """The history of every run under `folder` (the last `last` finished ones, with the others of their time)."""
    entries = _entries(folder)
    finished = [e for e in entries if e.state == FINISHED]
    if last is not None and len(finished) > last:
        finished = finished[-last:]
        since = finished[0].started
        entries = [e for e in entries if e.state == NOT_A_RUN or e in finished
                   or (e.state != FINISHED and (since is None or e.started is None or e.started >= since))]
    key = _metric(metric, finished)
    names = _recipes(recipes, finished)
    trends = tuple(_trend(name, finished, key) for name in names)
    return History(folder, key, tuple(entries), trends)


# ---------------------------------------------------------------------------------------------- the folders

def _entries(folder: Path) -> list[RunEntry]:
    if RunFolder(folder).is_run():
        raise HistoryError(f"{folder} is a run folder: give the folder that holds the runs ({folder.parent})")
    children = [p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    entries = [read_entry(p) for p in children]
    if not any(e.state != NOT_A_RUN for e in entries):
        raise HistoryError(f"{folder} holds no run folder (each has a run.json): is it the folder given to"
                           " `run --out`?")
    runs = sorted((e for e in entries if e.state != NOT_A_RUN), key=_when)
    return runs + [e for e in entries if e.state == NOT_A_RUN]


def _when(entry: RunEntry) -> tuple[float, str]:
    return (entry.started.timestamp() if entry.started else float("inf"), entry.name)


def read_entry(folder: Path) -> RunEntry:
    """What one folder is: a finished run (with its summary), or why it cannot be compared."""
    run = RunFolder(folder)
    if not run.is_run():
        return RunEntry(folder, NOT_A_RUN, "no run.json or summary.json")
    record = _read_or_empty(run.record)
    facts: _Facts = {"started": _started(folder, run), "command": _command(record.get("command")),
                     "commit": record.get("commit")}
    if not run.summary.is_file():
        return RunEntry(folder, UNFINISHED, "no summary.json (stopped before its end)", **facts)
    try:
        summary = read_summary(run.summary)
        stopped = [r.name for r in summary.recipes if r.status.stopped_early]
    except (OSError, DamagedRunFile) as exc:
        return RunEntry(folder, UNREADABLE, f"summary.json cannot be read: {exc}", **facts)
    if stopped:
        return RunEntry(folder, UNFINISHED, f"interrupted before {', '.join(stopped)} finished", **facts)
    return RunEntry(folder, FINISHED, "", summary=summary, **facts)


def _read_or_empty(path: Path) -> dict[str, Any]:
    try:
        found = read_json(path)
    except (OSError, DamagedRunFile):
        return {}
    return found if isinstance(found, dict) else {}


def _started(folder: Path, run: RunFolder) -> datetime | None:
    """The folder's own name (runs/<UTC time>/), else when its run.json was written."""
    stamped = stamp_time(folder.name)
    if stamped is not None or not run.record.is_file():
        return stamped
    return datetime.fromtimestamp(run.record.stat().st_mtime).astimezone()


def _command(argv: Any) -> str | None:
    if not isinstance(argv, list) or not argv:
        return None
    program = "python -m orchestrator" if str(argv[0]).endswith("__main__.py") else Path(str(argv[0])).name
    return " ".join([program, *(shlex.quote(str(a)) for a in argv[1:])])


def _metric(metric: str, runs: list[RunEntry]) -> str:
    key = metric_name(metric)
    known = sorted({k for r in runs for row in r.finished_summary.recipes
                    for k, v in (row.metrics or {}).items() if k not in ("n", "errors") and v is not None})
    if runs and key not in known:
        raise HistoryError(f"--metric {metric}: no finished run has it (metrics: {', '.join(known) or 'none'})")
    return key


def _recipes(wanted: Iterable[str] | None, runs: list[RunEntry]) -> list[str]:
    names = list(dict.fromkeys(row.name for r in runs for row in r.finished_summary.recipes))
    if wanted is None:
        return names
    wanted = list(wanted)
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise HistoryError(f"--recipes: no recipe {', '.join(map(repr, unknown))} in these runs"
                           f" (recipes: {', '.join(names) or 'none'})")
    return wanted


# ---------------------------------------------------------------------------------------------- one recipe

@dataclass(frozen=True)
class _Scored:
    """What a recipe's scored run leaves to compare the next one with."""

    run: str
    values: dict[str, float]  # sample id -> its part of the metric
    scoring: dict[str, str]
    settings: dict[str, Any]
    links: list[dict[str, Any]]
    environment: dict[str, str]


def _trend(name: str, runs: list[RunEntry], metric: str) -> Trend:
    points: list[Point] = []
    previous: _Scored | None = None
    for run in runs:
        row = run.finished_summary.row(name)
        if row is None:
            points.append(Point(run.name, None))
            continue
        value = (row.metrics or {}).get(metric)
        interval = (row.intervals or {}).get(metric)
        if not row.ok or value is None:
            points.append(Point(run.name, row.status, value, interval))
            continue
        scored = _scored(run, row, metric)
        change = _compare(previous, scored) if previous is not None else None
        points.append(Point(run.name, Status.OK, value, interval, change))
        previous = scored
    return Trend(name, tuple(points))


def _scored(run: RunEntry, row: RecipeRow, metric: str) -> _Scored:
    scoring = scoring_of(row)
    folder = RunFolder(run.folder).recipe(row.name)
    try:
        values = sample_values(read_samples(folder.samples), metric, row.iou_rule)
    except ValueError as exc:
        raise HistoryError(f"{run.folder}, recipe '{row.name}': {exc}") from None
    return _Scored(run.name, values, scoring, dict(row.recipe or {}), list(row.lineage),
                   _environment(_read_or_empty(folder.summary), row))


def scoring_of(row: RecipeRow) -> dict[str, str]:
    """How a recipe's samples were scored: its box format and its IoU rule, as recorded."""
    return {"box format": str((row.recipe or {}).get("box_format")), "threshold rule": str(row.iou_rule)}


def _environment(recipe_summary: dict[str, Any], row: RecipeRow) -> dict[str, str]:
    versions = (recipe_summary.get("hello") or {}).get("versions") or {}
    loaded = recipe_summary.get("loaded") or {}
    found = {name: versions.get(name) for name in _VERSIONS} | {name: loaded.get(name) for name in _LOADED}
    found["gpu"] = (row.preflight or {}).get("gpu_name")
    return {k: str(v) for k, v in found.items() if v is not None}


def _compare(before: _Scored, now: _Scored) -> Change:
    """The change from `before` to `now`: not compared when they scored differently or share no sample; else the
    paired difference, with what differs between their setups."""
    scoring = [f"{key} {before.scoring[key]} → {now.scoring[key]}" for key in now.scoring
               if before.scoring[key] != now.scoring[key]]
    if scoring:
        return Change(before.run, not_compared=f"scored differently ({'; '.join(scoring)})")
    paired = paired_difference(now.values, before.values)
    if paired is None:
        return Change(before.run, not_compared="no sample scored in both runs")
    return Change(before.run, paired, tuple(_weights(before.links, now.links) + _settings(before, now)
                                            + _software(before.environment, now.environment)))


def _weights(before: list[dict[str, Any]], now: list[dict[str, Any]]) -> list[str]:
    if [link.get("fingerprint") for link in before] == [link.get("fingerprint") for link in now]:
        return []
    if len(before) != len(now):
        return [f"weights changed: a chain of {len(now)} link(s), was {len(before)}"]
    notes = []
    for old, new in zip(before, now, strict=True):
        if old.get("fingerprint") != new.get("fingerprint"):
            kinds = {str(f).partition(":")[0] for f in (old.get("fingerprint"), new.get("fingerprint"))}
            how = "fingerprinted another way" if len(kinds) > 1 else "weights changed"
            notes.append(f"{how}: {new.get('kind')} {new.get('path')} {old.get('fingerprint')} → "
                         f"{new.get('fingerprint')}")
    return notes


def _settings(before: _Scored, now: _Scored) -> list[str]:
    ignore = _SCORING_SETTINGS | {"name"}
    return [f"recipe setting {key}: {old!r} → {new!r}"
            for key, old, new in setting_changes(before.settings, now.settings, ignore=ignore)]


def _software(before: dict[str, str], now: dict[str, str]) -> list[str]:
    """Only what both runs recorded: an older run that did not record a version is not a change."""
    return [f"{key} {before[key]} → {now[key]}" for key in now if key in before and before[key] != now[key]]
