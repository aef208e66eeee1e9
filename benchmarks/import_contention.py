"""How long a fresh worker takes to import what it needs before it can load, alone and with others importing at the
same time (issue 33: the first worker's imports are on every suite's critical path, and two workers are started
ahead of the next recipes while it imports).

    python3 -m benchmarks.import_contention --at-once 1,3 --rounds 2 [--out OUT]   # on the GPU machine, or here

Each round starts N fresh Python processes at once; each imports the worker's modules (worker/__main__.py's
imports, with the optional ones it hides hidden) and reports its own seconds, from its first import to its last.
The first round of all reads the libraries from disk: compare the later rounds. With --importtime, one more process
alone writes `python -X importtime` to OUT/importtime.txt, and the largest cumulative imports are printed.

    python3 -m benchmarks.import_contention --prestage /tmp/m/base --threads 0,4,16 --rounds 3   # GPU machine

With --prestage, each process does what a first worker does: imports torch, starts reading the root's weights onto
the GPU in a thread (worker/loading/weights.py's Prestaged, with each given reader thread count; 0: none), imports
the rest, then takes the weights: its imports' seconds beside the read, the read's own, and the wait for it after.

    python3 -m benchmarks.import_contention --stages /tmp/bench/models/base --rounds 3   # GPU machine, or here

With --stages, each fresh process imports in stages and says how long each took: torch; what loading the
processor saved in FOLDER needs (and the load itself); batch preparation's modules (worker/inference/infer.py);
then the rest of the worker's (the model stack: transformers' modeling, peft). Which heavy libraries had been
imported by the end of each stage is listed: how much of a first worker's imports its first batch must wait for.
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
# what worker/__main__.py imports before its first load, in its order
WORKER_MODULES = ("torch", "contract.dataset", "worker.decode.decode_attention", "worker.inference.infer",
                  "worker.loading.load", "worker.loading.weights")
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


_PRESTAGING_CHILD = f"""
import json, sys, time
started = time.perf_counter()
import torch
from worker.loading.weights import Prestaged, load_safetensors, root_weight_files
from worker.startup import select_device
threads = int(sys.argv[2])

class Sized(Prestaged):
    def _read(self):
        began = time.perf_counter()
        return load_safetensors(self.files, self.device, self.dtype, threads=threads), time.perf_counter() - began

staged = Sized(root_weight_files(sys.argv[1]), select_device('cuda'), torch.bfloat16) if threads else None
from worker.startup import unused_optional_imports_hidden
with unused_optional_imports_hidden():
    import {", ".join(WORKER_MODULES[1:])}
seconds = time.perf_counter() - started
read_s = waited_s = None
if staged is not None:
    _, read_s, waited_s = staged.take()
print(json.dumps({{"seconds": seconds, "read_s": read_s, "waited_s": waited_s}}))
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
    import contract.dataset, worker.inference.infer
    clock = stage("batch preparation", clock)
    import {", ".join(WORKER_MODULES[2:])}
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


def prestaging_round(folder: Path, threads: int) -> dict:
    """One fresh process importing beside a prestaged read of `folder` with `threads` readers (0: no read)."""
    done = subprocess.run([sys.executable, "-c", _PRESTAGING_CHILD, str(folder), str(threads)], cwd=ROOT,
                          capture_output=True, text=True, env={**_env(), **_gpu()})
    if done.returncode != 0:
        raise SystemExit(f"a prestaging process failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _gpu() -> dict[str, str]:
    """The GPU visible again (the import rounds hide it unless one was named)."""
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    return {"CUDA_VISIBLE_DEVICES": named if named is not None else "0"}


def prestaging(folder: Path, thread_counts: list[int], rounds: int) -> dict[str, list[dict]]:
    """Each thread count's processes, round after round (the counts interleaved, so drift spreads over all)."""
    results: dict[str, list[dict]] = {}
    for _ in range(rounds):
        for threads in thread_counts:
            row = prestaging_round(folder, threads)
            results.setdefault(str(threads), []).append(row)
            print(f"prestage threads={threads}: " + json.dumps({k: v and round(v, 2) for k, v in row.items()}),
                  flush=True)
    return results


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
    parser.add_argument("--prestage", type=Path, help="a root checkpoint: import beside its prestaged read instead")
    parser.add_argument("--stages", type=Path, help="a folder with a saved processor: import in stages instead")
    parser.add_argument("--threads", default="0,4,16", help="with --prestage: reader threads, per kind (0,4,16)")
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
    if args.prestage is not None:
        staged = prestaging(args.prestage, [int(n) for n in args.threads.split(",")], args.rounds)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "prestage.json").write_text(json.dumps(staged, indent=1))
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
