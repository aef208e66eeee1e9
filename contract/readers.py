"""The JSON readers: this project's JSON lines, and COCO-style JSON (images + annotations + categories).

    JSON lines: {"id": ..., "image": path, "bbox": [4 numbers], "prompt": ...}, one object a line; boxes in the
                recipe's bbox_format (xyxy unless it says otherwise); every other scalar key is a field.
    COCO:       {"images": [{"id", "file_name", "width", "height"}], "annotations": [{"id", "image_id",
                "category_id", "bbox": [x, y, w, h]}], "categories": [{"id", "name"}]}: one sample per
                annotation; the prompt is the annotation's "caption" (or its image's), else the category's name.

Image paths are relative to the recipe's image_root, or else to the dataset file's folder. A reader yields every
row in file order, a bad one as a sample with `error` set, so that every reader counts the same samples.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeGuard

from .images import ImageSource
from .samples import DatasetError, Sample, read_box, read_id, scalar_fields


class JsonLines:
    """This project's JSON lines, read line by line (a large set is never held whole)."""

    format = "jsonl"
    bbox_format = "xyxy"

    def __init__(self, path: Path, image_root: Path | None = None) -> None:
        self.path = path
        self.root = image_root or path.parent
        if not path.is_file():
            raise DatasetError(f"{path}: not a file")

    def fields(self) -> frozenset[str] | None:
        return None  # each line has its own

    def rows(self, bbox_format: str, images: bool = True) -> Iterator[Sample]:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as lines:
                for number, line in enumerate(lines, 1):
                    if line.strip():
                        yield self._parse(line, number, bbox_format)
        except OSError as exc:
            raise DatasetError(f"{self.path}: {exc}") from exc

    def _parse(self, line: str, number: int, bbox_format: str) -> Sample:
        fallback_id = f"line{number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            return Sample(fallback_id, None, None, None, f"line {number}: not JSON ({exc})", where=f"line {number}")
        if not isinstance(raw, dict):
            return Sample(fallback_id, None, None, None, f"line {number}: not a JSON object", where=f"line {number}")
        sample_id, id_problem = read_id(raw["id"], fallback_id) if "id" in raw else (fallback_id, None)
        prompt = None if raw.get("prompt") is None else str(raw["prompt"])
        box, given, box_problem = read_box(raw.get("bbox"), bbox_format)
        problems = [] if isinstance(raw.get("image"), str) else ["no 'image' path"]
        problems += [p for p in (box_problem, id_problem) if p]
        image = ImageSource.file(self.root / raw["image"]) if isinstance(raw.get("image"), str) else None
        return Sample(sample_id, image, box, prompt, f"line {number}: " + "; ".join(problems) if problems else None,
                      fields=scalar_fields(raw), given_bbox=given, bbox_format=bbox_format, where=f"line {number}")


class Coco:
    """COCO-style JSON: the file is parsed whole (it is text: annotations, never image bytes)."""

    format = "coco"
    bbox_format = "xywh"

    def __init__(self, path: Path, image_root: Path | None = None) -> None:
        self.path = path
        self.root = image_root or path.parent
        try:
            raw = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{path}: not a readable COCO JSON file ({exc})") from exc
        if not isinstance(raw, dict) or not isinstance(raw.get("annotations"), list) \
                or not isinstance(raw.get("images"), list):
            raise DatasetError(f"{path}: not COCO-style JSON (no 'images' and 'annotations' lists)")
        self.annotations: list[Any] = raw["annotations"]
        self.images = {i["id"]: i for i in raw["images"] if isinstance(i, dict) and "id" in i}
        listed = raw.get("categories")
        categories: list[Any] = listed if isinstance(listed, list) else []
        self.categories = {c["id"]: c for c in categories if isinstance(c, dict) and "id" in c}

    def fields(self) -> frozenset[str] | None:
        return None

    def rows(self, bbox_format: str, images: bool = True) -> Iterator[Sample]:
        for index, annotation in enumerate(self.annotations):
            yield self._sample(index, annotation, bbox_format)

    def _sample(self, index: int, annotation: Any, bbox_format: str) -> Sample:
        where = f"annotation #{index + 1}"
        if not isinstance(annotation, dict):
            return Sample(f"annotation{index + 1}", None, None, None, f"{where}: not a JSON object", where=where)
        sample_id, id_problem = read_id(annotation["id"], f"annotation{index + 1}") if "id" in annotation else \
            (f"annotation{index + 1}", None)
        image = self.images.get(annotation.get("image_id"))
        category = self.categories.get(annotation.get("category_id")) or {}
        fields = {**scalar_fields(image or {}), **scalar_fields(annotation),
                  **({"category": category["name"]} if isinstance(category.get("name"), str) else {}),
                  **({"supercategory": category["supercategory"]}
                     if isinstance(category.get("supercategory"), str) else {})}
        caption = annotation.get("caption", (image or {}).get("caption"))
        prompt = caption if isinstance(caption, str) else fields.get("category")
        if isinstance(caption, str):
            fields["caption"] = caption
        box, given, box_problem = read_box(annotation.get("bbox"), bbox_format)
        problems = [p for p in (box_problem, id_problem) if p]
        file_name = image.get("file_name") if image is not None else None
        if image is None:
            problems.append(f"image_id {annotation.get('image_id')!r} is not in 'images'")
        elif not isinstance(file_name, str):
            problems.append(f"image {image.get('id')!r} has no 'file_name'")
        source = ImageSource.file(self.root / file_name) if isinstance(file_name, str) else None
        return Sample(sample_id, source, box, prompt, f"{where}: " + "; ".join(problems) if problems else None,
                      fields=fields, given_bbox=given, bbox_format=bbox_format, declared_size=_size(image), where=where)


def _size(image: dict | None) -> tuple[int, int] | None:
    """The (width, height) a COCO image entry declares, when it declares both as positive numbers."""
    width, height = (image or {}).get("width"), (image or {}).get("height")
    if _positive(width) and _positive(height):
        return int(width), int(height)
    return None


def _positive(value: object) -> TypeGuard[int | float]:
    """A positive number, as a declared size must be (a bool is no number here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0
