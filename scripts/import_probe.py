"""A fresh worker's imports with and without scikit-learn hidden (worker/__main__.py), each in its own process,
alternating: `python3 scripts/import_probe.py [ROUNDS]` prints the seconds of each. `--importtime` instead runs
the hidden variant once under `python -X importtime` and prints the 30 imports of the largest cumulative time
(what is worth cutting next)."""

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


def importtime() -> None:
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", CODE.format(hide=True)], capture_output=True,
                         text=True)
    rows = []
    for line in out.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), int(parts[0]), parts[2].rstrip()))
    print(f"wall {out.stdout.strip()}; {len(rows)} modules; own time total {sum(r[1] for r in rows) / 1e6:.2f} s")
    for cumulative, own, name in sorted(rows, reverse=True)[:30]:
        print(f"{cumulative / 1e6:7.2f} s cumulative {own / 1e6:6.2f} s own  {name}")


if "--importtime" in sys.argv:
    importtime()
    sys.exit(0)
for round_ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 2):
    for hide in (False, True):
        out = subprocess.run([sys.executable, "-c", CODE.format(hide=hide)], capture_output=True, text=True)
        print(f"round {round_} hidden={hide}: {out.stdout.strip() or out.stderr.strip()[-300:]}", flush=True)
