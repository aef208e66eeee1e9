"""Shared fixtures: a tiny real Qwen2-VL family built offline once per session, and helpers to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The tiny models' matmuls are so small that two threads on a two-core runner only fight (0.05 s vs up to 3 s
# per generate); workers inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(ROOT))

from scripts.make_demo import build_demo  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def evalorch_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The image cache of every run in the session's temporary folder, never the user's ~/.cache: recipes
    resolve their cache_dir from $EVALORCH_CACHE (session-wide, so that module-scoped runs get it too)."""
    folder = tmp_path_factory.mktemp("evalorch-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EVALORCH_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The demo family (base, r1..r4 with the two-stage chain) and a small grounding set, real files."""
    out = tmp_path_factory.mktemp("demo")
    built = build_demo(out, n_samples=12, seed=0)
    return {"root": out, **built}


def write_recipes(folder: Path, body: str, demo: dict | None = None, **defaults: object) -> Path:
    """A recipes.toml in `folder`: [defaults] pointing at the demo data, a remap for the demo's training paths."""
    lines = ["[defaults]"]
    settings = {"max_new_tokens": 8, "batch_size": 4, **defaults}
    if demo is not None:
        settings.setdefault("dataset", str(demo["dataset"]))
        settings.setdefault("prompt", "{prompt} Answer with its bounding box.")
    for key, value in settings.items():
        lines.append(f"{key} = {_toml(value)}")
    if demo is not None:
        lines += ["[lineage]", f'remap = {{ "/ssd1/team/vlm_outputs" = "{demo["root"] / "models"}" }}']
    path = folder / "recipes.toml"
    path.write_text("\n".join(lines) + "\n" + body)
    return path


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m orchestrator ...` as a user types it, in a real subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def only_run_dir(out: Path) -> Path:
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]
