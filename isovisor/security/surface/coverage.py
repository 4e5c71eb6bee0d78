"""How the inventory is covered: THREAT_MODEL.md rows, fuzz harnesses, fuzz runs, findings.

The mapping, both ways keyed by inventory id:

- THREAT_MODEL.md has one table row per entry whose first cell is the id in backticks,
  then the STRIDE threats (each tagged **S**, **T**, **R**, **I**, **D** or **E**), the
  mitigation, and the tests that prove it (backticked `tests/...py::test_name` or
  `fuzz/harnesses/NAME.py` references, which must exist);
- every harness module in fuzz/harnesses/ declares `COVERS`, a tuple of ids or fnmatch
  patterns (read here from the source, without importing the harness).

Everything here reads files of the checkout; nothing imports test or fuzz code.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

THREAT_MODEL = Path("THREAT_MODEL.md")
HARNESS_DIR = Path("fuzz") / "harnesses"
CORPUS_DIR = Path("fuzz") / "corpus"
FINDINGS_DIR = Path("fuzz") / "findings"
STATS_DIR = Path("cache") / "fuzz"
STRIDE = ("S", "T", "R", "I", "D", "E")
_ROW = re.compile(r"^\|\s*`([a-z]+:[^`]+)`\s*\|(.*)\|\s*$")
_REF = re.compile(r"`((?:tests|fuzz)/[^`\s]+)`")
_TAG = re.compile(r"\*\*([STRIDE])\*\*")


@dataclass(frozen=True)
class ThreatRow:
    id: str
    threats: str
    mitigation: str
    tests: str
    line: int

    @property
    def stride(self) -> tuple[str, ...]:
        return tuple(sorted(set(_TAG.findall(self.threats)), key=STRIDE.index))

    @property
    def refs(self) -> tuple[str, ...]:
        return tuple(_REF.findall(self.tests))

    def problems(self) -> list[str]:
        out = []
        if not self.stride:
            out.append("names no STRIDE threat (tag each with **S**, **T**, **R**, **I**, "
                       "**D** or **E**)")
        if len(self.mitigation.strip()) < 10:
            out.append("has no mitigation")
        if not any("::" in r for r in self.refs):
            out.append("cites no test (`tests/...py::test_name`)")
        return out


def parse_threat_model(text: str) -> dict[str, list[ThreatRow]]:
    """id -> its rows (more than one row for an id is reported by the checks)."""
    rows: dict[str, list[ThreatRow]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        m = _ROW.match(line.strip())
        if m is None:
            continue
        cells = [c.strip() for c in m.group(2).split("|")]
        if len(cells) != 3:  # reported by problems(): the columns are fixed
            cells = ["", "", ""]
        threats, mitigation, tests = cells
        rows.setdefault(m.group(1), []).append(
            ThreatRow(m.group(1), threats, mitigation, tests, n))
    return rows


def check_ref(root: Path, ref: str) -> str | None:
    """Why a cited test or harness does not exist (None when it does)."""
    path, _, name = ref.partition("::")
    file = root / path
    if not file.is_file():
        return f"{path} does not exist"
    if name:
        leaf = name.split("::")[-1].split("[")[0]
        if not re.search(rf"^\s*(async\s+def|def|class)\s+{re.escape(leaf)}\b",
                         file.read_text(), re.MULTILINE):
            return f"{path} has no test {leaf}"
    return None


@dataclass(frozen=True)
class Harness:
    name: str
    path: Path
    covers: tuple[str, ...]

    def covers_id(self, entry_id: str) -> bool:
        return any(fnmatch.fnmatchcase(entry_id, pattern) for pattern in self.covers)


def harnesses(root: Path) -> list[Harness]:
    out = []
    for path in sorted((root / HARNESS_DIR).glob("*.py")):
        if path.name.startswith("_"):
            continue
        covers: tuple[str, ...] = ()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == "COVERS" for t in targets) \
                        and node.value is not None:
                    value = ast.literal_eval(node.value)
                    covers = tuple(str(v) for v in value)
        out.append(Harness(path.stem, path, covers))
    return out


def harness_map(ids: Iterable[str], found: list[Harness]) -> dict[str, list[str]]:
    return {i: [h.name for h in found if h.covers_id(i)] for i in ids}


def corpus_size(root: Path, harness: str) -> int:
    d = root / CORPUS_DIR / harness
    return sum(1 for p in d.iterdir() if p.is_file()) if d.is_dir() else 0


def fuzz_stats(root: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path in sorted((root / STATS_DIR).glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict):
            out[path.stem] = doc
    return out


def open_findings(root: Path) -> list[Path]:
    """Findings not yet fixed: everything in fuzz/findings/ but its README."""
    d = root / FINDINGS_DIR
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir()
                  if p.is_file() and p.name not in ("README.md", ".gitkeep"))
