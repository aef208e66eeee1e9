"""Where a worker's load and inference time goes on the GPU, piece by piece (issue 7's targets).

    python3 -m benchmarks.profile_gpu --work /tmp/prof --out "$OUT" [--part PART]   # on the GPU machine

One process per part (a measurement, not the orchestrator); the parts that need models first build
benchmarks/bench_gpu.py's random-weight 7B family, and a 256-sample set:
  load       (in "all") the staged reader alone (worker/loading/weights.py) over threads x chunk sizes; the worker's
             load_root with loader = "staged" and "transformers" (the same tensors, checked); r1's adapter; each
             recipe's whole load_chain with its phases; base's load_root under cProfile;
  inference  (in "all") the worker's batch preparation and generate at batch 64, 128 and 256, and batch 1;
  cold       a fresh process's first CUDA work at batch 200 step by step: its first prefill and generate against
             the same calls again, cProfile of the first prefill;
  prep       batch preparation of 200 samples alone and in three processes at once, by torch thread count
             (no models needed);
  lora       r1 at batch 200 with its adapter unmerged (as evaluated) and merged (merge_adapters);
  parity     the parity check after a batch of 200 (base, r1): first, second and third in the process, and its
             pieces (the processor call, the forced forward, the forced check) for its 8 samples;
  decode     decode attention: flash-attn's kvcache kernel over the padded cache against transformers'
             unpadding path (worker/decode/decode_attention.py), the call alone and in generate;
  prefill    a batch of 200's prefill (base): the vision tower, its patch embedding as Conv3d and as a matmul,
             the 3D rope index, and one prefill's kernels under torch.profiler with the GPU's busy time;
  graph      decode steps replayed from CUDA graphs (worker/decode/graph_decode.py) against the eager kvcache steps:
             base at batch 200 and 1, r1 (LoRA unmerged) at batch 200; a replay alone; generate's host time.
Figures go to OUT/profile.json (prep: OUT/prep.json) and stdout. BENCHMARKS.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent

_T0 = time.time()
T = TypeVar("T")


def _recipe(**settings: object):
    """The typed recipe the worker's loaders take; only the settings given matter to this profile."""
    from contract.recipe import Recipe

    return Recipe(name="profile", model="profile", **settings)


def _link(path: str, kind: str = "full") -> Any:
    """A chain link as the parent would send it, for the worker's loaders (no fingerprint: nothing is recorded)."""
    from contract.spec import ChainLink

    return ChainLink(path, kind, "profile", 0)


def log(message: str) -> None:
    print(f"[+{time.time() - _T0:6.1f}s] {message}", flush=True)


def timed(fn: Callable[..., T], torch: Any) -> tuple[float, T]:
    """fn()'s seconds on the GPU (synchronized before and after), and its value. `fn` is called with no arguments:
    a lambda that binds the loop's values as its parameters' defaults."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    value = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started, value


def profile_loads(models: Path, figures: dict) -> None:
    import torch

    from worker.device import Cuda
    from worker.loading.load import apply_adapters, load_root
    from worker.loading.weights import load_safetensors

    files = sorted((models / "base").glob("model*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    for f in files:  # the page cache, as a held worker leaves it
        f.read_bytes()
    torch.cuda.init()
    torch.empty(1, device="cuda")
    reader = []
    for threads in (8, 16, 32):
        for chunk_mb in (16, 32):
            seconds, weights = timed(lambda t=threads, c=chunk_mb: load_safetensors(
                files, Cuda(), torch.bfloat16, threads=t, chunk_bytes=c << 20), torch)
            reader.append({"threads": threads, "chunk_mb": chunk_mb, "seconds": seconds, "GBps": total / seconds / 1e9})
            log(f"staged reader threads={threads} chunk={chunk_mb} MB: {seconds:.2f} s, {reader[-1]['GBps']:.1f} GB/s")
            weights.close()
            del weights
            torch.cuda.empty_cache()
    figures["reader"] = reader
    link = _link(str(models / "base"))
    loads: dict = {}
    adapter = _link(str(models / "r1-llm-only"), "adapter")
    for loader in ("staged", "transformers", "staged"):
        seconds, (model, how) = timed(lambda ld=loader: load_root(
            link, _recipe(loader=ld), Cuda(), torch.bfloat16, "flash_attention_2"), torch)
        loads.setdefault(loader, []).append({"seconds": seconds, "GBps": total / seconds / 1e9, **how})
        log(f"load_root loader={loader}: {seconds:.2f} s = {total / seconds / 1e9:.1f} GB/s {how}")
        if loader == "transformers":
            reference = {k: v.float().sum().item() for k, v in list(model.state_dict().items())[::7]}
        else:
            staged = {k: v.float().sum().item() for k, v in list(model.state_dict().items())[::7]}
        seconds, model = timed(lambda m=model: apply_adapters(m, [adapter])[0], torch)
        loads.setdefault(f"{loader}+r1 adapter", []).append({"seconds": seconds})
        del model
        torch.cuda.empty_cache()
    figures["loads"] = loads
    figures["same_tensors"] = reference == staged
    log(f"staged and transformers loads give the same tensors (checksums of {len(staged)}): {reference == staged}")
    figures["chains"] = _chain_loads(models, torch)


def _chain_loads(models: Path, torch: Any) -> dict:
    """Each recipe's whole load as a worker does it (load_chain: root, adapters, processor, decode routing), its
    phases, and base's load_root under cProfile (the reader's threads show as the wait for them; from_pretrained
    building the model around the tensors as itself): where a load loses the reader's rate."""
    from benchmarks.bench_gpu import RECIPES
    from worker.device import Cuda
    from worker.loading.chain_files import warm_page_cache
    from worker.loading.load import load_chain, load_root

    chains: dict = {}
    for name, _, (root, adapter) in RECIPES:
        chain = [_link(str(models / root))] + ([_link(str(models / adapter), "adapter")] if adapter else [])
        warm_page_cache(chain)  # as a held worker leaves it
        seconds, (model, _, how) = timed(lambda c=chain: load_chain(c, _recipe(), Cuda()), torch)
        chains[name] = {"seconds": seconds, **{k: v for k, v in how.items() if isinstance(v, int | float | str)}}
        log(f"load_chain {name}: {seconds:.2f} s {chains[name]}")
        del model
        torch.cuda.empty_cache()
    model, _ = _profiled(lambda: load_root(_link(str(models / "base")), _recipe(loader="staged"), Cuda(),
                                           torch.bfloat16, "flash_attention_2"), "load_root (staged)")
    del model
    torch.cuda.empty_cache()
    return chains


def profile_inference(models: Path, dataset: Path, figures: dict) -> None:
    import torch

    from contract.dataset import read_dataset
    from worker.device import Cuda
    from worker.inference.generation import generate
    from worker.inference.infer import prepare_batch
    from worker.loading.load import load_root
    from worker.loading.processor import load_processor

    link = _link(str(models / "base"))
    processor = load_processor([link], _recipe())
    figures["image_processor"] = type(processor.image_processor).__name__
    samples = read_dataset(dataset)
    model, _ = load_root(link, _recipe(loader="staged"), Cuda(), torch.bfloat16, "flash_attention_2")
    template = "{prompt} Answer with its bounding box."
    rows = []
    for batch in (64, 64, 64, 128, 256):
        started = time.perf_counter()
        prepared = prepare_batch(processor, samples[:batch], template, Cuda())
        prepare_s = time.perf_counter() - started
        seconds, _ = timed(lambda p=prepared: generate(
            model, processor, p.inputs, "cuda:0", max_new_tokens=32, min_new_tokens=32), torch)
        one, _ = timed(lambda p=prepared: generate(
            model, processor, p.inputs, "cuda:0", max_new_tokens=1, min_new_tokens=1), torch)
        row = {"batch": batch, "prepare_s": prepare_s, "generate32_s": seconds, "generate1_s": one,
               "decode_step_ms": (seconds - one) / 31 * 1e3, "per_sample_ms": seconds / batch * 1e3,
               "peak_GiB": torch.cuda.max_memory_allocated() / 2**30}
        rows.append(row)
        log("inference " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    figures["inference"] = rows
    small = prepare_batch(processor, samples[:1], template, Cuda())
    seconds, _ = timed(lambda: generate(model, processor, small.inputs, "cuda:0", max_new_tokens=32,
                                        min_new_tokens=32), torch)
    one, _ = timed(lambda: generate(model, processor, small.inputs, "cuda:0", max_new_tokens=1,
                                    min_new_tokens=1), torch)
    figures["batch1_decode_step_ms"] = (seconds - one) / 31 * 1e3
    log(f"batch 1: decode step {(seconds - one) / 31 * 1e3:.2f} ms (host overhead bound)")


def profile_prefill(models: Path, dataset: Path, figures: dict) -> None:
    """Where a prefill's time goes (base, batch 200, flash_attention_2): the whole prefill (generate of 1 token);
    the vision tower alone; its patch embedding as the Conv3d it is and as the matmul it equals (stride = kernel);
    the 3D rope index; and the kernels of one prefill under torch.profiler, whose footer's Self CUDA total is the
    GPU's busy time, against the wall (the gap is host time the GPU waited through)."""
    import inspect

    import torch
    from torch.profiler import ProfilerActivity, profile

    from contract.dataset import read_dataset
    from worker.device import Cuda
    from worker.inference.generation import generate
    from worker.inference.infer import prepare_batch
    from worker.loading.load import load_root
    from worker.loading.processor import load_processor

    link = _link(str(models / "base"))
    processor = load_processor([link], _recipe())
    model, _ = load_root(link, _recipe(loader="staged"), Cuda(), torch.bfloat16, "flash_attention_2")
    prepared = prepare_batch(processor, read_dataset(dataset)[:200], "{prompt} Answer with its bounding box.", Cuda())
    inputs = prepared.inputs.to("cuda:0")

    def prefill() -> Any:
        return generate(model, processor, inputs, "cuda:0", max_new_tokens=1, min_new_tokens=1)

    result: dict[str, Any] = {"tokens": int(inputs["attention_mask"].sum()), "rows": int(inputs["input_ids"].shape[0]),
                              "patches": int(inputs["pixel_values"].shape[0])}
    prefill()
    result["prefill_s"] = [timed(prefill, torch)[0] for _ in range(3)]
    inner = model.model
    visual = inner.visual
    pixels = inputs["pixel_values"].to(torch.bfloat16)
    grid = inputs["image_grid_thw"]
    with torch.inference_mode():
        visual(pixels, grid_thw=grid)
        result["vision_s"] = [timed(lambda: visual(pixels, grid_thw=grid), torch)[0] for _ in range(3)]
        result["patch_embed"] = _patch_embed_as_matmul(torch, visual.patch_embed, pixels)
        rope = inner.get_rope_index
        wanted = inspect.signature(rope).parameters
        given = {k: v for k, v in inputs.items() if k in wanted}
        rope(**given)
        result["rope_index_s"] = [timed(lambda: rope(**given), torch)[0] for _ in range(3)]
    log("prefill pieces: " + json.dumps(result))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall, _ = timed(prefill, torch)
    events = prof.key_averages()
    result["profiled_wall_s"] = wall
    log(f"one prefill under the profiler: wall {wall:.3f} s (the GPU's busy time: the table's Self CUDA total)\n"
        + events.table(sort_by="self_device_time_total", row_limit=35, max_name_column_width=70))
    log(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
    figures["prefill"] = result


def _patch_embed_as_matmul(torch: Any, patch_embed: Any, pixels: Any) -> dict:
    """The patch embedding's Conv3d against the matmul it equals (its stride is its kernel: each patch is one row
    times the flattened kernel): seconds of each, and how far apart their outputs are."""
    weight = patch_embed.proj.weight
    flat = weight.reshape(weight.shape[0], -1)

    def conv() -> Any:
        return patch_embed(pixels)

    def matmul() -> Any:
        return pixels.reshape(-1, flat.shape[1]) @ flat.T

    conv(), matmul()
    conv_s, by_conv = timed(conv, torch)
    matmul_s, by_matmul = timed(matmul, torch)
    return {"conv3d_s": conv_s, "matmul_s": matmul_s, "max_abs_diff": float((by_conv - by_matmul).abs().max()),
            "bitwise_equal": bool(torch.equal(by_conv, by_matmul))}


def profile_cold(models: Path, dataset: Path, figures: dict) -> None:
    """A fresh process's first CUDA work at the suite's batch (200), step by step: how much longer a worker's first
    prefill and first generate take than the same calls again (kernel and library loading, the allocator's first
    segments, the first decode graphs' recording), with cProfile of the first prefill to say where."""
    steps: dict[str, float] = {}
    started = time.perf_counter()
    import torch

    from contract.dataset import read_dataset
    from worker.device import Cuda
    from worker.inference.generation import generate
    from worker.inference.infer import prepare_batch
    from worker.loading.load import load_chain

    steps["import torch, worker"] = time.perf_counter() - started
    started = time.perf_counter()
    import flash_attn  # noqa: F401
    from flash_attn import flash_attn_varlen_func  # noqa: F401

    steps["import flash_attn"] = time.perf_counter() - started
    steps["cuda context"], _ = timed(lambda: torch.empty(1, device="cuda"), torch)
    link = _link(str(models / "base"))
    steps["load (load_chain, as a worker)"], (model, processor, _) = timed(
        lambda: load_chain([link], _recipe(), Cuda()), torch)
    batch = prepare_batch(processor, read_dataset(dataset)[:200], "{prompt} Answer with its bounding box.",
                          Cuda()).inputs

    def run(tokens: int) -> float:
        return timed(lambda: generate(model, processor, batch, "cuda:0", max_new_tokens=tokens,
                                      min_new_tokens=tokens), torch)[0]

    steps["first prefill, batch 200 (1 token)"] = _profiled(lambda: run(1), "first prefill, batch 200")
    steps["again: prefill"] = run(1)
    steps["first generate of 32, batch 200"] = run(32)
    steps["again: generate of 32"] = run(32)
    steps["first calls' extra seconds"] = (steps["first prefill, batch 200 (1 token)"] - steps["again: prefill"]
                                           + steps["first generate of 32, batch 200"]
                                           - steps["again: generate of 32"])
    for name, value in steps.items():
        log(f"cold: {name}: {value:.3f}")
    figures["cold"] = steps


def prep_one(work: Path, threads: int, count: int) -> None:
    """(child) prepare_batch of `count` samples with torch limited to `threads` (0: its default), on the CPU."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from contract.dataset import read_dataset
    from worker.device import CPU
    from worker.inference.infer import prepare_batch
    from worker.loading.processor import load_processor

    link = _link(str(work / "processor"))
    processor = load_processor([link], _recipe())
    samples = read_dataset(work / "data" / "grounding.jsonl")[:count]
    started = time.perf_counter()
    prepare_batch(processor, samples, "{prompt}", CPU)
    print(json.dumps({"threads": threads or torch.get_num_threads(), "count": count,
                      "backend": getattr(processor.image_processor, "backend", None),
                      "seconds": time.perf_counter() - started}), flush=True)


def profile_prep(work: Path, figures: dict) -> None:
    """Batch preparation of 200 samples (the worker's processor path): alone, and three processes at once (a
    running worker and two held ones), at torch's default thread count and at fewer threads."""
    from benchmarks.gpu_check import SHAPES, qwen2vl_configs

    processor, _, _ = qwen2vl_configs(SHAPES["7b"])
    processor.save_pretrained(work / "processor")
    rows = []
    for threads in (0, 4, 1):
        for together in (1, 3):
            procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.profile_gpu", "--work", str(work),
                                       "--out", "/tmp", "--part", "prep-one", "--threads", str(threads)], cwd=ROOT,
                                      stdout=subprocess.PIPE, text=True) for _ in range(together)]
            results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
            row = {"threads": results[0]["threads"], "processes": together, "backend": results[0]["backend"],
                   "seconds": [round(r["seconds"], 2) for r in results]}
            rows.append(row)
            log(f"prepare 200: {row}")
    figures["prep"] = rows


def profile_lora(models: Path, dataset: Path, figures: dict) -> None:
    """r1 (LoRA on the language model) at batch 200: as the worker runs it (top adapter unmerged, its weights in
    float32 as peft keeps them under a bfloat16 model: autocast_adapter_dtype), with the adapter's weights cast to
    bfloat16 (what autocast_adapter_dtype=False gives an adapter saved in bfloat16), and merged (merge_adapters).
    Prefill (generate of 1 token) and generate of 32 tokens, second call of each; each variant's texts against
    the worker's."""
    import torch

    from contract.dataset import read_dataset
    from worker.device import Cuda
    from worker.inference.generation import generate
    from worker.inference.infer import prepare_batch
    from worker.loading.load import apply_adapters, load_root
    from worker.loading.processor import load_processor

    link = _link(str(models / "base"))
    adapter = _link(str(models / "r1-llm-only"), "adapter")
    processor = load_processor([link], _recipe())
    inputs = prepare_batch(processor, read_dataset(dataset)[:200], "{prompt}", Cuda()).inputs
    base, _ = load_root(link, _recipe(loader="staged"), Cuda(), torch.bfloat16, "flash_attention_2")
    rows: dict[str, dict] = {}
    reference: list[str] = []
    for variant in ("unmerged", "unmerged-bf16", "merged"):
        model, _ = apply_adapters(base, [adapter], merge_top=variant == "merged")
        if variant == "unmerged-bf16":
            for name, tensor in model.named_parameters():
                if "lora_" in name:
                    tensor.data = tensor.data.to(torch.bfloat16)
        row: dict[str, Any] = {}  # seconds by new tokens, and the decode step
        for tokens in (1, 1, 32, 32):
            row[str(tokens)], out = timed(lambda t=tokens, m=model: generate(
                m, processor, inputs, "cuda:0", max_new_tokens=t, min_new_tokens=t), torch)
        row["decode_step_ms"] = (row["32"] - row["1"]) / 31 * 1e3
        reference = reference or out.texts
        row["texts_equal_to_unmerged"] = sum(a == b for a, b in zip(out.texts, reference, strict=True))
        rows[variant] = row
        log(f"r1 at batch 200, {variant}: {row}")
        base = model if variant == "merged" else model.unload()  # the plain base back for the next variant
    figures["lora"] = rows


def profile_parity(models: Path, dataset: Path, figures: dict) -> None:
    """The parity check (worker/inference/parity.py) as a worker runs it after its first batch (base, and r1 with
    its adapter unmerged), at batch 200 and 32 tokens: the first check in the process (batch-1 shapes seen for the
    first time), the second and third, then its pieces for the same 8 samples (_parity_pieces); a fourth check
    under cProfile."""
    import torch

    from contract.dataset import read_dataset
    from worker.device import Cuda
    from worker.inference.generation import generate
    from worker.inference.infer import prepare_batch, processor_inputs
    from worker.inference.parity import check_parity
    from worker.loading.load import apply_adapters, load_root
    from worker.loading.processor import load_processor

    link = _link(str(models / "base"))
    processor = load_processor([link], _recipe())
    items = prepare_batch(processor, read_dataset(dataset)[:200], "{prompt}", Cuda()).items
    recipe = _recipe(parity_check=8, parity_generate=2, max_new_tokens=32)
    base, _ = load_root(link, _recipe(loader="staged"), Cuda(), torch.bfloat16, "flash_attention_2")
    rows: dict[str, dict] = {}
    for variant in ("base", "r1"):
        adapter = _link(str(models / "r1-llm-only"), "adapter")
        model = base if variant == "base" else apply_adapters(base, [adapter])[0]
        batched = generate(model, processor, processor_inputs(processor, items, Cuda()), "cuda:0", max_new_tokens=32)

        def check(model: Any = model, batched: Any = batched) -> dict:
            return check_parity(model, processor, items, batched,
                                lambda item: processor_inputs(processor, [item], Cuda()), recipe, "cuda:0", 200)

        row: dict[str, Any] = {}
        for run in ("first", "second", "third"):
            row[f"check_{run}_s"], outcome = timed(check, torch)
        row["outcome"] = {k: outcome[k] for k in ("forced_agreed", "forced_tied", "generated_alone", "agreed")}
        row.update(_parity_pieces(model, processor, items[:8], batched))
        _profiled(check, f"{variant}'s fourth parity check")
        rows[variant] = row
        log(f"parity, {variant}: {row}")
        base = model.unload() if variant == "r1" else base
    figures["parity"] = rows


def _parity_pieces(model: Any, processor: Any, items: list, batched: Any) -> dict:
    """Seconds for `items` (the first of a batch) of: the processor call alone (CPU), the forced forward pass
    alone (inputs already on the GPU), generate's config prepared (once a check), every sample forced alone, and
    all but the first forced in one batched pass (as the check forces them), with how many that pass settles."""
    import torch

    from worker.device import Cuda
    from worker.inference.forcing import _extended, _forward, forced_batch, forced_check, greedy_config
    from worker.inference.infer import processor_inputs

    pieces: dict[str, Any] = {}
    pieces["processor_s"], alone = timed(lambda: [processor_inputs(processor, [item], Cuda()).to("cuda:0")
                                                  for item in items], torch)
    rows = [torch.tensor([row[:-1]], device="cuda:0") for row in batched.rows[: len(items)]]
    with torch.inference_mode():
        pieces["forward_s"], _ = timed(lambda: [_forward(model, _extended(inputs, row), row.shape[1] + 1)
                                                for inputs, row in zip(alone, rows, strict=True)], torch)
    pieces["config_s"], config = timed(lambda: greedy_config(model, processor, "cuda:0", max_new_tokens=32), torch)
    pieces["forced_alone_s"], _ = timed(lambda: [forced_check(model, processor, inputs, batched.rows[i], None,
                                                              "cuda:0", config)
                                                 for i, inputs in enumerate(alone)], torch)
    pieces["forced_batch_s"], verdicts = timed(lambda: forced_batch(model, processor, alone[1:],
                                                                    batched.rows[1: len(items)], "cuda:0", config),
                                               torch)
    pieces["forced_batch_settles"] = sum(verdict.settles for verdict in verdicts)
    pieces["prompt_tokens"] = int(alone[0]["input_ids"].shape[1])
    pieces["row_tokens"] = [len(row) for row in batched.rows[: len(items)]]
    return pieces


def _decode_setup(models: Path, dataset: Path) -> tuple:
    """The decode parts' common start: the processor, the base model on the GPU (flash_attention_2, bf16), r1's
    adapter link, the bench's samples (one prompt) and the same images with prompts of different lengths."""
    import torch

    from benchmarks.bench_gpu import build_dataset
    from contract.dataset import read_dataset
    from worker.device import Cuda
    from worker.loading.load import load_root
    from worker.loading.processor import load_processor

    link = _link(str(models / "base"))
    adapter = _link(str(models / "r1-llm-only"), "adapter")
    processor = load_processor([link], _recipe())
    uniform = read_dataset(dataset)
    varied = read_dataset(build_dataset(dataset.parent.with_name("varied"), len(uniform), varied=True))
    base, _ = load_root(link, _recipe(loader="staged"), Cuda(), torch.bfloat16, "flash_attention_2")
    return processor, base, adapter, uniform, varied


def profile_decode(models: Path, dataset: Path, figures: dict) -> None:
    """Decode attention (worker/decode/decode_attention.py): flash-attn's kvcache kernel over the left-padded cache
    against transformers' unpadding path. The attention call alone on the 7B's decode shapes (error against a
    float32 reference, bitwise agreement, time), then base and r1 (LoRA unmerged) at batch 200 and base at batch
    1, each way: prefill, 32 tokens, the decode step, and how many texts agree."""
    import torch

    from worker.decode import decode_attention
    from worker.device import Cuda
    from worker.inference.generation import generate
    from worker.inference.infer import prepare_batch
    from worker.loading.load import apply_adapters

    figures["attention_call"] = _decode_attention_call(torch, decode_attention)
    processor, base, adapter, uniform, varied = _decode_setup(models, dataset)
    runs = {}
    for name, batch, samples in (("base", 200, uniform), ("base", 200, varied), ("base", 1, uniform),
                                 ("r1-llm-only", 200, varied)):
        model = apply_adapters(base, [adapter])[0] if name != "base" else base
        inputs = prepare_batch(processor, samples[:batch], "{prompt}", Cuda()).inputs
        name = f"{name} {'varied' if samples is varied else 'uniform'}"
        row: dict = {}
        for way in ("transformers", "kvcache", "transformers", "kvcache"):
            if way == "kvcache":
                decode_attention.install()
            else:
                decode_attention.uninstall()
            times = {t: timed(lambda t=t, m=model, i=inputs: generate(m, processor, i, "cuda:0", max_new_tokens=t,
                                                                      min_new_tokens=t), torch) for t in (1, 32)}
            row[way] = {"prefill_s": times[1][0], "generate32_s": times[32][0],
                        "decode_step_ms": (times[32][0] - times[1][0]) / 31 * 1e3, "texts": times[32][1].texts}
        equal = sum(a == b for a, b in zip(row["transformers"]["texts"], row["kvcache"]["texts"], strict=True))
        runs[f"{name} batch {batch}"] = {"texts_equal": equal, "of": batch, **{
            way: {k: v for k, v in figures_of.items() if k != "texts"} for way, figures_of in row.items()}}
        log(f"decode {name} batch {batch}: " + json.dumps(runs[f"{name} batch {batch}"]))
        if model is not base:
            base = model.unload()
    decode_attention.uninstall()
    figures["decode"] = runs


def profile_graph(models: Path, dataset: Path, figures: dict) -> None:
    """Each configuration eagerly (kvcache decode attention) and replayed from graphs, twice each way alternating:
    prefill (1 token), 32 tokens, the decode step, the recording's cost, and rows of token ids equal to the eager
    run's ("texts_equal")."""
    import torch

    from worker.decode import decode_attention, graph_decode
    from worker.device import Cuda
    from worker.inference.generation import generate
    from worker.inference.infer import prepare_batch
    from worker.loading.load import apply_adapters

    processor, base, adapter, uniform, varied = _decode_setup(models, dataset)
    decode_attention.install()
    runs = {}
    for name, batch, samples in (("base", 200, uniform), ("base", 1, uniform), ("r1-llm-only", 200, varied)):
        model = apply_adapters(base, [adapter])[0] if name != "base" else base
        inputs = prepare_batch(processor, samples[:batch], "{prompt}", Cuda()).inputs
        label = f"{name} {'varied' if samples is varied else 'uniform'} batch {batch}"
        row: dict = {}
        for way in ("kvcache", "graph", "kvcache", "graph"):
            if way == "graph":
                graph_decode.attach(model)
            else:
                graph_decode.detach(model)
            torch.cuda.reset_peak_memory_stats()
            times = {t: timed(lambda t=t, m=model, i=inputs: generate(m, processor, i, "cuda:0", max_new_tokens=t,
                                                                      min_new_tokens=t), torch) for t in (1, 32)}
            graphs = times[32][1].graphs
            row[way] = {"prefill_s": times[1][0], "generate32_s": times[32][0],
                        "decode_step_ms": (times[32][0] - times[1][0]) / 31 * 1e3,
                        "peak_GB": torch.cuda.max_memory_allocated() / 1e9,
                        "outcome": [vars(g) for g in graphs],
                        # token ids, not texts: a random-weight model's texts are mostly empty after its first
                        # end-of-turn token, its 32 token ids are not
                        "texts": [tuple(r) for r in times[32][1].rows]}
        row["graph"] |= _replay_alone(torch, graph_decode, model, processor, inputs, generate)
        graph_decode.detach(model)
        equal = sum(a == b for a, b in zip(row["kvcache"]["texts"], row["graph"]["texts"], strict=True))
        runs[label] = {"texts_equal": equal, "of": batch, **{
            way: {k: v for k, v in figures_of.items() if k != "texts"} for way, figures_of in row.items()}}
        log(f"graph {label}: " + json.dumps(runs[label]))
        if model is not base:
            base = model.unload()
    decode_attention.uninstall()
    figures["graph"] = runs


def _replay_alone(torch, graph_decode, model, processor, inputs, generate) -> dict:
    """The recorded step replayed 20 times back to back (the GPU's time for a step, without generate's loop),
    and where the host's time goes in one generate of 32 tokens (cProfile, the top functions by own time)."""
    import cProfile
    import io
    import pstats

    kept = []
    close = graph_decode.Session.close

    def keep(session):
        kept.append(session.recorded)
        close(session)

    graph_decode.Session.close = keep
    profile = cProfile.Profile()
    try:
        profile.enable()
        generate(model, processor, inputs, "cuda:0", max_new_tokens=32, min_new_tokens=32)
        profile.disable()
    finally:
        graph_decode.Session.close = close
    recorded = kept[0]
    with torch.inference_mode():  # its buffers are inference tensors
        recorded.position.fill_(recorded.length - 20)
        recorded.ends.fill_(recorded.length - 19)
        seconds, _ = timed(lambda: [recorded.replay.replay() for _ in range(20)], torch)
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
    log("host profile of one graph generate:\n" + text.getvalue()[-6000:])
    return {"replay_alone_ms": seconds / 20 * 1e3}


def _decode_attention_call(torch, decode_attention) -> dict:
    """One layer's decode attention at the 7B's shapes (batch 200, 28 query and 4 key heads of 128, a cache of
    about 330 tokens with 0-40 pads a row), both ways, against float32 sdpa over the same unpadded keys."""
    from transformers.integrations.flash_attention import flash_attention_forward

    generator = torch.Generator(device="cuda").manual_seed(0)
    batch, heads, kv_heads, dim, length = 200, 28, 4, 128, 330

    def rand(*shape):
        return torch.randn(*shape, generator=generator, device="cuda", dtype=torch.bfloat16)

    q, k, v = rand(batch, heads, 1, dim), rand(batch, kv_heads, length, dim), rand(batch, kv_heads, length, dim)
    pads = torch.randint(0, 41, (batch,), generator=generator, device="cuda")
    mask = (torch.arange(length, device="cuda")[None] >= pads[:, None]).long()
    module = type("Layer", (), {"is_causal": True, "layer_idx": 0,
                                "config": type("C", (), {"_attn_implementation": "flash_attention_2"})()})()
    kernel = decode_attention.flash_kvcache_kernel()

    def unpadding():
        return flash_attention_forward(module, q, k, v, mask, scaling=dim ** -0.5)[0]

    def in_place():
        return kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=dim ** -0.5,
                      cache_seqlens=torch.full_like(pads, length, dtype=torch.int32),
                      cache_leftpad=pads.int(), causal=True)

    keep = mask.bool()[:, None, None]
    groups = heads // kv_heads
    reference = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(groups, 1), v.float().repeat_interleave(groups, 1),
        attn_mask=keep).transpose(1, 2)
    result: dict[str, dict[str, float] | float] = {}
    outputs = {}
    for name, fn in (("transformers", unpadding), ("kvcache", in_place)):
        outputs[name] = fn()
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(28 * 10):  # ten decode steps of 28 layers, host time until queued, then until done
            fn()
        queued = time.perf_counter() - started
        torch.cuda.synchronize()
        done = time.perf_counter() - started
        result[name] = {"max_abs_error": float((outputs[name].float() - reference).abs().max()),
                        "host_us_per_call": queued / 280 * 1e6, "us_per_call": done / 280 * 1e6}
    result["bitwise_equal_fraction"] = float((outputs["transformers"] == outputs["kvcache"]).float().mean())
    log("decode attention call: " + json.dumps(result))
    return result


def _profiled(fn, title: str):
    """fn() under cProfile; prints the 30 costliest calls by cumulative and by own time."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    value = profiler.runcall(fn)
    for order in ("cumulative", "tottime"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(30)
        log(f"profile of {title} by {order}:\n{text.getvalue()}")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--part", default="all",
                        choices=("all", "load", "inference", "cold", "prep", "prep-one", "lora", "parity", "decode",
                                 "graph", "prefill"))
    args = parser.parse_args()
    from benchmarks.bench_gpu import build_dataset

    if args.part == "prep-one":
        prep_one(args.work, args.threads, 200)
        return 0
    if args.part == "prep":
        build_dataset(args.work / "data", 256)
        figures_prep: dict = {}
        profile_prep(args.work, figures_prep)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "prep.json").write_text(json.dumps(figures_prep, indent=1))
        return 0
    models = args.work / "models"
    if not (models / "r1-llm-only").exists():
        subprocess.run([sys.executable, "-m", "benchmarks.bench_gpu", "build", "--models", str(models)], check=True,
                       cwd=ROOT)
        log("models built")
    dataset = build_dataset(args.work / "data", 256)
    figures: dict = {}
    if args.part in ("all", "load"):
        profile_loads(models, figures)
    if args.part == "cold":
        profile_cold(models, dataset, figures)
    if args.part == "lora":
        profile_lora(models, dataset, figures)
    if args.part == "parity":
        profile_parity(models, dataset, figures)
    if args.part == "decode":
        profile_decode(models, dataset, figures)
    if args.part == "graph":
        profile_graph(models, dataset, figures)
    if args.part == "prefill":
        profile_prefill(models, dataset, figures)
    if args.part in ("all", "inference"):
        profile_inference(models, dataset, figures)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.json").write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
