#!/bin/bash
# The trained demo family (GPU) in several runs, compared per recipe and sample against the first run:
#   packing_ab.sh OUT NAME:WORKERS:STRESS:PARITY[:SETTING] ...   e.g. alone:1:0:8 packed:auto:0:8 stressed:1:14:8
# WORKERS is --max-workers-per-gpu, STRESS the count of busy-looping processes beside the run, PARITY parity_check,
# SETTING one more recipe default (e.g. "decode_graph = false").
set -u
out=${1:?usage: packing_ab.sh OUT NAME:WORKERS:STRESS:PARITY ...}; shift
names=()
for run in "$@"; do
  IFS=: read -r name workers stress parity setting <<< "$run"
  names+=("$name")
  sed "s/^batch_size = 16/batch_size = 16\nparity_check = $parity\n${setting:-}/" recipes.toml > "ab-$name.toml"
  pids=()
  for _ in $(seq 1 "$stress"); do python3 -c "while True: pass" & pids+=($!); done
  python3 -m orchestrator run "ab-$name.toml" --device cuda --out "/tmp/pack-$name" \
    --max-workers-per-gpu "$workers" > "$out/$name.log" 2>&1
  [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}"
  echo "$name: $(grep -c 'mean IoU' "$out/$name.log") recipes"
done
python3 - "${names[@]}" <<'PY'
import json, pathlib, sys
def texts(kind):
    run = sorted(pathlib.Path(f"/tmp/pack-{kind}").iterdir())[-1]
    return {d.name: {s["id"]: s.get("text") for s in map(json.loads, (d / "samples.jsonl").read_text().splitlines())}
            for d in run.iterdir() if (d / "samples.jsonl").exists()}
first, *others = sys.argv[1:]
reference = texts(first)
for other in others:
    got = texts(other)
    cells = []
    for name in sorted(reference):
        diff = sorted(i for i in reference[name] if reference[name][i] != got[name].get(i))
        cells.append(f"{name} {len(reference[name]) - len(diff)}/{len(reference[name])}")
    print(f"{other} vs {first}: " + ", ".join(cells))
PY
