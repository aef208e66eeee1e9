#!/bin/bash
# A/B of decode_attention on the trained demo family (GPU): r3-two-stage with kvcache twice and transformers once,
# in one run; prints how many per-sample texts agree between each pair.
set -u
out=${1:?usage: decode_ab.sh OUT}
sed '/^\[\[recipe\]\]/,$d' recipes.toml > ab-probe.toml
for name in kv1:kvcache tr:transformers kv2:kvcache trb:transformers; do
  printf '\n[[recipe]]\nname = "%s"\nmodel = "examples/demo-family/r3-stage2"\ndecode_attention = "%s"\n' "${name%%:*}" "${name##*:}" >> ab-probe.toml
done
python3 -m orchestrator run ab-probe.toml --device cuda --out /tmp/ab-runs --max-workers-per-gpu 1 > "$out/ab.log" 2>&1
grep "mean IoU\|loaded in" "$out/ab.log"
python3 - <<'PY'
import json, pathlib, itertools
run = sorted(pathlib.Path("/tmp/ab-runs").iterdir())[-1]
texts = {n: {s["id"]: s.get("text") for s in map(json.loads, (run / n / "samples.jsonl").read_text().splitlines())}
         for n in ("kv1", "tr", "kv2", "trb")}
for a, b in itertools.combinations(texts, 2):
    diff = [i for i in texts[a] if texts[a][i] != texts[b].get(i)]
    print(a, b, "equal", len(texts[a]) - len(diff), "of", len(texts[a]), "differ:", diff[:5])
PY
