"""BackendClient against a minimal scripted ROUTER peer over a real TCP socket.

The fake speaks the wire protocol with `Session` but has no queue or engine: full
server round trips are tested with the real server in tests/backend."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zmq

from animatediff_blender.protocol import messages as m
from animatediff_blender.protocol.auth import create_curve_certificates, create_key
from animatediff_blender.protocol.client import BackendClient, ClientConfig, ClientError, Event
from animatediff_blender.protocol.wire import Header, Session, WireError, split_routing

KEY = b"f" * 64
JOB = "ab" * 16


def png(i: int) -> bytes:
    return b"\x89PNG fake frame %d" % i


@dataclass
class Script:
    """How the fake backend behaves."""

    frames: int = 3
    stream_frames: bool = True  # send frames as events (else the client must fetch)
    fail: str = ""  # Failed.code to send instead of finishing
    fail_after_frames: str = ""  # Failed.code to send after streaming the frames (a decode OOM)
    corrupt: bool = False  # wrong sha256 on the streamed frames
    mute_after_accept_s: float = 0.0  # ignore everything for a while after Accepted
    finish_on_submit: bool = True
    key: bytes = KEY
    clock_offset_s: float = 0.0
    received: list[str] = field(default_factory=list)


class FakeBackend:
    def __init__(self, script: Script, context: zmq.Context, curve: tuple[Path, Path] | None = None) -> None:  # type: ignore[type-arg]
        self.script = script
        self.sock = context.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.auth = None
        if curve is not None:
            from animatediff_blender.protocol.auth import configure_server_curve

            self.auth = configure_server_curve(self.sock, context, curve[0], curve[1])
        self.sock.bind("tcp://127.0.0.1:*")
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.session = Session(script.key, role="server", clock=lambda: time.time() + script.clock_offset_s)
        self.stop = threading.Event()
        self.mute_until = 0.0
        self.state = "queued"
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        if self.auth is not None:
            self.auth.stop()

    def send(
        self,
        ids: list[bytes],
        content: m.Base,
        parent: Header | None = None,
        buffers: list[bytes] | None = None,
    ) -> None:
        self.sock.send_multipart(
            [*ids, *self.session.serialize(content, parent=parent, buffers=buffers or [])]
        )

    def frames_msgs(self, ids: list[bytes], parent: Header | None) -> None:
        n = self.script.frames
        data = [png(i) for i in range(n)]
        for start in range(0, n, 2):
            chunk = data[start : start + 2]
            digests = [hashlib.sha256(b"x" if self.script.corrupt else d).hexdigest() for d in chunk]
            self.send(
                ids,
                m.Frames(job_id=JOB, start=start, count=len(chunk), total=n, sha256=digests),
                parent,
                chunk,
            )

    def finished(self) -> m.Finished:
        return m.Finished(
            job_id=JOB, frames=self.script.frames, width=64, height=64, seed=1, elapsed_s=0.1,
            settings=m.GenerateRequest(prompt="x"),
        )  # fmt: skip

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.sock.close(0)

    def _run(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(20):
                continue
            ids, body = split_routing(self.sock.recv_multipart())
            if time.monotonic() < self.mute_until:
                continue
            try:
                msg = self.session.deserialize(body)
            except WireError as exc:
                self.send(ids, exc.to_error(), exc.header)
                continue
            self.script.received.append(msg.msg_type)
            c, h = msg.content, msg.header
            if isinstance(c, m.Hello):
                self.send(ids, m.Welcome(protocol_version="1.0", server_version="fake", capabilities=[], limits=m.Limits(), models=[]), h)  # fmt: skip
            elif isinstance(c, m.Ping):
                self.send(ids, m.Pong(nonce=c.nonce, server_time=time.time()), h)
            elif isinstance(c, m.ListModels):
                self.send(ids, m.Models(models=[m.ModelInfo(id="base:tiny", kind="base", format="diffusers", label="Tiny")]), h)  # fmt: skip
            elif isinstance(c, m.Submit):
                self.send(ids, m.Accepted(job_id=JOB, queue_position=0), h)
                self.state = "running"
                if self.script.mute_after_accept_s:
                    self.mute_until = time.monotonic() + self.script.mute_after_accept_s
                    self.state = "finished"  # finishes while the client cannot hear
                    continue
                for step in (1, 2, 3):
                    self.send(
                        ids, m.Progress(job_id=JOB, step=step, total_steps=3, elapsed_s=0.0, remaining_s=-1)
                    )
                if not self.script.finish_on_submit:
                    continue
                if self.script.fail:
                    self.state = "failed"
                    self.send(ids, m.Failed(job_id=JOB, code=self.script.fail, message="CUDA out of memory"))
                    continue
                if self.script.stream_frames:
                    self.frames_msgs(ids, None)
                if self.script.fail_after_frames:
                    self.state = "failed"
                    self.send(ids, m.Failed(job_id=JOB, code=self.script.fail_after_frames, message="decode failed"))
                    continue
                self.state = "finished"
                self.send(ids, self.finished())
            elif isinstance(c, m.Watch):
                statuses = [m.JobStatus(job_id=j, state=self.state) for j in c.job_ids]  # type: ignore[arg-type]
                self.send(ids, m.Statuses(statuses=statuses), h)
            elif isinstance(c, m.Status):
                self.send(ids, m.JobStatus(job_id=c.job_id, state=self.state), h)  # type: ignore[arg-type]
            elif isinstance(c, m.Fetch):
                self.frames_msgs(ids, h)
                self.send(ids, self.finished(), h)
            elif isinstance(c, m.Cancel):
                self.state = "cancelled"
                self.send(ids, m.CancelReply(job_id=c.job_id, state="running"), h)
                self.send(ids, m.Cancelled(job_id=c.job_id))


@pytest.fixture
def context() -> Iterator[zmq.Context]:  # type: ignore[type-arg]
    ctx = zmq.Context()
    yield ctx
    ctx.term()


def make(script: Script, context: zmq.Context, **config: object) -> tuple[FakeBackend, BackendClient]:  # type: ignore[type-arg]
    backend = FakeBackend(script, context)
    options: dict[str, object] = {"timeout_s": 2.0, "client_id": "test-client", **config}
    cfg = ClientConfig(address=backend.address, key=KEY, **options)  # type: ignore[arg-type]
    return backend, BackendClient(cfg, context)


@pytest.fixture
def fake(context: zmq.Context) -> object:  # type: ignore[type-arg]
    made: list[tuple[FakeBackend, BackendClient]] = []

    def factory(script: Script | None = None, **config: object) -> tuple[FakeBackend, BackendClient]:
        pair = make(script or Script(), context, **config)
        made.append(pair)
        return pair

    yield factory
    for backend, client in made:
        client.close()
        backend.close()


def test_handshake_and_requests(fake) -> None:  # type: ignore[no-untyped-def]
    backend, client = fake()
    welcome = client.connect()
    assert welcome.server_version == "fake"
    assert [i.id for i in client.list_models()] == ["base:tiny"]
    assert client.ping().server_time > 0
    assert backend.script.received[:3] == ["hello", "list_models", "ping"]


def test_run_job_collects_verified_frames_and_events(fake) -> None:  # type: ignore[no-untyped-def]
    _, client = fake(Script(frames=5))
    seen: list[Event] = []
    result = client.run_job(m.GenerateRequest(prompt="a cat"), on_event=seen.append)
    assert result.job_id == JOB
    assert result.frames == [png(i) for i in range(5)]
    assert result.finished.frames == 5
    types = [e.msg_type for e in seen]
    assert types[:3] == ["progress"] * 3 and types[-1] == "finished" and "frames" in types


def test_run_job_fetches_when_frames_were_not_streamed(fake) -> None:  # type: ignore[no-untyped-def]
    backend, client = fake(Script(stream_frames=False))
    result = client.run_job(m.GenerateRequest(prompt="a cat"))
    assert result.frames == [png(i) for i in range(3)]
    assert "fetch" in backend.script.received


def test_run_job_failure_raises_the_job_code(fake) -> None:  # type: ignore[no-untyped-def]
    _, client = fake(Script(fail="out_of_memory"))
    with pytest.raises(ClientError) as info:
        client.run_job(m.GenerateRequest(prompt="a cat"))
    assert info.value.code == "out_of_memory"
    assert JOB in info.value.message


def test_run_job_failure_hands_over_the_frames_received_before_it(fake) -> None:  # type: ignore[no-untyped-def]
    # The backend deletes a failed job's frames: what reached the client is the only copy.
    _, client = fake(Script(frames=3, fail_after_frames="out_of_memory"))
    with pytest.raises(ClientError) as info:
        client.run_job(m.GenerateRequest(prompt="a cat"))
    assert info.value.code == "out_of_memory"
    assert info.value.frames == {i: png(i) for i in range(3)}


def test_job_timeout_holds_while_the_backend_is_gone(fake) -> None:  # type: ignore[no-untyped-def]
    # The backend dies mid-job: run_job's timeout_s must end the wait, not reconnect_give_up_s.
    _, client = fake(Script(mute_after_accept_s=60), timeout_s=0.3, heartbeat_s=0.2, reconnect_give_up_s=30)
    t = time.monotonic()
    with pytest.raises(ClientError) as info:
        client.run_job(m.GenerateRequest(prompt="a cat"), timeout_s=1.0)
    assert time.monotonic() - t < 5
    assert info.value.code == "timeout" and JOB in info.value.message


def test_job_timeout_does_not_claim_a_cancel_the_backend_never_took(fake) -> None:  # type: ignore[no-untyped-def]
    _, client = fake(Script(mute_after_accept_s=60), timeout_s=0.3, heartbeat_s=30)
    with pytest.raises(ClientError) as info:
        client.run_job(m.GenerateRequest(prompt="a cat"), timeout_s=0.3)
    assert info.value.code == "timeout"
    assert "was cancelled" not in info.value.message and "may still run" in info.value.message
    assert info.value.job_id == JOB  # so that a caller can collect it later (wait_job)


def test_corrupt_frames_are_detected(fake) -> None:  # type: ignore[no-untyped-def]
    _, client = fake(Script(corrupt=True))
    with pytest.raises(ClientError) as info:
        client.run_job(m.GenerateRequest(prompt="a cat"))
    assert info.value.code == "corrupt"


def test_cancel_from_another_thread(fake) -> None:  # type: ignore[no-untyped-def]
    backend, client = fake(Script(finish_on_submit=False))
    stop = threading.Event()

    def on_event(event: Event) -> None:
        if event.msg_type == "progress":
            stop.set()  # as the add-on's Cancel button would, from the main thread

    with pytest.raises(ClientError) as info:
        client.run_job(m.GenerateRequest(prompt="a cat"), on_event=on_event, cancel=stop, timeout_s=10)
    assert info.value.code == "cancelled"
    assert "cancel" in backend.script.received


def test_run_job_survives_a_backend_that_stops_answering(fake) -> None:  # type: ignore[no-untyped-def]
    backend, client = fake(
        Script(mute_after_accept_s=0.8), timeout_s=0.3, heartbeat_s=0.2, reconnect_give_up_s=20
    )
    result = client.run_job(m.GenerateRequest(prompt="a cat"), timeout_s=20)
    assert result.frames == [png(i) for i in range(3)]
    # It reconnected (a second hello), re-subscribed and fetched the finished job.
    assert backend.script.received.count("hello") >= 2
    assert "watch" in backend.script.received and "fetch" in backend.script.received


def test_cancel_while_the_backend_is_gone_gives_up_promptly(fake) -> None:  # type: ignore[no-untyped-def]
    # The backend stops answering mid-job (crashed, hung, network down) and the user presses
    # Ctrl-C: run_job must not keep reconnecting for reconnect_give_up_s before it stops.
    backend, client = fake(
        Script(mute_after_accept_s=60), timeout_s=0.3, heartbeat_s=0.2, reconnect_give_up_s=30
    )
    cancel = threading.Event()
    threading.Timer(1.0, cancel.set).start()
    t = time.monotonic()
    with pytest.raises(ClientError) as info:
        client.run_job(m.GenerateRequest(prompt="a cat"), cancel=cancel)
    assert info.value.code == "cancelled"
    assert "did not answer" in info.value.message and JOB in info.value.message
    assert time.monotonic() - t < 5


def test_server_field_errors_reach_the_caller(fake) -> None:  # type: ignore[no-untyped-def]
    _, client = fake()
    client.connect()
    with pytest.raises(ClientError) as info:
        client.submit(m.GenerateRequest(prompt="a cat", width=4, steps=0))
    assert info.value.code == "bad_message"
    assert [f.field for f in info.value.fields] == ["$.request.width", "$.request.steps"]
    assert "$.request.width" in str(info.value)


def test_poll_returns_queued_events(fake) -> None:  # type: ignore[no-untyped-def]
    _, client = fake()
    client.connect()
    client.submit(m.GenerateRequest(prompt="a cat"))
    got = []
    while (event := client.poll(1.0)) is not None:
        got.append(event.msg_type)
        if event.msg_type == "finished":
            break
    assert got[0] == "progress" and got[-1] == "finished"
    assert client.poll(0.05) is None


def test_wrong_key_is_reported_as_such(fake) -> None:  # type: ignore[no-untyped-def]
    _, client = fake(Script(key=b"e" * 64))
    with pytest.raises(ClientError) as info:
        client.connect()
    assert info.value.code == "bad_signature"
    assert "hmac.key" in info.value.message


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_no_backend_times_out_with_a_clear_message(context: zmq.Context) -> None:  # type: ignore[type-arg]
    address = f"tcp://127.0.0.1:{free_port()}"
    client = BackendClient(ClientConfig(address=address, key=KEY, timeout_s=0.3, client_id="c"), context)
    start = time.monotonic()
    with pytest.raises(ClientError) as info:
        client.connect()
    assert time.monotonic() - start < 2
    assert info.value.code == "timeout"
    assert address in info.value.message and "is it running" in info.value.message
    client.close()


def test_missing_key_file_says_how_to_create_it(tmp_path: Path) -> None:
    client = BackendClient(ClientConfig(key_file=tmp_path / "nope.key", client_id="c"))
    with pytest.raises(ClientError) as info:
        client.connect()
    assert info.value.code == "auth" and "animatediff-blender keys" in info.value.message
    client.close()


@pytest.mark.parametrize(
    ("address", "words"),
    [
        ("nonsense", "tcp://HOST:PORT"),
        # libzmq takes these and then waits out the whole timeout ("no answer")
        ("tcp://127.0.0.1:99999", "from 1 to 65535"),
        ("tcp://127.0.0.1:0", "from 1 to 65535"),
        ("tcp://:5557", "tcp://HOST:PORT"),
        ("tcp://127.0.0.1", "tcp://HOST:PORT"),
    ],
)
def test_bad_address_fails_at_once(address: str, words: str, tmp_path: Path) -> None:
    key_file = tmp_path / "hmac.key"
    create_key(key_file)
    client = BackendClient(ClientConfig(address=address, key_file=key_file, client_id="c", timeout_s=5))
    start = time.monotonic()
    with pytest.raises(ClientError) as info:
        client.connect()
    assert time.monotonic() - start < 1
    assert info.value.code == "connection" and address in info.value.message and words in info.value.message
    client.close()


@pytest.mark.timeout(20)
def test_an_address_that_is_not_text_fails_and_close_does_not_hang(tmp_path: Path) -> None:
    """`address = 5557` in a script: the socket made before the check used to stay open, and
    close() then hung for ever in the context's term()."""
    key_file = tmp_path / "hmac.key"
    create_key(key_file)
    client = BackendClient(ClientConfig(address=5557, key_file=key_file, client_id="c", timeout_s=5))  # type: ignore[arg-type]
    with pytest.raises(ClientError) as info:
        client.connect()
    assert info.value.code == "connection" and "5557" in info.value.message
    start = time.monotonic()
    client.close()
    assert time.monotonic() - start < 2


@pytest.mark.parametrize(
    "address", ["tcp://gpu-box:5557", "tcp://[::1]:5557", "tcp://10.0.0.2;gpu:5557", "ipc:///tmp/adb.sock"]
)
def test_good_addresses_pass_the_check(address: str) -> None:
    from animatediff_blender.protocol.endpoints import connect_problem

    assert connect_problem(address) is None


def test_curve_round_trip_and_unknown_client_refused(tmp_path: Path, context: zmq.Context) -> None:  # type: ignore[type-arg]
    _, server_secret = create_curve_certificates(tmp_path / "certs", "server")
    server_public = server_secret.with_suffix(".key")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    client_public, client_secret = create_curve_certificates(tmp_path / "certs", "client")
    (allowed / "client.key").write_bytes(client_public.read_bytes())
    _, stranger_secret = create_curve_certificates(tmp_path / "other", "stranger")

    backend = FakeBackend(Script(), context, curve=(server_secret, allowed))
    try:
        good = BackendClient(
            ClientConfig(
                address=backend.address, key=KEY, client_id="c", timeout_s=3,
                server_public_key_file=server_public, client_secret_key_file=client_secret,
            ),
            context,
        )  # fmt: skip
        assert good.connect().server_version == "fake"
        good.close()
        stranger = BackendClient(
            ClientConfig(
                address=backend.address, key=KEY, client_id="c", timeout_s=0.5,
                server_public_key_file=server_public, client_secret_key_file=stranger_secret,
            ),
            context,
        )  # fmt: skip
        with pytest.raises(ClientError) as info:
            stranger.connect()
        assert info.value.code == "timeout" and "CurveZMQ" in info.value.message
        stranger.close()
        plain = BackendClient(
            ClientConfig(address=backend.address, key=KEY, client_id="c", timeout_s=0.5), context
        )
        with pytest.raises(ClientError):
            plain.connect()
        plain.close()
    finally:
        backend.close()


def test_clock_skew_is_reported_as_such(fake) -> None:  # type: ignore[no-untyped-def]
    _, client = fake(Script(clock_offset_s=1000.0))
    with pytest.raises(ClientError) as info:
        client.connect()
    assert info.value.code == "replay"
    assert "clock" in info.value.message and "NTP" in info.value.message


def test_closed_client_says_so(fake) -> None:  # type: ignore[no-untyped-def]
    backend = fake()[0]
    client = BackendClient(ClientConfig(address=backend.address, key=KEY, client_id="c"))
    client.connect()
    client.close()
    client.close()  # idempotent
    with pytest.raises(ClientError) as info:
        client.connect()
    assert info.value.code == "connection" and "closed" in info.value.message


def test_the_client_name_says_who_runs_it_where(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's queue listing shows it to everyone sharing the backend."""
    import getpass

    from animatediff_blender.protocol.client import client_name

    host = socket.gethostname().split(".")[0]
    monkeypatch.setattr(getpass, "getuser", lambda: "anna")
    assert client_name("blender 4.5.15") == f"blender 4.5.15 anna@{host}"

    def no_user() -> str:
        raise OSError("No username set in the environment")

    monkeypatch.setattr(getpass, "getuser", no_user)  # a container without USER or passwd entry
    assert client_name("cli") == f"cli {host}"
