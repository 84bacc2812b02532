"""The add-on's bpy-free modules, in plain Python: atomic frame writing, weight mapping."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import ROOT, addon_modules


def _load(name: str):
    """Import blender_addon/<name>.py alone (the package's __init__ needs bpy)."""
    spec = importlib.util.spec_from_file_location(f"_adb_{name}", ROOT / "blender_addon" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


files = _load("files")
camera_match = _load("camera_match")
PNG = b"\x89PNG\r\n\x1a\n" + b"data"
JOB = "0123456789abcdef0123456789abcdef"


def test_frames_land_complete_or_not_at_all(tmp_path: Path) -> None:
    folder, names = files.write_frames(tmp_path, JOB, [PNG, PNG + b"2"])
    assert folder == tmp_path / "01234567" and names == ["frame_0000.png", "frame_0001.png"]
    assert (folder / "frame_0001.png").read_bytes() == PNG + b"2"
    # A broken frame: refused before anything is written.
    with pytest.raises(ValueError, match="frame 1 is not a PNG"):
        files.write_frames(tmp_path, "f" * 32, [PNG, b"<html>"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01234567"]
    # Collected again (after a restart): the complete folder is kept as it is.
    assert files.write_frames(tmp_path, JOB, [PNG, PNG]) == (folder, names)
    assert (folder / "frame_0001.png").read_bytes() == PNG + b"2"


def test_incomplete_leftover_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "01234567").mkdir()
    (tmp_path / "01234567" / "frame_0000.png").write_bytes(b"old")
    folder, _ = files.write_frames(tmp_path, JOB, [PNG, PNG])
    assert sorted(p.name for p in folder.iterdir()) == [files.JOB_MARKER, "frame_0000.png", "frame_0001.png"]
    assert (folder / "frame_0000.png").read_bytes() == PNG and files.folder_owner(folder) == JOB
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_jobs_sharing_a_short_id_never_share_a_folder(tmp_path: Path) -> None:
    """Take folders are named by 8 characters of the job id.  A second job with the same 8
    (1 in 2^32 a pair) was given the first one's folder: "collected before", so its own
    frames were dropped and its strip showed the other take.  Each folder now holds its job's
    marker, and a job whose short folder holds another's take gets 16 characters."""
    take_on_disk = addon_modules("worker")[0].take_on_disk
    other = JOB[:8] + "f" * 24
    first, _ = files.write_frames(tmp_path, JOB, [PNG, PNG])
    second, names = files.write_frames(tmp_path, other, [PNG + b"b", PNG + b"b"])
    assert (first, second) == (tmp_path / JOB[:8], tmp_path / other[:16])
    assert (first / "frame_0000.png").read_bytes() == PNG and (second / "frame_0000.png").read_bytes() == PNG + b"b"
    assert files.job_dir(tmp_path, other) == second and files.job_dir(tmp_path, JOB) == first
    assert take_on_disk(str(tmp_path), other, 2) == (second, names, True)
    assert files.write_frames(tmp_path, other, [PNG, PNG]) == (second, names)  # collected again: kept
    third = other[:16] + "0" * 16  # shares 16 characters with the second too: the whole id
    assert files.write_frames(tmp_path, third, [PNG])[0] == tmp_path / third
    # A folder from before markers counts as the job's own, as it did.
    legacy = "abcdef01" + "2" * 24
    (tmp_path / legacy[:8]).mkdir()
    (tmp_path / legacy[:8] / "frame_0000.png").write_bytes(PNG)
    assert files.write_frames(tmp_path, legacy, [PNG + b"new"]) == (tmp_path / legacy[:8], ["frame_0000.png"])
    assert (tmp_path / legacy[:8] / "frame_0000.png").read_bytes() == PNG


def test_write_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = open
    calls = {"n": 0}

    def flaky_open(path, mode="r", *a, **kw):
        if "frame_0001" in str(path):
            raise OSError("disk full")
        calls["n"] += 1
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr("builtins.open", flaky_open)
    with pytest.raises(OSError, match="disk full"):
        files.write_frames(tmp_path, JOB, [PNG, PNG])
    assert list(tmp_path.iterdir()) == []


def test_weights_mapping() -> None:
    w = camera_match.weights_from_scores({"dolly": -0.5, "pan": 0.05, "tilt": 2.0, "roll": 0.3})
    assert w["ZoomOut"] == 0.5 and w["ZoomIn"] == 0.0
    assert w["PanLeft"] == 0.0 and w["PanRight"] == 0.0  # below the threshold
    assert w["TiltUp"] == 1.0  # clamped
    assert w["RollingAnticlockwise"] == 0.3 and w["RollingClockwise"] == 0.0


def test_loopback_rule_is_the_protocols() -> None:
    # One rule for both sides: the add-on delegates to protocol/endpoints.py (stdlib only, so
    # no zmq on Blender's main thread); the addresses themselves are tested in tests/protocol.
    settings_src = (ROOT / "blender_addon" / "settings.py").read_text()
    body = settings_src[settings_src.index("def is_loopback") : settings_src.index("def network_refusal")]
    assert "from .protocol.endpoints import is_loopback" in body
    endpoints_src = (ROOT / "protocol" / "endpoints.py").read_text()
    assert "import zmq" not in endpoints_src



def _load_package():
    return addon_modules("worker", "messages")


class _FakeClient:
    """Stands in for protocol.client.BackendClient: unreachable or answering."""

    def __init__(self, reachable: bool, calls: list[tuple[str, object]]) -> None:
        self.reachable = reachable
        self.calls = calls

    def connect(self):
        if not self.reachable:
            raise sys.modules["_adb_pkg.protocol.client"].ClientError("timeout", "No answer from backend at tcp://gpu:5557 within 0.1 s")
        return {"models": [], "server_version": "t", "device": "cpu"}

    def watch(self, job_ids):
        self.calls.append(("watch", list(job_ids)))
        return []

    def cancel(self, job_id):
        self.calls.append(("cancel", job_id))

    def close(self) -> None:
        pass


def test_cancel_while_backend_unreachable_ends_the_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job owed by a backend that went away can be cancelled (it used to stay pending
    for ever, with no way to clear it); the backend hears of it when it is back."""
    import queue

    worker, m = _load_package()
    calls: list[tuple[str, object]] = []
    reachable = {"now": False}
    monkeypatch.setattr(worker, "make_client", lambda cfg: _FakeClient(reachable["now"], calls))
    outbox: queue.Queue = queue.Queue()
    w = worker.Worker(outbox, {"address": "tcp://gpu:5557"})
    w._command(m.WatchJobs({JOB: str(tmp_path)}))
    w._command(m.CancelJob(JOB))
    msgs = []
    while not outbox.empty():
        msgs.append(outbox.get_nowait())
    ended = [x for x in msgs if isinstance(x, m.JobFailed)]
    assert [(x.job_id, x.state) for x in ended] == [(JOB, "cancelled")], msgs
    assert "could not be reached" in ended[0].message
    assert JOB not in w.jobs
    # The cancel is owed: the worker keeps retrying (with back-off), not only at the next
    # Generate or Refresh, since the job may hold a shared GPU meanwhile.
    assert w._needs_connection() and w.next_connect > 0
    reachable["now"] = True
    w.next_connect = 0.0  # the back-off has passed
    w.start()
    try:
        deadline = time.monotonic() + 5
        while ("cancel", JOB) not in calls and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        w.stop()
    assert ("cancel", JOB) in calls and not w.waiting_cancels
    assert not w._needs_connection()  # nothing owed any more: no reconnect loop


def test_a_submit_waits_for_a_local_backend_that_is_starting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The add-on starts the local backend at Generate; it loads torch and its models before it
    listens (longer than the request timeout, the first time): the submit was refused as
    "cannot connect".  It now waits, saying so, until its patience runs out."""
    import queue

    worker, m = _load_package()
    monkeypatch.setattr(worker, "make_client", lambda cfg: _FakeClient(False, []))
    outbox: queue.Queue = queue.Queue()
    w = worker.Worker(outbox, {"address": "tcp://127.0.0.1:5557"})
    patient = m.SubmitJob("a" * 32, {"prompt": "a cat"}, {}, str(tmp_path), patient_until=time.monotonic() + 60)
    hasty = m.SubmitJob("b" * 32, {"prompt": "a dog"}, {}, str(tmp_path))
    w.waiting.extend([patient, hasty])
    w._connect()
    msgs = list(outbox.queue)
    assert [(type(x).__name__, x.local_id) for x in msgs if hasattr(x, "local_id")] == [
        ("SubmitNote", "a" * 32), ("JobRejected", "b" * 32)]
    assert "waiting for the local backend to start" in msgs[1].message
    assert w.waiting == [patient] and w._needs_connection()  # retried with back-off
    patient.patient_until = time.monotonic() - 1  # it never came up
    outbox.queue.clear()
    w._connect()
    assert [type(x).__name__ for x in outbox.queue if hasattr(x, "local_id")] == ["JobRejected"]
    assert w.waiting == []


def test_cancel_reaches_a_backend_that_is_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disconnected (backoff) but the backend answers now: the cancel goes to it at once and
    the job waits for the backend's own `cancelled`."""
    import queue

    worker, m = _load_package()
    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(worker, "make_client", lambda cfg: _FakeClient(True, calls))
    outbox: queue.Queue = queue.Queue()
    w = worker.Worker(outbox, {"address": "tcp://gpu:5557"})
    w.next_connect = 1e18  # in a reconnect backoff
    w._command(m.WatchJobs({JOB: str(tmp_path)}))
    w._command(m.CancelJob(JOB))
    assert ("cancel", JOB) in calls and JOB in w.jobs
    assert not any(isinstance(x, m.JobFailed) for x in list(outbox.queue))


def test_move_take_to_the_saved_files_folder(tmp_path: Path) -> None:
    """A take written under the old folder of a .blend saved elsewhere meanwhile: the worker
    moves it whole, drops the old output folder it leaves empty, and reports it again."""
    import queue

    worker, m = _load_package()
    old, new = tmp_path / "old" / "animatediff", tmp_path / "new" / "animatediff"
    folder, names = files.write_frames(old, JOB, [PNG, PNG + b"2"])
    outbox: queue.Queue = queue.Queue()
    w = worker.Worker(outbox, {"address": "tcp://gpu:5557"})
    done = m.JobDone(JOB, str(folder), names, 7, {"steps": 2})
    w._command(m.MoveTake(done, str(new)))
    moved = outbox.get_nowait()
    assert (moved.directory, moved.settled, moved.note, moved.seed) == (str(new / "01234567"), True, "", 7)
    assert (new / "01234567" / "frame_0001.png").read_bytes() == PNG + b"2"
    assert not old.exists() and not [p for p in new.iterdir() if p.name.startswith(".")]
    # Already there (same folder): kept as it is.
    assert files.move_frames(new / "01234567", names, new, JOB) == new / "01234567"
    assert sorted(p.name for p in (new / "01234567").iterdir()) == [files.JOB_MARKER, *names]
    # Cannot be moved (its frames are gone): it is reported where it was, with the reason.
    w._command(m.MoveTake(done, str(tmp_path / "elsewhere")))
    failed = outbox.get_nowait()
    assert failed.directory == str(folder) and failed.settled and "could not move it to" in failed.note


class _SubmitClient(_FakeClient):
    """A backend that takes submits: `answers` says what each submit gets in turn
    (a ClientError code to raise, or "ok" for an Accepted)."""

    def __init__(self, reachable: bool, calls: list[tuple[str, object]], answers: list[str]) -> None:
        super().__init__(reachable, calls)
        self.answers = answers

    def submit(self, request, client_tag="", submit_id=None):
        self.calls.append(("submit", submit_id))
        answer = self.answers.pop(0)
        if answer != "ok":
            raise sys.modules["_adb_pkg.protocol.client"].ClientError(answer, f"{answer} from the backend")
        return {"job_id": JOB, "queue_position": 2}


@dataclass
class _Backend:
    """What the fake backend does: `reachable` (flip it mid-test) and each submit's answer in
    turn; `calls` records what the worker sent."""

    reachable: bool
    answers: list[str]
    calls: list[tuple[str, object]] = field(default_factory=list)


def _submit_worker(monkeypatch: pytest.MonkeyPatch, answers: list[str], reachable: bool = True):
    """(worker module, messages module, fake backend, outbox, a Worker not started)."""
    import queue

    worker, m = _load_package()
    backend = _Backend(reachable, answers)
    monkeypatch.setattr(worker, "make_client",
                        lambda cfg: _SubmitClient(backend.reachable, backend.calls, backend.answers))
    outbox: queue.Queue = queue.Queue()
    return worker, m, backend, outbox, worker.Worker(outbox, {"address": "tcp://gpu:5557"})


def _drain(outbox) -> list:
    msgs = []
    while not outbox.empty():
        msgs.append(outbox.get_nowait())
    return msgs


LOCAL = "fedcba9876543210fedcba9876543210"  # a job row's local_id (uuid4().hex)


def test_a_submit_without_an_answer_is_resent_with_the_same_submit_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Accepted was lost (timeout): the job may exist on the backend.  It is not reported
    refused; it is sent again, with the row's local id as submit id (the backend then
    answers with the job it made), once the backend is back, even after failed reconnects."""
    worker, m, backend, outbox, w = _submit_worker(monkeypatch, ["timeout", "ok"])
    w._connect()
    w._command(m.SubmitJob(LOCAL, {"prompt": "a cat"}, {}, str(tmp_path)))
    msgs = _drain(outbox)
    assert not any(isinstance(x, m.JobRejected) for x in msgs), msgs
    assert w.client is None and [s.local_id for s in w.waiting] == [LOCAL]
    assert w._needs_connection()
    assert any(isinstance(x, m.SubmitNote) and x.local_id == LOCAL for x in msgs), msgs
    # The backend is still away: the submit stays owed.  One that was never sent is refused
    # as before (it cannot exist on the backend).
    backend.reachable = False
    w._command(m.SubmitJob("0" * 32, {"prompt": "never sent"}, {}, str(tmp_path)))
    w._connect()
    msgs = _drain(outbox)
    assert [x.local_id for x in msgs if isinstance(x, m.JobRejected)] == ["0" * 32], msgs
    assert [s.local_id for s in w.waiting] == [LOCAL] and w._needs_connection()
    backend.reachable = True
    w._connect()
    msgs = _drain(outbox)
    assert [(x.local_id, x.job_id, x.queue_position) for x in msgs if isinstance(x, m.JobAccepted)] == [
        (LOCAL, JOB, 2)
    ], msgs
    assert [c for c in backend.calls if c[0] == "submit"] == [("submit", LOCAL), ("submit", LOCAL)]
    assert not w.waiting and JOB in w.jobs


def test_a_refused_submit_is_still_reported_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _worker, m, backend, outbox, w = _submit_worker(monkeypatch, ["busy"])
    w._connect()
    w._command(m.SubmitJob(LOCAL, {"prompt": "a cat"}, {}, str(tmp_path)))
    rejected = [x for x in _drain(outbox) if isinstance(x, m.JobRejected)]
    assert [x.local_id for x in rejected] == [LOCAL] and "busy" in rejected[0].message
    assert not w.waiting and w.client is not None  # the connection itself is fine
    assert backend.calls == [("submit", LOCAL)]


def test_cancel_of_a_submit_without_an_answer_ends_its_row_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """✕ on a row still "submitting" while the backend is away: the row ends now, as for a
    job the backend cannot hear of (it used to stay "submitting", its "will cancel" note
    overwritten by "retrying", for as long as the backend was gone).  A submit that may have
    reached the backend is still sent again once it is back, and the job it made is cancelled
    there, never reported accepted; one that was never sent is simply dropped."""
    worker, m, backend, outbox, w = _submit_worker(monkeypatch, ["timeout", "ok"])
    w._connect()
    w._command(m.SubmitJob(LOCAL, {"prompt": "a cat"}, {}, str(tmp_path)))  # no answer: owed
    backend.reachable = False
    w._command(m.SubmitJob("0" * 32, {"prompt": "never sent"}, {}, str(tmp_path)))
    _drain(outbox)
    w._command(m.CancelSubmit(LOCAL))
    w._command(m.CancelSubmit("0" * 32))
    ended = [(x.local_id, x.state) for x in _drain(outbox) if isinstance(x, m.JobRejected)]
    assert ended == [(LOCAL, "cancelled"), ("0" * 32, "cancelled")], ended
    assert [s.local_id for s in w.waiting] == [LOCAL] and w._needs_connection()  # owed to the backend
    w._connect()  # still away: nothing more for the row
    assert not [x for x in _drain(outbox) if getattr(x, "local_id", "") == LOCAL], "row already ended"
    backend.reachable = True
    w._connect()
    msgs = _drain(outbox)
    assert not any(isinstance(x, m.JobAccepted | m.JobRejected | m.SubmitNote) for x in msgs), msgs
    assert [c for c in backend.calls if c[0] in ("submit", "cancel")] == [("submit", LOCAL), ("submit", LOCAL),
                                                                    ("cancel", JOB)], backend.calls
    assert not w.waiting and JOB not in w.jobs and not w._needs_connection()


def test_cancels_a_stopped_worker_owed_go_to_the_next_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The add-on is disabled while cancels are owed to an absent backend (a cancelled job,
    a cancelled submit without an answer): the worker hands them on as it stops, and the next
    worker tells the backend once it is back.  They were lost with the worker, and the jobs
    ran on, holding a shared GPU."""
    worker, m, backend, outbox, old = _submit_worker(monkeypatch, ["timeout", "ok"])
    old._connect()
    old._command(m.SubmitJob(LOCAL, {"prompt": "a cat"}, {}, str(tmp_path)))  # no answer: owed
    backend.reachable = False
    old._command(m.WatchJobs({"f" * 32: str(tmp_path), "d" * 32: str(tmp_path)}))
    old._command(m.CancelJob("f" * 32))  # unreachable: ended here, owed to the backend
    _drain(outbox)
    # Disabling the add-on stops the worker; the artist's last two cancels were still in its
    # inbox (it was busy with a request to the absent backend).
    old._halt.set()
    old.send(m.CancelSubmit(LOCAL))
    old.send(m.CancelJob("d" * 32))
    old.start()
    old.join(5)
    assert not old.is_alive()
    msgs = _drain(outbox)
    # Their rows end now, as for any cancel the backend cannot hear...
    assert [(x.local_id, x.state) for x in msgs if isinstance(x, m.JobRejected)] == [(LOCAL, "cancelled")], msgs
    assert [(x.job_id, x.state) for x in msgs if isinstance(x, m.JobFailed)] == [("d" * 32, "cancelled")], msgs
    # ...and every cancel still owed is handed on.
    handed = [x for x in msgs if isinstance(x, m.CancelsOwed)]
    assert [(x.job_ids, [s.local_id for s in x.submits]) for x in handed] == [
        (["d" * 32, "f" * 32], [LOCAL])], handed
    assert handed[0].submits[0].cancelled and handed[0].submits[0].resend
    # The main thread gives them to the next worker; the backend is back.
    backend.reachable = True
    new = worker.Worker(outbox, {"address": "tcp://gpu:5557"})
    new._command(handed[0])
    assert new._needs_connection()  # owed: it connects without waiting for a Generate
    new._connect()
    assert [c for c in backend.calls if c[0] in ("submit", "cancel")][-4:] == [
        ("cancel", "d" * 32), ("cancel", "f" * 32), ("submit", LOCAL), ("cancel", JOB)], backend.calls
    assert not any(isinstance(x, m.JobAccepted | m.JobRejected) for x in _drain(outbox))
    assert not new.waiting and not new.waiting_cancels and not new._needs_connection()
    # Handed to a worker that is connected: sent at once.
    new._command(m.CancelsOwed(["e" * 32], []))
    assert backend.calls[-1] == ("cancel", "e" * 32) and not new.waiting_cancels


def test_a_stopping_worker_leaves_no_preview_files_or_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job still running when the add-on stops (Blender quits): its step preview and the
    process's preview folder go with the worker.  The folder was left in the temp folder at
    every quit, one per Blender process."""
    import queue

    worker, m = _load_package()
    monkeypatch.setattr(worker, "make_client", lambda cfg: _FakeClient(False, []))
    w = worker.Worker(queue.Queue(), {"address": "tcp://gpu:5557"})
    w.preview_dir = str(tmp_path / "previews")
    w._command(m.WatchJobs({JOB: str(tmp_path)}))
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
    for step in (1, 2):
        w._event({"msg_type": "progress", "content": {"job_id": JOB, "step": step, "has_preview": True},
                  "buffers": [png]})
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == [f"{JOB[:8]}_0002.png"]
    w._halt.set()
    w.start()
    w.join(5)
    assert not w.is_alive()
    assert not (tmp_path / "previews").exists()


def test_cancels_owed_at_a_quit_are_kept_for_the_next_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blender quits while cancels are owed to an absent backend (it does not unregister
    add-ons, so the worker cannot hand them on): the exit handler's snapshot goes to a file,
    and the next session's worker for the same backend claims it, once."""
    import dataclasses
    import os
    import queue

    worker, m = _load_package()
    owed = importlib.import_module("_adb_pkg.owed")
    monkeypatch.setattr(worker, "make_client", lambda cfg: _FakeClient(False, []))
    w = worker.Worker(queue.Queue(), {"address": "tcp://gpu:5557"})
    w._command(m.WatchJobs({"f" * 32: str(tmp_path)}))
    w._command(m.CancelJob("f" * 32))  # unreachable: ended here, owed
    sent = m.SubmitJob(LOCAL, {"prompt": "a cat"}, {}, str(tmp_path), resend=True)  # unanswered
    w.waiting.append(sent)
    w.waiting.append(m.SubmitJob("a" * 32, {"prompt": "a dog"}, {}, str(tmp_path)))  # never sent
    # The artist's last cancels were still in the inbox when Blender quit.
    w.send(m.CancelJob("d" * 32))
    w.send(m.CancelSubmit(LOCAL))
    w.send(m.CancelSubmit("a" * 32))  # never reached the backend: nothing to cancel there
    w._in_hand = m.CancelJob("e" * 32)  # being sent: the thread waits on the absent backend
    snapshot = w.owed_now()
    assert snapshot.job_ids == ["d" * 32, "e" * 32, "f" * 32]
    assert [(s.local_id, s.cancelled) for s in snapshot.submits] == [(LOCAL, True)]

    folder = str(tmp_path / "user")
    path = owed.save(folder, "tcp://gpu:5557", snapshot)
    assert path is not None and os.path.basename(path).startswith(f"owed_cancels_{os.getpid()}_")
    # A second stopped worker for the same backend (disabled, enabled, disabled): one file,
    # each cancel once; another backend's worker gets a file of its own.
    assert owed.save(folder, "tcp://gpu:5557", snapshot) == path
    other = owed.save(folder, "tcp://other:5557", m.CancelsOwed(["b" * 32], []))
    assert other is not None and other != path
    assert owed.save(folder, "tcp://gpu:5557", m.CancelsOwed([], [])) is None  # nothing owed: no file
    claimed = owed.claim(folder, "tcp://gpu:5557")
    assert claimed is not None and claimed.job_ids == ["d" * 32, "e" * 32, "f" * 32]
    assert claimed.submits == [dataclasses.replace(sent, cancelled=True)]
    assert owed.claim(folder, "tcp://gpu:5557") is None  # taken once
    assert os.listdir(folder) == [os.path.basename(other)]  # another backend's: left alone
    theirs = owed.claim(folder, "tcp://other:5557")
    assert theirs is not None and theirs.job_ids == ["b" * 32] and not os.listdir(folder)
    # A file left by another version, or half written, is skipped, not fatal.
    (tmp_path / "user" / "owed_cancels_1.json").write_text("{not json")
    assert owed.claim(folder, "tcp://gpu:5557") is None


def test_shot_check_covers_camera_motion_weights() -> None:
    """A batch checks every shot before rendering; a camera motion's weight outside the
    protocol's range (ZoomIn = 50) used to pass, and fail that shot only after the shots
    before it had rendered."""
    worker, _m = _load_package()
    worker.check_request({"prompt": "a"}, {"ZoomIn": 0.7, "PanLeft": -0.5})
    with pytest.raises(ValueError, match=r"<= 10\.0 - at `\$\.motion_loras\[0\]\.weight`"):
        worker.check_request({"prompt": "a"}, {"ZoomIn": 50.0})


def test_scripts_name_models_by_their_file_names() -> None:
    """A shot list or script names a model as its file is named ("Realistic Vision V5.1.safetensors",
    accents and brackets too): it becomes the id the backend lists that file under, as the
    CLI's `generate` maps it; an id stays as it is, and what is no model id at all is refused."""
    worker, _m = _load_package()
    req = worker.check_request({
        "prompt": "a", "base_model": "Realistic Vision V5.1.safetensors",
        "motion_module": "motion:mm_sd_v15_v2.ckpt", "domain_adapter": "Modèle (final).safetensors",
        "motion_loras": [{"id": "lora:Zoom In (v2).ckpt", "weight": 0.5}],
    }, {})
    assert req.base_model == "base:Realistic_Vision_V5.1.safetensors"
    assert req.motion_module == "motion:mm_sd_v15_v2.ckpt"
    assert req.domain_adapter == "adapter:Modele_final.safetensors"
    assert [(x.id, x.weight) for x in req.motion_loras] == [("lora:Zoom_In_v2.ckpt", 0.5)]
    for bad in ("base:", "base:()", 42):
        with pytest.raises(ValueError, match=r"base_model"):
            worker.check_request({"prompt": "a", "base_model": bad}, {})


def test_a_few_step_preset_on_a_motion_module_not_made_for_it_is_told() -> None:
    """Fast/LCM on a v2 motion module makes a blur the backend cannot refuse (it knows
    modules only by their detected version): the panel and the submit say so, and how to fix it."""
    check = _load("preset_check").preset_mismatch
    models = [{"id": "mm_v2", "kind": "motion", "version": "v2"},
              {"id": "lightning_4step", "kind": "motion", "version": "lightning"},
              {"id": "sd15", "kind": "base", "version": "sd15"}]
    defaults = {"base": "sd15", "motion": "mm_v2", "motion_lightning": "lightning_4step"}
    assert check("quality", "mm_v2", models, defaults) == ""
    assert check("lightning", "", models, defaults) == ""  # the backend picks its Lightning module
    assert check("lightning", "lightning_4step", models, defaults) == ""
    told = check("lightning", "mm_v2", models, defaults)
    assert "mm_v2 is not one" in told and "choose lightning_4step as the motion module" in told
    # No LCM module on the backend: its default motion module runs, and that is told.
    told = check("lcm", "", models, defaults)
    assert "LCM (AnimateLCM) needs its own motion module; mm_v2" in told and "install an AnimateLCM motion module" in told
    assert check("lightning", "not-installed", models, defaults) == ""  # the backend refuses it in words
    assert check("lightning", "", [], {}) == ""  # not connected yet: nothing known



def test_lcm_without_animatelcms_spatial_lora_is_told() -> None:
    """The backend adds AnimateLCM's spatial LoRA to an LCM job by itself ("adapter_lcm" in
    its defaults); without one, AnimateLCM's frames come out soft: the panel says how to get it."""
    check = _load("preset_check").preset_mismatch
    models = [{"id": "motion:AnimateLCM", "kind": "motion", "version": "lcm"},
              {"id": "motion:mm_v2", "kind": "motion", "version": "v2"}]
    defaults = {"motion": "motion:mm_v2", "motion_lcm": "motion:AnimateLCM"}
    told = check("lcm", "", models, defaults)
    assert "spatial LoRA" in told and "models fetch --only lcm" in told
    assert check("lcm", "", models, {**defaults, "adapter_lcm": "adapter:AnimateLCM_sd15_t2v_lora.safetensors"}) == ""
    assert check("lcm", "", models, defaults, domain_adapter="adapter:my_lcm_lora.safetensors") == ""  # the API's own


def _settings():
    """blender_addon/settings.py without bpy: its `properties` import (bpy's) is stood in for
    by a module holding only CAMERA_MOTIONS, read from properties.py."""
    import ast
    import importlib
    import types

    package = "_adb_settings_pkg"
    if f"{package}.settings" in sys.modules:
        return sys.modules[f"{package}.settings"]
    pkg = types.ModuleType(package)
    pkg.__path__ = [str(ROOT / "blender_addon")]
    sys.modules[package] = pkg
    props = types.ModuleType(f"{package}.properties")
    for node in ast.parse((ROOT / "blender_addon" / "properties.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "CAMERA_MOTIONS" for t in node.targets):
            props.CAMERA_MOTIONS = ast.literal_eval(node.value)
    sys.modules[props.__name__] = props
    return importlib.import_module(f"{package}.settings")


def _scene():
    """A scene as plan_from_scene reads it: the panel's settings at their defaults."""
    from types import SimpleNamespace

    panel = SimpleNamespace(prompt="a fox", negative_prompt="", base_model="", motion_module="", domain_adapter="", domain_adapter_scale=1.0, camera_loras=[],
                            extra_loras=[], use_scene_length=False, frames=16, use_render_size=True, width=512,
                            height=512, steps=0, guidance=0.0, seed=42, preset="quality", channel=2,
                            use_current_frame=True, start_frame=1)
    render = SimpleNamespace(resolution_x=1920, resolution_y=1080, resolution_percentage=25)
    return SimpleNamespace(animatediff=panel, render=render, frame_start=1, frame_end=24, frame_current=5)


def test_render_aspect_is_the_render_size_at_sd15_scale() -> None:
    """A new scene renders 1920x1080: taken as it is, the first Generate was refused (beyond
    1024) and would have cost 8x a 512x512 clip with SD1.5 repeating its subject.  The panel
    keeps the render's aspect at about 512x512 pixels; a render at or below that is kept."""
    st = _settings()
    scene = _scene()

    def size(x: int, y: int, pct: int = 100) -> tuple[int, int]:
        scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = x, y, pct
        plan = st.plan_from_scene(scene)
        return plan.request["width"], plan.request["height"]

    assert size(1920, 1080) == (680, 384) == size(3840, 2160) == size(1280, 720)
    assert size(1080, 1920) == (384, 680)  # portrait
    assert size(2048, 2048) == (512, 512) and size(4096, 1024) == (1024, 256)
    assert size(512, 288) == (512, 288) and size(64, 64) == (64, 64) and size(1920, 1080, 25) == (480, 272)
    assert size(768, 512) == (624, 416)  # above 512x512 pixels: scaled down too
    scene.animatediff.use_render_size = False
    assert size(1920, 1080) == (512, 512)  # Width and Height


def test_shot_values_out_of_range_are_refused_not_clamped() -> None:
    """A size below 8, a channel below 1, a fractional channel, start frame or frame count
    were changed without a word (width -512 -> 8, channel 0 -> 1, 2.7 -> 2, start 12.9 -> 12):
    each is refused, naming the setting.  Whole floats (4.0) and sizes to round still pass."""
    st = _settings()
    plan = st.plan_from_scene(_scene())
    assert (plan.request["width"], plan.request["height"], plan.request["frames"]) == (480, 272, 16)
    assert (plan.channel, plan.start_frame) == (2, 5)
    for overrides, words in (({"width": -512}, "width -512 is below the smallest size (8 pixels)"),
                             ({"height": 0}, "height 0 is below"), ({"width": 7.9}, "width 7.9 is below"),
                             ({"channel": 0}, "channel 0 is below the sequencer's first channel (1)"),
                             ({"channel": -3}, "channel -3 is below"), ({"channel": 129}, "channel 129 is above"),
                             ({"channel": 2.7}, "channel must be a whole number, not 2.7"),
                             ({"channel": "2.7"}, "channel must be a whole number, not '2.7'"),
                             ({"start_frame": 12.9}, "start_frame must be a whole number, not 12.9"),
                             ({"frames": 2.7}, "frames must be a whole number, not 2.7"),
                             ({"frames": True}, "frames must be a whole number, not True")):
        with pytest.raises(ValueError) as err:
            st.plan_from_scene(_scene(), **overrides)
        assert words in str(err.value), (overrides, str(err.value))
    plan = st.plan_from_scene(_scene(), channel=4.0, start_frame="-12", frames=4.0, width=100, height=8)
    assert (plan.channel, plan.start_frame, plan.request["frames"]) == (4, -12, 4)
    assert type(plan.channel) is int and type(plan.request["frames"]) is int
    assert (plan.request["width"], plan.request["height"]) == (96, 8)  # rounded as before: round(12.5) == 12
    assert st.plan_from_scene(_scene(), width=612.0, height=1000).request["width"] == 608


def test_sizes_no_number_can_be_are_refused_in_words() -> None:
    """`width = inf` (or -inf, nan, 10**400) ended a batch with an OverflowError traceback
    from round8; it is a ValueError naming the setting, and a 400-digit number is never
    printed in full."""
    st = _settings()
    (worker,) = addon_modules("worker")
    for value, words in ((float("inf"), "width must be a finite number of pixels, not inf"),
                         (float("-inf"), "width must be a finite number of pixels, not -inf"),
                         (float("nan"), "width must be a finite number of pixels, not nan")):
        with pytest.raises(ValueError, match=words):
            st.plan_from_scene(_scene(), width=value)
    with pytest.raises(ValueError, match="height must be a finite"):
        st.plan_from_scene(_scene(), height=float("-inf"))
    with pytest.raises(ValueError, match="a size must be a finite number"):
        st.round8(float("inf"))
    assert st.round8(10**400) == 10**400 and st.round8(100) == 96 and st.round8(3) == 8  # exact, no float
    plan = st.plan_from_scene(_scene(), width=10**400)  # the protocol's range check refuses it, in words
    with pytest.raises(ValueError, match=r"<= 8192 - at `\$\.width`"):
        worker.check_request(plan.request, plan.camera_motions)
    for overrides in ({"channel": 10**400}, {"start_frame": -(10**400)}, {"motion_loras": {"ZoomIn": 10**400}}):
        with pytest.raises(ValueError) as err:
            st.plan_from_scene(_scene(), **overrides)
        assert "(401 digits)" in str(err.value) and len(str(err.value)) < 200, str(err.value)
    with pytest.raises(ValueError, match=r"unknown setting\(s\): x{37}\.\.\.$"):
        st.plan_from_scene(_scene(), **{"x" * 500: 1})


batch = _load("batch")


def test_shot_list_top_level_keys_are_checked(tmp_path: Path) -> None:
    """A misspelt [default] table, a setting at the top (meant for every shot) or both `shot`
    and `shots` were ignored without a word: the shots rendered with the scene's settings, or
    half the shots were dropped.  Each is an error naming the key; JSON's forms still load."""
    cases = (("steps = 2\n[default]\nframes = 4\n[[shot]]\nprompt = 'x'\n", "unknown top-level key(s) steps, default"),
             ("[[shot]]\nprompt = 'x'\n[[shots]]\nprompt = 'y'\n", "both `shot` and `shots`"))
    for text, words in cases:
        path = tmp_path / "shots.toml"
        path.write_text(text)
        with pytest.raises(batch.BatchError, match=re.escape(words)):
            batch.load_shots(str(path))
    path = tmp_path / "shots.json"
    path.write_text(json.dumps({"shots": [{"prompt": "x"}], "default": {"frames": 4}}))
    with pytest.raises(batch.BatchError, match=r'unknown top-level key\(s\) default: a shot list holds "shots"'):
        batch.load_shots(str(path))
    path.write_text(json.dumps({"shot": [{"prompt": "x"}], "shots": [{"prompt": "y"}]}))
    with pytest.raises(batch.BatchError, match="both `shot` and `shots`"):
        batch.load_shots(str(path))
    path.write_text(json.dumps([{"prompt": "x"}, {"prompt": "y", "frames": 2}]))
    assert batch.load_shots(str(path)) == [{"prompt": "x"}, {"prompt": "y", "frames": 2}]
    path.write_text(json.dumps({"defaults": {"frames": 4}, "shots": [{"prompt": "x"}, {"prompt": "y", "frames": 2}]}))
    assert batch.load_shots(str(path)) == [{"frames": 4, "prompt": "x"}, {"frames": 2, "prompt": "y"}]
    path = tmp_path / "shots.toml"
    path.write_text("[defaults]\nframes = 4\n[[shot]]\nprompt = 'x'\n")
    assert batch.load_shots(str(path)) == [{"frames": 4, "prompt": "x"}]


def test_shot_list_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    """Notepad and other Windows editors save UTF-8 with a byte-order mark: such a list was
    refused ("not valid TOML", "Unexpected UTF-8 BOM")."""
    toml = tmp_path / "bom.toml"
    toml.write_bytes(b"\xef\xbb\xbf" + "[[shot]]\nname = 'café'\nprompt = 'x'\n".encode())
    assert batch.load_shots(str(toml)) == [{"name": "café", "prompt": "x"}]
    js = tmp_path / "bom.json"
    js.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"name": "café", "prompt": "x"}]).encode())
    assert batch.load_shots(str(js)) == [{"name": "café", "prompt": "x"}]


def test_batch_arguments_checked_before_anything_is_saved(tmp_path: Path) -> None:
    """Key files that are not there and a CurveZMQ certificate without the other fail every
    shot only at connect, after the .blend is saved: check_args refuses them up front.
    An --address with spaces around it is stripped, a blank one refused."""
    cert = tmp_path / "server.key"
    cert.write_text("x")

    def check(*argv: str):
        args = batch.parse_args(["shots.toml", *argv])
        batch.check_args(args, inside_blender=False)
        return args

    for argv, words in ((["--key-file", "nope.key"], "--key-file nope.key: no such file"),
                        (["--key-file", str(tmp_path)], f"--key-file {tmp_path}: not a file"),
                        (["--server-public-key", "nope.key", "--client-secret-key", str(cert)],
                         "--server-public-key nope.key: no such file"),
                        (["--server-public-key", str(cert)], "CurveZMQ needs both --server-public-key"),
                        (["--client-secret-key", str(cert)], "CurveZMQ needs both --server-public-key"),
                        (["--address", "   "], "--address is empty")):
        with pytest.raises(batch.BatchError, match=re.escape(words)):
            check(*argv)
    args = check("--address", "  tcp://gpu:5557 \n", "--key-file", str(cert), "--server-public-key", str(cert),
                 "--client-secret-key", str(cert))
    assert args.address == "tcp://gpu:5557"
    # A shot's own key files, and its certificates completed from the command line's.
    with pytest.raises(batch.BatchError, match="s1: key_file nope.key: no such file"):
        batch.check_shot_files("s1", {"key_file": "nope.key"}, {})
    with pytest.raises(batch.BatchError, match="s1: CurveZMQ needs both"):
        batch.check_shot_files("s1", {"client_secret_key_file": str(cert)}, {})
    batch.check_shot_files("s1", {"client_secret_key_file": str(cert)}, {"server_public_key_file": str(cert),
                                                                        "client_secret_key_file": str(cert)})
    batch.check_shot_files("s1", {"server_public_key_file": "", "client_secret_key_file": ""},
                           {"server_public_key_file": str(cert), "client_secret_key_file": str(cert)})


def test_batch_messages_do_not_print_huge_numbers() -> None:
    assert batch._clip_numbers(f"address must be text, not {10**400}") == \
        "address must be text, not 100000000000...(401 digits)"
    assert batch._clip_numbers("job 0123456789abcdef0123456789abcdef failed") == \
        "job 0123456789abcdef0123456789abcdef failed"  # a job id is kept
    assert batch._short(10**400, 80) == "100000000000...(401 digits)" and batch._short("shot 1", 80) == "shot 1"


def test_a_refused_size_or_length_says_which_panel_setting_sets_it() -> None:
    """The first Generate was refused with "$.request.width must be <= 1024" and nothing
    said how to change that in the panel (or, for a script, which keyword): the refusal
    names the setting the panel took it from, and says nothing of a script's own keyword."""
    from animatediff_blender.protocol.client import ClientError
    from animatediff_blender.protocol.messages import FieldError

    size_hint = addon_modules("worker")[0].size_hint
    st = _settings()
    refused = [FieldError(field="$.request.width", message="must be <= 1024"),
               FieldError(field="$.request.height", message="must be <= 1024"),
               FieldError(field="$.request.frames", message="width x height x frames = 518400000 exceeds ...")]
    scene = _scene()
    scene.animatediff.use_scene_length = True
    hint = size_hint(refused, panel=st.plan_from_scene(scene).panel_hints)
    assert hint.count("Render aspect: turn it off") == 1 and "Scene length: turn it off and set Frames" in hint
    scene.animatediff.use_scene_length = scene.animatediff.use_render_size = False
    hint = size_hint(refused, panel=st.plan_from_scene(scene).panel_hints)
    assert "set a smaller Width or Height; set fewer Frames" in hint and "Render aspect" not in hint
    # A script's own keywords are not the panel's to change.
    assert set(st.plan_from_scene(scene, width=64, frames=4).panel_hints) == {"height"}
    assert size_hint(refused, panel={}) == ""  # Regenerate: the take's own settings
    assert size_hint(refused[2:], {"frames": 300}, api=True) == ""  # the script gave it: nothing to add
    assert "without width=, height= the AnimateDiff panel's size" in size_hint(refused, {"frames": 9}, api=True)
    assert size_hint([FieldError(field="$.request.steps", message="must be <= 100")], panel={"steps": "x"}) == ""
    # And the refusal itself says each field once (it was said twice, in two spellings).
    exc = ClientError("limit", "request exceeds limits: $.request.width must be <= 1024", refused[:1])
    assert str(exc) == "request exceeds limits: $.request.width must be <= 1024"
    assert str(ClientError("limit", "bad", refused[:1])) == "bad ($.request.width: must be <= 1024)"


def test_refresh_asks_the_backend_to_read_its_models_folder_again() -> None:
    """⟳ only asked for the list the backend had read at its start: checkpoints dropped into
    its models folder never appeared.  It rescans now; a rescan still hashing a new
    checkpoint after a minute is said, and is no lost connection."""
    import importlib
    import queue

    worker, m = _load_package()
    client_error = importlib.import_module("_adb_pkg.protocol.client").ClientError

    class Client:
        def __init__(self, fail: bool) -> None:
            self.fail, self.asked = fail, []

        def list_models(self, rescan: bool = False, timeout_s: float | None = None):
            self.asked.append((rescan, timeout_s))
            if self.fail:
                raise client_error("timeout", "No answer from backend within 60 s")
            return []

    for fail in (False, True):
        outbox: queue.Queue = queue.Queue()
        w = worker.Worker(outbox, {"address": "tcp://gpu:5557"})
        w.client = Client(fail)
        w._refresh_models()
        assert w.client is not None and w.client.asked == [(True, worker.RESCAN_WAIT_S)]
        state = outbox.get_nowait()
        assert isinstance(state, m.ConnectionState) and state.connected
        assert ("still reading its models folder" in state.message) == fail


def test_the_add_on_introduces_itself_with_who_runs_it_where(monkeypatch: pytest.MonkeyPatch) -> None:
    import getpass
    import socket

    worker = addon_modules("worker")[0]
    monkeypatch.setattr(getpass, "getuser", lambda: "anna")
    config = worker.client_config({"address": "tcp://127.0.0.1:5557", "client_name": "blender 4.5.15", "extra": 1})
    assert config.client_name == f"blender 4.5.15 anna@{socket.gethostname().split('.')[0]}"


def test_the_panel_s_queue_lines_say_who_is_ahead() -> None:
    from animatediff_blender.protocol import messages as pm

    worker, _m = _load_package()
    listing = pm.JobList(
        clients=2,
        jobs=[
            pm.QueuedJob(position=0, state="running", client="blender 4.5.15 anna@ws-12", frames=16, width=512,
                         height=512, step=12, total_steps=25),
            pm.QueuedJob(position=0, state="running", client="cli", frames=8, width=64, height=64, step=4, total_steps=4),
            pm.QueuedJob(position=1, state="queued", client="render farm script", frames=64, width=680, height=384),
            pm.QueuedJob(position=2, state="queued", client="blender 5.3.0 me@ws-1", mine=True, job_id="a" * 32,
                         frames=16, width=512, height=512),
        ],
    )  # fmt: skip
    summary, lines = worker.queue_lines(listing)
    assert summary == "2 running, 2 waiting, 2 clients"
    assert lines == [
        "now  anna@ws-12  16 frames 512x512  step 12/25",
        "now  cli  8 frames 64x64  saving",
        "1.  render farm script  64 frames 680x384",
        "2.  you  16 frames 512x512",
    ]
    summary, lines = worker.queue_lines(listing, limit=1)
    assert lines[1:] == ["... and 3 more"]
    assert worker.queue_lines(pm.JobList(jobs=[])) == ("0 running, 0 waiting", [])


class _QueueClient(_FakeClient):
    def __init__(self, calls: list[tuple[str, object]], listing) -> None:
        super().__init__(True, calls)
        self.listing = listing

    def list_jobs(self):
        self.calls.append(("list_jobs", None))
        if isinstance(self.listing, Exception):
            raise self.listing
        return self.listing


def test_the_worker_shows_the_backend_queue_while_it_has_jobs_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import queue

    from animatediff_blender.protocol import messages as pm

    worker, m = _load_package()
    calls: list[tuple[str, object]] = []
    listing = pm.JobList(clients=1, jobs=[pm.QueuedJob(position=0, state="running", client="x", frames=4,
                                                       width=64, height=64, step=1, total_steps=3)])
    client = _QueueClient(calls, listing)
    monkeypatch.setattr(worker, "make_client", lambda cfg: client)
    outbox: queue.Queue = queue.Queue()
    w = worker.Worker(outbox, {"address": "tcp://gpu:5557"})
    w._connect()
    w._queue_view()  # no jobs of ours: the backend is not asked
    assert ("list_jobs", None) not in calls
    w._command(m.WatchJobs({JOB: str(tmp_path)}))
    w._queue_view()
    w._queue_view()  # within QUEUE_VIEW_S: asked once
    assert calls.count(("list_jobs", None)) == 1
    views = [x for x in _drain(outbox) if isinstance(x, m.QueueView)]
    assert [(v.summary, v.lines) for v in views] == [("1 running, 0 waiting, 1 client", ["now  x  4 frames 64x64  step 1/3"])]
    # A backend that cannot list its queue (older than protocol 1.2): nothing shown, connection kept.
    client.listing = sys.modules["_adb_pkg.protocol.client"].ClientError("unsupported", "cannot list its queue")
    w.next_queue_view = 0.0
    w._queue_view()
    assert w.client is client and not [x for x in _drain(outbox) if isinstance(x, m.QueueView)]
    # Our last job gone: the view is cleared, once.
    w.jobs.clear()
    w._queue_view()
    w._queue_view()
    assert [(v.summary, v.lines) for v in _drain(outbox) if isinstance(v, m.QueueView)] == [("", [])]


def test_a_job_an_admin_cancelled_says_who(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline TD cleared the artist's job (`serve --admin-client td`, protocol 1.3): the
    row says so, not a bare "cancelled" that reads like the artist's own doing."""
    import queue

    worker, m = _load_package()
    monkeypatch.setattr(worker, "make_client", lambda cfg: _FakeClient(False, []))
    outbox: queue.Queue = queue.Queue()
    w = worker.Worker(outbox, {"address": "tcp://gpu:5557"})
    other = "f" * 32
    w._command(m.WatchJobs({JOB: str(tmp_path), other: str(tmp_path)}))
    w._event({"msg_type": "cancelled", "content": {"job_id": JOB, "by": "td"}})
    w._event({"msg_type": "cancelled", "content": {"job_id": other}})  # a 1.2 server, or one's own cancel
    ended = []
    while not outbox.empty():
        x = outbox.get_nowait()
        if isinstance(x, m.JobFailed):
            ended.append((x.job_id, x.message, x.state))
    assert ended == [(JOB, "cancelled by td (admin)", "cancelled"), (other, "cancelled", "cancelled")]


def test_key_paths_with_a_tilde_or_a_variable_are_expanded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A TD deploys one preferences file to every machine: `~/keys/hmac.key` was looked for
    literally ("no key file at ~/keys/hmac.key", though the file was there)."""
    worker, _m = _load_package()
    monkeypatch.setenv("HOME", "/home/anna")
    monkeypatch.setenv("STUDIO_KEYS", "/mnt/keys")
    cfg = worker.client_config({"address": "tcp://gpu:5557", "key_file": "~/keys/hmac.key",
                                "server_public_key_file": "$STUDIO_KEYS/server.key", "client_secret_key_file": None})
    assert str(cfg.key_file) == "/home/anna/keys/hmac.key"
    assert str(cfg.server_public_key_file) == "/mnt/keys/server.key" and cfg.client_secret_key_file is None


def test_a_pyzmq_in_the_way_is_named_not_a_bare_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blender keeps one copy of each wheel for all extensions (the highest version any bundles),
    and PYTHONPATH can come first: the artist saw only "No module named 'zmq.auth'"."""
    import types

    worker, _m = _load_package()
    stub = types.ModuleType("zmq")  # another add-on's "pyzmq 99": a module, not the package
    stub.__version__ = "99.0"
    stub.__file__ = "/studio/other_addon/zmq/__init__.py"
    monkeypatch.setitem(sys.modules, "zmq", stub)
    for name in [n for n in sys.modules if n.startswith(("_adb_pkg.protocol", "zmq."))]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(RuntimeError) as info:
        worker.make_client({"address": "tcp://gpu:5557"})
    text = str(info.value)
    assert "the extension's libraries could not be loaded" in text and "zmq.auth" in text
    assert "pyzmq 99.0 from /studio/other_addon/zmq" in text and "msgspec " in text
