"""Box parsing and IoU: hand-computed cases, and random boxes against an independent pixel-counting formula."""

from __future__ import annotations

import random

import pytest

from contract.boxes import iou, parse_box, score_text


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
