"""The GPU machine's check that the supervision mechanics hold on CUDA, in one short command:

    python3 scripts/gpu_smoke.py --out "$OUT"                      # on the GPU machine (flash-attn installed)
    python3 scripts/gpu_smoke.py --out /tmp/smoke --device cpu     # the same flow on a CPU

  demo      the committed demo suite (recipes.toml) through `python -m orchestrator run --device cuda`: every
            recipe ok, its table (compare with the README's CPU figures), and where each worker's memory went;
  timeout   a worker that hangs mid-recipe on the GPU (the test-only fault switch) with a 10 s stall timeout:
            the parent asks for its stacks (SIGUSR1 -> faulthandler into worker.log), then kills it; the steps
            recorded in summary.json, the traceback in the log, the samples before the hang kept, and NVML
            showing no process of ours and the memory back afterwards.

Writes OUT/gpu_smoke.md (and each CLI run's output as OUT/*.log); exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from contract.nvml import open_nvml  # noqa: E402 - torch-free
from contract.units import format_bytes  # noqa: E402


def _cli(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=540)
    log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    return done


def _summary(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / name / "summary.json").read_text())


def _only_run(out: Path) -> Path:
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    return runs[-1]


def _our_gpu_processes() -> list[str]:
    nvml = open_nvml()
    if nvml is None:
        return []
    import psutil

    found = []
    for index in range(nvml.device_count()):
        for proc in nvml.state(index).processes:
            try:
                cmdline = " ".join(psutil.Process(proc.pid).cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if "-m worker" in cmdline:
                found.append(proc.describe())
    return found


def demo(out: Path, device: str, lines: list[str]) -> bool:
    done = _cli(["run", "recipes.toml", "--device", device, "--out", str(out / "runs-demo")], out / "demo.log")
    run_dir = _only_run(out / "runs-demo")
    lines += ["## demo: recipes.toml on " + device, "", f"exit code {done.returncode}", "",
              "| recipe | status | mean IoU | det rate | attn | dtype | peak allocated | NVML (process) |",
              "|---|---|---:|---:|---|---|---:|---:|"]
    ok = done.returncode == 0
    for row in json.loads((run_dir / "summary.json").read_text())["recipes"]:
        summary = _summary(run_dir, row["name"])
        loaded, finished = summary.get("loaded") or {}, summary.get("done") or {}
        peak, nvml = finished.get("peak_bytes"), finished.get("nvml_used_bytes")
        lines.append(f"| {row['name']} | {row['status']} | {row['metrics']['mean_iou']:.4f} | "
                     f"{row['metrics']['detection_rate']:.2%} | {loaded.get('attn')} | {loaded.get('dtype')} | "
                     f"{format_bytes(peak) if peak else '-'} | {format_bytes(nvml) if nvml else '-'} |")
        ok &= row["status"] == "ok"
    lines.append("")
    return ok


def timeout(out: Path, device: str, lines: list[str]) -> bool:
    recipes = out / "hang.toml"
    recipes.write_text(f'[defaults]\ndataset = "{ROOT}/examples/demo-family/data/heldout.jsonl"\n'
                       'prompt = "{prompt} Answer with its bounding box."\nbox_format = "qwen2vl"\n'
                       'max_new_tokens = 32\nbatch_size = 4\nlimit = 16\nstall_timeout = 10\n'
                       f'[[recipe]]\nname = "hang"\nmodel = "{ROOT}/examples/demo-family/base"\n')
    nvml = open_nvml()
    free_before = nvml.state(0).free_bytes if nvml and device == "cuda" else None
    started = time.monotonic()
    done = _cli(["run", str(recipes), "--device", device, "--out", str(out / "runs-hang")], out / "hang.log",
                env={"EVALORCH_FAULT": "hang:hang@sample:6"})
    took = time.monotonic() - started
    run_dir = _only_run(out / "runs-hang")
    summary = _summary(run_dir, "hang")
    log = (run_dir / "hang" / "worker.log").read_text(errors="replace")
    steps = [(s["action"], s["signal"], s["at_s"], s["exited"]) for s in summary.get("shutdown", [])]
    time.sleep(2)
    left = _our_gpu_processes()
    free_after = nvml.state(0).free_bytes if nvml and device == "cuda" else None
    kept = sum(1 for line in (run_dir / "hang" / "samples.jsonl").read_text().splitlines() if line.strip())
    checks = {
        "status timeout": summary["status"] == "timeout" and "stall timeout" in summary["detail"],
        "steps traceback then kill": [s[:2] for s in steps] == [("traceback", "SIGUSR1"), ("kill", "SIGKILL")],
        "stacks in worker.log": "most recent call first" in log and "faults.py" in log,
        "samples before the hang kept": kept == 5,
        "no worker of ours on the GPU": not left,
        "exit code 1": done.returncode == 1,
    }
    lines += [f"## timeout: a worker hanging at its 6th sample on {device}, stall_timeout 10 s", "",
              f"- run took {took:.1f} s; detail: {summary['detail']}", f"- shutdown steps: {steps}",
              f"- samples kept: {kept}; our processes left on the GPU: {left or 'none'}"]
    if free_before is not None:
        lines.append(f"- GPU free before {format_bytes(free_before)}, after {format_bytes(free_after)} "
                     f"({(free_after - free_before) / 2**20:+.0f} MiB)")
    lines += [f"- {name}: {'ok' if passed else 'FAILED'}" for name, passed in checks.items()] + [""]
    return all(checks.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["# gpu_smoke", ""]
    results = {"demo": demo(args.out, args.device, lines), "timeout": timeout(args.out, args.device, lines)}
    lines.append("Result: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in results.items()))
    (args.out / "gpu_smoke.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
