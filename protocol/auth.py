"""Authentication material: the shared HMAC key, CurveZMQ certificates, default paths.

Two layers (docs/PROTOCOL.md, "Security model"):

* every message is signed with a shared HMAC key (`hmac.key`, 64 hex characters, mode 0600);
* over a network, CurveZMQ encrypts the connection and the server admits only clients
  whose public key is in its `allowed_clients/` folder.

The server refuses to listen on a non-loopback address without both (`is_loopback`).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import stat
import sys
import tempfile
import uuid
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .endpoints import is_loopback
from .messages import CLIENT_ID_PATTERN

__all__ = [
    "AllowedClients",
    "AuthError",
    "config_dir",
    "configure_client_curve",
    "configure_server_curve",
    "create_curve_certificates",
    "create_key",
    "default_client_id",
    "default_key_path",
    "is_loopback",
    "key_fingerprint",
    "load_key",
]

APP_NAME = "animatediff-blender"
KEY_FILE_NAME = "hmac.key"
CURVE_DIR_NAME = "curve"
ALLOWED_CLIENTS_DIR_NAME = "allowed_clients"
MIN_KEY_BYTES = 16
_CLIENT_ID = re.compile(CLIENT_ID_PATTERN)


class AuthError(Exception):
    """Key or certificate trouble, with a message that says how to fix it."""


# --------------------------------------------------------------------------- paths


def config_dir() -> Path:
    """`$ANIMATEDIFF_BLENDER_CONFIG`, else `%APPDATA%\\animatediff-blender` on Windows,
    else `$XDG_CONFIG_HOME/animatediff-blender` (`~/.config/animatediff-blender`)."""
    override = os.environ.get("ANIMATEDIFF_BLENDER_CONFIG")
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":
        appdata = os.environ.get("APPDATA")
        base = Path(appdata) if appdata else Path.home() / "AppData" / "Roaming"
        return base / APP_NAME
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".config"
    return base / APP_NAME


def default_key_path() -> Path:
    return config_dir() / KEY_FILE_NAME


def default_curve_dir() -> Path:
    return config_dir() / CURVE_DIR_NAME


def _private_dir(path: Path) -> None:
    """Create `path` (and parents) readable by the owner only, if it does not exist."""
    if not path.exists():
        path.mkdir(parents=True, mode=0o700)
        if os.name == "posix":
            path.chmod(0o700)  # mkdir's mode is masked by the umask


def _check_private(path: Path, what: str) -> None:
    """Refuse a secret file that other users can read (POSIX only)."""
    if os.name != "posix":
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise AuthError(
            f"{what} {path} is readable by other users (mode {mode:04o}); fix it with: chmod 600 '{path}'"
        )


# --------------------------------------------------------------------------- HMAC key


def create_key(path: Path | None = None, overwrite: bool = False) -> bytes:
    """Write a new random key (32 bytes as 64 hex characters) with mode 0600 and return
    it as used for signing (the ASCII hex).  Refuses to replace an existing file unless
    `overwrite`: every client holding the old key would be locked out."""
    path = Path(path) if path is not None else default_key_path()
    if path.exists() and not overwrite:
        raise AuthError(
            f"key file {path} already exists; pass --force to replace it "
            "(every client must then get the new key)"
        )
    _private_dir(path.parent)
    key = secrets.token_hex(32).encode("ascii")
    # Write to a private temp file in the same folder, then rename: never a moment
    # where the key exists with loose permissions or half-written.
    fd, tmp = tempfile.mkstemp(prefix=".hmac-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(key + b"\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return key


def load_key(path: Path | None = None) -> bytes:
    """Read a key file; refuse one that is missing, empty, too short or readable by others."""
    path = Path(path) if path is not None else default_key_path()
    if not path.is_file():
        raise AuthError(
            f"no key file at {path}; create one with `animatediff-blender keys` on the backend "
            "machine and copy it to the same place on each client (or pass --key-file)"
        )
    _check_private(path, "key file")
    key = path.read_bytes().strip()
    if not key:
        raise AuthError(f"key file {path} is empty; {_new_key_advice(path)}")
    if len(key) < MIN_KEY_BYTES:
        raise AuthError(
            f"key in {path} is too short ({len(key)} bytes, at least {MIN_KEY_BYTES}); {_new_key_advice(path)}"
        )
    return key


def _new_key_advice(path: Path) -> str:
    """How to replace the key file at `path`: `keys --force` alone writes the default one,
    which every client on this machine uses; another file is made with `--dir` (named
    hmac.key), or by the backend when it starts with `--key-file` and finds none."""
    import shlex

    if path == default_key_path():
        return "create a new one with `animatediff-blender keys --force`"
    if path.name == KEY_FILE_NAME:
        return f"create a new one with `animatediff-blender keys --force --dir {shlex.quote(str(path.parent))}`"
    return (f"delete it and start `animatediff-blender serve --key-file {shlex.quote(str(path))}`, which creates "
            "a new one there, then give clients the same file")


def default_client_id(directory: Path | None = None) -> str:
    """A stable id for this installation (job ownership and fair queueing), kept in
    `<config>/client_id`; created on first use.  Falls back to a fresh id if the
    folder cannot be written."""
    path = (Path(directory) if directory is not None else config_dir()) / "client_id"
    try:
        existing = path.read_text(encoding="ascii").strip()
        if _CLIENT_ID.match(existing):
            return existing
    except (OSError, UnicodeDecodeError):
        pass
    new = uuid.uuid4().hex
    try:
        _private_dir(path.parent)
        path.write_text(new + "\n", encoding="ascii")
    except OSError:
        pass
    return new


# --------------------------------------------------------------------------- CurveZMQ


def create_curve_certificates(directory: Path, name: str) -> tuple[Path, Path]:
    """Create `<name>.key` (public) and `<name>.key_secret` (mode 0600) in `directory`."""
    directory = Path(directory)
    _private_dir(directory)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    if os.name == "posix":
        os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def _load_keypair(secret_file: Path, what: str) -> tuple[bytes, bytes]:
    secret_file = Path(secret_file)
    if not secret_file.is_file():
        raise AuthError(
            f"no {what} secret certificate at {secret_file}; create it with `animatediff-blender keys --curve`"
        )
    try:
        public, secret = zmq.auth.load_certificate(str(secret_file))
    except (OSError, ValueError) as exc:
        raise AuthError(f"cannot read {what} certificate {secret_file}: {exc}") from None
    if not secret:  # (before the permissions: a public .key is meant to be readable)
        raise AuthError(
            f"{secret_file} holds no secret key: pass the `.key_secret` file, not the `.key` file"
        )
    _check_private(secret_file, f"{what} secret certificate")
    return public, secret


def check_server_curve(secret_file: Path, allowed_dir: Path) -> tuple[bytes, bytes]:
    """The server's CurveZMQ key pair, once `allowed_dir` is known to hold a readable client
    certificate: what `configure_server_curve` needs, checked before a server loads its engine."""
    allowed = AllowedClients(allowed_dir)
    if not allowed.names:
        unreadable = f" (not certificates: {', '.join(allowed.unreadable)})" if allowed.unreadable else ""
        raise AuthError(
            f"no client public keys in {allowed.folder}{unreadable}: copy each client's `.key` file there "
            "(created by `animatediff-blender keys --curve`)"
        )
    return _load_keypair(secret_file, "server")


def _load_public(public_file: Path, what: str) -> bytes:
    public_file = Path(public_file)
    if not public_file.is_file():
        raise AuthError(f"no {what} public certificate at {public_file}")
    try:
        public, _ = zmq.auth.load_certificate(str(public_file))
    except (OSError, ValueError) as exc:
        raise AuthError(f"cannot read {what} certificate {public_file}: {exc}") from None
    return public


class AllowedClients:
    """The client certificates a CurveZMQ server admits, read from a folder of `*.key` files:
    the credentials provider of its authenticator (pyzmq asks `callback` at each new
    connection).  A file that is no certificate is left out and named in `unreadable`; with
    pyzmq's own folder loading, one such file (a half-copied key, a stray note) refused every
    client.  `reload` reads the folder again when it changed, so certificates can be added
    and taken away while the server runs."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        # key fingerprint (`key_fingerprint`) -> the file's name without `.key`
        # ("anna.key" -> "anna"); a key in two files takes the first name in sorted order.
        self.names: dict[str, str] = {}
        self.unreadable: list[str] = []
        self._keys: frozenset[bytes] = frozenset()  # Z85, as pyzmq passes them to `callback`
        self._state: tuple[tuple[str, int, int], ...] | None = None
        self.reload()

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self._keys

    def reload(self) -> bool:
        """Read the folder again if its `*.key` files changed (names, sizes, times); True if
        they did.  A folder that cannot be read keeps what was read before (a network share's
        blip must not lock the studio out) and returns False."""
        state = self._folder_state()
        if state is None or state == self._state:
            return False
        names: dict[str, str] = {}
        keys: set[bytes] = set()
        unreadable = []
        for path in sorted(self.folder.glob("*.key")):
            try:
                public, _ = zmq.auth.load_certificate(str(path))
            except (OSError, ValueError):
                unreadable.append(path.name)
                continue
            keys.add(public)
            names.setdefault(key_fingerprint(public.decode("ascii")), path.stem)
        # Each attribute is replaced whole: the authenticator's thread and the server's loop
        # read them while this runs elsewhere.
        self._keys, self.names, self.unreadable, self._state = frozenset(keys), names, unreadable, state
        return True

    def _folder_state(self) -> tuple[tuple[str, int, int], ...] | None:
        try:
            state = []
            for path in self.folder.glob("*.key"):
                info = path.stat()
                state.append((path.name, info.st_size, info.st_mtime_ns))
        except OSError:
            return None
        return tuple(sorted(state))


def key_fingerprint(public_z85: str) -> str:
    """A short, stable name for a CurveZMQ public key given in Z85, as libzmq reports a
    message's `User-Id` (pyzmq's authenticator default): 96 bits of its SHA-256, enough
    that no certificate can be made to match another's."""
    return hashlib.sha256(public_z85.encode("ascii")).hexdigest()[:24]


def configure_server_curve(
    socket: zmq.Socket,  # type: ignore[type-arg]
    context: zmq.Context,  # type: ignore[type-arg]
    secret_file: Path,
    allowed: Path | AllowedClients,
) -> ThreadAuthenticator:
    """Make `socket` a CurveZMQ server that admits only the client public keys found in
    the allowed folder (`*.key` files; an `AllowedClients` to reload it later).  Call
    before `bind`; stop the returned authenticator when the socket closes."""
    if not isinstance(allowed, AllowedClients):
        allowed = AllowedClients(allowed)
    public, secret = check_server_curve(secret_file, allowed.folder)
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=allowed)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True
    return auth


def configure_client_curve(
    socket: zmq.Socket,  # type: ignore[type-arg]
    client_secret_file: Path,
    server_public_file: Path,
) -> None:
    """Encrypt `socket` with CurveZMQ to the server whose public key is given.  Call
    before `connect`."""
    server_public = _load_public(server_public_file, "server")
    public, secret = _load_keypair(client_secret_file, "client")
    socket.curve_serverkey = server_public
    socket.curve_publickey = public
    socket.curve_secretkey = secret
