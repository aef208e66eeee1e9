"""benchmarks/import_contention.py, run as on the GPU machine: fresh processes import the worker's modules alone and
several at once, and one more under -X importtime names the largest imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.import_contention import largest_imports

ROOT = Path(__file__).resolve().parent.parent


def test_each_round_reports_every_process_and_the_largest_imports(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.import_contention", "--at-once", "1,2", "--rounds", "1",
                           "--importtime", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    figures = json.loads((tmp_path / "imports.json").read_text())
    assert [len(r) for r in figures["by_count"]["1"]] == [1] and [len(r) for r in figures["by_count"]["2"]] == [2]
    assert all(s > 0 for rounds in figures["by_count"].values() for r in rounds for s in r)
    names = [name for _, name in figures["largest"]]
    assert "worker.loading.processor" in names  # it brings transformers: the largest of the worker's own modules
    assert "| 2 |" in done.stdout and "sklearn" not in (tmp_path / "importtime.txt").read_text()


def test_largest_imports_reads_cumulative_times() -> None:
    text = ("import time: self [us] | cumulative | imported package\n"
            "import time:       100 |        300 |   b\n"
            "import time:      2000 |    2500000 | a\n")
    assert largest_imports(text, 2) == [(2.5, "a"), (0.0003, "b")]


def test_stages_split_the_imports_at_the_processor_and_batch_preparation(tmp_path: Path) -> None:
    """--stages: each process times torch, the processor's imports and load, batch preparation's modules and the
    rest, and says which heavy libraries each stage brought (each listed once, in the stage that imported it)."""
    from benchmarks.gpu_check import SHAPES, qwen2vl_configs
    from benchmarks.import_contention import HEAVY

    processor, _, _ = qwen2vl_configs(SHAPES["7b"])
    processor.save_pretrained(tmp_path / "processor")
    done = subprocess.run([sys.executable, "-m", "benchmarks.import_contention", "--stages",
                           str(tmp_path / "processor"), "--rounds", "2", "--out", str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "out" / "stages.json").read_text())
    assert len(rows) == 2
    for row in rows:
        assert list(row["seconds"]) == ["torch", "processor", "batch preparation", "the rest"]
        assert all(s > 0 for s in row["seconds"].values())
        brought = [name for names in row["heavy_first_imported"].values() for name in names]
        assert len(brought) == len(set(brought)) and set(brought) <= set(HEAVY)  # each once, in one stage
        assert "peft" in row["heavy_first_imported"]["the rest"]  # the model stack's, imported by the worker last
        assert "peft" not in row["heavy_first_imported"]["processor"]  # loading a processor needs no peft
