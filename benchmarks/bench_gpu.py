"""The GPU benchmark of issues 7 and 18: evalorch's suite against the notebook way and against the expert loop, on
the same random-weight 7B models.

    python3 -m benchmarks.bench_gpu bench --work /tmp/bench --out "$OUT"                      # on the GPU machine
    python3 -m benchmarks.bench_gpu bench --work /tmp/bench_s --out /tmp/bench_o --small      # the flow on a CPU

In one call, timestamped so a timeout still says where the time went:
  build     random-weight Qwen2-VL at the 7B shape (benchmarks/gpu_check.py's builders) as a five-recipe family:
            base; r1 LoRA on the LLM; r2 vision fine-tuned (full checkpoint); r3 two-stage = stage-1 full checkpoint
            + stage-2 LoRA recording stage 1 (a training-machine path, remapped) as its base; r4 LoRA on LLM +
            vision. The vision tower is a shard of its own, so r2 and r3-stage1 hard-link base's language-model
            shards and write only a new (random) vision shard; plus 200 synthetic 448x448 samples.
  (a)       `python -m orchestrator run suite.toml --device cuda`: flash_attention_2, bf16, batch_size "auto",
            min_new_tokens = max_new_tokens = 32; its stdout is timestamped line by line. Workers share the GPU as
            `--max-workers-per-gpu auto` allows (`--workers N`: `--max-workers-per-gpu N`; 3 with --small, where
            auto is 1).
  (a1)      the same with `--max-workers-per-gpu 1`: one worker at a time, the next two started ahead.
            `--varied-prompts` gives the samples prompts of different lengths, so that batches pad on the left as
            a real set's do (evalorch's decode then reads the padded cache in place); the expert loop batches in
            file order, evalorch by prompt length, so their batches hold the same samples only when one batch
            holds all (batch 200 of 200, as on the H200).
            `--again` runs (a) once more after (a1), to see whether a packed run repeats text for text;
            `--parity-check N` sets both suites' parity_check (0: measured without the batch-parity check).
  (c)       the expert loop (benchmarks/expert_loop.py, no evalorch code): one process, each model loaded in turn,
            one batched `generate` per batch at (a1)'s batch size on the same data and prompts, gc.collect() and
            torch.cuda.empty_cache() between models; its per-sample texts are compared with (a1)'s and (a)'s.
  (b)       the notebook way, in one process: each model loaded in turn (AutoModelForImageTextToText with
            device_map="cuda", adapters through PeftModel), one `generate` per sample, gc.collect() and
            torch.cuda.empty_cache() between models; on the first N samples of each model (a time slice each,
            so the call ends in time), extrapolated to all samples. The same process measures the device copy
            bandwidth, the bf16 matmul rate (8192^3), pinned/pageable host-to-device copies, and prefill and
            decode of the base model at the batch size the orchestrator chose. `--no-notebook` skips it.
The table goes to stdout and OUT/bench.md, the figures to OUT/bench.json, logs to OUT/*.log. This process never
touches CUDA itself (it would count as a foreign holder of GPU memory in the orchestrator's preflight).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.gpu_check import (
    GIB,
    JOINT_TARGETS,
    LORA_TARGETS,
    SHAPES,
    SMALL_SHAPES,
    hub_name,
    qwen2vl_configs,
    random_tensor,
    shard_groups,
    write_lora,
)
from tools.synthetic import red_rectangles

ROOT = Path(__file__).resolve().parent.parent

NEW_TOKENS = 32
R3_TRAINING_PREFIX = "/ssd1/team/vlm_outputs"  # what r3-stage2's adapter_config.json records; remapped in suite.toml
RECIPES = [  # name, model folder (the recipe's `model`), chain as the notebook loads it: (root, adapter or None)
    ("base", "base", ("base", None)),
    ("r1-llm-only", "r1-llm-only", ("base", "r1-llm-only")),
    ("r2-vision-only", "r2-vision-only", ("r2-vision-only", None)),
    ("r3-two-stage", "r3-stage2", ("r3-stage1", "r3-stage2")),
    ("r4-joint", "r4-joint", ("base", "r4-joint")),
]
_T0 = time.time()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - _T0:6.1f}s] {message}", flush=True)


# ----------------------------------------------------------------------------- building (a child process)


def build_family(folder: Path, device: str, small: bool) -> None:
    """base + r2/r3-stage1 (new vision shard, hard-linked language-model shards) + three LoRA adapters."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    shape = SMALL_SHAPES["tiny-b"] if small else SHAPES["7b"]
    processor, config, generation = qwen2vl_configs(shape)
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    vision = {n: s for n, s in shapes.items() if n.startswith("model.visual.")}
    language = {n: s for n, s in shapes.items() if n not in vision}
    groups = [list(vision), *shard_groups(language, (1 << 20) if small else 4 * GIB)]  # small: several LLM shards too
    files = [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    base = folder / "base"
    base.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for file, names in zip(files, groups, strict=True):
        weight_map |= _write_shard(base / file, {n: shapes[n] for n in names}, device)
    total = sum(math.prod(s) * 2 for s in shapes.values())
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(base)
    generation.save_pretrained(base)
    processor.save_pretrained(base)
    log(f"base written: {len(files)} shards, {total / 1e9:.2f} GB")
    for name in ("r2-vision-only", "r3-stage1"):  # vision fine-tuned: a new vision shard, the LLM shared
        target = folder / name
        target.mkdir(parents=True, exist_ok=True)
        for item in base.iterdir():
            if item.name in files[1:]:
                _link(item, target / item.name)
            elif item.name != files[0]:
                shutil.copy2(item, target / item.name)
        _write_shard(target / files[0], vision, device)
        log(f"{name} written (vision shard {files[0]} new, {len(files) - 1} language-model shard(s) hard-linked)")
    write_lora(model, folder / "r1-llm-only", base, LORA_TARGETS, device)
    write_lora(model, folder / "r4-joint", base, JOINT_TARGETS, device)
    write_lora(model, folder / "r3-stage2", Path(R3_TRAINING_PREFIX) / "r3-stage1", LORA_TARGETS, device)
    log("adapters written: r1-llm-only, r3-stage2 (on r3-stage1), r4-joint")


def _write_shard(path: Path, shapes: dict[str, tuple], device: str) -> dict[str, str]:
    from safetensors.torch import save_file

    tensors = {hub_name(n): random_tensor(s, n, device) for n, s in shapes.items()}
    save_file(tensors, path, metadata={"format": "pt"})
    return dict.fromkeys(tensors, path.name)


def _link(source: Path, target: Path) -> None:
    if target.exists() or target.is_symlink():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:  # another file system: a symbolic link does as well (the loader and lineage follow it)
        target.symlink_to(source.resolve())


def build_dataset(folder: Path, samples: int, varied: bool = False) -> Path:
    """`samples` 448x448 images (256 image tokens each) with a red rectangle, one prompt for all: fixed work.
    `varied`: prompts of 0-11 extra words instead, so that a batch pads on the left as a real grounding set's
    referring expressions make it (the one prompt pads nothing)."""
    dataset = red_rectangles(folder, samples, [(448, 448)])
    if varied:
        lines = [json.loads(line) for line in dataset.read_text().splitlines()]
        for index, line in enumerate(lines):
            extra = " in the picture" * (index % 4) + ", please" * (index % 3)
            line["prompt"] = line["prompt"].removesuffix(".") + extra + "."
        dataset.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return dataset


# ----------------------------------------------------------------------------- (b) the notebook way (a child process)


def notebook(models: Path, dataset: Path, device: str, attn: str, n: int, deadline: float, batch: int,
             out: Path) -> None:
    """The notebook way, plus the hardware and kernel measurements; writes its figures to `out` (JSON)."""
    started = time.perf_counter()
    import gc

    import torch
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    result: dict[str, Any] = {"imports_s": time.perf_counter() - started, "attn": attn, "models": []}
    log(f"notebook: imports {result['imports_s']:.1f}s")
    cuda = device == "cuda"
    excluded = time.perf_counter()  # measurements that are not part of the notebook way
    result["hardware"] = hardware(cuda)
    excluded = time.perf_counter() - excluded
    log(f"notebook: hardware {json.dumps(result['hardware'])}")
    dtype = torch.bfloat16 if cuda else torch.float32
    setup = time.perf_counter()
    processor = AutoProcessor.from_pretrained(models / "base")
    records = [json.loads(line) for line in dataset.read_text().splitlines() if line.strip()]
    result["setup_s"] = time.perf_counter() - setup

    def sample_inputs(record: dict) -> Any:
        image = Image.open(dataset.parent / record["image"]).convert("RGB")
        messages = [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": f"{record['prompt']} Answer with its bounding box."}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return processor(text=[text], images=[image], return_tensors="pt").to(device)

    for index, (name, _folder, (root, adapter)) in enumerate(RECIPES):
        entry: dict[str, Any] = {"name": name, "root": root, "adapter": adapter}
        t = time.perf_counter()
        base = AutoModelForImageTextToText.from_pretrained(models / root, dtype=dtype, device_map=device,
                                                           attn_implementation=attn)
        model = PeftModel.from_pretrained(base, models / adapter) if adapter else base
        model.eval()
        if cuda:
            torch.cuda.synchronize()
        entry["load_s"] = time.perf_counter() - t
        entry["bytes"] = sum(f.stat().st_size for f in (models / root).glob("*.safetensors")) + (
            sum(f.stat().st_size for f in (models / adapter).glob("*.safetensors")) if adapter else 0)
        # each model gets an equal share of the time left, less its load, so every model is measured
        slice_s = (deadline - time.time()) / (len(RECIPES) - index) - entry["load_s"]
        loop_end = time.time() + slice_s
        times: list[float] = []
        for record in records[:n]:
            if len(times) >= 4 and time.time() > loop_end:
                break
            t = time.perf_counter()
            inputs = sample_inputs(record)
            with torch.inference_mode():
                output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                        do_sample=False)
            processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=False)
            times.append(time.perf_counter() - t)
        entry["sample_s"] = times
        entry["new_tokens"] = int(output.shape[1] - inputs["input_ids"].shape[1])
        log(f"notebook: {name}: load {entry['load_s']:.1f}s, {len(times)} samples, first {times[0]:.3f}s, "
            f"mean of the rest {_mean(times[1:]):.3f}s")
        if name == "base":
            t = time.perf_counter()
            try:
                result["kernels"] = kernels(model, processor, records[:batch], dataset.parent, device, cuda,
                                             batch)
                log(f"notebook: kernels at batch {batch}: {json.dumps(result['kernels'])}")
            except Exception as exc:  # a measurement must not cost the comparison
                result["kernels"] = {"error": repr(exc)}
                log(f"notebook: kernels failed: {exc!r}")
            if cuda:
                torch.cuda.empty_cache()
            excluded += time.perf_counter() - t
        t = time.perf_counter()
        del model, base, output, inputs  # `base` too: no reference may keep the weights past empty_cache()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
        entry["teardown_s"] = time.perf_counter() - t
        result["models"].append(entry)
        out.write_text(json.dumps(result, indent=1))  # what was measured so far survives a timeout
    result["excluded_s"] = excluded
    result["wall_s"] = time.perf_counter() - started - excluded
    out.write_text(json.dumps(result, indent=1))


def hardware(cuda: bool) -> dict[str, float | None]:
    """Device copy bandwidth (read + write), bf16 matmul rate (8192^3), pinned and pageable host-to-device."""
    import torch

    device = "cuda" if cuda else "cpu"
    side = 8192 if cuda else 512
    result: dict[str, float | None] = {"copy_Bps": _copy_rate(torch, device, cuda), "matmul_side": side,
                                       "h2d_pinned_Bps": None, "h2d_pageable_Bps": None}
    result["matmul_flops"] = _matmul_rate(torch, device, cuda, side)
    if cuda:
        result["h2d_pinned_Bps"], result["h2d_pageable_Bps"] = _h2d_rates(torch)
        torch.cuda.empty_cache()
    return result


def _timed(torch: Any, fn: Any, iterations: int, cuda: bool) -> float:
    fn()
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iterations):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iterations


def _copy_rate(torch: Any, device: str, cuda: bool) -> float:
    size = (2 << 30) if cuda else (64 << 20)
    src = torch.empty(size, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return 2 * size / _timed(torch, lambda: dst.copy_(src), 20 if cuda else 3, cuda)


def _matmul_rate(torch: Any, device: str, cuda: bool, side: int) -> float:
    a = torch.randn(side, side, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    b = torch.randn_like(a)
    return 2 * side**3 / _timed(torch, lambda: a @ b, 30 if cuda else 2, cuda)


def _h2d_rates(torch: Any) -> tuple[float, float]:
    size = 1 << 30
    host = torch.empty(size, dtype=torch.uint8).fill_(1)
    pinned = host.pin_memory()
    target = torch.empty(size, dtype=torch.uint8, device="cuda")
    fast = size / _timed(torch, lambda: target.copy_(pinned, non_blocking=True), 5, True)
    slow = size / _timed(torch, lambda: target.copy_(host), 5, True)
    return fast, slow


def kernels(model: Any, processor: Any, records: list[dict], folder: Path, device: str, cuda: bool,
            batch: int) -> dict:
    """Prefill and decode of `model` on one batch, as the worker runs it (left padding, one generate): prefill =
    generate of 1 token, decode = (generate of 32 - generate of 1) / 31 steps; and their floors' FLOPs."""
    import torch
    from PIL import Image

    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    texts, images = [], []
    for record in records:
        images.append(Image.open(folder / record["image"]).convert("RGB"))
        messages = [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": f"{record['prompt']} Answer with its bounding box."}]}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt").to(device)
    tokenizer.padding_side = side

    def run(tokens: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    run(2)  # warm-up
    one = min(run(1) for _ in range(3))
    full = min(run(NEW_TOKENS) for _ in range(2))
    flops = prefill_flops(model, inputs)
    return {"batch": len(records), "batch_requested": batch, "prefill_s": one, "generate_s": full,
            "decode_step_s": (full - one) / (NEW_TOKENS - 1), **flops}


def prefill_flops(model: Any, inputs: Any) -> dict:
    """Matmul FLOPs of one prefill, from the model's own parameters and the batch: 2 x params x tokens for every
    linear layer (vision blocks over all patches, the merger over the merged tokens, the language model over the
    real, unpadded tokens), attention scores (full within an image, causal in the text), and lm_head once per
    sequence. Also the per-step decode FLOPs (2 x language-model params x batch)."""
    config = model.config
    vision_blocks = merger = llm = lm_head = 0
    for name, param in model.named_parameters():
        if param.dim() < 2 or "lora_" in name:
            continue
        count = param.numel()
        if ".visual." in f".{name}" and ".merger." in name:
            merger += count
        elif ".visual." in f".{name}":
            vision_blocks += count
        elif "lm_head" in name:
            lm_head += count
        elif "embed_tokens" not in name:
            llm += count
    grid = inputs["image_grid_thw"].tolist()
    patches = [t * h * w for t, h, w in grid]
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    vision_cfg = config.vision_config
    text_cfg = getattr(config, "text_config", config)
    hidden = text_cfg.hidden_size
    vision = 2 * vision_blocks * sum(patches) + 2 * merger * sum(patches) // 4
    vision += sum(4 * vision_cfg.depth * p * p * vision_cfg.embed_dim for p in patches)
    text = 2 * llm * sum(lengths) + sum(2 * text_cfg.num_hidden_layers * n * n * hidden for n in lengths)
    head = 2 * lm_head * len(lengths)
    decode = 2 * (llm + lm_head) * len(lengths)
    return {"prefill_flops": vision + text + head, "vision_flops": vision, "text_flops": text,
            "decode_step_flops": decode, "tokens": lengths, "patches": patches}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# ----------------------------------------------------------------------------- the benchmark (this process)


class Bench:
    def __init__(self, work: Path, out: Path, small: bool, samples: int, notebook_samples: int, budget: float,
                 parity_check: int | None = None, varied_prompts: bool = False):
        self.work, self.out, self.small = work, out, small
        self.varied_prompts = varied_prompts  # the dataset's prompts: build_dataset
        self.samples, self.notebook_samples = samples, notebook_samples
        self.parity_check = parity_check  # the suites' parity_check; None: the recipe default
        self.deadline = _T0 + budget
        self.device = "cpu" if small else "cuda"
        self.attn = "sdpa" if small else "flash_attention_2"
        self.models = work / "models"
        self.lines: list[str] = []
        self.figures: dict[str, Any] = {"device": self.device, "attn": self.attn, "samples": samples}
        work.mkdir(parents=True, exist_ok=True)
        out.mkdir(parents=True, exist_ok=True)

    def child(self, name: str, args: list[str], timeout: float, env: dict | None = None) -> tuple[int, list]:
        """Run a child, its output timestamped line by line into OUT/<name>.log and echoed; (returncode, lines)."""
        started = time.monotonic()
        lines: list[tuple[float, str]] = []
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        timer = threading.Timer(max(1.0, timeout), proc.kill)
        timer.start()
        assert proc.stdout is not None  # started with stdout=subprocess.PIPE
        with open(self.out / f"{name}.log", "a") as f:
            f.write(f"$ {' '.join(args)}\n")
            for line in proc.stdout:
                at = time.monotonic() - started
                lines.append((at, line.rstrip("\n")))
                f.write(f"{at:8.2f} {line}")
                f.flush()
                print(f"    {name} {at:7.2f}s | {line.rstrip()}", flush=True)
        code = proc.wait()
        timer.cancel()
        log(f"{name}: exit {code} after {time.monotonic() - started:.1f}s")
        return code, lines

    def build(self) -> Path:
        log("building the models and the dataset")
        if not (self.models / "r4-joint" / "adapter_config.json").is_file():
            shutil.rmtree(self.models, ignore_errors=True)
            code, _ = self.child("build", [sys.executable, "-m", "benchmarks.bench_gpu", "build",
                                           "--models", str(self.models), "--device", self.device,
                                           *(["--small"] if self.small else [])], 400)
            if code != 0:
                raise SystemExit(f"building the models failed: see {self.out / 'build.log'}")
        dataset = build_dataset(self.work / "data", self.samples, self.varied_prompts)
        sizes = {name: _folder_bytes(self.models / name) for name in ("base", "r2-vision-only", "r3-stage1",
                                                                      "r1-llm-only", "r3-stage2", "r4-joint")}
        self.figures["model_bytes"] = sizes
        log(f"built: {json.dumps({k: round(v / 1e9, 3) for k, v in sizes.items()})} GB; {self.samples} samples")
        return dataset

    def suite(self, dataset: Path, key: str, workers: int | None, reserve: float) -> None:
        """(a) with `--max-workers-per-gpu workers` (None: auto, as many as fit), into figures[key]; its
        child may run until `reserve` seconds before the deadline (what the later steps need)."""
        body = "".join(f'\n[[recipe]]\nname = "{name}"\nmodel = "{self.models / folder}"\n'
                       + ("baseline = true\n" if name == "base" else "") for name, folder, _ in RECIPES)
        recipes = self.work / "suite.toml"
        recipes.write_text(
            f'[defaults]\ndataset = "{dataset}"\nprompt = "{{prompt}} Answer with its bounding box."\n'
            f'max_new_tokens = {NEW_TOKENS}\nmin_new_tokens = {NEW_TOKENS}\nbatch_size = "auto"\n'
            f'dtype = "{"bfloat16" if not self.small else "auto"}"\nattn = "{self.attn}"\ntimeout = 300\n'
            + (f"parity_check = {self.parity_check}\n" if self.parity_check is not None else "") +
            f'\n[lineage]\nremap = {{ "{R3_TRAINING_PREFIX}" = "{self.models}" }}\n{body}')
        env = {"COLUMNS": "200"}  # rich wraps at 80 columns on a pipe
        if self.small:  # the fake NVML lets the preflight size batch_size "auto" on a CPU, as on a GPU
            from contract.nvml import FAKE_ENV, write_fake_nvml

            fake = self.work / "nvml.json"
            write_fake_nvml(fake, [{"name": "Fake GPU (--small)", "uuid": "GPU-fake-0", "total_bytes": 80 * GIB,
                                    "free_bytes": 80 * GIB, "processes": []}])
            env[FAKE_ENV] = str(fake)
        options = ["--max-workers-per-gpu", str(workers) if workers is not None else "auto"]
        command = [sys.executable, "-m", "orchestrator", "run", str(recipes), "--device", self.device,
                   "--out", str(self.work / "runs"), *options]
        self.figures[f"{key}_command"] = " ".join(["python -m orchestrator run suite.toml --device", self.device,
                                                   *options])
        started = time.monotonic()
        code, lines = self.child(key, command, self.deadline - time.time() - reserve, env)
        wall = time.monotonic() - started
        match = next((re.search(r"Run folder: (\S+)", text) for _, text in lines if "Run folder:" in text), None)
        if match is None:
            raise SystemExit("the orchestrator printed no run folder: see suite.log")
        run_dir = Path(match.group(1))
        names = [name for name, _, _ in RECIPES]
        summaries = {n: json.loads((run_dir / n / "summary.json").read_text()) for n in names
                     if (run_dir / n / "summary.json").is_file()}
        run_record = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
        self.figures[key] = {"exit": code, "wall_s": wall, "run_dir": str(run_dir), "events": _events(lines, names),
                             "recipes": summaries, "texts": _suite_texts(run_dir, names),
                             "workers_per_gpu": run_record.get("max_workers_per_gpu")}

    def expert(self, batch: int, reserve: float) -> None:
        """(c) the expert loop, in a child (benchmarks/expert_loop.py), at `batch`."""
        out = self.work / "expert.json"
        out.unlink(missing_ok=True)
        chains = [f"{name}={root}" + (f"+{adapter}" if adapter else "") for name, _, (root, adapter) in RECIPES]
        command = [sys.executable, "-m", "benchmarks.expert_loop", "--models", str(self.models),
                   "--dataset", str(self.work / "data" / "grounding.jsonl"),
                   *[arg for chain in chains for arg in ("--model", chain)],
                   "--batch", str(batch), "--new-tokens", str(NEW_TOKENS), "--device", self.device, "--attn",
                   self.attn, "--json", str(out)]
        started = time.monotonic()
        code, _ = self.child("expert", command, self.deadline - time.time() - reserve)
        result = json.loads(out.read_text()) if out.is_file() else {}
        self.figures["expert"] = {"exit": code, "process_wall_s": time.monotonic() - started, **result}

    def notebook(self, batch: int) -> None:
        out = self.work / "notebook.json"
        out.unlink(missing_ok=True)
        deadline = self.deadline - 10
        command = [sys.executable, "-m", "benchmarks.bench_gpu", "notebook", "--models", str(self.models), "--dataset",
                   str(self.work / "data" / "grounding.jsonl"), "--device", self.device, "--attn", self.attn,
                   "-n", str(self.notebook_samples), "--deadline", str(deadline), "--batch", str(batch),
                   "--json", str(out)]
        started = time.monotonic()
        code, _ = self.child("notebook", command, deadline - time.time() + 5)
        process_wall = time.monotonic() - started
        result = json.loads(out.read_text()) if out.is_file() else {}
        self.figures["notebook"] = {"exit": code, "process_wall_s": process_wall, **result}

    # ------------------------------------------------------------------ the table

    def report(self) -> None:
        f = self.figures
        hw = (f.get("notebook") or {}).get("hardware") or {}
        suite, serial = f.get("suite") or {}, f.get("suite_serial") or {}
        nb, ex = f.get("notebook") or {}, f.get("expert") or {}
        rows, serial_rows = _suite_rows(suite), _suite_rows(serial)
        notebook_rows = [_notebook_row(m, self.samples) for m in nb.get("models", [])]
        nb_measured = nb.get("wall_s")
        nb_extrapolated = None
        if len(notebook_rows) == len(RECIPES):
            nb_extrapolated = nb["imports_s"] + nb["setup_s"] + sum(r["extrapolated_s"] for r in notebook_rows)
        expert_wall = ex.get("wall_s") if len(ex.get("models") or []) == len(RECIPES) else None
        suite_wall, serial_wall = suite.get("wall_s"), serial.get("wall_s")
        ratio = _ratio(suite_wall, nb_extrapolated)
        total = self.samples * len(RECIPES)
        equal = {"expert_vs_serial": _equal_texts(_expert_texts(ex), serial.get("texts") or {}),
                 "expert_vs_suite": _equal_texts(_expert_texts(ex), suite.get("texts") or {}),
                 "suite_vs_serial": _equal_texts(suite.get("texts") or {}, serial.get("texts") or {})}
        again = f.get("suite_again")
        if again:
            equal["suite_vs_again"] = _equal_texts(suite.get("texts") or {}, again.get("texts") or {})
        f["summary"] = {"suite_wall_s": suite_wall, "serial_wall_s": serial_wall, "expert_wall_s": expert_wall,
                        "notebook_measured_s": nb_measured, "notebook_extrapolated_s": nb_extrapolated,
                        "ratio": ratio, "ratio_vs_expert": _ratio(suite_wall, expert_wall),
                        "serial_ratio_vs_expert": _ratio(serial_wall, expert_wall), "equal_texts": equal}
        per_gpu = suite.get("workers_per_gpu")
        e = self.emit
        prompts = "prompts of different lengths" if self.varied_prompts else "one prompt for all"
        e(f"## Wall time, {len(RECIPES)} recipes x {self.samples} samples, {NEW_TOKENS} new tokens each, {prompts}", "",
          "| | wall | samples/s | |", "|---|---|---|---|",
          f"| (a) evalorch suite, packed (exit {suite.get('exit')}) | {_s(suite_wall)} | {_rate(total, suite_wall)} | "
          f"5 fresh workers, up to {per_gpu} at once on the GPU (the default), {self.attn}, batch auto |",
          f"| (a1) evalorch suite, `--max-workers-per-gpu 1` (exit {serial.get('exit')}) | "
          f"{_s(serial_wall)} | {_rate(total, serial_wall)} | one worker at a time, two started ahead |",
          f"| (b) notebook way, measured | {_s(nb_measured)} | "
          f"{_rate(sum(len(m['sample_s']) for m in nb.get('models', [])), nb_measured)} | "
          f"{'/'.join(str(len(m['sample_s'])) for m in nb.get('models', []))} samples per model, one generate each |",
          f"| (b) notebook way, extrapolated to {self.samples} per model | {_s(nb_extrapolated)} | "
          f"{_rate(total, nb_extrapolated)} | imports + processor + per model: load + first sample + "
          f"{self.samples - 1} x mean of the other measured samples + teardown |",
          f"| (c) expert loop, one process (exit {ex.get('exit')}) | {_s(expert_wall)} | "
          f"{_rate(total, expert_wall)} | each model in turn, one batched generate per batch of {ex.get('batch')} |",
          f"| ratio (a) / (b extrapolated) | **{_x(ratio)}** | | target <= 0.1x |",
          f"| ratio (a) / (c) | **{_x(_ratio(suite_wall, expert_wall))}** | | target <= 0.7x |",
          f"| ratio (a1) / (c) | {_x(_ratio(serial_wall, expert_wall))} | | |",
          *([f"| (a) again, after (a1) (exit {again.get('exit')}) | {_s(again.get('wall_s'))} | "
             f"{_rate(total, again.get('wall_s'))} | the same packed suite, to see whether it repeats |"]
            if again else []), "",
          f"Per-sample texts equal: (c) and (a1) {_count(equal['expert_vs_serial'])}, (c) and (a) "
          f"{_count(equal['expert_vs_suite'])}, (a) and (a1) {_count(equal['suite_vs_serial'])}"
          + (f", (a) and (a) again {_count(equal['suite_vs_again'])}" if again else "")
          + (f"; parity_check = {self.parity_check} in both suites" if self.parity_check is not None else "")
          + ".", "")
        e("## Device (measured in this script)", "", "| device copy (read+write) | bf16 matmul 8192^3 | "
          "host-to-device pinned | host-to-device pageable |", "|---|---|---|---|",
          f"| {_gbps(hw.get('copy_Bps'))} | {_tflops(hw.get('matmul_flops'))} | {_gbps(hw.get('h2d_pinned_Bps'))} | "
          f"{_gbps(hw.get('h2d_pageable_Bps'))} |", "")
        for title, table in ((f"(a) evalorch, up to {per_gpu} workers at once", rows),
                             ("(a1) evalorch, one worker at a time", serial_rows)):
            e(f"## {title}, per recipe (seconds; parent: hidden_startup, spawn_to_hello, teardown; worker: imports, "
              "page_cache, held, load, first_sample, inference)", "",
              "| recipe | status | batch | hidden_startup | spawn_to_hello | imports | page_cache | held | load | "
              "load GB/s | cuda init | weights GB/s | staged read GB/s | first_sample | inference | batch wait | "
              "generate | s/sample | samples/s | gen tok/s | teardown | exit | not hidden | parity | ran beside |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
              *[_recipe_line(r) for r in table], "",
              "The first batch (worker seconds from its first import; its preparation in pieces, in the prefetch "
              "thread): the GPU waits `batch wait` where it is ready after the load.", "",
              "| recipe | loaded at | first batch ready at | samples (images, texts) | processor | pin | batch wait |",
              "|---|---|---|---|---|---|---|",
              *[f"| {r['name']} | {_s(r['loaded_at_s'])} | {_s(r['first_batch'].get('ready_at'))} | "
                f"{_s(r['first_batch'].get('samples'))} | {_s(r['first_batch'].get('processor'))} | "
                f"{_s(r['first_batch'].get('pin'))} | {_s(r['batch_wait_s'])} |" for r in table], "")
        e("not hidden = time from the previous worker's exit (its `finished` line in the parent's output) to this "
          "worker's `loaded` line, less its load: the start-up the pipeline did not hide (one worker at a time "
          "only). load GB/s = bytes of the "
          "chain's weight files / load seconds (CUDA context creation included); weights GB/s = the same bytes / "
          "(load - cuda init); staged read GB/s = the root's bytes / the staged reader's seconds (loading/weights.py: "
          "page cache -> pinned buffers -> device), before transformers builds the model. gen tok/s = generated "
          "tokens / inference seconds (prefill included). exit = the worker's `done` to its reaping (derived: the "
          "parent's run span less the worker's own span), which the parent's `teardown` (pipe closed to reaped) does "
          "not see. spawn_to_hello of a held worker is when the parent first read its pipe (at release), not when it "
          "said hello: its imports column is the real figure. parity = the batch-parity check (the first batch's first "
          "samples checked again alone: teacher-forced, generated where that disagrees), inside inference. "
          "ran beside = the recipes whose workers were on the GPU at the same time (summary.json's "
          "concurrent_with).", "")
        e("## (b) the notebook way, per model", "", "| model | load | load GB/s | samples measured | first sample | "
          "mean of the rest | extrapolated to all | teardown |", "|---|---|---|---|---|---|---|---|",
          *[f"| {r['name']} | {_s(r['load_s'])} | {_gb(r['load_GBps'])} | {r['n']} | {_s(r['first_s'], 3)} | "
            f"{_s(r['mean_s'], 3)} | {_s(r['extrapolated_s'])} | {_s(r['teardown_s'])} |" for r in notebook_rows],
          "", f"imports {_s(nb.get('imports_s'))}, processor and dataset {_s(nb.get('setup_s'))}; excluded from its "
          f"wall: the device and kernel measurements ({_s(nb.get('excluded_s'))}).", "")
        self.expert_section(ex, serial.get("texts") or {}, suite.get("texts") or {})
        self.kernel_section(hw, nb.get("kernels") or {}, serial_rows or rows)
        self.targets(ratio, serial_rows or rows, {"(a) packed, the default": (_ratio(suite_wall, expert_wall),
                                                                       equal["expert_vs_suite"]),
                                               "(a1) one at a time": (_ratio(serial_wall, expert_wall),
                                                                      equal["expert_vs_serial"])},
                     {"(a1) one at a time, where the checks follow each other":
                      _parity_share(serial_rows, serial_wall, len(RECIPES))})
        (self.out / "bench.json").write_text(json.dumps(f, indent=1, default=str))

    def expert_section(self, ex: dict, serial: dict[str, dict[str, str]], suite: dict[str, dict[str, str]]) -> None:
        models = ex.get("models") or []
        lines = [f"| {m['name']} | {_s(m['load_s'])} | {_s(m['generate_s'])} | {_s(m['teardown_s'])} | "
                 f"{_count(_equal_texts({m['name']: m['texts']}, serial))} | "
                 f"{_count(_equal_texts({m['name']: m['texts']}, suite))} |" for m in models]
        self.emit("## (c) the expert loop, per model (benchmarks/expert_loop.py)", "",
                  "| model | load | generate | teardown | texts equal to (a1) | texts equal to (a) |",
                  "|---|---|---|---|---|---|", *lines, "",
                  f"imports {_s(ex.get('imports_s'))}, inputs prepared once for all models (chat template, images, "
                  f"one processor call per batch) {_s(ex.get('prepare_s'))}; wall {_s(ex.get('wall_s'))} in a "
                  f"process of {_s(ex.get('process_wall_s'))}.", "")

    def kernel_section(self, hw: dict, k: dict, rows: list[dict]) -> None:
        if "prefill_s" not in k:
            self.emit(f"## Kernels: not measured ({k.get('error', 'no result')})", "")
            return
        batch = k["batch"]
        weights = self.figures["model_bytes"]["base"]
        copy, matmul = hw["copy_Bps"], hw["matmul_flops"]
        step_floor = max(weights / copy, k["decode_step_flops"] / matmul)
        prefill_floor = k["prefill_flops"] / matmul
        floor = (prefill_floor + (NEW_TOKENS - 1) * step_floor) / batch
        k |= {"step_floor_s": step_floor, "prefill_floor_s": prefill_floor, "per_sample_floor_s": floor}
        for row in rows:
            if row.get("s_per_sample") and row.get("batch") == k["batch_requested"]:
                row["floor_ratio"] = row["s_per_sample"] / floor
        dtype = "float32" if self.small else "bf16"
        self.emit(f"## Prefill and decode at batch {batch} (base, {self.attn}, {dtype}; one generate of 1 and of "
                  f"{NEW_TOKENS} tokens in the notebook process)", "",
                  "| figure | measured | bound | of bound |", "|---|---|---|---|",
                  f"| prefill ({sum(k['tokens'])} text+image tokens, {sum(k['patches'])} vision patches; "
                  f"{k['prefill_flops'] / 1e12:.1f} TFLOP) | {_s(k['prefill_s'], 3)} = "
                  f"{_tflops(k['prefill_flops'] / k['prefill_s'])} | {_tflops(matmul)} (matmul) | "
                  f"{k['prefill_flops'] / k['prefill_s'] / matmul:.0%} |",
                  f"| decode step ({weights / 1e9:.2f} GB of weights) | {k['decode_step_s'] * 1e3:.2f} ms = "
                  f"{batch / k['decode_step_s']:,.0f} tok/s | {step_floor * 1e3:.2f} ms = {batch / step_floor:,.0f} "
                  f"tok/s (weights / copy bandwidth) | {step_floor / k['decode_step_s']:.0%} |",
                  f"| per sample, prefill + {NEW_TOKENS - 1} decode steps, / batch | "
                  f"{(k['generate_s']) / batch * 1e3:.1f} ms | {floor * 1e3:.1f} ms (floor) | "
                  f"{floor / (k['generate_s'] / batch):.0%} |", "")

    def targets(self, ratio: float | None, rows: list[dict],
                against_expert: dict[str, tuple[float | None, tuple[int, int]]],
                parity_shares: dict[str, float | None]) -> None:
        """Issue 33's targets: the defaults against the expert loop, the parity check's share of the wall, the first
        worker's start, loads, per-sample inference against its floor; and the notebook way's of issue 7."""
        not_hidden = [(r["name"], r["not_hidden_s"]) for r in rows[1:] if r.get("not_hidden_s") is not None]
        loads = [(r["name"], r["weights_GBps"] or r["load_GBps"]) for r in rows if r.get("load_GBps")]
        floors = [(r["name"], r["floor_ratio"]) for r in rows if r.get("floor_ratio")]
        first = rows[0] if rows else {}

        def verdict(ok: bool | None) -> str:
            return "n/a" if ok is None else ("**met**" if ok else "**not met**")

        listing = lambda pairs, fmt: ", ".join(f"{n} {fmt(v)}" for n, v in pairs) or "n/a"  # noqa: E731
        self.emit("## Targets", "",
                  *[f"- suite wall {which} <= 0.7x the expert loop's, every per-sample text equal: "
                    f"{verdict(None if value is None else value <= 0.7 and equal[0] == equal[1])} "
                    f"({_x(value)}; texts equal {_count(equal)})"
                    for which, (value, equal) in against_expert.items()],
                  *[f"- the parity check <= 5% of the suite's wall, {which}: "
                    f"{verdict(None if share is None else share <= 0.05)} "
                    f"({'n/a' if share is None else f'{share:.1%}'})" for which, share in parity_shares.items()],
                  f"- suite wall <= 0.1x the notebook way's: {verdict(None if ratio is None else ratio <= 0.1)} "
                  f"({_x(ratio)}, against the extrapolated notebook wall)",
                  f"- start-up not hidden <= 1 s for every recipe after the first: "
                  f"{verdict(None if not not_hidden else max(v for _, v in not_hidden) <= 1)} "
                  f"({listing(not_hidden, lambda v: f'{v:.2f} s')}; the first recipe has nothing to hide behind: "
                  f"spawn to hello {_s(first.get('spawn_to_hello_s'))}, imports {_s(first.get('imports_s'))})",
                  f"- the first worker from spawn to loaded <= 8 s: "
                  f"{verdict(None if first.get('spawn_to_loaded_s') is None else first['spawn_to_loaded_s'] <= 8)} "
                  f"({_s(first.get('spawn_to_loaded_s'))}; its imports {_s(first.get('imports_s'))})",
                  f"- model load >= 15 GB/s from a warm page cache (weights GB/s: CUDA context creation apart): "
                  f"{verdict(None if not loads else min(v for _, v in loads) >= 15)} "
                  f"({listing(loads, lambda v: f'{v:.1f} GB/s')})",
                  f"- per-sample inference <= 2x the prefill+decode floor at the chosen batch: "
                  f"{verdict(None if not floors else max(v for _, v in floors) <= 2)} "
                  f"({listing(floors, lambda v: f'{v:.2f}x')})", "")

    def emit(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
        self.lines.extend(lines)
        (self.out / "bench.md").write_text("\n".join(self.lines) + "\n")


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _previous(name: str) -> str | None:
    names = [n for n, _, _ in RECIPES]
    index = names.index(name)
    return names[index - 1] if index else None


def _events(lines: list[tuple[float, str]], names: list[str]) -> dict[str, dict[str, float]]:
    """When the parent printed each recipe's `starting`, `loaded` and `finished` lines (seconds since spawn). With
    several workers at once the lines name their GPU and recipe ("[GPU 0] r1: loaded in ...")."""
    events: dict[str, dict[str, float]] = {}
    current = None
    for at, text in lines:
        if m := re.match(r"\[\d+/\d+\] (\S+): worker pid \d+ starting", text):
            current = m.group(1)
            events.setdefault(current, {})["started"] = at
        elif m := re.match(r"\s+\[GPU \d+\] (\S+): loaded in ", text):
            events.setdefault(m.group(1), {})["loaded"] = at
        elif current and text.strip().startswith("loaded in "):
            events[current]["loaded"] = at
        elif (m := re.match(r"\s+(?:\[GPU \d+\] )?(\S+): \w+, \d+ samples", text)) and m.group(1) in names:
            events.setdefault(m.group(1), {})["finished"] = at
    return events


def _suite_rows(suite: dict) -> list[dict]:
    """The per-recipe rows of one suite run; `not hidden` only when one worker ran at a time."""
    rows = []
    serial = suite.get("workers_per_gpu") in (None, 1)
    for name, _, _ in RECIPES:
        if name not in suite.get("recipes", {}):
            continue
        row = _recipe_row(suite["recipes"][name])
        previous, event = suite["events"].get(_previous(name) or "", {}), suite["events"].get(name, {})
        if serial and previous.get("finished") is not None and event.get("loaded") is not None and row["load_s"]:
            row["not_hidden_s"] = event["loaded"] - previous["finished"] - row["load_s"]
            if row["exit_s"] is not None and row["not_hidden_s"] > 0:  # a late worker: see _exit_seconds
                row["exit_s"] -= row["not_hidden_s"]
        rows.append(row)
    return rows


def _suite_texts(run_dir: Path, names: list[str]) -> dict[str, dict[str, str]]:
    """Each recipe's generated text per sample id, from its samples.jsonl."""
    texts: dict[str, dict[str, str]] = {}
    for name in names:
        path = run_dir / name / "samples.jsonl"
        if path.is_file():
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            texts[name] = {r["id"]: r["text"] for r in records if r.get("text") is not None}
    return texts


def _expert_texts(expert: dict) -> dict[str, dict[str, str]]:
    return {m["name"]: m.get("texts") or {} for m in expert.get("models") or []}


def _equal_texts(left: dict[str, dict[str, str]], right: dict[str, dict[str, str]]) -> tuple[int, int]:
    """(equal, compared): per-sample texts of the recipes both sides have, sample by sample."""
    pairs = [(texts.get(sid), right[name].get(sid)) for name, texts in left.items() if name in right
             for sid in texts.keys() | right[name].keys()]
    return sum(1 for a, b in pairs if a is not None and a == b), len(pairs)


def _count(pair: tuple[int, int]) -> str:
    return f"{pair[0]}/{pair[1]}" if pair[1] else "n/a"


def _ratio(value: float | None, against: float | None) -> float | None:
    return value / against if value and against else None


def _recipe_row(summary: dict) -> dict:
    timings = summary.get("timings") or {}
    done = summary.get("done") or {}
    worker = done.get("timings") or {}
    counts = done.get("counts") or {}
    loaded = summary.get("loaded") or {}
    chain = sum(link.get("bytes") or 0 for link in summary.get("lineage") or [])
    load = loaded.get("seconds") or None
    scored = counts.get("scored") or 0
    to_hello, hello_at, loaded_at = timings.get("spawn_to_hello"), _hello_at(worker), worker.get("loaded_at")
    inference = worker.get("inference")
    return {
        "name": summary["name"], "status": summary.get("status"), "batch": counts.get("batch_size"),
        "hidden_startup_s": timings.get("hidden_startup"), "spawn_to_hello_s": timings.get("spawn_to_hello"),
        "teardown_s": timings.get("teardown"), "imports_s": worker.get("imports"),
        "page_cache_s": worker.get("page_cache"), "held_s": worker.get("held"), "load_s": load,
        "spawn_to_loaded_s": to_hello - hello_at + loaded_at
        if to_hello is not None and hello_at is not None and loaded_at is not None else None,
        "load_GBps": chain / load / 1e9 if load else None, "first_sample_s": worker.get("first_sample"),
        "cuda_init_s": loaded.get("cuda_init_s"), "loader": loaded.get("loader"),
        "weights_GBps": chain / (load - loaded["cuda_init_s"]) / 1e9 if load and "cuda_init_s" in loaded else None,
        "staged_GBps": loaded["staged_bytes"] / loaded["staged_s"] / 1e9 if loaded.get("staged_s") else None,
        "inference_s": inference, "s_per_sample": inference / scored if inference and scored else None,
        "batch_wait_s": worker.get("batch_wait"), "generate_s": worker.get("generate"),
        "samples_per_s": scored / inference if inference and scored else None,
        "gen_tok_per_s": counts.get("decode_tokens_per_s"), "not_hidden_s": None, "chain_bytes": chain,
        "exit_s": _exit_seconds(summary.get("seconds"), timings, worker),
        "beside": summary.get("concurrent_with"), "parity_s": (summary.get("parity") or {}).get("seconds"),
        "loaded_at_s": loaded_at, "first_batch": {k.removeprefix("first_batch_"): v for k, v in worker.items()
                                                  if k.startswith("first_batch_")},
        "parity_how": _parity_how(summary.get("parity") or {}),
    }


def _parity_share(rows: list[dict], wall: float | None, recipes: int) -> float | None:
    """The parity checks' seconds, summed over the recipes, as a share of the suite's wall (None unless every
    recipe finished and reported its check). Meant for recipes run one after another: packed ones overlap."""
    seconds = [r["parity_s"] for r in rows if r.get("parity_s") is not None]
    return sum(seconds) / wall if wall and len(seconds) == recipes else None


def _parity_how(parity: dict) -> str:
    """How the parity check settled its samples (worker/inference/parity.py): forced, generated alone."""
    if "forced_agreed" not in parity:
        return ""
    return (f" ({parity['forced_agreed']} forced, {parity.get('forced_tied', 0)} tied, "
            f"{parity['generated_alone']} generated)")


def _exit_seconds(seconds: float | None, parent: dict, worker: dict) -> float | None:
    """From the worker's `done` to its reaping (CUDA context teardown, interpreter exit), derived: the parent's
    `teardown` starts only when the result pipe closes, which is when the worker has already exited. The parent's
    span of the run less the worker's own span from release (held) or from its first import (not held). A held
    worker that was not ready at its release noticed `go` late, and that lateness is in the parent's span: the
    caller subtracts it (the recipe's "not hidden" time)."""
    hello_at = _hello_at(worker)
    if seconds is None or worker.get("total") is None or hello_at is None:
        return None
    if worker.get("held") is not None:  # held from its hello to its go
        return seconds - (worker["total"] - hello_at - worker["held"])
    if parent.get("spawn_to_hello") is None:
        return None
    return seconds - worker["total"] - (parent["spawn_to_hello"] - hello_at)


def _hello_at(worker: dict) -> float | None:
    """When the worker said hello, seconds from its first import. Runs before d9df41d record no `hello_at`: their
    workers said hello once every import was done, so `imports` is that time."""
    return worker.get("hello_at", worker.get("imports"))


def _recipe_line(r: dict) -> str:
    return (f"| {r['name']} | {r['status']} | {r['batch']} | {_s(r['hidden_startup_s'])} | "
            f"{_s(r['spawn_to_hello_s'])} | {_s(r['imports_s'])} | {_s(r['page_cache_s'])} | {_s(r['held_s'])} | "
            f"{_s(r['load_s'])} | {_gb(r['load_GBps'])} | {_s(r['cuda_init_s'])} | {_gb(r['weights_GBps'])} | "
            f"{_gb(r['staged_GBps'])} | {_s(r['first_sample_s'])} | {_s(r['inference_s'])} | "
            f"{_s(r['batch_wait_s'])} | {_s(r['generate_s'])} | "
            f"{_s(r['s_per_sample'], 4)} | {_num(r['samples_per_s'])} | {_num(r['gen_tok_per_s'], 0)} | "
            f"{_s(r['teardown_s'])} | {_s(r['exit_s'])} | {_s(r['not_hidden_s'])} | "
            f"{_s(r['parity_s'])}{r['parity_how']} | {', '.join(r['beside']) if r['beside'] else '-'} |")


def _notebook_row(m: dict, samples: int) -> dict:
    times = m["sample_s"]
    rest = _mean(times[1:]) if len(times) > 1 else times[0]
    return {"name": m["name"], "load_s": m["load_s"], "load_GBps": m["bytes"] / m["load_s"] / 1e9, "n": len(times),
            "first_s": times[0], "mean_s": rest, "teardown_s": m["teardown_s"],
            "extrapolated_s": m["load_s"] + times[0] + (samples - 1) * rest + m["teardown_s"]}


def _s(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f} s"


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _rate(count: int, seconds: float | None) -> str:
    return "n/a" if not seconds else f"{count / seconds:.2f}"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}x"


def _gb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _gbps(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e9:,.1f} GB/s"


def _tflops(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e12:,.1f} TFLOP/s"


def bench(args: argparse.Namespace) -> int:
    runner = Bench(args.work.resolve(), args.out.resolve(), args.small, args.samples, args.notebook_samples,
                   args.budget, args.parity_check, args.varied_prompts)
    log(f"bench: device {runner.device}, {args.samples} samples, notebook subset {args.notebook_samples}, "
        f"budget {args.budget:.0f}s")
    dataset = runner.build()
    failed = False
    small = args.small
    packed = args.workers or (3 if small else None)
    runs = [("suite", packed), ("suite_serial", 1)] + ([("suite_again", packed)] if args.again else [])
    # what the later steps need at least, on the H200: (c) 70 s, (b) 120 s (it measures what time is left), a
    # suite 80 s (a suite's run is cut at its reserve: a later one would otherwise find no time)
    after = (40 if small else 70) + (0 if args.no_notebook else (60 if small else 120))
    for index, (key, workers) in enumerate(runs):
        reserve = after + (50 if small else 80) * (len(runs) - index - 1)
        try:
            runner.suite(dataset, key, workers, reserve)
        except (SystemExit, OSError, ValueError) as exc:
            log(f"{key} failed: {exc}")
            failed = True
            runner.figures.setdefault(key, {"recipes": {}, "events": {}})
    batches = [((s.get("done") or {}).get("counts") or {}).get("batch_size")
               for s in ((runner.figures.get("suite_serial") or {}).get("recipes") or {}).values()]
    batch = next((b for b in batches if b), 8)
    runner.expert(batch, 60 if small else (10 if args.no_notebook else 120))
    if not args.no_notebook:
        runner.notebook(batch)
    runner.report()
    exits = [runner.figures[key].get("exit") for key in [name for name, _ in runs] + ["expert"]]
    return 1 if failed or any(exits) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("bench", help="build, run (a) and (b), print the table")
    run.add_argument("--work", type=Path, required=True, help="scratch folder: models, data, run folders")
    run.add_argument("--out", type=Path, required=True, help="where the table and the logs go")
    run.add_argument("--small", action="store_true", help="tiny shapes on the CPU: the flow without a GPU")
    run.add_argument("--samples", type=int, default=None, help="dataset size (default 200; 12 with --small)")
    run.add_argument("--notebook-samples", type=int, default=None, help="notebook subset per model (40; 3 small)")
    run.add_argument("--budget", type=float, default=None, help="seconds for everything (default 540; 900 small)")
    run.add_argument("--workers", type=int, default=None,
                     help="(a)'s --max-workers-per-gpu (default: auto; 3 with --small)")
    run.add_argument("--parity-check", type=int, default=None,
                     help="the suites' parity_check (default: the recipe default, 8); 0 measures them without it")
    run.add_argument("--again", action="store_true",
                     help="run (a) a second time after (a1): are packed runs repeatable, text for text?")
    run.add_argument("--no-notebook", action="store_true", help="skip (b) (and the device measurements in it)")
    run.add_argument("--varied-prompts", action="store_true",
                     help="prompts of different lengths (batches pad, as a real set's do) instead of one for all")
    make = sub.add_parser("build", help="(internal) write the random-weight model family")
    make.add_argument("--models", type=Path, required=True)
    make.add_argument("--device", default="cuda")
    make.add_argument("--small", action="store_true")
    nb = sub.add_parser("notebook", help="(internal) the notebook way and the device measurements")
    nb.add_argument("--models", type=Path, required=True)
    nb.add_argument("--dataset", type=Path, required=True)
    nb.add_argument("--device", default="cuda")
    nb.add_argument("--attn", default="flash_attention_2")
    nb.add_argument("-n", type=int, required=True)
    nb.add_argument("--deadline", type=float, required=True, help="epoch seconds by which to be done")
    nb.add_argument("--batch", type=int, required=True)
    nb.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "build":
        build_family(args.models, args.device, args.small)
        return 0
    if args.command == "notebook":
        notebook(args.models, args.dataset, args.device, args.attn, args.n, args.deadline, args.batch, args.json)
        return 0
    args.samples = args.samples or (12 if args.small else 200)
    args.notebook_samples = args.notebook_samples or (3 if args.small else 40)
    args.budget = args.budget or (900.0 if args.small else 540.0)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
