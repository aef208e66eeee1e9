"""The grounding dataset: JSON lines of {id, image (relative to the file), bbox [x1,y1,x2,y2] px, prompt?}.

A bad line or a missing image is a per-sample error record, never a crash of the recipe.
"""

from __future__ import annotations

import json
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


def read_dataset(path: Path, *, limit: int | None = None, skip_ids: set[str] | None = None) -> list[Sample]:
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        samples.append(_parse_line(line, number, path.parent))
        if limit is not None and len(samples) >= limit:
            break
    # `limit` names the first N samples of the file; what a previous attempt recorded is skipped within them
    return [s for s in samples if not skip_ids or s.id not in skip_ids]


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
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int | float) for v in bbox)):
        problems.append("'bbox' is not [x1, y1, x2, y2]")
    prompt = raw.get("prompt")
    if problems:
        return Sample(sample_id, None, None, prompt, f"line {number}: " + "; ".join(problems))
    return Sample(sample_id, folder / raw["image"], [float(v) for v in bbox], prompt)


def load_image(sample: Sample) -> Image.Image:
    """The sample's image as RGB; raises OSError/ValueError with a readable message."""
    with Image.open(sample.image_path) as image:
        return image.convert("RGB")


def render_prompt(template: str, sample: Sample) -> str:
    """The recipe's prompt template filled with the sample's fields; KeyError names a missing one."""
    if "{prompt}" in template and not sample.prompt:
        raise KeyError("the recipe's prompt uses {prompt} but the sample has no 'prompt'")
    return template.format(prompt=sample.prompt or "", id=sample.id)
