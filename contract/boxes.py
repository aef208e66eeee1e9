"""Reading a box out of a model's text, and scoring it: torch-free, shared by the worker and `rescore`.

The coordinate space is always the recipe's declared box format. It is never guessed from the numbers,
and a text is never read two ways to keep the better score.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in image pixels

_NUM = r"(-?\d+(?:\.\d+)?)"
_PAIR = rf"\(\s*{_NUM}\s*,\s*{_NUM}\s*\)"
# Qwen2-VL grounding: <|box_start|>(x1,y1),(x2,y2)<|box_end|>, coordinates normalised to 0-1000.
# The markers are special tokens: decoders that skip special tokens drop them, so they are optional.
_QWEN2VL = re.compile(rf"(?:<\|box_start\|>)?\s*{_PAIR}\s*,\s*{_PAIR}\s*(?:<\|box_end\|>)?")
# Qwen2.5-VL style JSON: {"bbox_2d": [x1, y1, x2, y2], ...} in pixels.
_JSON_BBOX = re.compile(rf'"bbox_2d"\s*:\s*\[\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*\]')

BOX_FORMATS = {
    "qwen2vl": "Qwen2-VL grounding <|box_start|>(x1,y1),(x2,y2)<|box_end|>, normalised 0-1000",
    "json_pixels": 'JSON {"bbox_2d": [x1, y1, x2, y2]} in pixels of the original image',
}


def parse_box(text: str, box_format: str, image_size: tuple[int, int]) -> Box | None:
    """The first box in `text`, in pixels of an image of `image_size` (width, height); None if none."""
    width, height = image_size
    if box_format == "qwen2vl":
        match = _QWEN2VL.search(text)
        if match is None:
            return None
        x1, y1, x2, y2 = (float(v) for v in match.groups())
        box = (x1 * width / 1000, y1 * height / 1000, x2 * width / 1000, y2 * height / 1000)
    elif box_format == "json_pixels":
        match = _JSON_BBOX.search(text)
        if match is None:
            return None
        box = tuple(float(v) for v in match.groups())
    else:
        raise ValueError(f"unknown box format {box_format!r}; known: {', '.join(BOX_FORMATS)}")
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


def score_text(text: str, box_format: str, image_size: tuple[int, int], gt: Sequence[float]) -> dict:
    """What a sample record carries about its prediction: the box (or None), IoU, detected."""
    pred = parse_box(text, box_format, image_size)
    return {
        "pred": list(pred) if pred is not None else None,
        "iou": iou(pred, gt) if pred is not None else 0.0,
        "detected": pred is not None,
    }
