"""The grounding dataset: its one reader, used by the worker (to evaluate), the memory estimate (prompt lengths,
image sizes), the progress display (how many samples) and the report (which image is which).

`dataset = PATH` picks the reader from what it finds there (`dataset_format` forces one):

    jsonl    a file of JSON lines (any name but .json, .parquet, .arrow; a .json file whose first line is a whole
             object without "annotations")                                          readers.JsonLines
    coco     a .json file with "images", "annotations" and "categories"                  readers.Coco
    parquet  a .parquet file, a folder of them, or a glob ("data/val-*.parquet")          columnar (pyarrow)
    arrow    a folder written by `datasets`' save_to_disk (state.json + .arrow files), or one .arrow file

Ground truth is always xyxy pixels once read: `bbox_format` says what the dataset stores (default: the format's
own: xywh for COCO and RefCOCO, xyxy otherwise). A box with no width or height, or (once the image is read)
outside it by more than 1 px, is a per-sample error, never scored.

Which samples: `ids` (a list, or a file of ids, one a line) keeps those named; `sample = N` then draws N of them at
random, the same N on every run for a given `seed`; `limit` then keeps the first N (file order throughout). A bad
row counts like any other, so every reader (worker, estimate, progress) counts the same samples; what a previous
attempt recorded (`skip_ids`) is left out last. Samples stream: no reader holds the set, or its images, whole.
"""

from __future__ import annotations

import glob as globbing
import hashlib
import json
import random
import re
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from PIL import Image

from .columnar import ArrowTable, Columnar, ParquetTable
from .images import NO_IMAGE_RECORD, ImageInfo, ImageSource, read_header, read_image
from .readers import Coco, JsonLines
from .samples import DatasetError, Sample, SampleId, id_text, template_fields

if TYPE_CHECKING:
    from .recipe import Settings


DATASET_FORMATS = ("auto", "jsonl", "coco", "parquet", "arrow")
# The settings that decide which samples a recipe reads, and how (recipes sharing them share one check).
DATASET_SETTINGS = ("dataset", "dataset_format", "bbox_format", "exif", "image_root", "ids", "sample", "seed", "limit",
                    "prompt")
BOX_TOLERANCE = 1.0  # pixels a ground-truth box may stick out of its image (rounding in annotation tools)
_SHARD = re.compile(r"^(?P<split>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.parquet$")  # the hub's shard names


class Dataset:
    """The samples a recipe evaluates, re-iterable: each pass reads the files again, in order."""

    def __init__(self, reader: Any, settings: Settings | None = None, skip_ids: Iterable[SampleId] = (),
                 source: str = "the dataset") -> None:
        self.reader, self.source = reader, source
        self.format: str = reader.format
        self.bbox_format: str = getattr(settings, "bbox_format", None) or reader.bbox_format
        self.exif: str = getattr(settings, "exif", "apply")
        self.ids = read_ids(getattr(settings, "ids", None))
        self.sample, self.seed = getattr(settings, "sample", None), getattr(settings, "seed", 0)
        self.limit: int | None = getattr(settings, "limit", None)
        self.skip_ids = frozenset(id_text(i) for i in skip_ids)
        self._drawn: frozenset[int] | None = None

    def describe(self) -> str:
        """The reader and box format chosen: what `plan` shows, so a wrong guess is seen before a run."""
        kind = self.reader.describe() if hasattr(self.reader, "describe") else self.format
        return f"{kind}, boxes {self.bbox_format}, EXIF orientation {'applied' if self.exif == 'apply' else 'ignored'}"

    def __iter__(self) -> Iterator[Sample]:
        return self.samples()

    def samples(self, images: bool = True) -> Iterator[Sample]:
        """The selected samples in file order. images=False leaves embedded images unread until asked for (an
        ImageSource that reads its row on demand): for counting, ids and the gallery's few pictures."""
        drawn = self._draw() if self.sample is not None else None
        kept = 0
        for position, sample in enumerate(self._candidates(images)):
            if drawn is not None and position not in drawn:
                continue
            if self.limit is not None and kept >= self.limit:
                return
            kept += 1
            if id_text(sample.id) not in self.skip_ids:
                yield sample

    def count(self) -> int:
        return sum(1 for _ in self.samples(images=False))

    def _candidates(self, images: bool) -> Iterator[Sample]:
        """The rows `ids` keeps, each id once: every record, resume and comparison is keyed by the id, so a second
        sample of one id would be evaluated and then silently dropped (a DatasetError naming both places)."""
        rows = self.reader.rows(self.bbox_format, images)
        first: dict[str, str] = {}
        for sample in rows if self.ids is None else (s for s in rows if id_text(s.id) in self.ids):
            key = id_text(sample.id)
            if key in first:
                raise DatasetError(f"{self.source}: id {key!r} at {first[key]} and again at "
                                   f"{sample.where or 'a later row'}; ids must be unique (records, --resume and "
                                   "comparisons go by them; 5 and \"5\" are the same id)")
            first[key] = sample.where or "an earlier row"
            yield sample

    def _draw(self) -> frozenset[int]:
        """Which candidates `sample = N` keeps: N positions drawn with the seed (all when there are fewer)."""
        if self._drawn is None:
            total = sum(1 for _ in self._candidates(images=False))
            self._drawn = frozenset(random.Random(self.seed).sample(range(total), min(self.sample or 0, total)))
        return self._drawn


def open_dataset(path: str | Path, settings: Settings | None = None, *,
                 skip_ids: Iterable[SampleId] = ()) -> Dataset:
    """The dataset at `path` as the recipe's settings read it; DatasetError when it cannot be read at all."""
    fmt = getattr(settings, "dataset_format", "auto")
    root = getattr(settings, "image_root", None)
    return Dataset(_reader(str(path), fmt, Path(root) if root else None), settings, skip_ids, str(path))


def _reader(path: str, fmt: str, image_root: Path | None) -> Any:
    found = Path(path)
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "jsonl":
        return JsonLines(found, image_root)
    if fmt == "coco":
        return Coco(found, image_root)
    if fmt == "parquet":
        return Columnar([ParquetTable(p) for p in parquet_files(path)], "parquet", image_root)
    if fmt == "arrow":
        return Columnar([ArrowTable(p) for p in arrow_files(found)], "arrow", image_root)
    raise DatasetError(f"unknown dataset_format {fmt!r}; known: {', '.join(DATASET_FORMATS)}")


def detect_format(path: str) -> str:
    """Which reader `path` needs, from its name, its first bytes and, for folders, what they hold."""
    found = Path(path)
    if is_glob(path) or found.suffix == ".parquet":
        return "parquet"
    if found.is_dir():
        if (found / "state.json").is_file() or (found / "dataset_dict.json").is_file():
            return "arrow"
        if any(found.glob("*.parquet")):
            return "parquet"
        hint = " (its data/ folder holds parquet files: name the split, e.g. data/val-*.parquet)" \
            if any(found.glob("data/*.parquet")) else ""
        raise DatasetError(f"{found}: a folder without parquet files or a save_to_disk dataset{hint}")
    if not found.is_file():
        raise DatasetError(f"{found}: not found")
    if found.suffix == ".arrow":
        return "arrow"
    try:
        with open(found, "rb") as file:
            head = file.read(4)
            first = head + file.readline()
    except OSError as exc:
        raise DatasetError(f"{found}: {exc}") from exc
    if head == b"PAR1":
        return "parquet"
    return "coco" if found.suffix == ".json" and _coco_like(first) else "jsonl"


def _coco_like(first_line: bytes) -> bool:
    """A .json file is COCO unless its first line is a whole object without COCO's lists (JSON lines misnamed)."""
    try:
        head = json.loads(first_line)
    except ValueError:
        return True  # an object spread over lines: one JSON document
    return not isinstance(head, dict) or "annotations" in head or "images" in head


def is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def parquet_files(path: str) -> list[Path]:
    """The parquet files `path` names (a file, a folder of them, a glob), in name order; a mix of the hub's
    splits, a shard missing or copies in several folders (two snapshots) is refused, never read as one set."""
    found = Path(path)
    files = sorted(Path(p) for p in globbing.glob(path)) if is_glob(path) else \
        sorted(found.glob("*.parquet")) if found.is_dir() else [found]
    if not files:
        raise DatasetError(f"{path}: no parquet files")
    folders = sorted({str(p.parent) for p in files})
    if len(folders) > 1:
        raise DatasetError(f"{path}: matches files in {len(folders)} folders ({', '.join(folders)}): name one")
    shards: dict[str, set[int]] = {}
    counts: dict[str, int] = {}
    for file in files:
        if match := _SHARD.match(file.name):
            shards.setdefault(match["split"], set()).add(int(match["index"]))
            counts[match["split"]] = int(match["count"])
    if len(shards) > 1:
        raise DatasetError(f"{path}: holds several splits ({', '.join(sorted(shards))}): name one, e.g. "
                           f"{files[0].parent / (sorted(shards)[0] + '-*.parquet')}")
    for split, indexes in shards.items():
        missing = sorted(set(range(counts[split])) - indexes)
        if missing:
            raise DatasetError(f"{path}: split '{split}' has {counts[split]} shards, shard(s) {missing} missing")
    return files


def arrow_files(path: Path) -> list[Path]:
    """The arrow files of a save_to_disk folder (state.json lists them), or the one .arrow file."""
    if path.is_file():
        return [path]
    if (path / "dataset_dict.json").is_file():
        splits = [p.name for p in sorted(path.iterdir()) if (p / "state.json").is_file()]
        raise DatasetError(f"{path}: a DatasetDict (several splits): point at one of its folders "
                           f"({', '.join(splits) or 'none found'})")
    try:
        state = json.loads((path / "state.json").read_text())
        files = [path / entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path / 'state.json'}: not a save_to_disk state file ({exc})") from exc
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise DatasetError(f"{path}: arrow file(s) missing: {', '.join(missing) or 'none listed in state.json'}")
    return files


def dataset_exists(path: str | Path) -> bool:
    return bool(globbing.glob(str(path))) if is_glob(str(path)) else Path(path).exists()


def read_ids(ids: list[str] | str | None) -> frozenset[str] | None:
    """The ids a recipe names: its list, or the lines of its ids file (blank lines and lines starting with # are
    skipped; a # inside a line is part of the id, as in RefCOCO's "<question_id>#<k>")."""
    if ids is None:
        return None
    if isinstance(ids, str):
        try:
            lines = Path(ids).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise DatasetError(f"ids file {ids}: {exc}") from exc
        return frozenset(s for line in lines if (s := line.strip()) and not s.startswith("#"))
    return frozenset(str(i) for i in ids)


# ------------------------------------------------------------------------------------ checks before a run

def dataset_problems(settings: Settings) -> list[tuple[str, str]]:
    """(field, problem) for what would make every sample fail, found before anything runs: a dataset that cannot
    be read, a prompt placeholder no sample has, ids the dataset lacks."""
    return list(_problems(settings.model_dump_json(include=set(DATASET_SETTINGS)), dataset_stamp(settings)))


@lru_cache(maxsize=32)
def _problems(settings_json: str, _stamp: tuple) -> tuple[tuple[str, str], ...]:
    from .recipe import Settings  # lazily: recipe imports from this package's samples only

    settings = Settings.model_validate_json(settings_json)
    try:
        dataset = open_dataset(settings.dataset or "", settings)
        wanted = set(template_fields(settings.prompt)) - {"id"}
        known = dataset.reader.fields()
        scan = _scan(dataset, wanted if known is None else set(), dataset.ids is not None or dataset.sample is not None)
        dataset.count()  # every sample it selects read once, without images: an id given twice is refused here
    except (DatasetError, ValueError) as exc:
        return (("dataset", str(exc)),)
    found = scan["found"] | ((known or set()) & wanted) if scan["usable"] or known is not None else wanted
    hint = " (the dataset's own fields may be used: {caption}, {question}...)"
    problems = [("prompt", f"uses {{{name}}}, which no sample of {settings.dataset} has" + hint * (name == "prompt"))
                for name in sorted(wanted - found)]
    missing = sorted(dataset.ids - scan["ids"]) if dataset.ids is not None else []
    if missing:
        problems.append(("ids", f"{len(missing)} id(s) not in {settings.dataset}: {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else "")))
    if dataset.sample is not None and dataset.sample > scan["candidates"]:
        problems.append(("sample", f"draws {dataset.sample} samples from {scan['candidates']}"
                         + (" (after ids)" if dataset.ids is not None else "")))
    return tuple(problems)


def _scan(dataset: Dataset, wanted: set[str], rows: bool) -> dict[str, Any]:
    """In one pass without images: the wanted fields some usable sample has (and whether any is usable: an
    empty set lacks nothing), every id, and how many samples `ids` keeps (when `rows`)."""
    found: set[str] = set()
    ids: set[str] = set()
    candidates = usable = 0
    if wanted or rows:
        for sample in dataset.reader.rows(dataset.bbox_format, images=False):
            ids.add(id_text(sample.id))
            candidates += dataset.ids is None or id_text(sample.id) in dataset.ids
            if sample.error is None:
                usable += 1
                found |= {name for name in wanted - found if _value(sample, name) is not None}
    return {"found": found, "ids": ids, "candidates": candidates, "usable": usable}


def dataset_stamp(settings: Settings) -> tuple:
    """The sizes and times of the dataset's files (a folder's too) and of its ids file: caches keyed by it read
    a dataset changed on disk again."""
    paths = [settings.dataset or ""] + ([settings.ids] if isinstance(settings.ids, str) else [])
    files = [f for p in paths for f in (sorted(globbing.glob(p)) if is_glob(p) else [p])]
    files += [str(child) for f in files if Path(f).is_dir() for child in sorted(Path(f).iterdir())]
    stamps: list[tuple[str, int | None, int | None]] = []
    for file in files:
        try:
            stat = Path(file).stat()
            stamps.append((file, stat.st_mtime_ns, stat.st_size))
        except OSError:
            stamps.append((file, None, None))
    return tuple(stamps)


# -------------------------------------------------------------------------------------- one sample

INPUT_KEY = "input_key"  # a sample record's field: sample_key of what the worker read (None in older records)


def sample_key(sample: Sample) -> str:
    """What a sample's record depends on in the dataset, as a short hash: its id, ground truth (as read, in xyxy),
    prompt, fields, declared size and reading error, and its image (a file by path, size and modification time; an
    embedded image by its bytes). The worker records it with every sample; a resume computes it again from the
    dataset as it is now, and evaluates again a sample whose key differs (contract: the same on both sides)."""
    payload = [sample.id, _image_identity(sample.image), sample.bbox, sample.prompt, sample.fields,
               list(sample.declared_size) if sample.declared_size else None, sample.error]
    return hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)).hexdigest()[:16]


def _image_identity(source: ImageSource | None) -> list[Any] | str | None:
    if source is None:
        return None
    if source.path is not None:
        try:
            found = source.path.stat()
        except OSError as exc:
            return [str(source.path), exc.errno]
        return [str(source.path), found.st_size, found.st_mtime_ns]
    try:
        return hashlib.sha256(source.read_bytes()).hexdigest()
    except OSError as exc:
        return ["unreadable", str(source), exc.errno]

def check_gt(sample: Sample, info: ImageInfo) -> str | None:
    """Why the sample's ground truth cannot be scored against its image as read, or None."""
    if sample.declared_size is not None and tuple(sample.declared_size) != info.size:
        width, height = sample.declared_size
        hint = " (set exif = \"ignore\" if the boxes were drawn on the pixels as stored)" if info.applied else \
            " (set exif = \"apply\" if the boxes were drawn on the upright image)" if info.orientation != 1 else ""
        return f"sample {sample.id}: the dataset says its image is {width}x{height}, read it is {info.describe}{hint}"
    if sample.bbox is None:
        return f"sample {sample.id}: no ground-truth box"
    x1, y1, x2, y2 = sample.bbox
    width, height = info.size
    if x1 < -BOX_TOLERANCE or y1 < -BOX_TOLERANCE or x2 > width + BOX_TOLERANCE or y2 > height + BOX_TOLERANCE:
        return (f"sample {sample.id}: ground-truth box {sample.box_text()} lies outside its image "
                f"({info.describe}) by more than {BOX_TOLERANCE:g} px")
    return None


def load_image(sample: Sample, exif: str = "apply") -> Image.Image:
    """The sample's image as RGB, upright unless exif is "ignore"; OSError/ValueError with a readable message."""
    return read_sample_image(sample, exif)[0]


def read_sample_image(sample: Sample, exif: str = "apply") -> tuple[Image.Image, ImageInfo]:
    if sample.image is None:
        raise OSError("no image")
    return read_image(sample.image, exif)


def image_size(source: ImageSource | Path | None, exif: str = "apply") -> tuple[int, int] | None:
    """(width, height) as read (upright unless exif is "ignore"), from the header alone; None when unreadable."""
    if source is None:
        return None
    try:
        return read_header(source if isinstance(source, ImageSource) else ImageSource.file(source), exif).size
    except (OSError, ValueError):
        return None


def image_record(info: ImageInfo | None) -> dict:
    """What a sample record carries about its image: size as read, EXIF orientation, whether it was applied."""
    return info.record() if info is not None else dict(NO_IMAGE_RECORD)


def render_prompt(template: str, sample: Sample, *, strict: bool = True) -> str:
    """The recipe's prompt template filled with the sample's fields ({prompt}, {id}, and the dataset's own).
    strict: a field the sample lacks raises KeyError naming it (the worker records it); else it renders empty
    (the estimate)."""
    values = {name: _value(sample, name) for name in template_fields(template)}
    missing = [name for name, value in values.items() if value is None]
    if strict and missing:
        raise KeyError(f"the recipe's prompt uses {{{missing[0]}}} but sample {sample.id} has no '{missing[0]}'")
    return template.format_map({name: "" if value is None else str(value) for name, value in values.items()})


def _value(sample: Sample, name: str) -> Any:
    if name == "prompt":
        return sample.prompt or None
    if name == "id":
        return sample.id
    return sample.fields.get(name)


# ---------------------------------------------------------------------------------- for tests and scripts

def iter_samples(path: Path | str, *, limit: int | None = None, settings: Settings | None = None) -> Iterator[Sample]:
    """The dataset's samples in file order, the first `limit` of them (streamed)."""
    dataset = open_dataset(path, settings)
    dataset.limit = limit if limit is not None else dataset.limit
    return dataset.samples()


def read_dataset(path: Path | str, *, limit: int | None = None, skip_ids: set[SampleId] | None = None,
                 settings: Settings | None = None) -> list[Sample]:
    """Every selected sample as a list: for small sets (tests, scripts); the worker streams (open_dataset)."""
    dataset = open_dataset(path, settings, skip_ids=skip_ids or ())
    dataset.limit = limit if limit is not None else dataset.limit
    return list(dataset)
