"""The GPU acceptance suite's frame: every test here needs a CUDA GPU (marker `gpu`, deselected by default, so CI
never collects it), is skipped where NVML sees none, and never touches CUDA in this process: the product's own
processes do (the CLI, its workers, a holder), as a user's would. When the whole suite passes, it writes
`.gpu-verified` at the repository root: `<commit> <UTC time> <device name> <N passed>`.

    pytest -m gpu tests/gpu          # on the GPU machine, from the repository root
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from gpu_helpers import SIMULATED, gpu_state, held_by_this_process
from helpers import ROOT

from contract.nvml import GpuState
from orchestrator.results.provenance import git_commit
from tools.gpu_commit import checkout_digest

VERIFIED = ROOT / ".gpu-verified"
COMMIT_ENV = "EVALORCH_GPU_COMMIT"  # the commit under test, where the tree was copied (its .git may be another's)
DIGEST_ENV = "EVALORCH_GPU_DIGEST"  # tools/gpu_commit.py's digest of that commit's files


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if gpu_state() is None:
        skip = pytest.mark.skip(reason="no CUDA GPU: NVML sees none (the GPU suite runs on the GPU machine; "
                                       "tests/test_gpu_wiring.py runs it on a simulated one)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def gpu() -> Iterator[GpuState]:
    """GPU 0 before the suite starts anything: its free memory is the baseline every release is measured by."""
    state = gpu_state()
    assert state is not None
    yield state


@pytest.fixture(scope="session", autouse=True)
def no_context_here() -> Iterator[None]:
    """The suite's own process never holds a CUDA context: one would be counted as memory a worker left behind,
    and fail the release checks of every later test (an import that opens one, e.g. bitsandbytes through peft,
    belongs in a child: gpu_helpers.build_offline)."""
    yield
    assert not held_by_this_process(), "the test process opened a CUDA context: build in a child process"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The record of a passing GPU suite: only when every selected test ran and passed, none skipped."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    stats = reporter.stats if reporter is not None else {}
    passed = len([r for r in stats.get("passed", []) if r.when == "call"])
    if exitstatus != 0 or not passed or stats.get("skipped") or stats.get("failed") or stats.get("error"):
        return
    if SIMULATED or not all("gpu" in item.keywords for item in session.items):
        return  # a dry run on the CPU, or a run that mixed in CPU tests: not the GPU suite on a GPU
    state = gpu_state()
    commit, problem = _verified_commit()
    if state is None or commit is None:
        print(f"\n{VERIFIED.name} not written: {problem or 'NVML sees no GPU'}")
        return
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    VERIFIED.write_text(f"{commit} {when} {state.name} {passed} passed\n")
    print(f"\nwrote {VERIFIED.name}: {VERIFIED.read_text().strip()}")


def _verified_commit() -> tuple[str | None, str]:
    """The commit whose files ran, else None and why none can be named. A copied tree (the GPU machine's) is told
    its commit and that commit's digest (tools/gpu_commit.py) and must hold exactly those files; a git checkout
    must be clean."""
    named, digest = os.environ.get(COMMIT_ENV), os.environ.get(DIGEST_ENV)
    if named:
        if not digest:
            return None, f"{COMMIT_ENV} needs {DIGEST_ENV} beside it (python -m tools.gpu_commit prints both)"
        here = checkout_digest(ROOT)
        if here != digest:
            return None, f"the files here (digest {here}) are not those of {named[:10]} (digest {digest})"
        return named, ""
    dirty = _uncommitted_changes()
    if dirty:
        return None, f"the checkout differs from its commit ({dirty})"
    commit = git_commit(ROOT)
    return commit, "" if commit else "not a git checkout, and no commit named"


def _uncommitted_changes() -> str | None:
    """What `git status` lists besides .gpu-verified, where the checkout is a git one; None where it is clean or
    not a git checkout."""
    try:
        done = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    changed = [line[3:] for line in done.stdout.splitlines() if line[3:] != VERIFIED.name]
    return ", ".join(changed[:5]) or None
