"""Builds what an integrity-gated daemon needs, in a test's own directory: a copy of a code
tree, release and policy keys, a signed manifest, a host root whose measurement sources are
copies of this host's, and a signed policy accepting exactly those values."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from isovisor.security.integrity.gate import GateConfig
from isovisor.security.integrity.manifest import build_document, build_manifest
from isovisor.security.integrity.measurements import collect, manifest_measurement
from isovisor.security.integrity.policy import build_policy
from isovisor.security.integrity.signing import (
    document_digest,
    generate_key,
    load_private_key,
)

# Host files the measurements read (collect() below a root): copied into the test root.
SOURCES = ("proc/sys/kernel/osrelease", "proc/cmdline", "proc/sys/kernel/randomize_va_space",
           "sys/devices/system/cpu/smt/control", "sys/devices/system/cpu/smt/active",
           "sys/kernel/security/lockdown")
SOURCE_DIRS = ("sys/devices/system/cpu/vulnerabilities",)


def fake_host_root(root: Path) -> Path:
    """A directory laid out like / for the measured files, with this host's values."""
    host = Path("/")
    for rel in SOURCES:
        src = host / rel
        if src.exists():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(src.read_bytes())
    for rel in SOURCE_DIRS:
        d = root / rel
        d.mkdir(parents=True, exist_ok=True)
        for f in sorted((host / rel).iterdir()) if (host / rel).is_dir() else []:
            (d / f.name).write_bytes(f.read_bytes())
    for module in ("kvm", "kvm_test"):
        params = root / "sys/module" / module / "parameters"
        params.mkdir(parents=True, exist_ok=True)
        (params / "nx_huge_pages").write_text("never\n")
        (params / "ignore_msrs").write_text("N\n")
    return root


def code_tree(dest: Path, n_files: int = 3) -> Path:
    """A small code package standing in for isovisor's (the real tree is edited by others
    while tests run; the gate is the same code either way)."""
    dest.mkdir(parents=True)
    (dest / "__init__.py").write_text('"""stand-in package"""\n')
    for i in range(n_files):
        (dest / f"mod{i}.py").write_text(f"VALUE = {i}\n")
    return dest


@dataclass
class IntegrityFiles:
    dir: Path
    release_key: Path
    release_pub: Path
    policy_key: Path
    policy_pub: Path
    manifest: Path
    policy: Path
    code_root: Path
    measure_root: Path

    def gate_config(self, event_log: Path) -> GateConfig:
        return GateConfig(manifest=self.manifest, release_key=self.release_pub,
                          policy=self.policy, policy_key=self.policy_pub,
                          event_log=event_log, code_root=self.code_root,
                          measure_root=self.measure_root)

    def config_table(self) -> dict[str, object]:
        """The daemon's [integrity] table for these files."""
        return {"manifest": str(self.manifest), "release_key": str(self.release_pub),
                "policy": str(self.policy), "policy_key": str(self.policy_pub),
                "code_root": str(self.code_root), "measure_root": str(self.measure_root),
                "tpm": "swtpm"}


def make_integrity_files(base: Path, code_root: Path | None = None) -> IntegrityFiles:
    base.mkdir(parents=True, exist_ok=True)
    release_pub = generate_key(base / "release.key")
    policy_pub = generate_key(base / "policy.key")
    code = code_root if code_root is not None else code_tree(base / "code" / "pkg")
    manifest = build_manifest(base / "manifest.json", load_private_key(base / "release.key"),
                              code)
    measure_root = fake_host_root(base / "hostroot")
    import json
    digest = document_digest(json.loads(manifest.read_text())["document"])
    policy = build_policy(base / "policy.json", load_private_key(base / "policy.key"),
                          [*collect(measure_root), manifest_measurement(digest)])
    return IntegrityFiles(base, base / "release.key", release_pub, base / "policy.key",
                          policy_pub, manifest, policy, code, measure_root)


def copy_package(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


__all__ = ["IntegrityFiles", "build_document", "code_tree", "copy_package", "fake_host_root",
           "make_integrity_files"]
