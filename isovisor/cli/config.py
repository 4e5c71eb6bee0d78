"""Client configuration for the management commands (endpoint, CA, certificate, key,
default tenant) and their output helpers (tables, errors).

The file is TOML, by default ~/.config/isovisor/client.toml (or $ISOVISOR_CONFIG):

    endpoint = "https://localhost:8443"
    ca = "/var/lib/isovisor/ca/ca.crt"
    cert = "/home/alice/.config/isovisor/alice.crt"
    key = "/home/alice/.config/isovisor/alice.key"
    tenant = "blue"          # optional: default for --tenant

Relative paths are relative to the file. `isovisor ca issue --write-config` writes one.
"""

from __future__ import annotations

import argparse
import json
import os
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from isovisor.cli.errors import CliError

if TYPE_CHECKING:  # the API client pulls in httpx: imported only when a command runs
    from isovisor.api.client import ApiClient, ClientConfig

DEFAULT_ENDPOINT = "https://localhost:8443"


def default_config_path() -> Path:
    env = os.environ.get("ISOVISOR_CONFIG")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "isovisor" / "client.toml"


def add_client_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--config", type=Path, default=None,
                   help="client config file (default $ISOVISOR_CONFIG or "
                   "~/.config/isovisor/client.toml)")
    g.add_argument("--endpoint", default=None, help="API URL, e.g. https://localhost:8443")
    g.add_argument("--output", "-o", choices=["table", "json"], default="table",
                   help="output format (default table)")


def load_settings(args: argparse.Namespace) -> dict[str, Any]:
    path: Path = args.config or default_config_path()
    settings: dict[str, Any] = {}
    if path.is_file():
        try:
            settings = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise CliError(f"cannot read the client config {path}: {exc}") from exc
        for key in ("ca", "cert", "key"):
            if key in settings:
                settings[key] = str((path.parent / str(settings[key])).resolve())
    elif args.config is not None:
        raise CliError(f"the client config {path} does not exist")
    for key in ("endpoint", "ca", "cert", "key", "tenant"):
        env = os.environ.get(f"ISOVISOR_{key.upper()}")
        if env:
            settings[key] = env
    if getattr(args, "endpoint", None):
        settings["endpoint"] = args.endpoint
    settings.setdefault("endpoint", DEFAULT_ENDPOINT)
    settings["_path"] = str(path)
    return settings


def client_config(args: argparse.Namespace) -> ClientConfig:
    from isovisor.api.client import ClientConfig

    s = load_settings(args)
    missing = [k for k in ("ca", "cert", "key") if not s.get(k)]
    if missing:
        raise CliError(
            f"no {', '.join(missing)} configured: write {s['_path']} (see `isovisor ca issue "
            "--write-config`) or set ISOVISOR_CA, ISOVISOR_CERT, ISOVISOR_KEY")
    return ClientConfig(endpoint=s["endpoint"], ca=Path(s["ca"]), cert=Path(s["cert"]),
                        key=Path(s["key"]))


def tenant_of(args: argparse.Namespace) -> str:
    if getattr(args, "tenant", None):
        return str(args.tenant)
    tenant = load_settings(args).get("tenant")
    if not tenant:
        raise CliError("which tenant? pass --tenant or set `tenant` in the client config")
    return str(tenant)


@contextmanager
def api(args: argparse.Namespace) -> Iterator[ApiClient]:
    """An API client for a command; API and connection errors become one-line CliErrors."""
    from isovisor.api.client import ApiClient, ApiError, ApiUnreachableError

    try:
        with ApiClient(client_config(args)) as client:
            yield client
    except ApiError as exc:
        raise CliError(str(exc)) from exc
    except ApiUnreachableError as exc:
        raise CliError(str(exc)) from exc


def write_client_config(path: Path, endpoint: str, ca: Path, cert: Path, key: Path,
                        tenant: str | None = None) -> None:
    lines = [f"endpoint = {json.dumps(endpoint)}", f"ca = {json.dumps(str(ca))}",
             f"cert = {json.dumps(str(cert))}", f"key = {json.dumps(str(key))}"]
    if tenant:
        lines.append(f"tenant = {json.dumps(tenant)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# -- output -------------------------------------------------------------------------------

Column = tuple[str, Callable[[dict[str, Any]], object]]


def field(name: str) -> Callable[[dict[str, Any]], object]:
    return lambda item: item.get(name)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A plain-text table: a header, a rule, one line per row; None prints as '-'."""
    cells = [[("-" if (v := get(r)) is None else str(v)) for _, get in columns] for r in rows]
    heads = [h for h, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in cells]
    return "\n".join(lines)


def show(args: argparse.Namespace, data: Any, columns: Sequence[Column]) -> None:
    """Print a list or one object as a table (or JSON with -o json)."""
    if getattr(args, "output", "table") == "json":
        print(json.dumps(data, indent=2))
        return
    rows = data if isinstance(data, list) else [data]
    print(table(rows, columns) if rows else "(none)")


def show_fields(args: argparse.Namespace, data: dict[str, Any]) -> None:
    """One object as 'key: value' lines (or JSON)."""
    if getattr(args, "output", "table") == "json":
        print(json.dumps(data, indent=2))
        return
    width = max((len(k) for k in data), default=0)
    for k, v in data.items():
        text = json.dumps(v) if isinstance(v, dict | list) else ("-" if v is None else v)
        print(f"{k.ljust(width)}  {text}")
