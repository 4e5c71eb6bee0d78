"""The host master key sealed to the TPM: a `MasterKeySource` for hosts with one.

The key is 32 random bytes inside a TPM sealed-data object (keyedhash, fixedTPM,
fixedParent) created under a storage primary key that the TPM derives from its owner
seed with a fixed template, so the same TPM gives the same parent every time and the
parent never leaves it. What the state directory holds (`master.sealed`, 0600) is the
object's public area and its private area encrypted by the TPM: useless on any other
machine or TPM, and the key itself is never in a file. Loading it again asks the TPM to
unseal it.

`sealed_master_key` is what the daemon uses when its TPM is up (an `[integrity]` table):
a master key file from before is sealed into the TPM and the file shredded, so existing
disks stay readable. Clearing the TPM (a new owner seed) makes every disk unreadable: a
crypto-shred of the whole host.

Not yet bound to PCRs: a policy on the measured-launch PCRs (isovisor.security.integrity)
would make the key unavailable to a host whose measurements changed, at the price of a
re-seal on every legitimate update; docs/SECURITY.md lists it as a next step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from tpm2_pytss import ESAPI, TCTILdr, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR
from tpm2_pytss.types import (
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPM2B_SENSITIVE_DATA,
    TPMS_SENSITIVE_CREATE,
)

from isovisor.host.keys.master_key import (
    MASTER_KEY_BYTES,
    MasterKeyError,
    read_private_file,
    write_private_file,
)
from isovisor.security.tpm import TpmAddress

PARENT_TEMPLATE = "ecc256:aes128cfb"
PARENT_ATTRIBUTES = ("fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted"
                     "|decrypt|noda")
SEALED_ATTRIBUTES = "fixedtpm|fixedparent|userwithauth|noda"
MAX_BLOB_BYTES = 4096  # a TPM2B_PRIVATE and a TPM2B_PUBLIC: a few hundred bytes
SEALED_FILE = "master.sealed"
FILE_KEY = "master.key"


class TpmSealedMasterKey:
    def __init__(self, address: TpmAddress, blob_path: Path) -> None:
        self.address = address
        self.path = blob_path

    def load(self) -> bytes:
        blob = self._read_blob()
        if blob is None:
            return self._create()
        try:
            private, used = TPM2B_PRIVATE.unmarshal(blob)
            public, rest = TPM2B_PUBLIC.unmarshal(blob[used:])
        except Exception:  # tpm2-pytss raises several kinds on garbage
            raise MasterKeyError(f"sealed master key {self.path} is not a sealed TPM "
                                 "object") from None
        if used + rest != len(blob):
            raise MasterKeyError(f"sealed master key {self.path} has trailing bytes")
        with self._esapi("unseal the master key") as esys:
            parent = self._parent(esys)
            try:
                obj = esys.load(parent, private, public)
                key = bytes(esys.unseal(obj))
                esys.flush_context(obj)
            except TSS2_Exception as exc:
                raise MasterKeyError(f"sealed master key {self.path} does not unseal on "
                                     f"this TPM ({exc})") from None
            finally:
                esys.flush_context(parent)
        if len(key) != MASTER_KEY_BYTES:
            raise MasterKeyError(f"sealed master key {self.path} holds {len(key)} bytes")
        return key

    def _create(self) -> bytes:
        key = os.urandom(MASTER_KEY_BYTES)
        self.seal(key)
        return key

    def seal(self, key: bytes) -> None:
        """Seal `key` into a new blob file (refused if one exists)."""
        if len(key) != MASTER_KEY_BYTES:
            raise MasterKeyError(f"a master key is {MASTER_KEY_BYTES} bytes, not {len(key)}")
        with self._esapi("seal the master key") as esys:
            parent = self._parent(esys)
            try:
                sensitive = TPM2B_SENSITIVE_CREATE(
                    TPMS_SENSITIVE_CREATE(data=TPM2B_SENSITIVE_DATA(key)))
                template = TPM2B_PUBLIC.parse("keyedhash", objectAttributes=SEALED_ATTRIBUTES)
                private, public, *_ = esys.create(parent, sensitive, template)
            finally:
                esys.flush_context(parent)
        write_private_file(self.path, private.marshal() + public.marshal())

    def _read_blob(self) -> bytes | None:
        return read_private_file(self.path, "sealed master key", MAX_BLOB_BYTES + 1)

    @staticmethod
    def _parent(esys: ESAPI) -> ESYS_TR:
        template = TPM2B_PUBLIC.parse(PARENT_TEMPLATE, objectAttributes=PARENT_ATTRIBUTES)
        handle, *_ = esys.create_primary(TPM2B_SENSITIVE_CREATE(), template,
                                         primary_handle=ESYS_TR.OWNER)
        return handle

    @contextlib.contextmanager
    def _esapi(self, what: str) -> Iterator[ESAPI]:
        try:
            tcti = TCTILdr(self.address.tcti, self.address.conf)
        except TSS2_Exception as exc:
            raise MasterKeyError(f"cannot reach the TPM at {self.address.describe()} to "
                                 f"{what}: {exc}") from None
        try:
            with ESAPI(tcti) as esys:
                yield esys
        except TSS2_Exception as exc:
            raise MasterKeyError(f"the TPM could not {what}: {exc}") from None
        finally:
            tcti.close()


def sealed_master_key(address: TpmAddress, keys_dir: Path) -> TpmSealedMasterKey:
    """The daemon's master key source on a host with a TPM: `keys_dir/master.sealed`. A
    `master.key` file left from before (FileMasterKey) is sealed into the TPM, then
    overwritten and removed: the disks it protects stay readable, the file is gone."""
    from isovisor.host.keys.master_key import FileMasterKey

    source = TpmSealedMasterKey(address, keys_dir / SEALED_FILE)
    old = keys_dir / FILE_KEY
    if old.exists() and not source.path.exists():
        source.seal(FileMasterKey(old).load())
    if old.exists():
        with open(old, "r+b") as f:
            f.write(bytes(MASTER_KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
        old.unlink()
    return source
