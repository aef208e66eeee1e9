"""Loading exactly the resolved chain onto exactly one device, and proving nothing landed elsewhere.

The model class comes from the checkpoint's config, never from a hard-coded family. The placement is an
explicit single-device map (never "auto", which silently offloads to the CPU when memory is short: the seed's
"q must be on CUDA" failure), and every parameter and buffer is checked after loading.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import PeftModel
from peft.utils import ModulesToSaveWrapper
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    GenerationConfig,
    PreTrainedModel,
)
from transformers.models.auto.auto_factory import _BaseAutoModelClass

from contract.messages import DECODE_GRAPH_ON
from contract.recipe import Recipe, run_attn
from contract.spec import ChainLink
from worker.decode import decode_attention, graph_decode
from worker.device import Device
from worker.errors import WorkerError
from worker.loading.chain_files import reading
from worker.loading.default_dtype import building_modules
from worker.loading.processor import load_processor
from worker.loading.quantized import check_quantization, load_quantized, quantization_tensors, without_quantization
from worker.loading.weights import UnstageableError, load_safetensors, resolve_dtype, root_weight_files


def resolve_attn(name: str, device: Device) -> str:
    """flash_attention_2 on CUDA by default, sdpa on the CPU; a missing flash-attn is a clear error."""
    attn = run_attn(name, device.settings)
    if attn == "flash_attention_2":
        if device.settings != "cuda":
            raise WorkerError("config", "attn = 'flash_attention_2' needs a CUDA device; use 'sdpa' with --device cpu")
        if importlib.util.find_spec("flash_attn") is None:
            raise WorkerError(
                "config",
                "flash-attn is not installed in the worker's environment: `pip install flash-attn "
                "--no-build-isolation` (or `pip install evalorch[flash]`), or set attn = \"sdpa\" in the recipe",
            )
    return attn


def model_class(config: Any) -> type[PreTrainedModel] | type[_BaseAutoModelClass]:
    """The class the checkpoint's config names, where transformers has it; else the image-text-to-text auto class."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return AutoModelForImageTextToText


def load_chain(chain: list[ChainLink], recipe: Recipe, device: Device,
               processor: Any = None) -> tuple[Any, Any, dict]:
    """The chain's model (root, then each adapter in order), its processor (loaded here unless given: a worker
    loads it first, to prepare batches meanwhile), and what the `loaded` message says."""
    started = time.perf_counter()
    dtype = resolve_dtype(recipe.dtype, device)
    attn = resolve_attn(recipe.attn, device)
    root, adapters = chain[0], chain[1:]
    phases = {"cuda_init_s": device.start()}
    model, how = load_root(root, recipe, device, dtype, attn)
    phases["root_s"] = time.perf_counter() - started - phases["cuda_init_s"]
    model, resized = apply_adapters(model, adapters, merge_top=recipe.merge_adapters)
    model.eval()
    check_placement(model, device.tensors)
    phases["adapters_s"] = time.perf_counter() - started - phases["cuda_init_s"] - phases["root_s"]
    processor = processor or load_processor(chain, recipe)
    decode = _route_decode_attention(attn, recipe.decode_attention, device)
    graphs = _attach_decode_graph(model, device, decode, recipe.decode_graph)
    memory = device.memory()
    return model, processor, {
        **phases,
        "seconds": time.perf_counter() - started,
        "attn": getattr(model.config, "_attn_implementation", attn),
        "decode_attention": decode,
        "decode_graph": graphs,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device.tensors,
        "placement_ok": True,
        "model_class": type(_unwrap(model)).__name__,
        "bytes_allocated": memory.allocated_bytes,
        # the load's own peak: a transient copy of the weights shows here, not in bytes_allocated
        "peak_bytes": memory.peak_bytes,
        "embeddings_resized": resized,  # adapters whose embeddings had other rows than the model beneath
        **how,
    }


def _route_decode_attention(attn: str, requested: str, device: Device) -> str:
    """Which way this worker's decode steps attend: the device's kvcache kernel (flash-attn's on a GPU) where the
    recipe asks for it (the default) and the attention in use is the one that kernel stands in for, else
    transformers' own function."""
    if attn != device.kvcache_attention or requested != decode_attention.KVCACHE:
        return decode_attention.TRANSFORMERS
    kernel = device.kvcache_kernel()
    if kernel is None or not decode_attention.install(attn, kernel, device.kvcache_dtypes):
        return f"{decode_attention.TRANSFORMERS} (this flash-attn has no kvcache kernel with cache_leftpad)"
    return decode_attention.KVCACHE


def _attach_decode_graph(model: Any, device: Device, decode: str, requested: bool) -> str:
    """Whether this worker's decode steps replay from CUDA graphs (worker/decode/graph_decode.py): on a GPU, over the
    kvcache kernel's attention, unless the recipe turns it off."""
    if not requested:
        return "off (decode_graph = false)"
    recorder = device.graph_recorder()
    if recorder is None or decode != decode_attention.KVCACHE:
        return "off (needs a GPU and decode_attention = kvcache)"
    reason = graph_decode.attach(model, recorder)
    return DECODE_GRAPH_ON if reason is None else f"off ({reason})"


def load_root(root: ChainLink, recipe: Recipe, device: Device, dtype: torch.dtype, attn: str) -> tuple[Any, dict]:
    """The root checkpoint on `device`, and how it was read (for the `loaded` message). A base quantized with
    bitsandbytes goes through worker/loading/quantized.py, as it was trained or dequantized as the recipe asks."""
    trust = recipe.trust_remote_code
    with reading(root.path, "its config"):
        config = AutoConfig.from_pretrained(root.path, trust_remote_code=trust)
    common = {"config": config, "dtype": dtype, "attn_implementation": attn, "trust_remote_code": trust,
              "device_map": {"": device.tensors}}  # one device, all of it: never "auto"
    quantization = check_quantization(root, recipe, device)
    if quantization is not None and (quantization.packed or not quantization.dequantized):
        with reading(root.path, "its quantized weights"), building_modules():
            return load_quantized(model_class(config), root.path, quantization, common, recipe.allow_pickle)
    if quantization is not None:  # dequantized full-precision weights: read as stored, by either reader
        without_quantization(config)
    files = root_weight_files(root.path)
    cls = concrete_class(model_class(config), config)
    # pickles (allowed by the recipe), remote code (it may not build from a state dict) and unknown auto-class
    # entries are read by transformers itself
    if recipe.loader == "staged" and files and cls is not None and not trust:
        try:
            return _load_staged(cls, files, root.path, common, device)
        except UnstageableError as exc:
            print(f"evalorch worker: staged loading not possible ({exc}); using transformers' reader", flush=True)
    with reading(root.path, "its weights"), building_modules():
        model = model_class(config).from_pretrained(root.path, use_safetensors=None if recipe.allow_pickle else True,
                                                    **common)
    return model, {"loader": "transformers"}


def _load_staged(cls: type[PreTrainedModel], files: list[Path], folder: str, common: dict,
                 device: Device) -> tuple[Any, dict]:
    """Weights through worker/loading/weights.py's pinned staging, the model built from them by transformers."""
    started = time.perf_counter()
    with reading(folder, "its weights"):
        weights = load_safetensors(files, device, common["dtype"])
    read_s = time.perf_counter() - started
    try:
        with reading(folder, "its weights"), without_allocator_warmup(), building_modules():
            model = cls.from_pretrained(None, state_dict=weights.state_dict, **common)
    finally:
        weights.close()
    with reading(folder, "generation_config.json"):
        _attach_generation_config(model, folder)
    return model, {"loader": "staged", "staged_bytes": weights.fast_bytes, "staged_s": read_s,
                   "converted_tensors": len(weights.lazy_names)}


@contextmanager
def without_allocator_warmup() -> Iterator[None]:
    """from_pretrained first reserves the whole model's size on the GPU in one block, so that its own reader's
    copies find the allocator warm. The staged weights are already on the GPU, so that block was a second copy of
    the weights: a load peak of twice the weights (H200: Qwen2.5-VL 3B 13.89 GiB for 6.99 GiB of weights, kept by
    the allocator's cache and so in NVML's figure). Here it is skipped; transformers' own reader keeps it."""
    import transformers.modeling_utils as modeling_utils

    original = getattr(modeling_utils, "caching_allocator_warmup", None)
    if original is None:  # a transformers without the warmup: nothing to skip
        yield
        return
    modeling_utils.caching_allocator_warmup = lambda *args, **kwargs: None
    try:
        yield
    finally:
        modeling_utils.caching_allocator_warmup = original


def concrete_class(cls: type[PreTrainedModel] | type[_BaseAutoModelClass],
                   config: Any) -> type[PreTrainedModel] | None:
    """The model class itself: an auto class resolves the config's class only when given a folder, and
    from_pretrained(state_dict=...) has none. None where the auto class has no entry for this config."""
    if not issubclass(cls, _BaseAutoModelClass):
        return cls
    mapping = cls._model_mapping  # each auto class's own (None only on their common base)
    try:
        return mapping[type(config)] if mapping is not None else None
    except KeyError:
        return None


def _attach_generation_config(model: Any, folder: str) -> None:
    """from_pretrained(state_dict=...) has no folder to read generation_config.json from: read it as it would."""
    if (Path(folder) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)


def apply_adapters(model: Any, adapters: list[ChainLink], *,
                    merge_top: bool = False) -> tuple[Any, list[dict[str, Any]]]:
    """Apply adapters bottom-up. Each lower adapter is merged into the weights before the next one is applied:
    the upper adapter was trained on a model whose weights included the lower one, and merging reproduces
    exactly that, while keeping one PEFT wrapper (stacked wrappers would need named multi-adapter handling).
    The top adapter stays unmerged, so its LoRA weights are what the recipe evaluates, unless the recipe asks
    for `merge_adapters` (unmerged LoRA adds small matmuls to every adapted layer at every decode step).
    An adapter trained on a resized vocabulary gets the model's embeddings resized to its rows first; returns the
    model and each such resize."""
    resized = []
    for index, link in enumerate(adapters):
        if link.embedding_rows is not None:
            resized += _resize_embeddings(model, link)
        # low_cpu_mem_usage: the LoRA weights are created empty and filled from the file, not initialised first
        with reading(link.path, "the adapter"), building_modules():
            model = PeftModel.from_pretrained(model, link.path, is_trainable=False, low_cpu_mem_usage=True)
            _saved_modules_as_replaced(model)
            if index < len(adapters) - 1 or merge_top:
                model = model.merge_and_unload()
    return model, resized


def _saved_modules_as_replaced(model: Any) -> None:
    """The adapter's whole saved modules (`modules_to_save`: embed_tokens, lm_head, a head) in the dtype of the
    modules they replace. peft assigns them as the file stores them (low_cpu_mem_usage loads with assign=True), most
    often float32, and a float32 lm_head under a bfloat16 model fails ("mat1 and mat2 must have the same dtype") on
    the GPU only, where the model is not float32."""
    for wrapper in model.modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        dtypes = {p.dtype for p in wrapper.original_module.parameters() if p.is_floating_point()}
        if len(dtypes) != 1:
            continue
        (dtype,) = dtypes
        for saved in wrapper.modules_to_save.values():
            for tensor in saved.parameters():
                if tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor.data = tensor.data.to(dtype)


def _resize_embeddings(model: Any, link: ChainLink) -> list[dict[str, Any]]:
    """The model's input embedding and output head resized to the rows `link`'s saved embeddings have (the
    parent found them: orchestrator/planning/vocabulary.py), as its trainer resized them before training. Rows
    added here are never read: the adapter carries every resized module that gained rows. Resized without
    transformers' mean initialisation, which draws random rows."""
    rows = model.get_input_embeddings().weight.shape[0]
    if rows == link.embedding_rows:
        return []
    with reading(link.path, f"the model's embeddings resized to its {link.embedding_rows} rows"), building_modules():
        model.resize_token_embeddings(link.embedding_rows, mean_resizing=False)
    return [{"adapter": link.path, "from_rows": rows, "to_rows": link.embedding_rows}]


def _unwrap(model: Any) -> Any:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def check_placement(model: Any, device: str) -> None:
    """Every parameter and buffer on `device`, and every tensor bitsandbytes keeps beside a quantized layer's weight
    (its quant state, its scales); anything on cpu or meta is an offload error naming the modules."""
    want = torch.device(device).type
    stray: dict[str, str] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers(), *quantization_tensors(model)]:
        if tensor.device.type != want:
            module = name.rsplit(".", 1)[0]
            stray.setdefault(module, tensor.device.type)
    if stray:
        listed = ", ".join(f"{m} ({d})" for m, d in list(stray.items())[:10])
        more = f" and {len(stray) - 10} more" if len(stray) > 10 else ""
        raise WorkerError(
            "offload",
            f"{len(stray)} module(s) are not on {device}: {listed}{more}. The whole model must sit on one "
            "device; a partly offloaded model gives wrong or failing results (e.g. 'q must be on CUDA').",
        )
