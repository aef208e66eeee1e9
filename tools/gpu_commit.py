"""What the GPU suite's record names, for a checkout that travels to the GPU machine without its history:

    python -m tools.gpu_commit        # prints EVALORCH_GPU_COMMIT=<sha> EVALORCH_GPU_DIGEST=<digest>

The GPU machine gets a copy of the working tree (its .git, if any, may be of another commit), so the suite cannot
ask git which commit it runs. This prints the commit of this checkout, refusing when the checkout differs from it,
and a digest of every file that travels (what git would not ignore, .gpu-verified aside); tests/gpu/conftest.py
computes the digest again there and writes .gpu-verified only when the two agree."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORD = ".gpu-verified"  # the suite's record: never part of what it verified


def checkout_digest(root: Path = ROOT) -> str:
    """sha256 over the path and bytes of every file git would take (tracked or untracked, not ignored) that exists,
    the record itself aside: equal on two machines exactly when they hold the same files."""
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.split(b"\0")
    digest = hashlib.sha256()
    for name in sorted({n.decode() for n in listed if n} - {RECORD}):
        path = root / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:32]


def main() -> int:
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    dirty = [line for line in dirty if line[3:] != RECORD]
    if dirty:
        print(f"the checkout differs from its commit ({', '.join(line[3:] for line in dirty[:5])}): commit first",
              file=sys.stderr)
        return 1
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    print(f"EVALORCH_GPU_COMMIT={commit} EVALORCH_GPU_DIGEST={checkout_digest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
