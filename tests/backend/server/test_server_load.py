"""Load and fairness: 50 concurrent clients, every job accounted for, no frame lost or
mixed up; a client's 20-job batch does not starve other clients' single jobs."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image
from server_helpers import small_request

from animatediff_blender.backend.engine.fake import FakeEngine
from animatediff_blender.backend.server.server import Server
from animatediff_blender.protocol.client import BackendClient, JobResult
from animatediff_blender.protocol.messages import Limits

pytestmark = pytest.mark.timeout(120)

N_CLIENTS = 50
JOBS_EACH = 2


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_fifty_concurrent_clients(
    make_server: Callable[..., Server], make_client: Callable[..., BackendClient]
) -> None:
    server = make_server(
        engine=FakeEngine(step_delay_s=0.002), limits=Limits(max_queue=N_CLIENTS * JOBS_EACH)
    )
    results: dict[tuple[int, int], JobResult] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(N_CLIENTS)
    clients = [make_client(server, client_id=f"artist-{i}", timeout_s=60) for i in range(N_CLIENTS)]

    def artist(i: int) -> None:
        client = clients[i]  # used by this thread only
        try:
            client.connect()
            barrier.wait(30)
            for j in range(JOBS_EACH):
                # Prompt and seed make each job's frames unique.
                request = small_request(prompt=f"client {i} job {j}", seed=i * 100 + j, frames=3, steps=2)
                results[(i, j)] = client.run_job(request, client_tag=f"{i}/{j}")
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=artist, args=(i,)) for i in range(N_CLIENTS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    elapsed = time.monotonic() - started
    assert not errors, errors[:3]
    assert len(results) == N_CLIENTS * JOBS_EACH
    assert len({r.job_id for r in results.values()}) == len(results)
    print(f"load: {len(results)} jobs from {N_CLIENTS} clients in {elapsed:.1f} s")

    for (i, j), result in results.items():
        settings = result.finished.settings
        assert (settings.prompt, settings.seed) == (f"client {i} job {j}", i * 100 + j)
        expected = FakeEngine.render(settings)
        assert len(result.frames) == 3
        for png, want in zip(result.frames, expected, strict=True):
            assert np.array_equal(decode(png), want), f"frame mix-up in job {i}/{j}"
        record = server.store.get(result.job_id)
        assert record is not None
        assert (record.state, record.client_id, record.client_tag) == ("finished", f"artist-{i}", f"{i}/{j}")
    assert server.store.count() == N_CLIENTS * JOBS_EACH
    assert not server.live and server.running is None


def test_batch_does_not_starve_single_jobs(
    make_server: Callable[..., Server], make_client: Callable[..., BackendClient]
) -> None:
    server = make_server(engine=FakeEngine(step_delay_s=0.01))
    batch = make_client(server, client_id="batch")
    batch_ids = [batch.submit(small_request(prompt=f"batch {k}", steps=3)).job_id for k in range(20)]
    singles = []
    for s in range(5):
        client = make_client(server, client_id=f"single-{s}")
        accepted = client.submit(small_request(prompt=f"single {s}", steps=3))
        assert accepted.queue_position <= 2 + s  # behind at most one more batch job each
        singles.append(accepted.job_id)

    deadline = time.monotonic() + 60
    records = {}
    while time.monotonic() < deadline:
        records = {j: server.store.get(j) for j in batch_ids + singles}
        if all(r is not None and r.state == "finished" for r in records.values()):
            break
        time.sleep(0.05)
    order = sorted(records, key=lambda j: records[j].finished_at)  # type: ignore[union-attr]
    rank = {job_id: n for n, job_id in enumerate(order)}
    single_ranks = sorted(rank[j] for j in singles)
    batch_tail = rank[batch_ids[-1]]
    print(f"fairness: singles finished at ranks {single_ranks} of 25; the batch's last job at {batch_tail}")
    # FIFO would put every single after all 20 batch jobs (ranks 20-24).
    assert max(single_ranks) < 10
    assert batch_tail == 24
    # Each client's own jobs still run in the order submitted.
    assert [rank[j] for j in batch_ids] == sorted(rank[j] for j in batch_ids)
