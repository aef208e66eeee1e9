"""One grounding sample as every reader makes it, and what readers share: the ground-truth box read into xyxy
pixels, the sample's own fields (for prompt templates) and the placeholders a template uses."""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .images import ImageSource

BBOX_FORMATS = {"xyxy": "[x1, y1, x2, y2]: corners", "xywh": "[x, y, width, height]: top-left corner and size"}


class DatasetError(Exception):
    """A dataset that cannot be read at all (not found, not a known format, pyarrow missing, damaged); the message
    names the file. A bad row is never this: it is a sample with `error` set."""


SampleId = str | int  # as the dataset wrote it: records keep a whole number a number


def id_text(sample_id: SampleId) -> str:
    """The id as text: what makes two ids the same (5 and "5" are one id) and what `ids` lists and files name."""
    return str(sample_id)


@dataclass
class Sample:
    """One sample. `bbox` is the ground truth in xyxy pixels, whatever the dataset stores; `error` is set when the
    row itself is unusable (the worker records it, never scores it)."""

    id: SampleId
    image: ImageSource | None
    bbox: list[float] | None
    prompt: str | None
    error: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)  # the row's own scalar fields, for prompt templates
    given_bbox: list[float] | None = None  # the box as the dataset stores it (in bbox_format)
    bbox_format: str = "xyxy"
    declared_size: tuple[int, int] | None = None  # (width, height) the dataset says the image has (COCO)
    where: str = ""  # where the dataset holds it ("line 3", "annotation #5", "val.parquet row 17"), for messages

    def __post_init__(self) -> None:
        if isinstance(self.image, str | Path):  # Sample(id, path, ...) as before image sources
            self.image = ImageSource.file(self.image)

    @property
    def image_path(self) -> Path | None:
        return self.image.path if self.image is not None else None

    def box_text(self) -> str:
        """The ground truth as the messages show it: '[1, 2, 11, 22] (xyxy, from xywh [1, 2, 10, 20])'."""
        text = f"{_numbers(self.bbox)} (xyxy"
        if self.bbox_format != "xyxy" and self.given_bbox is not None:
            text += f", from {self.bbox_format} {_numbers(self.given_bbox)}"
        return text + ")"


def read_id(value: Any, fallback: str) -> tuple[SampleId, str | None]:
    """(the sample's id, the problem with the one given): a string or a whole number, kept as written (the records
    keep 5 a number and "5" a string, so they join with the dataset); none given, the fallback (its place in the
    file). Any other value (null, true, 1.5, a list) is the sample's error, not an id made up from its text."""
    if (isinstance(value, str) and value.strip()) or (isinstance(value, int) and not isinstance(value, bool)):
        return value, None
    return fallback, f"'id' must be a non-empty string or a whole number (got {value!r})"


def read_box(value: Any, bbox_format: str) -> tuple[list[float] | None, list[float] | None, str | None]:
    """(the box in xyxy, the box as given, the problem): four finite numbers, in `bbox_format`, with a width and
    a height. Whether it lies in the image is checked once the image is read (dataset.check_gt)."""
    if not (isinstance(value, list | tuple) and len(value) == 4
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)):
        return None, None, f"'bbox' is not four numbers {BBOX_FORMATS[bbox_format].split(':')[0]} (got {value!r})"
    try:
        given = [float(v) for v in value]
    except OverflowError:  # an integer too large for a float
        return None, None, f"'bbox' {value!r} has a value too large to be a coordinate"
    if not all(math.isfinite(v) for v in given):
        return None, given, f"'bbox' {_numbers(given)} has a value that is not a finite number"
    x, y, c, d = given
    box = [x, y, x + c, y + d] if bbox_format == "xywh" else given
    if box[2] <= box[0] or box[3] <= box[1]:
        shown = Sample("", None, box, None, given_bbox=given, bbox_format=bbox_format).box_text()
        return box, given, f"ground-truth box {shown} has no width or height"
    return box, given, None


def scalar_fields(row: dict[str, Any]) -> dict[str, Any]:
    """The row's values a prompt template may use: strings, numbers and booleans (not lists, images, masks)."""
    return {k: v for k, v in row.items() if isinstance(k, str) and isinstance(v, str | int | float | bool)}


def template_fields(template: str) -> list[str]:
    """The field names a prompt template uses, in order; ValueError for a template str.format cannot read, and for
    anything but plain names ({x.attr}, {x[0]}, {0}, {x!r}, {x:>5} are refused: a template fills in text)."""
    names = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(f"{{{name}}} is not a field name (use {{prompt}}, {{id}} or a field of the dataset)")
        if spec or conversion:
            raise ValueError(f"{{{name}}}: format specs and conversions are not supported")
        names.append(name)
    return names


def _numbers(values: list[float] | None) -> str:
    if values is None:
        return "None"
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"
