"""The real `isovisor audit` command line on a log and tampered copies of it."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest

from isovisor.cli.main import main
from isovisor.security.audit import AuditSigningKey
from isovisor.security.audit.segments import list_segments
from tests.security.audit.helpers import run_cli, write_log, write_public_key


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory, key: AuditSigningKey) -> Path:
    return write_log(tmp_path_factory.mktemp("cli") / "log", key, 30, checkpoint_records=4,
                     segment_bytes=4096)


def _tampered(logdir: Path, tmp_path: Path, how: str) -> tuple[Path, int]:
    """A copy of the log with one change in its second segment; the line it touches."""
    d = tmp_path / "log"
    shutil.copytree(logdir, d)
    seg = list_segments(d)[0][1].path
    lines = seg.read_bytes().split(b"\n")[:-1]
    if how == "flip":
        lines[2] = lines[2].replace(b'"seq":', b'"seq":1', 1)
    elif how == "drop":
        del lines[2]
    elif how == "swap":
        lines[2], lines[4] = lines[4], lines[2]
    seg.write_bytes(b"".join(x + b"\n" for x in lines))
    return d, 3


@pytest.mark.parametrize("how", ["flip", "drop", "swap"])
def test_verify_names_the_first_bad_entry(logdir: Path, key: AuditSigningKey, tmp_path: Path,
                                          how: str) -> None:
    d, line = _tampered(logdir, tmp_path, how)
    pub = write_public_key(tmp_path, key)
    r = run_cli("audit", "verify", "--dir", str(d), "--key", str(pub))
    assert r.returncode == 4, r.stdout + r.stderr
    first = r.stdout.splitlines()
    assert first[0].endswith("TAMPERED")
    seg = list_segments(d)[0][1].name
    assert "first bad entry: seq " in first[1] and f"({seg} line {line})" in first[1], r.stdout


def test_verify_export_show_on_a_good_log(logdir: Path, key: AuditSigningKey, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    pub = write_public_key(tmp_path, key)
    r = run_cli("audit", "verify", "--dir", str(logdir), "--key", str(pub), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["status"] == "verified" and report["first_bad"] is None
    assert any("removed" in u for u in report["unproven"])  # what cannot be proven, said

    # The rest in this process: the same entry point, without an interpreter start each.
    out = tmp_path / "export.jsonl"
    assert main(["audit", "export", "--dir", str(logdir), "--out", str(out)]) == 0
    # The export is the log byte for byte: it verifies on its own, against an anchor too.
    anchor = f"{report['head']['seq']}:{report['head']['sha256']}"
    capsys.readouterr()
    assert main(["audit", "verify", "--dir", str(out), "--key", str(pub),
                 "--anchor", anchor]) == 0
    assert main(["audit", "verify", "--dir", str(out), "--key", str(pub),
                 "--anchor", f"{report['head']['seq'] + 1}:{'0' * 64}"]) == 4
    capsys.readouterr()
    assert main(["audit", "show", "--dir", str(logdir), "--kind", "api", "--tail", "3"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:2] == ["SEQ", "TIME"] and len(rows) == 4
    assert all("api.request" in row for row in rows[1:])


def test_truncated_log_is_unproven(logdir: Path, key: AuditSigningKey, tmp_path: Path) -> None:
    d = tmp_path / "log"
    shutil.copytree(logdir, d)
    seg = list_segments(d)[0][-1].path
    seg.write_bytes(seg.read_bytes()[:-30])
    pub = write_public_key(tmp_path, key)
    r = run_cli("audit", "verify", "--dir", str(d), "--key", str(pub))
    assert r.returncode == 3, r.stdout + r.stderr
    assert "UNPROVEN" in r.stdout and "incomplete entry" in r.stdout


def test_errors_are_one_sentence(tmp_path: Path, key: AuditSigningKey,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    pub = write_public_key(tmp_path, key)
    for argv in (["audit", "verify", "--dir", str(tmp_path / "absent"), "--key", str(pub)],
                 ["audit", "verify", "--dir", str(tmp_path), "--anchor", "x"],
                 ["audit", "show", "--dir", str(tmp_path / "absent")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("isovisor: "), err


def test_keygen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    assert main(["audit", "keygen", "--key", str(keys / "audit.key")]) == 0
    assert stat.S_IMODE((keys / "audit.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert main(["audit", "keygen", "--key", str(keys / "audit.key")]) == 1
    assert "already exists" in capsys.readouterr().err
