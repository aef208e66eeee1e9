"""The chain's files before any library reads them: checked, their pages read into memory ahead of the load, and a
library's failure to read one named as that checkpoint's (torch only: the model stack's imports come later)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from contract.checkpoint import CheckpointError, check_folder, weight_files
from contract.layout import WORKER_LOG
from contract.recipe import Recipe
from contract.spec import ChainLink
from worker.errors import WorkerError
from worker.loading.weights import UnstageableError, read_through


def check_chain_files(chain: list[ChainLink], recipe: Recipe) -> None:
    """Every file of the chain that loading reads, checked (bounded) before transformers or peft read it: the
    parent checked them when it planned, but a copy may still have been under way. A damaged file is this
    recipe's lineage error, naming the file."""
    for link in chain:
        try:
            check_folder(Path(link.path), link.kind, allow_pickle=recipe.allow_pickle)
        except CheckpointError as exc:
            raise WorkerError("lineage", str(exc)) from None


@contextmanager
def reading(folder: str | Path, what: str) -> Iterator[None]:
    """A failure while a library reads a checkpoint is that checkpoint's: a lineage error naming the folder and
    what was being read (the file checks above catch most damage first, with the file's name; this catches what
    only the library sees: a tokenizer.json that is JSON but no tokenizer, tensors that do not fit the config).
    CUDA out of memory stays what it is."""
    try:
        yield
    except (WorkerError, UnstageableError):  # the latter: transformers' reader takes over
        raise
    except Exception as exc:
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        raise WorkerError("lineage", f"{folder}: {what} could not be loaded ({type(exc).__name__}: "
                                     f"{str(exc)[:1000]}); the checkpoint may be damaged or incomplete (the "
                                     f"library's own report, if any, is in {WORKER_LOG})") from exc


def warm_page_cache(chain: list[ChainLink]) -> float:
    """Read every weight file of the chain once, so that the load which follows reads from memory, not disk.
    A held worker does this while the previous recipe still owns the GPU (hidden start-up). Returns seconds."""
    started = time.perf_counter()
    for link in chain:
        with reading(link.path, "its weight files"):
            read_through(weight_files(Path(link.path), link.kind, allow_pickle=True))  # what check_chain_files let by
    return time.perf_counter() - started
