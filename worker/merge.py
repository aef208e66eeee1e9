"""`python -m worker.merge --spec SPEC --out DIR`: a recipe's resolved chain merged into one standalone checkpoint.

The chain is loaded on the CPU exactly as an evaluation loads it (worker/load.py: the root, then each adapter in
order, every lower adapter merged before the next is applied), then the top adapter is merged too
(`merge_and_unload`). What is saved is a plain transformers checkpoint (safetensors) with the processor, and
`lineage.json` naming the chain it came from, so it loads without peft and can still be traced to its weights.

Errors: "Error: ..." as the last line on stderr; exit 2 for a configuration problem, 1 for any other failure.
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

from orchestrator import protocol
from orchestrator.lineage import fingerprint, weight_files

from .errors import WorkerError

EXIT_FAILED, EXIT_CONFIG = 1, 2
LINEAGE_FILE = "lineage.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.merge")
    parser.add_argument("--spec", type=Path, required=True, help="spec.json: the recipe and its resolved chain")
    parser.add_argument("--out", type=Path, required=True, help="folder for the merged checkpoint (new or empty)")
    parser.add_argument("--hash-weights", action="store_true", help="fingerprint the output with a full hash")
    args = parser.parse_args(argv)
    try:
        spec = protocol.WorkerSpec.from_json(args.spec.read_bytes())
        record = merge(spec, args.out, hash_weights=args.hash_weights)
    except WorkerError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return EXIT_CONFIG if exc.kind == "config" else EXIT_FAILED
    except Exception as exc:
        traceback.print_exc()
        print(f"Error: merging failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"merged {record['adapters_merged']} adapter(s) into {args.out} ({record['fingerprint']})")
    return 0


def merge(spec: protocol.WorkerSpec, out: Path, *, hash_weights: bool = False) -> dict[str, Any]:
    """Merge the spec's chain into `out`; return what lineage.json records. The output appears only when
    complete: it is written next to `out` and renamed, so a failed merge never leaves a half checkpoint."""
    _check_out(out)
    started = time.perf_counter()
    from .load import load_chain, resolve_dtype  # torch: after the cheap checks

    # Merge in float32 whatever the checkpoint's dtype (adding a low-rank product to bfloat16 weights rounds
    # twice), then store in the dtype the recipe asks for, or the root's. Attention is never run: eager loads
    # every architecture.
    model, processor, _ = load_chain(spec.chain, {**spec.recipe, "dtype": "float32", "attn": "eager"}, "cpu")
    adapters = sum(link.kind == "adapter" for link in spec.chain)
    if hasattr(model, "merge_and_unload"):  # the top adapter: load_chain leaves it as a PeftModel
        model = model.merge_and_unload()
    _check_no_adapter_left(model)
    dtype_name = spec.recipe.get("dtype", "auto")
    dtype = resolve_dtype(dtype_name if dtype_name != "auto" else _root_dtype(spec.chain[0]), "cpu")
    model = model.to(dtype)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)  # transformers 5 writes safetensors only: no pickle in the output
    processor.save_pretrained(partial)
    record = {
        "merged_from": spec.recipe["name"],
        "chain": [asdict(link) for link in spec.chain],
        "order": "root first; each adapter merged (merge_and_unload) into the weights beneath it, in this order",
        "adapters_merged": adapters,
        "dtype": str(dtype).removeprefix("torch."),
        "fingerprint": fingerprint(partial / "config.json", weight_files(partial, "full", allow_pickle=False),
                                   hash_weights=hash_weights),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 3),
        "recipe": spec.recipe,
        "versions": {name: _version(name) for name in ("torch", "transformers", "peft")},
    }
    (partial / LINEAGE_FILE).write_text(json.dumps(record, indent=2) + "\n")
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


def _root_dtype(root: protocol.ChainLink) -> str:
    """The dtype the root checkpoint was saved in (config.json), float32 when it does not say."""
    config = json.loads((Path(root.path) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype")
    return name if name in ("bfloat16", "float16", "float32") else "float32"


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
