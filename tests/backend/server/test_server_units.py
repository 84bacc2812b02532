"""Unit tests of the server's parts: fair queue, job store and retention, limits, fake engine."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from server_helpers import small_request

from animatediff_blender.backend.engine.fake import FakeEngine
from animatediff_blender.backend.engine.interface import EngineError, JobCancelled, StepProgress
from animatediff_blender.backend.server.jobqueue import ClientOverLimit, FairQueue, QueueFull
from animatediff_blender.backend.server.limits import check_request
from animatediff_blender.backend.server.store import JobRecord, JobStore
from animatediff_blender.protocol.messages import Limits

pytestmark = pytest.mark.timeout(30)


# --------------------------------------------------------------------------- fair queue


def test_round_robin_across_clients() -> None:
    q: FairQueue[str] = FairQueue(max_queue=100, max_per_client=50)
    for i in range(5):
        q.push("batch", f"b{i}", f"b{i}")
    q.push("solo1", "s1", "s1")
    q.push("solo2", "s2", "s2")
    expected = ["b0", "s1", "s2", "b1", "b2", "b3", "b4"]
    assert list(q.order()) == expected
    assert q.position("s2") == 3
    popped = [q.pop() for _ in range(7)]
    assert [p[0] for p in popped if p] == expected
    assert q.pop() is None and len(q) == 0


def test_late_arrival_is_served_before_the_batch_tail() -> None:
    q: FairQueue[str] = FairQueue(100, 50)
    for i in range(20):
        q.push("batch", f"b{i}", "")
    assert q.pop() == ("b0", "")
    q.push("solo", "s", "")
    assert q.position("s") == 2  # after at most one more batch job


def test_caps_and_removal() -> None:
    q: FairQueue[int] = FairQueue(max_queue=3, max_per_client=2)
    q.push("a", "a1", 1)
    with pytest.raises(ClientOverLimit):
        q.push("a", "a2", 2, already_running=1)
    q.push("a", "a2", 2)
    q.push("b", "b1", 3)
    with pytest.raises(QueueFull):
        q.push("c", "c1", 4)
    assert q.remove("a1") == 1
    assert q.remove("missing") is None
    assert list(q.order()) == ["a2", "b1"]
    assert q.position("a1") == -1


# --------------------------------------------------------------------------- store


def _record(job_id: str, state: str = "finished", finished_at: float = 0.0, size: int = 0) -> JobRecord:
    return JobRecord(
        job_id=job_id,
        client_id="c",
        state=state,
        request="{}",
        created_at=1.0,
        finished_at=finished_at,
        bytes=size,
    )


def test_store_round_trip_and_recover(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    store.create(_record("a" * 32, state="running"))
    store.create(_record("b" * 32, state="queued"))
    store.create(_record("c" * 32, state="finished"))
    size = store.save_frames("c" * 32, [b"one", b"two"])
    assert size == 6
    assert store.load_frames("c" * 32, 2) == [b"one", b"two"]
    (tmp_path / "jobs" / ("a" * 32 + ".partial")).mkdir()
    store.close()

    store = JobStore(tmp_path)  # a restart
    assert sorted(store.recover()) == ["a" * 32, "b" * 32]
    for job_id in ("a" * 32, "b" * 32):
        record = store.get(job_id)
        assert record is not None
        assert (record.state, record.error_code) == ("interrupted", "interrupted")
    assert store.get("c" * 32).state == "finished"  # type: ignore[union-attr]
    assert not list((tmp_path / "jobs").glob("*.partial"))
    assert store.recover() == []  # idempotent
    with pytest.raises(ValueError):
        store.job_dir("../../etc")


def test_retention_by_age_and_size(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    now = time.time()
    hour = 3600.0
    jobs = {
        "old-failed": _record("1" * 32, "failed", now - 100 * hour),
        "old-finished": _record("2" * 32, "finished", now - 80 * hour, 10),
        "running": _record("3" * 32, "running", 0.0),
        "mid": _record("4" * 32, "finished", now - 10 * hour, 40),
        "new": _record("5" * 32, "finished", now - 1 * hour, 40),
    }
    for record in jobs.values():
        store.create(record)
        if record.state == "finished":
            store.save_frames(record.job_id, [b"x" * record.bytes])
    removed = store.prune(max_age_s=72 * hour, max_bytes=50, now=now)
    # Age first (both old ones), then the oldest finished job until <= 50 bytes remain.
    assert sorted(removed) == sorted(["1" * 32, "2" * 32, "4" * 32])
    assert store.get("3" * 32) is not None  # never a live job
    assert store.get("5" * 32) is not None
    assert not store.job_dir("4" * 32).exists()
    assert store.job_dir("5" * 32).exists()
    assert store.prune(72 * hour, 50, now=now) == []


def test_server_prunes_at_start(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "retention"
    store = JobStore(data)
    store.create(_record("6" * 32, "finished", time.time() - 1000 * 3600, 3))
    store.save_frames("6" * 32, [b"old"])
    store.close()
    server = make_server(data_dir=data, retention_hours=72)
    deadline = time.monotonic() + 10  # on the server's pool, not before it answers
    while server.store.get("6" * 32) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.store.get("6" * 32) is None
    assert not (data / "jobs" / ("6" * 32)).exists()


# --------------------------------------------------------------------------- limits


def test_valid_request_has_no_limit_errors() -> None:
    assert check_request(small_request(prompt_travel={0: "a", 3: "b"}), Limits()) == []


def test_pixel_budget() -> None:
    limits = Limits(max_pixel_frames=64 * 64 * 4)
    assert check_request(small_request(frames=4), limits) == []
    [err] = check_request(small_request(frames=5), limits)
    assert err.field == "$.request.frames"
    assert "budget" in err.message


# --------------------------------------------------------------------------- fake engine


def test_fake_engine_is_deterministic_and_job_specific() -> None:
    engine = FakeEngine()
    settings = engine.resolve(small_request())
    assert settings.steps == 3 and settings.base_model == "base:fake-sd15"
    steps: list[StepProgress] = []
    result = engine.generate(settings, steps.append, lambda: False)
    assert [s.step for s in steps] == [1, 2, 3]
    assert len(result.frames) == 4
    assert all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in result.frames)
    again = engine.generate(settings, lambda p: None, lambda: False)
    assert all(np.array_equal(a, b) for a, b in zip(result.frames, again.frames, strict=True))
    other = engine.generate(engine.resolve(small_request(prompt="a dog")), lambda p: None, lambda: False)
    assert not np.array_equal(result.frames[0], other.frames[0])
    assert not np.array_equal(result.frames[0], result.frames[1])


def test_fake_engine_presets_and_errors() -> None:
    engine = FakeEngine()
    assert engine.resolve(small_request(steps=None, preset="lightning")).steps == 4
    with pytest.raises(EngineError) as info:
        engine.resolve(small_request(base_model="base:nope"))
    assert info.value.code == "unknown_model"
    with pytest.raises(EngineError) as info:
        engine.generate(engine.resolve(small_request(prompt="!oom")), lambda p: None, lambda: False)
    assert info.value.code == "out_of_memory"
    calls = 0

    def cancel_after_two() -> bool:
        nonlocal calls
        calls += 1
        return calls > 2

    with pytest.raises(JobCancelled):
        engine.generate(engine.resolve(small_request(steps=10)), lambda p: None, cancel_after_two)


def test_server_prunes_periodically(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(retention_hours=1, retention_interval_s=0.1)
    server.store.create(_record("7" * 32, "finished", time.time() - 2 * 3600, 3))
    server.store.save_frames("7" * 32, [b"old"])
    deadline = time.monotonic() + 5
    while server.store.get("7" * 32) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.store.get("7" * 32) is None
    assert not server.store.job_dir("7" * 32).exists()
