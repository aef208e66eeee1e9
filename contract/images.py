"""A sample's image: where it is (a file, bytes a dataset holds, or a row of a columnar file read on demand), how it
is read, and its size as read.

Phone photos carry an EXIF Orientation tag: the pixels are stored sideways and viewers, annotation tools (CVAT,
Label Studio) and transformers' `load_image` turn them upright. Ground truth is drawn on what people saw, so images
are read upright by default (exif = "apply": PIL.ImageOps.exif_transpose, as transformers does), and their size is
the upright size; exif = "ignore" reads the pixels as stored. Either way the size as read is what boxes are scored
in, what the memory estimate and the batch sort count, and what a sample record carries with the orientation.
"""

from __future__ import annotations

import io
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_MODES = ("apply", "ignore")
ORIENTATION_TAG = 0x0112
_SWAPS_SIDES = frozenset({5, 6, 7, 8})  # transpose, rotate 270, transverse, rotate 90
_TURNS = frozenset(range(2, 9))  # what exif_transpose acts on; other values (1, 0, 9...) leave the pixels alone
_DEEP_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})  # more than 8 bits a channel: as_rgb scales


@dataclass(frozen=True)
class ImageSource:
    """Where a sample's image is: a file, bytes held in memory, or bytes a callable reads on demand (a parent that
    only needs a few images of a parquet set reads those rows alone). `where` is what messages name."""

    path: Path | None = None
    data: bytes | None = field(default=None, repr=False)
    fetch: Callable[[], bytes] | None = field(default=None, repr=False, compare=False)
    where: str = ""

    @classmethod
    def file(cls, path: Path | str) -> ImageSource:
        return cls(path=Path(path), where=str(path))

    @classmethod
    def embedded(cls, data: bytes, where: str) -> ImageSource:
        return cls(data=data, where=where)

    @classmethod
    def deferred(cls, fetch: Callable[[], bytes], where: str) -> ImageSource:
        return cls(fetch=fetch, where=where)

    def __str__(self) -> str:
        return self.where or str(self.path)

    def read_bytes(self) -> bytes:
        """The image file's bytes; OSError when they cannot be had."""
        if self.data is not None:
            return self.data
        if self.path is not None:
            return _regular(self.path).read_bytes()
        if self.fetch is not None:
            return self.fetch()
        raise OSError("no image")

    def open(self) -> Image.Image:
        """The image, opened lazily (header read, pixels not yet decoded)."""
        try:
            if self.path is not None:
                return Image.open(_regular(self.path))
            return Image.open(io.BytesIO(self.read_bytes()))
        except UnidentifiedImageError:  # its message would name a BytesIO object
            raise OSError("not an image Pillow can read") from None
        except Image.DecompressionBombError as exc:  # not an OSError: callers catch OSError and ValueError
            raise ValueError(str(exc)) from None


def _regular(path: Path) -> Path:
    """`path`, where it is a regular file (or a link to one); OSError otherwise, before anything reads it: a FIFO
    would block the reader until something writes to it, a device would give endless bytes."""
    mode = path.stat().st_mode  # FileNotFoundError, as opening it would raise
    if not stat.S_ISREG(mode):
        raise OSError(f"{path}: not a regular file (a FIFO, a device or a folder), not read")
    return path


@dataclass(frozen=True)
class ImageInfo:
    """An image as read: its size and the EXIF orientation found and applied."""

    size: tuple[int, int]  # (width, height) as read: upright when the orientation was applied
    orientation: int = 1  # the file's EXIF Orientation tag; 1 when it has none
    applied: bool = False  # whether the pixels were turned by it

    def record(self) -> dict:
        """What a sample record carries about its image."""
        return {"image_size": list(self.size), "exif_orientation": self.orientation,
                "orientation_applied": self.applied}

    @property
    def describe(self) -> str:
        """'640x480', with the orientation when it mattered ('480x640, EXIF orientation 6 applied')."""
        text = f"{self.size[0]}x{self.size[1]}"
        if self.orientation in _TURNS:
            text += f", EXIF orientation {self.orientation} {'applied' if self.applied else 'ignored'}"
        return text


NO_IMAGE_RECORD = {"image_size": None, "exif_orientation": None, "orientation_applied": None}


def read_image(source: ImageSource, exif: str = "apply") -> tuple[Image.Image, ImageInfo]:
    """The image as RGB, upright unless exif is "ignore", and what was read; OSError/ValueError when it cannot be."""
    with source.open() as opened:
        opened.load()
        orientation = _orientation(opened.getexif())
        turned = ImageOps.exif_transpose(opened) if exif == "apply" else opened
        image = as_rgb(turned)
    return image, ImageInfo(image.size, orientation, exif == "apply" and orientation in _TURNS)


def as_rgb(image: Image.Image) -> Image.Image:
    """The image in 8-bit RGB, as the processors expect it. Pillow's own convert("RGB") clips the modes deeper
    than 8 bits (a 16-bit grayscale PNG, "I;16", or a 32-bit "I" or float "F" image) at 255: almost every pixel
    white, a blank picture that still scores. Those are scaled to 8 bits first: 16-bit values by 65535 -> 255,
    float values in [0, 1] by 255; values of no known scale (negative, above 16 bits, floats outside [0, 1]) are
    a ValueError, the sample's error, never a guess."""
    if image.mode not in _DEEP_MODES:
        return image.convert("RGB")
    import numpy as np  # only for the rare deep image: the parent's start-up does not pay for it

    if image.mode.startswith("I;16"):
        return _eight_bit(np.asarray(image, dtype=np.float64) / 257.0)
    if image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low < 0 or high > 65535:
            raise ValueError(f"32-bit integer pixels from {low:g} to {high:g}: no known scale to 8 bits")
        return _eight_bit(values if high <= 255 else values / 257.0)
    values = np.asarray(image, dtype=np.float64)  # "F", the last of _DEEP_MODES
    if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
        raise ValueError("floating-point pixels outside [0, 1]: no known scale to 8 bits")
    return _eight_bit(values * 255.0)


def _eight_bit(values: Any) -> Image.Image:
    """8-bit grayscale values (a float numpy array), rounded, as RGB."""
    import numpy as np

    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L").convert("RGB")


def read_header(source: ImageSource, exif: str = "apply") -> ImageInfo:
    """The size as read_image would give it, from the header alone (no pixels decoded); OSError/ValueError.

    A PNG's orientation is seen here only when its eXIf chunk comes before the pixels (where writers put it):
    Pillow finds a later one only by decoding the image. The records use read_image, which always finds it."""
    with source.open() as opened:
        exif_data = Image.Image.getexif(opened)  # the base method: PNG's own would decode the pixels to look
        orientation = _orientation(exif_data)
        width, height = opened.size
    applied = exif == "apply" and orientation in _TURNS
    size = (height, width) if applied and orientation in _SWAPS_SIDES else (width, height)
    return ImageInfo(size, orientation, applied)


def _orientation(exif: Image.Exif) -> int:
    value = exif.get(ORIENTATION_TAG, 1)
    return value if isinstance(value, int) else 1
