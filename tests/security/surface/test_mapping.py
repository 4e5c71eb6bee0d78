"""Every inventory entry has a THREAT_MODEL.md row (STRIDE threats, mitigation, real tests)
and a fuzz harness; nothing in either refers to an entry that no longer exists."""

from __future__ import annotations

import fnmatch
from typing import Any

import pytest

from isovisor.security.surface.coverage import (
    THREAT_MODEL,
    check_ref,
    corpus_size,
    harness_map,
    harnesses,
    parse_threat_model,
)
from tests.security.surface.conftest import ROOT


@pytest.fixture(scope="module")
def rows() -> dict[str, Any]:
    return parse_threat_model((ROOT / THREAT_MODEL).read_text())


def test_every_entry_has_a_threat_model_row(entries: dict[str, Any], rows: dict[str, Any]) -> None:
    missing = sorted(set(entries) - set(rows))
    assert not missing, ("inventory entries without a THREAT_MODEL.md row (add "
                         "| `id` | threats | mitigation | tests |): " + ", ".join(missing))


def test_threat_model_has_no_stale_or_duplicate_rows(entries: dict[str, Any],
                                                     rows: dict[str, Any]) -> None:
    stale = sorted(set(rows) - set(entries))
    assert not stale, f"THREAT_MODEL.md rows for entries that no longer exist: {stale}"
    dups = sorted(i for i, r in rows.items() if len(r) > 1)
    assert not dups, f"entries with more than one THREAT_MODEL.md row: {dups}"


def test_rows_name_stride_threats_a_mitigation_and_tests(rows: dict[str, Any]) -> None:
    bad = [f"{THREAT_MODEL}:{r.line} {i}: {p}" for i, rs in rows.items() for r in rs
           for p in r.problems()]
    assert not bad, "\n".join(bad)


def test_cited_tests_exist(rows: dict[str, Any]) -> None:
    bad = [f"{THREAT_MODEL}:{r.line} {i}: {why}" for i, rs in rows.items() for r in rs
           for ref in r.refs if (why := check_ref(ROOT, ref)) is not None]
    assert not bad, "\n".join(bad)


def test_every_entry_has_a_fuzz_harness(entries: dict[str, Any]) -> None:
    mapping = harness_map(entries, harnesses(ROOT))
    missing = sorted(i for i, h in mapping.items() if not h)
    assert not missing, ("inventory entries no harness COVERS (fuzz/harnesses/*.py): "
                         + ", ".join(missing))


def test_every_harness_covers_entries_and_has_a_corpus(entries: dict[str, Any]) -> None:
    found = harnesses(ROOT)
    assert found
    for h in found:
        assert h.covers, f"{h.path} declares no COVERS"
        for pattern in h.covers:
            assert any(fnmatch.fnmatchcase(i, pattern) for i in entries), \
                f"{h.path}: COVERS {pattern!r} matches no inventory entry"
        assert corpus_size(ROOT, h.name) > 0, f"fuzz/corpus/{h.name}/ has no seeds"
