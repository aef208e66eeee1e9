"""The pieces every way of supervising shares: the lane a recipe runs on (a local GPU or a Ray lane) and how the
progress display names it, the one thread driver (lanes.LaneDriver) with a placer of its own, the one pump that
reads a worker's stream (a real subprocess here), the one reading of a log's end, and the one NVML opener of the
local preflight and a Ray node's."""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from contract.nvml import FAKE_ENV, FakeNvml, open_nvml, write_fake_nvml
from contract.recipe import Recipe
from contract.run_row import RecipeRow, Status
from orchestrator.backends.ray.node import node_nvml
from orchestrator.execution.lanes import Lane, LaneDriver, tagged
from orchestrator.execution.process import LOG_TAIL_BYTES, WorkerProcess, log_tail
from orchestrator.execution.progress import LiveProgress, PlainProgress
from orchestrator.execution.pump import pump
from orchestrator.execution.supervisor import Interrupts, RecipeOutcome, Suite, SuiteOptions
from orchestrator.gpu.preflight import NoGpuDriver, nvml_for, preflight_for
from orchestrator.planning.plan import RecipePlan

# ----------------------------------------------------------------------------- the lane and its label


def test_a_lane_is_a_local_gpu_or_a_ray_lane_never_confused() -> None:
    assert Lane.gpu(2).label == "GPU 2" and Lane.ray(1).label == "lane 1"
    assert Lane.gpu(1) != Lane.ray(1) and len({Lane.gpu(1), Lane.ray(1), Lane.gpu(1)}) == 2


def test_plain_progress_names_a_ray_lane_as_a_lane(tmp_path: Path) -> None:
    text = io.StringIO()
    listener = PlainProgress(Console(file=text, width=200), ["a", "b"], tmp_path)
    outcome = RecipeOutcome("b", pid=7)
    listener("started", outcome, {"pid": 7, "lane": Lane.ray(1)})
    outcome.status = "ok"
    listener("finished", outcome, {"lane": Lane.ray(1)})
    lines = text.getvalue().splitlines()
    assert lines == ["[2/2] b: worker pid 7 starting on lane 1", "    [lane 1] b: ok, 0 samples"]


def test_the_live_display_keeps_a_line_per_ray_lane(tmp_path: Path) -> None:
    console = Console(file=io.StringIO(), width=200, force_terminal=True, color_system=None)
    with LiveProgress(console, ["a", "b"], tmp_path) as listener:
        listener("started", RecipeOutcome("a", pid=10), {"pid": 10, "lane": Lane.ray(0)})
        listener("started", RecipeOutcome("b", pid=11), {"pid": 11, "lane": Lane.ray(1)})
        listener("finished", RecipeOutcome("b", "ok", pid=11), {"lane": Lane.ray(1)})
        Console(file=(frame := io.StringIO()), width=200, color_system=None).print(listener.render())
    shown = frame.getvalue()
    assert "lane 0 · 1/2 a · starting" in shown and "lane 1 · idle" in shown and "GPU" not in shown
    assert "[2/2] [lane 1] b: ok" in console.file.getvalue()


def test_tagged_names_the_lane_and_tells_each_start_first() -> None:
    heard: list[tuple[str, Any]] = []
    listener = tagged(lambda event, outcome, data: heard.append((event, data)), Lane.ray(3),
                      on_start=lambda outcome, data: heard.append(("on_start", data["pid"])))
    outcome = RecipeOutcome("a")
    listener("started", outcome, {"pid": 42})
    listener("sample", outcome, {"id": 1})
    assert heard == [("on_start", 42), ("started", {"pid": 42, "lane": Lane.ray(3)}),
                     ("sample", {"id": 1, "lane": Lane.ray(3)})]


# ----------------------------------------------------------------------------- the driver


class _TimedSuite(Suite):
    """A lane's Suite whose recipes take the seconds their name says ("a-0.3") instead of a worker; it notes
    when each ran, on which thread, and can fail one recipe with an exception."""

    def __init__(self, plans: list[RecipePlan], run_dir: Path, interrupts: Interrupts, log: list[tuple],
                 fail: str = "") -> None:
        super().__init__(plans, run_dir, SuiteOptions(device="cpu"), interrupts=interrupts)
        self.log, self.fail = log, fail

    def run_recipe(self, plan: RecipePlan) -> RecipeRow:
        name = plan.recipe.name
        began = time.monotonic()
        time.sleep(float(name.rpartition("-")[2]))
        self.log.append((name, began, time.monotonic(), threading.current_thread().name))
        if name == self.fail:
            raise RuntimeError(f"{name} broke")
        return RecipeRow(name=name, status=Status.OK)


class _OneEach:
    """A placer: each lane with no recipe running takes the next waiting one."""

    def __init__(self, lanes: list[Lane]) -> None:
        self.lanes, self.ended_names = lanes, []

    def place(self, waiting: list[str], running: Mapping[str, Lane]) -> list[tuple[str, Lane]]:
        free = [lane for lane in self.lanes if lane not in running.values()]
        return list(zip(waiting, free, strict=False))

    def ended(self, name: str) -> None:
        self.ended_names.append(name)


def _plans(*names: str, broken: str = "") -> list[RecipePlan]:
    return [RecipePlan(Recipe(name=n, model="m"), problem="lineage: no such model" if n == broken else None)
            for n in names]


def _driver(tmp_path: Path, plans: list[RecipePlan], interrupts: Interrupts, fail: str = "",
            ) -> tuple[LaneDriver, list[tuple], _OneEach]:
    log: list[tuple] = []
    lanes = [Lane.ray(0), Lane.ray(1)]
    suites = {lane: _TimedSuite(plans, tmp_path, interrupts, log, fail) for lane in lanes}
    placer = _OneEach(lanes)
    recorder = Suite(plans, tmp_path, SuiteOptions(device="cpu"), interrupts=interrupts)
    return LaneDriver(plans, suites, recorder, placer, interrupts), log, placer


def test_the_driver_runs_one_recipe_per_free_lane_and_gives_rows_in_file_order(tmp_path: Path) -> None:
    plans = _plans("a-1.0", "b-0.1", "c-0.1", "gone-0", broken="gone-0")
    driver, log, placer = _driver(tmp_path, plans, Interrupts())
    rows = driver.run()
    assert [row.name for row in rows] == ["a-1.0", "b-0.1", "c-0.1", "gone-0"]
    assert rows[3].status == Status.ERROR  # no lane needed: recorded by the recorder, never run on a lane
    ran = {name: (began, ended, thread) for name, began, ended, thread in log}
    assert set(ran) == {"a-1.0", "b-0.1", "c-0.1"}
    assert ran["c-0.1"][0] >= ran["b-0.1"][1]  # c waited for a free lane: b's, while a still ran
    assert ran["c-0.1"][1] < ran["a-1.0"][1]
    assert {thread for _, _, thread in ran.values()} == {"evalorch-ray0-a-1.0", "evalorch-ray1-b-0.1",
                                                         "evalorch-ray1-c-0.1"}
    assert sorted(placer.ended_names) == ["a-1.0", "b-0.1", "c-0.1"]


def test_after_a_recipe_threads_exception_nothing_new_starts_and_it_is_raised(tmp_path: Path) -> None:
    plans = _plans("a-0.5", "b-0.1", "c-0.1")
    driver, log, _ = _driver(tmp_path, plans, Interrupts(), fail="b-0.1")
    with pytest.raises(RuntimeError, match=r"b-0\.1 broke"):
        driver.run()
    assert [entry[0] for entry in log] == ["b-0.1", "a-0.5"]  # a ran to its end; c never started


def test_after_an_interrupt_the_waiting_recipes_are_recorded_as_skipped(tmp_path: Path) -> None:
    plans = _plans("a-0.5", "b-0.5", "c-0.1")
    interrupts = Interrupts()
    driver, log, placer = _driver(tmp_path, plans, interrupts)
    threading.Timer(0.2, interrupts._on_sigint).start()  # what one Ctrl-C's handler does
    rows = driver.run()
    assert [(row.name, row.status) for row in rows] == [("a-0.5", "ok"), ("b-0.5", "ok"),
                                                              ("c-0.1", "skipped")]
    assert "c-0.1" in placer.ended_names and "c-0.1" not in [entry[0] for entry in log]


# ----------------------------------------------------------------------------- the pump, a log's end


_STREAM = """
import sys, time
fd = int(sys.argv[sys.argv.index("--result-fd") + 1])
with open(fd, "wb", buffering=0) as pipe:
    pipe.write(b'{"type": "error", "kind": "data", "message": "one"}\\nnot json\\n')
    time.sleep(1.2)
    pipe.write(b'{"type": "merged", "rec')
"""


class _Heard:
    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.unreadable: list[str] = []
        self.ticks: list[tuple[float, float]] = []

    def on_message(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    def on_unreadable(self, problem: str) -> None:
        self.unreadable.append(problem)

    def on_tick(self, now: float, last_message: float) -> None:
        self.ticks.append((now, last_message))


def _stream_worker(tmp_path: Path, body: str) -> WorkerProcess:
    (tmp_path / "fake_stream.py").write_text(body)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return WorkerProcess([], env, tmp_path / "worker.log", module="fake_stream")


def test_the_pump_decodes_a_real_workers_stream_and_returns_a_line_cut_mid_way(tmp_path: Path) -> None:
    worker = _stream_worker(tmp_path, _STREAM)
    heard = _Heard()
    try:
        cut = pump(worker, heard, time.monotonic())
        assert worker.wait(10.0) == 0
    finally:
        worker.cleanup()
    assert heard.messages == [{"type": "error", "kind": "data", "message": "one"}]
    assert len(heard.unreadable) == 1 and heard.unreadable[0].startswith("not JSON: b'not json'")
    assert cut == b'{"type": "merged", "rec'
    assert any(now > last for now, last in heard.ticks)  # ticks go on while the worker is silent


def test_a_reader_that_raises_on_a_tick_ends_the_pump(tmp_path: Path) -> None:
    worker = _stream_worker(tmp_path, "import time\ntime.sleep(60)\n")

    class Impatient(_Heard):
        def on_tick(self, now: float, last_message: float) -> None:
            worker.stop("test timeout", grace=0.5)
            raise TimeoutError("stopped")

    try:
        with pytest.raises(TimeoutError):
            pump(worker, Impatient(), time.monotonic())
        assert worker.poll() is not None  # stopped by the tick
    finally:
        worker.cleanup()


def test_log_tail_gives_the_last_bytes_or_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    log.write_text("".join(f"line {i:05d}\n" for i in range(2000)))
    text = log.read_text()
    assert log_tail(log) == text[-LOG_TAIL_BYTES:]
    assert log_tail(log, lines=3) == "line 01997\nline 01998\nline 01999"
    assert log_tail(tmp_path / "missing.log") == "" and log_tail(tmp_path / "missing.log", lines=3) == ""


# ----------------------------------------------------------------------------- NVML, opened in one place


def test_nvml_is_opened_alike_for_the_local_preflight_and_a_ray_node(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FAKE_ENV, raising=False)
    assert nvml_for("cpu") is None and node_nvml("cpu") == (None, None) and preflight_for("cpu", None) is None
    fake = tmp_path / "gpus.json"
    write_fake_nvml(fake, [{"name": "Fake", "total_bytes": 10, "free_bytes": 5}])
    monkeypatch.setenv(FAKE_ENV, str(fake))  # the tests' fake NVML: on cpu too
    assert isinstance(nvml_for("cpu"), FakeNvml) and isinstance(node_nvml("cpu")[0], FakeNvml)
    fake.write_text("not json")
    nvml, problem = node_nvml("cpu")
    assert nvml is None and problem is not None and "not a readable fake NVML file" in problem


@pytest.mark.skipif(open_nvml() is not None, reason="this machine has an NVIDIA driver")
def test_cuda_without_a_driver_is_one_error_here_and_on_a_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FAKE_ENV, raising=False)
    with pytest.raises(NoGpuDriver, match="NVML finds no NVIDIA driver here: run on a GPU machine"):
        preflight_for("cuda", None)
    assert preflight_for("cuda", None, required=False) is None  # `plan`: no GPU, no verdict
    nvml, problem = node_nvml("cuda")
    assert nvml is None and problem == f"--device cuda, but NVML finds no NVIDIA driver on node {socket.gethostname()}"
