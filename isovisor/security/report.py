"""`python -m isovisor.security.report` (make security-report): attack-surface coverage.

Prints the inventory size (and whether security/surface.json matches the code), how many
entries have a THREAT_MODEL.md row and a fuzz harness, the executions of each harness in
its last run (cache/fuzz/), and the open findings (fuzz/findings/). Exit status 1 when
coverage is below 100% or the inventory is stale."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from isovisor.security.surface import INVENTORY_PATH, SurfaceError, check, repo_root
from isovisor.security.surface.coverage import (
    THREAT_MODEL,
    corpus_size,
    fuzz_stats,
    harness_map,
    harnesses,
    open_findings,
    parse_threat_model,
)
from isovisor.security.surface.model import load_ids


def _pct(n: int, total: int) -> str:
    return f"{n}/{total} ({100 * n / total:.0f}%)" if total else "0/0"


def report(root: Path, *, verify: bool = True) -> tuple[list[str], bool]:
    lines: list[str] = []
    ok = True
    try:
        ids = load_ids((root / INVENTORY_PATH).read_text())
    except (OSError, SurfaceError) as exc:
        return [f"inventory: cannot read {INVENTORY_PATH}: {exc}"], False
    fresh = "not checked"
    if verify:
        try:
            stale = check(root / INVENTORY_PATH)
        except SurfaceError as exc:
            stale, fresh = "?", f"cannot generate ({exc})"
        if fresh == "not checked":
            fresh = "yes" if not stale else "NO (run `isovisor surface --check`)"
        ok &= fresh == "yes"
    lines.append(f"inventory entries:          {len(ids)}  ({INVENTORY_PATH}; matches the "
                 f"code: {fresh})")
    try:
        rows = parse_threat_model((root / THREAT_MODEL).read_text())
    except OSError:
        rows = {}
    modelled = [i for i in ids if i in rows and not any(r.problems() for r in rows[i])]
    lines.append(f"with a threat-model entry:  {_pct(len(modelled), len(ids))}")
    found = harnesses(root)
    hmap = harness_map(ids, found)
    fuzzed = [i for i, h in hmap.items() if h]
    lines.append(f"with a fuzz harness:        {_pct(len(fuzzed), len(ids))}  "
                 f"({len(found)} harnesses)")
    ok &= len(modelled) == len(ids) == len(fuzzed)
    missing = sorted(set(ids) - set(modelled)) + sorted(set(ids) - set(fuzzed))
    for i in missing:
        lines.append(f"  missing: {i} ({'threat model' if i not in modelled else 'harness'})")
    stats = fuzz_stats(root)
    lines.append("")
    lines.append("fuzz harness          entries  corpus  last run: executions  seconds  "
                 "mode    result   crashes  started")
    for h in found:
        s = stats.get(h.name)
        covered = sum(1 for v in hmap.values() if h.name in v)
        run = (f"{s.get('executions', 0):>20}  {s.get('seconds', 0):>7}  "
               f"{s.get('mode', '?'):<6}  {s.get('result', '?'):<7}  {s.get('crashes', 0):>7}"
               f"  {s.get('started', '?')}" if s else f"{'never run':>20}")
        lines.append(f"{h.name:<20}  {covered:>7}  {corpus_size(root, h.name):>6}  {run}")
    total = sum(int(s.get("executions", 0)) for s in stats.values())
    lines.append(f"{'total':<20}  {'':>7}  {'':>6}  {total:>20}")
    findings = open_findings(root)
    lines.append("")
    lines.append(f"open findings:              {len(findings)}")
    for f in findings:
        lines.append(f"  {f.relative_to(root)}")
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="isovisor.security.report",
                                description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--no-verify", action="store_true",
                   help="do not regenerate the inventory to compare it with the code")
    args = p.parse_args(argv)
    lines, ok = report(repo_root(), verify=not args.no_verify)
    print("isovisor security report")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
