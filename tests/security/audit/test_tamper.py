"""Tampering with a copy of a log: every kind is detected and the first bad entry is named."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isovisor.security.audit import Anchor, AuditSigningKey, Status, verify_log
from isovisor.security.audit.entry import SIGNATURE_CONTEXT, canonical, sha256_hex
from isovisor.security.audit.segments import list_segments
from tests.security.audit.helpers import Copy, line_of_offset, lines_of, write_log


def join(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def test_the_untouched_log_verifies(copy: Copy, small_log: bytes) -> None:
    report = copy.verify(small_log)
    assert report.status is Status.VERIFIED, report.lines()
    assert report.bad is None
    assert report.chain.entries == len(lines_of(small_log))


def test_flipping_any_byte_is_detected_at_its_entry(copy: Copy, tiny_log: bytes) -> None:
    """Every byte position of a log holding each entry type: the entry holding the flipped
    byte is the one named (larger logs: the hypothesis test below)."""
    for offset in range(len(tiny_log)):
        data = bytearray(tiny_log)
        data[offset] ^= 0x01
        report = copy.verify(bytes(data))
        assert report.status is Status.TAMPERED, (offset, report.lines())
        assert report.bad is not None
        assert report.bad.location.line == line_of_offset(tiny_log, offset), \
            (offset, report.lines())


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_byte_value_anywhere_is_detected(copy: Copy, small_log: bytes,
                                              data: st.DataObject) -> None:
    offset = data.draw(st.integers(0, len(small_log) - 1), label="offset")
    value = data.draw(st.integers(0, 255).filter(lambda v: v != small_log[offset]),
                      label="value")
    mutated = bytearray(small_log)
    mutated[offset] = value
    report = copy.verify(bytes(mutated))
    if offset == len(small_log) - 1 and report.status is Status.UNPROVEN:
        # The final newline replaced: what remains can be a torn write; never "verified".
        assert report.chain.partial is not None
        return
    assert report.status is Status.TAMPERED, (offset, value, report.lines())
    assert report.bad is not None
    assert report.bad.location.line == line_of_offset(small_log, offset)


def test_dropping_any_entry_is_detected_where_it_was(copy: Copy, small_log: bytes) -> None:
    lines = lines_of(small_log)
    for i in range(len(lines)):
        report = copy.verify(join(lines[:i] + lines[i + 1:]))
        if i == len(lines) - 1:
            # The closing checkpoint removed: the records before it are no longer signed.
            assert report.status is Status.UNPROVEN, report.lines()
            assert any("not signed" in u for u in report.unproven)
            continue
        assert report.status is Status.TAMPERED, (i, report.lines())
        assert report.bad is not None and report.bad.location.line == i + 1


def test_reordering_any_two_entries_is_detected(copy: Copy, small_log: bytes) -> None:
    lines = lines_of(small_log)
    for i in range(len(lines)):
        for j in range(i + 1, len(lines)):
            swapped = list(lines)
            swapped[i], swapped[j] = swapped[j], swapped[i]
            report = copy.verify(join(swapped))
            assert report.status is Status.TAMPERED, (i, j, report.lines())
            assert report.bad is not None and report.bad.location.line == i + 1, \
                (i, j, report.lines())


def forged_after(lines: list[bytes], i: int) -> bytes:
    """A well-formed record that claims to follow line i: right seq, right prev hash."""
    before = json.loads(lines[i])
    return canonical({"v": 1, "type": "record", "seq": before["seq"] + 1, "ts": before["ts"],
                      "prev": sha256_hex(lines[i]), "kind": "api.request",
                      "data": {"principal": "mallory", "outcome": "allowed"}})


def test_inserting_a_forged_record_is_detected_at_the_forgery(copy: Copy,
                                                               small_log: bytes) -> None:
    lines = lines_of(small_log)
    for i in range(len(lines) - 1):
        report = copy.verify(join([*lines[:i + 1], forged_after(lines, i), *lines[i + 1:]]))
        assert report.status is Status.TAMPERED, (i, report.lines())
        assert report.bad is not None and report.bad.location.line == i + 2, \
            (i, report.lines())
    # After the closing checkpoint, a forgery is just an unsigned tail, and said to be.
    report = copy.verify(join([*lines, forged_after(lines, len(lines) - 1)]))
    assert report.status is Status.UNPROVEN
    assert any("not signed" in u for u in report.unproven)


def test_rewriting_the_chain_after_a_forgery_fails_at_the_next_checkpoint(
        copy: Copy, small_log: bytes) -> None:
    """The intruder renumbers and rehashes everything after the forgery: only the
    signature can catch that, and it does."""
    lines = lines_of(small_log)
    i = 2  # after the genesis checkpoint and the audit.opened record
    out = [*lines[:i + 1], forged_after(lines, i)]
    checkpoint_line = None
    for line in lines[i + 1:]:
        obj = json.loads(line)
        obj["seq"] += 1
        obj["prev"] = sha256_hex(out[-1])
        out.append(canonical(obj))
        if obj["type"] == "checkpoint" and checkpoint_line is None:
            checkpoint_line = len(out)
    report = copy.verify(join(out))
    assert report.status is Status.TAMPERED
    assert report.bad is not None and report.bad.location.line == checkpoint_line
    assert "signature does not verify" in report.bad.message


def test_a_checkpoint_signed_with_another_key_is_detected(copy: Copy, small_log: bytes) -> None:
    lines = lines_of(small_log)
    other = AuditSigningKey.generate()
    obj = json.loads(lines[-1])
    del obj["sig"]
    obj["sig"] = base64.b64encode(other.sign(SIGNATURE_CONTEXT + canonical(obj))).decode()
    report = copy.verify(join([*lines[:-1], canonical(obj)]))
    assert report.status is Status.TAMPERED
    assert report.bad is not None and report.bad.location.line == len(lines)


def test_truncating_at_any_offset_is_never_verified_silently(copy: Copy,
                                                             small_log: bytes) -> None:
    lines = lines_of(small_log)
    head = json.loads(lines[-1])["seq"]
    anchor = [Anchor(head, sha256_hex(lines[-1]))]
    boundaries = {len(join(lines[:k])): k for k in range(len(lines) + 1)}
    # Every line boundary and the bytes either side of it, and every 5th byte between.
    cuts = sorted({c for b in boundaries for c in (b - 1, b, b + 1) if 0 <= c < len(small_log)}
                  | set(range(0, len(small_log), 5)))
    for cut in cuts:
        report = copy.verify(small_log[:cut])
        k = boundaries.get(cut)
        if k is not None and k > 0 and json.loads(lines[k - 1])["type"] == "checkpoint":
            # Cut just after an earlier checkpoint: the log alone cannot tell. It says so,
            # and an anchor from elsewhere (syslog, an earlier verify) catches it.
            assert report.status is Status.VERIFIED
            assert any("not 'close'" in n for n in report.notes), report.lines()
            assert any("were removed" in u for u in report.unproven)
            assert copy.verify(small_log[:cut], anchors=anchor).status is Status.TAMPERED
            continue
        assert report.status is Status.UNPROVEN, (cut, report.lines())
        assert report.unproven, cut


def test_a_cut_line_followed_by_more_is_tampering(copy: Copy, small_log: bytes) -> None:
    lines = lines_of(small_log)
    data = join(lines[:3]) + lines[3][:20] + join(lines[4:])
    report = copy.verify(data)
    assert report.status is Status.TAMPERED
    assert report.bad is not None and report.bad.location.line == 4


def test_wrong_key_says_so(copy: Copy, small_log: bytes) -> None:
    copy.put(small_log)
    report = verify_log(copy.dir, AuditSigningKey.generate().public_key)
    assert report.status is Status.TAMPERED
    assert report.bad is not None and "wrong key" in report.bad.message


@pytest.fixture(scope="module")
def segmented(tmp_path_factory: pytest.TempPathFactory, key: AuditSigningKey) -> Path:
    return write_log(tmp_path_factory.mktemp("seg") / "log", key, 30, checkpoint_records=4,
                     segment_bytes=4096)


def _clone(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "log"
    shutil.copytree(src, dst)
    return dst


def test_segmented_log_verifies(segmented: Path, key: AuditSigningKey) -> None:
    assert len(list_segments(segmented)[0]) >= 3
    assert verify_log(segmented, key.public_key).status is Status.VERIFIED


@pytest.mark.parametrize("which", ["first", "middle"])
def test_deleting_a_segment_is_detected(segmented: Path, key: AuditSigningKey, tmp_path: Path,
                                        which: str) -> None:
    log = _clone(segmented, tmp_path)
    segments = list_segments(log)[0]
    victim = segments[0] if which == "first" else segments[1]
    victim.path.unlink()
    report = verify_log(log, key.public_key)
    assert report.status is Status.TAMPERED
    assert report.bad is not None
    assert report.bad.location.segment == segments[1 if which == "first" else 2].name
    assert report.bad.location.line == 1


def test_deleting_the_last_segment_needs_an_anchor(segmented: Path, key: AuditSigningKey,
                                                   tmp_path: Path) -> None:
    log = _clone(segmented, tmp_path)
    full = verify_log(log, key.public_key)
    assert full.chain.last is not None
    anchor = Anchor(full.chain.last.entry.seq, full.chain.last.entry.hash)
    list_segments(log)[0][-1].path.unlink()
    report = verify_log(log, key.public_key)
    assert report.status is not Status.TAMPERED  # undetectable from the log alone...
    assert any("removed" in u for u in report.unproven)  # ...and said plainly
    anchored = verify_log(log, key.public_key, anchors=[anchor])
    assert anchored.status is Status.TAMPERED
    assert anchored.bad is not None and "removed" in anchored.bad.message


def test_renaming_segments_is_detected(segmented: Path, key: AuditSigningKey,
                                       tmp_path: Path) -> None:
    log = _clone(segmented, tmp_path)
    segments = list_segments(log)[0]
    a, b = segments[1].path, segments[2].path
    tmp = log / "swap"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    report = verify_log(log, key.public_key)
    assert report.status is Status.TAMPERED
    assert report.bad is not None and report.bad.location.segment == a.name
