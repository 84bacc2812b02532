"""A job the backend has forgotten (pruned after its retention, a new data folder) whose take
is on disk all the same: the worker wrote it while another .blend was open.  Plain Python:
the worker thread's modules, no bpy, no backend."""

from __future__ import annotations

import json
import queue
import sys
from pathlib import Path

import pytest

from .conftest import addon_modules, newest, run_bpy

PNG = b"\x89PNG\r\n\x1a\n" + b"data"
JOB = "0123456789abcdef0123456789abcdef"
NOT_FOUND = {"job_id": JOB, "state": "failed", "error_code": "not_found", "error": "no such job"}


def _load_package():
    return addon_modules("worker", "messages", "files")


class _ForgetfulClient:
    """A connected backend that has pruned every job: watch answers not_found; `fetch` (for a
    job it still lists as finished) says its frames are no longer stored."""

    def __init__(self, statuses: list[dict]) -> None:
        self.statuses = statuses
        self.calls: list[str] = []

    def watch(self, job_ids):
        self.calls.append("watch")
        return [st for st in self.statuses if st["job_id"] in job_ids]

    def fetch(self, job_id):
        self.calls.append("fetch")
        raise sys.modules["_adb_pkg.protocol.client"].ClientError("not_found", "the job's frames are no longer stored")

    def close(self) -> None:
        pass


def _watch(value, statuses=(NOT_FOUND,)) -> list:
    """Watch JOB (the `WatchJobs` value given) on a backend answering `statuses`; what the
    worker reports."""
    worker, m, _files = _load_package()
    outbox: queue.Queue = queue.Queue()
    w = worker.Worker(outbox, {"address": "tcp://gpu:5557"})
    w.client = _ForgetfulClient(list(statuses))
    w._command(m.WatchJobs({JOB: value}))
    msgs = []
    while not outbox.empty():
        msgs.append(outbox.get_nowait())
    assert JOB not in w.jobs, msgs  # ended either way
    return msgs


def _take(root: Path, count: int) -> Path:
    _worker, _m, files = _load_package()
    folder, _names = files.write_frames(root, JOB, [PNG + bytes([i]) for i in range(count)])
    return folder


def test_a_forgotten_job_whose_take_is_on_disk_is_done(tmp_path: Path) -> None:
    """The row's folder (all the resume hands the worker today) holds the whole take: the job
    is done, from disk, and its strip is placed; no fetch is needed."""
    _worker, m, _files = _load_package()
    folder = _take(tmp_path, 4)
    msgs = _watch(str(tmp_path))
    assert len(msgs) == 1 and isinstance(msgs[0], m.JobDone), msgs
    done = msgs[0]
    assert (done.job_id, done.directory, done.files) == (JOB, str(folder), [f"frame_{i:04d}.png" for i in range(4)])
    assert not done.settled and not done.note  # placed where it is: it is already the row's folder


def test_the_rows_frame_count_and_request_are_used(tmp_path: Path) -> None:
    """Told what the row knows (`watch_entry`): the take must have the row's frame count, and
    it is placed with the row's seed and settings."""
    worker, m, _files = _load_package()
    _take(tmp_path, 4)
    request = {"prompt": "a fox", "frames": 4, "seed": 7, "steps": None}
    row = json.dumps({"request": request, "camera_motions": {}, "channel": 2, "start_frame": 1})
    msgs = _watch(worker.watch_entry(str(tmp_path), 4, row))
    assert [type(x) for x in msgs] == [m.JobDone], msgs
    assert (msgs[0].seed, msgs[0].settings, len(msgs[0].files)) == (7, request, 4)


def test_frames_missing_from_the_take_fail_the_job_naming_its_folder(tmp_path: Path) -> None:
    worker, m, _files = _load_package()
    folder = _take(tmp_path, 4)
    (folder / "frame_0003.png").unlink()
    # The row wants 4 frames: 3 are not the take.
    msgs = _watch(worker.watch_entry(str(tmp_path), 4, ""))
    assert [type(x) for x in msgs] == [m.JobFailed], msgs
    assert msgs[0].message == (f"not_found: no such job; the take on disk is incomplete: 3 of 4 frames in {folder} "
                               "(frame_0003.png is missing)")
    # Without the row's count, a gap (or a frame that is not a PNG) shows it.
    (folder / "frame_0001.png").write_bytes(b"<html>")
    msgs = _watch(str(tmp_path))
    assert [type(x) for x in msgs] == [m.JobFailed], msgs
    assert str(folder) in msgs[0].message and "(frame_0001.png is missing)" in msgs[0].message, msgs[0].message


def test_no_take_on_disk_is_the_backends_answer_as_before(tmp_path: Path) -> None:
    _worker, m, _files = _load_package()
    (tmp_path / "01234567").mkdir()  # an empty folder is no take
    msgs = _watch(str(tmp_path))
    assert [(type(x), x.message, x.state) for x in msgs] == [(m.JobFailed, "not_found: no such job", "failed")]
    msgs = _watch(str(tmp_path / "elsewhere"))
    assert [(type(x), x.message) for x in msgs] == [(m.JobFailed, "not_found: no such job")]


def test_frames_no_longer_stored_on_the_backend_come_from_disk(tmp_path: Path) -> None:
    """The backend still lists the job as finished, but its frames expired: the fetch's
    not_found looks on disk too."""
    _worker, m, _files = _load_package()
    folder = _take(tmp_path, 2)
    msgs = _watch(str(tmp_path), [{"job_id": JOB, "state": "finished"}])
    assert [(type(x), x.directory) for x in msgs] == [(m.JobDone, str(folder))], msgs
    (folder / "frame_0000.png").unlink()
    (folder / "frame_0001.png").unlink()
    msgs = _watch(str(tmp_path), [{"job_id": JOB, "state": "finished"}])
    assert [(type(x), x.message) for x in msgs] == [
        (m.JobFailed, "backend refused: the job's frames are no longer stored")], msgs


def test_a_submitted_job_knows_its_frame_count(tmp_path: Path) -> None:
    """A job this worker submitted knows its frames and settings from its own request."""
    worker, m, _files = _load_package()
    outbox: queue.Queue = queue.Queue()
    w = worker.Worker(outbox, {"address": "tcp://gpu:5557"})

    class Client(_ForgetfulClient):
        def submit(self, req, client_tag="", submit_id=None):
            return {"job_id": JOB, "queue_position": 0}

    w.client = Client([NOT_FOUND])
    w._command(m.SubmitJob("f" * 32, {"prompt": "a fox", "frames": 3, "seed": 5}, {}, str(tmp_path)))
    assert (w.jobs[JOB].expected, w.jobs[JOB].request["seed"]) == (3, 5)
    _take(tmp_path, 3)
    w._watch([JOB])
    msgs = [outbox.get_nowait() for _ in range(outbox.qsize())]
    done = [x for x in msgs if isinstance(x, m.JobDone)]
    assert [(x.seed, len(x.files), x.settings["prompt"]) for x in done] == [(5, 3, "a fox")], msgs


def test_a_take_from_disk_keeps_the_camera_loras_the_backend_used(tmp_path: Path) -> None:
    """The row's request names its camera moves, not the MotionLoRA ids they became at submit:
    a take placed from disk is placed with the settings the backend finished it with (written
    beside its frames), so that Regenerate renders with the same MotionLoRAs; a moved take
    keeps them.  A take without them (an older add-on wrote it) still gets the row's."""
    worker, m, files = _load_package()
    outbox: queue.Queue = queue.Queue()
    w = worker.Worker(outbox, {"address": "tcp://gpu:5557"})
    w.jobs[JOB] = worker.Track(str(tmp_path))
    loras = [{"id": "lora:v2_ZoomIn", "weight": 0.7}, {"id": "lora:style", "weight": 0.5}]
    finished = {"job_id": JOB, "frames": 2, "seed": 9, "settings": {"prompt": "a fox", "motion_loras": loras}}
    w.jobs[JOB].frames = {0: PNG, 1: PNG + b"1"}
    w._collect(JOB, finished)
    assert [type(x) for x in [outbox.get_nowait()]] == [m.JobDone]
    moved = files.move_frames(tmp_path / JOB[:8], files.frame_names(2), tmp_path / "moved", JOB)
    request = {"prompt": "a fox", "frames": 2, "seed": 9, "motion_loras": [loras[1]]}
    row = json.dumps({"request": request, "camera_motions": {"ZoomIn": 0.7}, "channel": 2, "start_frame": 1})
    msgs = _watch(worker.watch_entry(str(tmp_path / "moved"), 2, row))
    assert [(type(x), x.directory, x.seed, x.settings) for x in msgs] == [
        (m.JobDone, str(moved), 9, finished["settings"])], msgs
    (moved / files.TAKE_SETTINGS).unlink()
    msgs = _watch(worker.watch_entry(str(tmp_path / "moved"), 2, row))
    assert [(type(x), x.seed, x.settings) for x in msgs] == [(m.JobDone, 9, request)], msgs


@pytest.mark.blender
def test_reopened_file_places_the_take_the_backend_forgot(addon_zips, backend_factory, tmp_path: Path) -> None:
    """In Blender: the takes were written beside film.blend while other.blend was open; the
    backend then forgot the jobs (a new data folder stands in for its 72 h retention).
    Reopening film.blend places the whole take (it used to fail it "not_found: no such job")
    and fails the take missing a frame with its folder named."""
    bpy_python = newest()
    zip_path = str(addon_zips[bpy_python.py_tag])
    backend = backend_factory("--fake-step-delay", "0.05")
    work = tmp_path / "work"
    work.mkdir()
    args = {"zip": zip_path, "address": backend.address, "key_file": str(backend.key_file), "workdir": str(work)}
    made = run_bpy(bpy_python, "backend_forgot.py", {**args, "phase": "make"}, tmp_path)
    whole, partial = made["job_ids"]
    assert made["takes"] == {j: [f"frame_{i:04d}.png" for i in range(4)] for j in made["job_ids"]}, made
    assert made["other_strips"] == [], made
    backend.kill()
    forgetful = backend_factory("--data-dir", str(tmp_path / "data-new"))
    folder = work / "film" / "animatediff" / partial[:8]
    (folder / "frame_0001.png").unlink()
    later = tmp_path / "later"  # a later Blender session: a fresh profile
    later.mkdir()
    r = run_bpy(bpy_python, "backend_forgot.py",
                {**args, "address": forgetful.address, "phase": "reopen", "job_ids": made["job_ids"]}, later)
    done = r["rows"][whole]
    assert done["state"] == "finished", r["rows"]
    assert done["strip"] == {"directory": f"//animatediff/{whole[:8]}/", "channel": 2, "start": 1, "frames": 4,
                             "files_exist": True}, done
    failed = r["rows"][partial]
    assert failed["state"] == "failed" and "strip" not in failed, failed
    assert failed["message"].startswith("not_found: no such job; the take on disk is incomplete: 3"), failed
    assert str(folder) in failed["message"] and "frame_0001.png is missing" in failed["message"], failed
    # Regenerate of the take placed from disk renders with the job's own camera MotionLoRA (id
    # and weight): the row's request, all that was known of it, names the camera move only.
    loras = [{"id": made["zoom_in_ids"][0], "weight": pytest.approx(0.7)}]
    assert len(made["zoom_in_ids"]) == 1, made
    assert r["placed_loras"] == loras and r["placed_moves"] == {"ZoomIn": pytest.approx(0.7)}, r
    assert r["regenerate_loras"] == loras, r
    assert r["regenerated"]["state"] == "finished" and r["regenerated"]["loras"] == loras, r["regenerated"]
