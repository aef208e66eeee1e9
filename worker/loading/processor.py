"""The chain's processor, loaded as its trainer loaded it, and the resize its trainer applied to images: all that a
worker needs to prepare batches, so that it can start on them before the model stack (transformers' modeling,
peft) is imported."""

from __future__ import annotations

from typing import Any

from transformers import AutoProcessor, AutoTokenizer

from contract.checkpoint import CheckpointError
from contract.processor import processor_source
from contract.recipe import Recipe
from contract.spec import ChainLink
from contract.trainer_resize import TrainerResize
from worker.errors import WorkerError
from worker.loading.chain_files import reading


def load_processor(chain: list[ChainLink], recipe: Recipe) -> Any:
    """The processor the parent recorded (contract/processor.py: the nearest link, top first, that saved one; its
    tokenizer from a link above where one saved a tokenizer alone), with the new special tokens its trainer adds
    when it loads (ms-swift's), added the same way."""
    try:
        source = processor_source([link.path for link in chain], recipe.image_bounds)
    except CheckpointError as exc:
        raise WorkerError("lineage", str(exc)) from None
    with reading(source.path, "its processor (tokenizer, image processor)"):
        processor = AutoProcessor.from_pretrained(source.path, trust_remote_code=recipe.trust_remote_code)
    if source.tokenizer_path != source.path:
        with reading(source.tokenizer_path, "its tokenizer"):
            processor.tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_path,
                                                                trust_remote_code=recipe.trust_remote_code)
    tokenizer = getattr(processor, "tokenizer", processor)
    if source.added_tokens:  # as ms-swift's model loader adds them (swift/model/register.py)
        tokenizer.add_special_tokens({"additional_special_tokens": source.added_tokens})
    tokenizer.padding_side = "left"  # decoder-only batched generation needs left padding
    return processor


def training_resize(chain: list[ChainLink], recipe: Recipe) -> TrainerResize | None:
    """The resize the top link's trainer applied to images before its processor (contract/trainer_resize.py), which
    the worker applies to each image as read; None where there was none."""
    try:
        return processor_source([link.path for link in chain], recipe.image_bounds).trainer_resize
    except CheckpointError as exc:
        raise WorkerError("lineage", str(exc)) from None
