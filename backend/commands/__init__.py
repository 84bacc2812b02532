"""The `animatediff-blender` subcommands, one module each; shared argument types here."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from animatediff_blender.protocol.client import ClientConfig

DEFAULT_ADDRESS = "tcp://127.0.0.1:5557"


def nonempty_path(value: str) -> Path:
    """An argparse type for a folder or file: "" (an unset shell variable, `--out "$OUT"`)
    would silently be the current folder."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return Path(value)


def file_in_the_way(path: Path) -> Path | None:
    """The nearest existing part of `path` (itself or a parent) when that is not a folder,
    else None: where creating `path` as a folder, or a file in it, must fail."""
    for part in (path, *path.parents):
        if part.exists():
            return None if part.is_dir() else part
    return None


def add_connection_args(parser: argparse.ArgumentParser) -> Any:
    """The flags that reach a backend (`generate`, `queue`); returns their group."""
    conn = parser.add_argument_group("connection")
    conn.add_argument("--address", default=DEFAULT_ADDRESS, help="backend address (default: %(default)s)")
    conn.add_argument("--key-file", type=Path, help="HMAC key file (default: <config dir>/hmac.key)")
    conn.add_argument("--server-key", type=Path, help="CurveZMQ: the server's public .key file")
    conn.add_argument("--client-secret", type=Path, help="CurveZMQ: this client's .key_secret file")
    conn.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for each answer (default: %(default)s)"
    )
    return conn


def connection_config(args: argparse.Namespace, program: str, **extra: Any) -> ClientConfig:
    """The client settings `add_connection_args` gave; the hello names `program` and who runs it."""
    from animatediff_blender.protocol.client import ClientConfig, client_name

    return ClientConfig(
        address=args.address,
        key_file=args.key_file,
        server_public_key_file=args.server_key,
        client_secret_key_file=args.client_secret,
        timeout_s=args.timeout,
        client_name=client_name(program),
        **extra,
    )
