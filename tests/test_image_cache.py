"""The cache of preprocessed images: exact batches from per-sample entries, hits across paths and recipes, misses on
changed processor settings, damaged entries rewritten, concurrent writers, and a whole run through the CLI."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, only_run_dir, run_cli, write_recipes
from PIL import Image
from transformers import AutoProcessor

from contract.dataset import Sample
from contract.recipe import Recipe
from orchestrator.planning.plan import RecipePlan
from orchestrator.planning.recipes import load_recipe_file
from orchestrator.results.resume import planned_recipe, recipe_changes, recorded_recipes
from orchestrator.results.store import read_samples
from worker.device import CPU
from worker.inference.image_cache import ProcessorCache, collate, processor_fingerprint, read_entry
from worker.inference.infer import prefetch, prepare_batch, processor_inputs

# (width, height): multiples of 28 and not, inside the demo processor's pixel bounds and above them (resized)
SIZES = [(112, 112), (300, 200), (56, 140), (90, 61), (140, 84)]
PROMPTS = ["Find the red rectangle.", "Where?", "Give the bounding box of the blue rectangle in this picture, please.",
           "Locate the yellow one.", "Cyan."]


class CountingProcessor:
    """The processor, counting how often it is called on images."""

    def __init__(self, processor: object) -> None:
        self._processor = processor
        self.calls = 0

    def __call__(self, *args: object, **kwargs: object) -> object:
        self.calls += 1
        return self._processor(*args, **kwargs)

    def __getattr__(self, name: str) -> object:
        return getattr(self._processor, name)


@pytest.fixture(scope="module")
def processor(demo: dict) -> object:
    loaded = AutoProcessor.from_pretrained(demo["models"]["base"])
    loaded.tokenizer.padding_side = "left"  # as worker.loading.processor.load_processor sets it
    return loaded


@pytest.fixture
def samples(tmp_path: Path) -> list[Sample]:
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    out = []
    for i, ((width, height), prompt) in enumerate(zip(SIZES, PROMPTS, strict=True)):
        path = folder / f"i{i}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        out.append(Sample(f"i{i}", path, [0.0, 0.0, 10.0, 10.0], prompt))
    return out


def _text(processor: object, prompt: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _fill(cache: ProcessorCache, processor: object, samples: list[Sample]) -> list:
    out = []
    for s in samples:
        with Image.open(s.image_path) as image:
            out.append(cache.features(_text(processor, s.prompt), image.convert("RGB"), s.image_path))
    return out


def _batched(processor: object, samples: list[Sample]) -> object:
    images = [Image.open(s.image_path).convert("RGB") for s in samples]
    return processor(text=[_text(processor, s.prompt) for s in samples], images=images, padding=True,
                     return_tensors="pt")


def _assert_same(got: object, expected: object) -> None:
    assert type(got) is type(expected)
    assert list(got.keys()) == list(expected.keys())
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        assert torch.equal(got[key], expected[key]), key


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


def test_collated_entries_are_exactly_the_batched_processor_call(processor, samples, tmp_path: Path) -> None:
    expected = _batched(processor, samples)
    cache = ProcessorCache(tmp_path / "cache", processor)
    computed = _fill(cache, processor, samples)
    assert len({e["input_ids"].shape[1] for e in computed}) == len(samples)  # every length differs: padding matters
    assert len({tuple(e["image_grid_thw"][0].tolist()) for e in computed}) == len(samples)
    _assert_same(collate(computed, processor.tokenizer.pad_token_id), expected)
    read_back = _fill(cache, processor, samples)
    assert (cache.misses, cache.hits) == (len(samples), len(samples))
    _assert_same(collate(read_back, processor.tokenizer.pad_token_id), expected)
    for part in (samples[1:3], samples[3:4]):  # any chunk, as an out-of-memory retry cuts the batch
        indices = [samples.index(s) for s in part]
        _assert_same(collate([read_back[i] for i in indices], processor.tokenizer.pad_token_id),
                     _batched(processor, part))


def test_a_second_pass_comes_from_the_cache_without_the_processor(processor, samples, tmp_path: Path) -> None:
    first = ProcessorCache(tmp_path / "cache", processor)
    first.processor = counting = CountingProcessor(processor)
    _fill(first, processor, samples)
    assert (first.hits, first.misses, counting.calls) == (0, len(samples), len(samples))
    assert len(_entries(tmp_path / "cache")) == len(samples)
    _batched(processor, samples)  # a padded call leaves padding state in the tokenizer: not a setting
    second = ProcessorCache(tmp_path / "cache", processor)  # another worker, same settings
    second.processor = counting = CountingProcessor(processor)
    _fill(second, processor, samples)
    assert (second.hits, second.misses, counting.calls) == (len(samples), 0, 0)


def test_the_same_image_bytes_under_another_path_hit(processor, samples, tmp_path: Path) -> None:
    cache = ProcessorCache(tmp_path / "cache", processor)
    _fill(cache, processor, samples[:1])
    copied = tmp_path / "elsewhere" / "renamed.png"
    copied.parent.mkdir()
    copied.write_bytes(samples[0].image_path.read_bytes())
    os.utime(copied, (1, 1))
    _fill(cache, processor, [Sample("x", copied, None, samples[0].prompt)])
    assert (cache.misses, cache.hits) == (1, 1)
    other = Sample("y", samples[1].image_path, None, samples[0].prompt)  # same text, other image: a miss
    _fill(cache, processor, [other])
    assert (cache.misses, cache.hits) == (2, 1)


def test_changed_processor_settings_miss(processor, samples, demo: dict, tmp_path: Path) -> None:
    cache = ProcessorCache(tmp_path / "cache", processor)
    _fill(cache, processor, samples)
    smaller = AutoProcessor.from_pretrained(demo["models"]["base"],
                                            size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 8})
    smaller.tokenizer.padding_side = "left"
    retemplated = copy.deepcopy(processor)
    retemplated.chat_template = processor.chat_template + "{#- the same text, another template -#}"
    assert _text(retemplated, "x") == _text(processor, "x")
    from_other_folder = AutoProcessor.from_pretrained(demo["models"]["r2-vision-only"])  # identical settings
    assert processor_fingerprint(from_other_folder) == cache.fingerprint
    for changed in (smaller, retemplated):
        assert processor_fingerprint(changed) != cache.fingerprint
        other = ProcessorCache(tmp_path / "cache", changed)
        entries = _fill(other, changed, samples)
        assert (other.hits, other.misses) == (0, len(samples))
        _assert_same(collate(entries, changed.tokenizer.pad_token_id), _batched(changed, samples))
    assert len(list((tmp_path / "cache").iterdir())) == 3  # one folder per fingerprint


def test_a_trainers_resize_before_the_processor_is_part_of_the_fingerprint(processor) -> None:
    """The same processor fed images a trainer resized first (contract/trainer_resize.py) gives other outputs: its
    entries are another fingerprint's, one for each rule and bound; none where there is no such resize."""
    from contract.trainer_resize import TrainerResize

    def resize(rule: str, high: int) -> TrainerResize:
        return TrainerResize(trainer="t", rule=rule, source="s", max_pixels=high, factor=28)  # type: ignore[arg-type]

    fingerprints = {processor_fingerprint(processor), processor_fingerprint(processor, resize("swift", 8000)),
                    processor_fingerprint(processor, resize("swift", 9000)),
                    processor_fingerprint(processor, resize("llamafactory", 8000))}
    assert len(fingerprints) == 4
    assert processor_fingerprint(processor, None) == processor_fingerprint(processor)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_entry_is_a_miss_and_is_rewritten(processor, samples, tmp_path: Path, damage: str) -> None:
    cache = ProcessorCache(tmp_path / "cache", processor)
    _fill(cache, processor, samples)
    victim = _entries(tmp_path / "cache")[2]
    data, whole = victim.read_bytes(), read_entry(victim, victim.stem)
    victim.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00" * 64}[damage])
    again = ProcessorCache(tmp_path / "cache", processor)
    entries = _fill(again, processor, samples)
    assert (again.hits, again.misses) == (len(samples) - 1, 1)
    _assert_same(read_entry(victim, victim.stem), whole)  # rewritten whole
    _assert_same(collate(entries, processor.tokenizer.pad_token_id), _batched(processor, samples))


_WRITER = """
import sys, time, torch
from pathlib import Path
from worker.inference.image_cache import write_entry
path, me, go = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
features = {"input_ids": torch.full((1, 50_000), me), "pixel_values": torch.full((256, 1176), float(me))}
go.with_name(f"ready-{me}").touch()
while not go.exists():
    time.sleep(0.001)
for _ in range(40):
    write_entry(path, "the-key", features)
"""


def test_concurrent_writers_of_one_key_leave_a_whole_entry(tmp_path: Path) -> None:
    """Four processes (four GPUs' workers) write the same key, each its own content, while this one reads: every
    read sees nothing or one writer's whole entry, and so does the end."""
    path = tmp_path / "cache" / "ab" / "the-key.safetensors"
    go = tmp_path / "go"
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(me), str(go)], cwd=ROOT)
               for me in range(1, 5)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < len(writers) and time.monotonic() < deadline:
        time.sleep(0.01)  # every writer has imported torch: they start together
    go.touch()
    seen = set()
    while any(w.poll() is None for w in writers):
        entry = read_entry(path, "the-key")
        if entry is not None:
            values = set(entry["input_ids"].unique().tolist()) | set(entry["pixel_values"].unique().tolist())
            assert len(values) == 1, values
            seen |= values
    assert all(w.returncode == 0 for w in writers)
    final = read_entry(path, "the-key")
    assert final is not None and len(set(final["pixel_values"].unique().tolist())) == 1
    assert seen and not list(path.parent.glob("*.tmp"))


def test_prepare_batch_uses_the_cache_and_is_unchanged_without_it(processor, samples, tmp_path: Path) -> None:
    template = "{prompt}"
    counting = CountingProcessor(processor)
    plain = prepare_batch(counting, samples, template, CPU)
    assert counting.calls == 1 and all(item.features is None for item in plain.items)
    assert (plain.cache_hits, plain.cache_misses) == (0, 0)
    recipe = Recipe(name="a", model="/m")
    assert ProcessorCache.for_recipe(processor, recipe.model_copy(update={"cache_dir": str(tmp_path)})) is None
    assert ProcessorCache.for_recipe(processor, recipe.model_copy(update={"image_cache": True})) is None
    cache = ProcessorCache.for_recipe(processor, recipe.model_copy(update={"image_cache": True,
                                                                           "cache_dir": str(tmp_path / "c")}))
    assert cache.folder.parent == tmp_path / "c" / "preprocessed"
    first = prepare_batch(processor, samples, template, CPU, cache=cache)
    cache.processor = counting = CountingProcessor(processor)
    second = prepare_batch(counting, samples, template, CPU, cache=cache)
    assert (first.cache_hits, first.cache_misses, second.cache_hits, second.cache_misses) == (0, 5, 5, 0)
    assert counting.calls == 0
    _assert_same(first.inputs, plain.inputs)
    _assert_same(second.inputs, plain.inputs)
    chunk = processor_inputs(counting, second.items[1:4], CPU)  # the out-of-memory path's chunks
    assert counting.calls == 0
    _assert_same(chunk, processor_inputs(processor, plain.items[1:4], CPU))


def test_prefetch_prepares_each_batch_once_while_the_device_is_busy() -> None:
    """A producer waiting for room in the queue must not prepare its batch again on each retry: that ran the
    processor ~5 times a second for nothing, and made a batch's cache misses read as hits."""
    calls: list[list[int]] = []
    consumed = []
    for batch in prefetch([[i] for i in range(4)], lambda b: calls.append(b) or b, depth=1):
        time.sleep(0.5)  # the device, slower than the CPU
        consumed.append(batch)
    assert consumed == calls == [[0], [1], [2], [3]]


def test_prefetch_says_which_batch_the_device_is_waiting_for() -> None:
    """`waited_for` is set while the consumer waits for a batch not yet ready (that batch is then not worth
    pinning: start_batches) and clear while it works on one: here the first batch is finished only once the
    consumer waits for it, and the second is checked while the consumer holds the first."""
    waited_for, go_on, checked = threading.Event(), threading.Event(), threading.Event()
    seen: list[bool] = []

    def prepare(batch: list[int]) -> list[int]:
        if batch == [0]:
            assert waited_for.wait(timeout=30)  # made while the device waits for it
        else:
            go_on.wait(timeout=30)
        seen.append(waited_for.is_set())
        checked.set()
        return batch

    batches = iter(prefetch([[0], [1]], prepare, depth=1, waited_for=waited_for))
    assert next(batches) == [0] and not waited_for.is_set()
    checked.clear()
    go_on.set()
    assert checked.wait(timeout=30)
    assert next(batches) == [1]
    assert seen == [True, False]


# ----------------------------------------------------------------------------- settings and resume


def test_cache_dir_is_relative_to_the_recipe_file_or_comes_from_the_environment(tmp_path: Path,
                                                                                monkeypatch) -> None:
    (tmp_path / "data.jsonl").write_text("")
    (tmp_path / "model").mkdir()
    path = tmp_path / "r.toml"
    path.write_text('[defaults]\ndataset = "data.jsonl"\n[[recipe]]\nname = "a"\nmodel = "model"\n'
                    '[[recipe]]\nname = "b"\nmodel = "model"\ncache_dir = "caches/here"\nimage_cache = false\n'
                    '[[recipe]]\nname = "c"\nmodel = "model"\ncache_dir = "/abs/cache"\n')
    monkeypatch.setenv("EVALORCH_CACHE", str(tmp_path / "env-cache"))
    a, b, c = load_recipe_file(path).recipes
    assert (a.image_cache, a.cache_dir) == (False, str(tmp_path / "env-cache"))  # off unless a recipe asks
    assert (b.image_cache, b.cache_dir) == (False, str(tmp_path / "caches" / "here"))
    assert c.cache_dir == "/abs/cache"
    monkeypatch.delenv("EVALORCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert load_recipe_file(path).recipes[0].cache_dir == str(tmp_path / "xdg" / "evalorch")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load_recipe_file(path).recipes[0].cache_dir == str(tmp_path / "home" / ".cache" / "evalorch")


def test_resume_ignores_the_cache_settings_and_runs_recorded_before_they_existed(tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_text("")
    (tmp_path / "model").mkdir()
    path = tmp_path / "r.toml"
    path.write_text('[defaults]\ndataset = "data.jsonl"\n[[recipe]]\nname = "a"\nmodel = "model"\n')
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    def resume_with(record: dict, toml: str) -> list[str]:
        (run_dir / "run.json").write_text(json.dumps({"recipes": [record]}))
        path.write_text(toml)
        (plan,) = [RecipePlan(r, chain=[]) for r in load_recipe_file(path).recipes]
        return recipe_changes(run_dir, plan, {r["name"]: r for r in recorded_recipes(run_dir)})

    before = planned_recipe(RecipePlan(load_recipe_file(path).recipes[0], chain=[]))
    older = {k: v for k, v in before.items() if k not in ("image_cache", "cache_dir")}
    base = path.read_text()
    assert resume_with(older, base) == []
    assert resume_with(before, base.replace('"model"\n', '"model"\nimage_cache = false\ncache_dir = "x"\n')) == []
    changed = resume_with(older, base.replace('"model"\n', '"model"\nmax_new_tokens = 9\n'))
    assert changed == ["field 'max_new_tokens': 64 -> 9"]


# ----------------------------------------------------------------------------- a whole run


TWO_RECIPES = """
[[recipe]]
name = "base"
model = "{models}/base"
baseline = true
[[recipe]]
name = "r2-vision-only"
model = "{models}/r2-vision-only"
"""


def _run(folder: Path, demo: dict, cache: Path, *options: str, **defaults: object) -> Path:
    folder.mkdir()
    recipes = write_recipes(folder, TWO_RECIPES.format(models=demo["root"] / "models"), demo, **defaults)
    result = run_cli("run", str(recipes), "--out", str(folder / "runs"), "--device", "cpu", *options,
                     env={"EVALORCH_CACHE": str(cache)})
    assert result.returncode == 0, result.stdout + result.stderr
    return only_run_dir(folder / "runs")


def _counts(run_dir: Path, name: str) -> tuple[int, int]:
    counts = json.loads((run_dir / name / "summary.json").read_text())["done"]["counts"]
    assert "cache_hits" in counts, "worker/__main__.py does not report cache_hits/cache_misses in `done` yet"
    return counts["cache_hits"], counts["cache_misses"]


def _outputs(run_dir: Path, name: str) -> dict:
    return {s["id"]: (s["text"], s["pred"], s["iou"], s["detected"]) for s in read_samples(run_dir / name /
                                                                                         "samples.jsonl")}


def test_a_second_recipe_with_the_same_processor_is_served_from_the_cache(demo: dict, tmp_path: Path) -> None:
    n = sum(1 for line in Path(demo["dataset"]).read_text().splitlines() if line.strip())
    cache = tmp_path / "cache"
    plain = _run(tmp_path / "off", demo, cache, image_cache=False)
    assert not cache.exists() and _counts(plain, "base") == (0, 0)

    # one worker after the other: no race to fill
    cold = _run(tmp_path / "cold", demo, cache, "--no-prestart", image_cache=True)
    assert _counts(cold, "base") == (0, n) and _counts(cold, "r2-vision-only") == (n, 0)
    entries = _entries(cache / "preprocessed")
    assert len(entries) == n and len({e.parent.parent for e in entries}) == 1  # one fingerprint: shared
    stamps = {e: e.stat().st_mtime_ns for e in entries}

    # the next recipe's worker is started ahead, held: it hits too
    warm = _run(tmp_path / "warm", demo, cache, image_cache=True)
    assert _counts(warm, "base") == (n, 0) and _counts(warm, "r2-vision-only") == (n, 0)
    assert {e: e.stat().st_mtime_ns for e in _entries(cache / "preprocessed")} == stamps  # read, never rewritten
    for name in ("base", "r2-vision-only"):
        assert _outputs(cold, name) == _outputs(plain, name) == _outputs(warm, name)
        assert len(_outputs(plain, name)) == n
