"""A base quantized with bitsandbytes onto its one device: as it was trained (quantized, on a CUDA GPU), or on
dequantized weights where the recipe asks (contract/quantization.py says which, and refuses what cannot be done);
and the tensors bitsandbytes' layers hold beside their parameters, which the placement check must see too.

transformers' own reader loads it (its bitsandbytes path: packed weights as saved, full-precision ones quantized as
they load by the settings the config records); the staged reader builds a model from a plain state dict, which
packed weights are not. The device map stays one device, never "auto".
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from contract.checkpoint import CheckpointError
from contract.quantization import Quantization, recipe_quantization, refusal
from contract.recipe import Recipe
from contract.spec import ChainLink
from worker.device import Device
from worker.errors import WorkerError

_QUANTIZED_LAYERS = ("Linear4bit", "Linear8bitLt")  # bitsandbytes.nn's layers that hold quantized weights
_PACKED_PARAMS = ("Params4bit", "Int8Params")  # their weights (a 4-bit one may be stored in a floating dtype)


def check_quantization(root: ChainLink, recipe: Recipe, device: Device) -> Quantization | None:
    """The root's quantization as the recipe evaluates it (None: not quantized), or this recipe's config error
    saying what to install or set. The parent checked the same before launch; checked again where the worker runs
    (a Ray node; a bitsandbytes that is installed but does not import)."""
    try:
        quantization = recipe_quantization(Path(root.path), recipe)
    except CheckpointError as exc:
        raise WorkerError("lineage", str(exc)) from None
    if quantization is None:
        return None
    on = torch.device(device.tensors).type
    reason = refusal(quantization, device=on, bitsandbytes=bitsandbytes_importable())
    if reason is not None:
        raise WorkerError("config", reason)
    return quantization


def bitsandbytes_importable() -> bool:
    """Whether bitsandbytes imports here; why not goes to the worker's log."""
    try:
        importlib.import_module("bitsandbytes")
    except Exception as exc:  # not installed, or its native library failed to load
        print(f"evalorch worker: bitsandbytes does not import ({type(exc).__name__}: {exc})", file=sys.stderr)
        return False
    return True


def without_quantization(config: Any) -> dict[str, Any]:
    """Take the quantization_config off a loaded config, so that transformers reads its weights as stored; returns
    the settings it had."""
    settings = dict(config.quantization_config)
    del config.quantization_config
    return settings


def load_quantized(cls: Any, folder: str, quantization: Quantization, common: dict[str, Any],
                   allow_pickle: bool) -> tuple[Any, dict[str, Any]]:
    """The quantized base on common's one device through transformers' bitsandbytes path: packed weights loaded
    as saved, full-precision ones quantized as they load by the config's own settings; dequantized on the device
    afterwards where the recipe asks. Returns the model and what the `loaded` message says of it: the layers it
    evaluates with quantized (none once dequantized), and those it dequantized."""
    from transformers import BitsAndBytesConfig

    kwargs = dict(common)
    if not quantization.packed:  # from_pretrained quantizes only what a quantization_config argument asks for
        settings = quantization.bnb_config() if quantization.requested else without_quantization(common["config"])
        kwargs["quantization_config"] = BitsAndBytesConfig.from_dict(settings)
    model = cls.from_pretrained(folder, use_safetensors=None if allow_pickle else True, **kwargs)
    record = {**quantization.model_dump(include={"method", "bits", "quant_type", "compute_dtype", "dequantized",
                                                 "requested"}),
              "quantized_modules": quantized_modules(model)}
    if quantization.dequantized:
        model = model.dequantize(dtype=common["dtype"])
        record |= {"dequantized_modules": record["quantized_modules"], "quantized_modules": quantized_modules(model)}
    record["cast_parameters"] = parameters_in_dtype(model, common["dtype"])
    return model, {"loader": "transformers", "quantization": record}


def parameters_in_dtype(model: Any, dtype: torch.dtype) -> int:
    """Every floating parameter in the run's dtype but bitsandbytes' packed weights and the modules the model keeps
    in float32: transformers' bitsandbytes path leaves the tensors it does not quantize (norms, embeddings, the
    head) as the checkpoint stores them, whatever dtype it is asked for, and a model of mixed dtypes fails its first
    layer norm. Buffers (rotary frequencies) stay as built, as every other load leaves them. Returns how many were
    cast."""
    kept = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    cast = 0
    for name, param in model.named_parameters():
        if (not param.dtype.is_floating_point or param.dtype == dtype or type(param).__name__ in _PACKED_PARAMS
                or any(part in name.split(".") for part in kept)):
            continue
        param.data = param.data.to(dtype)
        cast += 1
    return cast


def quantized_modules(model: Any) -> int:
    """How many of the model's layers hold bitsandbytes-quantized weights."""
    return sum(type(module).__name__ in _QUANTIZED_LAYERS and type(module).__module__.startswith("bitsandbytes")
               for module in model.modules())


def quantization_tensors(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors bitsandbytes keeps beside its layers' parameters, which named_parameters and named_buffers do not
    list: a 4-bit weight's quant_state (absmax, code, and the nested state of double quant), an 8-bit weight's row
    scales (SCB) and int8 copy (CB). An offloaded one would be as wrong as an offloaded weight."""
    for name, param in model.named_parameters():
        state = getattr(param, "quant_state", None)
        for level, part in ((state, "quant_state"), (getattr(state, "state2", None), "quant_state.state2")):
            for field in ("absmax", "code"):
                tensor = getattr(level, field, None)
                if isinstance(tensor, torch.Tensor):
                    yield f"{name}.{part}.{field}", tensor
        for field in ("SCB", "CB"):
            tensor = getattr(param, field, None)
            if isinstance(tensor, torch.Tensor):
                yield f"{name}.{field}", tensor
