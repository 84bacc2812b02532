"""Every refusal gets a clear error, and the server stays healthy (answers a ping) after it."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
import zmq
from server_helpers import RawPeer, small_request

from animatediff_blender.backend.engine.fake import FakeEngine
from animatediff_blender.backend.engine.interface import EngineError
from animatediff_blender.backend.server import server as server_module
from animatediff_blender.backend.server.server import Server
from animatediff_blender.protocol import messages
from animatediff_blender.protocol.client import BackendClient, ClientError
from animatediff_blender.protocol.messages import Limits, MotionLora
from animatediff_blender.protocol.wire import DELIMITER, Signer

pytestmark = pytest.mark.timeout(60)

TIGHT = Limits(
    max_width=256,
    max_height=256,
    max_frames=16,
    max_pixel_frames=128 * 128 * 16,
    max_steps=10,
    min_guidance=0.0,
    max_guidance=12.0,
    max_prompt_chars=100,
    max_motion_loras=2,
    min_lora_weight=-1.0,
    max_lora_weight=1.5,
    max_queue=3,
    max_jobs_per_client=2,
)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def tight(make_server: Callable[..., Server], engine: FakeEngine) -> Server:
    return make_server(engine=engine, limits=TIGHT)


@pytest.fixture
def peer(tight: Server) -> Iterator[RawPeer]:
    with RawPeer(tight.endpoint) as p:
        yield p


def healthy(server: Server) -> None:
    with RawPeer(server.endpoint, client_id="health-check") as p:
        assert p.ping().nonce == "check"


# --------------------------------------------------------------------------- wire-level


def test_bad_signature(tight: Server, peer: RawPeer) -> None:
    frames = peer.signed(messages.Ping())
    frames[1] = Signer(secrets.token_bytes(32)).sign(frames[2:])
    peer.send(frames)
    err = peer.recv_error()
    assert err.code == "bad_signature"
    assert "key" in err.message
    healthy(tight)


def test_tampered_buffer_breaks_the_signature(tight: Server, peer: RawPeer) -> None:
    frames = peer.signed(messages.Ping(), buffers=[b"payload"])
    frames[-1] = b"payloaD"
    peer.send(frames)
    assert peer.recv_error().code == "bad_signature"
    healthy(tight)


def test_replayed_message(tight: Server, peer: RawPeer) -> None:
    frames = peer.signed(messages.Ping(nonce="once"))
    peer.send(frames)
    assert isinstance(peer.recv().content, messages.Pong)
    peer.send(frames)
    err = peer.recv_error()
    assert err.code == "replay"
    healthy(tight)


def test_stale_message_is_a_replay(tight: Server, peer: RawPeer) -> None:
    import time

    frames = peer.sign_raw(peer.header_bytes("ping", date=time.time() - 3600), b"{}", b"{}")
    peer.send(frames)
    assert peer.recv_error().code == "replay"
    healthy(tight)


@pytest.mark.parametrize("keep", [1, 2, 3, 4])
def test_truncated_message(tight: Server, peer: RawPeer, keep: int) -> None:
    frames = peer.signed(messages.Ping())
    peer.send(frames[:keep])
    err = peer.recv_error()
    assert err.code in ("bad_message", "bad_signature")
    healthy(tight)


def test_too_many_frames(tight: Server, peer: RawPeer) -> None:
    peer.send(peer.signed(messages.Ping(), buffers=[b"x"] * 50))
    err = peer.recv_error()
    assert err.code == "too_large"
    healthy(tight)


def test_oversize_total(tight: Server, peer: RawPeer) -> None:
    # Each frame is under the socket's MAXMSGSIZE, together they exceed the request cap.
    big = b"\0" * (5 * 1024 * 1024)
    peer.send(peer.signed(messages.Ping(), buffers=[big, big]))
    err = peer.recv_error(timeout_s=10)
    assert err.code == "too_large"
    healthy(tight)


def test_oversize_frame_drops_only_that_connection(tight: Server, peer: RawPeer) -> None:
    # libzmq's MAXMSGSIZE disconnects a peer sending a larger frame; nothing reaches Python.
    peer.send([DELIMITER, b"\0" * (9 * 1024 * 1024)])
    with pytest.raises(TimeoutError):
        peer.recv(timeout_s=1)
    healthy(tight)


@pytest.mark.parametrize(
    "frames",
    [
        [b"\xff\x00garbage"],
        [b"", b"", b""],
        [secrets.token_bytes(64) for _ in range(6)],
        [DELIMITER, b"not-hex", b"{}", b"{}", b"{}"],
        [b"prefix", DELIMITER, b"sig", b"{}", b"{}", b"{}"],
    ],
    ids=["one-frame", "empty-frames", "random", "bad-sig-format", "extra-routing"],
)
def test_garbage_bytes(tight: Server, peer: RawPeer, frames: list[bytes]) -> None:
    peer.send(frames)
    err = peer.recv_error()
    assert err.code in ("bad_message", "bad_signature")
    healthy(tight)


def test_invalid_json_content(tight: Server, peer: RawPeer) -> None:
    peer.send(peer.sign_raw(peer.header_bytes("ping"), b"{}", b"{not json"))
    err = peer.recv_error()
    assert err.code == "bad_message"
    assert "JSON" in err.message
    healthy(tight)


def test_invalid_json_header(tight: Server, peer: RawPeer) -> None:
    peer.send(peer.sign_raw(b'{"msg_id": ', b"{}", b"{}"))
    assert peer.recv_error().code == "bad_message"
    healthy(tight)


def test_unknown_type(tight: Server, peer: RawPeer) -> None:
    peer.send(peer.sign_raw(peer.header_bytes("format_disk"), b"{}", b"{}"))
    err = peer.recv_error()
    assert err.code == "unknown_type"
    healthy(tight)


def test_server_message_type_from_a_client(tight: Server, peer: RawPeer) -> None:
    reply = peer.request(messages.Cancelled(job_id="0" * 32))
    assert isinstance(reply.content, messages.Error)
    assert reply.content.code == "bad_message"
    healthy(tight)


def test_wrong_major_version(tight: Server, peer: RawPeer) -> None:
    peer.send(peer.sign_raw(peer.header_bytes("ping", version="2.0"), b"{}", b"{}"))
    err = peer.recv_error()
    assert err.code == "version"
    # A newer minor version is fine.
    peer.send(
        peer.sign_raw(peer.header_bytes("ping", version="1.99"), b"{}", b'{"nonce": "m", "new_field": 1}')
    )
    assert isinstance(peer.recv().content, messages.Pong)
    healthy(tight)


@pytest.mark.parametrize("client_id", ["", "artist-a\n"])
def test_missing_client_id(tight: Server, peer: RawPeer, client_id: str) -> None:
    # ("artist-a\n" passed a pattern ending in `$` and became another job owner.)
    peer.session.client_id = client_id
    reply = peer.request(messages.Submit(request=small_request()))
    assert isinstance(reply.content, messages.Error)
    assert reply.content.code == "bad_message"
    assert reply.content.fields[0].field == "$header.client_id"
    healthy(tight)


# --------------------------------------------------------------------------- request limits


def _submit_error(client: BackendClient, **fields: Any) -> ClientError:
    with pytest.raises(ClientError) as info:
        client.submit(small_request(**fields))
    return info.value


LIMIT_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("width", {"width": 512}, "$.request.width"),
    ("height", {"height": 512}, "$.request.height"),
    ("frames", {"frames": 17}, "$.request.frames"),
    ("pixel-budget", {"width": 256, "height": 256, "frames": 16}, "$.request.frames"),
    ("steps", {"steps": 11}, "$.request.steps"),
    ("guidance-high", {"guidance": 12.5}, "$.request.guidance"),
    ("prompt", {"prompt": "x" * 101}, "$.request.prompt"),
    ("negative", {"negative_prompt": "x" * 101}, "$.request.negative_prompt"),
    ("travel-text", {"prompt_travel": {0: "a", 2: "y" * 101}}, "$.request.prompt_travel.2"),
    ("travel-frame", {"prompt_travel": {0: "a", 9: "b"}}, "$.request.prompt_travel.9"),
    ("travel-count", {"frames": 2, "prompt_travel": {0: "a", 1: "b", 5: "c"}}, "$.request.prompt_travel"),
    (
        "lora-count",
        {"motion_loras": [MotionLora(id="lora:fake_ZoomIn")] * 3},
        "$.request.motion_loras",
    ),
    (
        "lora-weight",
        {"motion_loras": [MotionLora(id="lora:fake_ZoomIn", weight=1.8)]},
        "$.request.motion_loras[0].weight",
    ),
    ("context-stride", {"context_length": 8, "context_stride": 9}, "$.request.context_stride"),
]


@pytest.mark.parametrize(("fields", "path"), [c[1:] for c in LIMIT_CASES], ids=[c[0] for c in LIMIT_CASES])
def test_limits(
    tight: Server,
    engine: FakeEngine,
    make_client: Callable[..., BackendClient],
    fields: dict[str, Any],
    path: str,
) -> None:
    client = make_client(tight)
    err = _submit_error(client, **fields)
    assert err.code == "limit"
    assert path in [f.field for f in err.fields], err.fields
    assert all(f.message for f in err.fields)
    assert engine.generate_calls == 0
    assert client.ping()


def test_preset_defaults_obey_the_limits(tight: Server, make_client: Callable[..., BackendClient]) -> None:
    # "quality" defaults to 25 steps; this server allows 10.
    err = _submit_error(make_client(tight), steps=None)
    assert err.code == "limit"
    assert [f.field for f in err.fields] == ["$.request.steps"]


def test_all_bad_fields_reported_at_once(tight: Server, make_client: Callable[..., BackendClient]) -> None:
    err = _submit_error(make_client(tight), width=512, steps=50, prompt="x" * 200)
    assert {f.field for f in err.fields} >= {"$.request.width", "$.request.steps", "$.request.prompt"}


def test_schema_errors_name_the_field(tight: Server, peer: RawPeer) -> None:
    content = msgspec.json.encode({"request": {"prompt": "a", "width": 63, "frames": 0}})
    peer.send(peer.sign_raw(peer.header_bytes("submit"), b"{}", content))
    err = peer.recv_error()
    assert err.code == "bad_message"
    assert {f.field for f in err.fields} >= {"$.request.width", "$.request.frames"}
    healthy(tight)


@pytest.mark.parametrize(
    "model_id",
    ["base:does-not-exist", "motion:fake-sd15", "lora:nope"],
)
def test_unknown_model(
    tight: Server, engine: FakeEngine, make_client: Callable[..., BackendClient], model_id: str
) -> None:
    kind = model_id.split(":")[0]
    field = {"base": "base_model", "motion": "motion_module"}.get(kind)
    fields: dict[str, Any] = {field: model_id} if field else {"motion_loras": [MotionLora(id=model_id)]}
    err = _submit_error(make_client(tight), **fields)
    assert err.code == "unknown_model"
    assert model_id in err.message
    assert engine.generate_calls == 0


def test_an_engine_refusal_names_the_field(
    make_server: Callable[..., Server], make_client: Callable[..., BackendClient]
) -> None:
    class Refusing(FakeEngine):
        def resolve(self, request: messages.GenerateRequest) -> messages.GenerateRequest:
            raise EngineError("invalid_request", "steps: the lightning preset runs 1-8 steps, got 20",
                              field="$.request.steps")

    err = _submit_error(make_client(make_server(engine=Refusing())))
    assert err.code == "invalid_request" and "1-8 steps" in err.message
    assert [(f.field, f.message) for f in err.fields] == [("$.request.steps", err.message)]


@pytest.mark.parametrize(
    "model_id",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "base:../x",
        "base:/abs/path",
        "base:..",
        "base:a/b",
        "C:\\models\\x",
        "base:.hidden",
    ],
)
def test_path_like_ids_are_refused(tight: Server, engine: FakeEngine, peer: RawPeer, model_id: str) -> None:
    content = msgspec.json.encode({"request": {"prompt": "a", "base_model": model_id}})
    peer.send(peer.sign_raw(peer.header_bytes("submit"), b"{}", content))
    err = peer.recv_error()
    assert err.code == "bad_message"
    assert [f.field for f in err.fields] == ["$.request.base_model"]
    assert engine.generate_calls == 0
    healthy(tight)


def test_listing_every_bad_field_does_not_stall_the_loop(tight: Server, peer: RawPeer) -> None:
    # Each further bad field costs one more validation of the whole request: 64 of them at
    # the end of 100,000 LoRA entries held the loop (and everyone's pings) for seconds.
    loras: list[dict[str, Any]] = [{"id": "lora:fake_ZoomIn"}] * 100_000
    loras += [{"id": "lora:fake_ZoomIn", "weight": 99}] * 64
    content = msgspec.json.encode({"request": {"prompt": "a", "motion_loras": loras}})
    peer.send(peer.sign_raw(peer.header_bytes("submit"), b"{}", content))
    with RawPeer(tight.endpoint, client_id="bystander") as other:
        assert other.ping(timeout_s=3).nonce == "check"
    err = peer.recv_error()
    assert err.code == "bad_message"
    assert err.fields[0].field == "$.request.motion_loras[100000].weight"


def test_prompt_travel_past_every_frame_is_answered(
    tight: Server, make_client: Callable[..., BackendClient]
) -> None:
    # One field error per out-of-range entry made a reply larger than any message: none was sent.
    client = make_client(tight, timeout_s=5)
    err = _submit_error(client, prompt_travel={i: "" for i in range(600_000)})
    assert err.code == "limit"
    assert "$.request.prompt_travel" in [f.field for f in err.fields]
    assert len(err.fields) < 300
    assert client.ping()


def test_a_request_over_the_servers_size_cap_is_refused_as_such(
    tight: Server, make_client: Callable[..., BackendClient]
) -> None:
    # libzmq drops a connection that sends a frame over the server's cap: the client used to
    # wait out its timeout and blame the address or the key.
    client = make_client(tight, timeout_s=3)
    err = _submit_error(client, prompt="x" * (9 * 2**20))
    assert err.code == "too_large"
    assert "8 MiB" in err.message
    assert client.ping()


def test_a_lower_message_limit_does_not_lower_the_request_cap(
    make_server: Callable[..., Server], make_client: Callable[..., BackendClient]
) -> None:
    """--max-message-mb bounds what the server sends; it also capped requests, so a valid
    2 MB submit (a long non-ASCII prompt travel) was dropped by libzmq without an answer,
    and the client blamed the key."""
    limits = Limits(max_message_bytes=2**20, max_width=256, max_height=256, max_prompt_chars=4000)
    server = make_server(limits=limits)
    client = make_client(server, timeout_s=5)
    travel = {i: "é" * 4000 for i in range(0, 256, 1)}
    accepted = client.submit(small_request(frames=256, prompt_travel=travel))
    assert accepted.job_id


def test_a_huge_client_name_is_not_logged_whole(
    tight: Server, peer: RawPeer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="animatediff_blender.server"):
        reply = peer.request(messages.Hello(client_id="raw-peer", client_name="n" * 2**20))
    assert isinstance(reply.content, messages.Welcome)
    lengths = [len(r.getMessage()) for r in caplog.records if r.getMessage().startswith("hello ")]
    assert lengths and max(lengths) < 1000


def test_full_queue_and_per_client_cap_answer_busy(
    make_server: Callable[..., Server], make_client: Callable[..., BackendClient]
) -> None:
    server = make_server(engine=FakeEngine(step_delay_s=0.2), limits=TIGHT)
    a = make_client(server, client_id="artist-a")
    a.submit(small_request(steps=10))  # runs
    a.submit(small_request())  # queued: a has 2 = max_jobs_per_client
    err = _submit_error(a)
    assert err.code == "busy"
    assert "client" in err.message
    b = make_client(server, client_id="artist-b")
    c = make_client(server, client_id="artist-c")
    b.submit(small_request())
    b.submit(small_request())  # queue: a, b, b = 3 = max_queue
    err = _submit_error(c)
    assert err.code == "busy"
    assert "queue is full" in err.message
    assert c.ping().queued == 3


def test_refusals_are_counted_and_the_loop_survives(tight: Server, peer: RawPeer) -> None:
    before = tight.refusals
    for _ in range(5):
        peer.send([b"junk"])
    for _ in range(5):
        peer.recv_error()
    assert tight.refusals == before + 5
    healthy(tight)


def test_vanished_peer_does_not_block_the_loop(
    make_server: Callable[..., Server], make_client: Callable[..., BackendClient]
) -> None:
    server = make_server(engine=FakeEngine(step_delay_s=0.02))
    gone = RawPeer(server.endpoint, client_id="gone")
    gone.send(gone.signed(messages.Submit(request=small_request(steps=10))))
    assert isinstance(gone.recv().content, messages.Accepted)
    gone.close()  # events for this job now hit an unroutable identity
    client = make_client(server, client_id="other")
    result = client.run_job(small_request(prompt="after"))
    assert len(result.frames) == 4


def test_a_fetch_larger_than_the_peers_queue_arrives_whole(
    make_server: Callable[..., Server], make_client: Callable[..., BackendClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fetch of more messages than a peer's queue holds (a clip over ~1 GiB with the shipped
    sizes; here the queue and the messages are scaled down) lost its tail, `Finished`
    included, though the client was reading: every retry failed the same way."""
    monkeypatch.setattr(server_module, "SEND_QUEUE_MESSAGES", 8)
    monkeypatch.setattr(server_module, "FRAMES_MESSAGE_BYTES", 64 * 1024)
    server = make_server()
    client = make_client(server, timeout_s=5)
    result = client.run_job(small_request(frames=48, width=128, height=128, steps=1))
    # (Frames streamed while the job ran are best effort, as progress is: on a loaded machine
    # some of them may be dropped with this tiny queue, and the client fetches what it missed.)
    dropped = server.dropped
    fetched = client.fetch(result.job_id)
    assert fetched.frames == result.frames and server.dropped == dropped


def test_a_reply_its_peer_never_reads_is_given_up(
    make_server: Callable[..., Server], make_client: Callable[..., BackendClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "SEND_QUEUE_MESSAGES", 4)
    monkeypatch.setattr(server_module, "REPLY_STALL_S", 0.5)
    server = make_server(limits=Limits(max_frames_per_message=1))
    job_id = make_client(server).run_job(small_request(frames=8, width=256, height=256)).job_id
    with RawPeer(server.endpoint, client_id="artist-a", sockopts={zmq.RCVHWM: 1, zmq.RCVBUF: 4096}) as peer:
        for _ in range(3):
            peer.send(peer.signed(messages.Fetch(job_id=job_id)))
        deadline = time.monotonic() + 10
        while (server.dropped == 0 or server._pending) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.dropped > 0 and not server._pending  # nothing held for it any more
        healthy(server)


def test_a_peer_that_stops_reading_cannot_pile_up_frames(
    make_server: Callable[..., Server], make_client: Callable[..., BackendClient]
) -> None:
    """libzmq bounds a peer's queue in messages, not bytes: a client that keeps fetching a
    clip and never reads must not make the server hold every copy.  The server drops what
    no longer fits (counted and logged once), stays healthy, and the peer, once it reads
    again, gets everything it asks for."""
    server = make_server(limits=Limits(max_frames_per_message=1))  # 8 frames -> 9 messages a fetch
    job_id = make_client(server).run_job(small_request(frames=8, width=256, height=256)).job_id
    per_fetch, fetches = 9, 60
    # The peer's own buffers hold ~nothing, so what it receives later is what the server queued.
    with RawPeer(server.endpoint, client_id="artist-a", sockopts={zmq.RCVHWM: 1, zmq.RCVBUF: 4096}) as peer:
        for _ in range(fetches):
            peer.send(peer.signed(messages.Fetch(job_id=job_id)))
        deadline = time.monotonic() + 30
        while server.dropped == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.dropped > 0, "every fetched frame was queued for a peer that does not read"
        healthy(server)
        time.sleep(0.5)  # the loop is done with the remaining fetches
        received = 0
        while peer.sock.poll(500):
            peer.session.deserialize(peer.sock.recv_multipart())
            received += 1
        # The server's queue (SEND_QUEUE_MESSAGES) plus what the two TCP buffers held (~128 KiB
        # frames: a few dozen), against 540 had it queued them all.
        assert received <= server_module.SEND_QUEUE_MESSAGES + 100 < per_fetch * fetches
        # Reading again: a fetch is answered in full.
        peer.send(peer.signed(messages.Fetch(job_id=job_id)))
        replies = [peer.recv(10).content for _ in range(per_fetch)]
        assert [type(r).__name__ for r in replies] == ["Frames"] * 8 + ["Finished"]
        assert [r.start for r in replies[:8]] == list(range(8))
