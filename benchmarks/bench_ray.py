"""The 7B bench suite of benchmarks/bench_gpu.py run by the local backend and by `--backend ray` (issue 17), on one GPU.

    python3 -m benchmarks.bench_ray --work /tmp/bench --out "$OUT"                  # on the GPU machine, one call
    python3 -m benchmarks.bench_ray --work /tmp/bench_s --out /tmp/bench_o --small  # the flow on a CPU

In one call: bench_gpu.py's random-weight 7B family and its 200 samples (built once; `--work` keeps them), then
the same suite.toml (attn = "sdpa": the Ray wheel and the flash-attn wheel do not both fit in one device call)
through each variant, in this order:
  local     `python -m orchestrator run suite.toml --device cuda`
  ray       the same with `--backend ray`: a local Ray cluster started and stopped by the command
  ray-warm  the same with `--backend ray --address HOST:PORT`: a cluster this script started before (`ray start
            --head`), as a suite meets a cluster that is already up; its start-up is outside the wall
Printed (and OUT/bench_ray.md, OUT/bench_ray.json): each variant's wall (and, for ray, how much of it the cluster's
start took: from spawn to the CLI's `Ray:` line), its ratio to local (target <= 1.1x), each recipe's status, batch,
seconds and node/GPU, and per recipe how many samples have the same generated text as the local run's.
This process never imports torch or touches CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_gpu import GIB, NEW_TOKENS, R3_TRAINING_PREFIX, RECIPES, Bench, log

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = ("local", "ray", "ray-warm")
# a second local run, compared with the first like the others: is the local backend itself repeatable?
EXTRA_VARIANTS = ("local-again",)
_RESERVE_S = 100.0  # kept back for each variant still to run (the 7B suite took 68 s with flash-attn, batch 200)


def write_suite(bench: Bench, dataset: Path, attn: str) -> Path:
    """bench_gpu.py's suite.toml, with `attn` (and no flash-attn needed for sdpa)."""
    body = "".join(f'\n[[recipe]]\nname = "{name}"\nmodel = "{bench.models / folder}"\n'
                   + ("baseline = true\n" if name == "base" else "") for name, folder, _ in RECIPES)
    recipes = bench.work / f"suite-{attn}.toml"
    recipes.write_text(
        f'[defaults]\ndataset = "{dataset}"\nprompt = "{{prompt}} Answer with its bounding box."\n'
        f'max_new_tokens = {NEW_TOKENS}\nmin_new_tokens = {NEW_TOKENS}\nbatch_size = "auto"\n'
        f'dtype = "{"bfloat16" if not bench.small else "auto"}"\nattn = "{attn}"\ntimeout = 300\n'
        f'\n[lineage]\nremap = {{ "{R3_TRAINING_PREFIX}" = "{bench.models}" }}\n{body}')
    return recipes


def fake_nvml_env(bench: Bench) -> dict[str, str]:
    """--small: the fake NVML sizes batch_size "auto" on a CPU, as bench_gpu.py does."""
    if not bench.small:
        return {}
    from contract.nvml import FAKE_ENV, write_fake_nvml

    fake = bench.work / "nvml.json"
    write_fake_nvml(fake, [{"name": "Fake GPU (--small)", "uuid": "GPU-fake-0", "total_bytes": 80 * GIB,
                            "free_bytes": 80 * GIB, "processes": []}])
    return {FAKE_ENV: str(fake)}


class WarmCluster:
    """`ray start --head` in a folder of its own (short, for Ray's sockets), with a token of its own; stopped after."""

    def __init__(self, bench: Bench, node_env: dict[str, str]) -> None:
        self.node_env = node_env  # what the node's processes (and so the workers) see: --small's fake NVML
        self.folder = Path(f"/tmp/bench-ray-{os.getpid()}")
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        token = self.folder / "auth_token"
        token.write_text(os.urandom(32).hex())
        self.env = {"RAY_TMPDIR": str(self.folder), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        self.bench = bench

    def _ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        command = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())", *args]
        env = {**os.environ, **self.node_env, **self.env}
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)

    def start(self) -> str:
        started = time.monotonic()
        gpus = [] if self.bench.small else ["--num-gpus", "1"]
        done = self._ray("start", "--head", "--include-dashboard=false", "--disable-usage-stats", *gpus,
                         f"--temp-dir={self.folder / 'ray'}")
        (self.bench.out / "ray-start.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise SystemExit(f"ray start failed: see {self.bench.out / 'ray-start.log'}")
        address = (self.folder / "ray" / "ray_current_cluster").read_text().strip()
        log(f"ray-warm: cluster at {address} up in {time.monotonic() - started:.1f}s")
        return address

    def stop(self) -> None:
        self._ray("stop", "--force")
        shutil.rmtree(self.folder, ignore_errors=True)


def run_variant(bench: Bench, name: str, recipes: Path, extra: list[str], env: dict[str, str],
                budget: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "orchestrator", "run", str(recipes), "--device", bench.device,
               "--out", str(bench.work / f"runs-{name}"), *extra]
    started = time.monotonic()
    code, lines = bench.child(name, command, budget, {"COLUMNS": "200", **env})
    wall = time.monotonic() - started
    found = next((re.search(r"Run folder: (\S+)", text) for _, text in lines if "Run folder:" in text), None)
    cluster_s = next((at for at, text in lines if text.startswith("Ray: ")), None)
    result: dict[str, Any] = {"exit": code, "wall_s": wall, "cluster_line_s": cluster_s, "recipes": {}}
    if found is None:
        return result
    run_dir = Path(found.group(1))
    result["run_dir"] = str(run_dir)
    for recipe, _, _ in RECIPES:
        summary_path = run_dir / recipe / "summary.json"
        if not summary_path.is_file():
            continue
        summary = json.loads(summary_path.read_text())
        texts: dict[str, str | None] = {}  # sample id -> the generated text
        with open(run_dir / recipe / "samples.jsonl") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    texts.setdefault(record["id"], record.get("text"))
        result["recipes"][recipe] = {
            "status": summary.get("status"), "seconds": summary.get("seconds"),
            "batch": ((summary.get("done") or {}).get("counts") or {}).get("batch_size"),
            "ran_on": summary.get("ran_on"), "attempts": len(summary.get("attempts") or []), "texts": texts}
    return result


def compare(local: dict[str, Any], other: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Per recipe: (samples whose text equals the local run's, samples in the local run)."""
    found = {}
    for recipe, row in local.get("recipes", {}).items():
        mine = (other.get("recipes", {}).get(recipe) or {}).get("texts", {})
        found[recipe] = (sum(mine.get(i) == text for i, text in row["texts"].items()), len(row["texts"]))
    return found


def report(bench: Bench, results: dict[str, dict[str, Any]]) -> str:
    local = results.get("local") or {}
    lines = [f"## Local and Ray backends, {len(RECIPES)} recipes x {bench.samples} samples, attn sdpa, one GPU", "",
             "| variant | exit | wall | vs local | cluster start (to the `Ray:` line) | same text as local |",
             "|---|---|---|---|---|---|"]
    for name, result in results.items():
        ratio = result["wall_s"] / local["wall_s"] if local.get("wall_s") and name != "local" else None
        same = compare(local, result) if name != "local" else {}
        equal, total = sum(s for s, _ in same.values()), sum(t for _, t in same.values())
        cluster = f"{result['cluster_line_s']:.1f} s" if result.get("cluster_line_s") is not None else "-"
        lines.append(f"| {name} | {result['exit']} | {result['wall_s']:.2f} s | "
                     f"{f'{ratio:.3f}x' if ratio else '-'} | {cluster} | "
                     f"{f'{equal}/{total}' if same else '-'} |")
    lines += ["", "| variant | recipe | status | attempts | batch | seconds | node / GPU | same text as local |",
              "|---|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        same = compare(local, result) if name != "local" else {}
        for recipe, row in result.get("recipes", {}).items():
            where = row.get("ran_on") or {}
            node = f"{where.get('host', '')} GPU {where.get('gpu_index', '-')} {where.get('gpu_uuid', '')}" \
                if where else "this host"
            same_text = f"{same[recipe][0]}/{same[recipe][1]}" if recipe in same else "-"
            lines.append(f"| {name} | {recipe} | {row['status']} | {row['attempts']} | {row['batch']} | "
                         f"{row['seconds'] or 0:.2f} | {node} | {same_text} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder: models, data, run folders")
    parser.add_argument("--out", type=Path, required=True, help="where the table and the logs go")
    parser.add_argument("--small", action="store_true", help="tiny shapes on the CPU: the flow without a GPU")
    parser.add_argument("--samples", type=int, default=None, help="dataset size (default 200; 12 with --small)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"which, in order (default {VARIANTS})")
    parser.add_argument("--budget", type=float, default=None, help="seconds for everything (default 560)")
    args = parser.parse_args(argv)
    samples = args.samples or (12 if args.small else 200)
    budget = args.budget or (1500.0 if args.small else 560.0)
    bench = Bench(args.work.resolve(), args.out.resolve(), args.small, samples, 0, budget)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS) - set(EXTRA_VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}: choose from {VARIANTS}")
    dataset = bench.build()
    recipes = write_suite(bench, dataset, "sdpa")
    env = fake_nvml_env(bench)
    results: dict[str, dict[str, Any]] = {}
    for name in variants:
        later = len(variants) - len(results) - 1
        share = bench.deadline - time.time() - _RESERVE_S * later  # what is left, less a minimum for each later one
        warm = WarmCluster(bench, env) if name == "ray-warm" else None
        try:
            extra = [] if name.startswith("local") else ["--backend", "ray"]
            if warm is not None:
                extra += ["--address", warm.start()]
            log(f"{name}: {share:.0f}s of budget")
            results[name] = run_variant(bench, name, recipes, extra, {**env, **(warm.env if warm else {})}, share)
        except (SystemExit, OSError, subprocess.SubprocessError) as exc:
            log(f"{name} failed: {exc}")
            results[name] = {"exit": None, "wall_s": float("nan"), "cluster_line_s": None, "recipes": {}}
        finally:
            if warm is not None:
                warm.stop()
    table = report(bench, results)
    print(table, flush=True)
    (bench.out / "bench_ray.md").write_text(table)
    (bench.out / "bench_ray.json").write_text(json.dumps(results, indent=1, default=str))
    return 0 if all(r.get("exit") == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
