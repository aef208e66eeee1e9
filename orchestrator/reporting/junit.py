"""JUnit XML for CI: one test case per recipe; a failed or refused recipe, or one a gate failed, has a <failure>."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import orjson

from contract.run_row import RecipeRow, RunSummary
from orchestrator.results.summary import recipe_seconds

_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml_text(text: str) -> str:
    """XML 1.0 cannot hold most control characters, and a garbled model output has them."""
    return _XML_ILLEGAL.sub("?", text)


def junit_xml(summary: RunSummary, gates: dict[str, Any] | None, run_dir: Path) -> str:
    """One test case per recipe; a failed or refused recipe, or one a gate failed, has a <failure>."""
    by_recipe: dict[str, list[dict[str, Any]]] = {}
    for failure in (gates or {}).get("failures", []):
        by_recipe.setdefault(failure["recipe"], []).append(failure)
    suite = ET.Element("testsuite", name="evalorch", tests=str(len(summary.recipes)))
    failed = 0
    for row in summary.recipes:
        seconds = recipe_seconds(run_dir, row.name)
        case = ET.SubElement(suite, "testcase", classname=f"evalorch.{run_dir.name}", name=row.name,
                             time=f"{seconds or 0.0:.3f}")
        message, kind = _case_failure(row, by_recipe.get(row.name, []))
        if message:
            failed += 1
            element = ET.SubElement(case, "failure", message=_xml_text(message.splitlines()[0][:500]), type=kind)
            element.text = _xml_text(message)
        out = ET.SubElement(case, "system-out")
        out.text = _xml_text(orjson.dumps(row.metrics or {}).decode())
    suite.set("failures", str(failed))
    root = ET.Element("testsuites", name="evalorch", tests=suite.get("tests", "0"), failures=str(failed))
    root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _case_failure(row: RecipeRow, gate_failures: list[dict[str, Any]]) -> tuple[str, str]:
    if not row.ok:
        return f"{row.name}: {row.status}: {row.detail}".rstrip(": "), str(row.status)
    if gate_failures:
        return "\n".join(f["message"] for f in gate_failures), "gate"
    return "", ""
