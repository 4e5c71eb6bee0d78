"""The management CLI against a real API server: ca, tenant, vm, role commands, tables,
JSON output, clear one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from isovisor.cli.main import main
from tests.api.stack import Stack


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def cli_config(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return stack.cli_admin_config(tmp_path_factory.mktemp("cli"))


def test_ca_init_issue_revoke_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = str(tmp_path / "ca")
    assert run(capsys, "ca", "--dir", ca, "init")[0] == 0
    code, _, err = run(capsys, "ca", "--dir", ca, "init")
    assert code == 1 and "refusing to overwrite" in err
    assert run(capsys, "ca", "--dir", ca, "issue", "alice", "--out", str(tmp_path))[0] == 0
    assert (tmp_path / "alice.key").stat().st_mode & 0o777 == 0o600
    assert run(capsys, "ca", "--dir", ca, "revoke", "alice")[0] == 0
    code, out, _ = run(capsys, "ca", "--dir", ca, "list")
    assert code == 0 and "alice" in out and "REVOKED" in out.splitlines()[0]
    code, _, err = run(capsys, "ca", "--dir", ca, "issue", "bad name")
    assert code == 1 and "not a valid principal name" in err


def test_tenant_vm_role_commands(cli_config: Path, stack: Stack,
                                 capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ISOVISOR_CONFIG", str(cli_config))
    assert run(capsys, "tenant", "create", "clit", "--max-vms", "3")[0] == 0
    code, out, _ = run(capsys, "tenant", "list")
    assert code == 0 and out.splitlines()[0].split()[:2] == ["NAME", "VCPUS"]
    assert "clit" in out
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(b"\x7fELF")
    assert run(capsys, "vm", "image-upload", "k", str(kernel), "-t", "clit")[0] == 0
    code, out, _ = run(capsys, "vm", "create", "web", "--kernel", "k", "-t", "clit",
                       "--memory", "64M")
    assert code == 0 and "running" in out
    code, out, _ = run(capsys, "vm", "list", "-t", "clit", "-o", "json")
    assert code == 0 and json.loads(out)[0]["name"] == "web"
    code, out, _ = run(capsys, "vm", "console", "web", "-t", "clit", "--send", "hi")
    assert code == 0 and "inert console" in out and "input: hi" in out
    assert run(capsys, "vm", "stop", "web", "-t", "clit")[0] == 0
    code, _, err = run(capsys, "vm", "show", "nope", "-t", "clit")
    assert code == 1 and "NotFound: VM 'nope' not found (request " in err
    code, out, _ = run(capsys, "role", "assign", "someone", "Reader", "--scope", "/tenants/clit")
    assert code == 0 and "someone" in out
    code, out, _ = run(capsys, "role", "list", "--scope", "/tenants/clit")
    assert code == 0 and "VM Operator" in out and "Host Admin" not in out
    code, out, _ = run(capsys, "role", "whoami")
    assert code == 0 and "principal cli-admin" in out
    code, out, _ = run(capsys, "tenant", "show", "clit")
    assert code == 0 and "1 of 3" in out


def test_clear_errors_without_config_or_server(capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path, cli_config: Path) -> None:
    monkeypatch.setenv("ISOVISOR_CONFIG", str(tmp_path / "none.toml"))
    code, _, err = run(capsys, "tenant", "list")
    assert code == 1 and "no ca, cert, key configured" in err
    monkeypatch.setenv("ISOVISOR_CONFIG", str(cli_config))
    code, _, err = run(capsys, "tenant", "list", "--endpoint", "https://127.0.0.1:1")
    assert code == 1 and "cannot connect" in err
