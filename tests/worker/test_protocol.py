"""Control messages: pure encode/decode and fd passing over a real socket pair."""

from __future__ import annotations

import os

import pytest

from isovisor.worker import protocol
from isovisor.worker.config import WorkerConfig
from isovisor.worker.errors import ProtocolError


def test_round_trip_with_fds() -> None:
    a, b = protocol.socketpair()
    r, w = os.pipe()
    try:
        protocol.send(a, "launch", {"x": 1}, [r, w])
        msg = protocol.recv(b)
        assert msg is not None and msg.op == "launch" and msg.get_int("x") == 1
        assert len(msg.fds) == 2
        os.write(msg.fds[1], b"hi")
        assert os.read(r, 2) == b"hi"
        assert all(not os.get_inheritable(fd) for fd in msg.fds)
        for fd in msg.fds:
            os.close(fd)
        a.close()
        assert protocol.recv(b) is None  # EOF
    finally:
        os.close(r)
        os.close(w)
        b.close()


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b'{"op": 3}', b"\xff\xfe",
                                  b'{"no_op": 1}'])
def test_malformed_messages_are_rejected(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode(data)


def test_size_limits() -> None:
    with pytest.raises(ProtocolError):
        protocol.encode("x", {"pad": "a" * protocol.MAX_MESSAGE_BYTES})
    with pytest.raises(ProtocolError):
        protocol.decode(b" " * (protocol.MAX_MESSAGE_BYTES + 1))
    a, b = protocol.socketpair()
    with a, b, pytest.raises(ProtocolError):
        protocol.send(a, "x", {}, [0] * (protocol.MAX_FDS + 1))


def test_typed_getters() -> None:
    msg = protocol.decode(b'{"op":"a","n":"1","s":2,"b":true}')
    with pytest.raises(ProtocolError):
        msg.get_int("n")
    with pytest.raises(ProtocolError):
        msg.get_str("s")
    with pytest.raises(ProtocolError):
        msg.get_int("b")


def _cfg(**kw: object) -> dict[str, object]:
    base = WorkerConfig(vm_id="v", uid=1000, gid=1000, memory=1 << 25, vcpus=1,
                        fd_index={"control": 0, "kvm": 1, "kernel": 2}).to_json()
    base.update(kw)
    return base


def test_worker_config_is_checked() -> None:
    assert WorkerConfig.from_json(_cfg()).uid == 1000
    for bad in (_cfg(uid=0), _cfg(gid=0), _cfg(memory=-1), _cfg(vcpus="1"),
                _cfg(fd_index={"control": 0, "kvm": 1}), _cfg(fd_index={"evil": 0}),
                _cfg(unknown=1), "not a dict"):
        with pytest.raises(ProtocolError):
            WorkerConfig.from_json(bad)
