"""Round trip on a real socket: submit, progress, frames, finished."""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from server_helpers import small_request

from animatediff_blender.backend.engine.fake import FakeEngine
from animatediff_blender.backend.server import server as server_module
from animatediff_blender.backend.server.server import Server
from animatediff_blender.protocol.client import BackendClient, Event
from animatediff_blender.protocol.messages import Finished, Frames, Limits, Progress

pytestmark = pytest.mark.timeout(60)


def test_welcome_describes_the_server(server: Server, client: BackendClient) -> None:
    welcome = client.welcome
    assert welcome is not None
    assert welcome.protocol_version.startswith("1.")
    assert "preview" in welcome.capabilities
    assert welcome.limits.max_frames == server.limits.max_frames
    assert {m.id for m in welcome.models} >= {"base:fake-sd15", "motion:fake-mm-v2"}
    assert welcome.defaults["base"] == "base:fake-sd15"
    assert welcome.device


def test_submit_progress_frames_finished(server: Server, client: BackendClient) -> None:
    request = small_request(frames=5, steps=4, preview_every=2)
    events = []
    result = client.run_job(request, on_event=events.append)
    progress = [e.content for e in events if isinstance(e.content, Progress)]
    assert [p.step for p in progress] == [1, 2, 3, 4]
    assert [p.has_preview for p in progress] == [False, True, False, True]
    previews = [e.buffers for e in events if isinstance(e.content, Progress) and e.content.has_preview]
    assert all(len(b) == 1 and b[0].startswith(b"\x89PNG") for b in previews)

    frames_msgs = [e for e in events if isinstance(e.content, Frames)]
    assert sum(e.content.count for e in frames_msgs) == 5
    for e in frames_msgs:
        assert e.content.sha256 == [hashlib.sha256(b).hexdigest() for b in e.buffers]
    assert isinstance(events[-1].content, Finished)
    finished = result.finished
    assert (finished.frames, finished.width, finished.height, finished.seed) == (5, 64, 64, 1)
    assert finished.settings.base_model == "base:fake-sd15"

    # The pixels are the engine's, unchanged by PNG, in order.
    expected = FakeEngine.render(finished.settings)
    for png, want in zip(result.frames, expected, strict=True):
        got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        assert np.array_equal(got, want)

    # Persisted before "finished": the same bytes are on disk and fetchable.
    folder = server.store.job_dir(result.job_id)
    on_disk = [(folder / f"frame_{i:04d}.png").read_bytes() for i in range(5)]
    assert on_disk == result.frames
    fetched = client.fetch(result.job_id)
    assert [hashlib.sha256(f).digest() for f in fetched.frames] == [
        hashlib.sha256(f).digest() for f in result.frames
    ]
    assert client.status(result.job_id).state == "finished"


def test_ping(client: BackendClient) -> None:
    pong = client.ping()
    assert pong.server_time > 0
    assert pong.running_job == ""


@pytest.mark.parametrize(
    ("limits", "max_count"),
    [(Limits(max_frames_per_message=3), 3), (Limits(max_message_bytes=100_000, max_width=96, max_height=96), 10)],
    ids=["frame-cap", "byte-cap"],
)
def test_frames_are_split_within_the_message_caps(
    make_server: Callable[..., Server],
    make_client: Callable[..., BackendClient],
    limits: Limits,
    max_count: int,
) -> None:
    server = make_server(limits=limits)
    client = make_client(server)
    events: list[Event] = []
    result = client.run_job(small_request(frames=8, width=96, height=96), on_event=events.append)
    chunks = [e for e in events if isinstance(e.content, Frames)]
    assert len(chunks) > 1
    assert [c.content.start for c in chunks] == list(np.cumsum([0] + [c.content.count for c in chunks[:-1]]))
    for chunk in chunks:
        assert 1 <= chunk.content.count <= max_count
        assert sum(len(b) for b in chunk.buffers) <= limits.max_message_bytes
    assert len(result.frames) == 8
    assert client.fetch(result.job_id).frames == result.frames


def test_frames_messages_stay_within_the_queue_byte_bound(
    make_server: Callable[..., Server],
    make_client: Callable[..., BackendClient],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """However large --max-message-mb is, a frames message carries at most
    FRAMES_MESSAGE_BYTES (one frame at least): the send queue's bound is in messages."""
    monkeypatch.setattr(server_module, "FRAMES_MESSAGE_BYTES", 40_000)  # ~1-2 frames of 96x96 noise
    client = make_client(make_server())
    events: list[Event] = []
    result = client.run_job(small_request(frames=8, width=96, height=96), on_event=events.append)
    chunks = [e for e in events if isinstance(e.content, Frames)]
    assert len(chunks) > 1
    for chunk in chunks:
        assert chunk.content.count == 1 or sum(len(b) for b in chunk.buffers) <= 40_000
    assert len(result.frames) == 8
    assert client.fetch(result.job_id).frames == result.frames


def test_limits_without_room_for_a_frame_per_message_are_refused() -> None:
    """max_frames_per_message 0 would split a clip's frames into messages of none, for ever."""
    from animatediff_blender.backend.server.config import ConfigError, check_limits

    with pytest.raises(ConfigError, match="max-frames-per-message must be > 0"):
        check_limits(Limits(max_frames_per_message=0))


@pytest.mark.parametrize(
    ("limits", "words"),
    [
        (Limits(max_prompt_chars=8000), "--max-prompt-chars 8000 is above what the protocol carries (4000)"),
        (Limits(max_frames=10_000), "--max-frames 10000 is above what the protocol carries (4096)"),
        (Limits(max_guidance=150.0), "--max-guidance 150 is above what the protocol carries (100)"),
        (Limits(min_lora_weight=-20.0), "--min-lora-weight -20 is below what the protocol carries (-10)"),
    ],
)
def test_limits_beyond_the_schema_are_refused(limits: Limits, words: str) -> None:
    """`serve --max-prompt-chars 8000` was accepted and announced, and a 5000-character
    prompt was then refused by the request schema all the same."""
    from animatediff_blender.backend.server.config import ConfigError, check_limits

    with pytest.raises(ConfigError, match=re.escape(words)):
        check_limits(limits)
    check_limits(Limits(max_prompt_chars=4000, max_frames=4096, max_width=8192, max_height=8192,
                        max_message_bytes=256 * 2**20))  # fmt: skip


def test_a_created_key_elsewhere_is_not_said_to_reach_clients_by_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from animatediff_blender.backend.server.config import load_or_create_key

    with caplog.at_level("INFO"):
        load_or_create_key(tmp_path / "studio key.key", "tcp://127.0.0.1:5557")
    assert "give clients the same file (--key-file '" in caplog.text and "automatically" not in caplog.text


def test_a_client_takes_the_larger_messages_a_server_announces(
    make_server: Callable[..., Server], make_client: Callable[..., BackendClient]
) -> None:
    """libzmq applies MAXMSGSIZE to a connection when it is made: a client that learned the
    server's larger message size only from the welcome kept a connection that the first
    larger frame would drop.  It connects again with the announced size."""
    import zmq

    server = make_server(limits=Limits(max_message_bytes=80 * 2**20))
    client = make_client(server)
    welcome = client.connect()
    assert welcome.limits.max_message_bytes == 80 * 2**20
    assert client._socket.getsockopt(zmq.MAXMSGSIZE) == 80 * 2**20
    assert client.ping()


@pytest.mark.skipif(not hasattr(__import__("socket"), "AF_UNIX"), reason="ipc:// needs Unix sockets")
def test_a_second_backend_on_a_live_ipc_address_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """libzmq replaces an ipc:// socket file when it binds: a second `serve` on the same
    address took it over, and the first one ran on, unreachable.  A stale file (its server
    killed) is no obstacle."""
    import zmq

    from animatediff_blender.backend.server.config import ConfigError, ServerConfig, check_bind_policy

    monkeypatch.chdir(tmp_path)  # (ipc paths are short: a relative one, as the reviewer used)
    config = ServerConfig(key=b"k" * 32, data_dir=tmp_path / "data", bind="ipc://backend.sock")
    ctx = zmq.Context()
    first = ctx.socket(zmq.ROUTER)
    try:
        first.bind("ipc://backend.sock")
        with pytest.raises(ConfigError, match="another backend already listens on ipc://backend.sock"):
            check_bind_policy(config, warn=False)
    finally:
        first.close(0)
        ctx.term()
    check_bind_policy(config, warn=False)  # nobody listens now
