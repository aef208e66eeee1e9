"""How many tokens an image becomes, family by family, read from files alone (no torch): each family's rule once,
here, for the memory estimate (orchestrator/gpu/memory.py).

A rule gives, for an image of (width, height), the image tokens the prompt holds for it (what the language model
attends over and keeps in its KV cache), the patches the vision tower encodes (its sequence length summed over
tiles) and the longest sequence the vision tower attends over at once (one tile or picture). The rules follow each
processor's own code in transformers:

- Qwen2-VL, Qwen2.5-VL, Qwen3-VL (Qwen2VLImageProcessor): `smart_resize` to multiples of patch x merge within
  [min_pixels, max_pixels]; one token per merge x merge patches (patch 14, or 16 for Qwen3-VL).
- InternVL (GotOcr2ImageProcessor with crop_to_patches): the image is resized onto the columns x rows grid of tiles
  whose aspect ratio is closest to the image's (get_optimal_tiled_canvas), plus a thumbnail when there is more than
  one tile; image_seq_length tokens per tile.
- PaliGemma, Gemma 3, and any model whose processor resizes to one fixed size: a fixed count per image
  (image_seq_length, or mm_tokens_per_image; Gemma 3's pan-and-scan adds up to pan_and_scan_max_num_crops more).

A family with none of these (an image-splitting processor of another kind) gets no rule: the estimate then says
that its image tokens are not counted, rather than counting them by another family's rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from contract.processor import pixel_bounds
from contract.trainer_resize import smart_resize

# Qwen2VLImageProcessor's defaults, for a checkpoint whose processor files do not say
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 56 * 56, 28 * 28 * 1280
QWEN_FAMILIES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"})


@dataclass(frozen=True)
class ImageCount:
    tokens: int  # image tokens in the prompt
    patches: int  # vision-tower patches, all tiles together
    sequence: int  # the longest sequence the vision tower attends over at once (one tile or picture)


class ImageRule(Protocol):
    @property
    def name(self) -> str:
        """The rule's name, for the estimate's record (read-only: the rules are frozen dataclasses)."""
        ...

    def count(self, size: tuple[int, int] | None) -> ImageCount:
        """The count for an image of (width, height); None (unreadable): the largest the processor makes."""
        ...

    def __hash__(self) -> int:
        """Rules key memory's cache of prompt counts; one holding a list raises TypeError, and is not cached."""
        ...


@dataclass(frozen=True)
class QwenResize:
    min_pixels: int
    max_pixels: int
    patch_size: int = 14
    merge_size: int = 2
    name: str = "smart_resize"

    def count(self, size: tuple[int, int] | None) -> ImageCount:
        if size is None:
            patches = self.max_pixels // self.patch_size**2
        else:
            factor = self.patch_size * self.merge_size
            height, width = smart_resize(size[1], size[0], factor, self.min_pixels, self.max_pixels)
            patches = (height // self.patch_size) * (width // self.patch_size)
        return ImageCount(patches // self.merge_size**2, patches, patches)


def tile_grid(size: tuple[int, int], tile: tuple[int, int], min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows): GOT-OCR2 / InternVL's choice (get_optimal_tiled_canvas) of the grid whose aspect ratio is
    closest to the image's; on a tie, more tiles while the image has more than half their area."""
    width, height = size
    grids = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
                    if min_tiles <= c * r <= max_tiles), key=lambda g: g[0] * g[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for grid in grids:
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and area > 0.5 * tile[0] * tile[1] * grid[0] * grid[1]:
            best = grid
    return best


@dataclass(frozen=True)
class Tiles:
    tile: tuple[int, int]  # (width, height) of one tile
    min_tiles: int
    max_tiles: int
    tokens_per_tile: int
    patches_per_tile: int
    name: str = "tiles"

    def count(self, size: tuple[int, int] | None) -> ImageCount:
        if self.max_tiles <= 1:
            tiles = 1
        else:
            columns, rows = tile_grid(size, self.tile, self.min_tiles, self.max_tiles) if size else (self.max_tiles, 1)
            tiles = columns * rows + (1 if columns * rows > 1 else 0)  # the thumbnail of the whole image
        return ImageCount(tiles * self.tokens_per_tile, tiles * self.patches_per_tile, self.patches_per_tile)


@dataclass(frozen=True)
class Fixed:
    tokens: int
    patches: int
    pictures: int = 1  # Gemma 3's pan-and-scan: up to this many pictures per image (the whole and its crops)
    name: str = "fixed"

    def count(self, size: tuple[int, int] | None) -> ImageCount:
        return ImageCount(self.tokens * self.pictures, self.patches * self.pictures, self.patches)


def image_rule(config: dict[str, Any], processor: dict[str, Any]) -> ImageRule | None:
    """The rule for a checkpoint, from its config.json and its processor's settings (processor_config.json's and
    preprocessor_config.json's keys merged, the image processor's nested ones flattened in); None: no rule."""
    model_type = config.get("model_type")
    vision = config.get("vision_config") or {}
    if model_type in QWEN_FAMILIES or processor.get("image_processor_type", "").startswith("Qwen2VLImageProcessor"):
        return _qwen(processor, vision)
    if processor.get("crop_to_patches") or model_type == "internvl":
        return _tiles(config, processor, vision)
    return _fixed(config, processor, vision)


def _qwen(processor: dict[str, Any], vision: dict[str, Any]) -> QwenResize:
    low, high = pixel_bounds(processor)  # as written: a mistyped one fails the count (the estimate names it)
    return QwenResize(
        min_pixels=low or QWEN_MIN_PIXELS,
        max_pixels=high or QWEN_MAX_PIXELS,
        patch_size=processor.get("patch_size") or _side(vision.get("patch_size")) or 14,
        merge_size=processor.get("merge_size") or vision.get("spatial_merge_size") or 2,
    )


def _tiles(config: dict[str, Any], processor: dict[str, Any], vision: dict[str, Any]) -> Tiles:
    size = processor.get("size") or {}
    tile = (size.get("width") or 448, size.get("height") or 448)
    patch = _side(vision.get("patch_size")) or 14
    patches = (tile[0] // patch) * (tile[1] // patch)
    ratio = config.get("downsample_ratio") or 0.5
    tokens = processor.get("image_seq_length") or config.get("image_seq_length") or int(patches * ratio**2)
    cropping = processor.get("crop_to_patches", True)
    return Tiles(tile, processor.get("min_patches") or 1, (processor.get("max_patches") or 12) if cropping else 1,
                 tokens, patches)


def _fixed(config: dict[str, Any], processor: dict[str, Any], vision: dict[str, Any]) -> Fixed | None:
    """One picture of a fixed size per image, where the processor resizes to one (height and width given) and
    splits nothing; tokens as the processor says, else the model's config, else one per patch."""
    size = processor.get("size") or processor.get("crop_size") or {}
    splits = processor.get("do_image_splitting") or processor.get("image_grid_pinpoints")
    if splits or not (size.get("height") and size.get("width")):
        return None
    patch = _side(vision.get("patch_size")) or 14
    side = _side(vision.get("image_size")) or size["height"]
    patches = (side // patch) ** 2
    tokens = (processor.get("image_seq_length") or config.get("mm_tokens_per_image")
              or (config.get("text_config") or {}).get("num_image_tokens") or patches)
    crops = (processor.get("pan_and_scan_max_num_crops") or 0) if processor.get("do_pan_and_scan") else 0
    return Fixed(tokens, patches, 1 + crops)


def _side(value: Any) -> int | None:
    """A size given as 14 or [14, 14]."""
    if isinstance(value, list | tuple):
        return int(value[0]) if value else None
    return int(value) if value else None
