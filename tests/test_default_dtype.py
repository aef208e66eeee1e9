"""torch's default dtype is one per process (worker/loading/default_dtype.py): transformers sets it to the model's dtype
while it builds a model, and an image processor's first call caches mean and std tensors made in it. The worker's
prefetch thread prepared batches while the main thread built a bfloat16 model, and every pixel of the run moved.
Here: the hazard with the real processor, the guard that makes it loud, and the lock that keeps the two apart."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from transformers.modeling_utils import local_torch_dtype

from contract.dataset import open_dataset
from contract.recipe import Recipe
from contract.spec import ChainLink
from worker.device import CPU
from worker.errors import WorkerError
from worker.inference.infer import prepare_batch
from worker.loading import default_dtype
from worker.loading.load import load_chain
from worker.loading.processor import load_processor

ROOT = Path(__file__).resolve().parent.parent

FIRST_CALL_IN = """
import sys, torch
sys.path.insert(0, {root!r})
from transformers.modeling_utils import local_torch_dtype
from contract.dataset import open_dataset
from contract.recipe import Recipe
from contract.spec import ChainLink
from worker.inference.families import prompt_text
from worker.loading.processor import load_processor
from worker.inference.infer import prepare_sample
recipe = Recipe(name="b", model={model!r}, dataset={dataset!r})
processor = load_processor([ChainLink({model!r}, "full", "quick:0", 1)], recipe)
items = [prepare_sample(processor, s, recipe.prompt) for s in list(open_dataset(recipe.dataset, recipe))[:4]]
def call():  # the processor itself, without the worker's guard
    return processor(text=[i.text for i in items], images=[[i.image] for i in items], return_tensors="pt",
                     padding=True)["pixel_values"]
if {first!r} == "bfloat16":
    with local_torch_dtype(torch.bfloat16):
        call()
torch.save(call(), {out!r})
"""


def _pixels_after_first_call(demo: dict, first: str, out: Path) -> torch.Tensor:
    code = FIRST_CALL_IN.format(root=str(ROOT), model=str(demo["models"]["base"]), dataset=str(demo["dataset"]),
                                first=first, out=str(out))
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
    return torch.load(out)


def test_a_processor_first_called_under_bfloat16_moves_every_later_pixel(demo: dict, tmp_path: Path) -> None:
    """The hazard itself, in fresh processes: the first call under transformers' bfloat16 default (as during
    from_pretrained) changes the pixel values of a later call made under float32."""
    plain = _pixels_after_first_call(demo, "float32", tmp_path / "plain.pt")
    after = _pixels_after_first_call(demo, "bfloat16", tmp_path / "after.pt")
    if torch.equal(plain, after):
        pytest.skip("this transformers' processor no longer caches tensors made in the default dtype")
    assert plain.dtype == after.dtype == torch.float32 and (plain - after).abs().max() > 1e-3


@pytest.fixture(scope="module")
def prepared(demo: dict) -> tuple:
    recipe = Recipe(name="b", model=str(demo["models"]["base"]), dataset=str(demo["dataset"]))
    processor = load_processor([ChainLink(str(demo["models"]["base"]), "full", "quick:0", 1)], recipe)
    return processor, list(open_dataset(recipe.dataset, recipe))[:4], recipe


def test_preparing_a_batch_under_another_default_dtype_is_an_error(prepared: tuple) -> None:
    processor, samples, recipe = prepared
    with local_torch_dtype(torch.bfloat16), pytest.raises(WorkerError, match=r"default dtype is torch\.bfloat16"):
        prepare_batch(processor, samples, recipe.prompt, CPU)
    assert prepare_batch(processor, samples, recipe.prompt, CPU).inputs["pixel_values"].dtype == torch.float32


def test_every_default_dtype_change_of_a_load_happens_under_the_lock(demo: dict, monkeypatch) -> None:
    """A bfloat16 load of a two-stage chain (the stage-1 checkpoint, its stage-2 adapter): transformers changes the
    default dtype, and each change is made holding the lock that batch preparation takes; so while one is in
    force, no batch is being prepared."""
    original = torch.set_default_dtype
    calls: list[tuple[torch.dtype, bool]] = []

    def spy(dtype: torch.dtype) -> None:
        calls.append((dtype, default_dtype.lock_held()))
        original(dtype)

    monkeypatch.setattr(torch, "set_default_dtype", spy)
    models = demo["models"]
    chain = [ChainLink(str(models["r3-stage1"]), "full", "quick:0", 1),
             ChainLink(str(models["r3-stage2"]), "adapter", "quick:1", 1)]
    recipe = Recipe(name="r3", model=str(models["r3-stage2"]), dtype="bfloat16")
    load_chain(chain, recipe, CPU)
    assert any(dtype == torch.bfloat16 for dtype, _ in calls)  # the load did change it: the test sees something
    assert all(held for _, held in calls), calls
    assert torch.get_default_dtype() == torch.float32


def test_a_batch_waits_while_a_model_is_built(prepared: tuple) -> None:
    """The prefetch thread's processor call waits for the main thread's construction to finish, and then
    computes in float32."""
    processor, samples, recipe = prepared
    done = threading.Event()
    result: list = []

    def prepare() -> None:
        result.append(prepare_batch(processor, samples, recipe.prompt, CPU))
        done.set()

    with default_dtype.building_modules(), local_torch_dtype(torch.bfloat16):
        thread = threading.Thread(target=prepare)
        thread.start()
        assert not done.wait(0.5)  # held back while the "model" is built
    thread.join(60)
    assert done.is_set() and result[0].inputs["pixel_values"].dtype == torch.float32


E2E = """
[defaults]
dataset = "{family}/data/heldout.jsonl"
prompt = "{{prompt}} Answer with its bounding box."
box_format = "qwen2vl"
max_new_tokens = 32
batch_size = 16
limit = 96
dtype = "bfloat16"
parity_check = 0

[lineage]
remap = {{ "/ssd1/team/vlm_outputs" = "{family}" }}

[[recipe]]
name = "first"
model = "{family}/r1-llm-only"

[[recipe]]
name = "held"
model = "{family}/r1-llm-only"
"""


def test_a_worker_started_ahead_answers_as_the_first_one_does(tmp_path: Path) -> None:
    """The trained demo family's r1 in bfloat16 twice: the first worker prepares its first batches while it
    builds its model, the second (started ahead) before. Before the lock, h057 of these 96 answered otherwise in
    the first (3 runs of 3); the same model on the same samples must answer the same, however it was started."""
    import json

    from helpers import only_run_dir, run_cli

    recipes = tmp_path / "recipes.toml"
    recipes.write_text(E2E.format(family=ROOT / "examples" / "demo-family"))
    result = run_cli("run", str(recipes), "--out", str(tmp_path / "runs"), "--device", "cpu",
                     env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    texts = {name: [json.loads(line)["text"] for line in (run_dir / name / "samples.jsonl").read_text().splitlines()]
             for name in ("first", "held")}
    held = json.loads((run_dir / "held" / "summary.json").read_text())
    assert "held" in held["done"]["timings"]  # the second was started ahead: the two ways were both taken
    assert len(texts["first"]) == 96 and texts["first"] == texts["held"]
