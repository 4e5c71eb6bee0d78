"""The writer process of the crash test: threads append until the process is SIGKILLed.

Each append is acknowledged on stdout only after `append` returned (so after its fsync),
exactly as the API acknowledges a request only after its record is durable.
Usage: python -m tests.security.audit.crash_writer DIR KEY THREADS RUN
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from isovisor.security.audit import AuditConfig, AuditLog, load_signing_key


def main(argv: list[str]) -> None:
    directory, key_path, threads, run = Path(argv[0]), Path(argv[1]), int(argv[2]), argv[3]
    # Small segments and frequent checkpoints, so kills also land in rotations and signing.
    config = AuditConfig(directory, checkpoint_records=5, checkpoint_seconds=0.03,
                         segment_bytes=8192, flush_seconds=0.01)
    log = AuditLog(config, load_signing_key(key_path))
    os.write(1, b"ready\n")

    def worker(t: int) -> None:
        i = 0
        while True:
            r = log.append("crash.rec", {"run": run, "t": t, "i": i})
            os.write(1, f"ack {run} {t} {i} {r.seq}\n".encode())  # one write: atomic on a pipe
            i += 1

    for t in range(threads):
        threading.Thread(target=worker, args=(t,), daemon=True).start()
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1:])
