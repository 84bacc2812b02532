"""`animatediff-blender serve` as a real process: SIGKILL mid-job and restart, SIGTERM,
the bind-address policy, key bootstrap and CurveZMQ."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from server_helpers import KEY, small_request

from animatediff_blender.backend.engine.fake import FakeEngine
from animatediff_blender.backend.server.config import ConfigError, ServerConfig, load_or_create_key
from animatediff_blender.backend.server.server import Server
from animatediff_blender.protocol import auth, messages
from animatediff_blender.protocol.client import BackendClient, ClientConfig, ClientError

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "hmac.key"
    path.write_bytes(KEY)
    path.chmod(0o600)
    return path


@pytest.fixture
def spawn(tmp_path: Path, key_file: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*extra: str) -> subprocess.Popen[bytes]:
        cmd = [
            sys.executable, "-m", "animatediff_blender.backend.cli", "serve", "--engine", "fake",
            "--key-file", str(key_file), "--data-dir", str(tmp_path / "data"), *extra,
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


def connect(address: str, client_id: str = "artist", wait_s: float = 20) -> BackendClient:
    """A client once the server answers (process start-up takes a moment)."""
    deadline = time.monotonic() + wait_s
    while True:
        client = BackendClient(ClientConfig(address=address, key=KEY, client_id=client_id, timeout_s=1))
        try:
            client.connect()
            client.config.timeout_s = 10
            return client
        except ClientError:
            client.close()
            if time.monotonic() > deadline:
                raise


def wait_progress(client: BackendClient, job_id: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        event = client.poll(0.1)
        if event is not None and event.job_id == job_id and isinstance(event.content, messages.Progress):
            return
    raise AssertionError("no progress")


def test_sigkill_mid_job_then_restart(tmp_path: Path, spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    address = f"ipc://{tmp_path}/adb.sock"
    proc = spawn("--bind", address, "--fake-step-delay", "0.05")
    client = connect(address)
    done = client.run_job(small_request(prompt="kept", steps=2))
    running = client.submit(small_request(prompt="killed", steps=100))
    queued = client.submit(small_request(prompt="never ran"))
    wait_progress(client, running.job_id)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    client.close()

    spawn("--bind", address)
    client = connect(address)
    try:
        fetched = client.fetch(done.job_id)
        assert fetched.frames == done.frames  # byte-identical after the crash
        assert fetched.finished.settings == done.finished.settings
        for job_id in (running.job_id, queued.job_id):
            status = client.status(job_id)
            assert (status.state, status.error_code) == ("interrupted", "interrupted")
            assert status.error
        statuses = client.watch([running.job_id, done.job_id])
        assert [s.state for s in statuses] == ["interrupted", "finished"]
        with pytest.raises(ClientError) as info:
            client.fetch(running.job_id)
        assert info.value.code == "interrupted"
        # The server works normally after recovery.
        assert len(client.run_job(small_request(prompt="after restart")).frames) == 4
        # No half-written frames were left behind.
        assert not list((tmp_path / "data" / "jobs").glob("*.partial"))
    finally:
        client.close()


def test_sigterm_shuts_down_cleanly(tmp_path: Path, spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    address = f"ipc://{tmp_path}/adb.sock"
    proc = spawn("--bind", address, "--fake-step-delay", "0.05")
    client = connect(address)
    try:
        running = client.submit(small_request(steps=100))
        wait_progress(client, running.job_id)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        output = proc.stdout.read().decode() if proc.stdout else ""
        assert f"job={running.job_id} client=artist event=interrupted" in output
        assert "event=queued" in output and "event=started" in output
    finally:
        client.close()


def test_cli_refuses_a_network_bind_without_curve(spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    proc = spawn("--bind", "tcp://0.0.0.0:0")
    assert proc.wait(30) == 2
    output = proc.stdout.read().decode() if proc.stdout else ""
    assert "refusing to listen on tcp://0.0.0.0:0" in output
    assert "--insecure" in output


def test_cli_refuses_an_admin_client_without_curve_before_making_a_key(tmp_path: Path) -> None:
    """Without CurveZMQ a client's name is what it claims: no admins.  Refused before a key
    file is created for a server that does not start."""
    from animatediff_blender.backend.cli import main

    key_file = tmp_path / "new" / "hmac.key"
    assert main(["serve", "--engine", "fake", "--key-file", str(key_file), "--admin-client", "td"]) == 2
    assert not key_file.exists()


def test_cli_refuses_a_bind_port_typo(spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    proc = spawn("--bind", "tcp://127.0.0.1:65557")  # libzmq would listen on port 21
    assert proc.wait(30) == 2
    output = proc.stdout.read().decode() if proc.stdout else ""
    assert "cannot listen on tcp://127.0.0.1:65557: the port must be a number from 1 to 65535" in output


def test_network_bind_policy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = ServerConfig(key=KEY, data_dir=tmp_path / "d", bind="tcp://0.0.0.0:*")
    with pytest.raises(ConfigError, match="refusing"):
        Server(cfg, FakeEngine())
    cfg.insecure = True
    with caplog.at_level(logging.WARNING):
        server = Server(cfg, FakeEngine())
    assert any("INSECURE" in r.getMessage() for r in caplog.records)
    port = server.start().rsplit(":", 1)[1]
    try:
        with BackendClient(ClientConfig(address=f"tcp://127.0.0.1:{port}", key=KEY, client_id="lan")) as c:
            assert c.ping()
    finally:
        server.stop()


@pytest.mark.parametrize("bind", ["tcp://127.0.0.1:65557", "tcp://127.0.0.1:5557x", "tcp://127.0.0.1", "tcp://:5557"])
def test_a_bind_address_with_a_bad_port_is_refused(tmp_path: Path, bind: str) -> None:
    """libzmq reads the port modulo 65536 (65557, a typo of 5557, listened on port 21) and
    ignores trailing junk; clients refuse the same address."""
    with pytest.raises(ConfigError, match="cannot listen on"):
        Server(ServerConfig(key=KEY, data_dir=tmp_path / "d", bind=bind), FakeEngine())
    assert not (tmp_path / "d").exists()


def test_a_message_limit_too_small_for_one_frame_is_refused(tmp_path: Path) -> None:
    """Else every frames message of a large clip is dropped and clients wait in vain."""
    from animatediff_blender.backend.server.config import largest_frame_message
    from animatediff_blender.protocol.messages import Limits

    small = Limits(max_width=1024, max_height=1024, max_message_bytes=2 * 2**20)
    cfg = ServerConfig(key=KEY, data_dir=tmp_path / "d", limits=small)
    with pytest.raises(ConfigError, match="cannot carry one 1024x1024 frame"):
        Server(cfg, FakeEngine())
    assert not (tmp_path / "d").exists()  # refused before touching the data folder
    # Enough for the largest frame (noise does not compress: ~3 MiB of RGB rows), or smaller frames.
    assert 3 * 2**20 < largest_frame_message(Limits(max_width=1024, max_height=1024)) < 4 * 2**20
    Server(ServerConfig(key=KEY, data_dir=tmp_path / "a", limits=Limits(max_message_bytes=4 * 2**20)), FakeEngine())
    ok = Limits(max_width=512, max_height=512, max_message_bytes=2 * 2**20)
    Server(ServerConfig(key=KEY, data_dir=tmp_path / "b", limits=ok), FakeEngine())


def test_key_is_created_only_for_loopback(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no key file"):
        load_or_create_key(tmp_path / "net.key", "tcp://0.0.0.0:5557")
    assert not (tmp_path / "net.key").exists()
    key = load_or_create_key(tmp_path / "local.key", "tcp://127.0.0.1:5557")
    assert (tmp_path / "local.key").stat().st_mode & 0o777 == 0o600
    assert load_or_create_key(tmp_path / "local.key", "tcp://127.0.0.1:5557") == key


def test_curve_server_admits_only_allowed_clients(tmp_path: Path) -> None:
    server_pub, server_secret = auth.create_curve_certificates(tmp_path / "server", "server")
    client_pub, client_secret = auth.create_curve_certificates(tmp_path / "client", "client")
    _, stranger_secret = auth.create_curve_certificates(tmp_path / "stranger", "stranger")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "client.key").write_bytes(client_pub.read_bytes())
    cfg = ServerConfig(
        key=KEY,
        data_dir=tmp_path / "d",
        bind="tcp://0.0.0.0:*",  # allowed without --insecure: CurveZMQ is on
        curve_secret=server_secret,
        curve_allowed_dir=allowed,
        linger_ms=0,
    )
    server = Server(cfg, FakeEngine())
    port = server.start().rsplit(":", 1)[1]
    address = f"tcp://127.0.0.1:{port}"
    try:
        ok = ClientConfig(
            address=address, key=KEY, client_id="c", server_public_key_file=server_pub,
            client_secret_key_file=client_secret,
        )  # fmt: skip
        with BackendClient(ok) as c:
            assert len(c.run_job(small_request()).frames) == 4
        for secret in (stranger_secret, None):
            bad = ClientConfig(address=address, key=KEY, client_id="c", timeout_s=1)
            if secret is not None:
                bad.server_public_key_file, bad.client_secret_key_file = server_pub, secret
            with BackendClient(bad) as c, pytest.raises(ClientError) as info:
                c.ping()
            assert info.value.code == "timeout"
    finally:
        server.stop()


def test_cli_collects_a_job_after_the_backend_stalled(
    tmp_path: Path,
    key_file: Path,
    spawn: Callable[..., subprocess.Popen[bytes]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The GPU box stops answering mid-job (SIGSTOP: no goodbye, unlike a shutdown):
    `generate` gives up once reconnecting has lasted `--give-up-after` and says how to collect the
    job; once the box is back, that command gets the frames."""
    import shlex
    import threading

    from animatediff_blender.backend.cli import main

    address = f"ipc://{tmp_path}/adb.sock"
    proc = spawn("--bind", address, "--fake-step-delay", "0.05")
    connect(address).close()  # up and answering
    threading.Timer(1.0, proc.send_signal, (signal.SIGSTOP,)).start()
    out = tmp_path / "clip"
    common = ["--address", address, "--key-file", str(key_file), "--timeout", "0.5"]
    try:
        started = time.monotonic()
        code = main(["generate", *common, "--prompt", "x", "--frames", "2", "--width", "64", "--height", "64",
                     "--steps", "50", "--out", str(out), "--give-up-after", "2"])  # fmt: skip
        waited = time.monotonic() - started
    finally:
        proc.send_signal(signal.SIGCONT)
    assert waited < 30  # the flag, not the default 120 s
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "may still" in err[-1], err
    hint = err[-1].split("to collect it: ", 1)[1]
    argv = shlex.split(hint)
    assert argv[:2] == ["animatediff-blender", "generate"] and argv[4:6] == ["--out", str(out)]
    assert main(argv[1:]) == 0, capsys.readouterr().err  # as printed: its address and key file included
    assert sorted(p.name for p in out.glob("frame_*.png")) == ["frame_0000.png", "frame_0001.png"]
