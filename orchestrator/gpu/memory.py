"""How much GPU memory a recipe needs, read from files alone (no torch): the parent refuses or shrinks a recipe
before its worker starts, instead of finding out from an out-of-memory error, or from a silent CPU offload.

    needed = weights + adapter + KV cache + max(vision activations, language prefill) + CUDA context
    total  = needed x (1 + memory_margin)

- weights: the chain's full checkpoint, from its safetensors headers, each floating tensor in the dtype the
  recipe runs in (bfloat16 on CUDA unless the recipe says otherwise); integer tensors as stored. A base quantized
  with bitsandbytes (contract/quantization.py) as bitsandbytes holds it: packed weights and their constants as
  stored; full-precision ones it quantizes as they load at 4 or 8 bits and their constants; dequantized ones
  (`dequantize = true`) at the run's dtype.
- adapter: the top adapter's floating tensors at float32: peft upcasts half-precision adapters when it loads them.
  Lower adapters of a chain are merged into the weights before the next loads, so they add nothing. Unmerged, LoRA
  holds float32 temporaries at the widest adapted layer; DoRA (lora_magnitude_vector tensors) adds, at each layer it
  adapts, the layer's weight and its LoRA product in float32 and an identity of its input width (peft's
  DoraLinearLayer.forward: the weight norm is computed from them at every call).
- KV cache: layers x 2 x kv heads x head dim x (prompt tokens incl. image tokens + max_new_tokens) x batch x bytes.
- image tokens: each dataset image counted by its family's rule (orchestrator/gpu/image_tokens.py: Qwen's smart_resize,
  InternVL's tiles, a fixed count for PaliGemma, Gemma 3 and other fixed-size processors); an unreadable image
  counts as the largest the processor makes.
- prompt tokens: the rendered prompt's UTF-8 bytes (a byte-level BPE never makes more tokens than bytes) plus
  the chat template's tokens.
- activations: the larger of the vision encoder's (all patches of the batch's images at once: the dataset's
  largest images) and the language model's prefill (the MLP's intermediate tensors dominate); decoding one token
  at a time needs far less.
- context: a fixed allowance for the CUDA context, cuBLAS and flash-attention workspaces (on CUDA only).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Literal, overload

from contract.batching import largest_batch
from contract.checkpoint import (
    CONFIG,
    DTYPE_BYTES,
    CheckpointError,
    as_written,
    read_json_object,
    safetensors_header,
    weight_files,
)
from contract.dataset import (
    DATASET_SETTINGS,
    DatasetError,
    Sample,
    dataset_stamp,
    image_size,
    open_dataset,
    render_prompt,
)
from contract.processor import processor_settings, processor_source
from contract.quantization import Quantization, is_quant_state, packed_weight_names, recipe_quantization
from contract.recipe import Recipe, Settings, run_attn, run_dtype
from contract.spec import ChainLink
from contract.units import format_bytes
from orchestrator.gpu.image_tokens import QWEN_FAMILIES, ImageRule, image_rule

CUDA_CONTEXT_BYTES = 768 * 2**20  # CUDA context + cuBLAS/flash-attn workspaces of one worker, seen on H100s
# What torch's caching allocator holds beyond its peak of live tensors, which NVML counts: a fixed part, and a few
# samples' worth of what grows with the batch (the KV cache re-allocated as it grows, activations of changing
# sizes). The worker grows its segments in place (execution/environment.py: expandable_segments), which keeps that
# slack under a GiB. The four factors below were fitted against NVML on a GPU (Qwen2.5-VL 3B and InternVL3-2B at
# several batch sizes; docs/gpu-checks-history.md) so that the estimate without its margin is never below the
# measure and as little above it as one rule allows. Every one of those runs peaked in the language model's prefill:
# VISION_FACTOR is the most they allow, not a measured vision peak.
ALLOCATOR_FIXED_BYTES = 768 * 2**20
ALLOCATOR_SAMPLES = 4.5  # samples' worth of KV cache and activations
PREFILL_FACTOR = 0.95  # the prefill's peak, in one layer's MLP buffers and residual stream
VISION_FACTOR = 0.5  # the vision tower's peak, in the per-patch buffers vision_bytes lists
CHAT_TOKENS = 48  # a chat template around the prompt (Qwen2-VL's: system turn, role and vision markers)
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_RUN_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


class EstimateError(Exception):
    """The recipe's files do not say enough to estimate its memory; the message names the file."""


@dataclass(frozen=True)
class ModelShape:
    """The numbers of config.json that memory depends on."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    vision_embed: int = 0  # 0: no vision tower
    vision_mlp: int = 0
    vision_heads: int = 1
    patch_values: int = 3 * 2 * 14 * 14  # pixel values per patch: channels x temporal patch x patch x patch


@dataclass(frozen=True)
class Prompts:
    """The longest prompt of the dataset, in tokens, and the most image tokens of one image."""

    text_tokens: int
    image_tokens: int
    patches: int  # vision-encoder patches of that image, all its tiles together
    samples: int = 0  # how many samples the recipe evaluates (0: unknown); no batch needs to be larger
    vision_sequence: int = 0  # the longest sequence the vision tower attends over at once (one tile or picture)
    patch_counts: tuple[int, ...] = ()  # every image's patches, largest first (empty: unknown, `patches` each)

    def batch_patches(self, batch: int) -> int:
        """The most patches `batch` images of the dataset can have together: the largest ones. Counting the
        largest image `batch` times instead over-counted a mixed dataset twice over (InternVL, 1 and 13 tiles)."""
        if not self.patch_counts:
            return self.patches * batch
        return sum(self.patch_counts[:batch]) + self.patches * max(0, batch - len(self.patch_counts))


@dataclass(frozen=True)
class MemoryEstimate:
    """One recipe's memory at one batch size, part by part (bytes)."""

    dtype: str
    attn: str
    batch_size: int
    weights_bytes: int
    adapter_bytes: int
    kv_cache_bytes: int
    vision_bytes: int
    prefill_bytes: int
    context_bytes: int
    margin: float
    prompt_tokens: int  # text + image tokens of the longest prompt
    image_tokens: int
    lora_bytes: int = 0  # LoRA's float32 temporaries in the widest adapted layer during the prefill
    dora_bytes: int = 0  # DoRA's float32 copies of the widest layer it adapts, made at every call (any batch)
    lora_alongside: bool = True  # the adapted layer is an MLP's (wider than the residual): its temporaries
    # coexist with the MLP buffers of the prefill's peak; attention-only LoRA peaks apart from them
    allocator_bytes: int = 0  # the caching allocator's slack beyond the live peak (CUDA only)
    notes: tuple[str, ...] = ()

    @property
    def fixed_bytes(self) -> int:
        """What no batch size can shrink: weights, adapter, CUDA context."""
        return self.weights_bytes + self.adapter_bytes + self.context_bytes

    @property
    def activation_bytes(self) -> int:
        # the vision encoder runs first and its intermediates are freed before the language model's prefill
        adapter = self.lora_bytes + self.dora_bytes
        if self.lora_alongside:
            return max(self.vision_bytes, self.prefill_bytes) + adapter
        return max(self.vision_bytes, self.prefill_bytes, adapter)

    @property
    def needed_bytes(self) -> int:
        return self.fixed_bytes + self.kv_cache_bytes + self.activation_bytes + self.allocator_bytes

    @property
    def margin_bytes(self) -> int:
        return int(self.needed_bytes * self.margin)

    @property
    def total_bytes(self) -> int:
        return self.needed_bytes + self.margin_bytes

    def record(self) -> dict:
        """For summary.json: every part, and the totals."""
        return {**asdict(self), "notes": list(self.notes), "activation_bytes": self.activation_bytes,
                "needed_bytes": self.needed_bytes, "margin_bytes": self.margin_bytes, "total_bytes": self.total_bytes}

    def describe(self) -> str:
        parts = [("weights", self.weights_bytes), ("adapter", self.adapter_bytes), ("KV", self.kv_cache_bytes),
                 ("activations", self.activation_bytes), ("allocator cache", self.allocator_bytes),
                 ("context", self.context_bytes),
                 (f"margin {self.margin:.0%}", self.margin_bytes)]
        listed = " + ".join(f"{name} {format_bytes(value)}" for name, value in parts if value)
        images = f", {self.image_tokens} image tokens per image at most" if self.image_tokens else ""
        return (f"{format_bytes(self.total_bytes)} = {listed} ({self.dtype}, {self.attn}, batch {self.batch_size}"
                f"{images})")


@dataclass(frozen=True)
class Workload:
    """What a recipe's memory depends on, read once from its files; `estimate(batch)` is then arithmetic."""

    dtype: str
    attn: str
    weights_bytes: int
    adapter_bytes: int
    context_bytes: int
    margin: float
    max_new_tokens: int
    shape: ModelShape | None  # None: config.json lacks the fields; only weights and context are counted
    prompts: Prompts
    lora_widths: tuple[int, int] = (0, 0)  # widest in/out features the top adapter adapts: (text, vision)
    dora_bytes: int = 0  # the top adapter's DoRA temporaries (unmerged), whatever the batch
    notes: tuple[str, ...] = field(default=())

    def estimate(self, batch_size: int) -> MemoryEstimate:
        """At the largest batch the worker will form at `batch_size` (recorded as the estimate's batch_size)."""
        batch_size = largest_batch(self.prompts.samples, batch_size)
        dtype_bytes = _RUN_BYTES[self.dtype]
        kv = vision = prefill = 0
        if self.shape is not None:
            kv = kv_cache_bytes(self.shape, self.prompts, self.max_new_tokens, batch_size, dtype_bytes)
            vision = vision_bytes(self.shape, self.prompts, batch_size, dtype_bytes, self.attn)
            prefill = prefill_bytes(self.shape, self.prompts, batch_size, dtype_bytes, self.attn)
        estimate = MemoryEstimate(
            lora_bytes=lora_temporary_bytes(self.lora_widths, self.prompts, batch_size), dora_bytes=self.dora_bytes,
            lora_alongside=self.shape is None or lora_beside_mlp(self.shape, self.lora_widths),
            dtype=self.dtype, attn=self.attn, batch_size=batch_size, weights_bytes=self.weights_bytes,
            adapter_bytes=self.adapter_bytes, kv_cache_bytes=kv, vision_bytes=vision, prefill_bytes=prefill,
            context_bytes=self.context_bytes, margin=self.margin,
            prompt_tokens=self.prompts.text_tokens + self.prompts.image_tokens,
            image_tokens=self.prompts.image_tokens, notes=self.notes,
        )
        if not self.context_bytes:  # no CUDA: no caching allocator
            return estimate
        live = estimate.kv_cache_bytes + estimate.activation_bytes
        per_sample = live // max(1, estimate.batch_size)
        return replace(estimate, allocator_bytes=ALLOCATOR_FIXED_BYTES + int(ALLOCATOR_SAMPLES * per_sample))


def estimate_recipe(recipe: Recipe, chain: list[ChainLink], device: str,
                    batch_size: int | None = None) -> MemoryEstimate:
    """The recipe's memory on `device` ("cuda" or "cpu") at its own batch size, or at `batch_size`."""
    return read_workload(recipe, chain, device).estimate(batch_size or recipe.requested_batch)


def read_workload(recipe: Recipe, chain: list[ChainLink], device: str) -> Workload:
    """Read the chain's headers and configs and the dataset's prompts and image sizes; raise EstimateError (a
    damaged checkpoint file included: its message names the file)."""
    try:
        return _read_workload(recipe, chain, device)
    except CheckpointError as exc:
        raise EstimateError(str(exc)) from None


def _read_workload(recipe: Recipe, chain: list[ChainLink], device: str) -> Workload:
    dtype = run_dtype(recipe.dtype, device)
    root, adapters = chain[0], chain[1:]
    notes: list[str] = []
    config = _read_json(Path(root.path) / CONFIG)
    shape = model_shape(config, str(Path(root.path) / CONFIG))
    if shape is None:
        notes.append("config.json has no text-model sizes: KV cache and activations not counted")
    processor = processor_settings(Path(processor_source([link.path for link in chain], recipe.image_bounds).path))
    quantization = recipe_quantization(Path(root.path), recipe)
    try:  # the rules read many processor and vision settings: a mistyped one is the checkpoint's damage
        rule = image_rule(config, processor)
        if rule is not None:
            rule.count(None)
    except (TypeError, AttributeError, ValueError, KeyError, OverflowError, ZeroDivisionError) as exc:
        raise EstimateError(f"{root.path}: a processor or vision setting has a value of the wrong kind ({exc!r}); "
                            "restore config.json and the processor files from where the model was saved") from None
    if rule is None and shape is not None and shape.vision_embed:
        notes.append(f"no image-token rule for model_type {config.get('model_type')!r}: image tokens not counted")
    return Workload(
        dtype=dtype,
        attn=run_attn(recipe.attn, device),
        weights_bytes=weights_bytes(root, _RUN_BYTES[dtype], allow_pickle=recipe.allow_pickle, notes=notes,
                                    quantization=quantization),
        adapter_bytes=adapter_bytes(adapters[-1], allow_pickle=recipe.allow_pickle) if adapters else 0,
        context_bytes=CUDA_CONTEXT_BYTES if device == "cuda" else 0,
        margin=recipe.memory_margin,
        max_new_tokens=recipe.max_new_tokens,
        shape=shape,
        prompts=read_prompts(recipe, rule, shape),
        # merged adapters run as plain weights: no LoRA temporaries (the adapter's bytes stay counted: the peak
        # of merging holds them)
        lora_widths=lora_widths(adapters[-1]) if adapters and not recipe.merge_adapters else (0, 0),
        dora_bytes=dora_temporary_bytes(adapters[-1]) if adapters and not recipe.merge_adapters else 0,
        notes=tuple(notes),
    )


def lora_widths(link: ChainLink) -> tuple[int, int]:
    """The widest input or output of the modules an adapter adapts, in the text model and in the vision tower
    (from lora_A (r, in) and lora_B (out, r) shapes in the safetensors header)."""
    widths = [0, 0]
    for path in sorted(Path(link.path).glob("adapter_model*.safetensors")):
        for name, info in safetensors_header(path).tensors.items():
            if ".lora_" not in name:
                continue
            vision = "visual" in name or "vision" in name
            widths[vision] = max([widths[vision], *info["shape"]])
    return widths[0], widths[1]


def dora_temporary_bytes(link: ChainLink) -> int:
    """What DoRA holds at once in the widest layer it adapts (in x out), in float32 (peft's DoraLinearLayer, at every
    call): first an identity of in x in that its LoRA product (in x out) is computed through, then that product, the
    layer's weight cast to float32, the product scaled, and their sum whose norm it takes. 0 for an adapter without
    DoRA's magnitude vectors."""
    shapes: dict[str, dict[str, list[int]]] = {}
    for path in sorted(Path(link.path).glob("adapter_model*.safetensors")):
        for name, info in safetensors_header(path).tensors.items():
            for part in ("lora_A", "lora_B", "lora_magnitude_vector"):
                if f".{part}" in name:
                    shapes.setdefault(name.split(f".{part}")[0], {})[part] = info["shape"]
    widest = 0
    for found in shapes.values():
        if "lora_magnitude_vector" in found and len(found.get("lora_A", ())) == 2 and len(found.get("lora_B", ())) == 2:
            width_in, width_out = found["lora_A"][1], found["lora_B"][0]
            product = width_in * width_out
            widest = max(widest, max(width_in * width_in + product, 4 * product) * 4)
    return widest


def lora_beside_mlp(shape: ModelShape, widths: tuple[int, int]) -> bool:
    """Whether the adapter adapts an MLP layer (a side wider than the residual stream), in the text model or the
    vision tower. Then its float32 temporaries are live at the MLP's peak; an attention-only LoRA's are not (H200:
    a q/v LoRA left the peak of Qwen2.5-VL and InternVL unchanged at batch 32)."""
    text_width, vision_width = widths
    return text_width > shape.hidden or (vision_width > shape.vision_embed > 0)


def lora_temporary_bytes(widths: tuple[int, int], prompts: Prompts, batch: int) -> int:
    """peft computes LoRA in the adapter's float32: at the widest adapted layer it holds a float32 copy of the
    input and a float32 output for every token (text) or patch (vision), which is what a LoRA on a 7B's MLP was
    measured to add on a GPU."""
    text_width, vision_width = widths
    text = (prompts.text_tokens + prompts.image_tokens) * text_width
    return max(batch * text, prompts.batch_patches(batch) * vision_width) * 8


def weights_bytes(link: ChainLink, run_bytes: int, *, allow_pickle: bool, notes: list[str] | None = None,
                  quantization: Quantization | None = None) -> int:
    """A full checkpoint's bytes once loaded: floating tensors at `run_bytes` each, the others as stored; a
    quantized base's as bitsandbytes holds them (quantized_bytes)."""
    total = 0
    for path in weight_files(Path(link.path), "full", allow_pickle=allow_pickle):
        if path.suffix != ".safetensors":  # a pickle has no header to read: its size on disk is the best guess
            total += path.stat().st_size
            if notes is not None:
                notes.append(f"{path.name}: pickle weights counted at their file size")
            continue
        if quantization is None:
            total += _tensor_bytes(path, lambda dtype: run_bytes if dtype in _FLOAT_DTYPES else DTYPE_BYTES[dtype])
        else:
            total += quantized_bytes(path, quantization, run_bytes)
    if quantization is not None and notes is not None:
        notes.append(f"weights: {quantization.describe()}, {quantization.evaluated()}")
    return total


BNB_BLOCK = 64  # elements per absmax constant of bitsandbytes' 4-bit weights
BNB_NESTED_BLOCK = 256  # absmax constants per nested constant (double quant)


def quantized_bytes(path: Path, quantization: Quantization, run_bytes: int) -> int:
    """One safetensors file of a quantized base, as the worker holds it: packed weights and their constants as
    stored; evaluated quantized, a full-precision linear weight at its 4 or 8 bits and constants (bnb_bytes);
    evaluated dequantized, each packed weight's elements in the run's dtype besides (the worker loads it packed and
    dequantizes it on the device: its allocator keeps the packed blocks); tensors that are not quantized
    (embeddings, norms, the output head, skipped modules) at the run's dtype."""
    tensors = safetensors_header(path).tensors
    packed = packed_weight_names(tensors)
    total = 0
    for name, info in tensors.items():
        dtype, shape = info["dtype"], info["shape"]
        if dtype not in DTYPE_BYTES:
            raise EstimateError(f"{path}: tensor {name} has dtype {dtype}, which evalorch cannot size")
        elements = math.prod(shape)
        stored = elements * DTYPE_BYTES[dtype]
        if is_quant_state(name):
            total += stored
        elif name in packed:  # dequantized: 4-bit packs two elements a byte, whatever the storage dtype
            unpacked = (2 * stored if quantization.bits == 4 else elements) * run_bytes
            total += stored + (unpacked if quantization.dequantized else 0)
        elif not (quantization.packed or quantization.dequantized) and _quantized_on_load(name, shape, quantization):
            total += bnb_bytes(elements, shape[0], quantization)
        else:
            total += elements * run_bytes if dtype in _FLOAT_DTYPES else stored
    return total


def _quantized_on_load(name: str, shape: list[int], quantization: Quantization) -> bool:
    """A linear layer's weight, which transformers replaces with bitsandbytes' layer as it loads: a matrix, not an
    embedding, the output head or a module the config keeps in full precision."""
    module = name.removesuffix(".weight")
    parts = set(module.split("."))
    return (name.endswith(".weight") and len(shape) == 2 and "embed" not in module and "lm_head" not in parts
            and not any(skip in parts or module.endswith(skip) for skip in quantization.skip_modules))


def bnb_bytes(elements: int, rows: int, quantization: Quantization) -> int:
    """A weight of `elements` quantized by bitsandbytes: 4-bit, two elements a byte, a float32 absmax for each
    block of 64 and its 16-entry float32 code (with double quant, a byte for each block, and a float32 for each 256
    of them with their 256-entry code); 8-bit, a byte each and a float32 scale for each row."""
    if quantization.bits == 8:
        return elements + 4 * rows
    blocks = math.ceil(elements / BNB_BLOCK)
    if quantization.double_quant:
        constants = blocks + 4 * (math.ceil(blocks / BNB_NESTED_BLOCK) + BNB_NESTED_BLOCK)
    else:
        constants = 4 * blocks
    return math.ceil(elements / 2) + constants + 4 * 16


def adapter_bytes(link: ChainLink, *, allow_pickle: bool) -> int:
    """An adapter's bytes once loaded: floating tensors at float32 (peft upcasts fp16/bf16 adapters)."""
    total = 0
    for path in weight_files(Path(link.path), "adapter", allow_pickle=allow_pickle):
        if path.suffix != ".safetensors":
            total += path.stat().st_size
            continue
        total += _tensor_bytes(path, lambda dtype: 4 if dtype in _FLOAT_DTYPES else DTYPE_BYTES[dtype])
    return total


def _tensor_bytes(path: Path, bytes_of) -> int:
    total = 0
    for name, info in safetensors_header(path).tensors.items():
        if info["dtype"] not in DTYPE_BYTES:
            raise EstimateError(f"{path}: tensor {name} has dtype {info['dtype']}, which evalorch cannot size")
        total += math.prod(info["shape"]) * bytes_of(info["dtype"])
    return total


def model_shape(config: dict, source: str = CONFIG) -> ModelShape | None:
    """The sizes of a vision-language config: text fields nested in text_config (or flat, as Qwen2-VL's on the
    hub), the vision tower's in vision_config under either family's names (embed_dim or hidden_size, num_heads or
    num_attention_heads, a patch size given as 14 or [14, 14]); None when it lacks the text sizes. A size that is
    there but not a positive integer raises EstimateError naming `source`."""
    text = _section(config, "text_config", source) or config
    try:  # a decoder-only language model's names, else an encoder-decoder's (BART: Florence-2), its decoder's
        heads = _first_size(text, ("num_attention_heads", "decoder_attention_heads"), source)
        hidden = _first_size(text, ("hidden_size", "d_model"), source)
        layers = _first_size(text, ("num_hidden_layers", "decoder_layers"), source)
    except KeyError:
        return None
    shape = ModelShape(
        layers=layers, heads=heads, kv_heads=_size(text, "num_key_value_heads", source, heads),
        head_dim=_size(text, "head_dim", source, max(1, hidden // heads)), hidden=hidden,
        intermediate=_first_size(text, ("intermediate_size", "decoder_ffn_dim"), source, 4 * hidden),
        vocab=_size(text, "vocab_size", source, 0),
    )
    vision = _section(config, "vision_config", source)
    if not vision:
        return shape
    # Qwen2.5-VL and the others call the embedding width hidden_size; DaViT (Florence-2) has one per stage
    embed = _largest(_first_size(vision, ("embed_dim", "hidden_size"), source, 0, lists=True))
    patch_sizes = _first_size(vision, ("patch_size",), source, 14, lists=True)
    patch = patch_sizes[0] if isinstance(patch_sizes, list | tuple) else patch_sizes
    # Qwen's towers stack 2 frames per patch (their configs say so); the others see one
    temporal = _first_size(vision, ("temporal_patch_size",), source,
                           2 if config.get("model_type") in QWEN_FAMILIES else 1)
    channels = _first_size(vision, ("in_channels", "in_chans", "num_channels"), source, 3)
    ratio = vision.get("mlp_ratio", 4)
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio < 1e6:
        raise EstimateError(f"{source}: vision_config.mlp_ratio is {as_written(ratio)}, expected a positive number")
    return ModelShape(
        **{**asdict(shape), "vision_embed": embed,
           "vision_mlp": _first_size(vision, ("intermediate_size",), source, int(embed * ratio)),
           "vision_heads": _largest(_first_size(vision, ("num_heads", "num_attention_heads"), source, 1, lists=True)),
           "patch_values": channels * temporal * patch * patch},
    )


def _size(section: dict, key: str, source: str, default: int | None = None) -> int:
    """One size from a config: a positive integer (see _first_size)."""
    return _first_size(section, (key,), source, default)


def _largest(value: int | list[int]) -> int:
    return max(value) if isinstance(value, list | tuple) else value


def _section(config: dict, key: str, source: str) -> dict:
    """A nested part of a config (text_config, vision_config); {} when absent."""
    value = config.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EstimateError(f"{source}: {key} is {as_written(value)}, expected a JSON object")
    return value


@overload
def _first_size(section: dict, keys: tuple[str, ...], source: str, default: int | None = None, *,
                lists: Literal[False] = False) -> int: ...
@overload
def _first_size(section: dict, keys: tuple[str, ...], source: str, default: int | None = None, *,
                lists: Literal[True]) -> int | list[int]: ...
def _first_size(section: dict, keys: tuple[str, ...], source: str, default: int | None = None, *,
                lists: bool = False) -> int | list[int]:
    """The first of `keys` the config has, as a positive integer (or, with `lists`, a non-empty list of them:
    per-stage widths, a [14, 14] patch). Absent (or null): `default`, or KeyError when there is none."""
    for key in keys:
        value = section.get(key)
        if value is None:
            continue
        values = value if lists and isinstance(value, list | tuple) and value else [value]
        if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
            raise EstimateError(f"{source}: {key} is {as_written(value)}, expected a positive integer")
        return value
    if default is None:
        raise KeyError(keys[0])
    return default


def kv_cache_bytes(shape: ModelShape, prompts: Prompts, max_new_tokens: int, batch: int, dtype_bytes: int) -> int:
    tokens = prompts.text_tokens + prompts.image_tokens + max_new_tokens
    return shape.layers * 2 * shape.kv_heads * shape.head_dim * tokens * batch * dtype_bytes


def vision_bytes(shape: ModelShape, prompts: Prompts, batch: int, dtype_bytes: int, attn: str) -> int:
    """The vision tower runs all the batch's patches at once (the batch's images: at most the dataset's largest
    `batch`): the pixel values (float32 from the processor, and their cast), and per block the residual stream,
    q/k/v and the MLP's hidden layer before and after GELU."""
    if not shape.vision_embed:
        return 0
    patches = prompts.batch_patches(batch)
    pixels = patches * shape.patch_values * (4 + dtype_bytes)
    per_patch = (3 * shape.vision_embed + 3 * shape.vision_embed + 2 * shape.vision_mlp) * dtype_bytes
    scores = 0
    if attn != "flash_attention_2":  # without flash attention, one image's (or tile's) attention matrix is held
        scores = shape.vision_heads * (prompts.vision_sequence or prompts.patches) ** 2 * 4
    return int(VISION_FACTOR * (pixels + patches * per_patch)) + scores


def prefill_bytes(shape: ModelShape, prompts: Prompts, batch: int, dtype_bytes: int, attn: str) -> int:
    """The language model's first forward over the whole prompt: per layer, the MLP's gate, up and product
    (batch x tokens x intermediate each) and the residual stream, PREFILL_FACTOR times over (part of the previous
    layer's buffers is still live at the peak); plus last-token logits in float32. The allocator's slack beyond
    the live peak is counted apart (allocator_bytes)."""
    tokens = prompts.text_tokens + prompts.image_tokens
    per_token = int(PREFILL_FACTOR * (3 * shape.intermediate + 4 * shape.hidden) * dtype_bytes)
    scores = 0
    if attn == "eager":  # sdpa and flash attention never hold the whole score matrix
        scores = batch * shape.heads * tokens**2 * 4
    return batch * tokens * per_token + 2 * batch * shape.vocab * 4 + scores


# ----------------------------------------------------------------------------- prompts and images


def read_prompts(recipe: Recipe, rule: ImageRule | None, shape: ModelShape | None) -> Prompts:
    """The longest prompt (tokens) and the largest image (tokens, patches) of the samples the recipe evaluates,
    the image counted by its family's `rule` (None: not counted). Read once for every recipe (and every preflight
    call) that reads the same samples the same way."""
    read = _read_prompts if _hashable(rule) else _read_prompts.__wrapped__  # a rule holding a list: not cached
    try:
        found = read(recipe.model_dump_json(include=set(DATASET_SETTINGS)), dataset_stamp(recipe), rule)
    except (TypeError, ValueError) as exc:  # a rule from mistyped processor settings, met on a real image size
        raise EstimateError(f"the image-token rule {rule!r} cannot count this dataset's images ({exc})") from None
    if shape is not None and not shape.vision_embed:
        return Prompts(text_tokens=found.text_tokens, image_tokens=0, patches=0, samples=found.samples)
    return found


def _hashable(value: object) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


@lru_cache(maxsize=16)
def _read_prompts(recipe_json: str, _stamp: tuple, rule: ImageRule | None) -> Prompts:
    recipe = Settings.model_validate_json(recipe_json)
    text, tokens, sequence, samples = 0, 0, 0, 0
    patch_counts: list[int] = []
    try:
        for sample in open_dataset(recipe.dataset or "", recipe).samples(images=True):  # streamed
            samples += 1
            # a byte is at most a token; a prompt over max_prompt_tokens is its sample's error, never in a batch
            text = max(text, min(_prompt_bytes(recipe.prompt, sample) + CHAT_TOKENS, recipe.max_prompt_tokens))
            if rule is None:
                continue
            count = rule.count(image_size(sample.image, recipe.exif))
            tokens = max(tokens, count.tokens)
            patch_counts.append(count.patches)
            sequence = max(sequence, count.sequence)
    except DatasetError as exc:
        raise EstimateError(f"dataset {recipe.dataset}: {exc}") from exc
    patch_counts.sort(reverse=True)
    return Prompts(text_tokens=text or CHAT_TOKENS, image_tokens=tokens, patches=max(patch_counts, default=0),
                   samples=samples, vision_sequence=sequence, patch_counts=tuple(patch_counts))


def _prompt_bytes(template: str, sample: Sample) -> int:
    """The rendered prompt's UTF-8 bytes (the template's own, where the worker will fail to render it)."""
    try:
        return len(render_prompt(template, sample, strict=False).encode())
    except (KeyError, ValueError, IndexError):
        return len(template.encode())


def _read_json(path: Path) -> dict:
    return read_json_object(path)  # a CheckpointError becomes an EstimateError in read_workload
