"""The memory estimate against NVML for two more families, at real shapes with random weights, in one command:

    python3 -m benchmarks.gpu_families check --work /tmp/gpu_families --out "$OUT"            # on the GPU machine
    python3 -m benchmarks.gpu_families check --work /tmp/gpu_families --out /tmp/o --small    # the flow on a CPU

What it does:
  build  a child process makes random-weight checkpoints with tools/make_families.py's builders, written by
         transformers' own save_pretrained (so their files are what a fine-tune's are): Qwen2.5-VL at the 3B shape
         (36 x 2048 text, 32-block 1280-wide vision tower; min/max pixels 56*56 / 1280*28*28) and InternVL at the
         InternVL3-2B shape (InternViT-300M: 24 x 1024, 448 px tiles, up to 12 + a thumbnail; Qwen2.5-1.5B text:
         28 x 1536), each with a LoRA adapter (r=8 on the language model's q/v), bfloat16. The child exits before
         anything is measured, so its CUDA context is gone.
  run    one `python -m orchestrator run` over both families at batch 8 and 32 (and each LoRA at 32), 32 images of
         448x448 to 560x420 (Qwen2.5-VL: 256-300 image tokens; InternVL: 1 to 13 tiles, up to 3328 tokens), 32 new
         tokens, flash_attention_2; box formats by "auto" (qwen25vl, internvl); the batch-parity check on.
  table  per recipe: the parent's estimate (no margin) part by part, NVML's measure of the worker process, the
         error (estimate - measured) / measured (target: +0 to +15%), torch's peaks, the batch parity.

--small builds tiny shapes on the CPU and runs there (no NVML: no measured column): the same flow, for a CPU.
The table goes to stdout and OUT/gpu_families.md; the CLI's output to OUT/run.log, the build's to OUT/build.log.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.gpu_check import Check, in_gib, recipe_summaries
from contract.run_row import Status
from orchestrator.gpu.memory import read_workload
from orchestrator.planning.plan import make_plans
from orchestrator.planning.recipes import load_recipe_file
from tools.synthetic import red_rectangles

ROOT = Path(__file__).resolve().parent.parent

FAMILIES = ("qwen2_5_vl", "internvl")
IMAGE_SIZES = [(448, 448), (560, 420), (420, 560), (504, 504)]
SAMPLES, BATCHES, NEW_TOKENS = 32, (8, 16, 32), 32
SMALL_IMAGE_SIZES = [(100, 75), (130, 90), (75, 110), (150, 61)]
SMALL_SAMPLES, SMALL_BATCHES = 8, (2, 8)


def shapes(small: bool) -> dict:
    """Each family's Shape (tools/make_families.py): the real sizes, or tiny ones with --small."""
    from tools.make_families import Shape

    if small:
        return {name: Shape() for name in FAMILIES}
    return {
        "qwen2_5_vl": Shape(hidden=2048, layers=36, heads=16, kv_heads=2, intermediate=11008, vocab=151936, tie=True,
                            vision={"hidden": 1280, "layers": 32, "heads": 16, "intermediate": 3420,
                                    "full": [7, 15, 23, 31]},
                            image={"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280}),
        "internvl": Shape(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=151936, tie=True,
                          vision={"hidden": 1024, "layers": 24, "heads": 16, "intermediate": 4096},
                          image={"size": {"height": 448, "width": 448}, "max_patches": 12}),
    }


# ----------------------------------------------------------------------------- building (a child process)


def build(name: str, models: Path, device: str, small: bool) -> None:
    """`models/<name>` (random weights, bfloat16 on CUDA) and `models/<name>-lora`, through save_pretrained."""
    import torch

    from tools.make_families import family_parts, save_lora

    parts = family_parts(name, shapes(small)[name])
    dtype = torch.float32 if small else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = parts.model_class._from_config(parts.config, dtype=dtype).eval()
    model.generation_config = parts.generation
    base = models / name
    model.save_pretrained(base)
    parts.processor.save_pretrained(base)
    save_lora(model, models / f"{name}-lora", base, seed=1)


# ----------------------------------------------------------------------------- the check


def _recipes(work: Path, dataset: Path, attn: str, batches: tuple[int, ...], lora: bool) -> Path:
    models = work / "models"
    body = ""
    for name in FAMILIES:
        for batch in batches:
            body += f'[[recipe]]\nname = "{name}-b{batch}"\nmodel = "{models / name}"\nbatch_size = {batch}\n'
        if lora:
            body += (f'[[recipe]]\nname = "{name}-lora-b{batches[-1]}"\nmodel = "{models / (name + "-lora")}"\n'
                     f"batch_size = {batches[-1]}\n")
    path = work / "families.toml"
    path.write_text(f'[defaults]\ndataset = "{dataset}"\nprompt = "{{prompt}} Answer with its bounding box."\n'
                    f'max_new_tokens = {NEW_TOKENS}\nattn = "{attn}"\n{body}')
    return path


def _estimates(recipes: Path) -> dict[str, dict]:
    """Each recipe's estimate on CUDA at its own batch size, from files (what the preflight computes)."""
    recipe_file = load_recipe_file(recipes)
    found = {}
    for plan in make_plans(recipe_file, recipe_file.recipes):
        batch = plan.recipe.batch_size
        assert isinstance(batch, int)  # _recipes gives every recipe its batch size, never "auto"
        estimate = read_workload(plan.recipe, plan.chain or [], "cuda").estimate(batch)
        found[plan.recipe.name] = estimate.record()
    return found


def _row(summary: dict, estimate: dict) -> str:
    done = summary.get("done") or {}
    needed, measured = estimate["needed_bytes"], done.get("nvml_used_bytes")
    error = f"{(needed - measured) / measured:+.1%}" if measured else "n/a"
    parity = summary.get("parity") or {}
    load_peak = (summary.get("loaded") or {}).get("peak_bytes")
    agreed = f"{parity.get('agreed')}/{parity.get('checked')}" if parity.get("checked") else "-"
    return (f"| {summary['name']} | {summary['status']} | {summary['recipe']['box_format']} | "
            f"{estimate['image_tokens']} | {in_gib(estimate['weights_bytes'])} | {in_gib(estimate['adapter_bytes'])} | "
            f"{in_gib(estimate['kv_cache_bytes'])} | {in_gib(estimate['vision_bytes'])} | "
            f"{in_gib(estimate['prefill_bytes'] + estimate['lora_bytes'])} | {in_gib(estimate['allocator_bytes'])} | "
            f"{in_gib(needed)} | {in_gib(measured)} | "
            f"**{error}** | {in_gib(load_peak)} | {in_gib(done.get('peak_bytes'))} | "
            f"{in_gib(done.get('peak_reserved_bytes'))} | {agreed} |")


def check(work: Path, out: Path, small: bool, batches: tuple[int, ...] | None = None, lora: bool = True,
          samples: int | None = None) -> int:
    runner = Check(work, out, small)
    runner.environment()
    started = time.monotonic()
    with open(out / "build.log", "w") as log:
        built = subprocess.run([sys.executable, "-m", "benchmarks.gpu_families", "build",
                                "--models", str(work / "models"), "--device", runner.device,
                                *(["--small"] if small else []), *FAMILIES],
                               stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if built.returncode != 0:
        runner.emit(f"building the models failed: see {out / 'build.log'}")
        return 1
    runner.emit(f"Built {', '.join(FAMILIES)} (and their LoRA adapters) in {time.monotonic() - started:.0f} s", "")
    samples = samples or (SMALL_SAMPLES if small else SAMPLES)
    dataset = red_rectangles(work / "data", samples,
                             SMALL_IMAGE_SIZES if small else IMAGE_SIZES)
    recipes = _recipes(work, dataset, runner.attn, batches or (SMALL_BATCHES if small else BATCHES), lora)
    estimates = _estimates(recipes)
    result = runner.cli("run.log", "run", str(recipes), "--device", runner.device, "--out", str(work / "runs"),
                        timeout=480)
    rows = recipe_summaries(result.stdout)
    runner.emit(f"## Estimate vs measured: {samples} samples, {NEW_TOKENS} new tokens, "
                f"{runner.attn} (exit code {result.returncode})", "",
                "| recipe | status | box format | image tokens (most) | weights | adapter | KV | vision | prefill "
                "(+LoRA) | allocator | estimate (no margin) | measured (NVML, process) | error | peak at load | "
                "peak allocated | peak reserved | parity |", "|---" * 17 + "|",
                *[_row(r, estimates[r["name"]]) for r in rows], "",
                "estimate = weights + adapter + KV + activations (max(vision, prefill + LoRA); max(vision, prefill, "
                "LoRA) for an attention-only LoRA) + the allocator's cache (768 MiB + 4.5 samples' worth of KV and "
                "activations) + CUDA context (768 MiB); the "
                "preflight adds memory_margin (10%) before comparing with free memory. Target: error +0% to +15%.",
                "")
    for row in rows:
        if row["status"] != Status.OK:
            runner.emit(f"- {row['name']}: {row['status']}: {' '.join(str(row.get('detail')).split())[:600]}")
    return 0 if result.returncode == 0 and rows else 1


def probe(models: Path, names: list[str]) -> int:
    """Where a load's peak comes from (run in a child per loader, so each starts at zero): memory after the staged
    read, after from_pretrained, the peak, and how many parameters kept the staged tensors' storage."""
    import torch
    from transformers import AutoConfig

    from worker.device import Cuda
    from worker.loading.load import concrete_class, model_class
    from worker.loading.weights import load_safetensors

    for name in names:
        folder = models / name
        config = AutoConfig.from_pretrained(folder)
        files = sorted(folder.glob("model*.safetensors"))
        common = {"config": config, "dtype": torch.bfloat16, "attn_implementation": "sdpa",
                  "device_map": {"": "cuda:0"}}
        torch.cuda.reset_peak_memory_stats()
        weights = load_safetensors(files, Cuda(), torch.bfloat16)
        staged = torch.cuda.memory_allocated()
        pointers = {t.data_ptr(): k for k, t in weights.state_dict.items() if isinstance(t, torch.Tensor)}
        cls = concrete_class(model_class(config), config)
        if cls is None:
            raise SystemExit(f"{name}: transformers' auto class has no model class for {type(config).__name__}")
        model = cls.from_pretrained(None, state_dict=weights.state_dict, **common)
        after, peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
        params = dict(model.named_parameters()) | dict(model.named_buffers())
        shared = [k for k, p in params.items() if p.data_ptr() in pointers]
        others = [(k, str(p.dtype), str(p.device), tuple(p.shape)) for k, p in params.items()
                  if p.data_ptr() not in pointers][:12]
        print(f"{name}: staged {staged / 2**30:.2f} GiB, after from_pretrained {after / 2**30:.2f} GiB, peak "
              f"{peak / 2**30:.2f} GiB; tensors staged {len(pointers)} lazy {len(weights.lazy_names)}; params+buffers "
              f"{len(params)}, sharing staged storage {len(shared)}; first not shared: {others}", flush=True)
        print(f"  state dict keys (first 5): {list(weights.state_dict)[:5]}; model keys: {list(params)[:5]}")
        weights.close()
        del weights, model, params, pointers
        import gc
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = model_class(config).from_pretrained(folder, **common)
        print(f"  transformers' reader: after {torch.cuda.memory_allocated() / 2**30:.2f} GiB, peak "
              f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("check", help="build, run and print the table")
    run.add_argument("--work", type=Path, required=True, help="scratch folder for models, data and run folders")
    run.add_argument("--out", type=Path, required=True, help="where the table and logs go")
    run.add_argument("--small", action="store_true", help="tiny shapes on the CPU: the flow without a GPU")
    run.add_argument("--batches", help="comma-separated batch sizes (default 8,16,32; 2,8 with --small), e.g. "
                     "batch sizes the estimate was not calibrated at")
    run.add_argument("--samples", type=int, help=f"dataset size (default {SAMPLES}; {SMALL_SAMPLES} with --small)")
    run.add_argument("--no-lora", action="store_true", help="skip the LoRA recipes")
    make = sub.add_parser("build", help="(internal) write the random-weight checkpoints and adapters")
    make.add_argument("--models", type=Path, required=True)
    make.add_argument("--device", default="cuda")
    make.add_argument("--small", action="store_true")
    make.add_argument("families", nargs="+")
    look = sub.add_parser("probe", help="where a load's peak memory comes from (CUDA)")
    look.add_argument("--models", type=Path, required=True)
    look.add_argument("families", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "probe":
        return probe(args.models, args.families)
    if args.command == "build":
        for name in args.families:
            started = time.monotonic()
            build(name, args.models, args.device, args.small)
            print(f"built {name} in {time.monotonic() - started:.1f}s", flush=True)
        return 0
    batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else None
    return check(args.work.resolve(), args.out.resolve(), args.small, batches, not args.no_lora, args.samples)


if __name__ == "__main__":
    sys.exit(main())
