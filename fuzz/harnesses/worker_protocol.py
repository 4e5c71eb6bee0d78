"""The worker control protocol: every message either side can receive (decode), the
worker config in a launch request (device descriptions included), a vsock broker request,
the test-hook action names. A compromised worker is the attacker here: the host side must
reject, never crash."""

from __future__ import annotations

from fuzz.data import Data
from isovisor.worker import protocol, test_hook
from isovisor.worker.config import WorkerConfig
from isovisor.worker.errors import WorkerError
from isovisor.worker.vsock_broker import MAX_PORT, parse_request

COVERS = ("worker:control-protocol", "worker:test-hook")


def one_input(data: bytes) -> None:
    d = Data(data)
    mode = d.u8() % 4
    raw = d.rest()
    if mode == 0:
        action = raw.decode("utf-8", "replace")
        if test_hook.valid(action):
            name, _, arg = action.partition(":")
            assert name in ("probe", *test_hook.FORBIDDEN_ACTIONS)
            assert not arg or arg.isdigit()
        return
    try:
        msg = protocol.decode(raw)
    except WorkerError:
        return
    assert isinstance(msg.op, str) and len(raw) <= protocol.MAX_MESSAGE_BYTES
    if mode == 3:
        try:
            seq, port = parse_request(msg)
        except WorkerError:
            return
        assert seq >= 0 and 0 <= port <= MAX_PORT
        return
    if mode == 2:
        try:
            WorkerConfig.from_json(msg.body)
        except WorkerError:
            return
        except (TypeError, ValueError) as exc:
            raise AssertionError(f"worker config raised {type(exc).__name__}: {exc}") from exc
