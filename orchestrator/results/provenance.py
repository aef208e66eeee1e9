"""Where a run came from, as far as it is cheap to know: the git commit of the checkout that holds the recipe
file (or the current folder). Recorded in run.json; `history` shows it. It never fails a run."""

from __future__ import annotations

import subprocess
from pathlib import Path

_GIT_TIMEOUT_S = 2.0


def git_commit(*folders: Path) -> str | None:
    """HEAD of the first of `folders` inside a git checkout; None when none is, or git is missing or slow."""
    for folder in folders:
        try:
            done = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=_GIT_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError):
            return None  # no git, or a hung one: asking the next folder would not do better
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    return None
