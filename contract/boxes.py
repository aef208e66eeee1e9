"""Reading a box out of a model's text, and scoring it: torch-free, shared by the worker and `rescore`.

A box format is a reader (which four numbers of the text are the box, in which order) plus a coordinate space
(which image's size the numbers refer to, and at what scale). The space is always the recipe's declared format
(or the model family's native one, under "auto"): it is never guessed from the numbers, and a text is never read
two ways to keep the better score. With several boxes in a text, the first one is the answer.

Coordinates come back in pixels of the original image, which is where the dataset's ground truth lives. A
format whose numbers are pixels of the processor-resized input (Qwen2.5-VL) needs that input's size; every
other space is relative (0-1000, 0-1, bins) or the original's pixels, for which the original's size is enough.
Relative coordinates are the same on the original and on the resized input because every processor here scales
each axis (none crops or pads).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the original image
Size = tuple[int, int]  # width, height
AUTO = "auto"

# A number as models write it: 12, -3, 0.5, .5, 5., 1e2, 2.5E-1 (never nan or inf)
NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_N = rf"({NUMBER})"
_SEP = r"\s*,\s*"
_FOUR = rf"\[\s*{_N}{_SEP}{_N}{_SEP}{_N}{_SEP}{_N}\s*\]"


class InputSizeMissing(ValueError):
    """The format's numbers are pixels of the processor's input, and the record does not say its size."""


@dataclass(frozen=True)
class Space:
    """Which image's size a format's numbers refer to, and at what scale: pixel = (value + offset) / scale x size."""

    name: str
    refers_to: str  # "original" or "input" (the processor-resized image the model saw)
    scale: float | None  # None: the numbers are pixels; else the number that spans the whole width or height
    offset: float = 0.0  # bins decoded at their centre (Florence-2: (bin + 0.5) / 1000)
    text: str = ""

    def to_pixels(self, value: float, extent: int, input_extent: int | None) -> float:
        """One coordinate in pixels of the original image, whose width (or height) is `extent`."""
        if self.scale is not None:
            return (value + self.offset) / self.scale * extent
        if self.refers_to == "input":
            if input_extent is None:
                raise InputSizeMissing(f"space {self.name!r} gives pixels of the processor-resized input, "
                                       "and no input size was given")
            return value * extent / input_extent
        return value


ORIGINAL = Space("original", "original", None, text="pixels of the original image")
INPUT = Space("input", "input", None, text="pixels of the processor-resized input (e.g. after smart_resize)")
REL1000 = Space("rel1000", "original", 1000.0, text="0-1000 relative to the image")
REL1 = Space("rel1", "original", 1.0, text="0-1 relative to the image")
BINS1024 = Space("bins1024", "original", 1024.0, text="1024 bins, value / 1024 x size")
BINS1000 = Space("bins1000", "original", 1000.0, 0.5, text="1000 bins, decoded at the bin centre (v + 0.5) / 1000")


Reader = Callable[[str], tuple[float, float, float, float] | None]  # the first box, as x1, y1, x2, y2


def _first(pattern: re.Pattern[str], order: tuple[int, int, int, int] = (0, 1, 2, 3)) -> Reader:
    """A reader taking the first match of `pattern` (four groups), reordered to x1, y1, x2, y2."""
    def read(text: str) -> tuple[float, float, float, float] | None:
        match = pattern.search(text)
        if match is None:
            return None
        values = [float(v) for v in match.groups()[-4:]]
        x1, y1, x2, y2 = order
        return values[x1], values[y1], values[x2], values[y2]

    return read


_PAIR = rf"\(\s*{_N}{_SEP}{_N}\s*\)"
# Qwen2-VL grounding: <|box_start|>(x1,y1),(x2,y2)<|box_end|>. The markers are special tokens: decoders that skip
# special tokens drop them, so they are optional.
_QWEN2VL = re.compile(rf"(?:<\|box_start\|>)?\s*{_PAIR}{_SEP}{_PAIR}\s*(?:<\|box_end\|>)?")
# JSON as Qwen2.5-VL / Qwen3-VL answer it, e.g. ```json\n[{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}]\n```: the
# first "bbox_2d" (or "bbox") key followed by four numbers, wherever it is (a code fence, a list of objects),
# with double or single quotes around the key.
_JSON_BBOX = re.compile(rf"""(["'])(?:bbox_2d|bbox)\1\s*:\s*{_FOUR}""")
# InternVL: <ref>cat</ref><box>[[x1, y1, x2, y2]]</box> (several boxes: [[...], [...]]); markers optional, as in
# InternVL's own evaluation (internvl_chat/eval/refcoco/evaluate_grounding.py reads the [[...]] alone).
_INTERNVL = re.compile(rf"(?:<box>)?\s*\[\s*{_FOUR}")
# PaliGemma: <loc0123><loc0456><loc0789><loc1000> label, y before x
_PALIGEMMA = re.compile(r"<loc(\d{4})>\s*<loc(\d{4})>\s*<loc(\d{4})>\s*<loc(\d{4})>")
# Florence-2: <loc_12><loc_34><loc_560><loc_780>, x before y
_FLORENCE2 = re.compile(r"<loc_(\d+)>\s*<loc_(\d+)>\s*<loc_(\d+)>\s*<loc_(\d+)>")


@dataclass(frozen=True)
class BoxFormat:
    """A reader of a model's text plus the coordinate space of its numbers; `source` says where the convention
    comes from."""

    name: str
    read: Reader
    space: Space
    text: str
    source: str

    @property
    def needs_input_size(self) -> bool:
        return self.space.refers_to == "input"


_QWEN25_SOURCE = ("QwenLM/Qwen2.5-VL cookbooks/spatial_understanding.ipynb: boxes are absolute pixels of the "
                  "model input; plot_bounding_boxes scales bbox_2d by width / input_width with input_width = "
                  "image_grid_thw[0][2] x 14")
_FORMATS = [
    BoxFormat("qwen2vl", _first(_QWEN2VL), REL1000, "<|box_start|>(x1,y1),(x2,y2)<|box_end|>",
              "Qwen2-VL technical report and model card: box coordinates normalised to [0, 1000)"),
    BoxFormat("qwen25vl", _first(_JSON_BBOX), INPUT, '{"bbox_2d": [x1, y1, x2, y2]}', _QWEN25_SOURCE),
    BoxFormat("qwen3vl", _first(_JSON_BBOX), REL1000, '{"bbox_2d": [x1, y1, x2, y2]}',
              "QwenLM/Qwen3-VL cookbooks/2d_grounding.ipynb: relative coordinates 0-1000"),
    BoxFormat("json_pixels", _first(_JSON_BBOX), ORIGINAL, '{"bbox_2d": [x1, y1, x2, y2]}',
              "evalorch (pixels of the image file, as a dataset's boxes are)"),
    BoxFormat("json_norm1000", _first(_JSON_BBOX), REL1000, '{"bbox_2d": [x1, y1, x2, y2]}',
              "evalorch (lmms-eval's refcoco_grounding reads 0-1000 as one of two readings: here the only one)"),
    BoxFormat("json_norm1", _first(_JSON_BBOX), REL1, '{"bbox_2d": [x1, y1, x2, y2]}',
              "evalorch (0-1 floats, as LLaVA-1.5 style grounding data writes them)"),
    BoxFormat("internvl", _first(_INTERNVL), REL1000, "<ref>obj</ref><box>[[x1, y1, x2, y2]]</box>",
              "OpenGVLab/InternVL internvl_chat/eval/refcoco/evaluate_grounding.py: box / 1000 x (w, h) of the "
              "original image"),
    BoxFormat("paligemma", _first(_PALIGEMMA, (1, 0, 3, 2)), BINS1024, "<locY1><locX1><locY2><locX2> label",
              "google-research/big_vision PaliGemma and Google's PaliGemma docs: y before x, 4-digit tokens, "
              "value / 1024 x size"),
    BoxFormat("florence2", _first(_FLORENCE2), BINS1000, "<loc_x1><loc_y1><loc_x2><loc_y2>",
              "transformers models/florence2/processing_florence2.py Florence2PostProcessor: quantize_bins (1000, "
              "1000), dequantize (bin + 0.5) x size / 1000"),
]
BOX_FORMATS: dict[str, BoxFormat] = {f.name: f for f in _FORMATS}

# The families with one native box convention, by config.json's model_type; box_format = "auto" resolves here
# and nowhere else. A family not listed has no single convention (LLaVA, Idefics3, Gemma 3 answer however they
# were fine-tuned): its recipes must name the format.
NATIVE_FORMATS = {
    "qwen2_vl": "qwen2vl",
    "qwen2_5_vl": "qwen25vl",
    "qwen3_vl": "qwen3vl",
    "qwen3_vl_moe": "qwen3vl",
    "internvl": "internvl",
    "paligemma": "paligemma",
    "florence2": "florence2",
}


def box_format(name: str) -> BoxFormat:
    """The registered format `name`; ValueError listing the known ones otherwise."""
    try:
        return BOX_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown box format {name!r}; known: {', '.join(BOX_FORMATS)}") from None


def native_format(model_type: str | None) -> str | None:
    """The box format a family answers in natively, by config.json's model_type; None: no single one."""
    return NATIVE_FORMATS.get(model_type or "")


def parse_box(text: str, box_format_name: str, image_size: Size, input_size: Size | None = None) -> Box | None:
    """The first box in `text`, in pixels of the original image of `image_size` (width, height); None if none.
    `input_size` is the processor-resized input's (width, height), which formats in input pixels need."""
    fmt = box_format(box_format_name)
    if fmt.needs_input_size and not input_size:
        raise InputSizeMissing(f"box format {fmt.name!r} gives pixels of the processor-resized input, and the "
                               "record has no input_size (written before evalorch recorded it)")
    raw = fmt.read(text)
    if raw is None:
        return None
    width, height = image_size
    in_w, in_h = input_size or (None, None)
    x1, y1, x2, y2 = raw
    space = fmt.space
    box = (space.to_pixels(x1, width, in_w), space.to_pixels(y1, height, in_h),
           space.to_pixels(x2, width, in_w), space.to_pixels(y2, height, in_h))
    return _normalise(box, width, height)


def _normalise(box: Sequence[float], width: int, height: int) -> Box | None:
    """Order the corners and clip to the image; a box with no area left is no detection."""
    x1, x2 = sorted((box[0], box[2]))
    y1, y2 = sorted((box[1], box[3]))
    x1, x2 = max(0.0, x1), min(float(width), x2)
    y1, y2 = max(0.0, y1), min(float(height), y2)
    if x2 <= x1 or y2 <= y1:
        return None
    return (x1, y1, x2, y2)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes given as (x1, y1, x2, y2), continuous coordinates."""
    inter_w = min(a[2], b[2]) - max(a[0], b[0])
    inter_h = min(a[3], b[3]) - max(a[1], b[1])
    if inter_w <= 0 or inter_h <= 0:
        return 0.0
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def score_text(text: str, box_format_name: str, image_size: Size, gt: Sequence[float],
               input_size: Size | None = None) -> dict:
    """What a sample record carries about its prediction: the box (or None), IoU, detected."""
    pred = parse_box(text, box_format_name, image_size, input_size)
    return {
        "pred": list(pred) if pred is not None else None,
        "iou": iou(pred, gt) if pred is not None else 0.0,
        "detected": pred is not None,
    }
