"""How long a fresh worker takes to import what it needs before it can load, alone and with others importing at the
same time (issue 33: the first worker's imports are on every suite's critical path, and two workers are started
ahead of the next recipes while it imports).

    python3 -m benchmarks.import_contention --at-once 1,3 --rounds 2 [--out OUT]   # on the GPU machine, or here

Each round starts N fresh Python processes at once; each imports the worker's modules (worker/__main__.py's
imports, with the optional ones it hides hidden) and reports its own seconds, from its first import to its last.
The first round of all reads the libraries from disk: compare the later rounds. With --importtime, one more process
alone writes `python -X importtime` to OUT/importtime.txt, and the largest cumulative imports are printed.

    python3 -m benchmarks.import_contention --stages /tmp/bench/models/base --rounds 3   # GPU machine, or here

With --stages, each fresh process imports in stages and says how long each took: torch; what loading the
processor saved in FOLDER needs (and the load itself); the rest of what batch preparation needs; then the model
stack (transformers' modeling, peft), which a worker imports while its first batch is prepared. Which heavy
libraries had been imported by the end of each stage is listed.
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

ROOT = Path(__file__).resolve().parent.parent
# what worker/__main__.py imports before its first load, in its order: what preparing batches needs (transformers'
# processors), then the model stack (transformers' modeling, peft) while the first batch is prepared
BATCH_MODULES = ("contract.dataset", "worker.inference.infer", "worker.loading.chain_files", "worker.loading.processor")
MODEL_MODULES = ("worker.decode.decode_attention", "worker.loading.load")
WORKER_MODULES = ("torch", *BATCH_MODULES, *MODEL_MODULES)
# libraries whose import is a large share of the worker's (python -X importtime on the GPU machine)
HEAVY = ("torchvision", "torch._dynamo", "torch.distributed.tensor", "sympy", "transformers.modeling_utils",
         "transformers.generation.utils", "transformers.masking_utils", "peft")
# import statements, not importlib.import_module: -X importtime leaves out the module that call imports itself
_CHILD = f"""
import json, time
started = time.perf_counter()
from worker.startup import unused_optional_imports_hidden
with unused_optional_imports_hidden():
    import {", ".join(WORKER_MODULES)}
print(json.dumps({{"seconds": time.perf_counter() - started}}))
"""


_STAGES_CHILD = f"""
import json, sys, time
from worker.startup import unused_optional_imports_hidden
heavy = {HEAVY!r}
stages, loaded = {{}}, {{}}
def stage(name, began):
    stages[name] = time.perf_counter() - began
    loaded[name] = [m for m in heavy if m in sys.modules and m not in sum(loaded.values(), [])]
    return time.perf_counter()
clock = time.perf_counter()
import torch
clock = stage("torch", clock)
with unused_optional_imports_hidden():
    from transformers import AutoProcessor
    AutoProcessor.from_pretrained(sys.argv[1])
    clock = stage("processor", clock)
    import {", ".join(BATCH_MODULES)}
    clock = stage("batch preparation", clock)
    import {", ".join(MODEL_MODULES)}
    stage("the rest", clock)
print(json.dumps({{"seconds": stages, "heavy_first_imported": loaded}}))
"""


def stages_round(folder: Path) -> dict:
    """One fresh process importing in stages (see --stages), loading the processor saved in `folder`."""
    done = subprocess.run([sys.executable, "-c", _STAGES_CHILD, str(folder)], cwd=ROOT, capture_output=True,
                          text=True, env=_env())
    if done.returncode != 0:
        raise SystemExit(f"an importing process failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def import_round(count: int) -> list[float]:
    """`count` fresh processes importing at once: each one's own import seconds."""
    children = [subprocess.Popen([sys.executable, "-c", _CHILD], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                 env=_env()) for _ in range(count)]
    seconds = []
    for child in children:
        out, _ = child.communicate()
        if child.returncode != 0:
            raise SystemExit(f"an importing process failed (exit {child.returncode})")
        seconds.append(json.loads(out.strip().splitlines()[-1])["seconds"])
    return seconds


def largest_imports(text: str, count: int = 15) -> list[tuple[float, str]]:
    """The `count` largest cumulative times (seconds) in `python -X importtime` output, with their modules."""
    rows = []
    for line in text.splitlines():
        if match := re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s*(\S+)", line):
            rows.append((int(match.group(1)) / 1e6, match.group(2)))
    return sorted(rows, reverse=True)[:count]


def importtime(out: Path) -> list[tuple[float, str]]:
    """One process alone under `python -X importtime`; its report written to out/importtime.txt."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", _CHILD], cwd=ROOT, capture_output=True,
                          text=True, env=_env(), check=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "importtime.txt").write_text(done.stderr)
    return largest_imports(done.stderr)


def _env() -> dict[str, str]:
    """This environment with the checkout importable and no GPU visible unless one was named."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--at-once", default="1,3", help="processes importing at once, per round kind (1,3)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each kind, after one warm-up round (2)")
    parser.add_argument("--importtime", action="store_true", help="also one process under -X importtime")
    parser.add_argument("--out", type=Path, default=Path("import_contention"))
    parser.add_argument("--stages", type=Path, help="a folder with a saved processor: import in stages instead")
    args = parser.parse_args(argv)
    kinds = [int(n) for n in args.at_once.split(",")]
    started = time.perf_counter()
    warm = import_round(1)
    print(f"warm-up (libraries from disk, page cache cold or not): {warm[0]:.2f} s", flush=True)
    if args.stages is not None:
        rows = [stages_round(args.stages) for _ in range(args.rounds)]
        for row in rows:
            print("stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in row["seconds"].items()), flush=True)
        print("heavy libraries, by the stage that first had them: " + json.dumps(rows[-1]["heavy_first_imported"]))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "stages.json").write_text(json.dumps(rows, indent=1))
        return 0
    results: dict[str, list[list[float]]] = {}
    for _ in range(args.rounds):
        for count in kinds:
            seconds = import_round(count)
            results.setdefault(str(count), []).append(seconds)
            print(f"{count} at once: " + ", ".join(f"{s:.2f} s" for s in seconds), flush=True)
    print("\n| importing at once | each process's imports (all rounds) | slowest |\n|---|---|---:|")
    for kind, rounds in results.items():
        flat = [s for r in rounds for s in r]
        print(f"| {kind} | {min(flat):.2f}-{max(flat):.2f} s | {max(flat):.2f} s |")
    figures = {"warm_up_s": warm[0], "by_count": results, "python": sys.version.split()[0]}
    if args.importtime:
        top = importtime(args.out)
        figures["largest"] = top
        print("\nlargest cumulative imports (one process alone):")
        for cumulative, name in top:
            print(f"  {cumulative:6.2f} s  {name}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "imports.json").write_text(json.dumps(figures, indent=1))
    print(f"\n{time.perf_counter() - started:.1f} s in all; figures in {args.out / 'imports.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
