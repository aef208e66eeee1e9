"""How much memory reading a large parquet set takes, on each path that reads it (CPU only, no model).

    python -m benchmarks.bench_datasets [--rows 10000] [--out /tmp/evalorch-bench-datasets]

Writes a RefCOCO-layout parquet of `rows` noise JPEGs (incompressible, about 11 kB each, in row groups of 100 as
`datasets` writes image sets), then, each in a fresh interpreter, reports the time, the growth of anonymous memory
at its peak, pyarrow's pool peak and the peak resident size (which counts the memory-mapped file's pages) of:
- worker:   the worker's batch making (sorted_batches at batch 64), every image decoded upright, as prepare does;
- count:    the progress display's count (no image bytes read);
- estimate: the memory estimate's pass (every image's header, from its bytes);
- gallery:  the report's id -> image map, then 6 images read on demand;
against `baseline`, the same interpreter after the imports alone.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBES = {
    "baseline": "pass",
    "worker": "from worker.inference.infer import sorted_batches\n"
              "from contract.dataset import read_sample_image\n"
              "for batch in sorted_batches(open_dataset(path), 64, 'apply'):\n"
              "    for s in batch: read_sample_image(s)",
    "count": "assert open_dataset(path).count() > 0",
    "estimate": "from contract.dataset import image_size\n"
                "for s in open_dataset(path).samples(images=True): image_size(s.image)",
    "gallery": "found = {s.id: s.image for s in open_dataset(path).samples(images=False)}\n"
               "for key in list(found)[-6:]: found[key].read_bytes()",
}


def write_set(path: Path, rows: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    pictures = []
    for _ in range(16):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        pictures.append(buffer.getvalue())
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "question_id": [f"q{i}" for i in range(rows)],
        "image": pa.array([{"bytes": pictures[i % 16] + i.to_bytes(4, "little"), "path": None}
                           for i in range(rows)], image),
        "question": ["Please carefully observe the area circled in the image."] * rows,
        "answer": pa.array([["the thing"]] * rows, pa.list_(pa.string())),
        "bbox": pa.array([[10.0, 10.0, 40.0, 30.0]] * rows, pa.list_(pa.float32())),
    })
    pq.write_table(table, path, row_group_size=100)


# The peak of the process's anonymous memory (heap, pyarrow's pool), sampled every 5 ms: the memory-mapped file's
# pages count in the resident size (ru_maxrss) too, but they are the page cache's, dropped under pressure.
_SAMPLER = """
import threading
peak = [0]
def _anon():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))
def _watch():
    while True:
        peak[0] = max(peak[0], _anon())
        time.sleep(0.005)
threading.Thread(target=_watch, daemon=True).start()
"""


def probe(name: str, path: Path) -> dict:
    code = ("import resource, sys, time; sys.path.insert(0, sys.argv[2])\n"
            "from contract.dataset import open_dataset\n"
            "import worker.inference.infer\n"  # every probe pays the same imports (torch among them)
            "import pyarrow as pa\n"
            f"{_SAMPLER}\ntime.sleep(0.05)\nbefore = _anon()\n"
            f"path = sys.argv[1]\nstarted = time.perf_counter()\n{PROBES[name]}\n"
            "seconds = time.perf_counter() - started\ntime.sleep(0.02)\n"
            "print(seconds, peak[0] - before, pa.default_memory_pool().max_memory(),"
            " resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(ROOT)], capture_output=True, text=True,
                         check=True).stdout.split()
    return {"probe": name, "seconds": round(float(out[0]), 2), "anon_growth_mib": round(int(out[1]) / 1024, 1),
            "arrow_pool_peak_mib": round(int(out[2]) / 2**20, 1), "peak_rss_mib": round(int(out[3]) / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=Path("/tmp/evalorch-bench-datasets"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"val-{args.rows}.parquet"
    if not path.is_file():
        started = time.perf_counter()
        write_set(path, args.rows)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - started:.1f}s")
    print(f"{args.rows} rows, {path.stat().st_size / 2**20:.0f} MiB on disk")
    for name in PROBES:
        print(json.dumps(probe(name, path)))


if __name__ == "__main__":
    main()
