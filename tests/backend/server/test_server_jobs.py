"""Job lifecycle over a real socket: cancel, failures, timeouts, ownership, reconnect,
shutdown, responsiveness while a job runs."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from server_helpers import job_log_records, small_request, wait_for

from animatediff_blender.backend.engine.fake import FakeEngine
from animatediff_blender.backend.server.config import ConfigError
from animatediff_blender.backend.server.server import Server
from animatediff_blender.backend.server.store import JobStore
from animatediff_blender.protocol import messages
from animatediff_blender.protocol.client import BackendClient, ClientError
from animatediff_blender.protocol.messages import Limits

pytestmark = pytest.mark.timeout(60)

ClientFactory = Callable[..., BackendClient]




@pytest.fixture
def slow(make_server: Callable[..., Server]) -> Server:
    return make_server(engine=FakeEngine(step_delay_s=0.05))


def test_cancel_queued_job(slow: Server, make_client: ClientFactory) -> None:
    client = make_client(slow)
    running = client.submit(small_request(steps=20))
    queued = client.submit(small_request(prompt="second"))
    assert running.queue_position == 0
    assert queued.queue_position == 1
    reply = client.cancel(queued.job_id)
    assert reply.state == "cancelled"
    wait_for(client, queued.job_id, (messages.Cancelled,))
    assert client.status(queued.job_id).state == "cancelled"
    assert client.ping().queued == 0
    # The running job is untouched and finishes.
    wait_for(client, running.job_id, (messages.Finished,))
    assert client.status(running.job_id).state == "finished"


def test_cancel_running_job_stops_within_a_step(slow: Server, make_client: ClientFactory) -> None:
    client = make_client(slow)
    accepted = client.submit(small_request(steps=100))
    wait_for(client, accepted.job_id, (messages.Progress,))
    sent = time.monotonic()
    reply = client.cancel(accepted.job_id)
    assert reply.state == "running"  # the Cancelled event follows
    wait_for(client, accepted.job_id, (messages.Cancelled,))
    assert time.monotonic() - sent < 1.0  # one step is 0.05 s
    status = client.status(accepted.job_id)
    assert status.state == "cancelled"
    assert slow.store.get(accepted.job_id).state == "cancelled"  # type: ignore[union-attr]
    # The worker is free again.
    result = client.run_job(small_request(prompt="next", steps=2))
    assert len(result.frames) == 4


def test_cancel_of_a_finished_job_reports_its_state(server: Server, client: BackendClient) -> None:
    result = client.run_job(small_request())
    assert client.cancel(result.job_id).state == "finished"


@pytest.mark.parametrize(
    ("prompt", "code"),
    [("!oom", "out_of_memory"), ("!crash", "internal"), ("!fail:model_error", "model_error")],
)
def test_engine_failures_fail_the_job_and_the_server_goes_on(
    server: Server, client: BackendClient, prompt: str, code: str
) -> None:
    accepted = client.submit(small_request(prompt=prompt))
    failed = wait_for(client, accepted.job_id, (messages.Failed,)).content
    assert isinstance(failed, messages.Failed)
    assert failed.code == code
    assert failed.message
    status = client.status(accepted.job_id)
    assert (status.state, status.error_code) == ("failed", code)
    with pytest.raises(ClientError) as info:
        client.run_job(small_request(prompt=prompt))
    assert info.value.code == code
    result = client.run_job(small_request(prompt="fine"))
    assert len(result.frames) == 4


def test_job_timeout(make_server: Callable[..., Server], make_client: ClientFactory) -> None:
    server = make_server(engine=FakeEngine(step_delay_s=0.05), limits=Limits(job_timeout_s=0.3))
    client = make_client(server)
    with pytest.raises(ClientError) as info:
        client.run_job(small_request(steps=100))
    assert info.value.code == "timeout"
    assert "0.3" in info.value.message


def test_only_the_owner_sees_cancels_and_fetches(server: Server, make_client: ClientFactory) -> None:
    owner = make_client(server, client_id="owner")
    other = make_client(server, client_id="intruder")
    result = owner.run_job(small_request())
    for call in (other.status, other.cancel, other.fetch):
        with pytest.raises(ClientError) as info:
            call(result.job_id)
        assert info.value.code == "not_found"
    [status] = other.watch([result.job_id])
    assert status.error_code == "not_found"
    assert owner.fetch(result.job_id).frames == result.frames


def test_fetches_are_answered_while_rescans_hash(
    server: Server, make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two artists ask for a rescan while a new multi-GB checkpoint hashes (held here): the
    rescans wait, one after the other, and a third artist's finished clip is still fetched at
    once (the rescans filled the pool that fetches share, and the fetch waited for the hash)."""
    finished = make_client(server, client_id="artist-c").run_job(small_request())
    hashing, release = threading.Event(), threading.Event()
    real = server.engine.list_models

    def held_rescan(rescan: bool = False) -> list:
        if rescan:
            hashing.set()
            release.wait(30)
        return real(rescan)

    monkeypatch.setattr(server.engine, "list_models", held_rescan)
    with ThreadPoolExecutor(2) as pool:
        rescans = [pool.submit(make_client(server, client_id=f"artist-{x}", timeout_s=30).list_models, True)
                   for x in "ab"]
        assert hashing.wait(10)
        time.sleep(0.2)  # the second rescan is queued behind the first
        try:
            t = time.perf_counter()
            fetched = make_client(server, client_id="artist-c", timeout_s=5).fetch(finished.job_id)
            took = time.perf_counter() - t
        finally:
            release.set()
        assert all(r.result(timeout=30) for r in rescans)
    assert fetched.frames == finished.frames and took < 2.0


def test_fetch_of_an_unfinished_or_failed_job(slow: Server, make_client: ClientFactory) -> None:
    client = make_client(slow)
    accepted = client.submit(small_request(steps=40))
    with pytest.raises(ClientError) as info:
        client.fetch(accepted.job_id)
    assert info.value.code == "not_ready"
    client.cancel(accepted.job_id)
    wait_for(client, accepted.job_id, (messages.Cancelled,))
    with pytest.raises(ClientError) as info:
        client.fetch(accepted.job_id)
    assert info.value.code == "cancelled"


def test_disconnect_reconnect_watch_and_fetch(slow: Server, make_client: ClientFactory) -> None:
    first = make_client(slow, client_id="artist")
    accepted = first.submit(small_request(steps=30))
    wait_for(first, accepted.job_id, (messages.Progress,))
    first.close()  # Blender quit mid-job

    again = make_client(slow, client_id="artist")
    [status] = again.watch([accepted.job_id])
    assert status.state == "running"
    assert 1 <= status.step < 30
    # Watching resumes the event stream on the new connection.
    wait_for(again, accepted.job_id, (messages.Progress,))
    finished = wait_for(again, accepted.job_id, (messages.Finished,)).content
    assert isinstance(finished, messages.Finished)
    fetched = again.fetch(accepted.job_id)
    assert len(fetched.frames) == 4
    assert fetched.finished.settings.steps == 30


def test_wait_job_collects_a_job_of_an_earlier_connection(slow: Server, make_client: ClientFactory) -> None:
    """What `generate --resume` does: another process with the same client id waits for a
    running job (its events from the watch on), a finished one is fetched,
    and a job of another client id is not found (not waited on for ever)."""
    first = make_client(slow, client_id="artist")
    accepted = first.submit(small_request(steps=30))
    wait_for(first, accepted.job_id, (messages.Progress,))
    first.close()  # the CLI lost its connection

    steps: list[int] = []
    again = make_client(slow, client_id="artist")
    result = again.wait_job(
        accepted.job_id,
        on_event=lambda e: steps.append(e.content.step) if isinstance(e.content, messages.Progress) else None,
    )
    assert result.job_id == accepted.job_id and len(result.frames) == 4
    assert result.finished.settings.steps == 30 and steps and steps[-1] == 30
    assert make_client(slow, client_id="artist").wait_job(accepted.job_id).frames == result.frames
    with pytest.raises(ClientError) as info:
        make_client(slow, client_id="someone-else").wait_job(accepted.job_id, timeout_s=10)
    assert info.value.code == "not_found" and info.value.job_id == accepted.job_id


def test_status_ping_and_cancel_answer_within_100ms_while_a_job_runs(
    make_server: Callable[..., Server], make_client: ClientFactory
) -> None:
    server = make_server(engine=FakeEngine(step_delay_s=0.5))  # the GPU is busy for long stretches
    client = make_client(server)
    busy = client.submit(small_request(steps=100))
    queued = client.submit(small_request(prompt="queued"))
    wait_for(client, busy.job_id, (messages.Progress,), timeout_s=5)
    timings: dict[str, list[float]] = {"ping": [], "status": [], "cancel": []}
    for _ in range(10):
        for name, call in (("ping", client.ping), ("status", lambda: client.status(busy.job_id))):
            t = time.perf_counter()
            call()
            timings[name].append(time.perf_counter() - t)
    assert client.status(busy.job_id).state == "running"  # all of the above overlapped the job
    t = time.perf_counter()
    assert client.cancel(queued.job_id).state == "cancelled"
    timings["cancel"].append(time.perf_counter() - t)
    t = time.perf_counter()
    client.cancel(busy.job_id)
    timings["cancel"].append(time.perf_counter() - t)
    worst = {name: max(values) for name, values in timings.items()}
    assert all(v < 0.1 for v in worst.values()), worst


def test_shutdown_marks_running_and_queued_jobs_interrupted(
    make_server: Callable[..., Server], make_client: ClientFactory
) -> None:
    server = make_server(engine=FakeEngine(step_delay_s=0.05))
    client = make_client(server)
    running = client.submit(small_request(steps=100))
    queued = client.submit(small_request(prompt="waiting"))
    wait_for(client, running.job_id, (messages.Progress,))
    t = time.monotonic()
    server.stop()
    assert time.monotonic() - t < 3
    failed = wait_for(client, running.job_id, (messages.Failed,))
    assert failed.content.code == "interrupted"  # type: ignore[attr-defined]
    for job_id in (running.job_id, queued.job_id):
        record = JobStore(server.config.data_dir).get(job_id)
        assert record is not None
        assert record.state == "interrupted"
        assert record.error_code == "interrupted"


def test_a_refused_submit_is_one_log_line_with_its_reason(
    make_server: Callable[..., Server], make_client: ClientFactory
) -> None:
    # An artist asks why nothing ran: the operator's log says who was refused and why, for
    # the limits and the engine's refusals as for a full queue.  (A handler on the job log
    # itself: the lines are written by the server's thread, whatever the root logger holds.)
    with job_log_records() as records:
        server = make_server(limits=Limits(max_frames=8))
        client = make_client(server, client_id="artist-b")
        for request, code in ((small_request(frames=9), "limit"), (small_request(base_model="base:nope"), "unknown_model")):
            with pytest.raises(ClientError) as info:
                client.submit(request)
            assert info.value.code == code
            lines = [r.getMessage() for r in records if f"event=refused code={code}" in r.getMessage()]
            assert len(lines) == 1 and "client=artist-b" in lines[0], lines
    assert "frames" in next(r.getMessage() for r in records if "code=limit" in r.getMessage())
    assert "base:nope" in next(r.getMessage() for r in records if "code=unknown_model" in r.getMessage())


def test_a_job_still_storing_its_frames_counts_towards_the_clients_share(
    make_server: Callable[..., Server], make_client: ClientFactory
) -> None:
    """--max-jobs-per-client counts queued + running jobs; a job whose frames are still
    being stored while the device runs the next one is running for its client too."""
    from animatediff_blender.backend.server.images import encode_png

    server = make_server(engine=FakeEngine(step_delay_s=0.1), limits=Limits(max_jobs_per_client=2))
    gate = threading.Event()
    server.worker.encode = lambda frame, level: (gate.wait(10), encode_png(frame, level))[1]
    client = make_client(server)
    try:
        storing = client.submit(small_request("storing", steps=1)).job_id
        deadline = time.monotonic() + 10
        while not (server.running is None and storing in server.live) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert server.live[storing].state == "running"  # the device is free, the job is not over
        client.submit(small_request("second", steps=20))
        with pytest.raises(ClientError) as info:
            client.submit(small_request("third"))
        assert info.value.code == "busy"
        assert sum(j.client_id == "artist-a" for j in server.live.values()) == 2
    finally:
        gate.set()
    wait_for(client, storing, (messages.Finished,))


def test_a_job_reported_interrupted_at_shutdown_is_not_stored_as_finished_later(
    make_server: Callable[..., Server], make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A shutdown that cannot wait (a stuck engine, shutdown timeout over) reports the job
    whose frames the finisher still stores as interrupted; when that storing ends after all
    (before the process lets go of the store), the job stays interrupted, as told, with no
    frames left behind, and the stuck job's late end changes nothing either."""
    from animatediff_blender.backend.server.images import encode_png

    release, stuck_started = threading.Event(), threading.Event()

    class Stuck(FakeEngine):
        def generate(self, request, progress, should_cancel, on_frames=None):  # type: ignore[no-untyped-def]
            if request.prompt == "stuck":
                stuck_started.set()
                release.wait(30)  # deaf to cancel, like a hung device
            return super().generate(request, progress, should_cancel, on_frames)

    server = make_server(engine=Stuck())
    server.config.shutdown_timeout_s = 0.5
    gate, finisher_done = threading.Event(), threading.Event()
    server.worker.encode = lambda frame, level: (gate.wait(10), encode_png(frame, level))[1]
    finish = server.worker._finish_safely

    def finish_and_tell(*args: object) -> None:
        try:
            finish(*args)  # type: ignore[arg-type]
        finally:
            finisher_done.set()

    server.worker._finish_safely = finish_and_tell  # type: ignore[method-assign]
    close = server.store.close

    def close_late(timeout: float | None = None) -> bool:  # the finisher's storing ends after the shutdown gave up on it
        gate.set()
        finisher_done.wait(10)
        return close()

    server.store.close = close_late  # type: ignore[method-assign]
    client = make_client(server)
    storing = client.submit(small_request("stored-late", frames=4, steps=1)).job_id
    stuck = client.submit(small_request("stuck", frames=4, steps=1)).job_id
    try:
        assert stuck_started.wait(10)
        server.stop()
        told = wait_for(client, storing, (messages.Failed, messages.Finished))
        assert isinstance(told.content, messages.Failed) and told.content.code == "interrupted"
        assert finisher_done.is_set()
    finally:
        release.set()
    server.worker._thread.join(10)
    store = JobStore(server.config.data_dir)
    try:
        for job_id in (storing, stuck):
            record = store.get(job_id)
            assert record is not None
            assert (record.state, record.error_code) == ("interrupted", "interrupted")
    finally:
        store.close()
    assert not (server.config.data_dir / "jobs" / storing).exists()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_second_server_on_the_same_data_dir_is_refused(
    make_server: Callable[..., Server], make_client: ClientFactory
) -> None:
    # Two GPUs, two `serve` processes, one default data dir: the second one's start-up
    # recovery would mark the first one's running job interrupted and delete its frames.
    first = make_server(engine=FakeEngine(step_delay_s=0.05))
    client = make_client(first)
    job = client.submit(small_request(steps=40))
    wait_for(client, job.job_id, (messages.Progress,))
    with pytest.raises(ConfigError, match="already uses the data folder"):
        make_server(data_dir=first.config.data_dir)
    assert first.store.get(job.job_id).state == "running"  # type: ignore[union-attr]
    wait_for(client, job.job_id, (messages.Finished,))
    first.stop()
    make_server(data_dir=first.config.data_dir)  # free again once the first one stopped


def test_an_unreadable_job_database_is_refused_in_words(
    make_server: Callable[..., Server], tmp_path: Path
) -> None:
    # A disk error, or --data-dir pointed at the wrong folder: one line naming the file, not a traceback.
    data = tmp_path / "data"
    data.mkdir()
    (data / "jobs.sqlite").write_bytes(b"not a database " * 400)
    with pytest.raises(ConfigError, match="jobs.sqlite"):
        make_server(data_dir=data)
    (data / "jobs.sqlite").unlink()
    make_server(data_dir=data)  # the data folder's lock was let go


def test_a_job_database_that_cannot_be_opened_is_refused_in_words(
    make_server: Callable[..., Server], tmp_path: Path
) -> None:
    # Something else in its place (here a folder): a ConfigError naming the file (`serve`
    # prints it and exits 2), not sqlite's bare "unable to open database file" traceback.
    data = tmp_path / "data"
    (data / "jobs.sqlite").mkdir(parents=True)
    with pytest.raises(ConfigError, match="jobs.sqlite"):
        make_server(data_dir=data)
    (data / "jobs.sqlite").rmdir()
    make_server(data_dir=data)  # the data folder's lock was let go


def test_a_cancel_that_could_not_be_stored_leaves_the_job_to_run(
    slow: Server, make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Disk full while cancelling a queued job: the cancel fails, the job must not be left
    # out of the queue yet "queued" for ever (its client waiting on it).
    update = slow.store.update

    def disk_full(job_id: str, **changes: object) -> None:
        if changes.get("state") == "cancelled":
            raise sqlite3.OperationalError("database or disk is full")
        update(job_id, **changes)

    monkeypatch.setattr(slow.store, "update", disk_full)
    client = make_client(slow)
    client.submit(small_request(steps=10))
    queued = client.submit(small_request(prompt="second"))
    with pytest.raises(ClientError) as info:
        client.cancel(queued.job_id)
    assert info.value.code == "storage" and "disk full" in info.value.message
    wait_for(client, queued.job_id, (messages.Finished,))


def test_a_submit_that_could_not_be_stored_is_refused_as_storage(
    server: Server, make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(record: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(server.store, "create", disk_full)
    client = make_client(server)
    with pytest.raises(ClientError) as info:
        client.submit(small_request())
    assert info.value.code == "storage" and "disk full" in info.value.message
    assert client.ping().queued == 0  # not left in the queue


def test_a_finished_job_whose_end_could_not_be_stored_fails_as_storage(
    server: Server, make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its frames are stored; its row is not: "could not encode the frames" (internal) told
    # the artist the wrong cause, and disagreed with `status` on the same job.
    update = server.store.update

    def disk_full(job_id: str, **changes: object) -> None:
        if changes.get("state") == "finished":
            raise sqlite3.OperationalError("database or disk is full")
        update(job_id, **changes)

    monkeypatch.setattr(server.store, "update", disk_full)
    client = make_client(server)
    job = client.submit(small_request())
    failed = wait_for(client, job.job_id, (messages.Failed,)).content
    assert failed.code == "storage" and "disk is full" in failed.message
    assert client.status(job.job_id).error_code == "storage"
    # The frames no one can fetch do not stay on the full disk (until retention, days later).
    assert not (server.config.data_dir / "jobs" / job.job_id).exists()


@pytest.mark.parametrize("when", ["running", "finished"])
def test_a_full_disk_is_logged_in_one_line_without_a_traceback(
    server: Server, make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, when: str,
) -> None:  # fmt: skip
    # The operator reads "disk is full" once per job, as an error, not a traceback per job;
    # the artist reads "storage" (a job that could not even be recorded as started too, not
    # "the backend hit an unexpected error").
    update = server.store.update

    def disk_full(job_id: str, **changes: object) -> None:
        if changes.get("state") in (when, "failed"):
            raise sqlite3.OperationalError("database or disk is full")
        update(job_id, **changes)

    monkeypatch.setattr(server.store, "update", disk_full)
    client = make_client(server)
    job = client.submit(small_request(steps=1))
    failed = wait_for(client, job.job_id, (messages.Failed,)).content
    assert failed.code == "storage" and "disk is full" in failed.message
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and all("disk is full" in r.getMessage() for r in errors)
    assert not [r for r in caplog.records if r.exc_info]


def test_a_job_whose_end_could_not_be_stored_is_not_reported_running_forever(
    server: Server, make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Disk full: the job fails and SQLite cannot record that either.  The row still says
    # "running"; a client that reconnects (Blender restarted) must not wait on it forever.
    update = server.store.update

    def disk_full(job_id: str, **changes: object) -> None:
        if changes.get("state") in ("finished", "failed", "cancelled", "interrupted"):
            raise sqlite3.OperationalError("database or disk is full")
        update(job_id, **changes)

    monkeypatch.setattr(server.store, "update", disk_full)
    client = make_client(server)
    job = client.submit(small_request())
    wait_for(client, job.job_id, (messages.Failed,))
    assert server.store.get(job.job_id).state == "running"  # type: ignore[union-attr]
    later = make_client(server)  # same client id, new connection
    status = later.status(job.job_id)
    assert (status.state, status.error_code) == ("failed", "storage")
    assert later.watch([job.job_id])[0].state == "failed"
    with pytest.raises(ClientError) as info:
        later.fetch(job.job_id)
    assert info.value.code == "storage"
    assert later.cancel(job.job_id).state == "failed"


def test_a_huge_failure_message_is_cut_for_the_artist_and_kept_in_the_log(
    make_server: Callable[..., Server], make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """torch lists a size mismatch per tensor (a LoRA made for another model): hundreds of
    lines that a job row or a terminal should not have to show."""
    from animatediff_blender.backend.engine.interface import EngineError
    from animatediff_blender.backend.server.worker import MAX_ERROR_CHARS

    huge = "".join(f"size mismatch for block {i}.to_q.lora_A.weight: [4, 320] vs [4, 640]\n" for i in range(400))

    class WrongLora(FakeEngine):
        def generate(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            raise EngineError("model_error", huge)

    client = make_client(make_server(engine=WrongLora()))
    with caplog.at_level("WARNING", logger="animatediff_blender.server.worker"):
        with pytest.raises(ClientError) as info:
            client.run_job(small_request())
    assert info.value.code == "model_error"
    message = info.value.message
    assert huge[:200] in message and "more characters in the server log" in message
    assert len(message) < MAX_ERROR_CHARS + 200
    assert client.status(info.value.job_id).error == message.split(": ", 1)[1]  # what is stored
    assert huge.strip() in caplog.text
