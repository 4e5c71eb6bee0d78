"""Action patterns as in Azure RBAC: `*` matches any run of characters, `/` included, so
`vms/*` covers `vms/read` and `vms/start/action`, and `*/read` every read. Case-insensitive."""

from __future__ import annotations

import functools
import re

from isovisor.security.rbac.errors import RbacError

PATTERN_RE = re.compile(r"^(\*|[A-Za-z*][A-Za-z0-9*]*)(/(\*|[A-Za-z*][A-Za-z0-9*]*))*$")


def check_pattern(pattern: str) -> str:
    if not PATTERN_RE.match(pattern):
        raise RbacError(f"{pattern!r} is not an action pattern like 'vms/*' or '*/read'")
    return pattern


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(
        "^" + ".*".join(re.escape(p) for p in pattern.split("*")) + "$", re.IGNORECASE
    )


def matches(pattern: str, action: str) -> bool:
    return _compiled(pattern).match(action) is not None


def matches_any(patterns: tuple[str, ...], action: str) -> bool:
    return any(matches(p, action) for p in patterns)
