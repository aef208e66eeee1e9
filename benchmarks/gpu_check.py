"""The GPU machine's proof of the memory preflight and the no-offload guarantee, in one command.

    python3 -m benchmarks.gpu_check check --work /tmp/gpu_check --out "$OUT"            # on the GPU machine
    python3 -m benchmarks.gpu_check check --work /tmp/gpu_check --out /tmp/o --small    # the same flow on a CPU

What it does, each through `python -m orchestrator run` as a user runs it:
  demo  the tiny demo suite on CUDA (bfloat16, flash_attention_2): the core loop works on a GPU;
  (a)   random-weight Qwen2-VL models at the 2B and 7B shapes, each also with a LoRA adapter: the parent's
        estimate against the memory each worker really used (NVML's figure for the process; aim within 15%);
  (b)   a second process holding most of the GPU: the recipe is refused, the holder's pid is named, no worker
        starts; then a holder that leaves room for the weights but not the batch: the batch is lowered;
  (c)   NVML's free memory before each launch of (a) against the baseline before the first.

The models are written straight from random bfloat16 tensors (no training, no hub) by a child process, so that
this process never holds a CUDA context itself (it would count as a foreign holder). --small builds tiny shapes
on the CPU and drives the preflight with the fake NVML (EVALORCH_FAKE_NVML) and a `sleep` as the holder.
Tables go to stdout and to OUT/gpu_check.md; each CLI run's output goes to OUT/*.log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from contract.nvml import FAKE_ENV, open_nvml, write_fake_nvml
from contract.units import GIB
from orchestrator.gpu.memory import read_workload
from orchestrator.planning.plan import make_plans
from orchestrator.planning.recipes import load_recipe_file
from tools.synthetic import red_rectangles

ROOT = Path(__file__).resolve().parent.parent

VOCAB = 151936
VISION = {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4}
SHAPES = {  # Qwen2-VL-2B and -7B (text) with their shared vision tower
    "2b": {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
           "intermediate_size": 8960, "tie": True, "joint": False, "vision": VISION},
    "7b": {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
           "intermediate_size": 18944, "tie": False, "joint": True, "vision": VISION},
}
SMALL_SHAPES = {  # the same flow at demo sizes, for a CPU; the real vocabulary so decoding sees unknown ids too
    "tiny-a": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "intermediate_size": 128, "tie": True, "joint": False,
               "vision": {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 4}},
    "tiny-b": {"hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
               "intermediate_size": 256, "tie": False, "joint": True,
               "vision": {"depth": 2, "embed_dim": 64, "num_heads": 2, "mlp_ratio": 4}},
}
LORA_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
JOINT_TARGETS = LORA_TARGETS + r"|model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
IMAGE_SIZES = [(448, 448), (560, 420), (420, 560), (504, 504)]  # multiples of 28: 256 to 324 image tokens
SAMPLES, BATCH, NEW_TOKENS = 16, 8, 32


# ----------------------------------------------------------------------------- building (a child process)


def build(shape_name: str, folder: Path, device: str, small: bool) -> None:
    """A random-weight Qwen2-VL checkpoint (hub key names, sharded safetensors) plus a LoRA adapter beside it."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    shape = (SMALL_SHAPES if small else SHAPES)[shape_name]
    processor, config, generation = qwen2vl_configs(shape)
    with torch.device("meta"):  # names and shapes only; the tensors are made one shard at a time
        model = Qwen2VLForConditionalGeneration(config)
    full = folder / shape_name
    full.mkdir(parents=True, exist_ok=True)
    skip = {"lm_head.weight"} if shape["tie"] else set()
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in skip}
    _write_sharded(shapes, full, device, shard_bytes=4 * GIB)
    config.save_pretrained(full)
    generation.save_pretrained(full)
    processor.save_pretrained(full)
    targets = JOINT_TARGETS if shape["joint"] else LORA_TARGETS  # the 7B's adapter also adapts the vision tower
    write_lora(model, folder / f"{shape_name}-lora", full, targets, device)


def qwen2vl_configs(shape: dict):
    """A Qwen2-VL processor, model config and generation config of `shape`'s sizes (weights are written apart)."""
    from transformers import Qwen2VLConfig, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from tools.make_demo import CHAT_TEMPLATE, build_generation_config, build_tokenizer, token_ids

    tokenizer = build_tokenizer()
    ids = token_ids(tokenizer)
    processor = Qwen2VLProcessor(  # Qwen2-VL's own pixel bounds (up to 1280 image tokens)
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280),
        tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    text = {k: shape[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                  "intermediate_size")}
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    section = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]  # sums to head_dim / 2, like [16, 24, 24]
    section[0] += head_dim // 2 - sum(section)
    config = Qwen2VLConfig(
        text_config={**text, "vocab_size": VOCAB, "max_position_embeddings": 32768,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section},
                     "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"]},
        vision_config={**shape["vision"], "hidden_size": shape["hidden_size"], "patch_size": 14,
                       "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=shape["tie"], dtype="bfloat16",
    )
    return processor, config, build_generation_config(ids)


def hub_name(name: str) -> str:
    """The key a hub checkpoint uses (transformers maps it back when loading)."""
    return name.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)


def random_tensor(shape: tuple, name: str, device: str):
    """A bfloat16 tensor for the weight `name`: zero biases, unit norms, small random matrices."""
    import torch

    if name.endswith("bias"):
        return torch.zeros(shape, device=device, dtype=torch.bfloat16)
    if len(shape) == 1:  # norms: a scale of one keeps the random activations in range
        return torch.ones(shape, device=device, dtype=torch.bfloat16)
    return torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02


def shard_groups(shapes: dict[str, tuple], shard_bytes: int) -> list[list[str]]:
    """Tensor names in file order, cut into shards of at most `shard_bytes` of bfloat16."""
    import math

    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def _write_sharded(shapes: dict[str, tuple], folder: Path, device: str, shard_bytes: int) -> None:

    from safetensors.torch import save_file

    groups = shard_groups(shapes, shard_bytes)
    weight_map: dict[str, str] = {}  # tensor name -> its shard file
    total = 0
    for number, names in enumerate(groups, 1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {hub_name(n): random_tensor(shapes[n], n, device) for n in names}
        total += sum(t.numel() * 2 for t in tensors.values())
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map |= {key: file for key in tensors}
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def write_lora(model, folder: Path, base: Path, targets: str, device: str, rank: int = 16) -> None:
    """A LoRA adapter as peft saves one, stored in bfloat16 (peft upcasts it to float32 when loading)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(targets)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name):
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = random_tensor((rank, module.in_features), "a", device)
            tensors[f"{prefix}.lora_B.weight"] = random_tensor((module.out_features, rank), "b", device)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "lora_dropout": 0.0, "target_modules": targets, "bias": "none", "inference_mode": True,
              "base_model_name_or_path": str(base), "fan_in_fan_out": False, "use_dora": False,
              "use_rslora": False, "modules_to_save": None}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def build_dataset(folder: Path) -> Path:
    """Images the size of real photos after Qwen2-VL's resize (256-324 image tokens each), one box each."""
    return red_rectangles(folder, SAMPLES, IMAGE_SIZES)


# ----------------------------------------------------------------------------- holding memory (a child process)


def hold(leave: int, device: str) -> None:
    """Take all but `leave` bytes of the GPU's free memory, say so, and keep it until stdin closes."""
    if device == "cuda":
        import torch

        torch.zeros(1, device="cuda")  # the context first, so that what is left is measured after it
        free, _ = torch.cuda.mem_get_info()
        block = torch.empty(max(0, free - leave), dtype=torch.uint8, device="cuda")
        print(f"holding {block.numel() / GIB:.2f} GiB", flush=True)
    print("ready", flush=True)
    sys.stdin.read()


class Holder:
    """A second process holding GPU memory (with --small: a fake NVML file saying that it does)."""

    def __init__(self, leave: int, small: bool, fake: Path | None) -> None:
        args = [sys.executable, "-m", "benchmarks.gpu_check", "hold", "--leave", str(leave),
                "--device", "cpu" if small else "cuda"]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None  # started with stdout=subprocess.PIPE
        while (line := self.proc.stdout.readline()) and line.strip() != "ready":
            print(f"    holder: {line.strip()}")
        if fake is not None:
            write_fake_nvml(fake, [_fake_gpu(leave, [{"pid": self.proc.pid, "used_bytes": 80 * GIB - leave}])])
        self.pid = self.proc.pid

    def close(self) -> None:
        assert self.proc.stdin is not None  # started with stdin=subprocess.PIPE
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _fake_gpu(free: int, processes: list | None = None) -> dict:
    return {"name": "Fake GPU (--small)", "uuid": "GPU-fake-0", "total_bytes": 80 * GIB, "free_bytes": free,
            "processes": processes or []}


# ----------------------------------------------------------------------------- the checks


class Check:
    def __init__(self, work: Path, out: Path, small: bool) -> None:
        self.work, self.out, self.small = work, out, small
        self.device = "cpu" if small else "cuda"
        self.fake = work / "nvml.json" if small else None
        self.report: list[str] = []
        self.attn = "sdpa" if small else _attention()
        work.mkdir(parents=True, exist_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        if self.fake:
            write_fake_nvml(self.fake, [_fake_gpu(80 * GIB)])

    def cli(self, log: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {**os.environ, **({FAKE_ENV: str(self.fake)} if self.fake else {})}
        started = time.monotonic()
        command = [sys.executable, "-m", "orchestrator", *args]
        try:
            result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:  # its workers follow it out through their lifeline
            result = subprocess.CompletedProcess(command, -1, _text(exc.stdout), _text(exc.stderr) + "\nTIMED OUT")
        with open(self.out / log, "a") as f:
            f.write(f"$ python -m orchestrator {' '.join(args)}\n# exit {result.returncode}, "
                    f"{time.monotonic() - started:.1f}s\n{result.stdout}\n{result.stderr}\n")
        return result

    def emit(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
        self.report.extend(lines)
        (self.out / "gpu_check.md").write_text("\n".join(self.report) + "\n")

    # ------------------------------------------------------------------ environment and builds

    def environment(self) -> None:
        nvml = open_nvml()
        lines = ["## Environment", ""]
        if nvml is not None and not self.small:
            state = nvml.state(0)
            lines.append(f"- GPU 0: {state.name}, {state.total_bytes / GIB:.2f} GiB total, "
                         f"{state.free_bytes / GIB:.2f} GiB free, {len(state.processes)} compute process(es)")
        versions = subprocess.run([sys.executable, "-c", _VERSIONS], capture_output=True, text=True).stdout.strip()
        lines += [f"- {versions}", f"- attention for the checks: {self.attn}", ""]
        self.emit(*lines)

    def start_builds(self) -> subprocess.Popen:
        shapes = list(SMALL_SHAPES if self.small else SHAPES)
        log = open(self.out / "build.log", "w")  # noqa: SIM115 - the child writes to it until it exits
        command = [sys.executable, "-m", "benchmarks.gpu_check", "build", "--models", str(self.work / "models"),
                   "--device", self.device,
                   *(["--small"] if self.small else []), *shapes]
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    # ------------------------------------------------------------------ demo

    def demo(self) -> None:
        from tools.make_demo import build_demo

        built = build_demo(self.work / "demo", n_samples=24, seed=0)
        models = self.work / "demo" / "models"
        body = "".join(f'[[recipe]]\nname = "{name}"\nmodel = "{models / folder}"\n{extra}' for name, folder, extra in [
            ("base", "base", "baseline = true\n"), ("r1-llm-only", "r1-llm-only", ""),
            ("r2-vision-only", "r2-vision-only", ""), ("r3-two-stage", "r3-stage2", ""), ("r4-joint", "r4-joint", "")])
        recipes = self.work / "demo.toml"
        recipes.write_text(f'[defaults]\ndataset = "{built["dataset"]}"\n'
                           'prompt = "{prompt} Answer with its bounding box."\nmax_new_tokens = 24\nbatch_size = 8\n'
                           f'[lineage]\nremap = {{ "/ssd1/team/vlm_outputs" = "{models}" }}\n{body}')
        result = self.cli("demo.log", "run", str(recipes), "--device", self.device, "--out", str(self.work / "runs"))
        table = _table_of(result.stdout)
        loaded = sorted(set(re.findall(r"loaded in [\d.]+s \(([^)]*)\)", result.stdout)))
        self.emit("## Demo suite (tiny models) on " + self.device, "", f"exit code {result.returncode}; "
                  f"loaded as: {'; '.join(loaded)}", "", "```", *table, "```", "")

    # ------------------------------------------------------------------ (a) and (c)

    def suite(self, dataset: Path) -> dict:
        names = list(SMALL_SHAPES if self.small else SHAPES)
        models = self.work / "models"
        body = "".join(f'[[recipe]]\nname = "{n}"\nmodel = "{models / n}"\n'
                       f'[[recipe]]\nname = "{n}-lora"\nmodel = "{models / (n + "-lora")}"\n' for n in names)
        recipes = self.work / "suite.toml"
        recipes.write_text(f'[defaults]\ndataset = "{dataset}"\nprompt = "{{prompt}} Answer with its bounding box."\n'
                           f'max_new_tokens = {NEW_TOKENS}\nbatch_size = {BATCH}\nattn = "{self.attn}"\n{body}')
        result = self.cli("suite.log", "run", str(recipes), "--device", self.device, "--out", str(self.work / "runs"),
                          timeout=420)
        rows = recipe_summaries(result.stdout)
        self.emit(f"## (a) Estimate vs measured, {SAMPLES} samples, batch {BATCH}, {NEW_TOKENS} new tokens "
                  f"(exit code {result.returncode})", "",
                  "| recipe | status | estimate (no margin) | estimate + margin | measured (NVML, process) | "
                  "error | peak allocated | peak reserved | batch | oom retries |",
                  "|---|---|---|---|---|---|---|---|---|---|", *[_estimate_row(r) for r in rows], "")
        self.emit("## (c) Free memory before each launch (NVML), against the baseline before the first", "",
                  "| recipe | baseline free | free before launch | difference | waited for release | "
                  "previous worker pid |", "|---|---|---|---|---|---|", *[_release_row(r) for r in rows], "")
        return {"recipes": recipes, "rows": rows}

    # ------------------------------------------------------------------ (b)

    def refusal(self, recipes: Path) -> None:
        big = "tiny-b-lora" if self.small else "7b-lora"
        leave = 3 * 2**20 if self.small else 3 * GIB  # less than either model's weights
        holder = Holder(leave, self.small, self.fake)
        try:
            result = self.cli("holder.log", "run", str(recipes), "--device", self.device, "--only", big,
                              "--out", str(self.work / "runs-refused"))
        finally:
            holder.close()
        row = recipe_summaries(result.stdout)[0]
        detail = " ".join(row["detail"].split())
        self.emit(f"## (b) A second process (pid {holder.pid}) holds all but {leave / GIB:.2f} GiB", "",
                  f"- exit code {result.returncode}; status `{row['status']}`; worker started: "
                  f"{'no' if row.get('pid') is None else 'yes, pid ' + str(row['pid'])}; "
                  f"holder pid named: {'yes' if f'pid {holder.pid} ' in detail else 'NO'}",
                  f"- message: {detail}", "")

    def lowering(self, recipes: Path) -> None:
        big = "7b-lora" if not self.small else "tiny-b-lora"
        recipe_file = load_recipe_file(recipes)
        (plan,) = make_plans(recipe_file, recipe_file.select([big]))
        if plan.chain is None:  # its lineage did not resolve: nothing to estimate
            raise SystemExit(f"{big}: {plan.problem}")
        workload = read_workload(plan.recipe, plan.chain, self.device)
        two, three = workload.estimate(2).total_bytes, workload.estimate(3).total_bytes
        leave = (two + three) // 2  # room for the weights and a batch of 2, not 3
        holder = Holder(leave, self.small, self.fake)
        try:
            result = self.cli("holder.log", "run", str(recipes), "--device", self.device, "--only", big,
                              "--out", str(self.work / "runs-lowered"))
        finally:
            holder.close()
        row = recipe_summaries(result.stdout)[0]
        done = row.get("done") or {}
        record = row.get("preflight") or {}
        self.emit(f"## (b) A second process (pid {holder.pid}) leaves {leave / GIB:.2f} GiB: room for {big}'s "
                  "weights, not its batch", "",
                  f"- exit code {result.returncode}; status `{row['status']}`; batch "
                  f"{record.get('requested_batch_size')} -> {record.get('batch_size')} "
                  f"(lowered: {bool(record.get('batch_lowered'))}); "
                  f"free at launch {in_gib(record.get('free_bytes'))}; measured {in_gib(done.get('nvml_used_bytes'))}; "
                  f"oom retries {(done.get('counts') or {}).get('oom_retries')}; "
                  f"placement ok: {(row.get('loaded') or {}).get('placement_ok')}", "")

    def final_state(self) -> None:
        if self.small:
            return
        nvml = open_nvml()
        if nvml is None:
            self.emit("After all runs: no NVML (no NVIDIA driver) to read the GPU's state", "")
            return
        state = nvml.state(0)
        self.emit(f"After all runs: {state.free_bytes / GIB:.2f} GiB free, compute processes: "
                  f"{[p.pid for p in state.processes] or 'none'}", "")


_VERSIONS = """
import importlib.metadata as m, sys
found = []
for name in ("torch", "transformers", "peft", "flash_attn"):
    try:
        found.append(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        found.append(f"{name} absent")
print("python", sys.version.split()[0] + ";", "; ".join(found))
"""


def _attention() -> str:
    probe = subprocess.run([sys.executable, "-c", "import flash_attn"], capture_output=True, text=True)
    if probe.returncode != 0:
        print(f"flash_attn not importable, the checks use sdpa: {probe.stderr.strip()[-300:]}")
        return "sdpa"
    return "flash_attention_2"


def _table_of(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if "Evaluation results" in line), len(lines))
    end = next((i for i, line in enumerate(lines) if line.startswith("Report:")), len(lines))
    return lines[start:end]


def recipe_summaries(stdout: str) -> list[dict]:
    """Each recipe's summary.json from the run folder the CLI's output names, in the run's order."""
    match = re.search(r"Run folder: (\S+)", stdout)
    if not match:
        raise SystemExit(f"no run folder in the CLI's output:\n{stdout[-3000:]}")
    run_dir = Path(match.group(1))
    names = [r["name"] for r in json.loads((run_dir / "summary.json").read_text())["recipes"]]
    return [json.loads((run_dir / n / "summary.json").read_text()) for n in names]


def in_gib(value: int | None) -> str:
    """Bytes as "1.23 GiB" for a table, "n/a" where there is no figure."""
    return f"{value / GIB:.2f} GiB" if isinstance(value, int) else "n/a"


def _estimate_row(row: dict) -> str:
    record, done = row.get("preflight") or {}, row.get("done") or {}
    estimate = record.get("estimate_used") or record.get("estimate") or {}
    needed, measured = estimate.get("needed_bytes"), done.get("nvml_used_bytes")
    error = f"{(needed - measured) / measured:+.1%}" if isinstance(needed, int) and measured else "n/a"
    counts = done.get("counts") or {}
    return (f"| {row['name']} | {row['status']} | {in_gib(needed)} | {in_gib(estimate.get('total_bytes'))} | "
            f"{in_gib(measured)} | {error} | {in_gib(done.get('peak_bytes'))} | "
            f"{in_gib(done.get('peak_reserved_bytes'))} | {counts.get('batch_size')} | {counts.get('oom_retries')} |")


def _release_row(row: dict) -> str:
    record = row.get("preflight") or {}
    wait = record.get("release_wait") or {}
    base, free = record.get("baseline_free_bytes"), record.get("free_bytes")
    diff = f"{(free - base) / 2**20:+.0f} MiB" if isinstance(base, int) and isinstance(free, int) else "n/a"
    return (f"| {row['name']} | {in_gib(base)} | {in_gib(free)} | {diff} | {wait.get('waited_s', 0):.2f} s | "
            f"{wait.get('previous_pid', '-')} |")


def _text(value: str | bytes | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value or ""


def check(work: Path, out: Path, small: bool) -> int:
    """Every check in turn; one that breaks is reported and the others still run (one device call, no retries)."""
    runner = Check(work, out, small)
    runner.environment()
    builds = runner.start_builds()  # the big checkpoints are written while the demo suite runs
    failed = not _step(runner, runner.demo)
    if builds.wait() != 0:
        runner.emit(f"building the models failed: see {out / 'build.log'}")
        return 1
    suite = _step(runner, runner.suite, build_dataset(work / "data"))
    failed |= not suite
    for step in (runner.refusal, runner.lowering):
        failed |= not (suite and _step(runner, step, suite["recipes"]))
    _step(runner, runner.final_state)
    return 1 if failed else 0


def _step(runner: Check, step, *args):
    try:
        return step(*args) or True
    except Exception as exc:  # report and go on: the next check needs none of this one's results
        import traceback

        runner.emit(f"**{step.__name__} failed**: {exc!r}", "```", traceback.format_exc()[-2000:], "```", "")
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("check", help="run every check and print the tables")
    run.add_argument("--work", type=Path, required=True, help="scratch folder for models, data and run folders")
    run.add_argument("--out", type=Path, required=True, help="where the tables and logs go")
    run.add_argument("--small", action="store_true", help="tiny shapes, CPU, fake NVML: the flow without a GPU")
    make = sub.add_parser("build", help="(internal) write random-weight checkpoints and adapters")
    make.add_argument("--models", type=Path, required=True)
    make.add_argument("--device", default="cuda")
    make.add_argument("--small", action="store_true")
    make.add_argument("shapes", nargs="+")
    keep = sub.add_parser("hold", help="(internal) hold all but --leave bytes of GPU memory until stdin closes")
    keep.add_argument("--leave", type=int, required=True)
    keep.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if args.command == "build":
        for shape in args.shapes:
            started = time.monotonic()
            build(shape, args.models, args.device, args.small)
            print(f"built {shape} in {time.monotonic() - started:.1f}s", flush=True)
        return 0
    if args.command == "hold":
        hold(args.leave, args.device)
        return 0
    return check(args.work.resolve(), args.out.resolve(), args.small)


if __name__ == "__main__":
    sys.exit(main())
