"""`animatediff-blender keys`: create the shared HMAC key and, with `--curve`, CurveZMQ
certificates for a backend that listens on the network."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from animatediff_blender.backend.commands import file_in_the_way, nonempty_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "keys",
        help="create the HMAC key (and CurveZMQ certificates) that authenticate clients",
        description=(
            "Create the shared HMAC key that signs every message (mode 0600) and, with --curve, "
            "CurveZMQ certificates so that the backend can listen on the network: a server "
            "keypair, a client keypair and an allowed_clients/ folder holding the client's public key. "
            "Existing files are kept unless --force is given."
        ),
    )
    p.add_argument(
        "--dir", type=nonempty_path, help="where to write (default: the config dir, $ANIMATEDIFF_BLENDER_CONFIG)"
    )
    p.add_argument(
        "--curve", action="store_true", help="also create CurveZMQ certificates (needed off loopback)"
    )
    p.add_argument(
        "--client",
        default="client",
        metavar="NAME",
        help="name of the client certificate to create, one per artist machine (default: %(default)s)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace existing keys (clients must get the new ones)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import re

    from animatediff_blender.protocol import auth

    directory: Path = args.dir if args.dir is not None else auth.config_dir()
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", args.client) or args.client.startswith("."):
        print(f"error: --client {args.client!r}: use letters, digits, '.', '_' or '-'", file=sys.stderr)
        return 2
    if args.client == "server":  # the server's own certificate: client and server would share it
        print("error: --client 'server' names the server's certificate: choose another name", file=sys.stderr)
        return 2
    blocker = file_in_the_way(directory)
    if blocker is not None:
        # Checked here: otherwise the OSError names the key's temporary file inside it.
        where = f"--dir {directory}" if args.dir is not None else f"the config dir {directory}"
        inside = "" if blocker == directory else f": {blocker}"
        print(f"error: {where}{inside} is not a directory", file=sys.stderr)
        return 2
    try:
        made = _make(directory, curve=args.curve, client=args.client, force=args.force)
    except (auth.AuthError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _explain(directory, made, curve=args.curve, client=args.client)
    return 0


def _make(directory: Path, *, curve: bool, client: str, force: bool) -> dict[str, tuple[Path, bool]]:
    """Create what is missing (everything with `force`); returns name -> (path, created)."""
    from animatediff_blender.protocol import auth

    made: dict[str, tuple[Path, bool]] = {}
    key_path = directory / auth.KEY_FILE_NAME
    if key_path.exists() and not force:
        auth.load_key(key_path)  # still refuse a key with loose permissions
        made["key"] = (key_path, False)
    else:
        auth.create_key(key_path, overwrite=True)
        made["key"] = (key_path, True)
    if not curve:
        return made

    curve_dir = directory / auth.CURVE_DIR_NAME
    allowed = curve_dir / auth.ALLOWED_CLIENTS_DIR_NAME
    for name in ("server", client):
        secret = curve_dir / f"{name}.key_secret"
        if secret.exists() and not force:
            made[name] = (secret, False)
        else:
            _, secret = auth.create_curve_certificates(curve_dir, name)
            made[name] = (secret, True)
    allowed.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(curve_dir / f"{client}.key", allowed / f"{client}.key")
    made["allowed"] = (allowed, True)
    return made


def q(path: object) -> str:
    """A path as a shell word: the commands printed here are meant to be pasted."""
    import shlex

    return shlex.quote(str(path))


def _explain(directory: Path, made: dict[str, tuple[Path, bool]], *, curve: bool, client: str) -> None:
    def line(label: str, name: str, note: str) -> str:
        path, created = made[name]
        return f"  {'created' if created else 'kept   '} {label:<22} {path}  ({note})"

    print(f"Authentication material in {directory}:")
    print(line("HMAC key", "key", "mode 0600; the backend and every client need the same file"))
    if curve:
        curve_dir = made["server"][0].parent
        print(line("server certificate", "server", "secret, stays on the backend machine"))
        print(f"  {'':7} {'server public key':<22} {curve_dir / 'server.key'}  (give to each client)")
        print(line(f"{client} certificate", client, "secret, copy to the artist's machine only"))
        print(line("allowed clients", "allowed", f"holds {client}.key; add one .key per client"))
    key_path = made["key"][0]
    print()
    if not curve:
        print("Backend on this machine, clients on this machine: nothing to copy. Start with")
        print(f"  animatediff-blender serve --key-file {q(key_path)}")
        print("Clients elsewhere need CurveZMQ: run again with --curve.")
        return
    curve_dir = made["server"][0].parent
    print("On the backend machine:")
    print(
        f"  animatediff-blender serve --bind tcp://0.0.0.0:5557 --key-file {q(key_path)} \\\n"
        f"      --curve-secret {q(curve_dir / 'server.key_secret')} "
        f"--curve-allowed-dir {q(made['allowed'][0])}"
    )
    print("Copy to the artist's machine (keep the secret files mode 0600):")
    print(f"  {key_path.name}, server.key, {client}.key_secret")
    print("then point the add-on preferences at them, or from a shell:")
    print(
        f"  animatediff-blender generate --address tcp://<backend-host>:5557 --key-file {q(key_path.name)} \\\n"
        f"      --server-key server.key --client-secret {q(client + '.key_secret')} --prompt '...' --out clip/"
    )
    print(f"More artists: animatediff-blender keys --curve --client <name> --dir {q(directory)}")
