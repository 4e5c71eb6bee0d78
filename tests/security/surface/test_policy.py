"""Security properties read off the inventory itself: what the daemon exposes on the host
keeps its modes, its only listener is mutual TLS, host sockets are owner-only."""

from __future__ import annotations

from typing import Any


def _items(entries: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    return [item for i, e in entries.items() if i.startswith("host:state/")
            for item in e["items"]]


def test_private_keys_are_owner_only(entries: dict[str, dict[str, Any]]) -> None:
    items = _items(entries)
    keys = [i for i in items if i["path"].endswith(".key")]
    assert keys, "the inventory lists no key files: did the daemon's layout change?"
    modes = {i["path"]: i["mode"] for i in items}
    for key in keys:
        assert key["mode"] == "0600", key
        parent = key["path"].rsplit("/", 1)[0]
        assert modes[parent] == "0700", f"{key['path']} lives in a {modes[parent]} directory"


def test_state_files_are_not_world_writable(entries: dict[str, dict[str, Any]]) -> None:
    for e in (e for i, e in entries.items() if i.startswith("host:state/")):
        assert not int(e["state_dir_mode"], 8) & 0o022, e["state_dir_mode"]
        for item in e["items"]:
            assert not int(item["mode"], 8) & 0o002, item
            if item["type"] == "socket":
                assert int(item["mode"], 8) & 0o077 == 0, item


def test_vsock_sockets_are_owner_only(entries: dict[str, dict[str, Any]]) -> None:
    uds = entries["host:vsock-uds"]
    assert uds["listen_type"] == "socket" and uds["listen_mode"] == "0600"


def test_only_mutual_tls_listeners(entries: dict[str, dict[str, Any]]) -> None:
    listener = entries["host:api-listener"]
    assert listener["tls_minimum"] == "TLSv1_3"
    assert listener["client_certificate"] == "required"
    assert listener["plaintext_listeners"] == 0
    assert listener["default_listen"].startswith("127.0.0.1:")
    others = [i for i in entries if "listener" in i and i != "host:api-listener"]
    assert not others, f"listeners the threat model does not cover: {others}"
