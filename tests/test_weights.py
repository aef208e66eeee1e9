"""The staged safetensors reader: the same tensors as safetensors' own reader, and the same model as transformers'
from_pretrained, whatever the chunking, dtypes and sharding. (The staging through buffers and copy streams
runs on a simulated GPU in tests/test_gpu_wiring.py, on CUDA in tests/gpu.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from contract.recipe import Recipe
from worker.device import CPU
from worker.errors import WorkerError
from worker.loading.load import load_root, model_class
from worker.loading.weights import load_safetensors, plan_chunks, read_spans, read_through


def _mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.bf16": torch.randn(37, 11, generator=g).to(torch.bfloat16),
        "b.f32": torch.randn(5, 3, generator=g),
        "c.i64": torch.arange(17, dtype=torch.int64),
        "d.bool": torch.rand(9, generator=g) > 0.5,
        "e.scalar": torch.tensor(3.5, dtype=torch.bfloat16),
        "f.empty": torch.empty(0, 4, dtype=torch.bfloat16),
        "g.u8": torch.randint(0, 255, (301,), dtype=torch.uint8, generator=g),
        "h.f16": torch.randn(13, generator=g).to(torch.float16),
    }


@pytest.mark.parametrize("chunk_bytes,threads", [(64, 3), (7, 2), (1 << 20, 1)])
def test_staged_tensors_equal_safetensors_reader(tmp_path: Path, chunk_bytes: int, threads: int) -> None:
    path = tmp_path / "model.safetensors"
    save_file(_mixed_tensors(), str(path))
    expected = load_file(str(path))
    weights = load_safetensors([path], CPU, torch.bfloat16, threads=threads, chunk_bytes=chunk_bytes)
    try:
        # floating tensors in another dtype are left to transformers as lazy slices; the rest are read here
        assert weights.lazy_names == ["b.f32", "h.f16"]
        assert set(weights.state_dict) == set(expected)
        for name, tensor in expected.items():
            got = weights.state_dict[name]
            got = got if isinstance(got, torch.Tensor) else got[...]
            assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
            assert torch.equal(got, tensor), name
        assert weights.fast_bytes == sum(t.numel() * t.element_size() for n, t in expected.items()
                                         if n not in weights.lazy_names)
    finally:
        weights.close()


def test_chunks_never_exceed_their_size_and_cover_every_byte(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(_mixed_tensors(), str(path))
    spans = read_spans(path)
    tensors = [(path, s, torch.empty(s.shape, dtype=s.dtype)) for s in spans]
    chunks = list(plan_chunks(tensors, 50))
    assert all(0 < c.nbytes <= 50 for c in chunks)
    covered = sorted((c.start + p.chunk_offset, p.nbytes) for c in chunks for p in c.pieces)
    wanted = sorted((s.start, s.nbytes) for s in spans if s.nbytes)
    merged, position = [], None  # pieces of one tensor sit back to back
    for start, size in covered:
        if position == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + size)
        else:
            merged.append((start, size))
        position = start + size
    assert sum(size for _, size in covered) == sum(size for _, size in wanted)
    assert {start for start, _ in wanted} <= {start for start, _ in covered}


def test_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(1000, dtype=torch.bfloat16)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(WorkerError, match="tensor 'w' lies at bytes 0-2000 of the data, but the file holds 1900"):
        load_safetensors([path], CPU, torch.bfloat16)


def _same_model(folder: Path, dtype: torch.dtype) -> None:
    link = type("Link", (), {"path": str(folder)})()
    ref, how_ref = load_root(link, Recipe(name="t", model="m", loader="transformers"), CPU, dtype, "sdpa")
    got, how = load_root(link, Recipe(name="t", model="m", loader="staged"), CPU, dtype, "sdpa")
    assert how_ref == {"loader": "transformers"} and how["loader"] == "staged"
    expected, actual = ref.state_dict(), got.state_dict()
    assert expected.keys() == actual.keys()
    for name in expected:
        assert expected[name].dtype == actual[name].dtype, name
        assert torch.equal(expected[name], actual[name]), name
    for (name, a), (_, b) in zip(ref.named_buffers(), got.named_buffers(), strict=True):
        assert torch.equal(a, b), name
    assert got.generation_config.to_dict() == ref.generation_config.to_dict()
    ids = torch.tensor([[1, 5, 9, 14]])
    with torch.inference_mode():
        assert torch.equal(ref(input_ids=ids).logits, got(input_ids=ids).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_staged_model_equals_from_pretrained(demo: dict, dtype: torch.dtype) -> None:
    """The demo's base is stored in float32: in float32 every tensor is staged, in bfloat16 every one converted."""
    _same_model(demo["root"] / "models" / "base", dtype)


def test_staged_model_without_architectures_in_config(demo: dict, tmp_path: Path) -> None:
    """A config that names no class: the auto class picks it from the config's type, for the staged path too."""
    folder = tmp_path / "plain"
    shutil.copytree(demo["root"] / "models" / "base", folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("architectures", None)
    (folder / "config.json").write_text(json.dumps(config))
    _same_model(folder, torch.float32)


def test_staged_model_sharded_and_tied(demo: dict, tmp_path: Path) -> None:
    """Several shards, and tied input/output embeddings (one tensor in the file, two names in the model)."""
    source = demo["root"] / "models" / "base"
    config = AutoConfig.from_pretrained(source)
    config.tie_word_embeddings = True
    config.get_text_config().tie_word_embeddings = True
    model = model_class(config).from_pretrained(source, config=config, dtype=torch.bfloat16)
    model.get_output_embeddings().weight = model.get_input_embeddings().weight  # the base has its own lm_head
    model.save_pretrained(tmp_path / "tied", max_shard_size="100KB")
    assert len(list((tmp_path / "tied").glob("model-*.safetensors"))) >= 2
    _same_model(tmp_path / "tied", torch.bfloat16)
    link = type("Link", (), {"path": str(tmp_path / "tied")})()
    got, _ = load_root(link, Recipe(name="t", model="m", loader="staged"), CPU, torch.bfloat16, "sdpa")
    assert got.get_output_embeddings().weight.data_ptr() == got.get_input_embeddings().weight.data_ptr()


def test_staged_load_skips_the_allocator_warmup(demo: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers reserves the model's size on the device before loading; for staged weights, already on the
    device, that was a second copy at the load's peak (twice the weights on the H200). Its own reader still warms
    up, which also proves the spy sits where transformers calls it (a rename upstream fails here, not silently)."""
    import transformers.modeling_utils as modeling_utils

    calls: list[str] = []
    original = modeling_utils.caching_allocator_warmup
    monkeypatch.setattr(modeling_utils, "caching_allocator_warmup",
                        lambda *a, **k: calls.append("warmup") or original(*a, **k))
    link = type("Link", (), {"path": str(demo["root"] / "models" / "base")})()
    _, how = load_root(link, Recipe(name="t", model="m", loader="staged"), CPU, torch.float32, "sdpa")
    assert how["loader"] == "staged" and calls == []
    load_root(link, Recipe(name="t", model="m", loader="transformers"), CPU, torch.float32, "sdpa")
    assert calls == ["warmup"]
    assert modeling_utils.caching_allocator_warmup is not original  # still the spy: the patch was undone


def test_read_through_reads_every_byte_of_every_file(tmp_path: Path) -> None:
    sizes = {"a.safetensors": 0, "b.safetensors": 1000, "c.safetensors": 3 * 64 + 5}
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(bytes(size))
    assert read_through([tmp_path / n for n in sizes], threads=3, block=64) == sum(sizes.values())
