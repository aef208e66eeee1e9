"""`python -m worker --spec SPEC --result-fd FD`: hello -> lineage -> load -> samples -> done (or error).

Results go to FD as JSON lines; stdout and stderr are the log. stdin is the lifeline: EOF means the parent is
gone and the worker exits at once; a `stop` line asks it to finish the current batch and send `done`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from contract import messages
from contract.boxes import AUTO
from contract.exits import WorkerExit
from contract.samples import DatasetError
from contract.spec import SpecError, WorkerSpec
from worker import faults, lifeline
from worker.errors import WorkerError
from worker.startup import select_device, share_cpu, unused_optional_imports_hidden

if TYPE_CHECKING:  # torch is imported only once the spec is valid (its imports are a phase of their own)
    from contract.dataset import Dataset
    from contract.recipe import Recipe
    from worker.device import Device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker")
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--result-fd", type=int, required=True)
    args = parser.parse_args(argv)
    out = messages.MessageWriter(args.result_fd)
    control = lifeline.start()
    try:
        spec = _read_spec(args.spec)
        faults.install_from_env(spec.recipe.name, spec.attempt, out.write_raw)
        _evaluate(spec, out, control)
    except WorkerError as exc:
        out.send("error", kind=exc.kind, message=str(exc), traceback=traceback.format_exc())
        return WorkerExit.FAILED
    except DatasetError as exc:  # opened, then damaged part-way (a truncated parquet file...)
        out.send("error", kind="data", message=str(exc), traceback=traceback.format_exc())
        return WorkerExit.FAILED
    except Exception as exc:
        kind = "cuda_oom" if type(exc).__name__ == "OutOfMemoryError" else "internal"
        out.send("error", kind=kind, message=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        return WorkerExit.FAILED
    return WorkerExit.OK


def _read_spec(path: Path) -> WorkerSpec:
    """The spec the parent wrote, validated before anything heavy is imported."""
    try:
        return WorkerSpec.from_json(path.read_bytes())
    except (OSError, SpecError) as exc:
        raise WorkerError("config", f"{path}: {exc}") from None


def _evaluate(spec: WorkerSpec, out: messages.MessageWriter, control: lifeline.Control) -> None:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    import torch  # the imports are a phase of their own: they dominate a fresh process's start-up

    device = select_device(spec.device)
    share_cpu(device.is_gpu, torch)
    with unused_optional_imports_hidden():  # what preparing batches needs: transformers' processors, no model
        from worker.inference.infer import start_batches
        from worker.loading.chain_files import warm_page_cache
        from worker.loading.processor import load_processor, training_resize
    timings["hello_at"] = timings["imports"] = time.perf_counter() - started
    out.send("hello", version=messages.PROTOCOL_VERSION, pid=os.getpid(), versions=_versions(), device=spec.device)
    out.send("lineage", links=[asdict(link) for link in spec.chain])
    recipe, samples = _checked_inputs(spec)
    resize = training_resize(spec.chain, recipe)
    processor = load_processor(spec.chain, recipe)
    batches = None
    if not spec.hold or isinstance(recipe.batch_size, int):  # "auto" is sized at a held worker's go
        # a held worker may not touch the GPU (pinning memory would) before its go
        may_pin = control.go.is_set if spec.hold and device.is_gpu else lambda: True
        batches = start_batches(processor, samples, recipe, device, may_pin=may_pin, resize=resize)
    models = time.perf_counter()
    with unused_optional_imports_hidden():  # the model stack (peft: seconds), while the first batch is prepared
        from worker.decode.decode_attention import kernel_calls
        from worker.inference.infer import run_inference
        from worker.loading.load import load_chain
    timings["imports"] += time.perf_counter() - models
    if spec.hold:
        timings["page_cache"] = warm_page_cache(spec.chain)
        out.send("ready", seconds=time.perf_counter() - started)
        given = control.wait_for_go()
        if given.get("batch_size") not in (None, recipe.batch_size):  # the preflight resized the batch
            recipe = recipe.model_copy(update={"batch_size": int(given["batch_size"])})
            if batches is not None:
                batches.close()
                batches = None
        timings["held"] = time.perf_counter() - started - timings["hello_at"]  # from its hello to its go
    faults.points().before_load()
    if not device.usable():
        raise WorkerError("config", "--device cuda, but the worker sees no CUDA device")
    model, processor, loaded = load_chain(spec.chain, recipe, device, processor)
    timings["load"] = loaded["seconds"]
    timings["loaded_at"] = time.perf_counter() - started  # from the first import: spawn to loaded, less the exec
    out.send("loaded", **loaded)
    if batches is None:  # held, and its batch was resized at its go (or "auto")
        batches = start_batches(processor, samples, recipe, device, resize=resize)
    stats = run_inference(model, processor, batches, recipe, device, out.send, control.stop.is_set)
    timings |= {"inference": stats.seconds, "first_sample": stats.first_sample_s or 0.0,
                "batch_wait": stats.wait_s, "generate": stats.generate_s,
                "total": time.perf_counter() - started} | _first_batch(stats.first_batch, started)
    counts = {"scored": stats.scored, "errors": stats.errors, "batches": stats.batches,
              "generated_tokens": stats.generated_tokens, "stopped_early": control.stop.is_set(),
              "oom_retries": stats.oom_retries, "batch_size": stats.batch_size, "decode_graph": stats.decode_graph(),
              "kvcache_calls": kernel_calls(), "cache_hits": stats.cache_hits, "cache_misses": stats.cache_misses,
              "decode_tokens_per_s": stats.generated_tokens / stats.seconds if stats.seconds else None}
    out.send("done", counts=counts, timings=timings, parity=stats.parity, **_measured_memory(device))


def _checked_inputs(spec: WorkerSpec) -> tuple[Recipe, Dataset]:
    """The recipe, checked as the worker needs it, and its samples (read as the batches are made: the recipe's
    subset, less what earlier attempts recorded), once the chain's files are checked."""
    from contract.dataset import open_dataset
    from worker.loading.chain_files import check_chain_files  # imported by then: torch

    recipe = spec.recipe
    if recipe.box_format == AUTO:  # the parent resolves it from the family before launch; never the worker
        raise WorkerError("config", "box_format \"auto\" reached the worker unresolved (the parent resolves it)")
    check_chain_files(spec.chain, recipe)
    try:
        return recipe, open_dataset(spec.dataset, recipe, skip_ids=spec.skip_ids)
    except DatasetError as exc:
        raise WorkerError("config", f"dataset: {exc}") from None
    except OSError as exc:
        raise WorkerError("data", f"dataset {spec.dataset}: cannot be read ({exc.strerror or exc})") from None


def _first_batch(first: dict[str, float] | None, started: float) -> dict[str, float]:
    """The first batch's preparation in pieces (samples, processor, pin) and when it was ready, from the first
    import: what the device waited for at the start (`batch_wait`) is then named."""
    if first is None:
        return {}
    return {f"first_batch_{k}": v for k, v in first.items() if k != "ready_at"} | {
        "first_batch_ready_at": first["ready_at"] - started}


def _measured_memory(device: Device) -> dict[str, int | None]:
    """Peak memory as the device's allocator counted it, and this process's use as the driver (NVML) sees it: that
    adds the CUDA context and the allocator's cache, and is what the parent's estimate is checked against."""
    if not device.is_gpu:
        return {"peak_bytes": None, "peak_reserved_bytes": None, "nvml_used_bytes": None}
    memory = device.memory()
    return {"peak_bytes": memory.peak_bytes, "peak_reserved_bytes": memory.peak_reserved_bytes,
            "nvml_used_bytes": _nvml_used_bytes()}


def _nvml_used_bytes() -> int | None:
    """This process's GPU memory in NVML's process list; None where NVML lists pids of another namespace."""
    from contract.nvml import open_nvml  # torch-free, shared with the parent

    try:
        nvml = open_nvml()
        states = [nvml.state(i) for i in range(nvml.device_count())] if nvml else []
    except Exception as exc:  # a measurement must never cost the recipe its results
        print(f"evalorch worker: NVML not readable ({exc!r})", file=sys.stderr)
        return None
    pid = os.getpid()
    return next((p.used_bytes for state in states for p in state.processes if p.pid == pid), None)


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "accelerate", "flash-attn", "bitsandbytes"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return versions


def _leave(code: int) -> None:
    """Exit without the interpreter's teardown. Everything the parent needs went out on the result pipe, which is
    unbuffered; the log is flushed here. With torch loaded, a normal exit (module finalisers, atexit handlers)
    took 1.4-1.9 s on the H100, and the next recipe's load waits for this process to be gone: the driver frees
    the GPU memory when the process ends, whichever way it ends."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _leave(main())
