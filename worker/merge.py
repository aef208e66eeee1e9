"""`python -m worker.merge --spec SPEC --out DIR`: a recipe's resolved chain merged into one standalone checkpoint.

The chain is loaded on the CPU exactly as an evaluation loads it (worker/loading/load.py: the root, then each adapter in
order, every lower adapter merged before the next is applied), then the top adapter is merged too
(`merge_and_unload`). What is saved is a plain transformers checkpoint (safetensors) with the processor, and
`lineage.json` naming the chain it came from, so it loads without peft and can still be traced to its weights.

It is started like an evaluation worker (orchestrator/execution/process.py: its own process group, the stdin lifeline, a
result pipe) and answers on the result pipe with one message: `merged` (the record) or `error` (kind config
for a problem with what was asked, else internal). Its stdout and stderr are the log.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import shutil
import sys
import time
import traceback
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from contract import messages
from contract.checkpoint import CONFIG, CheckpointError, fingerprint, read_json_object, weight_files
from contract.exits import WorkerExit
from contract.layout import MERGE_LINEAGE
from contract.spec import ChainLink, SpecError, WorkerSpec
from worker import faults, lifeline
from worker.errors import WorkerError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.merge")
    parser.add_argument("--spec", type=Path, required=True, help="spec.json: the recipe and its resolved chain")
    parser.add_argument("--out", type=Path, required=True, help="folder for the merged checkpoint (new or empty)")
    parser.add_argument("--hash-weights", action="store_true", help="fingerprint the output with a full hash")
    parser.add_argument("--result-fd", type=int, required=True)
    args = parser.parse_args(argv)
    out = messages.MessageWriter(args.result_fd)
    lifeline.start()
    try:
        try:
            spec = WorkerSpec.from_json(args.spec.read_bytes())
        except (OSError, SpecError) as exc:
            raise WorkerError("config", f"{args.spec}: {exc}") from None
        faults.install_from_env(spec.recipe.name, spec.attempt, out.write_raw).before_merge()
        record = merge(spec, args.out, hash_weights=args.hash_weights)
    except WorkerError as exc:
        out.send("error", kind=exc.kind, message=str(exc), traceback=traceback.format_exc())
        return WorkerExit.FAILED
    except Exception as exc:
        traceback.print_exc()
        out.send("error", kind="internal", message=f"merging failed: {type(exc).__name__}: {exc}",
                 traceback=traceback.format_exc())
        return WorkerExit.FAILED
    print(f"merged {record['adapters_merged']} adapter(s) into {args.out} ({record['fingerprint']})")
    out.send("merged", record=record)
    return WorkerExit.OK


def merge(spec: WorkerSpec, out: Path, *, hash_weights: bool = False) -> dict[str, Any]:
    """Merge the spec's chain into `out`; return what lineage.json records. The output appears only when
    complete: it is written next to `out` and renamed, so a failed merge never leaves a half checkpoint."""
    _check_out(out)
    started = time.perf_counter()
    from worker.device import CPU
    from worker.loading.chain_files import check_chain_files  # torch: after the cheap checks
    from worker.loading.load import load_chain
    from worker.loading.weights import resolve_dtype

    check_chain_files(spec.chain, spec.recipe)

    # Merge in float32 whatever the checkpoint's dtype (adding a low-rank product to bfloat16 weights rounds
    # twice), then store in the dtype the recipe asks for, or the root's. Attention is never run: eager loads
    # every architecture.
    float32_eager = spec.recipe.model_copy(update={"dtype": "float32", "attn": "eager"})
    model, processor, _ = load_chain(spec.chain, float32_eager, CPU)
    adapters = sum(link.kind == "adapter" for link in spec.chain)
    if hasattr(model, "merge_and_unload"):  # the top adapter: load_chain leaves it as a PeftModel
        model = model.merge_and_unload()
    _check_no_adapter_left(model)
    dtype_name = spec.recipe.dtype
    dtype = resolve_dtype(dtype_name if dtype_name != "auto" else _root_dtype(spec.chain[0]), CPU)
    model = model.to(dtype)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)  # transformers 5 writes safetensors only: no pickle in the output
    processor.save_pretrained(partial)
    record = {
        "merged_from": spec.recipe.name,
        "chain": [asdict(link) for link in spec.chain],
        "order": "root first; each adapter merged (merge_and_unload) into the weights beneath it, in this order",
        "adapters_merged": adapters,
        "dtype": str(dtype).removeprefix("torch."),
        "fingerprint": fingerprint(partial / CONFIG, weight_files(partial, "full", allow_pickle=False),
                                   hash_weights=hash_weights),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 3),
        "recipe": spec.recipe.model_dump(),
        "versions": {name: _version(name) for name in ("torch", "transformers", "peft")},
    }
    (partial / MERGE_LINEAGE).write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        out.rmdir()  # empty, checked above
    partial.rename(out)
    return record


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise WorkerError("config", f"{out} exists and is not an empty folder: choose a new folder, or remove it")


def _check_no_adapter_left(model: Any) -> None:
    """merge_and_unload must leave plain modules; a leftover LoRA layer would make the checkpoint need peft."""
    left = [name for name, _ in model.named_modules() if name.endswith(("lora_A", "lora_B"))]
    if left:
        raise WorkerError("internal", f"adapter layers remain after merging: {', '.join(left[:5])}")


def _root_dtype(root: ChainLink) -> str:
    """The dtype the root checkpoint was saved in (config.json), float32 when it does not say."""
    try:
        config = read_json_object(Path(root.path) / CONFIG)
    except CheckpointError as exc:
        raise WorkerError("lineage", str(exc)) from None
    name = config.get("dtype") or config.get("torch_dtype")
    return name if name in ("bfloat16", "float16", "float32") else "float32"


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
