"""(c) of benchmarks/bench_gpu.py: the evaluation loop a user who knows transformers writes, with no evalorch code.

    python -m benchmarks.expert_loop --models DIR --dataset grounding.jsonl --model base=base \
        --model r1-llm-only=base+r1-llm-only --batch 200 --new-tokens 32 --device cuda --json out.json

One process. The inputs are prepared once (every model of the family shares the base's processor): the chat
template, the images, one processor call per batch, left padding. Then each model in turn: loaded with
`from_pretrained(device_map=device)` (adapters through `PeftModel.from_pretrained`), one batched greedy `generate`
per batch, then `del`, `gc.collect()` and `torch.cuda.empty_cache()`. The batches are the ones evalorch makes for
a set of one image size and one prompt (its sort keeps their order): as even as possible, in file order, so each
per-sample text can be compared with the suite's. Texts are cut as evalorch records its raw text (up to the end
of turn, padding dropped, special tokens kept) for that comparison only.

It writes OUT (JSON) after each model: imports, preparation, and per model load, generate and teardown seconds,
and every sample's text.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True, help="the folder of the model folders")
    parser.add_argument("--dataset", type=Path, required=True, help="jsonl: id, image (relative), prompt")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=ROOT[+ADAPTER]",
                        help="a model to evaluate, in order: its full checkpoint and optional adapter folders")
    parser.add_argument("--prompt", default="{prompt} Answer with its bounding box.")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--new-tokens", type=int, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--attn", default="flash_attention_2")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    chains = [(name, *chain.partition("+")[::2]) for name, _, chain in (m.partition("=") for m in args.model)]
    run(args, chains)


def run(args: argparse.Namespace, chains: list[tuple[str, str, str]]) -> None:
    started = time.perf_counter()
    import gc

    import torch
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    result: dict[str, Any] = {"imports_s": time.perf_counter() - started, "batch": args.batch, "models": []}
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    t = time.perf_counter()
    processor = AutoProcessor.from_pretrained(args.models / chains[0][1])
    processor.tokenizer.padding_side = "left"
    records = [json.loads(line) for line in args.dataset.read_text().splitlines() if line.strip()]
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt.format(**r)}]}],
        add_generation_prompt=True, tokenize=False) for r in records]
    images = [Image.open(args.dataset.parent / r["image"]).convert("RGB") for r in records]
    count = -(-len(records) // args.batch)
    cuts = [(i * len(records) // count, (i + 1) * len(records) // count) for i in range(count)]
    batches = [processor(text=texts[a:b], images=images[a:b], padding=True, return_tensors="pt") for a, b in cuts]
    result["prepare_s"] = time.perf_counter() - t
    tokenizer = processor.tokenizer

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for name, root, adapter in chains:
        entry: dict[str, Any] = {"name": name, "root": root, "adapter": adapter or None}
        t = time.perf_counter()
        base = AutoModelForImageTextToText.from_pretrained(args.models / root, dtype=dtype, device_map=args.device,
                                                           attn_implementation=args.attn)
        model = PeftModel.from_pretrained(base, args.models / adapter) if adapter else base
        model.eval()
        sync()
        entry["load_s"] = time.perf_counter() - t
        t = time.perf_counter()
        answers = {}
        with torch.inference_mode():
            for (a, b), inputs in zip(cuts, batches, strict=True):
                inputs = inputs.to(args.device)
                output = model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                        do_sample=False, pad_token_id=tokenizer.pad_token_id)
                new = output[:, inputs["input_ids"].shape[1]:].tolist()
                for record, ids in zip(records[a:b], new, strict=True):
                    answers[record["id"]] = answer(tokenizer, ids, model.generation_config.eos_token_id)
        sync()
        entry["generate_s"] = time.perf_counter() - t
        t = time.perf_counter()
        del model, base, output, inputs  # `base` too: no reference may keep the weights past empty_cache()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        sync()
        entry["teardown_s"] = time.perf_counter() - t
        entry["texts"] = answers
        result["models"].append(entry)
        result["wall_s"] = time.perf_counter() - started
        args.json.write_text(json.dumps(result, indent=1))
        print(f"expert: {name}: load {entry['load_s']:.2f}s, generate {entry['generate_s']:.2f}s, teardown "
              f"{entry['teardown_s']:.2f}s", flush=True)
    print(f"expert: wall {result['wall_s']:.2f}s (imports {result['imports_s']:.2f}s, inputs "
          f"{result['prepare_s']:.2f}s)", flush=True)


def answer(tokenizer: Any, ids: list[int], eos: int | list[int] | None) -> str:
    """The text up to the end of turn, padding dropped, special tokens kept: how evalorch records a raw text."""
    stops = set(eos if isinstance(eos, list) else [eos] if eos is not None else []) | {tokenizer.eos_token_id}
    kept = []
    for token in ids:
        if token in stops:
            break
        if token != tokenizer.pad_token_id:
            kept.append(token)
    return tokenizer.decode(kept, skip_special_tokens=False).strip()


if __name__ == "__main__":
    main()
