"""Are a 7B model's GEMMs bitwise repeatable while another process uses the same GPU? (issue 18: a packed suite's
LoRA recipes gave texts that differed from run to run, an unpacked suite's never did.)

    python scripts/determinism_probe.py --out DIR [--repeats 20] [--seconds 60]

For each shape (Qwen2-VL-7B's projections and a rank-16 LoRA's A and B, at decode and prefill sizes, bf16 as the
model runs them) the output is computed once on an idle GPU, then `repeats` times with the GPU idle and `repeats`
times while a second process runs large matmuls on it; each time it is compared bitwise with the first. The same is
done with `torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False` and under
`torch.use_deterministic_algorithms(True)` (CUBLAS_WORKSPACE_CONFIG=:4096:8). Writes DIR/determinism.json and prints
a table. GPU only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HOG = """
import sys, time, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
end = time.time() + float(sys.argv[1])
print("hog running", flush=True)
while time.time() < end:
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
"""
# (name, rows, inner, outer): y = x @ W.T with x (rows, inner), W (outer, inner)
SHAPES = [
    ("lora_A decode", 200, 3584, 16), ("lora_B decode", 200, 16, 3584), ("q_proj decode", 200, 3584, 3584),
    ("k_proj decode", 200, 3584, 512), ("mlp_up decode", 200, 3584, 18944), ("lm_head decode", 200, 3584, 152064),
    ("lora_A prefill", 65536, 3584, 16), ("lora_B prefill", 65536, 16, 3584), ("q_proj prefill", 65536, 3584, 3584),
    ("lora_A batch 1", 1, 3584, 16), ("q_proj batch 1", 1, 3584, 3584),
]


def measure(torch, repeats: int) -> dict[str, int]:
    """Per shape: how many of `repeats` outputs differ bitwise from the first, and the first's checksum (the
    same inputs each time, so conditions compare too)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    found = {}
    for name, rows, inner, outer in SHAPES:
        x = torch.randn(rows, inner, device="cuda", dtype=torch.bfloat16, generator=generator)
        w = torch.randn(outer, inner, device="cuda", dtype=torch.bfloat16, generator=generator) / inner ** 0.5
        first = torch.nn.functional.linear(x, w)
        torch.cuda.synchronize()
        differ = 0
        for _ in range(repeats):
            again = torch.nn.functional.linear(x, w)
            differ += int(not torch.equal(first, again))
        found[name] = differ
        found[name + " sum"] = float(first.double().abs().sum())
    return found


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=90.0)
    args = parser.parse_args()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    hog = subprocess.Popen([sys.executable, "-c", HOG, str(args.seconds)], stdout=subprocess.PIPE, text=True)
    results: dict[str, dict[str, int]] = {}
    try:
        results["idle, default"] = measure(torch, args.repeats)
        hog.stdout.readline()  # the hog's matmuls have started
        time.sleep(1)
        results["busy, default"] = measure(torch, args.repeats)
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        results["busy, no reduced-precision reduction"] = measure(torch, args.repeats)
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
        torch.use_deterministic_algorithms(True)
        results["busy, deterministic algorithms"] = measure(torch, args.repeats)
        results["hog still running"] = {"yes": int(hog.poll() is None)}
    finally:
        hog.kill()
    (args.out / "determinism.json").write_text(json.dumps(results, indent=1))
    columns = [k for k in results if k != "hog still running"]
    print("| shape | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, *_ in SHAPES:
        print(f"| {name} | " + " | ".join(f"{results[c][name]}/{args.repeats} differ" for c in columns) + " |")
    sums = {c: [results[c][name + " sum"] for name, *_ in SHAPES] for c in columns}
    print("first outputs equal across conditions:",
          {c: [a == b for a, b in zip(sums[columns[0]], sums[c], strict=True)] for c in columns[1:]})
    print("hog still running at the end:", bool(results["hog still running"]["yes"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
