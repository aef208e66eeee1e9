"""The synthetic grounding set of the GPU scripts (gpu_check, bench_gpu, profile_gpu): one red rectangle on a grey
image per sample, one prompt for all, so that the work per sample is fixed and known.

    red_rectangles(folder, samples, sizes) -> folder/grounding.jsonl, folder/images/sNNN.png

(The demo family's own sets are made by tools/make_demo.py and tools/train_demo.py: they are the tasks those
models were built or trained for.)
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

PROMPT = "Find the red rectangle."


def red_rectangles(folder: Path, samples: int, sizes: Sequence[tuple[int, int]], seed: int = 0) -> Path:
    """`samples` images, the i-th of sizes[i % len(sizes)] (width, height), each with one red rectangle at least
    28 px a side; bboxes in pixels, [x1, y1, x2, y2] end-exclusive. Returns the jsonl's path."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(samples):
        width, height = sizes[index % len(sizes)]
        x1, y1 = rng.randint(0, width // 2), rng.randint(0, height // 2)
        box = [x1, y1, x1 + rng.randint(28, width // 2), y1 + rng.randint(28, height // 2)]
        image = Image.new("RGB", (width, height), (240, 240, 240))
        ImageDraw.Draw(image).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(220, 30, 30))
        image.save(folder / "images" / f"s{index:03d}.png")
        lines.append(json.dumps({"id": f"s{index:03d}", "image": f"images/s{index:03d}.png", "bbox": box,
                                 "prompt": PROMPT}))
    (folder / "grounding.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "grounding.jsonl"
