"""The run folder, every file name once:

    runs/<UTC time>/run.json                recipes as resolved, environment, command line
    runs/<UTC time>/summary.json            all recipes side by side (metrics, intervals, gates)
    runs/<UTC time>/report.md, report.html
    runs/<UTC time>/<recipe>/spec.json      what the worker was told
    runs/<UTC time>/<recipe>/samples.jsonl  one line per sample, appended as it arrives
    runs/<UTC time>/<recipe>/worker.log     the worker's stdout and stderr
    runs/<UTC time>/<recipe>/summary.json   metrics, lineage, timings, status
    runs/<UTC time>/rescore-<UTC time>/     a rescore, laid out like a run folder
    runs/<UTC time>/.lock                   held (flock) by the one process writing the folder
    runs/<UTC time>/.replaced/<UTC time>/   what a resume set aside (recipes re-run, records of changed samples)
    runs/history.md, history.html           `history runs/`: every run, oldest first (or in its --out)

A merged checkpoint carries lineage.json (MERGE_LINEAGE). Run folders written by earlier versions use the same
names: nothing here may be renamed without reading the old name too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

RUN_RECORD = "run.json"
SUMMARY = "summary.json"  # the run's, and each recipe's in its own folder
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
SPEC = "spec.json"
SAMPLES = "samples.jsonl"
WORKER_LOG = "worker.log"
RESCORE_PREFIX = "rescore-"
MERGE_LINEAGE = "lineage.json"
HISTORY_MD = "history.md"
HISTORY_HTML = "history.html"
LOCK = ".lock"
REPLACED = ".replaced"  # what a resume set aside: .replaced/<UTC time>/<recipe>/ (a recipe evaluated again...)
MERGE_LOCK_SUFFIX = ".merge-lock"  # `merge --out DIR` holds DIR.merge-lock beside DIR while it writes
# Names a recipe's folder may not take: the run folder's own files, with the ".tmp" each is first written as
_RUN_FILES = (RUN_RECORD, SUMMARY, REPORT_MD, REPORT_HTML, HISTORY_MD, HISTORY_HTML, LOCK)
_STAMP = "%Y%m%dT%H%M%SZ"
_STAMP_LENGTH = len("20260101T000000Z")


@dataclass(frozen=True)
class RecipeFolder:
    """One recipe's folder inside a run folder."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def spec(self) -> Path:
        return self.path / SPEC

    @property
    def samples(self) -> Path:
        return self.path / SAMPLES

    @property
    def log(self) -> Path:
        return self.path / WORKER_LOG

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY


@dataclass(frozen=True)
class RunFolder:
    """A run folder (or a rescore folder, laid out the same way)."""

    path: Path

    @property
    def record(self) -> Path:
        return self.path / RUN_RECORD

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def report_md(self) -> Path:
        return self.path / REPORT_MD

    @property
    def report_html(self) -> Path:
        return self.path / REPORT_HTML

    @property
    def lock(self) -> Path:
        return self.path / LOCK

    def recipe(self, name: str) -> RecipeFolder:
        return RecipeFolder(self.path / name)

    def is_run(self) -> bool:
        return self.record.is_file() or self.summary.is_file()


@dataclass(frozen=True)
class RunsFolder:
    """The folder that holds run folders (what `run --out` fills), and where `history` writes by default."""

    path: Path

    @property
    def history_md(self) -> Path:
        return self.path / HISTORY_MD

    @property
    def history_html(self) -> Path:
        return self.path / HISTORY_HTML


def reserved_name(name: str) -> str | None:
    """Why a recipe may not be called `name` (its folder would collide with one of the run folder's own files or
    a rescore's folder), or None. Case does not matter: some file systems ignore it."""
    folded = name.lower()
    for own in _RUN_FILES:
        if folded in (own, own + ".tmp"):
            return f"the run folder has a file of that name ({own})"
    if folded.startswith(RESCORE_PREFIX):
        return f"the run folder's rescores are folders named {RESCORE_PREFIX}<UTC time>"
    return None


def stamp_time(name: str) -> datetime | None:
    """When a folder named by `stamped_folder` was made (UTC), read back from its name; None for another name."""
    try:
        return datetime.strptime(name[:_STAMP_LENGTH], _STAMP).replace(tzinfo=UTC)
    except ValueError:
        return None


def stamped_folder(parent: Path, prefix: str = "") -> Path:
    """A new folder `parent/<prefix><UTC time>` (with -2, -3... for two in the same second), created: each name is
    taken by creating it, so processes started together never get the same folder."""
    stamp = prefix + datetime.now(UTC).strftime(_STAMP)
    parent.mkdir(parents=True, exist_ok=True)
    for suffix in range(1, 10_000):
        folder = parent / (stamp if suffix == 1 else f"{stamp}-{suffix}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(f"{parent}: no free folder name for {stamp} after 9999 tries")
