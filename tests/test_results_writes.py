"""Writing results when the disk is full or the run folder cannot be written: a clear error naming the path, what
was written before still valid (never half a line), and `--resume` continuing once there is space.

A real full disk where the test may mount one (a small tmpfs: root on Linux), else those tests are skipped; the
end-to-end run uses the writer's fault switch (EVALORCH_WRITE_FAULT), which fails a chosen write half-way."""

from __future__ import annotations

import errno
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from helpers import only_run_dir, run_cli, write_recipes

from orchestrator.results.store import ResultsWriteError, SampleLog, read_samples, write_json


def _mount(folder: Path, *options: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB file system of its own, unmounted afterwards."""
    disk = tmp_path / "disk"
    _mount(disk, "size=64k")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """A file taking all the space but about `leave` bytes."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while f.write(b"\0" * 4096):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with open(filler, "r+b") as f:
        f.truncate(max(0, filler.stat().st_size - leave))
    return filler


def _record(i: int) -> dict:
    return {"id": f"s{i:04d}", "status": "ok", "text": "x" * 300, "iou": 0.5, "pred": None, "gt": [0, 0, 1, 1],
            "detected": False, "seconds": 0.1}


def test_a_full_disk_keeps_every_line_whole_and_appending_continues_once_there_is_space(small_disk: Path) -> None:
    path = small_disk / "samples.jsonl"
    filler = _fill(small_disk, leave=6000)
    log = SampleLog(path)
    written = 0
    with pytest.raises(ResultsWriteError) as info:
        for i in range(1000):
            log.append(_record(i))
            written += 1
    log.close()
    assert str(info.value) == f"cannot write {path}: No space left on device"
    assert 0 < written < 1000
    data = path.read_bytes()
    assert data.endswith(b"\n") and len(data.splitlines()) == written  # no half line: the cut one is gone
    assert [r["id"] for r in map(orjson.loads, data.splitlines())] == [f"s{i:04d}" for i in range(written)]
    filler.unlink()  # space again: a resumed run appends after the last whole line
    log = SampleLog(path)
    for i in range(written, written + 5):
        log.append(_record(i))
    log.close()
    assert [r["id"] for r in read_samples(path)] == [f"s{i:04d}" for i in range(written + 5)]


def test_a_json_file_that_cannot_be_written_stays_as_it_was(small_disk: Path) -> None:
    path = small_disk / "summary.json"
    write_json(path, {"status": "ok"})
    _fill(small_disk, leave=0)
    with pytest.raises(ResultsWriteError, match=f"cannot write {path}: No space left on device"):
        write_json(path, {"status": "ok", "big": "y" * 100_000})
    assert json.loads(path.read_text()) == {"status": "ok"}
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "summary.json"]  # no .tmp left behind


def test_a_read_only_output_folder_is_a_clear_error_before_anything_runs(demo: dict, tmp_path: Path) -> None:
    out = tmp_path / "readonly"
    _mount(out, "size=64k", "ro")
    try:
        recipes = write_recipes(tmp_path, f'[[recipe]]\nname = "a"\nmodel = "{demo["root"]}/models/base"\n', demo)
        result = run_cli("run", str(recipes), "--out", str(out / "runs"), "--device", "cpu")
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert f"Error: cannot write {out / 'runs'}: Read-only file system" in " ".join(result.stderr.split())


def test_a_write_that_fails_mid_run_stops_it_and_resume_continues(demo: dict, tmp_path: Path) -> None:
    """The third sample line of the first recipe is cut half-way by a full disk (the writer's fault switch): the
    run stops with the path and how to continue; the two lines before are intact; --resume finishes the run."""
    models = demo["root"] / "models"
    recipes = write_recipes(tmp_path, f'[[recipe]]\nname = "a"\nmodel = "{models}/base"\n'
                            f'[[recipe]]\nname = "b"\nmodel = "{models}/r1-llm-only"\n', demo,
                            limit=4, batch_size=2, max_new_tokens=4)
    result = run_cli("run", str(recipes), "--out", str(tmp_path / "runs"), "--device", "cpu", "--no-prestart",
                     env={"EVALORCH_WRITE_FAULT": "samples.jsonl:3"})
    run_dir = only_run_dir(tmp_path / "runs")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    said = " ".join(result.stderr.split())
    assert f"Error: cannot write {run_dir / 'a' / 'samples.jsonl'}: No space left on device." in said
    assert f"continue with --resume {run_dir}" in said
    lines = (run_dir / "a" / "samples.jsonl").read_bytes().splitlines(keepends=True)
    assert len(lines) == 2 and all(line.endswith(b"\n") and orjson.loads(line)["id"] for line in lines)
    assert not (run_dir / "a" / "summary.json").exists() and not (run_dir / "b" / "summary.json").exists()

    resumed = run_cli("run", str(recipes), "--resume", str(run_dir), "--device", "cpu")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    for name in ("a", "b"):
        samples = (run_dir / name / "samples.jsonl").read_bytes().splitlines()
        assert len(samples) == 4 and len({orjson.loads(s)["id"] for s in samples}) == 4, name
        assert json.loads((run_dir / name / "summary.json").read_text())["status"] == "ok"


def test_write_faults_act_only_once_the_entry_point_installed_them(tmp_path: Path, monkeypatch) -> None:
    """The writer asks the installed write faults, which EVALORCH_WRITE_FAULT sets only through the CLI's entry
    point: a library caller with the variable set writes normally; once installed, the planned write fails with
    the planned errno, and the file keeps the whole line before it."""
    from orchestrator.results import write_faults

    monkeypatch.setenv(write_faults.ENV_VAR, "samples.jsonl:2:EROFS")
    (tmp_path / "plain").mkdir()
    plain = SampleLog(tmp_path / "plain" / "samples.jsonl")
    for n in range(3):
        plain.append({"id": f"s{n}"})
    plain.close()
    assert len(plain.path.read_bytes().splitlines()) == 3  # not installed: the variable alone fails nothing

    write_faults.install_from_env()
    try:
        failing = SampleLog(tmp_path / "samples.jsonl")
        failing.append({"id": "s0"})
        with pytest.raises(ResultsWriteError, match="Read-only file system"):
            failing.append({"id": "s1"})
        failing.close()
        assert failing.path.read_bytes() == b'{"id":"s0"}\n'  # the failed line cut back off, the first whole
    finally:
        monkeypatch.delenv(write_faults.ENV_VAR)
        write_faults.install_from_env()
