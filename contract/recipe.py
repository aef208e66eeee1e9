"""The recipe settings: one closed schema (pydantic) that the parent validates from recipes.toml and the
worker validates again from its spec, and what each "auto" value means on a device.

Reading the recipe file itself ([defaults] merged in, paths made absolute, every problem collected) is the
parent's: orchestrator/planning/recipes.py.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from .boxes import AUTO, BOX_FORMATS
from .layout import reserved_name
from .samples import template_fields

# A decode step of a 7B model costs about the same at batch 1 and 256 on a GPU (generate's per-step host work and
# syncs, not the GPU, set it), so per-sample time keeps falling with the batch up to 256. The preflight lowers it to
# what fits, and to the dataset's size.
AUTO_BATCH_CAP = 256
UNCHECKED_AUTO_BATCH = 8  # "auto" without a GPU preflight to size it (CPU runs, no estimate)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# A swept checkpoint's recipe is named <recipe>@<step>, or <recipe>@final for the adapter a trainer writes at its
# output folder's root (orchestrator/planning/sweep.py): '@' appears in no name a recipe file may give
CHECKPOINT_MARK = "@"
FINAL = "final"
# `checkpoints`: "all", "last", or the steps (checkpoint-N's N, and "final"); None: the one model `model` names
Checkpoints = Literal["all", "last"] | list[int | Literal["final"]] | None
_CHECKPOINT_NAME = re.compile(rf"^(?P<sweep>[A-Za-z0-9][A-Za-z0-9._-]*){CHECKPOINT_MARK}(?P<label>\d+|{FINAL})$")


class Settings(BaseModel):
    """What [defaults] may set, and every recipe may override."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str | None = None
    prompt: str = "{prompt}"
    box_format: str = Field(AUTO, description="how the model writes a box (contract/boxes.py); auto: the native "
                            "format of the root checkpoint's family (config.json model_type), resolved by the parent")
    max_new_tokens: int = Field(64, gt=0, le=8192)
    batch_size: int | Literal["auto"] = Field("auto", description="samples per generate; auto: the largest the "
                                            "GPU's free memory allows (at most 256), or 8 without a GPU preflight")
    min_new_tokens: int | None = Field(None, ge=0, description="force at least this many new tokens (benchmarks)")
    max_prompt_tokens: int = Field(4096, gt=0, le=1_000_000, description="the most tokens one sample's prompt text "
                                   "(with its chat template, before the image's tokens) may take: a longer one is "
                                   "that sample's error, found before any batch holds it")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    attn: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    limit: int | None = Field(None, gt=0, description="evaluate only the first N samples (after ids and sample)")
    dataset_format: Literal["auto", "jsonl", "coco", "parquet", "arrow"] = Field(
        "auto", description="the reader; auto: from what `dataset` names (contract/dataset.py)")
    bbox_format: Literal["xyxy", "xywh"] | None = Field(
        None, description="how the dataset stores boxes; default: the format's own (xywh for COCO and RefCOCO, "
        "xyxy otherwise). Sample records always carry xyxy pixels")
    exif: Literal["apply", "ignore"] = Field(
        "apply", description="apply: read images upright by their EXIF orientation, as people, annotation tools "
        "and transformers' load_image see them; ignore: as the pixels are stored")
    image_root: str | None = Field(None, description="the folder image paths are relative to; default: the "
                                   "dataset file's folder")
    ids: list[str | int] | str | None = Field(None, description="evaluate only these ids: a list, or a file of "
                                              "ids, one a line")
    sample: int | None = Field(None, gt=0, description="evaluate N samples drawn at random, the same on every run "
                               "for a given seed")
    seed: int = Field(0, description="the seed of `sample`")
    timeout: float | None = Field(None, gt=0, description="seconds for the whole recipe")
    startup_timeout: float = Field(300.0, gt=0, description="seconds from spawn to the worker's hello")
    load_timeout: float = Field(1800.0, gt=0, description="seconds from hello to weights loaded")
    stall_timeout: float = Field(900.0, gt=0, description="seconds without a message once samples run")
    retries: int = Field(0, ge=0, le=10, description="re-runs after a crash, a kill or a timeout")
    retry_backoff: float = Field(5.0, ge=0, description="seconds before the first retry; doubles each time")
    memory_margin: float = Field(0.10, ge=0, le=1, description="safety margin on the memory estimate (0.1 = 10%)")
    loader: Literal["staged", "transformers"] = Field(
        "staged", description="staged: threads read safetensors through pinned buffers onto the device; "
        "transformers: its own from_pretrained reads (slower on a GPU; a fallback for checkpoints staging can't read)")
    decode_attention: Literal["kvcache", "transformers"] = Field(
        "kvcache", description="with flash_attention_2, how a decode step attends over the batch's left-padded "
        "cache: kvcache, flash-attn's kvcache kernel reads it in place (worker/decode/); transformers, "
        "its own path, which copies the cache without its padding at every layer and waits for the GPU twice a "
        "layer")
    decode_graph: bool = Field(
        True, description="with decode_attention = kvcache on a GPU, replay each batch's decode steps from a CUDA "
        "graph recorded at its first step (worker/decode/graph_decode.py): the host no longer launches every kernel of "
        "every step; a batch whose recorded step is not bitwise the eager one goes on eagerly, and the report "
        "says so")
    merge_adapters: bool = Field(False, description="merge the top adapter into the weights too, as the lower ones "
                                 "always are: decoding runs as fast as the base model's, while the results may "
                                 "differ from the unmerged adapter's in the last bits (bf16 rounding of W + BA)")
    max_sample_errors: int | float = Field(0, description="the most samples that may error (an unreadable image, a "
                                           "bad dataset line) with the recipe still passing: a count, or a fraction "
                                           "of its samples such as 0.02; above it the recipe fails (exit 1)")
    parity_check: int = Field(8, ge=0, le=4096, description="check this many samples of the first batch again "
                              "one at a time against their batched answers (0: off): teacher-forced (agreeing exactly, "
                              "or at ties within the logits' rounding), and generated alone where that "
                              "disagrees (inference/parity.py); a disagreement is a warning naming the samples")
    parity_generate: int = Field(2, ge=0, le=4096, description="the most samples the parity check generates "
                                 "alone, where teacher forcing does not confirm the batched answer (a gap wider than "
                                 "a tie); beyond it such samples are recorded as unsettled (where the forced pass "
                                 "differed, and by how much), "
                                 "never as agreeing: the check's cost is one forward pass per sample and this many "
                                 "decodes, whatever the weights")
    dequantize: bool = Field(False, description="a base quantized with bitsandbytes (a quantization_config in its "
                             "config.json: QLoRA's, Unsloth's -bnb-4bit) is evaluated quantized, as it was trained, "
                             "which needs a CUDA GPU and bitsandbytes (pip install evalorch[quant]); true: evaluate it "
                             "on dequantized weights instead, on any device (packed weights unpacked with "
                             "bitsandbytes, full-precision ones read as stored), recorded in the row, with numbers "
                             "that will differ from the quantized base's. No effect on a base that is not quantized")
    quantize: Literal["nf4", "fp4", "int8"] | None = Field(None, description="a QLoRA adapter trained on a "
                                                          "full-precision base that its trainer quantized as it "
                                                          "loaded (its config.json records no quantization_config): "
                                                          "quantize the base the same way, with bitsandbytes as it "
                                                          "loads: 4-bit nf4 or fp4 (double quant, computing in "
                                                          "bfloat16, QLoRA's and Unsloth's settings) or 8-bit int8 "
                                                          "(LLM.int8()); recorded in the row. Needs a CUDA GPU and "
                                                          "bitsandbytes. Unset: the base is evaluated as its files "
                                                          "say (a base whose config.json records a quantization is "
                                                          "evaluated by it, and must not set this)")
    image_min_pixels: int | None = Field(None, gt=0, description="the fewest pixels the adapter's trainer "
                                         "enlarged training images to before its processor, where its folder does "
                                         "not record it (see image_max_pixels)")
    image_max_pixels: int | None = Field(None, gt=0, description="the most pixels the adapter's trainer shrank "
                                         "training images to before its processor, where its folder does not record "
                                         "it: a LLaMA-Factory command-line run that set image_max_pixels (evalorch "
                                         "otherwise assumes LLaMA-Factory's default, 768*768, and says so), or any "
                                         "trainer that resized within pixel bounds (applied as Qwen-VL's processor "
                                         "resizes). Each image is resized so before the processor, as in training")
    trust_remote_code: bool = False
    allow_pickle: bool = False
    image_cache: bool = Field(False, description="keep each sample's processor output on disk (in cache_dir/"
                              "preprocessed), shared by every recipe whose processor has the same settings; off by "
                              "default: entries are large (float32 pixels), never evicted, and batch preparation "
                              "already runs ahead of the GPU")
    cache_dir: str | None = Field(None, description="evalorch's cache folder; default $EVALORCH_CACHE, else "
                                  "$XDG_CACHE_HOME/evalorch, else ~/.cache/evalorch")

    @field_validator("min_new_tokens")
    @classmethod
    def _at_most_the_maximum(cls, value: int | None, info: ValidationInfo) -> int | None:
        most = info.data.get("max_new_tokens")
        if value is not None and isinstance(most, int) and value > most:
            raise ValueError(f"{value} is more than max_new_tokens ({most}): generation stops at the maximum")
        return value

    @field_validator("box_format")
    @classmethod
    def _known_box_format(cls, value: str) -> str:
        if value != AUTO and value not in BOX_FORMATS:
            raise ValueError(f"unknown box format {value!r}; known: auto, {', '.join(BOX_FORMATS)}")
        return value

    @field_validator("quantize")
    @classmethod
    def _not_with_dequantize(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("dequantize"):
            raise ValueError("cannot be set with dequantize = true: quantize evaluates a full-precision base quantized "
                             "as its adapter was trained, dequantize a quantized base in full precision")
        return value

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 0 < value <= 4096:
            raise ValueError("must be between 1 and 4096, or \"auto\"")
        return value

    @field_validator("max_sample_errors")
    @classmethod
    def _count_or_fraction(cls, value: int | float) -> int | float:
        if isinstance(value, bool) or (isinstance(value, int) and value < 0):
            raise ValueError("must be a count of samples (0 or more) or a fraction between 0 and 1")
        if isinstance(value, float) and not 0 < value < 1:
            raise ValueError("a fraction must lie between 0 and 1 (0.02: 2% of the samples); for a count, give "
                             "a whole number")
        return value

    @property
    def image_bounds(self) -> tuple[int | None, int | None]:
        """(image_min_pixels, image_max_pixels): the training resize's bounds the recipe states."""
        return self.image_min_pixels, self.image_max_pixels

    @property
    def requested_batch(self) -> int:
        """The batch size to aim for: the recipe's, or for "auto" the cap the preflight may lower to fit."""
        return AUTO_BATCH_CAP if self.batch_size == "auto" else self.batch_size

    @field_validator("prompt")
    @classmethod
    def _prompt_fields(cls, value: str) -> str:
        template_fields(value)  # ValueError: not a template, or more than plain names; the fields are the dataset's
        return value

    @field_validator("ids")
    @classmethod
    def _ids_as_text(cls, value: list[str | int] | str | None) -> list[str] | str | None:
        if isinstance(value, list):
            if not value:
                raise ValueError("an empty list selects nothing")
            return [str(v) for v in value]
        return value


class Recipe(Settings):
    """One model to evaluate."""

    name: str
    model: str
    base: str | None = None
    base_override: bool = False
    baseline: bool = False
    checkpoints: Checkpoints = Field(
        None, description="with `model` a training output folder (checkpoint-N/ inside; docs/trainers.md): evaluate "
        "its checkpoints, each as a recipe of its own named <name>@<step> (<name>@final: the adapter at the folder's "
        "root): \"all\", \"last\" (the highest step), or a list of steps (\"final\" among them); default: the one "
        "model `model` names")

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, value: str) -> str:
        swept = split_checkpoint_name(value)
        if not _NAME.match(swept[0] if swept else value):
            raise ValueError("use letters, digits, '.', '_' and '-' (it names a folder)")
        clash = reserved_name(value)
        if clash is not None:
            raise ValueError(f"{value!r} cannot name a recipe: {clash}; choose another name")
        return value

    @field_validator("checkpoints")
    @classmethod
    def _steps_listed_once(cls, value: Checkpoints) -> Checkpoints:
        if isinstance(value, list):
            if not value:
                raise ValueError("an empty list selects no checkpoint")
            if any(isinstance(step, int) and step < 0 for step in value):
                raise ValueError("a step is a checkpoint-N folder's N (0 or more)")
            if len(set(value)) != len(value):
                raise ValueError("a step is listed twice")
        return value


def checkpoint_name(sweep: str, label: str) -> str:
    """The name of a swept checkpoint's recipe: 'lora@400', 'lora@final'."""
    return f"{sweep}{CHECKPOINT_MARK}{label}"


def split_checkpoint_name(name: str) -> tuple[str, str] | None:
    """('lora', '400') for 'lora@400', ('lora', 'final') for 'lora@final'; None for a recipe not swept."""
    found = _CHECKPOINT_NAME.match(name)
    return (found["sweep"], found["label"]) if found else None


def run_dtype(dtype: str, device: str) -> str:
    """The dtype a recipe runs in: "auto" is bfloat16 on CUDA, float32 on the CPU."""
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype


def run_attn(attn: str, device: str) -> str:
    """The attention a recipe runs with: "auto" is flash_attention_2 on CUDA, sdpa on the CPU."""
    if attn == "auto":
        return "flash_attention_2" if device.startswith("cuda") else "sdpa"
    return attn
