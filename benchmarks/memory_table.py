"""Estimate against measured GPU memory for every recipe of a run folder (the preflight's record vs the worker's
NVML reading): `python -m benchmarks.memory_table RUN_DIR`. Used after GPU runs to check orchestrator/gpu/memory.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

GIB = 2**30


def rows(run_dir: Path) -> list[str]:
    out = ["| recipe | batch | estimate (no margin) | estimate + margin | measured (NVML) | error without margin |",
           "|---|---|---|---|---|---|"]
    for path in sorted(run_dir.glob("*/summary.json")):
        summary = json.loads(path.read_text())
        estimate = ((summary.get("preflight") or {}).get("estimate_used")
                    or (summary.get("preflight") or {}).get("estimate") or {})
        measured = (summary.get("done") or {}).get("nvml_used_bytes")
        needed, total = estimate.get("needed_bytes"), estimate.get("total_bytes")
        if not (needed and measured):
            continue
        with_margin = f"{total / GIB:.2f} GiB" if total is not None else "-"  # preflight records always have it
        out.append(f"| {summary['name']} | {estimate.get('batch_size')} | {needed / GIB:.2f} GiB "
                   f"| {with_margin} | {measured / GIB:.2f} GiB | {(needed - measured) / measured:+.1%} |")
    return out


if __name__ == "__main__":
    for run in sys.argv[1:]:
        print("\n".join(rows(Path(run))))
