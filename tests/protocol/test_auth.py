"""Key files, certificates, default paths and the loopback rule."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import zmq.auth

from animatediff_blender.protocol import auth

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_config_dir_honours_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ANIMATEDIFF_BLENDER_CONFIG", str(tmp_path / "cfg"))
    assert auth.config_dir() == tmp_path / "cfg"
    assert auth.default_key_path() == tmp_path / "cfg" / "hmac.key"


@pytest.mark.skipif(os.name == "nt", reason="XDG layout")
def test_config_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ANIMATEDIFF_BLENDER_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert auth.config_dir() == tmp_path / "xdg" / "animatediff-blender"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert auth.config_dir() == tmp_path / "home" / ".config" / "animatediff-blender"


def test_config_dir_on_windows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ANIMATEDIFF_BLENDER_CONFIG")
    monkeypatch.setattr(auth.sys, "platform", "win32")
    monkeypatch.setenv("APPDATA", str(tmp_path / "Roaming"))
    assert auth.config_dir() == tmp_path / "Roaming" / "animatediff-blender"


@posix_only
def test_create_key_is_private_and_loads(tmp_path: Path) -> None:
    path = tmp_path / "new" / "hmac.key"
    key = auth.create_key(path)
    assert len(key) == 64 and int(key, 16) >= 0
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert auth.load_key(path) == key
    assert auth.create_key(tmp_path / "other.key") != key


def test_create_key_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "hmac.key"
    first = auth.create_key(path)
    with pytest.raises(auth.AuthError, match="--force"):
        auth.create_key(path)
    assert auth.load_key(path) == first
    assert auth.create_key(path, overwrite=True) != first


def test_default_key_location(tmp_path: Path) -> None:
    key = auth.create_key()
    assert auth.default_key_path().is_file()
    assert auth.load_key() == key


@posix_only
def test_group_readable_key_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "hmac.key"
    auth.create_key(path)
    path.chmod(0o644)
    with pytest.raises(auth.AuthError, match="chmod 600") as info:
        auth.load_key(path)
    assert "0644" in str(info.value)
    path.chmod(0o640)
    with pytest.raises(auth.AuthError):
        auth.load_key(path)
    path.chmod(0o600)
    auth.load_key(path)


def test_missing_empty_or_short_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(auth.AuthError, match="animatediff-blender keys"):
        auth.load_key(tmp_path / "missing.key")
    for content in (b"", b"  \n", b"short"):
        path = tmp_path / "k.key"
        path.write_bytes(content)
        path.chmod(0o600)
        with pytest.raises(auth.AuthError, match="animatediff-blender serve --key-file"):
            auth.load_key(path)


def test_the_advice_for_a_bad_key_file_replaces_that_file(tmp_path: Path) -> None:
    """`keys --force` alone rewrites the default key, which every client here uses: for
    another file it locked them all out and left the bad one as it was."""
    import shlex

    folder = tmp_path / "k sp"
    folder.mkdir()
    for name, advice in (("hmac.key", f"keys --force --dir {shlex.quote(str(folder))}"),
                         ("studio.key", "delete it and start `animatediff-blender serve --key-file")):
        path = folder / name
        path.write_bytes(b"short")
        path.chmod(0o600)
        with pytest.raises(auth.AuthError) as info:
            auth.load_key(path)
        assert advice in str(info.value) and "keys --force`" not in str(info.value)
    default = auth.default_key_path()
    default.parent.mkdir(parents=True, exist_ok=True)
    default.write_bytes(b"")
    default.chmod(0o600)
    with pytest.raises(auth.AuthError, match="create a new one with `animatediff-blender keys --force`$"):
        auth.load_key(default)


@posix_only
def test_a_public_certificate_given_as_the_secret_says_so_first(tmp_path: Path) -> None:
    """A public .key (mode 0644, as it should be) passed as the secret was answered with
    "chmod 600 it", and only after that with "holds no secret key"."""
    public, _secret = auth.create_curve_certificates(tmp_path, "server")
    public.chmod(0o644)
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "client.key").write_bytes(public.read_bytes())
    with pytest.raises(auth.AuthError, match="holds no secret key"):
        auth.check_server_curve(public, tmp_path / "allowed")


def test_client_id_is_stable(tmp_path: Path) -> None:
    first = auth.default_client_id(tmp_path)
    assert auth.default_client_id(tmp_path) == first
    assert auth.default_client_id(tmp_path / "elsewhere") != first


@posix_only
def test_curve_certificates(tmp_path: Path) -> None:
    public, secret = auth.create_curve_certificates(tmp_path / "curve", "server")
    assert public.name == "server.key" and secret.name == "server.key_secret"
    assert mode(secret) == 0o600
    pub, sec = zmq.auth.load_certificate(str(secret))
    assert sec is not None and len(pub) == 40
    assert zmq.auth.load_certificate(str(public)) == (pub, None)


@posix_only
def test_client_curve_refuses_public_file_or_loose_secret(tmp_path: Path) -> None:
    public, secret = auth.create_curve_certificates(tmp_path, "client")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        with pytest.raises(auth.AuthError, match="secret"):
            auth.configure_client_curve(sock, public, public)
        secret.chmod(0o644)
        with pytest.raises(auth.AuthError, match="chmod 600"):
            auth.configure_client_curve(sock, secret, public)
    finally:
        sock.close(0)
        ctx.term()


def test_server_curve_needs_allowed_clients(tmp_path: Path) -> None:
    _, secret = auth.create_curve_certificates(tmp_path, "server")
    (tmp_path / "allowed").mkdir()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        with pytest.raises(auth.AuthError, match="allowed|client public keys"):
            auth.configure_server_curve(sock, ctx, secret, tmp_path / "allowed")
    finally:
        sock.close(0)
        ctx.term()


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("tcp://127.0.0.1:5557", True),
        ("tcp://127.1.2.3:5557", True),
        ("tcp://localhost:5557", True),
        ("tcp://[::1]:5557", True),
        ("ipc:///tmp/adb.sock", True),
        ("inproc://x", True),
        ("tcp://*:5557", False),
        ("tcp://0.0.0.0:5557", False),
        ("tcp://[::]:5557", False),
        ("tcp://192.168.1.5:5557", False),
        ("tcp://eth0:5557", False),
        ("tcp://gpu-box.local:5557", False),
        ("tcp://127.0.0.1", False),
        ("127.0.0.1:5557", False),
        ("udp://127.0.0.1:5557", False),
    ],
)
def test_is_loopback(address: str, loopback: bool) -> None:
    assert auth.is_loopback(address) is loopback
