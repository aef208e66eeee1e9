"""The documents a user reads stay true to the tree: every relative link (and its #anchor) resolves, README stays
short and links every page of docs/, every recipe setting and every command-line option is documented, and
DESIGN.md's layout lists exactly the modules there are."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import click
import pytest
from helpers import ROOT

from contract.recipe import Recipe
from orchestrator.cli import main
from orchestrator.planning.recipes import LineageRules

DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / name for name in ("README.md", "DESIGN.md", "BENCHMARKS.md", "GPU_CHECKS.md", "CHANGELOG.md")] + DOCS
README_MOST_LINES = 200
LAYOUT_ROOTS = ("contract", "orchestrator", "worker", "tools", "benchmarks")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def _prose(path: Path) -> str:
    """The page without its fenced code blocks (a link inside one is text, not a link)."""
    return _FENCE.sub("", path.read_text())


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to
    hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: Counter[str] = Counter()
    anchors = set()
    for line in _prose(path).splitlines():
        if line.startswith("#"):
            slug = _slug(line.lstrip("#"))
            anchors.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return anchors


def _relative_links(path: Path) -> list[str]:
    return [t for t in _LINK.findall(_prose(path)) if not re.match(r"^[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in _relative_links(page):
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.is_file():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_readme_is_short_and_links_every_page() -> None:
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) < README_MOST_LINES
    linked = {(readme.parent / t.partition("#")[0]).resolve() for t in _relative_links(readme)}
    missing = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"README links none of: {missing}"


def test_every_recipe_setting_is_documented() -> None:
    """docs/recipes.md has a table row for every field of the schema the recipe file is validated with."""
    rows = {m.group(1) for m in re.finditer(r"^\| `([a-z_]+)` \|", (ROOT / "docs" / "recipes.md").read_text(), re.M)}
    fields = set(Recipe.model_fields) | set(LineageRules.model_fields)
    assert fields - rows == set(), "settings missing from docs/recipes.md"
    assert rows - fields == set(), "docs/recipes.md documents settings the schema does not have"


def test_every_command_and_option_is_documented() -> None:
    text = "\n".join(page.read_text() for page in [ROOT / "README.md", *DOCS])
    assert [name for name in main.commands if f"`{name} " not in text] == [], "commands missing from README's table"
    missing = [f"{name} {param.opts[0]}" for name, command in main.commands.items() for param in command.params
               if isinstance(param, click.Option) and not any(o in text for o in param.opts + param.secondary_opts)]
    assert missing == [], "options documented nowhere"


def _layout() -> set[str]:
    """The modules DESIGN.md's layout block lists, as paths: a line `pkg/sub/` opens a package, its indented lines
    name its modules."""
    design = (ROOT / "DESIGN.md").read_text()
    block = design.split("## Layout", 1)[1].split("```")[1]
    listed, package = set(), None
    for line in block.splitlines():
        if not line.strip():
            continue
        word = line.split()[0]
        if not line.startswith(" "):
            package = word if word.endswith("/") and word.split("/")[0] in LAYOUT_ROOTS else None
            if package:
                listed.add(package)
        elif package:
            listed.add(f"{package}{word}.py")
    return listed


def test_design_layout_lists_every_module() -> None:
    tree = set()
    for root in LAYOUT_ROOTS:
        for path in (ROOT / root).rglob("*.py"):
            relative = path.relative_to(ROOT)
            tree.add(f"{relative.parent}/" if path.name == "__init__.py" else str(relative))
    listed = _layout()
    assert tree - listed == set(), "modules missing from DESIGN.md's layout"
    assert listed - tree == set(), "DESIGN.md's layout names modules that are not in the tree"
