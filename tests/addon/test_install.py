"""The built zip installs into real Blender (4.2 LTS and the newest 5.x), registers,
imports its bundled wheels, gives the expected camera-motion weights, and disables cleanly."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from .conftest import bpy_pythons, run_bpy

pytestmark = pytest.mark.blender

ZERO = {"ZoomIn", "ZoomOut", "PanLeft", "PanRight", "TiltUp", "TiltDown", "RollingClockwise",
        "RollingAnticlockwise"}


def only(weights: dict[str, float], **expected: float) -> None:
    for name in ZERO:
        assert weights[name] == pytest.approx(expected.get(name, 0.0), abs=0.02), (name, weights)


@pytest.mark.parametrize("bpy_python", bpy_pythons(), ids=lambda b: f"blender-{b.label}")
def test_install_register_camera_unregister(bpy_python, addon_zips, tmp_path: Path) -> None:
    zip_path = addon_zips[bpy_python.py_tag]
    r = run_bpy(bpy_python, "install_check.py", {"zip": str(zip_path)}, tmp_path)
    assert r["module"] == "bl_ext.user_default.animatediff_blender"
    got, expected = r["key_file_from_relative"]
    assert os.path.normpath(got) == os.path.normpath(expected), r["key_file_from_relative"]
    # The wheels came from the extension's own site-packages, not from anywhere else.
    assert "extensions" in r["zmq_file"] and str(tmp_path) in r["zmq_file"]
    assert r["zmq"] == "27.3.0" and r["msgspec"] == "0.22.0" and r["zmq_has_curve"]
    # Defaults: 16 frames, the render size x percentage rounded to 8 (scaled down to SD1.5's
    # 512x512 pixels when larger, keeping the aspect), the current frame.
    plan = r["plan"]
    assert plan["request"]["frames"] == 16
    assert (plan["request"]["width"], plan["request"]["height"]) == (480, 272)
    assert r["full_hd_scene_length"] == [680, 384, 24]
    assert plan["start_frame"] == 7 and plan["channel"] == 2
    assert plan["request"]["base_model"] is None and plan["request"]["motion_module"] is None
    assert plan["request"]["domain_adapter"] is None  # none unless picked (LCM adds its own)
    assert r["adapter_plan"] == ["adapter:watercolor.safetensors", 0.7]
    assert r["adapter_list"] == ["adapter:watercolor.safetensors"]
    assert "empty" in r["empty_prompt_error"]
    assert r["override"] == {"camera": {"ZoomIn": 0.5}, "loras": [{"id": "lora:custom.safetensors", "weight": 0.3}],
                             "preset": "lightning"}
    cam = r["camera"]
    only(cam["pan_left_15deg"]["weights"], PanLeft=0.5)  # 15 deg of 30
    only(cam["pan_right_truck"]["weights"], PanRight=1.0)  # 3 m sideways, clamped
    only(cam["dolly_in_1m"]["weights"], ZoomIn=0.5)  # 1 m of 2
    only(cam["dolly_out_5m"]["weights"], ZoomOut=1.0)
    only(cam["roll_cw_30"]["weights"], RollingClockwise=1.0)
    only(cam["tilt_up_9"]["weights"], TiltUp=0.3)
    only(cam["still"]["weights"])  # below the threshold: nothing
    combined = cam["combined"]["weights"]
    assert combined["ZoomIn"] == pytest.approx(0.8, abs=0.03)
    # Turning right 12 deg (0.4) while the straight path drifts left in camera space.
    assert 0.25 < combined["PanRight"] < 0.42
    assert r["applied"]["ZoomIn"][0] and r["applied"]["PanRight"][0] and not r["applied"]["PanLeft"][0]
    # Match scene camera reads the frames the clip covers: with Scene length, the whole
    # move (frames 1-17); with 9 Frames from frame 1, about half of it.
    whole, over_range = r["match_scene_length"]
    assert whole == over_range and whole["ZoomIn"] == pytest.approx(0.8, abs=0.03), whole
    part, over_nine = r["match_frames"]
    assert part == over_nine and part["ZoomIn"] == pytest.approx(0.4, abs=0.05), part
    for prop in ("prompt", "negative_prompt", "base_model", "motion_module", "domain_adapter",
                 "domain_adapter_scale", "preset", "seed", "channel",
                 "address", "key_file", "timeout_s"):
        assert prop in r["drawn_props"], prop
    assert {"animatediff.generate", "animatediff.regenerate", "animatediff.match_camera",
            "animatediff.test_connection", "animatediff.cancel"} <= set(r["drawn_ops"]), r["drawn_ops"]
    # Fast on a motion module not made for it: both panels say so under the preset.
    text = " ".join(r["drawn_labels"])
    assert ("Fast (AnimateDiff-Lightning) needs its own motion module; motion:v2 is not one" in text
            and text.count("needs its own") == 2 and "or use Quality" in text), r["drawn_labels"]  # both panels
    # Windows paths keep their backslashes (POSIX shell splitting ate them).
    assert r["backend_argv_windows"] == r"C:\Users\me\venv\Scripts\animatediff-blender.exe serve --bind tcp://127.0.0.1:5557"
    assert r["backend_argv_posix"] == ["/opt/my tools/animatediff-blender", "serve"]
    assert r["disabled"] is True


def test_zip_contents(addon_zips) -> None:
    for tag, path in addon_zips.items():
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            manifest = z.read("blender_manifest.toml").decode()
            init = z.read("__init__.py").decode()
        assert "__init__.py" in names and "protocol/client.py" in names and "protocol/wire.py" in names
        wheels = [n for n in names if n.endswith(".whl")]
        assert len(wheels) == 2, wheels
        assert not any(x in n.lower() for n in names for x in ("torch", "diffusers", "numpy", "__pycache__"))
        assert "bl_info" not in init
        if tag == "py311":
            assert 'blender_version_max = "5.1.0"' in manifest and all("cp311" in w for w in wheels)
        else:
            assert 'blender_version_min = "5.1.0"' in manifest
            assert all("cp313" in w or "abi3" in w for w in wheels)


def test_quitting_blender_leaves_no_preview_folder(addon_zips, tmp_path: Path) -> None:
    """One empty `animatediff_blender_previews_<pid>` folder was left in the temp folder per
    Blender session: Blender quits without unregistering add-ons."""
    bpy_python = bpy_pythons()[-1]
    temp = tmp_path / "temp"
    temp.mkdir()
    r = run_bpy(bpy_python, "quit_with_previews.py",
                {"zip": str(addon_zips[bpy_python.py_tag]), "address": "tcp://127.0.0.1:9"},
                tmp_path, extra_env={"TMPDIR": str(temp)})
    assert r["exists"] and Path(str(r["folder"])).parent == temp, r["folder"]
    assert not Path(str(r["folder"])).exists()


@pytest.mark.parametrize("before_quit", ["nothing", "disable"])
@pytest.mark.parametrize("bpy_python", bpy_pythons(), ids=lambda b: f"blender-{b.label}")
def test_a_cancel_owed_when_blender_quits_is_owed_by_the_next_session(
    bpy_python, addon_zips, tmp_path: Path, before_quit: str
) -> None:
    """Cancelled while the backend was away, then Blender quit (with the add-on enabled, or
    after disabling it): the next session tells the backend once it is back.  The cancel was
    lost with the process, and the job ran on, holding a shared GPU."""
    job_id = "c" * 32
    args = {"zip": str(addon_zips[bpy_python.py_tag]), "address": "tcp://127.0.0.1:9", "job_id": job_id,
            "out_root": str(tmp_path / "takes")}
    phase = "quit" if before_quit == "nothing" else "disable"
    quit_ = run_bpy(bpy_python, "quit_owing_cancels.py", {**args, "phase": phase}, tmp_path)
    assert quit_.get("worker_ended", True), "the disabled add-on's worker did not stop"
    folder = Path(str(quit_["folder"]))
    assert [p.name for p in folder.glob("owed_cancels_*.json")], "nothing kept at the quit"
    nxt = run_bpy(bpy_python, "quit_owing_cancels.py", {**args, "phase": "next"}, tmp_path)
    assert nxt["folder"] == quit_["folder"]  # the same profile's extension folder
    assert nxt["owed"] == [job_id] and nxt["files_left"] == [], nxt
