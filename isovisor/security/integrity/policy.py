"""The launch policy: which value of each measurement is acceptable, signed with the
policy key (Ed25519) so a changed policy file is refused, not obeyed.

    {"schema": 1,
     "accept": {"kernel.release": ["6.1.0-27-amd64"], "kernel.randomize_va_space": ["2"],
                "isovisor.manifest": ["<digest of the signed manifest>"], ...},
     "accept_any": ["kvm.kvm.halt_poll_ns"]}

A measurement whose name is in neither table is refused ("not covered by the policy"): a
new kernel knob or a new vulnerability file needs a decision. `build_policy` writes one
that accepts exactly the current measurements, for the operator to review and widen.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from isovisor.security.integrity.errors import IntegrityError, PolicyError
from isovisor.security.integrity.eventlog import Event
from isovisor.security.integrity.measurements import Measurement
from isovisor.security.integrity.signing import read_signed, write_signed

SCHEMA = 1


def _show(value: str, limit: int = 200) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


@dataclass(frozen=True)
class Policy:
    accept: dict[str, frozenset[str]]
    accept_any: frozenset[str]

    def refusal(self, event: Event, index: int) -> str | None:
        """None when the policy accepts the event; else one sentence naming it."""
        where = f"measurement {event.name} (PCR {event.pcr}, event #{index})"
        if event.name in self.accept_any:
            return None
        allowed = self.accept.get(event.name)
        if allowed is None:
            return f"{where} = {_show(event.value)} is not covered by the policy"
        if event.value not in allowed:
            shown = ", ".join(_show(v) for v in sorted(allowed)[:4])
            return (f"{where} = {_show(event.value)} is not accepted by the policy "
                    f"(accepted: {shown})")
        return None

    def check(self, events: Iterable[Event]) -> list[str]:
        return [r for i, ev in enumerate(events) if (r := self.refusal(ev, i)) is not None]


def policy_document(measurements: Iterable[Measurement]) -> dict[str, Any]:
    accept: dict[str, list[str]] = {}
    for m in measurements:
        accept.setdefault(m.name, [])
        if m.value not in accept[m.name]:
            accept[m.name].append(m.value)
    return {"schema": SCHEMA, "accept": accept, "accept_any": []}


def build_policy(out: Path, key: Ed25519PrivateKey,
                 measurements: Iterable[Measurement]) -> Path:
    write_signed(out, policy_document(measurements), key)
    return out


def parse_policy(doc: dict[str, Any], source: str) -> Policy:
    try:
        if doc["schema"] != SCHEMA:
            raise PolicyError(f"policy {source}: schema {doc['schema']!r} is not {SCHEMA}")
        accept, any_ = doc["accept"], doc.get("accept_any", [])
    except KeyError as exc:
        raise PolicyError(f"policy {source}: missing field {exc}") from None
    if not (isinstance(accept, dict) and all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(x, str) for x in v)
            for k, v in accept.items())):
        raise PolicyError(f"policy {source}: 'accept' must map names to lists of strings")
    if not (isinstance(any_, list) and all(isinstance(x, str) for x in any_)):
        raise PolicyError(f"policy {source}: 'accept_any' must be a list of names")
    return Policy({k: frozenset(v) for k, v in accept.items()}, frozenset(any_))


def load_policy(path: Path, key: Ed25519PublicKey) -> Policy:
    """The verified policy; PolicyError naming the file when it is missing, malformed or
    not signed by `key` (a tampered policy)."""
    try:
        doc = read_signed(path, key, "policy")
    except PolicyError:
        raise
    except IntegrityError as exc:
        raise PolicyError(str(exc)) from exc
    return parse_policy(doc, str(path))
