"""isovisord's configuration: embedded defaults, optionally overridden by a TOML file
and then by command-line options.

    state_dir = "/var/lib/isovisor"      # SQLite, images, VM run directories
    ca_dir = "/var/lib/isovisor/ca"      # the host CA (default: STATE_DIR/ca)
    listen = "127.0.0.1:8443"            # the only listener: mutual TLS 1.3
    server_names = ["localhost"]         # DNS names in the server certificate
    bootstrap_admin = "admin"            # made Host Admin at / on start (optional)
    network_namespace = "isovisor"       # prefix: network ID lives in namespace isovisor-ID
    [audit]                              # optional: see isovisor.security.audit.hooks
    checkpoint_records = 256             # (HostAuditConfig: checkpoints, syslog, ...)
"""

from __future__ import annotations

import argparse
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = Path("/var/lib/isovisor")
DEFAULT_LISTEN = "127.0.0.1:8443"
_NETNS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,54}$")  # + "-ID": at most 64


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: Path = DEFAULT_STATE_DIR
    ca_dir: Path | None = None
    listen: str = DEFAULT_LISTEN
    server_names: tuple[str, ...] = ("localhost",)
    bootstrap_admin: str | None = None
    network_namespace: str = "isovisor"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ca_path(self) -> Path:
        return self.ca_dir if self.ca_dir is not None else self.state_dir / "ca"

    @property
    def tls_dir(self) -> Path:
        return self.state_dir / "tls"

    @property
    def host_port(self) -> tuple[str, int]:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"listen {self.listen!r} is not HOST:PORT")
        return host.strip("[]") or "127.0.0.1", int(port)

    @classmethod
    def load(cls, path: Path | None, **overrides: Any) -> DaemonConfig:
        config = cls()
        if path is not None:
            try:
                data = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"cannot read {path}: {exc}") from exc
            known = {"state_dir", "ca_dir", "listen", "server_names", "bootstrap_admin",
                     "network_namespace", "audit", "integrity"}
            unknown = set(data) - known
            if unknown:
                raise ConfigError(f"{path}: unknown settings {', '.join(sorted(unknown))}")
            config = cls._apply(config, data)
        return cls._apply(config, {k: v for k, v in overrides.items() if v is not None})

    @staticmethod
    def _apply(config: DaemonConfig, data: dict[str, Any]) -> DaemonConfig:
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("state_dir", "ca_dir"):
                values[key] = Path(value)
            elif key == "server_names":
                values[key] = tuple(value)
            elif key == "network_namespace":
                if not isinstance(value, str) or not _NETNS.match(value):
                    raise ConfigError(f"network_namespace {value!r} is not a network "
                                      "namespace prefix (letters, digits, '.', '_', '-'; "
                                      "at most 55: each network's namespace is PREFIX-ID)")
                values[key] = value
            elif key == "audit":  # checked by HostAuditConfig.from_table
                values["extra"] = {**config.extra, "audit": dict(value)}
            elif key == "integrity":  # checked by host.integrity.IntegritySettings
                values["extra"] = {**config.extra, "integrity": dict(value)}
            else:
                values[key] = value
        return replace(config, **values)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="daemon config file (TOML)")
    p.add_argument("--state-dir", type=Path, help="state directory (default /var/lib/isovisor)")
    p.add_argument("--ca-dir", type=Path, help="CA directory (default STATE_DIR/ca)")
    p.add_argument("--listen", help="HOST:PORT for the mutual-TLS API (default 127.0.0.1:8443)")
    p.add_argument("--network-namespace", metavar="PREFIX",
                   help="tenant network ID gets network namespace PREFIX-ID (default "
                   "isovisor), made with the network and deleted with it")
    p.add_argument("--bootstrap-admin", metavar="NAME",
                   help="make NAME Host Admin at / (its certificate goes to STATE_DIR/admin/)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
