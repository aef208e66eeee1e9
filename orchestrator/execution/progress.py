"""Live progress of a run: which recipe of how many, its phase, a sample bar with rate and ETA, and each
finished recipe's row as it completes. On a terminal it is a rich live display; otherwise (CI logs, pipes) a
few plain lines per recipe, so logs stay readable. With several workers at once (lanes.py: on the GPUs of this
host, or on Ray lanes) each event's data names its lane (data["lane"], a lanes.Lane): the live display keeps a
line per worker a lane runs at once (one per lane with one worker each), and plain lines say which lane ("GPU 2",
"lane 1") and recipe they are about.

Both are supervisor listeners, `listener(event, outcome, data)`, used as context managers around the run:

    with progress_display(console, names, run_dir) as listener:
        rows = Suite(..., listener=listener).run()
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from contract.dataset import DatasetError, open_dataset
from contract.layout import RecipeFolder, RunFolder
from contract.messages import DECODE_GRAPH_ON
from contract.recipe import Settings
from contract.run_row import NEW_RUN_RULE, Status
from orchestrator.execution.lanes import Lane
from orchestrator.results.stats import DEFAULT_THRESHOLDS, metrics
from orchestrator.results.store import read_json, read_samples

_PHASES = {"started": "starting", "hello": "loading", "lineage": "loading", "loaded": "inferring",
           "done": "finishing", "error": "error"}


def expected_samples(recipe_dir: Path) -> int | None:
    """How many samples this attempt will send: the dataset's samples up to the recipe's `limit`, less those
    already recorded (resume, retry), read from the spec the worker was given; None if it cannot be read."""
    try:
        spec = read_json(RecipeFolder(recipe_dir).spec)
        recipe = spec.get("recipe") or {}
        settings = Settings.model_validate({k: v for k, v in recipe.items() if k in Settings.model_fields})
        return open_dataset(spec["dataset"], settings, skip_ids=spec.get("skip_ids") or []).count()  # no images
    except (OSError, KeyError, ValueError, TypeError, AttributeError, DatasetError):
        return None


@dataclass
class _Recipe:
    name: str
    status: str = Status.PENDING  # a recipe's status, or the phase its worker is in
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    note: str = ""


class _Listener:
    """What both displays share: the recipes' states, and the metrics of a finished recipe."""

    def __init__(self, console: Console, names: list[str], run_dir: Path) -> None:
        self.console = console
        self.run_dir = run_dir
        self.recipes = {name: _Recipe(name) for name in names}
        self.names = names
        for name in names:  # a resumed run keeps finished recipes: they send no events
            previous = RunFolder(run_dir).recipe(name).summary
            if previous.is_file():
                stored = read_json(previous)
                if stored.get("status") == Status.OK:
                    self.recipes[name] = _Recipe(name, "ok (kept)", stored.get("metrics") or {},
                                                 stored.get("seconds"))

    def position(self, name: str) -> str:
        index = self.names.index(name) + 1 if name in self.names else 0
        return f"{index}/{len(self.names)}"

    def finish(self, outcome: Any) -> _Recipe:
        state = self.recipes.setdefault(outcome.name, _Recipe(outcome.name))
        state.status = outcome.status
        state.metrics = metrics(read_samples(RunFolder(self.run_dir).recipe(outcome.name).samples))
        state.seconds = outcome.seconds or None
        state.note = outcome.detail.splitlines()[0][:120] if outcome.detail else ""
        return state

    def __enter__(self) -> _Listener:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        return None


class PlainProgress(_Listener):
    """A few lines per recipe, for logs."""

    def __call__(self, event: str, outcome: Any, data: dict[str, Any]) -> None:
        print_ = self._print
        lane: Lane | None = data.get("lane")  # set when several run at once: lines of different recipes interleave
        who = f"[{lane.label}] {outcome.name}: " if lane is not None else ""
        if event == "started":
            total = expected_samples(self.run_dir / outcome.name)
            count = f", {total} samples to evaluate" if total is not None else ""
            where = f" on {lane.label}" if lane is not None else ""
            print_(f"[{self.position(outcome.name)}] {outcome.name}: worker pid {data['pid']} starting{where}{count}")
        elif event == "loaded":
            attn = data["attn"] + (" + kvcache decode" if data.get("decode_attention") == "kvcache" else "")
            attn += " from CUDA graphs" if data.get("decode_graph") == DECODE_GRAPH_ON else ""
            print_(f"    {who}loaded in {data['seconds']:.1f}s ({data['dtype']}, {attn}, {data['device']})")
        elif event == "error":
            print_(f"    {who}error: {data.get('kind')}: {str(data.get('message', '')).splitlines()[0][:200]}")
        elif event == "finished":
            state = self.finish(outcome)
            mean = state.metrics.get("mean_iou")
            score = f", mean IoU {mean:.4f}" if mean is not None else ""
            took = f" in {state.seconds:.1f}s" if state.seconds else ""
            extra = f" ({state.note})" if state.note else ""
            prefix = "" if outcome.pid is not None else f"[{self.position(outcome.name)}] "
            prefix += f"[{lane.label}] " if lane is not None else ""
            print_(f"    {prefix}{outcome.name}: {outcome.status}, {state.metrics.get('n', 0)} samples{score}"
                   f"{took}{extra}")

    def _print(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} samples/s" if speed else "- samples/s", style="cyan")


class LiveProgress(_Listener):
    """A rich live display: the current recipe and phase, a sample bar, and a row per recipe."""

    def __init__(self, console: Console, names: list[str], run_dir: Path) -> None:
        super().__init__(console, names, run_dir)
        self.current: str | None = None
        self.phase = ""
        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            _RateColumn(), TextColumn("ETA"), TimeRemainingColumn(), TimeElapsedColumn(),
                            console=console)
        self.task = self.bar.add_task("waiting", total=None)
        # several workers at once: bars per lane, one per worker it runs at once, each described by its recipe
        self.lanes: dict[Lane, list[TaskID]] = {}
        self.bar_of: dict[str, TaskID] = {}  # the bar of each recipe running now
        self.lock = threading.Lock()  # the recipes' threads (lanes.py) report at once
        # transient: the final table (with intervals) replaces the live one when the run ends
        self.live = Live(console=console, get_renderable=self.render, refresh_per_second=4, transient=True)

    def __enter__(self) -> LiveProgress:
        self.live.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.live.stop()

    def __call__(self, event: str, outcome: Any, data: dict[str, Any]) -> None:
        name = outcome.name
        if data.get("lane") is not None:
            with self.lock:
                self._lane_event(data["lane"], event, outcome, data)
            self.live.refresh()
            return
        if event == "started":
            self._start(name, data)
        elif event == "sample":
            self.bar.advance(self.task)
        elif event == "loaded":
            self.phase = f"inferring (loaded in {data['seconds']:.1f}s, {data['dtype']}, {data['attn']})"
        elif event in _PHASES:
            self.phase = _PHASES[event]
        if event in _PHASES:
            self.recipes.setdefault(name, _Recipe(name)).status = _PHASES[event]
        if event == "finished":
            state = self.finish(outcome)
            took = f" in {state.seconds:.1f}s" if state.seconds else ""
            self.console.print(f"[{self.position(name)}] {name}: {outcome.status}{took}"
                               + (f" ({state.note})" if state.note else ""), markup=False, highlight=False)
            self.current = None
        self.live.refresh()

    def _lane_event(self, lane: Lane, event: str, outcome: Any, data: dict[str, Any]) -> None:
        """The same events from a recipe placed on a lane: a bar of that lane's (an idle one, or a new one), whose
        description carries recipe and phase."""
        name = outcome.name
        task = self._bar(lane, name)
        if event == "started":
            self.bar.reset(task, total=expected_samples(self.run_dir / name))
        elif event == "sample":
            self.bar.advance(task)
        if event in _PHASES:
            self.recipes.setdefault(name, _Recipe(name)).status = _PHASES[event]
            self.bar.update(task, description=f"{lane.label} · {self.position(name)} {escape(name)} · {_PHASES[event]}")
        if event == "finished":
            state = self.finish(outcome)
            took = f" in {state.seconds:.1f}s" if state.seconds else ""
            self.console.print(f"[{self.position(name)}] [{lane.label}] {name}: {outcome.status}{took}"
                               + (f" ({state.note})" if state.note else ""), markup=False, highlight=False)
            self.bar.update(task, description=f"{lane.label} · idle")
            del self.bar_of[name]

    def _bar(self, lane: Lane, name: str) -> TaskID:
        if name not in self.bar_of:
            self.bar.update(self.task, visible=False)  # the one-recipe bar has nothing to show here
            bars = self.lanes.setdefault(lane, [])
            idle = [t for t in bars if t not in self.bar_of.values()]
            if not idle:
                bars.append(self.bar.add_task("", total=None))
            self.bar_of[name] = idle[0] if idle else bars[-1]
        return self.bar_of[name]

    def _start(self, name: str, data: dict[str, Any]) -> None:
        self.current, self.phase = name, f"starting (worker pid {data['pid']})"
        self.recipes.setdefault(name, _Recipe(name)).status = "starting"
        self.bar.reset(self.task, total=expected_samples(self.run_dir / name), description=escape(name))

    def render(self) -> RenderableType:
        """The live display's frame: the recipes' table, the lanes' bars where there are any."""
        parts: list[RenderableType] = [self._table()]
        if self.lanes:
            parts.append(self.bar)
        elif self.current is not None:
            parts.append(Text.assemble(("Recipe ", "bold"), (self.position(self.current), "bold"), " ",
                                       (self.current, "bold cyan"), f" · {self.phase}"))
            parts.append(self.bar)
        return Group(*parts)

    def _table(self) -> Table:
        table = Table(title="Evaluation progress", title_justify="left")
        table.add_column("Recipe", style="bold")
        table.add_column("Status")
        for title in ("Mean IoU", "Det Rate", *[NEW_RUN_RULE.column(t) for t in DEFAULT_THRESHOLDS], "Samples", "Time"):
            table.add_column(title, justify="right")
        for name in self.names:
            table.add_row(*self._cells(self.recipes[name]), style=_row_style(self.recipes[name].status))
        return table

    def _cells(self, state: _Recipe) -> list[str]:
        m = state.metrics
        keys = [("mean_iou", "{:.4f}"), ("detection_rate", "{:.1%}"),
                *[(NEW_RUN_RULE.key(t), "{:.1%}") for t in DEFAULT_THRESHOLDS]]
        values = [fmt.format(m[key]) if m.get(key) is not None else "" for key, fmt in keys]
        took = f"{state.seconds:.1f}s" if state.seconds else ""
        return [escape(state.name), escape(state.status), *values, str(m.get("n", "")) if m else "", took]


def _row_style(status: str) -> str | None:
    if status == Status.PENDING:
        return "dim"
    if status.startswith(Status.OK):  # "ok (kept)" too
        return None
    if status in ("starting", "loading", "inferring", "finishing"):
        return "cyan"
    return "red"


def progress_display(console: Console, names: list[str], run_dir: Path) -> LiveProgress | PlainProgress:
    """The live display on a terminal, plain lines otherwise."""
    cls = LiveProgress if console.is_terminal else PlainProgress
    return cls(console, names, run_dir)
