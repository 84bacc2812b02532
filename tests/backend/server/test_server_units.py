"""Unit tests of the server's parts: fair queue, job store and retention, limits, fake engine."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from server_helpers import job_log_records, small_request

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
    assert sorted(store.recover()) == [("a" * 32, "c"), ("b" * 32, "c")]  # (job id, client id)
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


# --------------------------------------------------------------------------- frames folders left behind


def test_a_frames_folder_whose_delete_failed_is_swept_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A delete that fails (a permission error, a busy file on a network share) is tried
    again by `sweep`, until it works; a live job's folders and a finished job's frames are
    never touched, and the failure is logged once per folder, not once per sweep."""
    import shutil

    store = JobStore(tmp_path)
    now = time.time()
    expired, live, kept, failed, orphan = ("1" * 32, "2" * 32, "3" * 32, "4" * 32, "5" * 32)
    store.create(_record(expired, "finished", now - 100 * 3600, 3))
    store.save_frames(expired, [b"old"])
    store.create(_record(live, "running"))
    store.save_frames(live, [b"committed, its end not stored yet"])
    store.begin_frames(live)  # and a partial folder it still writes
    store.create(_record(kept, "finished", now, 3))
    store.save_frames(kept, [b"new"])
    store.create(_record(failed, "failed", now))  # its end stored, its frames' delete failed
    store.save_frames(failed, [b"nobody's"])
    (tmp_path / "jobs" / orphan).mkdir()  # no row: deleted with a delete that failed
    (tmp_path / "jobs" / (orphan + ".partial")).mkdir()
    (tmp_path / "jobs" / "notes").mkdir()  # not a job's: left alone
    rmtree = shutil.rmtree
    busy = [True]

    def flaky(path: object, *args: object, **kwargs: object) -> None:
        if busy[0] and kwargs.get("ignore_errors") is not True:
            raise PermissionError(13, "Permission denied", str(path))
        if busy[0]:
            return
        rmtree(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(shutil, "rmtree", flaky)
    assert store.prune(72 * 3600, 10**9, now=now) == [expired]
    assert store.get(expired) is None and store.job_dir(expired).exists()  # row gone, folder left
    for _ in range(3):
        store.sweep(lambda job_id: job_id == live)
    stuck = [expired, failed, orphan, orphan + ".partial"]
    for name in stuck:
        assert (tmp_path / "jobs" / name).exists()
        lines = [r for r in caplog.records if f"{name} (" in r.getMessage() and r.levelno >= logging.WARNING]
        assert len(lines) == 1, (name, [r.getMessage() for r in caplog.records])
    busy[0] = False
    store.sweep(lambda job_id: job_id == live)
    left = sorted(p.name for p in (tmp_path / "jobs").iterdir())
    assert left == sorted([live, live + ".partial", kept, "notes"])
    store.sweep(lambda job_id: False)  # the live job ended: its row is final, not finished
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == sorted([kept, "notes"])
    store.close()


def test_the_server_sweeps_frames_folders_left_behind(make_server, make_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """At start and at every retention pass: a folder whose job is gone or over (and not
    finished) goes; the frames of a running job and of a finished one stay."""
    import threading

    from server_helpers import wait_for

    from animatediff_blender.backend.server.images import encode_png
    from animatediff_blender.protocol import messages

    data = tmp_path / "sweep"
    store = JobStore(data)
    store.create(_record("8" * 32, "finished", time.time(), 3))
    store.save_frames("8" * 32, [b"new"])
    store.close()
    (data / "jobs" / ("9" * 32)).mkdir()  # a job pruned while its folder could not be deleted
    server = make_server(data_dir=data, retention_interval_s=0.05)

    def wait_gone(path: Path) -> None:
        deadline = time.monotonic() + 10
        while path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not path.exists()

    wait_gone(data / "jobs" / ("9" * 32))
    gate = threading.Event()
    server.worker.encode = lambda frame, level: (gate.wait(10), encode_png(frame, level))[1]
    client = make_client(server)
    job = client.submit(small_request()).job_id
    try:
        deadline = time.monotonic() + 10
        while not (data / "jobs" / (job + ".partial")).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        (data / "jobs" / ("a" * 32)).mkdir()  # left behind meanwhile
        wait_gone(data / "jobs" / ("a" * 32))  # a sweep ran...
        assert (data / "jobs" / (job + ".partial")).exists()  # ...and left the live job alone
    finally:
        gate.set()
    wait_for(client, job, (messages.Finished,))
    time.sleep(0.2)  # a few more sweeps
    assert len(client.fetch(job).frames) == 4  # type: ignore[attr-defined]
    assert (data / "jobs" / ("8" * 32)).exists()


# --------------------------------------------------------------------------- restart log


@pytest.mark.parametrize("count", [3, 60])
def test_jobs_interrupted_by_a_restart_are_logged_with_their_client(make_server, tmp_path: Path, count: int) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "restart"
    store = JobStore(data)
    ids = [f"{i:032x}" for i in range(count)]
    for i, job_id in enumerate(ids):
        store.create(dataclasses.replace(_record(job_id, "running" if i % 2 else "queued"), client_id=f"artist-{i % 3}"))
    store.close()
    with job_log_records() as records:
        make_server(data_dir=data)
    lines = [r.getMessage() for r in records if "event=interrupted" in r.getMessage()]
    if count == 3:
        assert len(lines) == count
        for i, job_id in enumerate(ids):
            assert f"job={job_id} client=artist-{i % 3} event=interrupted reason=restart" in lines
    else:  # bounded: a line per job up to RESTART_LOG_JOBS, then one line for the rest
        from animatediff_blender.backend.server.server import RESTART_LOG_JOBS

        assert count > RESTART_LOG_JOBS
        assert len(lines) == RESTART_LOG_JOBS + 1
        assert all("client=artist-" in line for line in lines[:-1])
        rest = count - RESTART_LOG_JOBS
        assert f"jobs={rest}" in lines[-1], lines[-1]
        for n in range(3):  # the rest's clients, with how many each
            assert f"artist-{n}(" in lines[-1], lines[-1]


# --------------------------------------------------------------------------- daemon pool


def test_daemon_pool_runs_like_an_executor_and_can_be_left_behind() -> None:
    import concurrent.futures
    import threading

    from animatediff_blender.backend.server.pool import DaemonPool

    pool = DaemonPool(2, thread_name_prefix="test-pool")
    assert pool.submit(pow, 2, 10).result(5) == 1024
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(5)
    never, started = threading.Event(), threading.Event()
    stuck = [pool.submit(lambda: (started.set(), never.wait())) for _ in range(2)]
    assert started.wait(5)
    queued = pool.submit(time.sleep, 0)  # both threads are stuck: it waits
    assert len(pool._threads) == 2 and all(t.daemon for t in pool._threads)
    pool.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    with pytest.raises(RuntimeError):
        pool.submit(time.sleep, 0)
    t = time.monotonic()
    assert pool.join(0.2) is False  # left behind, not waited for
    assert time.monotonic() - t < 2
    never.set()
    concurrent.futures.wait(stuck, 5)
    assert pool.join(5) is True
