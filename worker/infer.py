"""Batched greedy generation over the dataset, one `sample` message per sample as soon as its batch is done."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.boxes import score_text

from .data import Sample, load_image, render_prompt
from .errors import WorkerError

Send = Callable[..., None]


@dataclass
class Prepared:
    sample: Sample
    image: Any
    text: str


@dataclass
class InferenceStats:
    scored: int = 0
    errors: int = 0
    batches: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    first_sample_s: float | None = None
    oom_retries: int = 0  # batches retried at half size after CUDA ran out of memory
    batch_size: int = 0  # the batch size in use at the end: lower than the recipe's after an out-of-memory error


def run_inference(model: Any, processor: Any, samples: list[Sample], recipe: dict, device: str,
                  send: Send, should_stop: Callable[[], bool], before_sample: Callable[[int], None]) -> InferenceStats:
    stats = InferenceStats(batch_size=recipe["batch_size"])
    started = time.perf_counter()
    sent = 0
    for batch in _batches(samples, recipe["batch_size"]):
        ready = []
        for sample in batch:
            prepared, error = _prepare(processor, sample, recipe["prompt"])
            if error is not None:
                sent += 1
                before_sample(sent)
                send("sample", **_error_record(sample, error))
                stats.errors += 1
            else:
                ready.append(prepared)
        if ready:
            batch_started = time.perf_counter()
            texts, new_tokens = _generate_fitting(model, processor, ready, recipe["max_new_tokens"], device, stats)
            seconds = (time.perf_counter() - batch_started) / len(ready)
            stats.generated_tokens += new_tokens
            stats.batches += 1
            for item, text in zip(ready, texts, strict=True):
                sent += 1
                before_sample(sent)
                send("sample", **_scored_record(item, text, recipe["box_format"], seconds))
                stats.scored += 1
                if stats.first_sample_s is None:
                    stats.first_sample_s = time.perf_counter() - started
        if should_stop():
            break
    stats.seconds = time.perf_counter() - started
    return stats


def _batches(samples: list[Sample], size: int) -> Iterator[list[Sample]]:
    for start in range(0, len(samples), size):
        yield samples[start : start + size]


def _prepare(processor: Any, sample: Sample, template: str) -> tuple[Prepared | None, str | None]:
    """The sample's image and chat text, or the reason it cannot be evaluated."""
    if sample.error:
        return None, sample.error
    try:
        image = load_image(sample)
    except (OSError, ValueError) as exc:
        return None, f"image {sample.image_path}: {exc}"
    try:
        prompt = render_prompt(template, sample)
    except (KeyError, IndexError, ValueError) as exc:
        return None, f"prompt: {exc}"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return Prepared(sample, image, text), None


def _generate_fitting(model: Any, processor: Any, batch: list[Prepared], max_new_tokens: int, device: str,
                      stats: InferenceStats) -> tuple[list[str], int]:
    """Generate in chunks of stats.batch_size; when CUDA runs out of memory, halve it (for the rest of the run
    too) and retry the chunk, down to one sample, which then fails the recipe as `cuda_oom`."""
    texts: list[str] = []
    tokens = start = 0
    while start < len(batch):
        chunk = batch[start : start + stats.batch_size]
        try:
            result = generate(model, processor, chunk, max_new_tokens, device)
        except torch.cuda.OutOfMemoryError as exc:
            if len(chunk) == 1:
                raise WorkerError("cuda_oom", f"out of GPU memory with a batch of 1: {exc}") from exc
            result = None
        if result is None:  # outside the except block, so the failed attempt's tensors are already released
            stats.oom_retries += 1
            stats.batch_size = max(1, len(chunk) // 2)
            torch.cuda.empty_cache()
            continue
        texts += result[0]
        tokens += result[1]
        start += len(chunk)
    return texts, tokens


def generate(model: Any, processor: Any, batch: list[Prepared], max_new_tokens: int,
             device: str) -> tuple[list[str], int]:
    """Greedy generation for a left-padded batch; returns each sample's new text and the new-token count."""
    tokenizer = getattr(processor, "tokenizer", processor)
    inputs = processor(
        text=[p.text for p in batch], images=[p.image for p in batch], padding=True, return_tensors="pt"
    ).to(device)
    with torch.inference_mode():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = output[:, inputs["input_ids"].shape[1] :]
    texts = [_decode(tokenizer, row.tolist(), model) for row in new]
    return texts, int(new.numel())


def _decode(tokenizer: Any, ids: list[int], model: Any) -> str:
    """The generated text up to the end of turn, special tokens kept (the box markers are special tokens)."""
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    eos_ids.add(tokenizer.eos_token_id)
    kept = []
    for token in ids:
        if token in eos_ids:
            break
        if token != tokenizer.pad_token_id:
            kept.append(token)
    return tokenizer.decode(kept, skip_special_tokens=False).strip()


def _scored_record(item: Prepared, text: str, box_format: str, seconds: float) -> dict:
    size = item.image.size
    return {
        "id": item.sample.id,
        "status": "ok",
        "gt": item.sample.bbox,
        "text": text,
        "image_size": list(size),
        "seconds": seconds,
        "error": None,
        **score_text(text, box_format, size, item.sample.bbox),
    }


def _error_record(sample: Sample, error: str) -> dict:
    return {
        "id": sample.id, "status": "error", "gt": sample.bbox, "text": None, "image_size": None,
        "seconds": 0.0, "error": error, "pred": None, "iou": 0.0, "detected": False,
    }
