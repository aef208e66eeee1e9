#!/bin/bash
# The first worker's start-up on the 7B of scripts/bench_gpu.py (GPU): one recipe (base, 200 samples, batch 200,
# parity off) twice, each a fresh `orchestrator run`; prints its spawn-to-hello, imports, load and spawn-to-loaded.
set -u
out=${1:?usage: startup_probe.sh OUT}
python3 scripts/bench_gpu.py build --models /tmp/bench/models > "$out/build.log" 2>&1
python3 -c "import sys; sys.path.insert(0, '.'); from pathlib import Path; from scripts.bench_gpu import build_dataset; build_dataset(Path('/tmp/bench/data'), 200)"
cat > startup-probe.toml <<TOML
[defaults]
dataset = "/tmp/bench/data/grounding.jsonl"
prompt = "{prompt} Answer with its bounding box."
max_new_tokens = 32
min_new_tokens = 32
batch_size = 200
dtype = "bfloat16"
parity_check = 0

[[recipe]]
name = "base"
model = "/tmp/bench/models/base"
TOML
for i in 1 2; do
  python3 -m orchestrator run startup-probe.toml --device cuda --out /tmp/startup-$i > "$out/startup-$i.log" 2>&1
  python3 - /tmp/startup-$i <<'PY'
import json, pathlib, sys
run = sorted(pathlib.Path(sys.argv[1]).iterdir())[-1]
s = json.loads((run / "base" / "summary.json").read_text())
t, w, l = s["timings"], s["done"]["timings"], s["loaded"]
print(json.dumps({"spawn_to_hello": t.get("spawn_to_hello"), "imports": w.get("imports"), "load": w.get("load"),
                  "loaded_at": w.get("loaded_at"), "spawn_to_loaded": t["spawn_to_hello"] - w["imports"] + w["loaded_at"],
                  "staged_s": l.get("staged_s"), "prestaged_wait_s": l.get("prestaged_wait_s"),
                  "cuda_init_s": l.get("cuda_init_s"), "root_s": l.get("root_s"), "generate": w.get("generate"),
                  "inference": w.get("inference"), "wall": s.get("seconds")}))
PY
done
