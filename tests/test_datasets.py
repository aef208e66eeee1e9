"""The datasets people already have: JSON lines, COCO JSON, lmms-lab RefCOCO parquet, a `datasets` save_to_disk
folder; xywh boxes; phone photos with an EXIF orientation; subsets; checked ground truth. Every fixture is written
here, and every expected size and box is worked out here, not by the code under test."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ROOT, only_run_dir, run_cli, write_recipes
from PIL import Image, ImageDraw

from contract.boxes import score_text
from contract.dataset import (
    DatasetError,
    ImageSource,
    Sample,
    check_gt,
    dataset_problems,
    open_dataset,
    read_sample_image,
    render_prompt,
)
from contract.images import read_header
from contract.recipe import Settings
from orchestrator.planning.recipes import RecipeFileError, load_recipe_file
from orchestrator.results.store import read_samples

UPRIGHT = (96, 64)  # (width, height) of every picture as people see it
BOX = [6.0, 4.0, 50.0, 20.0]  # the red object, xyxy in the upright picture (asymmetric: a turn moves it away)
XYWH = [6.0, 4.0, 44.0, 16.0]
REFCOCO_QUESTION = "Please carefully observe the area circled in the image and come up with a caption for the area."
# What to do to the upright pixels so that a viewer turning them by EXIF orientation n shows them upright again:
# the inverse of each orientation's display transform (EXIF 2.3, Orientation tag), written out by hand.
T = Image.Transpose
STORE = {1: None, 2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_90,
         7: T.TRANSVERSE, 8: T.ROTATE_270}


def upright_picture() -> Image.Image:
    image = Image.new("RGB", UPRIGHT, (255, 255, 255))
    ImageDraw.Draw(image).rectangle([BOX[0], BOX[1], BOX[2] - 1, BOX[3] - 1], fill=(230, 20, 20))
    return image


def phone_jpeg(orientation: int) -> bytes:
    """A JPEG as a phone writes it: pixels stored sideways (or mirrored), the EXIF Orientation tag saying how to
    show them; shown that way it is upright_picture()."""
    stored = upright_picture() if STORE[orientation] is None else upright_picture().transpose(STORE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=95, subsampling=0, exif=exif)
    return buffer.getvalue()


def png(size: tuple[int, int] = UPRIGHT) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 200, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def red_box(image: Image.Image) -> list[float]:
    """Where the red object is in the pixels a model is shown: what a perfect model answers."""
    pixels = np.asarray(image.convert("RGB")).astype(int)
    ys, xs = np.nonzero((pixels[..., 0] > 150) & (pixels[..., 1] < 100) & (pixels[..., 2] < 100))
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def qwen_answer(box: list[float], size: tuple[int, int]) -> str:
    w, h = size
    x1, y1, x2, y2 = (round(v * 1000 / s) for v, s in zip(box, (w, h, w, h), strict=True))
    return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"


def write_phone_photos(folder: Path) -> dict[int, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for n in range(1, 9):
        paths[n] = folder / f"photo{n}.jpg"
        paths[n].write_bytes(phone_jpeg(n))
    return paths


IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def refcoco_table(rows: list[dict]) -> pa.Table:
    """The lmms-lab RefCOCO parquet layout: question_id, image {bytes, path}, question, answer [refexps],
    segmentation, bbox [x, y, w, h] (float32), iscrowd, file_name."""
    return pa.table({
        "question_id": pa.array([r["question_id"] for r in rows], pa.string()),
        "image": pa.array([r["image"] for r in rows], IMAGE_TYPE),
        "question": pa.array([REFCOCO_QUESTION] * len(rows), pa.string()),
        "answer": pa.array([r["answer"] for r in rows], pa.list_(pa.string())),
        "segmentation": pa.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]] * len(rows), pa.list_(pa.float32())),
        "bbox": pa.array([r["bbox"] for r in rows], pa.list_(pa.float32())),
        "iscrowd": pa.array([0] * len(rows), pa.int8()),
        "file_name": pa.array([f"COCO_train2014_{i:012d}.jpg" for i in range(len(rows))], pa.string()),
    })


def refcoco_rows() -> list[dict]:
    """Phone photos in each orientation (one with two referring expressions), and the rows that must each end as
    a recorded per-sample error."""
    rows = [{"question_id": f"q{n}", "image": {"bytes": phone_jpeg(n), "path": f"photo{n}.jpg"},
             "answer": ["the red box", "the red rectangle"] if n == 3 else ["the red box"], "bbox": XYWH}
            for n in range(1, 9)]
    rows += [
        {"question_id": "outside", "image": {"bytes": png(), "path": None}, "answer": ["x"], "bbox": [60, 40, 44, 30]},
        {"question_id": "flat", "image": {"bytes": png(), "path": None}, "answer": ["x"], "bbox": [10, 10, 0, 5]},
        {"question_id": "noimage", "image": {"bytes": None, "path": None}, "answer": ["x"], "bbox": XYWH},
        {"question_id": "broken", "image": {"bytes": b"not an image", "path": None}, "answer": ["x"], "bbox": XYWH},
        {"question_id": "short", "image": {"bytes": png(), "path": None}, "answer": ["x"], "bbox": [1, 2, 3]},
        # drawn on the pixels as stored (64 wide, 96 high): outside the upright picture, which is 64 high
        {"question_id": "sideways", "image": {"bytes": phone_jpeg(6), "path": None}, "answer": ["x"],
         "bbox": [10, 60, 30, 30]},
        {"question_id": "noexpr", "image": {"bytes": png(), "path": None}, "answer": [], "bbox": XYWH},
    ]
    return rows


# -------------------------------------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_images_are_read_upright_and_their_size_is_the_upright_size(tmp_path: Path, orientation: int) -> None:
    path = write_phone_photos(tmp_path)[orientation]
    stored = Image.open(path).size
    assert stored == (UPRIGHT if orientation < 5 else UPRIGHT[::-1])  # the fixture really is stored sideways
    sample = Sample("s", path, BOX, "the red box")
    image, info = read_sample_image(sample)
    assert image.size == info.size == UPRIGHT
    assert info.orientation == orientation and info.applied == (orientation != 1)
    assert read_header(sample.image).size == UPRIGHT  # the header alone gives the same size (estimate, sort)
    assert red_box(image) == pytest.approx(BOX, abs=1)
    assert check_gt(sample, info) is None


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_ignore_reads_the_pixels_as_stored(tmp_path: Path, orientation: int) -> None:
    path = write_phone_photos(tmp_path)[orientation]
    image, info = read_sample_image(Sample("s", path, BOX, "p"), "ignore")
    assert image.size == info.size == Image.open(path).size
    assert info.orientation == orientation and not info.applied
    assert read_header(ImageSource.file(path), "ignore").size == image.size


# ------------------------------------------------------------------------------------------- ground truth


def test_xywh_boxes_become_xyxy_and_bad_boxes_are_per_sample_errors(tmp_path: Path) -> None:
    rows = [{"id": "good", "image": "a.png", "bbox": XYWH, "prompt": "p"},
            {"id": "flat", "image": "a.png", "bbox": [5, 5, 0, 10], "prompt": "p"},
            {"id": "negative", "image": "a.png", "bbox": [5, 5, -3, 10], "prompt": "p"},
            {"id": "nan", "image": "a.png", "bbox": [5, 5, float("nan"), 10], "prompt": "p"},
            {"id": "words", "image": "a.png", "bbox": ["5", 5, 3, 10], "prompt": "p"},
            {"id": "bools", "image": "a.png", "bbox": [True, 5, 3, 10], "prompt": "p"}]
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = {s.id: s for s in open_dataset(path, Settings(bbox_format="xywh"))}
    assert samples["good"].bbox == BOX and samples["good"].error is None
    assert "[5, 5, 5, 15] (xyxy, from xywh [5, 5, 0, 10]) has no width or height" in samples["flat"].error
    assert "no width or height" in samples["negative"].error
    assert "not a finite number" in samples["nan"].error
    assert "not four numbers" in samples["words"].error and "not four numbers" in samples["bools"].error
    as_corners = {s.id: s for s in open_dataset(path, Settings())}  # the default for JSON lines: xyxy
    assert as_corners["good"].bbox == XYWH and as_corners["good"].error is None


def test_a_box_outside_its_image_by_more_than_a_pixel_is_an_error_naming_id_and_box(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png((40, 30)))
    info = read_sample_image(Sample("x", tmp_path / "a.png", [0, 0, 1, 1], "p"))[1]
    assert check_gt(Sample("edge", tmp_path / "a.png", [-1.0, -0.5, 41.0, 31.0], "p"), info) is None  # 1 px slack
    problem = check_gt(Sample("far", tmp_path / "a.png", [0.0, 0.0, 41.5, 30.0], "p"), info)
    assert problem == "sample far: ground-truth box [0, 0, 41.5, 30] (xyxy) lies outside its image (40x30) by " \
        "more than 1 px"


def test_a_perfect_answer_scores_1_only_when_the_image_is_read_upright(demo: dict, tmp_path: Path) -> None:
    """Through the worker's own batch preparation, with the demo's real processor: a model that finds the object
    where it is in the pixels it is shown scores IoU ~1 on every orientation when images are read upright; read
    as stored, only orientation 1 survives (the others score near 0 against ground truth drawn upright)."""
    from transformers import AutoProcessor

    from worker.device import CPU
    from worker.inference.infer import prepare_batch, scored_record

    photos = write_phone_photos(tmp_path)
    (tmp_path / "set.jsonl").write_text("".join(json.dumps({"id": f"o{n}", "image": p.name, "bbox": BOX,
                                                            "prompt": "the red box"}) + "\n"
                                                for n, p in photos.items()))
    processor = AutoProcessor.from_pretrained(demo["models"]["base"])
    for exif in ("apply", "ignore"):
        samples = list(open_dataset(tmp_path / "set.jsonl", Settings(exif=exif)))
        batch = prepare_batch(processor, samples, "{prompt}", CPU, exif=exif)
        assert not batch.errors  # 96x64 and 64x96 both hold the box: nothing tells them apart but the pixels
        for item in batch.items:
            record = scored_record(item, qwen_answer(red_box(item.image), item.image.size), "qwen2vl", 0.0)
            n = int(item.sample.id[1:])
            assert record["gt"] == BOX and record["exif_orientation"] == n
            if exif == "apply" or n == 1:
                assert record["iou"] > 0.9 and record["image_size"] == list(UPRIGHT), (exif, n, record)
            else:
                assert record["iou"] < 0.3, (exif, n, record)


def test_the_image_cache_keeps_upright_and_stored_pixels_apart(demo: dict, tmp_path: Path) -> None:
    """One file read two ways gives two processor outputs: the cache must never hand one for the other."""
    from transformers import AutoProcessor

    from worker.device import CPU
    from worker.inference.image_cache import ProcessorCache
    from worker.inference.infer import prepare_batch

    photo = write_phone_photos(tmp_path)[6]
    (tmp_path / "set.jsonl").write_text(json.dumps({"id": "o6", "image": photo.name, "bbox": BOX, "prompt": "p"}))
    processor = AutoProcessor.from_pretrained(demo["models"]["base"])
    cache = ProcessorCache(tmp_path / "cache", processor)
    prepared = {}
    for exif in ("apply", "ignore", "apply"):
        samples = list(open_dataset(tmp_path / "set.jsonl", Settings(exif=exif)))
        prepared[exif] = prepare_batch(processor, samples, "{prompt}", CPU, cache=cache, exif=exif)
    assert (cache.misses, cache.hits) == (2, 1)  # the second upright read is the only hit
    grids = {exif: batch.inputs["image_grid_thw"].tolist() for exif, batch in prepared.items()}
    assert grids["apply"] != grids["ignore"]  # 96x64 against 64x96


# ------------------------------------------------------------------------------------------------- COCO


def write_coco(folder: Path) -> Path:
    photos = write_phone_photos(folder / "images")
    (folder / "images" / "plain.png").write_bytes(png())
    images = [{"id": n, "file_name": f"photo{n}.jpg", "width": UPRIGHT[0], "height": UPRIGHT[1]} for n in photos]
    images += [{"id": 20, "file_name": "plain.png", "width": 96, "height": 64},
               {"id": 21, "file_name": "photo6.jpg", "width": 64, "height": 96}]  # sizes of the stored pixels
    annotations = [{"id": 100 + n, "image_id": n, "category_id": 1, "bbox": XYWH, "area": 704, "iscrowd": 0}
                   for n in photos]
    annotations += [
        {"id": 200, "image_id": 20, "category_id": 2, "bbox": [1, 1, 10, 10], "caption": "the grey corner"},
        {"id": 201, "image_id": 99, "category_id": 1, "bbox": XYWH},  # no such image
        {"id": 202, "image_id": 20, "category_id": 1, "bbox": [1, 1, 10]},  # three numbers
        {"id": 203, "image_id": 20, "category_id": 1, "segmentation": [[1, 2, 3, 4]]},  # no box at all
        {"id": 204, "image_id": 21, "category_id": 1, "bbox": XYWH},  # annotated on the stored pixels
        "not an object",
    ]
    categories = [{"id": 1, "name": "red box", "supercategory": "shape"}, {"id": 2, "name": "corner"}]
    path = folder / "annotations" / "instances.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def test_coco_json_reads_one_sample_per_annotation_with_xywh_implied(tmp_path: Path) -> None:
    path = write_coco(tmp_path)
    dataset = open_dataset(path, Settings(image_root=str(tmp_path / "images")))
    assert dataset.format == "coco" and dataset.bbox_format == "xywh"
    samples = {s.id: s for s in dataset}
    assert len(samples) == 14 and "annotation14" in samples  # every annotation, the bad ones too
    for n in range(1, 9):
        sample = samples[100 + n]  # COCO's ids are numbers, and stay numbers
        assert sample.error is None and sample.bbox == BOX and sample.prompt == "red box"
        assert sample.fields["supercategory"] == "shape" and sample.fields["file_name"] == f"photo{n}.jpg"
        assert check_gt(sample, read_sample_image(sample)[1]) is None
    assert samples[200].prompt == "the grey corner" and samples[200].bbox == [1, 1, 11, 11]
    assert "image_id 99 is not in 'images'" in samples[201].error
    assert "not four numbers" in samples[202].error and "not four numbers" in samples[203].error
    assert "not a JSON object" in samples["annotation14"].error
    stored = samples[204]  # COCO says 64x96, read upright it is 96x64: the annotator saw the stored pixels
    problem = check_gt(stored, read_sample_image(stored)[1])
    assert "says its image is 64x96, read it is 96x64, EXIF orientation 6 applied" in problem
    assert 'exif = "ignore"' in problem
    assert check_gt(stored, read_sample_image(stored, "ignore")[1]) is None
    assert render_prompt("Find the {category} ({supercategory}), id {id}", samples[101]) == \
        "Find the red box (shape), id 101"
    chosen = open_dataset(path, Settings(image_root=str(tmp_path / "images"), ids=[102, "200"]))  # COCO's ints
    assert [s.id for s in chosen] == [102, 200]


def test_a_json_lines_file_named_json_is_still_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "set.json"
    path.write_text(json.dumps({"id": "a", "image": "a.png", "bbox": BOX, "prompt": "p"}) + "\n")
    assert open_dataset(path).format == "jsonl"
    assert open_dataset(path, Settings(dataset_format="jsonl")).format == "jsonl"
    with pytest.raises(DatasetError, match="not COCO-style JSON"):
        open_dataset(path, Settings(dataset_format="coco"))


# ------------------------------------------------------------------------------------------------ parquet


def test_refcoco_parquet_is_read_in_the_lmms_lab_layout(tmp_path: Path) -> None:
    path = tmp_path / "val-00000-of-00001.parquet"
    pq.write_table(refcoco_table(refcoco_rows()), path, row_group_size=4)
    dataset = open_dataset(path)
    assert dataset.bbox_format == "xywh" and "RefCOCO layout" in dataset.describe()
    samples = {s.id: s for s in dataset}
    assert len(samples) == 8 + 1 + 7  # one sample per referring expression; every bad row once
    assert samples["q3#0"].prompt == "the red box" and samples["q3#1"].prompt == "the red rectangle"
    for n in range(1, 9):
        sample = samples[f"q{n}#0"]
        assert sample.error is None and sample.bbox == BOX and sample.image.data == phone_jpeg(n)
        image, info = read_sample_image(sample)
        assert info.size == UPRIGHT and red_box(image) == pytest.approx(BOX, abs=1)
        assert sample.fields["question"] == REFCOCO_QUESTION and sample.fields["answer"] == sample.prompt
    assert render_prompt("{question} / {answer} / {file_name}", samples["q1#0"]).endswith(
        "/ the red box / COCO_train2014_000000000000.jpg")
    assert "no width or height" in samples["flat#0"].error
    assert "no image" in samples["noimage#0"].error
    assert "not four numbers" in samples["short#0"].error
    assert "no entries in 'answer'" in samples["noexpr"].error
    outside = check_gt(samples["outside#0"], read_sample_image(samples["outside#0"])[1])
    assert outside.startswith("sample outside#0: ground-truth box [60, 40, 104, 70] (xyxy, from xywh [60, 40, 44, "
                              "30]) lies outside its image (96x64)")
    sideways = check_gt(samples["sideways#0"], read_sample_image(samples["sideways#0"])[1])
    assert "(96x64, EXIF orientation 6 applied)" in sideways
    with pytest.raises(OSError):
        read_sample_image(samples["broken#0"])


def test_without_images_each_sample_reads_its_own_row_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "set.parquet"
    pq.write_table(refcoco_table(refcoco_rows()), path, row_group_size=3)
    lazy = {s.id: s for s in open_dataset(path).samples(images=False)}
    assert all(s.image.data is None for s in lazy.values())  # nothing read yet
    assert lazy["q7#0"].image.read_bytes() == phone_jpeg(7)  # its row group's image column only
    assert read_sample_image(lazy["q5#0"])[1].size == UPRIGHT
    with pytest.raises(OSError, match="no image"):
        lazy["noimage#0"].image.read_bytes()


def test_a_parquet_set_streams_in_bounded_memory(tmp_path: Path) -> None:
    """800 rows of 50 kB incompressible images (40 MB) in row groups of 32 (1.6 MB): reading every sample's image
    holds about one row group at a time, never the set (peaks measured in a fresh interpreter: Python's
    allocations, and pyarrow's pool)."""
    rng = np.random.default_rng(0)
    noise = [png_bytes(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)) for _ in range(8)]
    rows = [{"question_id": f"r{i}", "image": {"bytes": noise[i % 8] + i.to_bytes(4, "little"), "path": None},
             "answer": ["x"], "bbox": XYWH} for i in range(800)]
    path = tmp_path / "big.parquet"
    pq.write_table(refcoco_table(rows), path, row_group_size=32)
    size = path.stat().st_size
    assert size > 39_000_000
    code = ("import sys, tracemalloc, pyarrow as pa; sys.path.insert(0, sys.argv[2])\n"
            "from contract.dataset import open_dataset\n"
            "tracemalloc.start(); n = total = 0\n"
            "for s in open_dataset(sys.argv[1]): n += 1; total += len(s.image.read_bytes())\n"
            "print(n, total, tracemalloc.get_traced_memory()[1], pa.default_memory_pool().max_memory())")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(ROOT)], capture_output=True, text=True,
                         check=True).stdout.split()
    count, total, python_peak, arrow_peak = (int(v) for v in out)
    assert count == 800 and total > 39_000_000
    assert python_peak < size / 5 and arrow_peak < size / 5, out


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_folder_or_glob_of_parquet_shards_is_one_set_and_splits_are_never_mixed(tmp_path: Path) -> None:
    data = tmp_path / "snapshots" / "abc123" / "data"
    data.mkdir(parents=True)
    rows = refcoco_rows()[:8]
    for index in range(2):
        pq.write_table(refcoco_table(rows[index * 4:(index + 1) * 4]), data / f"val-{index:05d}-of-00002.parquet")
    pq.write_table(refcoco_table(rows[:2]), data / "testA-00000-of-00001.parquet")
    val = [s.id for s in open_dataset(str(data / "val-*.parquet"))]
    assert val == ["q1#0", "q2#0", "q3#0", "q3#1", "q4#0", "q5#0", "q6#0", "q7#0", "q8#0"]  # shard 0, then 1
    with pytest.raises(DatasetError, match=r"several splits \(testA, val\): name one"):
        open_dataset(data)
    with pytest.raises(DatasetError, match="data/ folder holds parquet files"):
        open_dataset(tmp_path / "snapshots" / "abc123")
    (data / "val-00001-of-00002.parquet").unlink()
    with pytest.raises(DatasetError, match=r"split 'val' has 2 shards, shard\(s\) \[1\] missing"):
        open_dataset(str(data / "val-*.parquet"))
    other = tmp_path / "snapshots" / "def456" / "data"
    other.mkdir(parents=True)
    pq.write_table(refcoco_table(rows[:2]), other / "val-00000-of-00001.parquet")
    with pytest.raises(DatasetError, match="matches files in 2 folders"):
        open_dataset(str(tmp_path / "snapshots" / "*" / "data" / "val-*.parquet"))


def test_a_plain_parquet_table_uses_this_projects_columns(tmp_path: Path) -> None:
    path = tmp_path / "plain.parquet"
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(png())
    pq.write_table(pa.table({"id": ["a", "b", "c"], "image": ["pics/a.png", "pics/missing.png", None],
                             "bbox": [BOX, BOX, BOX], "prompt": ["find it", None, "x"], "colour": ["red"] * 3}), path)
    samples = {s.id: s for s in open_dataset(path)}
    assert open_dataset(path).bbox_format == "xyxy"
    assert samples["a"].bbox == BOX and read_sample_image(samples["a"])[1].size == UPRIGHT
    assert render_prompt("Find the {colour} one: {prompt}", samples["a"]) == "Find the red one: find it"
    with pytest.raises(KeyError, match="sample b has no 'prompt'"):
        render_prompt("{prompt}", samples["b"])
    with pytest.raises(FileNotFoundError):
        read_sample_image(samples["b"])
    assert "no image" in samples["c"].error


def test_parquet_without_pyarrow_is_a_clear_config_error(tmp_path: Path) -> None:
    path = tmp_path / "set.parquet"
    pq.write_table(refcoco_table(refcoco_rows()[:2]), path)
    (tmp_path / "model").mkdir()
    recipes = tmp_path / "r.toml"
    recipes.write_text(f'[defaults]\ndataset = "{path.name}"\n[[recipe]]\nname = "a"\nmodel = "model"\n')
    code = ("import sys; sys.modules['pyarrow'] = None; sys.path.insert(0, sys.argv[2])\n"
            "from orchestrator.planning.recipes import RecipeFileError, load_recipe_file\n"
            "try: load_recipe_file(sys.argv[1])\n"
            "except RecipeFileError as exc: print(exc)")
    out = subprocess.run([sys.executable, "-c", code, str(recipes), str(ROOT)], capture_output=True, text=True,
                         check=True).stdout
    assert "recipe 'a' (#1), field 'dataset'" in out
    assert "needs pyarrow, an optional dependency: pip install 'evalorch[data]'" in out


# ----------------------------------------------------------------------------------- datasets' save_to_disk


def test_a_save_to_disk_folder_is_read_with_pyarrow(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")  # the dev extra: the real writer, not a folder made by hand
    features = datasets.Features({"question_id": datasets.Value("string"), "image": datasets.Image(),
                                  "question": datasets.Value("string"),
                                  "answer": datasets.Sequence(datasets.Value("string")),
                                  "bbox": datasets.Sequence(datasets.Value("float32"))})
    rows = refcoco_rows()[:8]
    table = {"question_id": [r["question_id"] for r in rows], "image": [r["image"] for r in rows],
             "question": [REFCOCO_QUESTION] * 8, "answer": [r["answer"] for r in rows],
             "bbox": [r["bbox"] for r in rows]}
    saved = datasets.Dataset.from_dict(table, features=features)
    saved.save_to_disk(str(tmp_path / "saved"), num_shards=2)
    dataset = open_dataset(tmp_path / "saved")
    assert dataset.format == "arrow" and dataset.bbox_format == "xywh"
    samples = list(dataset)
    assert [s.id for s in samples] == ["q1#0", "q2#0", "q3#0", "q3#1"] + [f"q{n}#0" for n in range(4, 9)]
    for sample in samples:
        n = int(sample.id[1])
        assert sample.bbox == BOX and sample.image.read_bytes() == phone_jpeg(n)
        assert read_sample_image(sample)[1].size == UPRIGHT
    lazy = {s.id: s for s in dataset.samples(images=False)}
    assert lazy["q6#0"].image.data is None and lazy["q6#0"].image.read_bytes() == phone_jpeg(6)
    datasets.DatasetDict({"val": saved, "test": saved}).save_to_disk(str(tmp_path / "both"))
    with pytest.raises(DatasetError, match=r"a DatasetDict \(several splits\): point at one of its folders "
                                           r"\(test, val\)"):
        open_dataset(tmp_path / "both")
    assert len(list(open_dataset(tmp_path / "both" / "val"))) == 9


# ---------------------------------------------------------------------------------------------- subsets


def _numbered(tmp_path: Path, n: int = 50) -> Path:
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps({"id": f"s{i}", "image": "a.png", "bbox": BOX, "prompt": "p"}) + "\n"
                            for i in range(n)))
    return path


def test_ids_a_seeded_sample_and_limit_pick_the_same_samples_every_time(tmp_path: Path) -> None:
    path = _numbered(tmp_path)
    (tmp_path / "ids.txt").write_text("# the hard ones\ns3\n\n  s7 \ns1\n")
    by_file = [s.id for s in open_dataset(path, Settings(ids=str(tmp_path / "ids.txt")))]
    assert by_file == ["s1", "s3", "s7"]  # in file order
    assert [s.id for s in open_dataset(path, Settings(ids=["s7", "s3"]))] == ["s3", "s7"]
    drawn = [s.id for s in open_dataset(path, Settings(sample=10, seed=1))]
    assert drawn == [s.id for s in open_dataset(path, Settings(sample=10, seed=1))]  # a fresh reader, same draw
    assert len(drawn) == len(set(drawn)) == 10
    assert drawn != [s.id for s in open_dataset(path, Settings(sample=10, seed=2))]
    assert drawn == sorted(drawn, key=lambda i: int(i[1:]))  # file order
    assert [s.id for s in open_dataset(path, Settings(sample=10, seed=1, limit=4))] == drawn[:4]
    dataset = open_dataset(path, Settings(sample=10, seed=1), skip_ids=drawn[:2])
    assert [s.id for s in dataset] == drawn[2:] and dataset.count() == 8


def test_subset_and_prompt_fields_are_checked_before_a_run(tmp_path: Path) -> None:
    path = _numbered(tmp_path, 5)
    assert dataset_problems(Settings(dataset=str(path), ids=["s1"], sample=1)) == []
    problems = dict(dataset_problems(Settings(dataset=str(path), ids=["s1", "nope", "gone"], sample=3,
                                              prompt="{prompt} in {colour}")))
    assert problems["ids"] == f"2 id(s) not in {path}: gone, nope"
    assert problems["sample"] == "draws 3 samples from 1 (after ids)"
    assert problems["prompt"] == f"uses {{colour}}, which no sample of {path} has"
    parquet = tmp_path / "set.parquet"
    pq.write_table(refcoco_table(refcoco_rows()[:2]), parquet)
    assert dict(dataset_problems(Settings(dataset=str(parquet), prompt="{caption}")))["prompt"].startswith(
        "uses {caption}")
    assert dataset_problems(Settings(dataset=str(parquet), prompt="{question} {answer} {prompt}")) == []


def test_a_recipe_file_points_at_folders_globs_and_id_files(tmp_path: Path) -> None:
    data = tmp_path / "hub" / "data"
    data.mkdir(parents=True)
    pq.write_table(refcoco_table(refcoco_rows()[:3]), data / "val-00000-of-00001.parquet")
    (tmp_path / "model").mkdir()
    (tmp_path / "ids.txt").write_text("q1#0\n")
    recipes = tmp_path / "r.toml"
    recipes.write_text('[defaults]\ndataset = "hub/data/val-*.parquet"\nids = "ids.txt"\n'
                       '[[recipe]]\nname = "a"\nmodel = "model"\n'
                       '[[recipe]]\nname = "b"\nmodel = "model"\ndataset = "hub"\n'
                       '[[recipe]]\nname = "c"\nmodel = "model"\nids = "missing.txt"\nimage_root = "nowhere"\n')
    with pytest.raises(RecipeFileError) as caught:
        load_recipe_file(recipes)
    problems = caught.value.problems
    assert not any("recipe 'a'" in p for p in problems)
    assert any("recipe 'b' (#2), field 'dataset'" in p and "data/ folder holds parquet files" in p for p in problems)
    assert any("recipe 'c' (#3), field 'ids': file not found" in p for p in problems)
    assert any("recipe 'c' (#3), field 'image_root': no such directory" in p for p in problems)
    recipes.write_text('[defaults]\ndataset = "hub/data/val-*.parquet"\nids = "ids.txt"\n'
                       '[[recipe]]\nname = "a"\nmodel = "model"\n')
    recipe = load_recipe_file(recipes).recipes[0]
    assert recipe.dataset == str(data / "val-*.parquet") and recipe.ids == str(tmp_path / "ids.txt")
    assert [s.id for s in open_dataset(recipe.dataset, recipe)] == ["q1#0"]


# ------------------------------------------------------------------------------------------- the worker


def test_the_worker_reads_the_set_as_it_makes_batches() -> None:
    """Batches come from a window of samples at a time: the first batch is ready long before a large set is read."""
    from contract.batching import MIN_WINDOW, SORT_WINDOW
    from worker.inference.infer import sorted_batches

    pulled = []

    def samples():
        for i in range(10_000):
            pulled.append(i)
            yield Sample(f"s{i}", None, BOX, "p" * (i % 7))

    batches = sorted_batches(samples(), 8, "apply")
    first = next(batches)
    assert len(first) == 8 and len(pulled) == max(MIN_WINDOW, 8 * SORT_WINDOW)
    assert sum(len(b) for b in batches) + len(first) == 10_000 and len(pulled) == 10_000


@pytest.mark.parametrize("count,size", [(32, 24), (32, 32), (200, 64), (1000, 24), (1030, 256), (7, 1), (300, 100),
                                        (200, 199), (2048, 256)])
def test_the_estimate_counts_the_largest_batch_the_worker_forms(count: int, size: int) -> None:
    """The parent's memory estimate takes its batch from contract.batching; the worker's batches must agree (32
    samples at batch 24 run as 16 + 16: estimated at 24, InternVL's estimate was 47% over on the H200)."""
    from collections import Counter

    from contract.batching import batch_counts, largest_batch
    from worker.inference.infer import sorted_batches

    samples = (Sample(f"s{i}", None, BOX, "p" * (i % 5)) for i in range(count))
    formed = Counter(len(b) for b in sorted_batches(samples, size, "apply"))
    assert batch_counts(count, size) == formed and largest_batch(count, size) == max(formed)


# ---------------------------------------------------------------------------------- end to end, through the CLI


@pytest.fixture(scope="module")
def refcoco_run(demo: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("refcoco")
    data = folder / "hub" / "datasets--lmms-lab--RefCOCO" / "snapshots" / "0123abcd" / "data"
    data.mkdir(parents=True)
    pq.write_table(refcoco_table(refcoco_rows()), data / "val-00000-of-00001.parquet", row_group_size=5)
    body = f'[[recipe]]\nname = "base"\nmodel = "{demo["root"] / "models" / "base"}"\n'
    cached = "hub/datasets--lmms-lab--RefCOCO/snapshots/*/data/val-*.parquet"  # as the Hugging Face cache holds it
    # 7 bad rows on purpose: allowed (max_sample_errors), so the run passes with them recorded
    recipes = write_recipes(folder, body, None, dataset=cached, prompt="{prompt} Answer with its bounding box.",
                            max_sample_errors=7)
    planned = run_cli("plan", str(recipes), "--device", "cpu")
    result = run_cli("run", str(recipes), "--out", str(folder / "runs"), "--device", "cpu")
    return {"plan": planned, "result": result, "run_dir": only_run_dir(folder / "runs")}


def test_a_refcoco_parquet_set_of_phone_photos_runs_end_to_end(refcoco_run: dict) -> None:
    planned, result = refcoco_run["plan"], refcoco_run["result"]
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert "dataset: parquet, the lmms-lab RefCOCO layout (one sample per referring expression), boxes xywh, " \
        "EXIF orientation applied" in planned.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = refcoco_run["run_dir"]
    samples = {s["id"]: s for s in read_samples(run_dir / "base" / "samples.jsonl")}
    scored = {f"q{n}#0" for n in range(1, 9)} | {"q3#1"}
    errors = {"outside#0", "flat#0", "noimage#0", "broken#0", "short#0", "sideways#0", "noexpr"}
    assert set(samples) == scored | errors  # every row ends as a scored sample or a recorded error
    for sample_id in scored:
        record = samples[sample_id]
        n = int(sample_id[1])
        assert record["status"] == "ok", record
        assert record["image_size"] == list(UPRIGHT)  # 64x96 as stored for 5-8; read upright
        assert record["exif_orientation"] == n and record["orientation_applied"] == (n != 1)
        assert record["gt"] == BOX  # [x, y, w, h] + corners: [6, 4, 6 + 44, 4 + 16]
        rescored = score_text(qwen_answer(BOX, UPRIGHT), "qwen2vl", tuple(record["image_size"]), record["gt"])
        assert rescored["iou"] > 0.95  # a perfect answer, scored in the recorded frame
    assert {s["status"] for i, s in samples.items() if i in errors} == {"error"}
    assert "[60, 40, 104, 70] (xyxy, from xywh [60, 40, 44, 30]) lies outside its image (96x64)" in \
        samples["outside#0"]["error"]
    assert samples["outside#0"]["image_size"] == list(UPRIGHT) and samples["outside#0"]["gt"] == [60, 40, 104, 70]
    assert "EXIF orientation 6 applied" in samples["sideways#0"]["error"]
    assert "no width or height" in samples["flat#0"]["error"] and "no image" in samples["noimage#0"]["error"]
    assert samples["broken#0"]["error"] == "image val-00000-of-00001.parquet row 11: not an image Pillow can read"
    assert "not four numbers" in samples["short#0"]["error"]
    summary = json.loads((run_dir / "base" / "summary.json").read_text())
    assert summary["metrics"]["n"] == len(scored) and summary["metrics"]["errors"] == len(errors)
    report = (run_dir / "report.html").read_text()
    assert "image not available" not in report and report.count('<figure class="card">') == 6  # read from parquet


# ----------------------------------------------------------------------------- sample ids


def _lines_set(folder: Path, ids: list[object]) -> Path:
    (folder / "a.png").write_bytes(png())
    path = folder / "set.jsonl"
    path.write_text("".join(json.dumps({"id": i, "image": "a.png", "bbox": BOX, "prompt": "p"}) + "\n"
                            for i in ids))
    return path


@pytest.mark.parametrize("ids,twice", [(["a", "b", "a"], "'a' at line 1 and again at line 3"),
                                       ([5, "x", "5"], "'5' at line 1 and again at line 3")])
def test_an_id_given_twice_refuses_the_set_naming_both_lines(demo: dict, tmp_path: Path, ids: list[object],
                                                            twice: str) -> None:
    path = _lines_set(tmp_path, ids)
    with pytest.raises(DatasetError, match=f"{path}: id {twice}; ids must be unique"):
        list(open_dataset(path))
    recipes = write_recipes(tmp_path, f'[[recipe]]\nname = "base"\nmodel = "{demo["models"]["base"]}"\n', demo,
                            dataset=str(path))
    result = run_cli("run", str(recipes), "--device", "cpu", "--out", str(tmp_path / "runs"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert "recipe 'base' (#1), field 'dataset'" in result.stderr and not (tmp_path / "runs").exists()
    assert f"id {twice}" in " ".join((result.stdout + result.stderr).split())


@pytest.mark.parametrize("given", [None, True, 1.5, "", ["a"]])
def test_an_id_that_is_no_string_or_whole_number_is_that_samples_error(tmp_path: Path, given: object) -> None:
    first, second = open_dataset(_lines_set(tmp_path, ["ok", given]))
    assert first.id == "ok" and first.error is None
    assert second.id == "line2" and "line 2: 'id' must be a non-empty string or a whole number" in second.error


# ----------------------------------------------------------------------------- image modes, odd files

GRADIENT = np.tile(np.linspace(0, 1, 64), (8, 1))  # black to white, left to right


def _gradient(mode: str) -> Image.Image:
    if mode == "I;16":
        return Image.fromarray((GRADIENT * 65535).round().astype(np.uint16))
    if mode == "I":  # 16-bit values in 32-bit integers, as some TIFF and PNG readers give them
        return Image.fromarray((GRADIENT * 65535).round().astype(np.int32))
    if mode == "F":
        return Image.fromarray(GRADIENT.astype(np.float32))
    gray = Image.fromarray((GRADIENT * 255).round().astype(np.uint8))
    return gray.convert("P", palette=Image.Palette.ADAPTIVE) if mode == "P" else gray.convert(mode)


@pytest.mark.parametrize("mode,suffix", [("L", "png"), ("LA", "png"), ("P", "png"), ("RGB", "png"), ("RGBA", "png"),
                                         ("I;16", "png"), ("I;16", "tiff"), ("I", "tiff"), ("F", "tiff"),
                                         ("CMYK", "tiff"), ("RGB", "jpeg")])
def test_a_gradient_in_every_mode_reaches_the_model_as_a_gradient(tmp_path: Path, mode: str, suffix: str) -> None:
    """Pillow's convert("RGB") clips a 16-bit or 32-bit image at 255 (white from the first step on) and a float one
    at 1 (black): read as the model sees it, each column keeps its share of the way from black to white."""
    path = tmp_path / f"gradient.{suffix}"
    _gradient(mode).save(path)
    assert Image.open(path).mode == mode
    image, info = read_sample_image(Sample("g", path, None, None), "apply")
    assert image.mode == "RGB" and info.size == (64, 8)
    columns = np.asarray(image, dtype=np.float64).mean(axis=(0, 2))
    expected = np.linspace(0, 255, 64)
    assert np.abs(columns - expected).max() <= (6 if suffix == "jpeg" else 2), np.round(columns)


@pytest.mark.parametrize("values,says", [(np.array([[-1, 5]], dtype=np.int32), "no known scale"),
                                         (np.array([[0.0, 2.5]], dtype=np.float32), "outside [0, 1]")])
def test_deep_pixels_of_no_known_scale_are_the_samples_error(tmp_path: Path, values: np.ndarray, says: str) -> None:
    path = tmp_path / "odd.tiff"
    Image.fromarray(values).save(path)
    with pytest.raises(ValueError, match=says.replace("[", "\\[").replace("]", "\\]")):
        read_sample_image(Sample("o", path, None, None), "apply")


def test_a_fifo_as_an_image_is_that_samples_error_and_nothing_waits_on_it(demo: dict, tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png())
    os.mkfifo(tmp_path / "pipe.png")
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps({"id": i, "image": image, "bbox": BOX, "prompt": "p"}) + "\n"
                            for i, image in (("a", "a.png"), ("fifo", "pipe.png"))))
    with pytest.raises(OSError, match="not a regular file"):
        read_sample_image(list(open_dataset(path))[1], "apply")
    recipes = write_recipes(tmp_path, f'[[recipe]]\nname = "base"\nmodel = "{demo["models"]["base"]}"\n', demo,
                            dataset=str(path), max_sample_errors=1)
    assert run_cli("plan", str(recipes), "--device", "cpu", timeout=120).returncode == 0
    result = run_cli("run", str(recipes), "--device", "cpu", "--out", str(tmp_path / "runs"), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    records = {r["id"]: r for r in read_samples(only_run_dir(tmp_path / "runs") / "base" / "samples.jsonl")}
    assert records["a"]["status"] == "ok" and records["fifo"]["status"] == "error"
    assert "not a regular file" in records["fifo"]["error"]


def test_an_over_long_prompt_is_that_samples_error_and_the_batch_runs(demo: dict, tmp_path: Path) -> None:
    """A 100 KB prompt (tokenized: over the limit) and a 5 MB one (over it by its bytes alone, never tokenized) are
    their samples' errors; the samples batched with them are scored as usual."""
    (tmp_path / "a.png").write_bytes(png())
    prompts = {"short": "Find the red box.", "long": "red " * 25_000, "huge": "x" * 5_000_000}
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps({"id": i, "image": "a.png", "bbox": BOX, "prompt": p}) + "\n"
                            for i, p in prompts.items()))
    recipes = write_recipes(tmp_path, f'[[recipe]]\nname = "base"\nmodel = "{demo["models"]["base"]}"\n', demo,
                            dataset=str(path), prompt="{prompt}", max_sample_errors=2, batch_size=3)
    result = run_cli("run", str(recipes), "--device", "cpu", "--out", str(tmp_path / "runs"), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = {r["id"]: r for r in read_samples(only_run_dir(tmp_path / "runs") / "base" / "samples.jsonl")}
    assert records["short"]["status"] == "ok"
    assert records["long"]["status"] == "error" and "tokens with its chat template, more than max_prompt_tokens " \
        "(4096)" in records["long"]["error"]
    assert records["huge"]["status"] == "error" and "bytes, more than max_prompt_tokens (4096) tokens can hold" in \
        records["huge"]["error"]


def test_ids_keep_their_json_type_in_the_records_and_a_resume_skips_them(demo: dict, tmp_path: Path) -> None:
    path = _lines_set(tmp_path, [5, "s1", 12])
    recipes = write_recipes(tmp_path, f'[[recipe]]\nname = "base"\nmodel = "{demo["models"]["base"]}"\n', demo,
                            dataset=str(path), batch_size=1)
    result = run_cli("run", str(recipes), "--device", "cpu", "--out", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    samples = run_dir / "base" / "samples.jsonl"
    assert sorted(((type(r["id"]).__name__, r["id"]) for r in read_samples(samples)), key=str) == \
        [("int", 12), ("int", 5), ("str", "s1")]
    lines = samples.read_bytes().splitlines(keepends=True)  # interrupted after the first record
    samples.write_bytes(lines[0])
    (run_dir / "base" / "summary.json").unlink()
    resumed = run_cli("run", str(recipes), "--device", "cpu", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    ids = [r["id"] for r in read_samples(samples)]
    assert len(ids) == 3 and {5, "s1", 12} == set(ids)
