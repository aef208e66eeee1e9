"""Batch invariance: the worker generates the first batch's first samples again one at a time and compares; a
disagreement is a warning naming the samples, in the terminal, report.md, report.html and summary.json. The demo
family agrees (tests/test_run_e2e.py, tests/test_families.py); a disagreement is made with the test-only fault
switch (worker/faults.py: alter@parity:N changes the N-th text generated alone)."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import only_run_dir, run_cli, write_recipes

BODY = """
[[recipe]]
name = "checked"
model = "{models}/base"
[[recipe]]
name = "off"
model = "{models}/base"
parity_check = 0
[[recipe]]
name = "few"
model = "{models}/r1-llm-only"
parity_check = 2
"""


def test_a_disagreement_is_a_warning_naming_the_sample(demo: dict, tmp_path: Path) -> None:
    recipes = write_recipes(tmp_path, BODY.format(models=demo["root"] / "models"), demo, limit=4, batch_size=4)
    result = run_cli("run", str(recipes), "--out", str(tmp_path / "runs"), "--device", "cpu",
                     env={"EVALORCH_FAULT": "checked:alter@parity:3"})
    assert result.returncode == 0, result.stdout + result.stderr  # a warning, not a failure
    run_dir = only_run_dir(tmp_path / "runs")
    rows = {r["name"]: r for r in json.loads((run_dir / "summary.json").read_text())["recipes"]}
    checked = rows["checked"]["parity"]
    assert checked["enabled"] and checked["checked"] == 4 and checked["agreed"] == 3 and checked["batch_size"] == 4
    (wrong,) = checked["disagreements"]
    samples = [json.loads(line) for line in (run_dir / "checked" / "samples.jsonl").read_text().splitlines()]
    third = samples[2]  # the third sample of the first (only) batch, in the order the worker sent them
    assert wrong["id"] == third["id"] and wrong["batched"] == third["text"] and wrong["alone"] != third["text"]
    assert rows["off"]["parity"] == {"enabled": False}
    few = rows["few"]["parity"]
    assert few["checked"] == 2 and few["agreed"] == 2 and few["disagreements"] == []
    stdout = " ".join(result.stdout.split())  # rich wraps long lines
    assert "Warning: checked: batch parity FAILED: 1 of 4 sample(s)" in stdout and third["id"] in stdout
    report = (run_dir / "report.md").read_text()
    assert "## Batch parity" in report and "batch parity FAILED" in report and third["id"] in report
    assert "few: batch parity: 2 of 2 sample(s)" in report
    assert "batch parity FAILED" in (run_dir / "report.html").read_text()
