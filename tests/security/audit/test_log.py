"""The writer: durability, checkpoints, rotation, recovery, locking, permissions, failures."""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isovisor.security.audit import (
    AuditBusyError,
    AuditConfig,
    AuditConfigError,
    AuditCorruptError,
    AuditLog,
    AuditPermissionError,
    AuditRecordError,
    AuditSigningKey,
    AuditUnavailableError,
    Entry,
    EntryType,
    Status,
    verify_log,
)
from isovisor.security.audit.export import read_entries
from isovisor.security.audit.segments import list_segments


def cfg(directory: Path, **kw: object) -> AuditConfig:
    base: dict[str, object] = {"checkpoint_records": 1000, "checkpoint_seconds": 3600.0}
    base.update(kw)
    return AuditConfig(directory, **base)  # type: ignore[arg-type]


def entries(directory: Path) -> list[Entry]:
    return [e for _, e in read_entries(directory)]


def records(directory: Path, kind: str = "t.rec") -> list[Entry]:
    return [e for e in entries(directory) if e.kind == kind]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_log_layout_and_permissions(tmp_path: Path, key: AuditSigningKey) -> None:
    d = tmp_path / "audit"
    with AuditLog(cfg(d), key) as log:
        r = log.append("t.rec", {"n": 1})
        assert r.durable and r.seq == 3 and log.head == (3, r.hash)
    assert mode(d) == 0o750
    assert mode(d / "audit-000000000000.log") == 0o640
    assert mode(d / "audit.pub") == 0o644
    assert mode(d / "audit.lock") == 0o600
    kinds = [(e.type, e.kind) for e in entries(d)]
    assert kinds == [(EntryType.GENESIS, "genesis"), (EntryType.CHECKPOINT, "checkpoint"),
                     (EntryType.RECORD, "audit.opened"), (EntryType.RECORD, "t.rec"),
                     (EntryType.CHECKPOINT, "checkpoint")]
    assert entries(d)[-1].fields["reason"] == "close"
    assert verify_log(d, key.public_key).status is Status.VERIFIED


def test_checkpoint_every_n_records(tmp_path: Path, key: AuditSigningKey) -> None:
    with AuditLog(cfg(tmp_path / "a", checkpoint_records=3), key) as log:
        for i in range(7):
            log.append("t.rec", {"i": i})
        reasons = [e.fields["reason"] for e in entries(tmp_path / "a")
                   if e.type is EntryType.CHECKPOINT]
    # audit.opened counts as a record: checkpoints after 3 and 6 records.
    assert reasons == ["genesis", "count", "count"]


def test_checkpoint_after_t_seconds(tmp_path: Path, key: AuditSigningKey) -> None:
    d = tmp_path / "a"
    with AuditLog(cfg(d, checkpoint_seconds=0.2, flush_seconds=0.05), key) as log:
        log.append("t.rec", {})
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if entries(d)[-1].type is EntryType.CHECKPOINT:
                break
            time.sleep(0.05)
        last = entries(d)[-1]
        assert last.type is EntryType.CHECKPOINT and last.fields["reason"] == "time"
        # The live log now verifies completely, though it is not closed.
        report = verify_log(d, key.public_key)
        assert report.status is Status.VERIFIED
        assert any("not 'close'" in n for n in report.notes)


def test_segments_rotate_and_each_ends_signed(tmp_path: Path, key: AuditSigningKey) -> None:
    d = tmp_path / "a"
    with AuditLog(cfg(d, segment_bytes=4096), key) as log:
        for i in range(40):
            log.append("t.rec", {"i": i, "pad": "x" * 100})
    segments = list_segments(d)[0]
    assert len(segments) >= 3
    for seg in segments:
        seg_entries = [e for loc, e in read_entries(d) if loc.segment == seg.name]
        assert seg_entries[0].seq == seg.first_seq
        assert seg_entries[-1].type is EntryType.CHECKPOINT
    assert verify_log(d, key.public_key).status is Status.VERIFIED
    assert [e.fields["data"]["i"] for e in records(d)] == list(range(40))


def test_reopen_continues_the_chain(tmp_path: Path, key: AuditSigningKey) -> None:
    d = tmp_path / "a"
    for round_ in range(3):
        with AuditLog(cfg(d, segment_bytes=4096), key) as log:
            assert log.recovery.unclean is False
            for i in range(15):
                log.append("t.rec", {"round": round_, "i": i})
    assert len(records(d)) == 45
    assert len(records(d, "audit.opened")) == 3
    assert verify_log(d, key.public_key).status is Status.VERIFIED


def test_torn_tail_is_cut_and_recorded(tmp_path: Path, key: AuditSigningKey) -> None:
    d = tmp_path / "a"
    with AuditLog(cfg(d), key) as log:
        log.append("t.rec", {})
    seg = list_segments(d)[0][-1].path
    torn = b'{"data":{"i":1},"kind":"t.re'
    with open(seg, "ab") as f:
        f.write(torn)
    assert verify_log(d, key.public_key).status is Status.UNPROVEN
    with AuditLog(cfg(d), key) as log:
        assert log.recovery.discarded_bytes == len(torn)
    opened = records(d, "audit.opened")[-1].fields["data"]
    assert opened["discarded_bytes"] == len(torn)
    assert verify_log(d, key.public_key).status is Status.VERIFIED


def test_an_unclean_stop_is_recorded(tmp_path: Path, key: AuditSigningKey) -> None:
    d = tmp_path / "a"
    log = AuditLog(cfg(d), key)
    log.append("t.rec", {})
    # Simulate a crash: drop the descriptors without the closing checkpoint.
    log._stop.set()
    log._thread.join()
    os.close(log._fd)
    os.close(log._lock_fd)
    log._closed = True
    with AuditLog(cfg(d), key) as again:
        assert again.recovery.unclean is True
    assert records(d, "audit.opened")[-1].fields["data"]["unclean"] is True
    assert verify_log(d, key.public_key).status is Status.VERIFIED


def test_refuses_to_append_to_a_damaged_log(tmp_path: Path, key: AuditSigningKey) -> None:
    d = tmp_path / "a"
    with AuditLog(cfg(d), key) as log:
        log.append("t.rec", {"who": "alice"})
    seg = list_segments(d)[0][-1].path
    seg.write_bytes(seg.read_bytes().replace(b"alice", b"alicf"))
    with pytest.raises(AuditCorruptError, match="damaged at seq 3"):
        AuditLog(cfg(d), key)


def test_refuses_garbage_after_the_last_line(tmp_path: Path, key: AuditSigningKey) -> None:
    d = tmp_path / "a"
    AuditLog(cfg(d), key).close()
    seg = list_segments(d)[0][-1].path
    with open(seg, "ab") as f:
        f.write(b"\x01\x02 not a torn write")
    with pytest.raises(AuditCorruptError):
        AuditLog(cfg(d), key)


def test_refuses_another_key(tmp_path: Path, key: AuditSigningKey) -> None:
    d = tmp_path / "a"
    AuditLog(cfg(d), key).close()
    with pytest.raises(AuditCorruptError, match="belongs to key"):
        AuditLog(cfg(d), AuditSigningKey.generate())


def test_one_writer_per_directory(tmp_path: Path, key: AuditSigningKey) -> None:
    with AuditLog(cfg(tmp_path / "a"), key), pytest.raises(AuditBusyError):
        AuditLog(cfg(tmp_path / "a"), key)


def test_only_the_daemons_user_may_write(tmp_path: Path, key: AuditSigningKey) -> None:
    d = tmp_path / "a"
    AuditLog(cfg(d), key).close()
    os.chmod(d, 0o770)
    with pytest.raises(AuditPermissionError, match="group or others can write"):
        AuditLog(cfg(d), key)
    os.chmod(d, 0o750)
    seg = list_segments(d)[0][0].path
    os.chmod(seg, 0o646)
    with pytest.raises(AuditPermissionError, match="group or others can write"):
        AuditLog(cfg(d), key)
    os.chmod(seg, 0o640)
    if os.geteuid() == 0:
        os.chown(seg, 65534, -1)
        with pytest.raises(AuditPermissionError, match="owned by uid 65534"):
            AuditLog(cfg(d), key)


def test_bad_records_are_refused_and_the_log_goes_on(tmp_path: Path,
                                                      key: AuditSigningKey) -> None:
    with AuditLog(cfg(tmp_path / "a"), key) as log:
        with pytest.raises(AuditRecordError):
            log.append("Bad Kind", {})
        with pytest.raises(AuditRecordError):
            log.append("t.rec", {"x": {1, 2}})
        with pytest.raises(AuditRecordError):
            log.append("t.rec", {"x": float("nan")})
        with pytest.raises(AuditRecordError, match="exceeds"):
            log.append("t.rec", {"x": "y" * 70_000})
        log.append("t.rec", {"ok": True})
    assert verify_log(tmp_path / "a", key.public_key).status is Status.VERIFIED


def test_config_is_checked(tmp_path: Path) -> None:
    with pytest.raises(AuditConfigError):
        AuditConfig(tmp_path, checkpoint_records=0)
    with pytest.raises(AuditConfigError):
        AuditConfig(tmp_path, segment_bytes=10)


def test_fsync_failure_fails_closed(tmp_path: Path, key: AuditSigningKey,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog(cfg(tmp_path / "a"), key)
    real_fsync = os.fsync

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(AuditUnavailableError):
        log.append("t.rec", {})
    monkeypatch.setattr(os, "fsync", real_fsync)
    with pytest.raises(AuditUnavailableError, match="stopped taking records"):
        log.append("t.rec", {})
    log.close()
    with pytest.raises(AuditUnavailableError, match="closed"):
        log.append("t.rec", {})


@pytest.mark.parametrize("group_commit", [True, False])
def test_concurrent_appends_are_all_durable_and_chained(
        tmp_path: Path, key: AuditSigningKey, monkeypatch: pytest.MonkeyPatch,
        group_commit: bool) -> None:
    d = tmp_path / "a"
    log = AuditLog(cfg(d, checkpoint_records=16, segment_bytes=8192,
                       group_commit=group_commit), key)
    fsyncs = 0
    real_fsync = os.fsync

    def counting(fd: int) -> None:
        nonlocal fsyncs
        fsyncs += 1
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting)
    seqs: list[int] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        for i in range(15):
            r = log.append("t.rec", {"t": t, "i": i})
            assert r.durable
            with lock:
                seqs.append(r.seq)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    log.close()
    assert len(set(seqs)) == 120
    got = {(e.fields["data"]["t"], e.fields["data"]["i"]) for e in records(d)}
    assert got == {(t, i) for t in range(8) for i in range(15)}
    assert verify_log(d, key.public_key).status is Status.VERIFIED
    if group_commit:
        assert fsyncs < 120  # appends shared fsyncs


def test_a_rotation_during_a_leaders_fsync_does_not_close_its_fd(
        tmp_path: Path, key: AuditSigningKey, monkeypatch: pytest.MonkeyPatch) -> None:
    """The group-commit leader fsyncs the segment's own fd (no dup per fsync): a rotation
    meanwhile must leave that fd open until the fsync ends, then close it."""
    d = tmp_path / "a"
    fds_before = len(os.listdir("/proc/self/fd"))
    log = AuditLog(cfg(d, segment_bytes=4096), key)
    real_fsync = os.fsync
    in_fsync, release = threading.Event(), threading.Event()

    synced: list[str] = []

    def slow(fd: int) -> None:
        if threading.current_thread().name == "leader":
            in_fsync.set()
            assert release.wait(10)
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow)
    leader = threading.Thread(target=lambda: log.append("t.rec", {"lead": True}),
                              name="leader")
    leader.start()
    assert in_fsync.wait(10)
    while len(list_segments(d)[0]) == 1:  # rotate while the leader's fsync is running
        log.append("t.rec", {"pad": "x" * 500}, durable=False)
    release.set()
    leader.join()
    assert log.failed is None
    # Still the first segment (not a new file that got the closed fd's number).
    assert synced == [str(d / "audit-000000000000.log")]
    assert log.append("t.rec", {"after": True}).durable
    log.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before  # the old segment's fd closed
    assert verify_log(d, key.public_key).status is Status.VERIFIED


def test_non_durable_appends_are_fsynced_soon(tmp_path: Path, key: AuditSigningKey,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with AuditLog(cfg(tmp_path / "a", flush_seconds=0.02), key) as log:
        synced = threading.Event()
        real_fsync = os.fsync

        def watching(fd: int) -> None:
            real_fsync(fd)
            synced.set()

        monkeypatch.setattr(os, "fsync", watching)
        r = log.append("t.rec", {}, durable=False)
        assert not r.durable
        assert synced.wait(5)


def test_forwarder_sees_entries_only_once_durable(tmp_path: Path,
                                                  key: AuditSigningKey) -> None:
    seen: list[Entry] = []
    log = AuditLog(cfg(tmp_path / "a", checkpoint_records=2), key, forwarder=seen.append)
    log.append("t.rec", {"i": 0})
    log.append("t.rec", {"i": 1})
    # Everything written so far was durable when append returned, so it was forwarded.
    assert [e.seq for e in seen] == list(range(log.head[0] + 1))
    log.close()
    assert seen[-1].fields["reason"] == "close"
    assert [e.seq for e in seen] == list(range(len(seen)))


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=3),
    max_leaves=12)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.dictionaries(st.text(max_size=10), _json, max_size=4))
def test_whatever_the_writer_accepts_reads_back_and_verifies(
        tmp_path_factory: pytest.TempPathFactory, key: AuditSigningKey,
        data: dict[str, object]) -> None:
    d = tmp_path_factory.mktemp("any") / "a"
    with AuditLog(cfg(d), key) as log:
        log.append("t.rec", data)
    assert records(d)[0].fields["data"] == data
    assert verify_log(d, key.public_key).status is Status.VERIFIED


def test_deep_nesting_is_refused(tmp_path: Path, key: AuditSigningKey) -> None:
    deep: object = "x"
    for _ in range(40):
        deep = [deep]
    with AuditLog(cfg(tmp_path / "a"), key) as log, \
            pytest.raises(AuditRecordError, match="nested deeper"):
        log.append("t.rec", {"d": deep})
