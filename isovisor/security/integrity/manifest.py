"""The signed code manifest: every file of isovisor's package (sources and the bytecode
the interpreter loads) and the interpreter (its binary and libpython), with SHA-256.

Built at install time (`isovisor integrity manifest build`), signed with the release key
(Ed25519). `verify_manifest` checks the signature against the pinned release key, the hash
of every listed file, and that the package holds no file the manifest does not list (an
added module is code too: subcommands, for one, are discovered by listing the package).
"""

from __future__ import annotations

import compileall
import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

import isovisor
from isovisor.security.integrity.errors import IntegrityError, ManifestError
from isovisor.security.integrity.signing import document_digest, read_signed, write_signed

SCHEMA = 1
HASH_CHUNK = 1 << 20
MAX_FILES = 20000  # far above the package's few hundred files; bounds a hostile manifest


def package_root() -> Path:
    """The directory of the isovisor package this interpreter runs."""
    return Path(isovisor.__file__).resolve().parent


def interpreter_files() -> list[Path]:
    """The interpreter binary and, when it links one, its shared libpython."""
    files = [Path(os.path.realpath(sys.executable))]
    libdir, ldlib = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if libdir and ldlib and ".so" in str(ldlib):
        lib = Path(str(libdir)) / str(ldlib)
        if lib.is_file():
            files.append(Path(os.path.realpath(lib)))
    return files


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def code_files(root: Path) -> list[Path]:
    """Every regular file under the package root (symlinks are refused: a link can point
    anywhere after signing)."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_symlink():
                raise ManifestError(f"{p} is a symbolic link; the code tree must hold "
                                    "regular files only", str(p))
            found.append(p)
    return found


@dataclass(frozen=True)
class Manifest:
    code_root: str
    files: dict[str, str]  # absolute path -> SHA-256 hex
    digest: str  # SHA-256 of the signed document (what is measured into the TPM)


def build_document(code_root: Path | None = None, *, compile_bytecode: bool = True
                   ) -> dict[str, Any]:
    root = (code_root or package_root()).resolve()
    if compile_bytecode:
        # The bytecode workers load must be listed too: compile it now, so every source
        # has its .pyc and nothing is written later (workers run with -B).
        compileall.compile_dir(str(root), quiet=1)
    files = {str(p): sha256_file(p) for p in code_files(root)}
    for p in interpreter_files():
        files[str(p)] = sha256_file(p)
    return {"schema": SCHEMA, "code_root": str(root),
            "created": datetime.now(UTC).isoformat(timespec="seconds"), "files": files}


def build_manifest(out: Path, key: Ed25519PrivateKey, code_root: Path | None = None) -> Path:
    write_signed(out, build_document(code_root), key)
    return out


def load_manifest(path: Path, release_key: Ed25519PublicKey) -> Manifest:
    doc = read_signed(path, release_key, "manifest")
    try:
        if doc["schema"] != SCHEMA:
            raise IntegrityError(f"manifest {path}: schema {doc['schema']!r} is not {SCHEMA}")
        files, root = doc["files"], doc["code_root"]
        if not (isinstance(files, dict) and isinstance(root, str) and len(files) <= MAX_FILES
                and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())):
            raise IntegrityError(f"manifest {path}: malformed files table")
    except KeyError as exc:
        raise IntegrityError(f"manifest {path}: missing field {exc}") from None
    return Manifest(root, dict(files), document_digest(doc))


def verify_files(manifest: Manifest) -> None:
    """Every listed file hashes as listed; no unlisted file under the code root. Raises
    ManifestError naming the first file that differs."""
    for name, want in sorted(manifest.files.items()):
        p = Path(name)
        try:
            if p.is_symlink():
                raise ManifestError(f"code file {name} became a symbolic link", name)
            got = sha256_file(p)
        except FileNotFoundError:
            raise ManifestError(f"code file {name} is missing", name) from None
        except OSError as exc:
            raise ManifestError(f"code file {name} cannot be read: {exc.strerror}",
                                name) from None
        if got != want:
            raise ManifestError(f"code file {name} was modified: SHA-256 {got}, the signed "
                                f"manifest says {want}", name)
    for p in code_files(Path(manifest.code_root)):
        if str(p) not in manifest.files:
            raise ManifestError(f"file {p} is in the code tree but not in the signed "
                                "manifest", str(p))


def verify_manifest(path: Path, release_key: Ed25519PublicKey,
                    expected_root: Path | None = None) -> Manifest:
    """Signature, code root, every file. Returns the verified manifest."""
    manifest = load_manifest(path, release_key)
    root = (expected_root or package_root()).resolve()
    if Path(manifest.code_root) != root:
        raise ManifestError(f"the manifest covers {manifest.code_root}, but the code that "
                            f"runs is {root}", manifest.code_root)
    verify_files(manifest)
    return manifest
