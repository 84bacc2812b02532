"""With CurveZMQ a job belongs to the certificate that sent it, not only to the client id
its sender claims: every artist holds the studio's HMAC key, so a claimed id alone
would let any of them see, cancel or fetch another's jobs."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq.auth
from server_helpers import small_request, wait_for

from animatediff_blender.backend.engine.fake import FakeEngine
from animatediff_blender.backend.server.server import Server
from animatediff_blender.protocol import auth, messages
from animatediff_blender.protocol.client import BackendClient, ClientError

pytestmark = pytest.mark.timeout(60)

ClientFactory = Callable[..., BackendClient]
SHARED_ID = "ws-12"  # what a client with another certificate claims


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, Path]:
    """The server's key pair and two artists', both allowed (as `keys --curve` lays them out)."""
    server_public, server_secret = auth.create_curve_certificates(tmp_path / "server", "server")
    allowed = tmp_path / "allowed_clients"
    allowed.mkdir()
    paths = {"server_public": server_public, "server_secret": server_secret, "allowed": allowed}
    for artist in ("anna", "bob"):
        public, secret = auth.create_curve_certificates(tmp_path / artist, artist)
        (allowed / f"{artist}.key").write_bytes(public.read_bytes())
        paths[artist] = secret
    return paths


def start(make_server: Callable[..., Server], certs: dict[str, Path], data_dir: Path, **kw: object) -> Server:
    return make_server(curve_secret=certs["server_secret"], curve_allowed_dir=certs["allowed"],
                       data_dir=data_dir, **kw)  # fmt: skip


def artist(make_client: ClientFactory, server: Server, certs: dict[str, Path], who: str, **kw: object) -> BackendClient:
    return make_client(server, server_public_key_file=certs["server_public"], client_secret_key_file=certs[who], **kw)


def test_another_certificate_cannot_reach_a_job_by_claiming_its_client_id(
    make_server: Callable[..., Server], make_client: ClientFactory, certificates: dict[str, Path], tmp_path: Path
) -> None:
    server = start(make_server, certificates, tmp_path / "data", engine=FakeEngine(step_delay_s=0.05))
    anna = artist(make_client, server, certificates, "anna", client_id=SHARED_ID, client_name="blender anna@ws-12")
    bob = artist(make_client, server, certificates, "bob", client_id=SHARED_ID, client_name="blender anna@ws-12")
    running = anna.submit(small_request(steps=60), client_tag="shot 10", submit_id="a" * 32)
    wait_for(anna, running.job_id, (messages.Progress,))
    waiting = anna.submit(small_request(prompt="second"))

    # Bob claims anna's client id (and her name): he sees neither job as his...
    for job_id in (running.job_id, waiting.job_id):
        for ask in (bob.status, bob.cancel, bob.fetch):
            with pytest.raises(ClientError) as info:
                ask(job_id)
            assert info.value.code == "not_found"
        assert bob.watch([job_id])[0].error_code == "not_found"
    # ...nor gets her job back by sending her submit id: he gets a job of his own.
    his = bob.submit(small_request(prompt="bob's"), submit_id="a" * 32)
    assert his.job_id not in (running.job_id, waiting.job_id)

    # The listing names each job by its certificate, which no client can claim.
    seen_by_bob = bob.list_jobs()
    assert [(j.client, j.mine, j.job_id) for j in seen_by_bob.jobs] == [
        ("anna: blender anna@ws-12", False, ""),
        ("anna: blender anna@ws-12", False, ""),
        ("bob: blender anna@ws-12", True, his.job_id),
    ]
    assert seen_by_bob.clients == 2
    # Anna still owns hers: status, and a cancel that takes.
    assert anna.status(waiting.job_id).state == "queued"
    assert anna.cancel(waiting.job_id).state == "cancelled"
    assert [j.job_id for j in anna.list_jobs().jobs if j.mine] == [running.job_id]


def test_ownership_by_certificate_survives_a_restart(
    make_server: Callable[..., Server], make_client: ClientFactory, certificates: dict[str, Path], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    server = start(make_server, certificates, data)
    anna = artist(make_client, server, certificates, "anna", client_id=SHARED_ID)
    done = anna.run_job(small_request())
    anna.close()
    server.stop()

    again = start(make_server, certificates, data)
    anna = artist(make_client, again, certificates, "anna", client_id=SHARED_ID)
    bob = artist(make_client, again, certificates, "bob", client_id=SHARED_ID)
    assert anna.fetch(done.job_id).frames == done.frames and len(done.frames) == 4
    with pytest.raises(ClientError) as info:
        bob.fetch(done.job_id)
    assert info.value.code == "not_found"


def test_certificate_names_come_from_the_allowed_folder(tmp_path: Path, certificates: dict[str, Path]) -> None:
    allowed = certificates["allowed"]
    (allowed / "old-anna.key").write_bytes((allowed / "anna.key").read_bytes())  # one key, two files
    (allowed / "broken.key").write_text("not a certificate")

    def fingerprint(name: str) -> str:
        public, _ = zmq.auth.load_certificate(str(allowed / f"{name}.key"))
        return auth.key_fingerprint(public.decode("ascii"))

    # One key in two files takes the first name in sorted order (anna < old-anna);
    # a file that is no certificate is left out, and named.
    clients = auth.AllowedClients(allowed)
    assert clients.names == {fingerprint("anna"): "anna", fingerprint("bob"): "bob"}
    assert clients.unreadable == ["broken.key"]
    assert fingerprint("anna") != fingerprint("bob") and len(fingerprint("anna")) == 24
    assert not clients.reload()  # nothing changed: not read again
    (allowed / "bob.key").unlink()
    assert clients.reload() and list(clients.names.values()) == ["anna"]


def test_a_file_that_is_no_certificate_does_not_lock_everyone_out(
    make_server: Callable[..., Server], make_client: ClientFactory, certificates: dict[str, Path],
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """pyzmq's own folder loading gave up on the whole folder at one bad file (a half-copied
    key, a note left there): every client was refused, and each saw only a timeout."""
    (certificates["allowed"] / "carl.key").write_text("half a cert")
    server = start(make_server, certificates, tmp_path / "data")
    anna = artist(make_client, server, certificates, "anna", client_id="anna-ws")
    assert anna.ping().queued == 0
    assert "not client certificates, left out: carl.key" in caplog.text
    for good in ("anna.key", "bob.key"):
        (certificates["allowed"] / good).unlink()
    with pytest.raises(auth.AuthError, match=r"no client public keys .*\(not certificates: carl.key\)"):
        auth.check_server_curve(certificates["server_secret"], certificates["allowed"])


def eventually(check: Callable[[], bool], timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_certificates_added_or_removed_take_effect_without_a_restart(
    make_server: Callable[..., Server], make_client: ClientFactory, certificates: dict[str, Path], tmp_path: Path
) -> None:
    """A studio gives a new artist a certificate, or takes one away, while the backend runs
    a job: no restart (which would interrupt it)."""
    allowed = certificates["allowed"]
    bob_public = (allowed / "bob.key").read_bytes()
    (allowed / "bob.key").unlink()
    server = start(make_server, certificates, tmp_path / "data", curve_rescan_s=0.2,
                   engine=FakeEngine(step_delay_s=0.05))  # fmt: skip
    anna = artist(make_client, server, certificates, "anna", client_id="anna-ws")
    running = anna.submit(small_request(steps=100))

    def bob_answered() -> bool:  # a fresh connection each time: the handshake is what is refused
        bob = artist(make_client, server, certificates, "bob", client_id="bob-ws", timeout_s=0.5)
        try:
            bob.ping()
            return True
        except ClientError as exc:
            assert exc.code == "timeout"
            return False
        finally:
            bob.close()

    assert not bob_answered()
    (allowed / "bob.key").write_bytes(bob_public)
    assert eventually(bob_answered)
    bob = artist(make_client, server, certificates, "bob", client_id="bob-ws", client_name="blender bob@ws-3")
    bob.submit(small_request(prompt="bob's"))
    assert [j.client for j in bob.list_jobs().jobs] == ["anna", "bob: blender bob@ws-3"]

    # Taken away: anna's open connection is refused from then on, message by message.
    (allowed / "anna.key").unlink()

    def anna_refused() -> bool:
        try:
            anna.ping()
            return False
        except ClientError as exc:
            assert exc.code == "unauthorized" and "no longer allowed" in exc.message
            return True

    assert eventually(anna_refused)
    with pytest.raises(ClientError, match="no longer allowed"):
        anna.cancel(running.job_id)
    assert server.running is not None and server.running.job_id == running.job_id  # never interrupted
    assert bob.ping().running_job == running.job_id


def test_an_admin_certificate_sees_and_cancels_every_job_and_the_artist_is_told_who(
    make_server: Callable[..., Server], make_client: ClientFactory, certificates: dict[str, Path], tmp_path: Path
) -> None:
    """The pipeline TD clears a runaway job without restarting the backend (which would
    interrupt everyone's): `serve --admin-client td`."""
    public, secret = auth.create_curve_certificates(tmp_path / "td", "td")
    (certificates["allowed"] / "td.key").write_bytes(public.read_bytes())
    certificates["td"] = secret
    server = start(make_server, certificates, tmp_path / "data", admin_clients=("td",),
                   engine=FakeEngine(step_delay_s=0.05))  # fmt: skip
    anna = artist(make_client, server, certificates, "anna", client_id="anna-ws", client_name="blender anna@ws-12")
    bob = artist(make_client, server, certificates, "bob", client_id="bob-ws")
    td = artist(make_client, server, certificates, "td", client_id="td-ws")
    assert td.connect().admin and not anna.connect().admin and not bob.connect().admin
    runaway = anna.submit(small_request(steps=100), client_tag="shot 10")
    wait_for(anna, runaway.job_id, (messages.Progress,))
    waiting = anna.submit(small_request(prompt="second"), client_tag="shot 20")

    listing = td.list_jobs()
    assert [(j.client, j.mine, j.job_id, j.client_tag) for j in listing.jobs] == [
        ("anna: blender anna@ws-12", False, runaway.job_id, "shot 10"),
        ("anna: blender anna@ws-12", False, waiting.job_id, "shot 20"),
    ]
    with pytest.raises(ClientError) as info:  # an artist who is no admin cannot
        bob.cancel(waiting.job_id)
    assert info.value.code == "not_found"

    assert td.cancel(waiting.job_id).state == "cancelled"
    assert wait_for(anna, waiting.job_id, (messages.Cancelled,)).content.by == "td"
    assert td.cancel(runaway.job_id).state == "running"  # it stops at its next step
    assert wait_for(anna, runaway.job_id, (messages.Cancelled,)).content.by == "td"
    for job_id in (waiting.job_id, runaway.job_id):
        status = anna.status(job_id)
        assert (status.state, status.error) == ("cancelled", "cancelled by td (admin)")
    assert td.list_jobs().jobs == []

    # Cancelling is all: an admin does not get another artist's frames.
    done = anna.run_job(small_request(steps=2))
    with pytest.raises(ClientError) as info:
        td.fetch(done.job_id)
    assert info.value.code == "not_found"
    # An artist's own cancel still says nothing of an admin.
    own = anna.submit(small_request(steps=100))
    anna.cancel(own.job_id)
    assert wait_for(anna, own.job_id, (messages.Cancelled,)).content.by == ""


def test_admin_certificates_need_curve(make_server: Callable[..., Server]) -> None:
    from animatediff_blender.backend.server.config import ConfigError

    with pytest.raises(ConfigError, match="--admin-client names a CurveZMQ client certificate"):
        make_server(admin_clients=("td",))
