"""The worker spec: everything a worker is told, written by the parent as spec.json in the recipe's folder and
validated by the worker before it imports torch. The recipe crosses the boundary typed (contract/recipe.py),
so both sides read the same fields with the same defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .messages import PROTOCOL_VERSION
from .recipe import Recipe

# CPU threads a GPU worker runs torch with (its CPU work is batch preparation; worker/startup.py `share_cpu`).
# The parent sizes how many GPU workers a host can feed at once by it (orchestrator/execution/scheduler.py).
GPU_WORKER_THREADS = 4


@dataclass
class ChainLink:
    """One set of weights in a recipe's lineage; the chain is ordered root (a full checkpoint) first."""

    path: str
    kind: str  # "full" or "adapter"
    fingerprint: str
    bytes: int
    recorded_base: str | None = None  # what an adapter's adapter_config.json names as its base
    # how it was found: "local", "remap", "relative", "hub-cache", "modelscope-cache", "recipe-base"
    source: str = "local"
    # checkpoint.files_fingerprint: its processor, tokenizer, chat template, generation config (None: not recorded)
    files_fingerprint: str | None = None
    # an adapter whose base was found through ms-swift's args.json: the `model` it names (adapter_config.json's
    # base_model_name_or_path absent, or not found here)
    base_from_args: str | None = None
    # an adapter that carries its own embeddings (embed_tokens/lm_head) with another number of rows than the model
    # beneath it (a grown tokenizer, or a resize_token_embeddings): the rows the worker resizes that model's
    # embeddings to before applying it (orchestrator/planning/vocabulary.py)
    embedding_rows: int | None = None


class SpecError(Exception):
    """A spec file the worker cannot act on (another protocol version, missing or mistyped fields)."""


class WorkerSpec(BaseModel):
    """What one worker evaluates, on which device, and how (see the fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    recipe: Recipe  # the validated recipe; batch_size is the number the parent chose
    chain: list[ChainLink] = Field(min_length=1)
    dataset: str
    device: Literal["cpu", "cuda"]
    skip_ids: list[str | int] = Field(default_factory=list)  # samples already recorded (resume, retry), as recorded
    attempt: int = Field(1, ge=1)
    # Hidden start-up: a held worker imports, reads its data and warms the page cache with its weights while
    # the previous recipe still runs, sends `ready`, and touches the device only after the parent's `go`.
    hold: bool = False
    protocol: int = PROTOCOL_VERSION

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes) -> WorkerSpec:
        """Parse and validate; raise SpecError naming each bad field."""
        try:
            spec = cls.model_validate_json(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(spec)'}: {e['msg']}" for e in exc.errors())
            raise SpecError(f"invalid worker spec: {problems}") from None
        if spec.protocol != PROTOCOL_VERSION:
            raise SpecError(f"the spec is for protocol {spec.protocol}, this worker speaks {PROTOCOL_VERSION}")
        return spec
