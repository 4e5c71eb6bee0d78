"""A real swtpm (Debian's swtpm package, libtpms) in a state directory of its own.

`Swtpm(state_dir).start()` runs `swtpm socket --tpm2` with its data socket at
STATE/swtpm.sock and its control socket at STATE/swtpm.sock.ctrl (where tpm2-tss's swtpm
TCTI looks for it), TPM2_Startup(CLEAR) done by swtpm itself. The TPM's persistent state
(seeds, so the same attestation key after a restart) stays in STATE; its PCRs start at
their reset values on every start, like a host after a reboot.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from isovisor.security.tpm.errors import TpmError

SOCKET_NAME = "swtpm.sock"
START_TIMEOUT_S = 10.0  # swtpm answers within milliseconds; this is a stuck process
STOP_TIMEOUT_S = 5.0


class Swtpm:
    def __init__(self, state_dir: Path, binary: str = "swtpm") -> None:
        self.state_dir = state_dir
        self.binary = binary
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.state_dir / SOCKET_NAME

    @property
    def tcti(self) -> tuple[str, str]:
        return ("swtpm", f"path={self.socket_path}")

    def start(self) -> Swtpm:
        exe = shutil.which(self.binary)
        if exe is None:
            raise TpmError(f"swtpm is not installed ({self.binary!r} is not on PATH; "
                           "Debian package swtpm)")
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.state_dir, 0o700)
        sock, ctrl = self.socket_path, Path(f"{self.socket_path}.ctrl")
        for stale in (sock, ctrl):
            stale.unlink(missing_ok=True)
        log = self.state_dir / "swtpm.log"
        argv = [exe, "socket", "--tpm2", "--tpmstate", f"dir={self.state_dir},mode=0600",
                "--server", f"type=unixio,path={sock},mode=0600",
                "--ctrl", f"type=unixio,path={ctrl},mode=0600",
                "--flags", "startup-clear", "--log", f"file={log},level=1"]
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         close_fds=True, start_new_session=True)
        except OSError as exc:
            raise TpmError(f"cannot start swtpm: {exc}") from exc
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (sock.exists() and ctrl.exists()):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr \
                    else ""
                self.proc = None
                raise TpmError(f"swtpm exited at start: {err.strip() or 'no message'} "
                               f"(log: {log})")
            if time.monotonic() > deadline:
                self.stop()
                raise TpmError("swtpm did not create its sockets in time")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Swtpm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
