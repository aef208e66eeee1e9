"""Are a 7B model's GEMMs bitwise repeatable while another process uses the same GPU? (issue 18: a packed suite's
LoRA recipes gave texts that differed from run to run, an unpacked suite's never did.)

    python scripts/determinism_probe.py gemm --out DIR [--repeats 20] [--seconds 60]
    python scripts/determinism_probe.py chains --models DIR --dataset FILE --out DIR [--together 4] [--samples 8]

For each shape (Qwen2-VL-7B's projections and a rank-16 LoRA's A and B, at decode and prefill sizes, bf16 as the
model runs them) the output is computed once on an idle GPU, then `repeats` times with the GPU idle and `repeats`
times while a second process runs large matmuls on it; each time it is compared bitwise with the first. The same is
done with `torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False` and under
`torch.use_deterministic_algorithms(True)` (CUBLAS_WORKSPACE_CONFIG=:4096:8). Writes DIR/determinism.json and prints
a table. GPU only.

`chains` loads each recipe of scripts/bench_gpu.py's family (its models folder) with the worker's own loader, in
`together` processes at once and then in one process alone, and compares across processes: a fingerprint of every
loaded tensor (adapter and base apart), the logits of one forward pass over `samples` samples (default 8; the
bench's batch is 200), and a 32-token generate's
texts. So a difference is placed: in the weights as loaded, in the computation, or neither.
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


def measure(torch, repeats: int) -> dict[str, float]:
    """Per shape: how many of `repeats` outputs differ bitwise from the first, and the first's checksum (the
    same inputs each time, so conditions compare too)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    found: dict[str, float] = {}  # counts of differing outputs, and checksums
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


CHAINS = {"base": ["base"], "r1-llm-only": ["base", "r1-llm-only"], "r3-two-stage": ["r3-stage1", "r3-stage2"],
          "r4-joint": ["base", "r4-joint"]}


def child(models: Path, dataset: Path, recipe_name: str, out: Path, device: str, count: int) -> None:
    """One process: load the recipe's chain as a worker does, then fingerprint weights, logits and texts."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch

    from contract.dataset import open_dataset
    from contract.recipe import Recipe
    from contract.spec import ChainLink
    from worker.device import CPU, Cuda
    from worker.generation import generate
    from worker.infer import prepare_batch
    from worker.load import load_chain

    links = CHAINS[recipe_name]
    chain = [ChainLink(str(models / links[0]), "full", "q", 1)] + [ChainLink(str(models / name), "adapter", "q", 1)
                                                                     for name in links[1:]]
    attn = "flash_attention_2" if device.startswith("cuda") else "eager"
    recipe = Recipe(name=recipe_name, model=str(models / links[-1]), dataset=str(dataset), attn=attn)
    worker_device = Cuda() if device.startswith("cuda") else CPU
    model, processor, _ = load_chain(chain, recipe, worker_device)
    weights = {}
    for name, tensor in model.state_dict().items():
        bits = tensor.detach().contiguous().view(-1).view(torch.int16 if tensor.element_size() == 2 else torch.uint8)
        position = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 1000003
        weights[name] = int((bits.to(torch.int64) * position).sum())
    samples = list(open_dataset(dataset, recipe))[:count]
    batch = prepare_batch(processor, samples, recipe.prompt, worker_device)
    with torch.inference_mode():
        logits = model(**batch.inputs.to(device)).logits[:, -1].float()
    texts = generate(model, processor, batch.inputs, device, max_new_tokens=32).texts
    out.write_text(json.dumps({"weights": weights, "logits": float(logits.double().abs().sum()),
                               "logits_max": float(logits.abs().max()), "texts": texts}))


def chains(models: Path, dataset: Path, out: Path, together: int, device: str, count: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    names = list(CHAINS)
    runs: dict[str, dict[str, dict]] = {}
    for label, groups in (("together", [names[i:i + together] for i in range(0, len(names), together)]),
                          ("alone", [[name] for name in names])):
        runs[label] = {}
        for group in groups:
            procs = {name: subprocess.Popen([sys.executable, __file__, "child", "--models", str(models),
                                             "--dataset", str(dataset), "--recipe", name, "--device", device,
                                             "--samples", str(count), "--out", str(out / f"{label}-{name}.json")])
                     for name in group}
            for name, proc in procs.items():
                if proc.wait() != 0:
                    raise SystemExit(f"{label} {name}: exit {proc.returncode}")
                runs[label][name] = json.loads((out / f"{label}-{name}.json").read_text())
    print("| recipe | tensors differing (adapter / base) | logits equal | texts equal |")
    print("|---|---|---|---|")
    for name in names:
        a, b = runs["together"][name], runs["alone"][name]
        differ = [k for k in a["weights"] if a["weights"][k] != b["weights"][k]]
        lora = [k for k in differ if "lora_" in k]
        print(f"| {name} | {len(lora)} / {len(differ) - len(lora)} of {len(a['weights'])} | "
              f"{a['logits'] == b['logits']} ({a['logits']:.6f} vs {b['logits']:.6f}) | "
              f"{sum(x == y for x, y in zip(a['texts'], b['texts'], strict=True))}/{len(a['texts'])} |")
        if differ:
            print("    first differing:", differ[:5])


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    gemm = sub.add_parser("gemm")
    gemm.add_argument("--out", type=Path, required=True)
    gemm.add_argument("--repeats", type=int, default=20)
    gemm.add_argument("--seconds", type=float, default=90.0)
    for name in ("chains", "child"):
        command = sub.add_parser(name)
        command.add_argument("--models", type=Path, required=True)
        command.add_argument("--dataset", type=Path, required=True)
        command.add_argument("--out", type=Path, required=True)
        command.add_argument("--together", type=int, default=4)
        command.add_argument("--device", default="cuda:0")
        command.add_argument("--samples", type=int, default=8)
        command.add_argument("--recipe", default="")
    args = parser.parse_args()
    if args.command == "child":
        child(args.models, args.dataset, args.recipe, args.out, args.device, args.samples)
        return 0
    if args.command == "chains":
        chains(args.models, args.dataset, args.out, args.together, args.device, args.samples)
        return 0
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    hog = subprocess.Popen([sys.executable, "-c", HOG, str(args.seconds)], stdout=subprocess.PIPE, text=True)
    results: dict[str, dict[str, float]] = {}
    try:
        results["idle, default"] = measure(torch, args.repeats)
        assert hog.stdout is not None  # started with stdout=subprocess.PIPE
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
