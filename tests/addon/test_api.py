"""The scripting API (`blender_addon/api.py`) in real Blender against the fake backend:
`wait` through a backend that goes quiet, Ctrl+C, a Save As between submit and insert, and
connection overrides as they are used (scripts/api_*.py)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from .conftest import ROOT, newest, oldest, run_bpy

pytestmark = pytest.mark.blender


def _args(zip_path: Path, backend, tmp_path: Path) -> dict[str, object]:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return {"zip": str(zip_path), "address": backend.address, "key_file": str(backend.key_file),
            "workdir": str(work), "backend_pid": backend.proc.pid}


def test_wait_rides_out_a_quiet_backend_and_can_wait_again(addon_zips, backend_factory, tmp_path: Path) -> None:
    """The backend paused for 9 s (SIGSTOP) mid-job: `wait` reconnects and collects the take
    (it used to give up with "No answer from backend" and leave the job running).  When it
    does give up, it says the job may still be running, and `wait(job)` again collects it
    (it used to fail with "not connected: call connect() first")."""
    bpy_python = newest()
    backend = backend_factory("--fake-step-delay", "0.05")
    try:
        r = run_bpy(bpy_python, "api_outage.py", _args(addon_zips[bpy_python.py_tag], backend, tmp_path),
                    tmp_path, timeout=160)
    finally:
        if backend.proc.poll() is None:
            os.kill(backend.proc.pid, signal.SIGCONT)  # never leave it stopped
    ride = r["ride_out"]
    assert ride["ok"] and ride["frames_exist"] and ride["count"] == 4, ride
    assert ride["seconds"] >= 9, ride  # it did wait through the pause
    assert ride["state"] == "finished", ride
    assert ride["directory"] == str(tmp_path / "work" / "animatediff" / ride["short_id"]), ride
    again = r["again_after_success"]
    assert again["ok"] and again["directory"] == ride["directory"] and again["frames_exist"], again

    gave_up = r["give_up"]
    assert not gave_up["ok"] and gave_up["paused_still"], gave_up
    assert "may still be running" in gave_up["error"] and "api.wait(job) again" in gave_up["error"], gave_up
    assert gave_up["error_job_is_the_job"] and "api.wait" not in gave_up["reason"], gave_up
    second = r["second_wait"]
    assert second["ok"] and second["frames_exist"] and second["count"] == 4, second
    assert second["state"] == "finished", second


def test_batch_collects_a_shot_whose_backend_went_quiet_after_the_others(
        addon_zips, backend_factory, tmp_path: Path) -> None:
    """A shot whose backend stopped answering for longer than the client keeps trying was
    counted failed and its job, still running, was never collected (the error said
    `api.wait(job)`, which a batch user cannot call): the batch asks for it again after
    the other shots, places it, and exits 0."""
    bpy_python = newest()
    backend = backend_factory("--fake-step-delay", "0.05")
    args = {**_args(addon_zips[bpy_python.py_tag], backend, tmp_path),
            "batch": str(ROOT / "blender_addon" / "batch.py")}
    try:
        r = run_bpy(bpy_python, "batch_lost_backend.py", args, tmp_path, timeout=160)
    finally:
        if backend.proc.poll() is None:
            os.kill(backend.proc.pid, signal.SIGCONT)  # never leave it stopped
    out = r["stdout"]
    assert "[1/2] lost: FAILED for now: job " in out and "asked for again after the other shots" in out, out
    assert "api.wait" not in out, out
    assert out.index("[2/2] next: strip") < out.index("[1/2] lost: asking the backend again"), out
    assert "[1/2] lost: strip" in out and "batch: 2 shots, 2 ok, 0 failed" in out, out
    assert r["code"] == 0, out
    assert r["strips"] == [[2, 4], [4, 4]], r


def test_ctrl_c_in_wait_cancels_the_job(addon_zips, backend_factory, tmp_path: Path) -> None:
    """KeyboardInterrupt in `wait`: the job is cancelled on the backend, one line says so, and
    the interrupt reaches the caller (batch.py exits on it).  A `timeout` cancels it too."""
    bpy_python = newest()
    backend = backend_factory("--fake-step-delay", "0.05")
    r = run_bpy(bpy_python, "api_interrupt.py", _args(addon_zips[bpy_python.py_tag], backend, tmp_path),
                tmp_path, timeout=120)
    assert r["raised"] == "KeyboardInterrupt", r
    assert r["seconds"] < 4, r  # not after the job's 5 s of steps
    assert r["state"] == "cancelled", r
    lines = [x for x in r["_output"].splitlines() if "interrupted;" in x]
    assert lines == [f"AnimateDiff: interrupted; job {r['job_id']} cancelled on the backend"], r["_output"][-3000:]
    # Past `timeout`: cancelled too, and the error says so.
    assert r["timeout"] == f"job {r['timeout_job_id']} did not finish within 1 s (cancelled)", r
    assert r["timeout_state"] == "cancelled", r


@pytest.mark.parametrize("which", ["oldest", "newest"])
def test_take_lands_beside_the_blend_saved_elsewhere(addon_zips, backend_factory, tmp_path: Path,
                                                      which: str) -> None:
    """Save As into another folder after `submit` (before `wait`), or after `wait` (before
    `insert`): the take is beside the .blend as saved now, the strip's path is relative, and
    nothing stays in the old folder (docs/ADDON.md, "Where the frames go")."""
    bpy_python = oldest() if which == "oldest" else newest()
    backend = backend_factory()
    r = run_bpy(bpy_python, "api_save_as.py", _args(addon_zips[bpy_python.py_tag], backend, tmp_path),
                tmp_path, timeout=120)
    for moment in ("before_wait", "before_insert"):
        got = r[moment]
        assert got["directory"].startswith("//animatediff/"), (moment, got)
        assert got["files_exist"] and got["beside"], (moment, got)
    # Nothing was written beside A's .blend.
    assert r["before_wait"]["old"] == [], r
    assert r["before_wait"]["new"] == [Path(r["before_wait"]["result_directory"]).name], r
    # The second take was written beside B's .blend, then moved to C's with the insert.
    assert r["written_in"] == str(tmp_path / "work" / "B" / "animatediff"), r
    assert r["before_insert"]["short_id"] not in r["before_insert"]["old"], r
    assert r["before_insert"]["new"] == [r["before_insert"]["short_id"]], r


def test_connection_overrides_as_used(addon_zips, backend_factory, tmp_path: Path) -> None:
    """An address with surrounding spaces is used stripped (it failed every shot with "Protocol
    not supported"); timeout_s of inf, 1e300, nan or over 600 is refused up front, naming the
    setting (inf and 1e300 passed the check and failed at connect)."""
    bpy_python = newest()
    backend = backend_factory()
    r = run_bpy(bpy_python, "api_connection.py", _args(addon_zips[bpy_python.py_tag], backend, tmp_path),
                tmp_path, timeout=120)
    for label, got in r["address"].items():
        assert got["result"].startswith("ok"), (label, got)
    for label, calls in r["timeout_s"].items():
        for call, got in calls.items():
            assert got["result"].startswith("AnimateDiffError: timeout_s must be a number of seconds"), \
                (label, call, got)
            assert got["seconds"] < 2, (label, call, got)
    assert r["timeout_s_ok"]["result"].startswith("ok"), r["timeout_s_ok"]
    queue = r["queue"]
    assert queue["jobs"] == [[0, "running", True, True, 2]] and queue["clients"] == 1, queue
    assert queue["bad_timeout"]["result"].startswith("AnimateDiffError: timeout_s must be"), queue
