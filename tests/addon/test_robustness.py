"""Adversarial use of the add-on in real Blender (see scripts/robustness.py): bad values
from scripts and damaged strips are refused in words; deleted scenes, undo, cancel and
disabling the add-on never leave a job row waiting for ever."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import newest, run_bpy

pytestmark = pytest.mark.blender


def test_bad_days_end_in_words_or_finished_rows(addon_zips, backend_factory, tmp_path: Path) -> None:
    bpy_python = newest()
    backend = backend_factory("--fake-step-delay", "0.05")
    work = tmp_path / "work"
    work.mkdir()
    r = run_bpy(bpy_python, "robustness.py", {"zip": str(addon_zips[bpy_python.py_tag]), "address": backend.address,
                                              "key_file": str(backend.key_file), "workdir": str(work),
                                                  "backend_log": str(backend.log),
                                              "backend_pid": backend.proc.pid}, tmp_path)
    # 1. Scripts: every wrong keyword is an AnimateDiffError in words, raised before any job is
    #    made (no TypeError/KeyError, no hang on a number as the address, no job left on the GPU).
    for label, got in r["api"].items():
        assert got["result"].startswith("AnimateDiffError: "), (label, got)
        assert got["seconds"] < 5, (label, got)
    assert "address must be a ZeroMQ address" in r["api"]["address int"]["result"], r["api"]
    assert "outside Blender's frame range" in r["api"]["start beyond"]["result"], r["api"]
    assert r["api_strips"] == 0
    # 2. A damaged strip: Regenerate says so, adds no row; a refused stored value fails its row.
    for label in ("request str", "request list"):
        assert "stored AnimateDiff settings have no request" in r["regen"][label]["result"], r["regen"]
        assert r["regen"][label]["new_rows"] == 0, r["regen"]
    assert r["regen"]["frames abc"]["state"] == "failed", r["regen"]
    assert "$.frames" in r["regen"]["frames abc"]["message"], r["regen"]
    # 3. A start frame Blender cannot place is refused, not moved.
    assert "outside Blender's frame range" in r["start_beyond"]["result"] and r["start_beyond"]["new_rows"] == 0, r
    # 4. Scene deleted mid-job, brought back by undo: the row ends and the take lands.
    assert r["deleted_scene"] == {"scene_back": True, "state": "finished", "message": "on channel 2",
                                  "strip_frames_exist": True}, r["deleted_scene"]
    # 5. Undo back to "submitting": one row for the job, and it finishes.
    assert r["undo_to_submitting"] == [["finished", "on channel 8"]], r["undo_to_submitting"]
    # 6. Cancel while submitting to an absent backend: ends at once; the backend hears of it.
    assert r["cancel_submitting"]["state"] == "cancelled", r["cancel_submitting"]
    assert "told when it is back" in r["cancel_submitting"]["message"], r["cancel_submitting"]
    # At most the request in flight's timeout (2 s here); it was "submitting" for as long as
    # the backend stayed away.
    assert r["cancel_submitting"]["seconds"] < 5, r["cancel_submitting"]
    assert r["cancel_submitting_after"] == {"state": "cancelled", "owed": 0, "backend_cancels": 1}, r
    # 6b. Disabled and enabled again while that cancel is owed: the backend still hears of it.
    assert r["cancel_owed_over_disable"] == {"state": "cancelled", "backend_cancels": 1}, r
    # 7. Disable mid-submit: Blender is not held; re-enabled, the owed submit lands once.
    assert r["disable_ms"] < 500, r["disable_ms"]
    assert r["reenabled"] == {"state": "finished", "message": "on channel 12", "rows": 1, "strips": 1}, r["reenabled"]
    # 8. Late messages for ended rows: a cancelled row stays so, its late job is cancelled;
    #    a failed one takes its late job; a finished one takes no second take.
    assert r["late_messages"] == {"cancelled": ["cancelled", "d" * 32], "failed": ["running", "f" * 32],
                                  "finished": ["finished", "on channel 3"],
                                  "sent": [["CancelJob", "c" * 32]], "new_strips": 0}, r["late_messages"]
    # Blender 5.x warned about the job rows' "//animatediff" in a DIR_PATH property.
    assert 'does not support blend relative "//" prefix' not in r["_output"]
    assert "Traceback" not in r["_output"], r["_output"][-4000:]
