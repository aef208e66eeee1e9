"""The architecture's rules (DESIGN.md), checked mechanically on the source tree:

- `worker/` imports nothing from `orchestrator/`;
- `contract/`, the torch-free core both sides import, imports neither side, nor torch, transformers or peft;
- `import orchestrator.cli` leaves torch, transformers, peft and ray out of sys.modules;
- only the Ray backend (orchestrator/backends/ray/) imports ray, an optional extra;
- no import cycles between the project's modules (imports inside functions count too);
- every run-folder file name is spelled once, in contract/layout.py;
- no test file imports another (shared helpers live in tests/helpers.py).

The same rules, less the last three, are import-linter contracts in pyproject.toml; `lint-imports` must keep them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

PACKAGES = ("contract", "orchestrator", "worker")
MODEL_STACK = ("torch", "transformers", "peft", "accelerate")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources(*folders: str) -> dict[str, Path]:
    return {_module_name(p): p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module `name` imports, at any depth of the file (lazy imports count), resolved to project modules
    where they are one (`from contract import messages` is contract.messages) and to top-level names otherwise."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    return found


def _graph(*folders: str) -> dict[str, set[str]]:
    sources = _sources(*folders)
    known = set(sources)
    return {name: _imports(name, path, known) for name, path in sources.items()}


def _offenders(graph: dict[str, set[str]], source: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{importer} imports {target}" for importer, targets in graph.items()
                  if importer == source or importer.startswith(source + ".")
                  for target in targets if target.split(".")[0] in forbidden)


def test_the_worker_imports_nothing_from_the_parent() -> None:
    assert _offenders(_graph(*PACKAGES), "worker", ("orchestrator",)) == []


def test_the_shared_core_imports_neither_side_nor_the_model_stack() -> None:
    assert _offenders(_graph(*PACKAGES), "contract", ("orchestrator", "worker", *MODEL_STACK)) == []


def test_the_parent_imports_no_model_stack() -> None:
    assert _offenders(_graph(*PACKAGES), "orchestrator", MODEL_STACK) == []


RAY_BACKEND = ("orchestrator.backends.ray.backend", "orchestrator.backends.ray.node",
               "orchestrator.backends.ray.cluster")


def test_only_the_ray_backend_imports_ray() -> None:
    """Ray is an optional extra: a local run must work without it, so nothing else may import it."""
    graph = _graph(*PACKAGES)
    importers = sorted(name for name, targets in graph.items() if any(t.split(".")[0] == "ray" for t in targets))
    assert importers and set(importers) <= set(RAY_BACKEND), importers


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_between_the_project_modules() -> None:
    graph = _graph(*PACKAGES, "tools", "benchmarks")
    assert len(graph) > 30  # the walk found the tree
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_importing_the_cli_and_the_core_loads_no_model_stack_nor_ray() -> None:
    core = [name for name in _sources("contract") if name != "contract"]
    code = ("import sys, importlib\n"
            f"for name in {['orchestrator.cli', *core]!r}:\n"
            "    importlib.import_module(name)\n"
            f"print(sorted(m for m in {(*MODEL_STACK, 'ray')!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


_RUN_FOLDER_NAMES = {"run.json", "summary.json", "report.md", "report.html", "spec.json", "samples.jsonl",
                     "worker.log", "lineage.json", "history.md", "history.html"}


def test_every_run_folder_file_name_is_spelled_once() -> None:
    spelled = []
    for name, path in _sources(*PACKAGES).items():
        if name == "contract.layout":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in _RUN_FOLDER_NAMES:
                spelled.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value}")
    assert spelled == []


def test_no_test_file_imports_another() -> None:
    tests = {p.stem for p in (ROOT / "tests").glob("*.py")}
    importers = []
    for path in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            importers += [f"{path.name} imports {n}" for n in names
                          if n.split(".")[0] in tests and n.split(".")[0].startswith(("test_", "conftest"))]
    assert importers == []


def test_import_linter_keeps_the_contracts() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.fail("import-linter is a dev dependency (pip install -e .[dev]): lint-imports not found")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout
