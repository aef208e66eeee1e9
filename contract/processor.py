"""Which folder of a chain the processor comes from, and the resolution it resizes images to, read from files alone.

The rule is the nearest link, top first, that has one: an adapter folder where its trainer saved the processor
(LLaMA-Factory, TRL and Unsloth save it into every checkpoint-N/), else its base's, down to the root (ms-swift saves
none beside an adapter). The tokenizer goes with it, unless a link above that one saved a tokenizer alone. The
parent records the choice in each recipe's row and `plan` shows it; the memory estimate counts images by it; the
worker loads it. All three ask `processor_source`, so the processor recorded is the processor used.

A trained processor may resize differently from its base's (a TRL script that built it with its own max_pixels):
images are then evaluated at the resolution the adapter was trained at, and the record says that it differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError, as_written, read_json_object, swift_args
from .trainer_resize import TrainerResize, trainer_resize

# An image processor's configuration: transformers 5 nests it in processor_config.json, older versions wrote
# preprocessor_config.json (the image processor's own file has the last word where both are there).
IMAGE_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class Resolution:
    """The pixels an image is resized within: Qwen's [min_pixels, max_pixels]; a fixed-size processor's height x
    width for both; None where the processor's files name neither (its own defaults, or another kind of resize)."""

    min_pixels: int | None = None
    max_pixels: int | None = None

    def describe(self) -> str:
        if self.min_pixels is None and self.max_pixels is None:
            return "resolution not set in its files (the processor's defaults)"
        return f"resizes {'every image' if self.min_pixels == self.max_pixels else 'images'} to {self.pixels()}"

    def pixels(self) -> str:
        """'3136-589824 pixels', or one number for a fixed size."""
        if self.min_pixels == self.max_pixels:
            return f"{_pixels(self.max_pixels)} pixels"
        return f"{_pixels(self.min_pixels)}-{_pixels(self.max_pixels)} pixels"


@dataclass
class ProcessorSource:
    """Where a recipe's processor comes from, and how it resizes images (see the module's docstring)."""

    path: str  # the link folder the processor (image processor, chat template) is loaded from
    tokenizer_path: str  # the link folder the tokenizer is loaded from: `path`, unless a link above saved one alone
    which: str  # "the adapter's own", "the base's (...)": where that folder is in the chain
    resolution: Resolution
    root_resolution: Resolution | None = None  # the root checkpoint's processor's, where it resizes differently
    # special tokens a trainer adds to the tokenizer when it loads (ms-swift's args.json new_special_tokens, which
    # `swift infer` adds again): the saved tokenizer lacks them, so the worker adds them as the trainer did
    added_tokens: list[str] | None = None
    # how the top link's trainer resized images before its processor (contract/trainer_resize.py), applied alike
    trainer_resize: TrainerResize | None = None

    def describe(self) -> str:
        """'the adapter's own, /runs/x/checkpoint-100: resizes images to 3136-589824 pixels'."""
        text = f"{self.which}, {self.path}: {self.resolution.describe()}"
        if self.tokenizer_path != self.path:
            text += f"; tokenizer from {self.tokenizer_path}"
        if self.added_tokens:
            text += f"; adds the trainer's {len(self.added_tokens)} new special token(s) ({_listed(self.added_tokens)})"
        return text

    def resolution_note(self) -> str | None:
        """Where images are resized otherwise than the root checkpoint's processor does: by the processor saved
        with the adapter, by its trainer before the processor; which is used, and why."""
        notes = []
        if self.root_resolution is not None:
            notes.append(f"the processor saved with the adapter resizes images to {self.resolution.pixels()}, its "
                         f"base's to {self.root_resolution.pixels()}: evaluated at the adapter's (the resolution it "
                         "was trained at)")
        if self.trainer_resize is not None:
            notes.append(self.trainer_resize.describe())
        return "; ".join(notes) or None


def processor_source(chain_paths: list[str],
                     recipe_bounds: tuple[int | None, int | None] = (None, None)) -> ProcessorSource:
    """The processor of a chain given as its links' folders, root first (see the module's docstring), and the
    resize its top link's trainer applied before it, with the recipe's (image_min_pixels, image_max_pixels) over
    what the files say."""
    folders = [Path(p) for p in chain_paths]
    top_down = list(reversed(folders))
    found = next((f for f in top_down if has_image_processor(f)), folders[0])
    above = top_down[: top_down.index(found)]
    tokenizer = next((f for f in above if has_tokenizer(f)), found)
    resolution = image_resolution(processor_settings(found))
    root = image_resolution(processor_settings(folders[0]))
    added = [token for folder in top_down[: top_down.index(tokenizer)] for token in swift_new_tokens(folder)]
    return ProcessorSource(
        path=str(found), tokenizer_path=str(tokenizer), which=_which(found, folders),
        resolution=resolution, root_resolution=root if found != folders[0] and root != resolution else None,
        added_tokens=added or None,
        trainer_resize=trainer_resize(folders[-1], pixel_factor(processor_settings(found), found), recipe_bounds))


def has_image_processor(folder: Path) -> bool:
    return any((folder / name).is_file() for name in IMAGE_PROCESSOR_FILES)


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def processor_settings(folder: Path) -> dict[str, Any]:
    """A folder's processor settings as one dict: processor_config.json's own keys (image_seq_length), then its
    nested image processor's or preprocessor_config.json's; {} where it has no processor files. A damaged file
    raises CheckpointError naming it."""
    settings: dict[str, Any] = {}
    for name in IMAGE_PROCESSOR_FILES:
        path = folder / name
        if not path.is_file():
            continue
        raw = read_json_object(path)
        nested = raw.get("image_processor")
        settings |= {k: v for k, v in raw.items() if k not in ("image_processor", "video_processor")}
        settings |= nested if isinstance(nested, dict) else {}
    return settings


def is_pixel_bounded(settings: dict[str, Any]) -> bool:
    """A processor that resizes within pixel bounds (Qwen2-VL's smart_resize: Qwen2-VL, 2.5-VL, 3-VL), whose
    size.shortest_edge and longest_edge are pixel counts rather than sides."""
    kind = str(settings.get("image_processor_type") or "")
    return kind.startswith("Qwen2VLImageProcessor") or "min_pixels" in settings or "max_pixels" in settings


def pixel_factor(settings: dict[str, Any], folder: Path) -> int | None:
    """A pixel-bounded processor's resize step, patch_size x merge_size (Qwen2-VL's 28); None for another. A value
    that is not a positive whole number raises CheckpointError naming `folder`'s processor."""
    if not is_pixel_bounded(settings):
        return None
    step = 1
    for key, default in (("patch_size", 14), ("merge_size", 2)):
        value = settings.get(key, default)
        if _count(value) is None:
            raise CheckpointError(f"{folder}: its processor's {key} is {as_written(value)}, expected a positive "
                                  "whole number")
        step *= value
    return step


def pixel_bounds(settings: dict[str, Any]) -> tuple[Any, Any]:
    """A pixel-bounded processor's (min_pixels, max_pixels) as its files write them (top-level keys, as older
    transformers wrote them, or in `size`), unchecked; None for each one the files do not give."""
    size = _size(settings)
    low = settings.get("min_pixels") or size.get("min_pixels") or size.get("shortest_edge")
    high = settings.get("max_pixels") or size.get("max_pixels") or size.get("longest_edge")
    return low or None, high or None


def image_resolution(settings: dict[str, Any]) -> Resolution:
    """The resolution a processor's settings resize to (see Resolution)."""
    if is_pixel_bounded(settings):
        low, high = pixel_bounds(settings)
        return Resolution(_count(low), _count(high))
    size = _size(settings)
    height, width = _count(size.get("height")), _count(size.get("width"))
    if height and width:
        return Resolution(height * width, height * width)
    return Resolution()


def _which(found: Path, folders: list[Path]) -> str:
    index = folders.index(found)
    if index == len(folders) - 1 and index:
        return "the adapter's own"
    if index == 0:
        return "the base's" if len(folders) > 1 else "the model's"
    return f"the adapter {found.name}'s (link {index + 1} of {len(folders)})"


def swift_new_tokens(folder: Path) -> list[str]:
    """The special tokens ms-swift's args.json says it added to the tokenizer (`new_special_tokens`)."""
    tokens = (swift_args(folder) or {}).get("new_special_tokens") or []
    return [t for t in tokens if isinstance(t, str)] if isinstance(tokens, list) else []


def _size(settings: dict[str, Any]) -> dict[str, Any]:
    size = settings.get("size")
    return size if isinstance(size, dict) else {}


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _pixels(value: int | None) -> str:
    return "?" if value is None else str(value)


def _listed(tokens: list[str]) -> str:
    return ", ".join(tokens[:5]) + (f" and {len(tokens) - 5} more" if len(tokens) > 5 else "")
