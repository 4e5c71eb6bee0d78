"""Random sequences of guest packets and host socket actions against the muxer: nothing but
HostilePacket (a credit overrun) ever escapes, and every bound holds after every step."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isovisor.devices.virtio.vsock.connection import CONN_BUF_SIZE, State
from isovisor.devices.virtio.vsock.muxer import MAX_ORPHAN_RSTS
from isovisor.devices.virtio.vsock.packet import MAX_PAYLOAD, HostilePacket, Op
from tests.devices.virtio.test_vsock_connection import Env
from tests.devices.virtio.vsock_helpers import hdr

MAX_CONNS = 3
PORTS = (5000, 5001)  # 5001 has no host service

guest_packet = st.tuples(
    st.just("guest"),
    st.sampled_from(list(Op)),
    st.sampled_from(PORTS),  # dst_port
    st.integers(1, 4),  # src_port
    st.integers(0, 3),  # shutdown flags
    st.sampled_from([0, 1, 100, 4096, MAX_PAYLOAD]),  # payload length for RW
    st.sampled_from([0, 1, 4096, 1 << 20, 0xFFFF_FFFF]),  # buf_alloc
    st.sampled_from([0, 1, 4096, 0xFFFF_FFFF]),  # fwd_cnt
)
host_action = st.tuples(
    st.just("host"),
    st.sampled_from(["send", "shut_wr", "shut_rd", "close", "read"]),
    st.integers(0, 5),  # which accepted socket
)
drain = st.tuples(st.just("rx"), st.sampled_from([0, 1, 4096, MAX_PAYLOAD]))
step = st.one_of(guest_packet, host_action, drain)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, max_size=40))
def test_random_sequences_keep_every_bound(steps: list[tuple[object, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = Env(Path(tmp), max_connections=MAX_CONNS)
        try:
            env.server(5000)
            env.servers[5000].setblocking(False)
            hosts: list[socket.socket] = []
            for s in steps:
                if s[0] == "guest":
                    if env.mux.tx_blocked:
                        continue  # the device takes no tx packet until rx drains
                    op, dst, src, flags, length, alloc, fwd = (s[1], *map(_int, s[2:]))
                    assert isinstance(op, Op)
                    n = length if op is Op.RW else 0
                    f = flags if op is Op.SHUTDOWN else 0
                    raw = hdr(op, dst_port=dst, src_port=src, length=n, flags=f,
                              buf_alloc=alloc, fwd_cnt=fwd)
                    try:
                        env.tx(raw, bytes(n))
                    except HostilePacket as exc:
                        assert "overruns the credit" in str(exc)
                        return  # the device would be in NEEDS_RESET now
                    try:
                        while True:
                            c, _ = env.servers[5000].accept()
                            c.setblocking(False)
                            env.accepted.append(c)
                            hosts.append(c)
                    except BlockingIOError:
                        pass
                elif s[0] == "host" and hosts:
                    _host_action(hosts[_int(s[2]) % len(hosts)], str(s[1]))
                    env.mux.on_backend()
                elif s[0] == "rx":
                    cap = s[1]
                    assert isinstance(cap, int)
                    env.rx(capacity=cap, limit=5)
                _check_bounds(env)
        finally:
            env.close()


def _int(v: object) -> int:
    assert isinstance(v, int)
    return v


def _host_action(sock: socket.socket, action: str) -> None:
    try:
        if action == "send":
            sock.send(bytes(10000))
        elif action == "shut_wr":
            sock.shutdown(socket.SHUT_WR)
        elif action == "shut_rd":
            sock.shutdown(socket.SHUT_RD)
        elif action == "close":
            sock.close()
        else:
            sock.recv(1 << 20)
    except OSError:
        pass


def _check_bounds(env: Env) -> None:
    mux = env.mux
    assert len(mux.conns) <= MAX_CONNS
    assert len(mux.orphans) <= MAX_ORPHAN_RSTS
    for key, c in mux.conns.items():
        assert key == c.key
        assert c.buffered() <= CONN_BUF_SIZE
        assert len(c.outbuf) <= CONN_BUF_SIZE + c.prefix
        assert (c.sock is None) == (c.state is State.CLOSED)
        assert not c.finished
    for key in mux.rx_ready:
        assert key in mux.conns
