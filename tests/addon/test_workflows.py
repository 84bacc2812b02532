"""The panel's everyday workflows in real Blender (the fake engine): undo of a take and of a
clear, a long queue of takes, camera moves in a new scene, a changed backend address."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import bpy_pythons, free_port, run_bpy

pytestmark = pytest.mark.blender


@pytest.mark.parametrize("bpy_python", bpy_pythons(), ids=lambda b: f"blender-{b.label}")
def test_everyday_workflows(bpy_python, addon_zips, backend_factory, tmp_path: Path) -> None:
    backend = backend_factory("--fake-step-delay", "0.01")
    work = tmp_path / "work"
    work.mkdir()
    r = run_bpy(bpy_python, "workflows.py", {"zip": str(addon_zips[bpy_python.py_tag]), "address": backend.address,
                                             "key_file": str(backend.key_file), "workdir": str(work),
                                             "dead_port": free_port()}, tmp_path)
    # Ctrl+Z of a take (Generate pressed, nothing else done meanwhile): its strip goes and its
    # row says so.  Generate made no undo step, so the row went with the take.
    assert r["undone_take"] == {"row": ["finished", "finished; its strip was undone"], "strips": []}, r
    # Ctrl+Z of Clear finished brings the rows back and undoes nothing before it (the frame
    # set before the clear went back with it).
    assert r["undone_clear"] == {"cleared": 0, "rows": 1, "frame": 9}, r
    # Ten takes queued: every one is listed with its cancel button, the running one included
    # (it was the 9th row from the end, out of sight, with its progress and its ✕).
    listed = r["listed"]
    assert listed["cancel_buttons"] == listed["queued"], listed
    # A queued take's place in the queue is shown once, on its state line (it was also its
    # message: "queued (position 2)" above "queued at position 2").
    positions = [x for x in listed["labels"] if x and "position" in x]
    assert positions and all(x.startswith("queued (position ") for x in positions), listed
    assert len(positions) == len(set(positions)), listed
    # Above them, the backend's queue: whose jobs run and wait (all ours here).
    assert "Backend queue: 1 running, 9 waiting, 1 client" in listed["labels"], listed
    lines = listed["labels"][listed["labels"].index("Backend queue: 1 running, 9 waiting, 1 client") + 1:][:9]
    assert lines[0].startswith("now  you  2 frames ") and lines[1].startswith("1.  you  2 frames "), lines
    assert lines[8] == "... and 2 more", lines
    # The running take shows its step preview; once it ended, its preview is released (they
    # piled up for the whole session), and the take running then keeps its own.
    previews = r["previews"]
    assert previews["first_running"], previews
    assert previews["second_running"] == {"first_kept": False, "second_loaded": True, "collection": 1}, previews
    assert previews["both_ended"] == {"keys": {}, "collection": 0}, previews
    # The panel says to press Match scene camera to list the camera moves: in a scene without
    # a camera it says why it read none, and lists them to be picked by hand.
    assert "the scene has no active camera" in r["match_no_camera"]["result"], r
    assert r["match_no_camera"]["rows"] == 8, r
    # A new backend address takes effect at once: the panel no longer says connected to the old.
    changed = r["address_changed"]
    assert not changed["connected"] and "cannot connect" in changed["message"], changed
