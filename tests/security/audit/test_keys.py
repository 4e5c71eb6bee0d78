"""The audit key: created private, refused when exposed, loadable as a public key."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from isovisor.security.audit import (
    AuditKeyError,
    generate_key,
    load_or_generate_key,
    load_public_key,
    load_signing_key,
)
from isovisor.security.audit.keys import key_id, public_key_path, verify_signature


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    d.mkdir(mode=0o700)
    return d


def test_generate_and_load(keydir: Path) -> None:
    key = generate_key(keydir / "audit.key")
    assert _mode(keydir / "audit.key") == 0o600
    assert _mode(keydir / "audit.pub") == 0o644
    again = load_signing_key(keydir / "audit.key")
    assert again.key_id == key.key_id
    public = load_public_key(public_key_path(keydir / "audit.key"))
    assert key_id(public) == key.key_id
    assert key_id(load_public_key(keydir / "audit.key")) == key.key_id
    assert verify_signature(public, again.sign(b"m"), b"m")
    assert not verify_signature(public, again.sign(b"m"), b"n")
    assert load_or_generate_key(keydir / "audit.key").key_id == key.key_id


def test_never_overwrites(keydir: Path) -> None:
    generate_key(keydir / "audit.key")
    with pytest.raises(AuditKeyError, match="already exists"):
        generate_key(keydir / "audit.key")


def test_refuses_a_key_others_can_read(keydir: Path) -> None:
    generate_key(keydir / "audit.key")
    os.chmod(keydir / "audit.key", 0o640)
    with pytest.raises(AuditKeyError, match="must be 0600"):
        load_signing_key(keydir / "audit.key")


def test_refuses_a_key_directory_others_can_write(keydir: Path) -> None:
    generate_key(keydir / "audit.key")
    os.chmod(keydir, 0o777)
    with pytest.raises(AuditKeyError, match="could replace the key"):
        load_signing_key(keydir / "audit.key")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the key away")
def test_refuses_a_key_owned_by_someone_else(keydir: Path) -> None:
    generate_key(keydir / "audit.key")
    os.chown(keydir / "audit.key", 65534, -1)
    with pytest.raises(AuditKeyError, match="owned by uid 65534"):
        load_signing_key(keydir / "audit.key")


def test_refuses_symlinks_and_garbage(keydir: Path, tmp_path: Path) -> None:
    generate_key(keydir / "audit.key")
    (keydir / "link.key").symlink_to(keydir / "audit.key")
    with pytest.raises(AuditKeyError, match="cannot open"):
        load_signing_key(keydir / "link.key")
    (tmp_path / "junk.pub").write_bytes(b"not a key")
    with pytest.raises(AuditKeyError, match="not a PEM public key"):
        load_public_key(tmp_path / "junk.pub")
    with pytest.raises(AuditKeyError, match="does not exist"):
        load_public_key(tmp_path / "absent.pub")
