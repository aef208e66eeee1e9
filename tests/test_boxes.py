"""Box parsing and IoU: hand-computed cases, and random boxes against an independent pixel-counting formula."""

from __future__ import annotations

import random

import pytest

from contract.boxes import BOX_FORMATS, InputSizeMissing, iou, native_format, parse_box, score_text


def test_qwen2vl_box_is_normalised_to_1000() -> None:
    text = "<|object_ref_start|>red<|object_ref_end|><|box_start|>(100,200),(500,750)<|box_end|><|im_end|>"
    assert parse_box(text, "qwen2vl", (200, 100)) == pytest.approx((20.0, 20.0, 100.0, 75.0))


def test_qwen2vl_box_without_markers_when_special_tokens_were_skipped() -> None:
    assert parse_box("(0, 0), (1000, 1000)", "qwen2vl", (50, 40)) == (0.0, 0.0, 50.0, 40.0)


def test_json_box_is_in_pixels() -> None:
    text = '```json\n[{"bbox_2d": [10, 20, 30.5, 40], "label": "red"}]\n```'
    assert parse_box(text, "json_pixels", (100, 100)) == (10.0, 20.0, 30.5, 40.0)


def test_the_declared_format_is_never_second_guessed() -> None:
    """A JSON box under the qwen2vl format is not a detection, and the reverse."""
    assert parse_box('{"bbox_2d": [10, 20, 30, 40]}', "qwen2vl", (100, 100)) is None
    assert parse_box("<|box_start|>(10,20),(30,40)<|box_end|>", "json_pixels", (100, 100)) is None


@pytest.mark.parametrize("text", ["", "no box here", "(1,2),(3)", "<|box_start|>(5,5),(5,9)<|box_end|>"])
def test_unparsable_or_empty_boxes_are_not_detections(text: str) -> None:
    assert parse_box(text, "qwen2vl", (100, 100)) is None
    assert score_text(text, "qwen2vl", (100, 100), [0, 0, 10, 10]) == {"pred": None, "iou": 0.0, "detected": False}


def test_swapped_corners_are_ordered_and_boxes_clipped_to_the_image() -> None:
    assert parse_box("(900,800),(100,-50)", "qwen2vl", (10, 10)) == (1.0, 0.0, 9.0, 8.0)


@pytest.mark.parametrize("text", [
    '{"bbox_2d": [.5, 1e1, 2.5E1, 40.]}',
    "{'bbox_2d': [0.5, 10, 25, 40]}",
    '```json\n[{"bbox_2d": [0.5, 10, 25, 40], "label": "a"}, {"bbox_2d": [50, 50, 60, 60], "label": "b"}]\n```',
    '[{"label": "a", "bbox": [0.5, 10, 25, 40]}]',
    'The box is {"bbox_2d": [+0.5, 10, 25, 40]} and another {"bbox_2d": [1, 2, 3, 4]}',
])
def test_json_answers_models_write_are_read_first_box_first(text: str) -> None:
    """Decimals without a leading digit, exponents, single-quoted keys, a list of objects in a code fence, the
    "bbox" key: all read; with several boxes, the first is the answer."""
    assert parse_box(text, "json_pixels", (100, 100)) == pytest.approx((0.5, 10.0, 25.0, 40.0))


def test_json_without_a_box_key_is_no_detection() -> None:
    """A bare list of four numbers is not read as a box: that would be a second reading of the text."""
    assert parse_box("[10, 20, 30, 40]", "json_pixels", (100, 100)) is None
    assert parse_box('{"bbox_3d": [10, 20, 30, 40, 1, 2]}', "json_pixels", (100, 100)) is None


def test_each_space_converts_to_original_pixels() -> None:
    """One box, (20, 10)-(60, 30) on a 200x100 image, written in every format's own coordinates."""
    size, want = (200, 100), (20.0, 10.0, 60.0, 30.0)
    answers = {
        "qwen2vl": "<|box_start|>(100,100),(300,300)<|box_end|>",
        "qwen3vl": '{"bbox_2d": [100, 100, 300, 300]}',
        "json_norm1000": '{"bbox_2d": [100, 100, 300, 300]}',
        "json_norm1": '{"bbox_2d": [0.1, 0.1, 0.3, 0.3]}',
        "json_pixels": '{"bbox_2d": [20, 10, 60, 30]}',
        "internvl": "<ref>cat</ref><box>[[100, 100, 300, 300], [0, 0, 10, 10]]</box>",
        "paligemma": "<loc0102><loc0102><loc0307><loc0307> cat",  # 1024ths (y first: test_paligemma_reads_y_...)
        "florence2": "cat<loc_99><loc_99><loc_299><loc_299>",  # bins, decoded at their centres
    }
    for name, text in answers.items():
        assert parse_box(text, name, size) == pytest.approx(want, abs=0.2), name
    # Qwen2.5-VL: pixels of the processor's input (here 224 x 112 after the resize)
    assert parse_box('{"bbox_2d": [22.4, 11.2, 67.2, 33.6]}', "qwen25vl", size, (224, 112)) == pytest.approx(want)


def test_paligemma_reads_y_before_x() -> None:
    box = parse_box("<loc0000><loc0512><loc0256><loc1024>", "paligemma", (1024, 1024))
    assert box == (512.0, 0.0, 1024.0, 256.0)


def test_input_pixels_without_an_input_size_is_a_clear_error() -> None:
    with pytest.raises(InputSizeMissing, match="input_size"):
        parse_box('{"bbox_2d": [1, 2, 3, 4]}', "qwen25vl", (100, 100))


def test_every_format_names_its_space_and_source() -> None:
    for fmt in BOX_FORMATS.values():
        assert fmt.space.refers_to in ("original", "input") and fmt.source and fmt.text


def test_native_formats_by_model_type() -> None:
    assert native_format("qwen2_5_vl") == "qwen25vl" and native_format("qwen3_vl") == "qwen3vl"
    assert native_format("llava") is None and native_format(None) is None


def test_unknown_box_format_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown box format"):
        parse_box("(1,2),(3,4)", "yolo", (10, 10))


def test_iou_hand_computed() -> None:
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges share no area
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 4, 4), (1, 1, 3, 3)) == pytest.approx(4 / 16)
    assert iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)


def _pixel_iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """Independent formula: count unit cells covered by each box."""
    cells_a = {(x, y) for x in range(a[0], a[2]) for y in range(a[1], a[3])}
    cells_b = {(x, y) for x in range(b[0], b[2]) for y in range(b[1], b[3])}
    union = cells_a | cells_b
    return len(cells_a & cells_b) / len(union) if union else 0.0


def _random_box(rng: random.Random) -> tuple[int, int, int, int]:
    x1, x2 = sorted(rng.sample(range(31), 2))
    y1, y2 = sorted(rng.sample(range(31), 2))
    return (x1, y1, x2, y2)


def test_iou_matches_pixel_counting_on_random_boxes() -> None:
    rng = random.Random(1234)
    for _ in range(400):
        a, b = _random_box(rng), _random_box(rng)
        assert iou(a, b) == pytest.approx(_pixel_iou(a, b), abs=1e-12), (a, b)
        assert iou(a, b) == pytest.approx(iou(b, a))


def test_score_text_round_trip_through_the_normalised_format() -> None:
    rng = random.Random(7)
    for _ in range(100):
        w, h = rng.randint(20, 500), rng.randint(20, 500)
        gt = [rng.uniform(0, w / 2), rng.uniform(0, h / 2), rng.uniform(w / 2 + 1, w), rng.uniform(h / 2 + 1, h)]
        coords = [round(gt[0] / w * 1000), round(gt[1] / h * 1000), round(gt[2] / w * 1000), round(gt[3] / h * 1000)]
        text = f"<|box_start|>({coords[0]},{coords[1]}),({coords[2]},{coords[3]})<|box_end|>"
        scored = score_text(text, "qwen2vl", (w, h), gt)
        assert scored["detected"] and scored["iou"] > 0.97  # only the 0-1000 rounding is lost
