"""CPU work of job N (PNG encoding, storing) overlaps the device work of job N+1, and a
job is still reported finished only after its frames are on disk."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from server_helpers import small_request

from animatediff_blender.backend.engine.fake import FakeEngine
from animatediff_blender.backend.server.images import encode_png
from animatediff_blender.backend.server.server import Server
from animatediff_blender.backend.server.store import JobStore
from animatediff_blender.protocol import messages
from animatediff_blender.protocol.client import BackendClient

pytestmark = pytest.mark.timeout(60)

ENCODE_DELAY_S = 0.3  # per frame: slower than the fake engine's whole job


class RecordingEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__(step_delay_s=0.01)
        self.starts: dict[str, float] = {}

    def generate(self, request: Any, progress: Any, should_cancel: Any, on_frames: Any = None) -> Any:
        self.starts[request.prompt] = time.monotonic()
        return super().generate(request, progress, should_cancel, on_frames)


class SlowDecodeEngine(FakeEngine):
    """Hands frames over one at a time, DECODE_DELAY_S apart, and records when it returned."""

    def __init__(self) -> None:
        super().__init__()
        self.decode_chunk = 1
        self.returned_at = 0.0

    def generate(self, request: Any, progress: Any, should_cancel: Any, on_frames: Any = None) -> Any:
        def slow_sink(start: int, frames: list[np.ndarray]) -> None:
            on_frames(start, frames)
            time.sleep(DECODE_DELAY_S)  # the device decoding the next frame

        result = super().generate(request, progress, should_cancel, slow_sink if on_frames else None)
        self.returned_at = time.monotonic()
        return result


DECODE_DELAY_S = 0.2


def test_frames_are_encoded_and_stored_while_later_ones_still_decode(
    make_server: Callable[..., Server], make_client: Callable[..., BackendClient]
) -> None:
    engine = SlowDecodeEngine()
    server = make_server(engine=engine)
    encoded: list[float] = []
    server.worker.encode = lambda frame, level: (encoded.append(time.monotonic()), encode_png(frame, level))[1]
    client = make_client(server)
    client.connect()
    result = client.run_job(small_request("stream", frames=4, steps=1), timeout_s=30)
    assert len(result.frames) == 4
    # Three of the four frames were encoded before the engine had decoded the last one.
    assert sum(t < engine.returned_at for t in encoded) >= 3
    stored = sorted((server.config.data_dir / "jobs" / result.job_id).glob("*.png"))
    assert [p.read_bytes() for p in stored] == list(result.frames)
    assert not list((server.config.data_dir / "jobs").glob("*.partial"))


def test_stored_frames_reach_the_client_before_the_job_ends(
    make_server: Callable[..., Server], make_client: Callable[..., BackendClient]
) -> None:
    """Each stored batch is sent at once, not after the clip's last frame: the client has
    the first frames while the device still decodes the rest, every frame exactly once,
    and they are the bytes on disk."""
    engine = SlowDecodeEngine()
    server = make_server(engine=engine)
    client = make_client(server)
    client.connect()
    received: list[tuple[messages.Frames, float]] = []

    def on_event(event: Any) -> None:
        if isinstance(event.content, messages.Frames):
            received.append((event.content, time.monotonic()))

    result = client.run_job(small_request("stream", frames=4, steps=1), on_event=on_event, timeout_s=30)
    sent = sorted(i for frames, _ in received for i in range(frames.start, frames.start + frames.count))
    assert sent == [0, 1, 2, 3]
    assert all(frames.total == 4 and (frames.width, frames.height) == (64, 64) for frames, _ in received)
    # Frames 0-2 were handed over 0.6, 0.4 and 0.2 s before the engine returned.
    assert sum(t < engine.returned_at for _, t in received) >= 2
    stored = sorted((server.config.data_dir / "jobs" / result.job_id).glob("*.png"))
    assert [p.read_bytes() for p in stored] == list(result.frames)


def test_a_job_failing_mid_decode_leaves_no_partial_frames(
    make_server: Callable[..., Server], make_client: Callable[..., BackendClient]
) -> None:
    class FailingDecode(FakeEngine):
        def generate(self, request: Any, progress: Any, should_cancel: Any, on_frames: Any = None) -> Any:
            def sink(start: int, frames: list[np.ndarray]) -> None:
                on_frames(start, frames)
                raise RuntimeError("decoder exploded")

            return super().generate(request, progress, should_cancel, sink)

    server = make_server(engine=FailingDecode())
    client = make_client(server)
    client.connect()
    with pytest.raises(Exception, match="decoder exploded"):
        client.run_job(small_request("boom", frames=8, steps=1), timeout_s=30)
    jobs = server.config.data_dir / "jobs"
    assert not list(jobs.glob("*.partial")) and not [p for p in jobs.glob("*") if p.is_dir()]


def test_next_job_starts_while_the_previous_one_is_encoded(
    make_server: Callable[..., Server], make_client: Callable[..., BackendClient]
) -> None:
    engine = RecordingEngine()
    server = make_server(engine=engine)
    encoded: dict[int, float] = {}
    lock = threading.Lock()

    def slow_encode(frame: np.ndarray, level: int) -> bytes:
        time.sleep(ENCODE_DELAY_S)
        with lock:
            encoded[id(frame)] = time.monotonic()
        return encode_png(frame, level)

    server.worker.encode = slow_encode
    client = make_client(server)
    client.connect()
    first = client.submit(small_request("first", frames=2, steps=1)).job_id
    second = client.submit(small_request("second", frames=2, steps=1)).job_id

    finished: dict[str, float] = {}
    frames_seen: dict[str, int] = {}
    deadline = time.monotonic() + 30
    while len(finished) < 2 and time.monotonic() < deadline:
        event = client.poll(0.5)
        if event is None:
            continue
        content = event.content
        if isinstance(content, messages.Frames):
            frames_seen[content.job_id] = frames_seen.get(content.job_id, 0) + content.count
        elif isinstance(content, messages.Finished):
            finished[content.job_id] = time.monotonic()
            # Reported finished only once its frames are stored (fetchable from disk).
            stored = sorted((server.config.data_dir / "jobs" / content.job_id).glob("*.png"))
            assert len(stored) == content.frames == frames_seen[content.job_id]
        elif isinstance(content, messages.Failed):
            pytest.fail(f"job failed: {content.message}")
    assert set(finished) == {first, second}
    assert finished[first] < finished[second]  # jobs still finish in order

    # Job 1's frames took >= 2 x 0.3 s to encode on the finisher; job 2 reached the
    # engine before that encoding was over.
    last_encode_of_first = sorted(encoded.values())[1]
    assert engine.starts["second"] < last_encode_of_first
    assert engine.starts["second"] - engine.starts["first"] < 2 * ENCODE_DELAY_S


def test_stop_waits_for_frames_being_encoded(
    make_server: Callable[..., Server], make_client: Callable[..., BackendClient]
) -> None:
    """A shutdown right after the engine returned still stores and reports the job."""
    server = make_server(engine=FakeEngine())
    server.worker.encode = lambda frame, level: (time.sleep(0.2), encode_png(frame, level))[1]
    client = make_client(server)
    client.connect()
    job_id = client.submit(small_request("x", frames=3, steps=1)).job_id
    deadline = time.monotonic() + 10
    encoding = False
    while not encoding and time.monotonic() < deadline:
        # The device is free (the loop could dispatch) while the job is still live: its
        # frames are being encoded.
        job = server.live.get(job_id)
        encoding = job is not None and job.state == "running" and server.running is None
        time.sleep(0.005)
    assert encoding
    server.stop()
    record = JobStore(server.config.data_dir).get(job_id)
    assert record is not None and record.state == "finished" and record.frames == 3


def test_a_storage_failure_fails_the_job_as_storage_and_the_server_goes_on(
    make_server: Callable[..., Server], make_client: Callable[..., BackendClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disk trouble while frames stream in is the server's, not the engine's: the job fails
    with code "storage" (the engine keeps its pipeline) and the next job runs normally."""
    from animatediff_blender.protocol.client import ClientError

    server = make_server(engine=FakeEngine())
    original = server.store.begin_frames

    def full_disk(job_id: str) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(server.store, "begin_frames", full_disk)
    client = make_client(server)
    client.connect()
    with pytest.raises(ClientError) as info:
        client.run_job(small_request("full", frames=8, steps=1), timeout_s=30)
    assert info.value.code == "storage" and "No space left" in str(info.value)
    monkeypatch.setattr(server.store, "begin_frames", original)
    result = client.run_job(small_request("after", frames=4, steps=1), timeout_s=30)
    assert len(result.frames) == 4


def test_a_bad_frame_handed_over_fails_the_job_and_keeps_nothing(
    make_server: Callable[..., Server], make_client: Callable[..., BackendClient]
) -> None:
    """A frame of the wrong size, streamed or returned, fails the job with the engine's
    error (the worker checks frames as they are handed over, before storing or sending
    them, and as they are returned) and leaves no frames behind."""
    from animatediff_blender.protocol.client import ClientError

    class WrongSize(FakeEngine):
        def generate(self, request: Any, progress: Any, should_cancel: Any, on_frames: Any = None) -> Any:
            def sink(start: int, frames: list[np.ndarray]) -> None:
                on_frames(start, [f[:-1] if start == 0 else f for f in frames])

            result = super().generate(request, progress, should_cancel, sink)
            result.frames[0] = result.frames[0][:-1]
            return result

    server = make_server(engine=WrongSize())
    client = make_client(server)
    client.connect()
    with pytest.raises(ClientError) as info:
        client.run_job(small_request("bad", frames=8, steps=1), timeout_s=30)
    assert "shape" in str(info.value)
    jobs = server.config.data_dir / "jobs"
    assert not [p for p in jobs.glob("*") if p.is_dir()]


class CompilingEngine(FakeEngine):
    """Warm-up compiles SHAPES shapes, WARM_SHAPE_S each, asking `should_yield` before each
    one; what it left is compiled by `warm_pending` (the AnimateDiffEngine contract)."""

    SHAPES = 4
    WARM_SHAPE_S = 0.5

    def __init__(self) -> None:
        super().__init__(step_delay_s=0.01)
        self.left = self.SHAPES
        self.events: list[tuple[str, float]] = []

    def _compile_some(self, should_yield: Callable[[], bool]) -> bool:
        while self.left:
            if should_yield():
                self.events.append(("yield", time.monotonic()))
                return False
            time.sleep(self.WARM_SHAPE_S)
            self.left -= 1
        return True

    def warm_up(self, should_yield: Callable[[], bool] | None = None) -> bool:
        return self._compile_some(should_yield or (lambda: False))

    @property
    def pending_warm_ups(self) -> int:
        return self.left

    def warm_pending(self, should_yield: Callable[[], bool]) -> bool:
        done = self._compile_some(should_yield)
        self.events.append(("compiled all" if done else "paused", time.monotonic()))
        return done

    def generate(self, request: Any, progress: Any, should_cancel: Any, on_frames: Any = None) -> Any:
        self.events.append(("job", time.monotonic()))
        return super().generate(request, progress, should_cancel, on_frames)


def test_a_job_during_warm_up_does_not_wait_for_the_compile(
    make_server: Callable[..., Server], make_client: Callable[..., BackendClient]
) -> None:
    engine = CompilingEngine()
    started = time.monotonic()
    server = make_server(engine=engine)
    client = make_client(server)
    assert client.connect().warming_up
    result = client.run_job(small_request("during warm-up", frames=2, steps=1), timeout_s=30)
    assert len(result.frames) == 2
    # The job waited for at most the shape being compiled when it came, not for all four.
    waited = time.monotonic() - started
    assert waited < (CompilingEngine.SHAPES - 1) * CompilingEngine.WARM_SHAPE_S
    assert engine.left > 0 and [e for e, _ in engine.events][:2] == ["yield", "job"]
    # Idle again, the worker compiles the rest; then the handshake stops saying "warming up".
    deadline = time.monotonic() + 10
    while engine.left and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.left == 0 and ("compiled all" in [e for e, _ in engine.events])
    while server.warming_up and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.warming_up
    fresh = make_client(server, client_id="artist-b")
    assert not fresh.connect().warming_up


class ModellessEngine(FakeEngine):
    """A real engine's warm-up on an empty models folder: an EngineError, not a crash."""

    def warm_up(self, should_yield: Callable[[], bool] | None = None) -> bool:
        from animatediff_blender.backend.engine.interface import EngineError

        raise EngineError("unknown_model", "base_model: none given and the server has no base model installed")


def test_a_warm_up_without_models_is_one_line_not_a_traceback(
    make_server: Callable[..., Server], make_client: Callable[..., BackendClient], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING"):
        server = make_server(engine=ModellessEngine())
        make_client(server).connect()
        deadline = time.monotonic() + 10
        while "warm-up" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    records = [r for r in caplog.records if "warm-up" in r.getMessage()]
    assert records and "no base model installed" in records[0].getMessage()
    assert all(r.exc_info is None and r.levelname == "WARNING" for r in records)
