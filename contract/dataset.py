"""The grounding dataset: its schema and its one reader, used by the worker (to evaluate), the memory estimate
(prompt lengths, image sizes), the progress display (how many samples) and the report (which image is which).

    JSON lines: {"id": ..., "image": path relative to the file, "bbox": [x1, y1, x2, y2] in pixels, "prompt": ...}

`limit` means the first N non-blank lines of the file, whether or not they are usable: every reader counts the
same samples. A bad line or a missing image is a per-sample error record, never a crash of the recipe.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image


@dataclass
class Sample:
    id: str
    image_path: Path | None
    bbox: list[float] | None
    prompt: str | None
    error: str | None = None  # set when the line itself is unusable


def iter_samples(path: Path, *, limit: int | None = None) -> Iterator[Sample]:
    """The dataset's samples in file order, the first `limit` of them; read line by line (a large set is never
    held whole). OSError when the file cannot be read at all."""
    count = 0
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if limit is not None and count >= limit:
                return
            if not line.strip():
                continue
            count += 1
            yield _parse_line(line, number, path.parent)


def read_dataset(path: Path, *, limit: int | None = None, skip_ids: set[str] | None = None) -> list[Sample]:
    """The samples to evaluate: `limit` names the first N of the file; what a previous attempt recorded is
    skipped within them."""
    return [s for s in iter_samples(path, limit=limit) if not skip_ids or s.id not in skip_ids]


def _parse_line(line: str, number: int, folder: Path) -> Sample:
    fallback_id = f"line{number}"
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        return Sample(fallback_id, None, None, None, f"line {number}: not JSON ({exc})")
    if not isinstance(raw, dict):
        return Sample(fallback_id, None, None, None, f"line {number}: not a JSON object")
    sample_id = str(raw.get("id", fallback_id))
    bbox = raw.get("bbox")
    problems = []
    if not isinstance(raw.get("image"), str):
        problems.append("no 'image' path")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_finite(v) for v in bbox)):
        problems.append("'bbox' is not [x1, y1, x2, y2]")
    prompt = raw.get("prompt")
    prompt = None if prompt is None else str(prompt)
    if problems:
        return Sample(sample_id, None, None, prompt, f"line {number}: " + "; ".join(problems))
    return Sample(sample_id, folder / raw["image"], [float(v) for v in bbox], prompt)


def _finite(value: object) -> bool:
    """A coordinate: a number that is not NaN, infinite, a boolean, or too large for a float."""
    try:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:
        return False


def load_image(sample: Sample) -> Image.Image:
    """The sample's image as RGB; raises OSError/ValueError with a readable message."""
    with Image.open(sample.image_path) as image:
        return image.convert("RGB")


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the image's header alone; None when it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError):  # a header claiming billions of pixels
        return None


def render_prompt(template: str, sample: Sample, *, strict: bool = True) -> str:
    """The recipe's prompt template filled with the sample's fields. strict: a template that uses {prompt} for a
    sample without one raises KeyError (the worker records it); else it renders empty (the estimate)."""
    if strict and "{prompt}" in template and not sample.prompt:
        raise KeyError("the recipe's prompt uses {prompt} but the sample has no 'prompt'")
    return template.format(prompt=sample.prompt or "", id=sample.id)
