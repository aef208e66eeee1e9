"""Batched greedy generation over the dataset, one `sample` message per sample as soon as its batch is done."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from contract.batching import even_bounds, window_size
from contract.boxes import InputSizeMissing, Size, score_text
from contract.dataset import (
    INPUT_KEY,
    ImageInfo,
    Sample,
    check_gt,
    image_record,
    image_size,
    read_sample_image,
    render_prompt,
    sample_key,
)
from contract.recipe import Recipe
from contract.trainer_resize import TrainerResize
from worker import faults
from worker.device import Device
from worker.errors import WorkerError
from worker.inference.families import encode, input_sizes, prompt_text, prompt_too_long
from worker.inference.generation import Generated, generate
from worker.inference.image_cache import ProcessorCache, collate
from worker.inference.parity import check_parity

Send = Callable[..., None]


@dataclass
class Prepared:
    sample: Sample
    gt: list[float]  # the sample's ground truth, checked against the image as read (contract.dataset.check_gt)
    image: Any
    text: str
    features: Any = None  # this sample's processor output from the image cache; None with the cache off
    info: ImageInfo | None = None  # the image as read: its size (upright by default) and EXIF orientation
    input_size: Size | None = None  # (width, height) of the image as the model saw it, after the resize


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
    cache_hits: int = 0  # samples whose processor output the image cache held
    wait_s: float = 0.0  # time the device loop waited for the prefetch thread's next batch
    generate_s: float = 0.0  # time inside generate (and its out-of-memory retries)
    cache_misses: int = 0  # samples the processor ran on with the cache on (their output is stored for next time)
    parity: dict | None = None  # the first batch's samples generated again one at a time (check_parity)
    graphs: list = field(default_factory=list)  # each generate call's decode outcome (worker/decode/graph_decode.py)
    # the first batch's preparation in pieces, and when it was ready (PreparedBatch.seconds, .ready_at)
    first_batch: dict[str, float] | None = None

    def decode_graph(self) -> dict | None:
        """How the decode steps ran: generate calls replayed from a graph, those that went on eagerly and why
        (None where graphs were not attempted: a CPU, or a recipe that turned them off)."""
        if not self.graphs:
            return None
        reasons: dict[str, int] = {}  # this batch's reasons (a warning each), not the model's (a note)
        for graph in self.graphs:
            if graph.declined and not graph.inherent:
                reasons[graph.declined] = reasons.get(graph.declined, 0) + 1
        phases: dict[str, float] = {}
        for graph in self.graphs:
            for name, seconds in graph.phases.items():
                phases[name] = round(phases.get(name, 0.0) + seconds, 4)
        return {"replayed": sum(g.replayed for g in self.graphs),
                "declined": sum(bool(g.declined) for g in self.graphs), "reasons": reasons,
                "not_recordable": next((g.declined for g in self.graphs if g.inherent), None),
                "steps": sum(g.steps for g in self.graphs),
                "record_s": round(sum(g.record_s for g in self.graphs), 4), "record_phases_s": phases}


@dataclass
class PreparedBatch:
    """A batch made ready on the CPU while the device works on the one before."""

    items: list[Prepared]
    errors: list[tuple[Sample, str, ImageInfo | None]]
    inputs: Any = None  # the processor's tensors for all items (pinned on CUDA), or None when no item is usable
    cache_hits: int = 0
    cache_misses: int = 0
    # where its preparation's seconds went (samples: images read, texts made; processor; pin: into page-locked
    # memory), and when it was ready (time.perf_counter): a GPU waiting for its first batch says which to blame
    seconds: dict[str, float] = field(default_factory=dict)
    ready_at: float = 0.0


def start_batches(processor: Any, samples: Iterable[Sample], recipe: Recipe, device: Device,
                  may_pin: Callable[[], bool] = lambda: True, resize: TrainerResize | None = None) -> Prefetched:
    """Start preparing the recipe's batches in the background (see prefetch). `may_pin` says whether CUDA may be
    touched yet: pinning host memory creates a CUDA context, which a held worker must not have. With the recipe's
    image_cache on, each sample's processor output comes from the cache in its cache_dir (see image_cache.py).
    The samples are read as the batches are made (a set with embedded images is never held whole). `resize`: the
    resize the adapter's trainer applied to each image before its processor (load.training_resize)."""
    batches = sorted_batches(samples, recipe.requested_batch, recipe.exif)
    cache = ProcessorCache.for_recipe(processor, recipe, resize)
    waited_for = threading.Event()  # the device loop is waiting for the batch being prepared

    def pin() -> bool:
        """Pinning a batch of 200 448x448 images (963 MB of float32 pixels) took 0.46-0.55 s on the H100 host:
        worth it ahead of the device, which then copies at full speed, but not for a batch the device waits for
        (a first batch, made while the model loads), whose pageable copy takes a fraction of that."""
        return may_pin() and not waited_for.is_set()

    return prefetch(batches, lambda b: prepare_batch(processor, b, recipe.prompt, device, pin, cache,
                                                     exif=recipe.exif, max_prompt_tokens=recipe.max_prompt_tokens,
                                                     resize=resize), waited_for=waited_for)


def sorted_batches(samples: Iterable[Sample], size: int, exif: str) -> Iterator[list[Sample]]:
    """The samples read a window at a time (SORT_WINDOW batches, at least MIN_WINDOW samples: a small set in one),
    each window sorted by prompt length and cut into even batches."""
    window: list[Sample] = []
    for sample in samples:
        window.append(sample)
        if len(window) >= window_size(size):
            yield from _batches(by_prompt_length(window, exif), size)
            window = []
    yield from _batches(by_prompt_length(window, exif), size)


def run_inference(model: Any, processor: Any, samples: Iterable[Sample] | Prefetched, recipe: Recipe,
                  device: Device, send: Send, should_stop: Callable[[], bool]) -> InferenceStats:
    """Generate for every sample (or every batch already being prepared by start_batches), streaming records;
    after the first batch, check its first samples one at a time (check_parity)."""
    stats = InferenceStats(batch_size=recipe.requested_batch)
    started = time.perf_counter()
    sent = 0
    prepared_batches = samples if isinstance(samples, Prefetched) else start_batches(processor, samples, recipe,
                                                                                     device)
    for prepared in _timed(prepared_batches, stats):
        stats.first_batch = stats.first_batch or {**prepared.seconds, "ready_at": prepared.ready_at}
        stats.cache_hits += prepared.cache_hits
        stats.cache_misses += prepared.cache_misses
        for sample, error, info in prepared.errors:
            sent += 1
            faults.points().before_sample(sent)
            send("sample", **_error_record(sample, error, info))
            stats.errors += 1
        if prepared.items:
            batch_started = time.perf_counter()
            generated = _generate_fitting(model, processor, prepared, recipe, device, stats)
            stats.generate_s += time.perf_counter() - batch_started
            seconds = (time.perf_counter() - batch_started) / len(prepared.items)
            stats.generated_tokens += generated.new_tokens
            stats.graphs.extend(generated.graphs)
            stats.batches += 1
            if stats.parity is None:
                stats.parity = check_parity(model, processor, prepared.items, generated,
                                            lambda item: processor_inputs(processor, [item], device), recipe,
                                            device.tensors, min(len(prepared.items), stats.batch_size))
            for item, text in zip(prepared.items, generated.texts, strict=True):
                sent += 1
                faults.points().before_sample(sent)
                send("sample", **scored_record(item, text, recipe.box_format, seconds))
                stats.scored += 1
                if stats.first_sample_s is None:
                    stats.first_sample_s = time.perf_counter() - started
        if should_stop():
            break
    stats.seconds = time.perf_counter() - started
    return stats


def _timed(batches: Iterator[PreparedBatch] | Prefetched, stats: InferenceStats) -> Iterator[PreparedBatch]:
    """The batches, adding the time spent waiting for each to stats.wait_s (the GPU idles meanwhile)."""
    iterator = iter(batches)
    while True:
        waited = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        stats.wait_s += time.perf_counter() - waited
        yield batch


def by_prompt_length(samples: list[Sample], exif: str = "apply") -> list[Sample]:
    """Samples ordered by their prompt's length (image size first: it sets the image-token count), so that a
    batch pads little. Sizes as read (upright by default) from the headers; unreadable ones sort last, fail later."""
    def key(sample: Sample) -> tuple[int, int, int]:
        size = image_size(sample.image, exif)
        return (size[0] * size[1], size[0], len(sample.prompt or "")) if size else (1 << 62, 0, 0)

    return sorted(samples, key=key)


def prefetch(batches: Iterable[list[Sample]], prepare: Callable[[list[Sample]], PreparedBatch],
             depth: int = 2, waited_for: threading.Event | None = None) -> Prefetched:
    """Prepare batches (decode images, run the processor) in a background thread, `depth` ahead of the device:
    the GPU should not wait on the CPU between batches. The thread starts at once (a held worker prepares its
    first batches before it may load); exceptions surface in the consumer. `waited_for` is set while the consumer
    waits for the next batch."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    finished = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                if finished.is_set():
                    break
                prepared = prepare(batch)  # once: not again on each retry while the queue is full
                while not finished.is_set():
                    try:
                        ready.put(("batch", prepared), timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # handed to the consumer, which raises it where it belongs
            ready.put(("error", exc))
        ready.put(("end", None))

    threading.Thread(target=produce, daemon=True, name="prefetch").start()
    return Prefetched(ready, finished, waited_for or threading.Event())


class Prefetched:
    """The batches a prefetch thread prepares; iterate once, or close() to stop the thread unused."""

    def __init__(self, ready: queue.Queue, finished: threading.Event, waited_for: threading.Event) -> None:
        self._ready = ready
        self._finished = finished
        self._waited_for = waited_for

    def close(self) -> None:
        self._finished.set()

    def __iter__(self) -> Iterator[PreparedBatch]:
        try:
            while (item := self._next())[0] != "end":
                if item[0] == "error":
                    raise item[1]
                yield item[1]
        finally:
            self.close()

    def _next(self) -> tuple[str, Any]:
        """The next item, saying meanwhile that it is waited for (where it is not ready yet)."""
        try:
            return self._ready.get_nowait()
        except queue.Empty:
            pass
        self._waited_for.set()
        try:
            return self._ready.get()
        finally:
            self._waited_for.clear()


def prepare_batch(processor: Any, batch: list[Sample], template: str, device: Device,
                  may_pin: Callable[[], bool] = lambda: True, cache: ProcessorCache | None = None,
                  exif: str = "apply", max_prompt_tokens: int | None = None,
                  resize: TrainerResize | None = None) -> PreparedBatch:
    """One batch made ready for the device: each sample's image and text (or why it cannot be evaluated), the
    processor's tensors for the usable ones (from the image cache where it holds them), pinned where `may_pin`."""
    items: list[Prepared] = []
    errors: list[tuple[Sample, str, ImageInfo | None]] = []
    started = time.perf_counter()
    for sample in batch:
        prepared = prepare_sample(processor, sample, template, exif, max_prompt_tokens, resize)
        if isinstance(prepared, Prepared):
            items.append(prepared)
        else:
            errors.append((sample, *prepared))
    read = time.perf_counter()
    hits, misses = _cached_features(cache, items)
    inputs = processor_inputs(processor, items, device, pin=False) if items else None
    processed = time.perf_counter()
    if items:
        for item, size in zip(items, input_sizes(processor, inputs, [p.image for p in items]), strict=True):
            item.input_size = size
        inputs = pinned(inputs, device) if may_pin() else inputs
    ready = time.perf_counter()
    seconds = {"samples": read - started, "processor": processed - read, "pin": ready - processed}
    return PreparedBatch(items, errors, inputs, hits, misses, seconds, ready)


def _cached_features(cache: ProcessorCache | None, items: list[Prepared]) -> tuple[int, int]:
    """Give each item its processor output from the cache (computed and stored on a miss); the (hits, misses)."""
    if cache is None:
        return 0, 0
    hits, misses = cache.hits, cache.misses
    for item in items:
        item.features = cache.features(item.text, item.image, item.sample.image, item.info.orientation
                                       if item.info is not None and item.info.applied else 1)
    return cache.hits - hits, cache.misses - misses


def processor_inputs(processor: Any, items: list[Prepared], device: Device, pin: bool = True) -> Any:
    """The batch's tensors: collated from the items' cached outputs when they have them (also for the chunks of
    an out-of-memory retry), else from one batched processor call."""
    if all(p.features is not None for p in items):
        inputs = collate([p.features for p in items], getattr(processor, "tokenizer", processor).pad_token_id)
    else:
        inputs = encode(processor, [p.text for p in items], [p.image for p in items])
    return pinned(inputs, device) if pin else inputs


def pinned(inputs: Any, device: Device) -> Any:
    """The batch's tensors in page-locked memory on a GPU, which copy to it at full speed and asynchronously."""
    if not device.is_gpu:
        return inputs
    return inputs.__class__({k: device.pin(v) if torch.is_tensor(v) else v for k, v in inputs.items()})


def _batches(samples: list[Sample], size: int) -> Iterator[list[Sample]]:
    """Batches of at most `size`, as even as possible (contract/batching.py)."""
    for start, end in even_bounds(len(samples), size):
        yield samples[start:end]


def prepare_sample(processor: Any, sample: Sample, template: str, exif: str = "apply",
                   max_prompt_tokens: int | None = None,
                   resize: TrainerResize | None = None) -> Prepared | tuple[str, ImageInfo | None]:
    """The sample's image (as read: upright by default; then resized as the adapter's trainer resized its images,
    where `resize` says how) and chat text, or the reason it cannot be evaluated (and the image as read, where it
    was): a bad row, an unreadable image, ground truth that does not fit the image, a prompt field the sample lacks,
    a prompt longer than `max_prompt_tokens`."""
    if sample.error:
        return sample.error, None
    try:
        image, info = read_sample_image(sample, exif)
    except (OSError, ValueError) as exc:
        return f"image {sample.image}: {exc}", None
    problem = check_gt(sample, info)
    if problem is not None or sample.bbox is None:  # check_gt names a missing box too
        return problem or f"sample {sample.id}: no ground-truth box", info
    try:
        prompt = render_prompt(template, sample)
    except (KeyError, IndexError, ValueError) as exc:
        return f"prompt: {exc.args[0] if exc.args else exc}", info
    text = prompt_text(processor, prompt)
    too_long = prompt_too_long(processor, text, max_prompt_tokens) if max_prompt_tokens else None
    if too_long is not None:
        return too_long, info
    return Prepared(sample, sample.bbox, resize.apply(image) if resize is not None else image, text, info=info)


def _generate_fitting(model: Any, processor: Any, prepared: PreparedBatch, recipe: Recipe, device: Device,
                      stats: InferenceStats) -> Generated:
    """Generate the batch, in chunks of stats.batch_size; when CUDA runs out of memory, halve it (for the rest of
    the run too) and retry the chunk, down to one sample, which then fails the recipe as `cuda_oom`."""
    batch = prepared.items
    parts: list[Generated] = []
    start = 0
    while start < len(batch):
        chunk = batch[start : start + stats.batch_size]
        whole = start == 0 and len(chunk) == len(batch)  # the prefetched tensors serve the whole batch only
        try:
            inputs = prepared.inputs if whole else processor_inputs(processor, chunk, device)
            result = generate(model, processor, inputs, device.tensors, max_new_tokens=recipe.max_new_tokens,
                              min_new_tokens=recipe.min_new_tokens)
        except torch.cuda.OutOfMemoryError as exc:
            if len(chunk) == 1:
                raise WorkerError("cuda_oom", f"out of GPU memory with a batch of 1: {exc}") from exc
            result = None
        if result is None:  # outside the except block, so the failed attempt's tensors are already released
            stats.oom_retries += 1
            stats.batch_size = max(1, len(chunk) // 2)
            device.free_cached()
            continue
        parts.append(result)
        start += len(chunk)
    return _joined(parts)


def _joined(parts: list[Generated]) -> Generated:
    """One batch's generation from its chunks' (one chunk unless CUDA ran out of memory)."""
    if len(parts) == 1:
        return parts[0]
    prefixes = [part.decoder_prefix for part in parts if part.decoder_prefix is not None]
    return Generated([t for part in parts for t in part.texts], [r for part in parts for r in part.rows],
                     sum(part.new_tokens for part in parts),
                     [p for prefix in prefixes for p in prefix] if len(prefixes) == len(parts) else None,
                     [graph for part in parts for graph in part.graphs])


def scored_record(item: Prepared, text: str, box_format: str, seconds: float) -> dict:
    """`image_size` is the original's (as read), `input_size` the image the model saw (after the processor's
    resize): with both, `rescore` converts any box format without the model."""
    size = item.image.size
    try:
        scored = score_text(text, box_format, size, item.gt, item.input_size)
    except InputSizeMissing as exc:
        raise WorkerError("config", f"{exc}: this processor's output does not say the size of the image the model "
                                    "saw; choose a box format in relative coordinates") from None
    return {
        "id": item.sample.id,
        INPUT_KEY: sample_key(item.sample),
        "status": "ok",
        "gt": item.gt,
        "text": text,
        **image_record(item.info),  # the size as read and the EXIF orientation applied
        "input_size": item.input_size,
        "seconds": seconds,
        "error": None,
        **scored,
    }


def _error_record(sample: Sample, error: str, info: ImageInfo | None = None) -> dict:
    return {
        "id": sample.id, INPUT_KEY: sample_key(sample), "status": "error", "gt": sample.bbox, "text": None,
        **image_record(info), "input_size": None, "seconds": 0.0, "error": error, "pred": None, "iou": 0.0,
        "detected": False,
    }
