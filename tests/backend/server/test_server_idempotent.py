"""`Submit.submit_id`: a submit whose `Accepted` was lost can be sent again without making a
second job.  The server keeps (client id, submit id) -> job id in its job store (across
restarts, migrated into databases of earlier versions); the client's `run_job` resends
the same submit id after a timeout."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from server_helpers import small_request, wait_for, wait_state

from animatediff_blender.backend.engine.fake import FakeEngine
from animatediff_blender.backend.server.server import Server
from animatediff_blender.backend.server.store import JobRecord, JobStore
from animatediff_blender.protocol import messages
from animatediff_blender.protocol.client import BackendClient, ClientError
from animatediff_blender.protocol.messages import Limits

pytestmark = pytest.mark.timeout(60)

ClientFactory = Callable[..., BackendClient]
SID = "5" * 32
OTHER_SID = "6" * 32




def test_a_repeated_submit_id_returns_the_same_job(
    make_server: Callable[..., Server], make_client: ClientFactory
) -> None:
    engine = FakeEngine(step_delay_s=0.05)
    server = make_server(engine=engine)
    first = make_client(server, client_id="artist")
    accepted = first.submit(small_request(steps=20), submit_id=SID)  # runs for ~1 s
    # The same submit again (its Accepted was lost), on a new connection of the same client:
    # the existing job, and that connection now watches it.
    again = make_client(server, client_id="artist")
    repeat = again.submit(small_request(steps=20), submit_id=SID)
    assert repeat.job_id == accepted.job_id
    assert repeat.queue_position in (0, 1)
    wait_for(again, accepted.job_id, (messages.Finished,))
    assert server.store.count() == 1
    assert engine.generate_calls == 1
    # Once finished: still the same job, nothing new.
    assert first.submit(small_request(), submit_id=SID).job_id == accepted.job_id
    # Another client id with the same submit id is another job; another submit id too.
    other = make_client(server, client_id="someone-else").submit(small_request(), submit_id=SID)
    fresh = first.submit(small_request(), submit_id=OTHER_SID)
    assert len({accepted.job_id, other.job_id, fresh.job_id}) == 3
    wait_state(server, other.job_id, "finished")
    wait_state(server, fresh.job_id, "finished")
    assert server.store.count() == 3
    assert engine.generate_calls == 3
    record = server.store.get(accepted.job_id)
    assert record is not None and record.submit_id == SID


def test_the_submit_id_survives_a_server_restart(
    make_server: Callable[..., Server], make_client: ClientFactory
) -> None:
    server = make_server()
    client = make_client(server, client_id="artist")
    accepted = client.submit(small_request(), submit_id=SID)
    wait_state(server, accepted.job_id, "finished")
    frames = client.fetch(accepted.job_id).frames
    client.close()
    server.stop()

    engine = FakeEngine()
    again = make_server(engine=engine, data_dir=server.config.data_dir)
    client = make_client(again, client_id="artist")
    repeat = client.submit(small_request(), submit_id=SID)
    assert repeat.job_id == accepted.job_id
    assert engine.generate_calls == 0 and again.store.count() == 1
    [status] = client.watch([repeat.job_id])
    assert status.state == "finished"
    assert client.fetch(repeat.job_id).frames == frames


def test_a_repeat_is_not_counted_against_the_limits(
    make_server: Callable[..., Server], make_client: ClientFactory
) -> None:
    server = make_server(engine=FakeEngine(step_delay_s=0.1), limits=Limits(max_queue=1, max_jobs_per_client=2))
    client = make_client(server, client_id="artist")
    running = client.submit(small_request(steps=20), submit_id=SID)
    queued = client.submit(small_request(), submit_id=OTHER_SID)  # the client's share and the queue are full
    with pytest.raises(ClientError) as info:
        client.submit(small_request())
    assert info.value.code == "busy"
    assert client.submit(small_request(steps=20), submit_id=SID).job_id == running.job_id
    repeat = client.submit(small_request(), submit_id=OTHER_SID)
    assert (repeat.job_id, repeat.queue_position) == (queued.job_id, 1)
    assert server.store.count() == 2


def test_a_malformed_submit_id_is_refused(server: Server, client: BackendClient) -> None:
    with pytest.raises(ClientError) as info:
        client.submit(small_request(), submit_id="not-hex")
    assert info.value.code == "bad_message"
    assert server.store.count() == 0


# --------------------------------------------------------------------------- store

# The jobs table as the first versions created it (no submit_id column).
OLD_SCHEMA = """
CREATE TABLE jobs (
    job_id      TEXT PRIMARY KEY,
    client_id   TEXT NOT NULL,
    state       TEXT NOT NULL,
    request     TEXT NOT NULL,
    settings    TEXT NOT NULL DEFAULT '',
    client_tag  TEXT NOT NULL DEFAULT '',
    created_at  REAL NOT NULL,
    started_at  REAL NOT NULL DEFAULT 0,
    finished_at REAL NOT NULL DEFAULT 0,
    error_code  TEXT NOT NULL DEFAULT '',
    error       TEXT NOT NULL DEFAULT '',
    frames      INTEGER NOT NULL DEFAULT 0,
    width       INTEGER NOT NULL DEFAULT 0,
    height      INTEGER NOT NULL DEFAULT 0,
    seed        INTEGER NOT NULL DEFAULT 0,
    elapsed_s   REAL NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    bytes       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX jobs_state_finished ON jobs (state, finished_at);
"""


def _old_database(data: Path) -> None:
    data.mkdir(parents=True)
    db = sqlite3.connect(data / "jobs.sqlite")
    db.executescript(OLD_SCHEMA)
    db.execute(
        "INSERT INTO jobs (job_id, client_id, state, request, created_at, finished_at) VALUES (?, ?, ?, ?, ?, ?)",
        ("a" * 32, "artist", "finished", "{}", 1.0, time.time()),
    )
    db.commit()
    db.close()


def test_a_database_of_an_earlier_version_is_migrated_in_place(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _old_database(data)
    store = JobStore(data)
    old = store.get("a" * 32)
    assert old is not None and old.state == "finished" and old.submit_id is None
    store.create(JobRecord(job_id="b" * 32, client_id="artist", state="queued", request="{}", submit_id=SID))
    assert store.find_submit("artist", SID) == "b" * 32
    assert store.find_submit("someone-else", SID) is None
    store.close()
    store = JobStore(data)  # opened again: already migrated, nothing to do
    assert store.find_submit("artist", SID) == "b" * 32
    assert store.get("a" * 32) is not None
    columns = [r[1] for r in store._db.execute("PRAGMA table_info(jobs)")]
    assert columns.count("submit_id") == 1
    store.close()


def test_a_server_starts_on_a_database_of_an_earlier_version(
    make_server: Callable[..., Server], make_client: ClientFactory, tmp_path: Path
) -> None:
    data = tmp_path / "old-data"
    _old_database(data)
    server = make_server(data_dir=data)
    client = make_client(server, client_id="artist")
    [status] = client.watch(["a" * 32])
    assert status.state == "finished"
    accepted = client.submit(small_request(), submit_id=SID)
    assert client.submit(small_request(), submit_id=SID).job_id == accepted.job_id
    wait_state(server, accepted.job_id, "finished")


# --------------------------------------------------------------------------- client


def _lose_first_accepted(server: Server) -> list[str]:
    """Drop the server's first Accepted reply (a network blip); returns the dropped job ids."""
    original = server._reply
    dropped: list[str] = []

    def lossy(identity: bytes, msg: Any, content: messages.Base, buffers: list[bytes] | None = None) -> None:
        if isinstance(content, messages.Accepted) and not dropped:
            dropped.append(content.job_id)
            return
        original(identity, msg, content, buffers)

    server._reply = lossy  # type: ignore[method-assign]
    return dropped


def test_run_job_survives_a_lost_accepted(make_server: Callable[..., Server], make_client: ClientFactory) -> None:
    engine = FakeEngine()
    server = make_server(engine=engine)
    dropped = _lose_first_accepted(server)
    client = make_client(server, client_id="artist", timeout_s=1.0, heartbeat_s=0.2, reconnect_give_up_s=20)
    statuses: list[messages.JobStatus] = []
    result = client.run_job(small_request(), timeout_s=30, on_status=statuses.append)
    assert dropped == [result.job_id]  # the job made by the first submit is the one collected
    assert len(result.frames) == 4
    assert server.store.count() == 1 and engine.generate_calls == 1
    assert statuses and statuses[0].job_id == result.job_id


def test_run_job_still_reports_a_refusal_at_once(server: Server, make_client: ClientFactory) -> None:
    client = make_client(server, timeout_s=1.0, reconnect_give_up_s=20)
    t = time.monotonic()
    with pytest.raises(ClientError) as info:
        client.run_job(small_request(base_model="base:nope"))
    assert info.value.code == "unknown_model"
    assert time.monotonic() - t < 2
    assert server.store.count() == 0


def test_submit_with_retry_gets_the_job_of_a_lost_accepted(
    make_server: Callable[..., Server], make_client: ClientFactory
) -> None:
    """`submit(retry=True)` (the add-on's scripting API): one job, its id; without retry the
    lost answer is a "timeout" (and the job runs all the same)."""
    server = make_server(engine=FakeEngine())
    dropped = _lose_first_accepted(server)
    client = make_client(server, client_id="artist", timeout_s=1.0, reconnect_give_up_s=20)
    accepted = client.submit(small_request(), retry=True)
    assert dropped == [accepted.job_id] and server.store.count() == 1

    dropped.clear()
    with pytest.raises(ClientError) as info:
        client.submit(small_request())
    assert info.value.code == "timeout" and len(dropped) == 1 and server.store.count() == 2
