"""A fresh worker's imports with and without scikit-learn hidden (worker/__main__.py), each in its own process,
alternating: `python3 scripts/import_probe.py [ROUNDS]` prints the seconds of each."""

import subprocess
import sys

CODE = """
import sys, time
sys.path.insert(0, ".")
started = time.perf_counter()
import torch
from worker.__main__ import _unused_optional_imports_hidden
if {hide}:
    with _unused_optional_imports_hidden():
        import worker.infer, worker.load
else:
    import worker.infer, worker.load
print(round(time.perf_counter() - started, 2), "sklearn" in sys.modules)
"""

for round_ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 2):
    for hide in (False, True):
        out = subprocess.run([sys.executable, "-c", CODE.format(hide=hide)], capture_output=True, text=True)
        print(f"round {round_} hidden={hide}: {out.stdout.strip() or out.stderr.strip()[-300:]}", flush=True)
