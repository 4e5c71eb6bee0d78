"""emulator_probe: what this host's KVM cannot run in guest ring 0, and its per-boot cache."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from isovisor.vmm import emulator_probe as ep
from isovisor.vmm.cpu_features import FEATURES
from isovisor.vmm.host import HostInfo, HostKind, detect

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(
        not os.path.exists("/dev/kvm"),
        reason="/dev/kvm IS MISSING: the emulator probe needs KVM; these tests did not run",
    ),
]

HARDWARE = HostInfo(HostKind.HARDWARE, frozenset({"vmx"}))
PVM = HostInfo(HostKind.PVM, frozenset())


@pytest.fixture(scope="module")
def kvm() -> Iterator[Any]:
    from isovisor.kvm import Kvm

    k = Kvm()
    yield k
    k.close()


@pytest.fixture(scope="module")
def result(kvm: Any) -> ep.EmulatorProbe:
    return ep.probe_emulator(kvm, force=True)


class _NoKvm:
    """Stands in for Kvm where nothing may be probed: any use fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"probe touched KVM ({name}) on a hardware host")


def test_plausible_on_this_host(result: ep.EmulatorProbe) -> None:
    assert result.probed
    assert result.unemulable <= FEATURES.keys()
    assert result.needs_assists <= ep.ASSISTS
    names = [n for n, _ in result.details]
    assert names == [p.name for p in ep.PROBES]
    assert all(d for _, d in result.details)
    if detect().kind is HostKind.PVM:
        # Measured on the PVM development host: KVM's emulator has neither.
        assert {"xsave", "popcnt", "cx16"} <= result.unemulable
        # Masking xsave masks what needs XCR0 with it.
        assert {"avx", "avx2", "avx512f", "fma", "f16c"} <= result.unemulable
        assert result.needs_assists == {"int3", "fwait"}
        assert (result.detail("xsave") or "").startswith("not emulable")
        assert result.elapsed_s < 1.0
    # Plain instructions the emulator handles everywhere stay visible.
    assert "smep" not in result.unemulable


def test_hardware_host_probes_nothing() -> None:
    got = ep.probe_emulator(cast(Any, _NoKvm()), host=HARDWARE)
    assert got == ep.EmulatorProbe(frozenset(), frozenset())
    assert not got.probed


def test_force_probes_even_on_hardware(kvm: Any) -> None:
    assert ep.probe_emulator(kvm, force=True, host=HARDWARE).probed


def test_hardware_host_cache_untouched(tmp_path: Path) -> None:
    path = tmp_path / ep.CACHE_NAME
    got = ep.cached_probe(cast(Any, _NoKvm()), path=path, host=HARDWARE)
    assert got.unemulable == frozenset() and got.needs_assists == frozenset()
    assert not path.exists()


def test_cache_round_trip(
    kvm: Any, result: ep.EmulatorProbe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / ep.CACHE_NAME
    monkeypatch.setattr(ep, "probe_emulator", lambda *a, **k: result)
    first = ep.cached_probe(kvm, path=path, host=PVM)
    assert first == result and path.exists()

    def must_not_probe(*a: object, **k: object) -> ep.EmulatorProbe:
        raise AssertionError("probe ran although the cache was valid")

    monkeypatch.setattr(ep, "probe_emulator", must_not_probe)
    again = ep.cached_probe(kvm, path=path, host=PVM)
    assert again.unemulable == result.unemulable
    assert again.needs_assists == result.needs_assists
    assert again.details == result.details


def _doc(result: ep.EmulatorProbe) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(ep._to_json(result, ep.cache_key()))
    return doc


@pytest.mark.parametrize(
    "forge",
    [
        lambda d: d.update(unemulable=[*d["unemulable"], "evil"]),  # unknown feature
        lambda d: d.update(unemulable="xsave"),  # wrong shape
        lambda d: d.update(needs_assists=["hlt"]),  # not an assist
        lambda d: d["key"].update(boot_id="another-boot"),  # stale
        lambda d: d.update(format=99),
        lambda d: d.update(details=[["xsave", "x" * 10_000]]),
        lambda d: d.update(details=[["../../etc", "works"]]),
        lambda d: d.update(elapsed_s=True),
        lambda d: d.update(extra=1),
        lambda d: d.pop("details"),
    ],
)
def test_forged_cache_rejected(result: ep.EmulatorProbe, forge: Any) -> None:
    doc = _doc(result)
    assert ep._from_json(json.dumps(doc), ep.cache_key()) is not None
    forge(doc)
    assert ep._from_json(json.dumps(doc), ep.cache_key()) is None


@pytest.mark.parametrize("garbage", [b"", b"{", b"\xff\xfe", b"[]", b"null", b"{}" + b" " * 70_000])
def test_corrupt_cache_reprobed_and_rewritten(
    kvm: Any,
    result: ep.EmulatorProbe,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    garbage: bytes,
) -> None:
    path = tmp_path / ep.CACHE_NAME
    path.write_bytes(garbage)
    calls: list[int] = []

    def probe(*a: object, **k: object) -> ep.EmulatorProbe:
        calls.append(1)
        return result

    monkeypatch.setattr(ep, "probe_emulator", probe)
    assert ep.cached_probe(kvm, path=path, host=PVM) == result
    assert calls == [1]
    assert ep._from_json(path.read_text(), ep.cache_key()) is not None


def test_forged_unknown_name_through_cached_probe(
    kvm: Any, result: ep.EmulatorProbe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / ep.CACHE_NAME
    doc = _doc(result)
    doc["unemulable"] = ["evil"]
    path.write_text(json.dumps(doc))
    monkeypatch.setattr(ep, "probe_emulator", lambda *a, **k: result)
    assert ep.cached_probe(kvm, path=path, host=PVM).unemulable == result.unemulable


def test_cache_symlink_not_followed(result: ep.EmulatorProbe, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text(ep._to_json(result, ep.cache_key()))
    link = tmp_path / ep.CACHE_NAME
    link.symlink_to(target)
    assert ep._read_cache(link) is None


def test_unsafe_cache_dirs_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert not ep._safe_dir(shared, 0o700)
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    assert not ep._safe_dir(link, 0o700)
    assert ep._safe_dir(tmp_path / "private", 0o700)
