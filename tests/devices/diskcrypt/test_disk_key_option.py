"""`--disk PATH,keyfile=FILE|keyfd=N`: the key is read exactly (64 bytes), from a file or
a descriptor, and every mistake is refused naming the option."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from isovisor.cli.disk_option import parse_disk_option


def test_a_key_file_gives_the_disk_its_key(tmp_path: Path) -> None:
    key = os.urandom(64)
    (tmp_path / "k").write_bytes(key)
    spec = parse_disk_option(f"{tmp_path}/d.img,readonly,keyfile={tmp_path}/k")
    assert spec.key == key and spec.readonly
    assert key.hex() not in repr(spec)


def test_keys_are_read_in_order_from_one_descriptor() -> None:
    a, b = os.urandom(64), os.urandom(64)
    r, w = os.pipe()
    try:
        os.write(w, a + b)
        os.close(w)
        assert parse_disk_option(f"/x.img,keyfd={r}").key == a
        assert parse_disk_option(f"/y.img,keyfd={r}").key == b
        with pytest.raises(argparse.ArgumentTypeError, match="expected 64 key bytes, got 0"):
            parse_disk_option(f"/z.img,keyfd={r}")
    finally:
        os.close(r)


@pytest.mark.parametrize(("content", "msg"), [(b"x" * 63, "this one 63"),
                                              (b"x" * 65, "this one more than 64"),
                                              (b"", "this one 0")])
def test_a_key_file_of_the_wrong_size_is_refused(tmp_path: Path, content: bytes,
                                                 msg: str) -> None:
    (tmp_path / "k").write_bytes(content)
    with pytest.raises(argparse.ArgumentTypeError, match=msg):
        parse_disk_option(f"/d.img,keyfile={tmp_path}/k")


def test_bad_key_options_are_refused_naming_them(tmp_path: Path) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"keyfile=.*No such file"):
        parse_disk_option(f"/d.img,keyfile={tmp_path}/missing")
    with pytest.raises(argparse.ArgumentTypeError, match="exclude each other"):
        parse_disk_option(f"/d.img,keyfile={tmp_path}/k,keyfd=3")
    with pytest.raises(argparse.ArgumentTypeError, match="keyfd"):
        parse_disk_option("/d.img,keyfd=x")
    with pytest.raises(argparse.ArgumentTypeError, match="keyfd=999"):
        parse_disk_option("/d.img,keyfd=999")  # not open
    with pytest.raises(argparse.ArgumentTypeError, match="given twice"):
        parse_disk_option(f"/d.img,keyfile={tmp_path}/a,keyfile={tmp_path}/b")
