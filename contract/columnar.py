"""The columnar readers: parquet files, and the arrow files of a `datasets` save_to_disk folder, read with pyarrow
(an optional dependency: pip install 'evalorch[data]') a batch of rows at a time, never whole.

Columns: "image" (a {"bytes", "path"} struct as `datasets` stores images, bytes, or a path), "bbox", an id ("id",
"question_id" or "sample_id"; else "row<N>", counting from 0) and "prompt"; every other scalar column is a field
for prompt templates. The lmms-lab RefCOCO / RefCOCO+ / RefCOCOg layout (question_id, image, question, answer,
bbox, no prompt) is recognised: its boxes are xywh, and "answer" lists the referring expressions, one sample each,
"<question_id>#<k>" (its "question" is a captioning instruction, not a referring expression). A prompt column that
holds lists is read the same way in any table.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from .images import ImageSource
from .samples import DatasetError, Sample, read_box, read_id, scalar_fields

BATCH_ROWS = 64  # rows turned into Python objects at once (with their image bytes, in the worker)
ID_COLUMNS = ("id", "question_id", "sample_id")
REFCOCO_COLUMNS = frozenset({"question_id", "image", "question", "answer", "bbox"})
EXTRA = "pip install 'evalorch[data]' (or pip install pyarrow)"


def require_pyarrow(what: str) -> Any:
    """pyarrow, or a DatasetError saying how to get it."""
    try:
        import pyarrow
    except ImportError:
        raise DatasetError(f"{what}: reading parquet or arrow files needs pyarrow, an optional dependency: "
                           f"{EXTRA}") from None
    return pyarrow


class ParquetTable:
    """One parquet file; opened again for each pass (reading the footer is cheap)."""

    def __init__(self, path: Path) -> None:
        require_pyarrow(str(path))
        import pyarrow.parquet as pq

        self.path = path
        try:
            meta = pq.ParquetFile(path).metadata
            self.schema = pq.read_schema(path)
        except Exception as exc:  # pyarrow's errors (ArrowInvalid...) are not all OSErrors
            raise DatasetError(f"{path}: not a readable parquet file ({exc})") from exc
        self.group_rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]

    def batches(self, columns: list[str]) -> Iterator[Any]:
        """The rows a row group at a time, memory-mapped, one thread: memory stays that of one row group (a
        hundred images in `datasets`' files). iter_batches reads ahead: on a 20 MB file of 3 MB row groups its
        peak was 52 MB (32 MB on one thread), against 9.5 MB here."""
        import pyarrow.parquet as pq

        opened = pq.ParquetFile(self.path, memory_map=True, pre_buffer=False)
        try:
            for group in range(opened.metadata.num_row_groups):
                yield from opened.read_row_group(group, columns=columns, use_threads=False).to_batches(BATCH_ROWS)
        finally:
            opened.close()

    def cell(self, row: int, column: str) -> Any:
        """One value, reading only its row group's column."""
        import pyarrow.parquet as pq

        group = 0
        while row >= self.group_rows[group]:
            row -= self.group_rows[group]
            group += 1
        opened = pq.ParquetFile(self.path, memory_map=True, pre_buffer=False)
        try:
            return opened.read_row_group(group, columns=[column], use_threads=False).column(0)[row].as_py()
        finally:
            opened.close()


class ArrowTable:
    """One arrow IPC file (the stream format `datasets` writes, or the file format), memory-mapped: a pass reads
    only the pages of the columns it selects."""

    def __init__(self, path: Path) -> None:
        pa = require_pyarrow(str(path))
        self.path = path
        try:
            with pa.memory_map(str(path)) as source:
                self.schema = self._open(source).schema
        except Exception as exc:
            raise DatasetError(f"{path}: not a readable arrow file ({exc})") from exc

    @staticmethod
    def _open(source: Any) -> Any:
        import pyarrow as pa

        try:
            return pa.ipc.open_file(source)
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_stream(source)

    def _batches(self, source: Any) -> Iterator[Any]:
        reader = self._open(source)
        if hasattr(reader, "num_record_batches"):
            for index in range(reader.num_record_batches):
                yield reader.get_batch(index)
        else:
            yield from reader

    def batches(self, columns: list[str]) -> Iterator[Any]:
        import pyarrow as pa

        with pa.memory_map(str(self.path)) as source:
            for batch in self._batches(source):
                yield batch.select(columns)

    def cell(self, row: int, column: str) -> Any:
        import pyarrow as pa

        with pa.memory_map(str(self.path)) as source:
            for batch in self._batches(source):
                if row < batch.num_rows:
                    return batch.column(column)[row].as_py()
                row -= batch.num_rows
        raise OSError(f"{self.path}: no row {row}")


class Columnar:
    """The samples of one or more tables of one schema, in order."""

    def __init__(self, tables: list[ParquetTable] | list[ArrowTable], format: str,
                 image_root: Path | None = None) -> None:
        import pyarrow as pa

        self.tables, self.format, self.image_root = tables, format, image_root
        schema = tables[0].schema
        names = schema.names
        for table in tables[1:]:
            if table.schema.names != names:
                raise DatasetError(f"{table.path}: its columns {table.schema.names} differ from {tables[0].path}'s "
                                   f"{names}")
        for needed in ("image", "bbox"):
            if needed not in names:
                raise DatasetError(f"{tables[0].path}: no '{needed}' column (columns: {', '.join(names)})")
        self.refcoco = set(names) >= REFCOCO_COLUMNS and "prompt" not in names
        self.bbox_format = "xywh" if self.refcoco else "xyxy"
        self.prompt_column = "prompt" if "prompt" in names else "answer" if self.refcoco else None
        self.id_column = next((c for c in ID_COLUMNS if c in names), None)
        prompt_type = schema.field(self.prompt_column).type if self.prompt_column else None
        self.explode = prompt_type is not None and (pa.types.is_list(prompt_type) or pa.types.is_large_list(
            prompt_type))
        scalar = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer, pa.types.is_floating,
                  pa.types.is_boolean)
        self.scalars = [f.name for f in schema if f.name != "image" and any(test(f.type) for test in scalar)]
        self.columns = list(dict.fromkeys([*self.scalars, "bbox", *filter(None, [self.prompt_column])]))

    def describe(self) -> str:
        layout = ", the lmms-lab RefCOCO layout (one sample per referring expression)" if self.refcoco else ""
        return f"{self.format}{layout}"

    def fields(self) -> frozenset[str] | None:
        found = {*self.scalars, "id"}
        if self.prompt_column:
            found |= {"prompt", self.prompt_column}
        return frozenset(found)

    def rows(self, bbox_format: str, images: bool = True) -> Iterator[Sample]:
        import pyarrow as pa

        columns = [*self.columns, "image"] if images else self.columns
        index = 0
        for table in self.tables:
            row = 0
            try:
                for batch in table.batches(columns):
                    for values in batch.to_pylist():
                        yield from self._samples(table, row, index, values, bbox_format, images)
                        row += 1
                        index += 1
            except (pa.ArrowException, OSError) as exc:
                raise DatasetError(f"{table.path}: cannot be read past row {row} ({exc})") from exc

    def _samples(self, table: Any, row: int, index: int, values: dict[str, Any], bbox_format: str,
                 images: bool) -> Iterator[Sample]:
        where = f"{table.path.name} row {row}"
        given_id = values.get(self.id_column) if self.id_column else None
        sample_id, id_problem = read_id(given_id, f"row{index}") if given_id is not None else (f"row{index}", None)
        image, image_problem = self._image(table, row, values, where) if images else \
            (ImageSource.deferred(partial(self._fetch, table, row), where), None)
        box, given, box_problem = read_box(values.get("bbox"), bbox_format)
        fields = scalar_fields(values)
        problems = [p for p in (image_problem, box_problem, id_problem) if p]
        prompts = values.get(self.prompt_column) if self.prompt_column else None
        if not self.explode:
            prompts, ids = [prompts], [sample_id]
        elif not prompts:
            problems.append(f"no entries in '{self.prompt_column}'")
            prompts, ids = [None], [sample_id]
        else:
            ids = [f"{sample_id}#{k}" for k in range(len(prompts))]
        for entry_id, prompt in zip(ids, prompts, strict=True):
            text = prompt if isinstance(prompt, str) else None
            entry_fields = fields
            if self.explode and self.prompt_column is not None and text is not None:  # explode implies a column
                entry_fields = {**fields, self.prompt_column: text}
            yield Sample(entry_id, image, box, text, f"{where}: " + "; ".join(problems) if problems else None,
                         fields=entry_fields, given_bbox=given, bbox_format=bbox_format, where=where)

    def _image(self, table: Any, row: int, values: dict[str, Any], where: str) -> tuple[ImageSource | None,
                                                                                         str | None]:
        value = values.get("image")
        if isinstance(value, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
            if value.get("bytes") is not None:
                return ImageSource.embedded(value["bytes"], where), None
            value = value.get("path")
        if isinstance(value, bytes):
            return ImageSource.embedded(value, where), None
        if isinstance(value, str) and value:
            return ImageSource.file((self.image_root or table.path.parent) / value), None
        return None, "no image (the 'image' value is empty)"

    def _fetch(self, table: Any, row: int) -> bytes:
        """The image bytes of one row, read on demand (the parent's gallery)."""
        try:
            value = table.cell(row, "image")
        except Exception as exc:
            raise OSError(f"{table.path} row {row}: {exc}") from exc
        source, problem = self._image(table, row, {"image": value}, f"{table.path.name} row {row}")
        if source is None:
            raise OSError(problem)
        return source.read_bytes()
