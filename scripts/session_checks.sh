#!/bin/bash
# One device call's checks of issue 18's decode graphs, each bounded so that a slow one cannot take the rest:
#   bash scripts/session_checks.sh OUT
# the trained demo family (packed, the default), the 7B family's graph profile (profile_gpu.py --part graph),
# the two other families' memory and parity (gpu_families.py) and the worker's largest imports.
set -u
out=${1:?usage: session_checks.sh OUT}
timeout 100 python3 -m orchestrator run recipes.toml --device cuda --out /tmp/demo > "$out/demo.log" 2>&1
echo "demo rc=$?"; grep -E "mean IoU|eagerly|Batch parity" "$out/demo.log"
python3 - <<'PY'
import json, pathlib
runs = sorted(pathlib.Path("/tmp/demo").glob("*/"))
for folder in sorted(runs[-1].iterdir()) if runs else []:
    summary = folder / "summary.json"
    if summary.exists():
        print(folder.name, json.loads(summary.read_text()).get("decode_graph"))
PY
timeout 150 python3 scripts/profile_gpu.py --work /tmp/prof --out "$out" --part graph > "$out/profile.log" 2>&1
echo "profile rc=$?"; grep -E "^\[\+.*graph " "$out/profile.log" | cut -c1-700
timeout 110 python3 scripts/gpu_families.py check --work /tmp/gpu_families --out "$out" --samples 40 \
  --batches 40 --no-lora > "$out/families_stdout.log" 2>&1
echo "families rc=$?"; grep -E "loaded in|eagerly|Batch parity" "$out/run.log" | head; cat "$out/gpu_families.md"
timeout 30 python3 scripts/import_probe.py --importtime > "$out/importtime.log" 2>&1; head -20 "$out/importtime.log"
