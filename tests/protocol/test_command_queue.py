"""`animatediff-blender queue` against an in-process server with a slow fake engine."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from animatediff_blender.backend.cli import main
from animatediff_blender.backend.commands.queue import format_listing
from animatediff_blender.protocol import auth, messages
from animatediff_blender.protocol.client import BackendClient, ClientConfig

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def slow_backend(tmp_path: Path) -> Iterator[str]:
    from animatediff_blender.backend.engine.fake import FakeEngine
    from animatediff_blender.backend.server.config import ServerConfig
    from animatediff_blender.backend.server.server import Server

    key = auth.create_key()  # the default key file, which the CLI reads by default
    server = Server(
        ServerConfig(key=key, data_dir=tmp_path / "data", bind="tcp://127.0.0.1:*", linger_ms=0, shutdown_timeout_s=5),
        FakeEngine(step_delay_s=0.05),
    )
    yield server.start()
    server.stop()


def request(**kw: int) -> messages.GenerateRequest:
    return messages.GenerateRequest(prompt="secret plan", **{"width": 64, "height": 48, "frames": 4, "steps": 100, **kw})


def test_queue_shows_jobs_in_their_order_with_whose_they_are(
    slow_backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with BackendClient(ClientConfig(address=slow_backend, client_id="anna", client_name="blender 4.5.15 anna@ws-12")) as anna:
        first = anna.submit(request())
        anna.submit(request(frames=8))
        assert main(["queue", "--address", slow_backend]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0] == f"{slow_backend}: 1 running, 1 waiting, from 1 client"
        assert out[1].split() == ["#", "state", "clip", "progress", "for", "client"]
        assert out[2].split()[:5] == ["now", "running", "4", "frames", "64x48"]
        assert out[2].endswith("blender 4.5.15 anna@ws-12") and "step " in out[2]
        assert out[3].split()[:5] == ["1", "queued", "8", "frames", "64x48"]
        assert "secret" not in "\n".join(out) and first.job_id not in "\n".join(out)

        assert main(["queue", "--address", slow_backend, "--json"]) == 0
        listing = json.loads(capsys.readouterr().out)
        assert [j["state"] for j in listing["jobs"]] == ["running", "queued"]
        assert listing["clients"] == 1 and not any(j["mine"] or j["job_id"] for j in listing["jobs"])


def test_queue_of_an_idle_backend(slow_backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["queue", "--address", slow_backend]) == 0
    assert capsys.readouterr().out.strip() == f"{slow_backend}: 0 running, 0 waiting: the queue is empty"


def test_queue_says_when_no_backend_answers(capsys: pytest.CaptureFixture[str]) -> None:
    auth.create_key()
    assert main(["queue", "--address", "tcp://127.0.0.1:1", "--timeout", "0.3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: No answer from backend at tcp://127.0.0.1:1")


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf"])
def test_queue_refuses_a_timeout_that_is_no_time(timeout: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["queue", "--timeout", timeout]) == 2
    assert "--timeout must be a positive number" in capsys.readouterr().err


def test_own_jobs_show_their_ids_and_durations_read_as_time() -> None:
    now = time.time()
    listing = messages.JobList(
        clients=2,
        jobs=[
            messages.QueuedJob(position=0, state="running", client="bob@ws-3", frames=16, width=512, height=512,
                               step=25, total_steps=25, created_at=now - 4000, started_at=now - 75),
            messages.QueuedJob(position=1, state="queued", client="me", mine=True, job_id="a" * 32,
                               client_tag="shot 10", frames=64, width=680, height=384, created_at=now - 3725),
        ],
    )  # fmt: skip
    lines = format_listing(listing, "tcp://gpu:5557", now=now).splitlines()
    assert lines[0] == "tcp://gpu:5557: 1 running, 1 waiting, from 2 clients"
    assert "saving frames" in lines[2] and "1m15s" in lines[2] and lines[2].endswith("bob@ws-3")
    assert "1h02m" in lines[3] and lines[3].endswith(f"you: job {'a' * 32}, tag 'shot 10'")


def test_queue_cancel_takes_out_ones_own_jobs(slow_backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    with BackendClient(ClientConfig(address=slow_backend)) as me:  # this installation's id, as the CLI's
        running = me.submit(request())
        waiting = me.submit(request(frames=8))
        assert main(["queue", "--address", slow_backend, "--cancel", waiting.job_id, "--json"]) == 0
        captured = capsys.readouterr()
        assert f"{waiting.job_id}: cancelled" in captured.err
        assert [j["job_id"] for j in json.loads(captured.out)["jobs"]] == [running.job_id]
        assert me.status(waiting.job_id).state == "cancelled"

    other = "0" * 32  # no such job, or someone else's: said, and exit 1
    assert main(["queue", "--address", slow_backend, "--cancel", other, "--cancel", running.job_id]) == 1
    err = capsys.readouterr().err
    assert f"{other}: no job {other} for this client" in err and f"{running.job_id}: cancelling" in err
    assert main(["queue", "--address", slow_backend, "--cancel", "shot-10"]) == 2
    assert "--cancel takes a job id" in capsys.readouterr().err
