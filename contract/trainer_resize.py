"""How a trainer resized its training images before the model's processor saw them, read from the files it left,
and the same resize for evaluation: an adapter is evaluated at the resolution it was trained at.

Two trainers resize outside the processor, so the processor they save says nothing of it (their code, read at the
commits tests/test_frameworks.py names):

* LLaMA-Factory shrinks every image above ``image_max_pixels`` (default 768*768) and enlarges every one below
  ``image_min_pixels`` (default 32*32) by sqrt(bound / area), sides truncated to integers, with PIL's default
  resample (data/mm_plugin.py ``MMPluginMixin._preprocess_image``); for Qwen-VL also at least 28 a side
  (``Qwen2VLPlugin._preprocess_image``). Its web UI writes the values into ``output_dir/training_args.yaml``; a
  command-line run writes them nowhere, and its ``trainer_log.jsonl`` marks the folder as LLaMA-Factory's: there
  its defaults are assumed and said to be (the recipe's ``image_max_pixels`` / ``image_min_pixels`` say otherwise).
* ms-swift rescales an image above args.json's ``max_pixels`` to int(sqrt(max / ratio)) rows, bilinear
  (swift/template/vision_utils.py ``rescale_image``), and passes Qwen-VL images through qwen_vl_utils'
  ``smart_resize`` within the ``MAX_PIXELS`` / ``MIN_PIXELS`` (or ``IMAGE_MAX_TOKEN_NUM``) its args.json's
  ``model_kwargs`` sets, bicubic (swift/template/templates/qwen.py); an environment variable of the same name
  leaves no record, and where args.json sets neither, the note says so.

The parent reads this to plan and record; the worker applies it to each image as read, before its processor.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from .checkpoint import SWIFT_ARGS, CheckpointError, present, swift_args

LLAMAFACTORY_ARGS = "training_args.yaml"  # LLaMA-Factory's web UI: the arguments it launched the run with
LLAMAFACTORY_LOG = "trainer_log.jsonl"  # LLaMA-Factory's LogCallback, in every run's output_dir
LLAMAFACTORY_DEFAULTS = (32 * 32, 768 * 768)  # ProcessorArguments' image_min_pixels, image_max_pixels
QWEN_MIN_SIDE = 28  # Qwen2VLPlugin._preprocess_image: every side at least this
Rule = Literal["llamafactory", "swift", "qwen"]


@dataclass(frozen=True)
class TrainerResize:
    """A resize applied to each image before the processor, as the adapter's trainer applied it."""

    trainer: str  # "LLaMA-Factory", "ms-swift", "the recipe"
    rule: Rule  # llamafactory: sqrt scaling, truncated; swift: rescale_image; qwen: smart_resize (factor-multiple)
    source: str  # where the bounds were read, or why they were assumed
    min_pixels: int | None = None
    max_pixels: int | None = None
    factor: int | None = None  # the processor's patch_size x merge_size, where it is Qwen-VL's

    def describe(self) -> str:
        """'LLaMA-Factory resized training images to at most 589824 and at least 1024 pixels before its processor
        (…/training_args.yaml): evaluated the same way'."""
        bounds = [f"at most {self.max_pixels}" if self.max_pixels else "", f"at least {self.min_pixels}"
                  if self.min_pixels else ""]
        within = " and ".join(b for b in bounds if b)
        return (f"{self.trainer} resized training images to {within} pixels before its processor ({self.source}): "
                "evaluated the same way")

    def key(self) -> str:
        """What decides the pixels: part of the image cache's fingerprint."""
        return f"{self.rule}:{self.min_pixels}:{self.max_pixels}:{self.factor}"

    def apply(self, image: Image.Image) -> Image.Image:
        """The image as the trainer resized it (an RGB image in, as the worker reads every image)."""
        if self.rule == "llamafactory":
            return _llamafactory(image, self.min_pixels or 0, self.max_pixels or 2**63, qwen=self.factor is not None)
        if self.rule == "swift":
            return _swift_rescale(image, self.max_pixels or 2**63)
        return _qwen_smart_resize(image, self.factor or 28, self.min_pixels, self.max_pixels)


def trainer_resize(folder: Path, factor: int | None, recipe_bounds: tuple[int | None, int | None]
                   ) -> TrainerResize | None:
    """The resize `folder`'s trainer applied to training images (the chain's top link), with the recipe's
    (image_min_pixels, image_max_pixels) over what the files say; None where no trainer resized outside its
    processor and the recipe sets neither. `factor`: the processor's resize step where it resizes within pixel
    bounds (Qwen-VL's patch_size x merge_size), else None.
    A recipe's bounds over a trainer that left no mark apply as Qwen's processors resize (smart_resize), which
    needs a processor that resizes within pixel bounds; another raises CheckpointError saying so."""
    found = _llamafactory_record(folder, factor) or _swift_record(folder, factor)
    low, high = recipe_bounds
    if low is None and high is None:
        return found
    said = "the recipe's " + " and ".join(n for n, v in (("image_min_pixels", low), ("image_max_pixels", high)) if v)
    if found is not None and found.rule != "swift":
        return replace(found, min_pixels=low or found.min_pixels, max_pixels=high or found.max_pixels, source=said)
    if factor is None:
        raise CheckpointError(f"{folder}: image_min_pixels / image_max_pixels bound the pixels of a processor that "
                              "resizes within pixel bounds (Qwen-VL's); this one resizes to a fixed size")
    return TrainerResize(trainer="the recipe", rule="qwen", min_pixels=low, max_pixels=high, factor=factor,
                         source=said)


def _llamafactory_record(folder: Path, factor: int | None) -> TrainerResize | None:
    """LLaMA-Factory's bounds: its web UI's training_args.yaml in the folder or its run folder, else its defaults
    where its trainer_log.jsonl marks the run as LLaMA-Factory's; None where neither is there."""
    for run in (folder, folder.parent):
        path = run / LLAMAFACTORY_ARGS
        if path.is_file():
            values = _yaml_integers(path, ("image_min_pixels", "image_max_pixels"))
            low, high = values.get("image_min_pixels"), values.get("image_max_pixels")
            default_low, default_high = LLAMAFACTORY_DEFAULTS
            return TrainerResize(trainer="LLaMA-Factory", rule="llamafactory", factor=factor,
                                 min_pixels=low or default_low, max_pixels=high or default_high,
                                 source=str(path) if high or low else f"{path} sets neither: LLaMA-Factory's defaults")
    for run in (folder, folder.parent):
        if (run / LLAMAFACTORY_LOG).is_file():
            return TrainerResize(trainer="LLaMA-Factory", rule="llamafactory", factor=factor,
                                 min_pixels=LLAMAFACTORY_DEFAULTS[0], max_pixels=LLAMAFACTORY_DEFAULTS[1],
                                 source=f"LLaMA-Factory's defaults: {run / LLAMAFACTORY_LOG} marks its run, which "
                                        "recorded no image_max_pixels (set it in the recipe if the run did)")
    return None


def _swift_record(folder: Path, processor_factor: int | None) -> TrainerResize | None:
    """ms-swift's bounds from args.json: the template's max_pixels rescale, else the MAX_PIXELS / MIN_PIXELS /
    IMAGE_MAX_TOKEN_NUM its model_kwargs set for qwen_vl_utils; None where args.json sets none of them."""
    args = swift_args(folder)
    if args is None:
        return None
    source = str(next(f / SWIFT_ARGS for f in (folder, folder.parent) if present(f / SWIFT_ARGS)))
    rescale = _positive(args.get("max_pixels"))
    if rescale is not None:
        return TrainerResize(trainer="ms-swift", rule="swift", max_pixels=rescale, source=f"{source} max_pixels")
    kwargs = {str(k).upper(): v for k, v in (args.get("model_kwargs") or {}).items()} \
        if isinstance(args.get("model_kwargs"), dict) else {}
    factor = processor_factor or 28
    high = _positive(kwargs.get("MAX_PIXELS"))
    low = _positive(kwargs.get("MIN_PIXELS"))
    tokens = _positive(kwargs.get("IMAGE_MAX_TOKEN_NUM"))
    high = tokens * factor * factor if tokens is not None else (high // factor**2 * factor**2 if high else None)
    if high is None and low is None:
        return None
    return TrainerResize(trainer="ms-swift", rule="qwen", min_pixels=low, max_pixels=high, factor=factor,
                         source=f"{source} model_kwargs")


def _yaml_integers(path: Path, keys: tuple[str, ...]) -> dict[str, int]:
    """Top-level integer keys of a YAML file yaml.safe_dump wrote (`image_max_pixels: 589824`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc})") from None
    found = {}
    for key in keys:
        match = re.search(rf"^{key}:\s*(\S+)\s*$", text, re.MULTILINE)
        if match is None:
            continue
        value = _positive(_integer(match.group(1)))
        if value is None:
            raise CheckpointError(f"{path}: {key} is {match.group(1)!r}, expected a number of pixels")
        found[key] = value
    return found


def _integer(text: str) -> int | None:
    try:
        return int(text.strip("'\""))
    except ValueError:
        return None


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _llamafactory(image: Image.Image, low: int, high: int, qwen: bool) -> Image.Image:
    """MMPluginMixin._preprocess_image: scaled into [low, high] pixels, sides truncated, PIL's default resample;
    for Qwen-VL then Qwen2VLPlugin's: every side at least 28, a side over 200 times the other cut to 180 times."""
    for bound, outside in ((high, image.width * image.height > high), (low, image.width * image.height < low)):
        if outside:
            factor = math.sqrt(bound / (image.width * image.height))
            image = image.resize((int(image.width * factor), int(image.height * factor)))
    if not qwen:
        return image
    if min(image.width, image.height) < QWEN_MIN_SIDE:
        image = image.resize((max(image.width, QWEN_MIN_SIDE), max(image.height, QWEN_MIN_SIDE)))
    if image.width / image.height > 200:
        image = image.resize((image.height * 180, image.height))
    if image.height / image.width > 200:
        image = image.resize((image.width, image.width * 180))
    return image


def _swift_rescale(image: Image.Image, high: int) -> Image.Image:
    """vision_utils.rescale_image: above `high` pixels, int(sqrt(high / ratio)) rows, bilinear (torchvision's
    Resize of a PIL image is PIL's bilinear resize)."""
    if image.width * image.height <= high:
        return image
    ratio = image.width / image.height
    rows = math.sqrt(high / ratio)
    return image.resize((int(rows * ratio), int(rows)), Image.Resampling.BILINEAR)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize (its image processor's and qwen_vl_utils'): each side a multiple of `factor` (patch x
    merge), the area within [min, max] pixels. The estimate counts image tokens by it too."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _qwen_smart_resize(image: Image.Image, factor: int, low: int | None, high: int | None) -> Image.Image:
    """qwen_vl_utils' fetch_image: sides rounded to `factor`, scaled into [low, high] pixels, bicubic."""
    rows, cols = smart_resize(image.height, image.width, factor, low or 4 * factor * factor,
                              high or 16384 * factor * factor)
    return image.resize((cols, rows), Image.Resampling.BICUBIC) if (rows, cols) != image.size[::-1] else image
