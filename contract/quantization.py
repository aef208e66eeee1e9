"""A quantized base, read torch-free from its files, and whether a recipe can evaluate it on a device.

A full checkpoint whose config.json carries a `quantization_config` of bitsandbytes (4-bit NF4 or FP4, or 8-bit
LLM.int8(): what QLoRA trains on and what Unsloth's `...-bnb-4bit` checkpoints are) is evaluated as it was trained:
quantized, with bitsandbytes, on a CUDA GPU. Its weights are either packed in its safetensors (saved quantized: uint8
4-bit pairs with their absmax and quant_map, or int8 rows with their SCB scales) or stored in full precision, which
transformers quantizes as it loads. A recipe may instead ask for `dequantize = true`: the weights are evaluated
dequantized (packed ones unpacked with bitsandbytes, full-precision ones read as they are), recorded as such, and the
numbers will differ from the quantized base's. Anything else (a CPU, no bitsandbytes) is that recipe's error, saying
what to install or what to set; never an evaluation in another precision than the one asked for.

The parent reads this to plan, estimate and record; the worker reads it again to load, from the same files.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict

from .checkpoint import CONFIG, CheckpointError, as_written, read_json_object, safetensors_header, weight_files
from .recipe import Recipe

BITSANDBYTES: Final = "bitsandbytes"
INSTALL = "pip install evalorch[quant]"  # the extra that brings bitsandbytes (pyproject.toml)
DIFFERS = "its numbers will differ from the quantized base's"
# The tensors bitsandbytes saves beside a packed weight: a 4-bit one's absmax, quant_map, nested (double-quant)
# constants and its quant_state record; an 8-bit one's row scales (SCB) and weight_format
_QUANT_STATE_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB", ".weight_format")
_4BIT_STATE = ".quant_state.bitsandbytes__"  # `<weight>.quant_state.bitsandbytes__nf4` (or __fp4)


class Quantization(BaseModel):
    """A base's bitsandbytes quantization as its config.json records it, and how a recipe evaluates it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["bitsandbytes"] = BITSANDBYTES
    bits: Literal[4, 8]
    quant_type: str  # 4-bit: nf4 or fp4; 8-bit: int8 (LLM.int8())
    compute_dtype: str | None = None  # the dtype 4-bit layers compute in (bnb_4bit_compute_dtype); None for 8-bit
    double_quant: bool = False  # 4-bit: the absmax constants quantized again (bnb_4bit_use_double_quant)
    packed: bool  # its safetensors hold the packed weights; False: full precision, quantized as they load
    skip_modules: tuple[str, ...] = ()  # modules kept in full precision (llm_int8_skip_modules)
    dequantized: bool = False  # evaluated on dequantized weights (the recipe's `dequantize = true`)
    requested: bool = False  # by the recipe's `quantize`: its config.json records none (a plain QLoRA base)

    def describe(self) -> str:
        """'bitsandbytes 4-bit nf4 (double quant), compute bfloat16, packed weights'."""
        double = " (double quant)" if self.double_quant else ""
        compute = f", compute {self.compute_dtype}" if self.compute_dtype else ""
        stored = "packed weights" if self.packed else "full-precision weights quantized as they load"
        stored += " (the recipe's quantize)" if self.requested else ""
        return f"{self.method} {self.bits}-bit {self.quant_type}{double}{compute}, {stored}"

    def evaluated(self) -> str:
        """How a recipe evaluates it, for `plan`, the report and the terminal."""
        if self.dequantized and self.packed:
            return f"evaluated on its weights dequantized (dequantize = true): {DIFFERS}"
        if self.dequantized:
            return f"evaluated on its full-precision weights, not quantized (dequantize = true): {DIFFERS}"
        return "evaluated quantized, as it was trained (bitsandbytes on a CUDA GPU)"

    def bnb_config(self) -> dict[str, Any]:
        """The settings of transformers' BitsAndBytesConfig that quantize a full-precision base this way."""
        return {"load_in_4bit": self.bits == 4, "load_in_8bit": self.bits == 8,
                "bnb_4bit_quant_type": self.quant_type if self.bits == 4 else "nf4",
                "bnb_4bit_use_double_quant": self.double_quant,
                "bnb_4bit_compute_dtype": self.compute_dtype or "float32",
                "llm_int8_skip_modules": list(self.skip_modules) or None}


REQUESTED = {"nf4": 4, "fp4": 4, "int8": 8}  # a recipe's `quantize`: its bits
REQUESTED_COMPUTE = "bfloat16"  # QLoRA's and Unsloth's bnb_4bit_compute_dtype


def recipe_quantization(folder: Path, recipe: Recipe) -> Quantization | None:
    """The root checkpoint's quantization in `folder` as `recipe` evaluates it: the one its config.json records
    (read_quantization), or the recipe's `quantize` for a full-precision base; None where neither. Setting
    `quantize` over a base that records its own is a CheckpointError: the base says how it was quantized."""
    recorded = read_quantization(folder, dequantize=recipe.dequantize, allow_pickle=recipe.allow_pickle)
    if recipe.quantize is None:
        return recorded
    if recorded is not None:
        raise CheckpointError(f"{folder / CONFIG} records its own quantization ({recorded.describe()}): remove "
                              f"quantize = {recipe.quantize!r} from the recipe, which is for a full-precision base "
                              "that a QLoRA adapter was trained on quantized")
    bits = REQUESTED[recipe.quantize]
    return Quantization(bits=4 if bits == 4 else 8, quant_type=recipe.quantize,
                        compute_dtype=REQUESTED_COMPUTE if bits == 4 else None, double_quant=bits == 4,
                        packed=False, requested=True)


def read_quantization(folder: Path, *, dequantize: bool = False, allow_pickle: bool = False) -> Quantization | None:
    """The quantization of the full checkpoint in `folder` (None: its config.json has no quantization_config), as a
    recipe with `dequantize` evaluates it. A quantization_config evalorch cannot evaluate as trained (another method,
    neither 4 nor 8 bits) raises CheckpointError naming the file: loading it otherwise would change its precision."""
    config_file = folder / CONFIG
    settings = read_json_object(config_file).get("quantization_config")
    if settings is None:
        return None
    if not isinstance(settings, dict):
        raise CheckpointError(f"{config_file}: quantization_config is {as_written(settings)}, expected a JSON object")
    method = settings.get("quant_method", BITSANDBYTES)
    if method != BITSANDBYTES:
        raise CheckpointError(f"{config_file}: its weights are quantized with {as_written(method)}, which evalorch "
                              "cannot evaluate as they were trained (it evaluates bitsandbytes 4-bit and 8-bit bases);"
                              " evaluate a full-precision copy of the base instead")
    bits = _bits(settings, config_file)
    four = bits == 4
    skip = settings.get("llm_int8_skip_modules") or []
    if not isinstance(skip, list) or not all(isinstance(name, str) for name in skip):
        raise CheckpointError(f"{config_file}: quantization_config.llm_int8_skip_modules is {as_written(skip)}, "
                              "expected a list of module names")
    return Quantization(
        bits=bits, quant_type=str(settings.get("bnb_4bit_quant_type") or "fp4") if four else "int8",
        compute_dtype=str(settings.get("bnb_4bit_compute_dtype") or "float32") if four else None,
        double_quant=four and settings.get("bnb_4bit_use_double_quant") is True,
        packed=packed_weights(folder, allow_pickle=allow_pickle), skip_modules=tuple(skip), dequantized=dequantize)


def _bits(settings: dict[str, Any], config_file: Path) -> Literal[4, 8]:
    """4 or 8, from load_in_4bit / load_in_8bit (transformers also writes them with a leading underscore)."""
    four = settings.get("load_in_4bit", settings.get("_load_in_4bit")) is True
    eight = settings.get("load_in_8bit", settings.get("_load_in_8bit")) is True
    if four == eight:
        said = "both" if four else "neither"
        raise CheckpointError(f"{config_file}: its bitsandbytes quantization_config sets {said} of load_in_4bit and "
                              "load_in_8bit; restore the file from where the model was saved")
    return 4 if four else 8


def packed_weights(folder: Path, *, allow_pickle: bool = False) -> bool:
    """Whether the checkpoint's safetensors hold bitsandbytes' packed weights (their quant-state tensors are there).
    Pickle weights have no header to read: taken as packed, the way a quantized model saves."""
    for path in weight_files(folder, "full", allow_pickle=allow_pickle):
        if path.suffix != ".safetensors":
            return True
        if any(is_quant_state(name) for name in safetensors_header(path).tensors):
            return True
    return False


def is_quant_state(name: str) -> bool:
    """A tensor bitsandbytes saves beside a packed weight, not a weight itself."""
    return _4BIT_STATE in name or name.endswith(_QUANT_STATE_SUFFIXES)


def packed_weight_names(names: Iterable[str]) -> set[str]:
    """The packed weights among a file's tensor `names`: each 4-bit one that has its quant_state record
    (`<weight>.quant_state.bitsandbytes__nf4`), each 8-bit `<module>.weight` that has its `<module>.SCB` scales."""
    found = set()
    for name in names:
        if _4BIT_STATE in name:
            found.add(name.split(_4BIT_STATE)[0])
        elif name.endswith(".SCB"):
            found.add(f"{name.removesuffix('SCB')}weight")
    return found


def refusal(quantization: Quantization, *, device: str, bitsandbytes: bool | None) -> str | None:
    """Why a recipe cannot evaluate this base on `device` ("cuda" or "cpu"), saying what to install or set; None
    where it can. `bitsandbytes`: whether it can be imported where the worker runs (None: not known here)."""
    what = f"its base is quantized ({quantization.describe()})"
    if quantization.dequantized:
        if quantization.packed and bitsandbytes is False:
            return (f"{what} and dequantize = true, but unpacking its weights needs bitsandbytes, which is not "
                    f"installed: {INSTALL}")
        return None
    # the other way to evaluate it: a recorded quantization dequantized; a requested one not asked for
    instead = ("remove quantize from the recipe to evaluate the base in full precision (its numbers will differ "
               "from the quantized base's the adapter was trained on)" if quantization.requested
               else f"set dequantize = true in the recipe ({DIFFERS})")
    if not device.startswith("cuda"):
        return (f"{what}: it is evaluated as it was trained only on a CUDA GPU with bitsandbytes ({INSTALL}); to "
                f"evaluate it on this device, {instead}")
    if bitsandbytes is False:
        return (f"{what}: evaluating it as it was trained needs bitsandbytes, which is not installed: {INSTALL}; or "
                f"{instead}")
    return None
