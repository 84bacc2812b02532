"""The batch entry point renders a 3-shot list headless into a .blend, and fails loudly."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import ROOT, free_port, newest, oldest, require, run_bpy

pytestmark = pytest.mark.blender

SHOTS = """
[defaults]
negative_prompt = "blurry"
frames = 6
width = 64
height = 64
steps = 4

[[shot]]
name = "opening"
prompt = "a quiet harbour at dawn"
channel = 2
start_frame = 1
seed = 1

[[shot]]
name = "push in"
prompt = "the lighthouse, closer"
motion_loras = { ZoomIn = 0.7 }
channel = 2
start_frame = 7
seed = 2

[[shot]]
name = "storm"
prompt = "waves crash on the rocks"
frames = 4
preset = "fast"
channel = 3
start_frame = 1
"""


def batch_command(bpy_python, tmp: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    """`python batch.py ARGS` in a Blender of its own (a fresh profile each run)."""
    require(bpy_python)
    env = dict(os.environ)
    env["BLENDER_USER_RESOURCES"] = str(tmp / f"batch-profile-{len(list(tmp.glob('batch-profile-*')))}")
    env["ANIMATEDIFF_BLENDER_CONFIG"] = str(tmp / "config")
    return [str(bpy_python.python), str(ROOT / "blender_addon" / "batch.py"), *args], env


def run_batch(bpy_python, tmp: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    cmd, env = batch_command(bpy_python, tmp, *args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp)


@pytest.mark.parametrize("which", ["oldest", "newest"])
def test_batch_renders_three_shots(which, addon_zips, backend_factory, tmp_path: Path) -> None:
    bpy_python = oldest() if which == "oldest" else newest()
    backend = backend_factory()
    shots = tmp_path / "shots.toml"
    shots.write_text(SHOTS)
    out_blend = tmp_path / "film" / "film.blend"
    out_blend.parent.mkdir()
    proc = run_batch(bpy_python, tmp_path, str(shots), "--addon-zip", str(addon_zips[bpy_python.py_tag]),
                     "--address", backend.address, "--key-file", str(backend.key_file),
                     "--out-blend", str(out_blend))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "batch: 3 shots, 3 ok, 0 failed" in proc.stdout
    assert "step " in proc.stdout  # progress printed
    assert "DeprecationWarning" not in proc.stderr, proc.stderr  # strip_start, not frame_start (gone in 6.0)
    r = run_bpy(bpy_python, "check_blend.py", {"zip": str(addon_zips[bpy_python.py_tag]), "blend": str(out_blend)},
                tmp_path)
    got = [(s["channel"], s["start"], s["duration"], s["files_exist"]) for s in r["strips"]]
    assert got == [(2, 1, 6, True), (2, 7, 6, True), (3, 1, 4, True)], got
    assert all(s["directory"].startswith("//animatediff/") for s in r["strips"])
    push_in = r["strips"][1]["settings"]
    assert push_in["camera_motions"] == {"ZoomIn": 0.7}
    assert push_in["request"]["motion_loras"] == [{"id": "lora:fake_ZoomIn", "weight": 0.7}]
    assert push_in["request"]["negative_prompt"] == "blurry"
    assert r["strips"][2]["settings"]["request"]["preset"] == "lightning"
    # The fake backend has no Lightning motion module: the shot still renders, with a warning.
    assert proc.stdout.count("warning: Fast (AnimateDiff-Lightning) needs its own motion module; "
                             "motion:fake-mm-v2 is not one") == 1, proc.stdout
    assert len(list((out_blend.parent / "animatediff").iterdir())) == 3


def test_batch_fails_loudly(addon_zips, tmp_path: Path) -> None:
    bpy_python = newest()
    zip_path = str(addon_zips[bpy_python.py_tag])
    shots = tmp_path / "shots.json"
    dead, dead2 = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    # Per-shot keys are the API's keywords: a shot may name its own backend.
    shots.write_text(json.dumps({"shots": [{"prompt": "a"}, {"prompt": "b", "frames": 2, "address": dead2}]}))
    key = tmp_path / "k.key"
    key.write_bytes(b"k" * 64)
    key.chmod(0o600)
    proc = run_batch(bpy_python, tmp_path, str(shots), "--addon-zip", zip_path, "--address", dead,
                     "--key-file", str(key), "--out-blend", str(tmp_path / "o.blend"), "--timeout", "30",
                     timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.count("FAILED: cannot connect to the backend") == 2
    assert f"[2/2] shot 2: FAILED: cannot connect to the backend at {dead2}" in proc.stdout
    assert "0 ok, 2 failed" in proc.stdout
    # A bad shot list is refused before anything is rendered.
    bad = tmp_path / "bad.toml"
    bad.write_text('[[shot]]\nprompt = "x"\nfps = 3\n')
    proc = run_batch(bpy_python, tmp_path, str(bad), "--addon-zip", zip_path, "--address", dead, timeout=120)
    assert proc.returncode == 2 and "unknown setting(s): fps" in proc.stderr


def test_batch_goes_on_when_a_shot_cannot_be_stored(addon_zips, backend_factory, tmp_path: Path) -> None:
    """Frames that cannot be written (here `animatediff` next to the .blend is a file) fail
    that shot with the reason; the batch renders the rest and reports, instead of dying
    with a traceback after the first render.  A channel above 128 is refused up front."""
    bpy_python = newest()
    zip_path = str(addon_zips[bpy_python.py_tag])
    backend = backend_factory()
    shots = tmp_path / "shots.toml"
    shots.write_text('[defaults]\nframes = 2\nwidth = 64\nheight = 64\nsteps = 2\n\n'
                     '[[shot]]\nprompt = "a"\n\n[[shot]]\nprompt = "b"\n')
    out_blend = tmp_path / "film" / "film.blend"
    out_blend.parent.mkdir()
    (out_blend.parent / "animatediff").write_text("not a folder")
    proc = run_batch(bpy_python, tmp_path, str(shots), "--addon-zip", zip_path, "--address", backend.address,
                     "--key-file", str(backend.key_file), "--out-blend", str(out_blend))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.count("FAILED: job ") == 2 and "could not store the frames" in proc.stdout, proc.stdout
    assert "batch: 2 shots, 0 ok, 2 failed" in proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr

    high = tmp_path / "high.toml"
    high.write_text('[[shot]]\nprompt = "x"\nchannel = 200\n')
    proc = run_batch(bpy_python, tmp_path, str(high), "--addon-zip", zip_path, "--address", backend.address,
                     "--key-file", str(backend.key_file), "--out-blend", str(tmp_path / "high.blend"))
    assert proc.returncode == 2 and "channel 200 is above" in proc.stderr, proc.stdout + proc.stderr


@pytest.mark.parametrize("which", ["oldest", "newest"])
def test_batch_refuses_bad_values_and_paths_before_rendering(which, addon_zips, tmp_path: Path) -> None:
    """A value the backend would refuse (a typo in a preset, a size above the limit) is an
    error of the shot list, found before the first shot renders -- not after hours of
    rendering the shots before it.  An --out-blend that cannot be saved is a bad argument
    (exit 2, in words), not a traceback."""
    bpy_python = oldest() if which == "oldest" else newest()
    zip_path = str(addon_zips[bpy_python.py_tag])
    dead = f"tcp://127.0.0.1:{free_port()}"
    for bad_value, words in (('preset = "fats"', "Invalid enum value 'fats'"), ("width = 9000", "<= 8192"),
                             ("frames = 0", ">= 1"), ("steps = 0", ">= 1")):
        shots = tmp_path / "shots.toml"
        shots.write_text(f'[[shot]]\nprompt = "a"\n\n[[shot]]\nname = "typo"\nprompt = "b"\n{bad_value}\n')
        proc = run_batch(bpy_python, tmp_path, str(shots), "--addon-zip", zip_path, "--address", dead,
                         "--out-blend", str(tmp_path / "o.blend"), timeout=120)
        assert proc.returncode == 2, (bad_value, proc.stdout + proc.stderr)
        assert "batch: error: typo: invalid settings:" in proc.stderr and words in proc.stderr, proc.stderr
        assert "[1/2]" not in proc.stdout, proc.stdout  # nothing was rendered
    shots.write_text('[[shot]]\nprompt = "a"\n')
    missing = tmp_path / "no-such-folder" / "o.blend"
    proc = run_batch(bpy_python, tmp_path, str(shots), "--addon-zip", zip_path, "--address", dead,
                     "--out-blend", str(missing), timeout=120)
    assert proc.returncode == 2 and f"batch: error: cannot save {missing}" in proc.stderr, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    # Run twice without --blend: the second run would save a fresh scene over the first
    # run's shots.blend (the default --out-blend), dropping its strips.
    earlier = tmp_path / "shots.blend"
    earlier.write_bytes(b"the first run's strips")
    proc = run_batch(bpy_python, tmp_path, str(shots), "--addon-zip", zip_path, "--address", dead, timeout=120)
    assert proc.returncode == 2 and f"batch: error: {earlier} exists" in proc.stderr, proc.stdout + proc.stderr
    assert earlier.read_bytes() == b"the first run's strips"


def test_batch_refuses_wrong_types_before_rendering(addon_zips, tmp_path: Path) -> None:
    """Shot values of the wrong type or range are errors of the shot list, in words, before
    the first shot renders: `address = 5557` (a port typed as the address) used to hang the
    batch for ever, a LoRA list entry without an id ended in a KeyError traceback, and a
    camera motion's weight outside the protocol's range failed its shot only after the shots
    before it had rendered."""
    bpy_python = newest()
    zip_path = str(addon_zips[bpy_python.py_tag])
    dead = f"tcp://127.0.0.1:{free_port()}"
    key = tmp_path / "k.key"
    key.write_bytes(b"k" * 64)
    key.chmod(0o600)
    for bad_value, words in (("address = 5557", "address must be a ZeroMQ address"),
                             ("motion_loras = [{ weight = 1.0 }]", "motion_loras must be"),
                             ("motion_loras = { ZoomIn = 50 }", "<= 10.0"),
                             ("key_file = 5", "key_file must be a file path")):
        shots = tmp_path / "shots.toml"
        shots.write_text(f'[[shot]]\nprompt = "a"\n\n[[shot]]\nname = "typo"\nprompt = "b"\n{bad_value}\n')
        proc = run_batch(bpy_python, tmp_path, str(shots), "--addon-zip", zip_path, "--address", dead,
                         "--key-file", str(key), "--out-blend", str(tmp_path / "o.blend"), "--overwrite",
                         timeout=60)
        assert proc.returncode == 2, (bad_value, proc.stdout + proc.stderr)
        assert "batch: error: typo: " in proc.stderr and words in proc.stderr, (bad_value, proc.stderr)
        assert "[1/2]" not in proc.stdout and "Traceback" not in proc.stderr, (bad_value, proc.stdout + proc.stderr)


def test_batch_goes_on_when_the_blend_cannot_be_saved(addon_zips, backend_factory, tmp_path: Path) -> None:
    """The .blend cannot be saved after a shot (a full disk, a quota; here Blender's temporary
    `film.blend@` is made a folder once the first shot has landed): the batch says so and
    renders the remaining shots, instead of dying with a traceback after the first one; the
    run fails (exit 1) and says where the frames are."""
    bpy_python = newest()
    require(bpy_python)
    backend = backend_factory("--fake-step-delay", "0.1")
    shots = tmp_path / "shots.toml"
    shots.write_text('[defaults]\nframes = 2\nwidth = 64\nheight = 64\nsteps = 4\n\n'
                     '[[shot]]\nprompt = "a"\nstart_frame = 1\n\n[[shot]]\nprompt = "b"\nstart_frame = 3\n\n'
                     '[[shot]]\nprompt = "c"\nstart_frame = 5\n')
    out_blend = tmp_path / "film" / "film.blend"
    out_blend.parent.mkdir()
    env = dict(os.environ)
    env["BLENDER_USER_RESOURCES"] = str(tmp_path / "batch-profile")
    env["ANIMATEDIFF_BLENDER_CONFIG"] = str(tmp_path / "config")
    cmd = [str(bpy_python.python), str(ROOT / "blender_addon" / "batch.py"), str(shots), "--addon-zip",
           str(addon_zips[bpy_python.py_tag]), "--address", backend.address, "--key-file", str(backend.key_file),
           "--out-blend", str(out_blend)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("[1/3]") and ": strip " in line:
                _block_saves(out_blend.parent / "film.blend@")  # every later save of film.blend fails
        stderr = proc.stderr.read() if proc.stderr else ""
        proc.wait(240)
    finally:
        if proc.poll() is None:
            proc.kill()
    stdout = "".join(lines)
    assert "Traceback" not in stderr, stderr
    assert proc.returncode == 1, stdout + stderr
    assert stdout.count(f"could not save {out_blend}") >= 2, stdout
    assert "[3/3] shot 3: strip " in stdout, stdout  # the shots after the failed save rendered
    assert "batch: 3 shots, 3 ok, 0 failed; NOT saved" in stdout and str(out_blend.parent / "animatediff") in stdout
    assert len(list((out_blend.parent / "animatediff").iterdir())) == 3



def _block_saves(temp_blend: Path) -> None:
    """Make Blender's temporary save file a folder.  The save after the shot that was just
    printed may be writing it this moment: wait for Blender to rename it away, then take it."""
    deadline = time.monotonic() + 30
    while True:
        try:
            temp_blend.mkdir()
            return
        except FileExistsError:
            if temp_blend.is_dir() or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _one_shot(tmp_path: Path) -> Path:
    shots = tmp_path / "shots.toml"
    shots.write_text('[[shot]]\nprompt = "a"\n')
    return shots


def test_batch_refuses_a_bad_timeout_up_front(addon_zips, tmp_path: Path) -> None:
    """A --timeout that is not a number of seconds above 0 is a bad argument: exit 2 before
    anything is saved (it used to fail every shot, exit 1, and leave a shots.blend that
    refused the corrected run)."""
    bpy_python = oldest()
    zip_path = str(addon_zips[bpy_python.py_tag])
    dead = f"tcp://127.0.0.1:{free_port()}"
    shots = _one_shot(tmp_path)
    out = tmp_path / "shots.blend"
    for value in ("0", "-5", "inf", "nan"):
        proc = run_batch(bpy_python, tmp_path, str(shots), "--addon-zip", zip_path, "--address", dead,
                         f"--timeout={value}", timeout=120)
        assert proc.returncode == 2, (value, proc.stdout + proc.stderr)
        assert f"batch: error: --timeout must be a number of seconds above 0, not {value}" in proc.stderr, proc.stderr
        assert "[1/1]" not in proc.stdout and not out.exists(), proc.stdout


def test_batch_refuses_a_missing_or_unreadable_blend(addon_zips, tmp_path: Path) -> None:
    """A --blend (or --addon-zip) that does not exist, or that Blender cannot open, is a bad
    argument: exit 2, in words (it used to exit 1 with a traceback)."""
    bpy_python = oldest()
    zip_path = str(addon_zips[bpy_python.py_tag])
    dead = f"tcp://127.0.0.1:{free_port()}"
    shots = _one_shot(tmp_path)
    out = tmp_path / "shots.blend"
    garbage = tmp_path / "garbage.blend"
    garbage.write_bytes(b"not a blend file")
    for args, words in ((["--blend", "nope.blend"], "batch: error: --blend nope.blend: no such file"),
                        (["--blend", str(tmp_path)], f"batch: error: --blend {tmp_path}: not a file"),
                        (["--blend", str(garbage)], f"batch: error: cannot open {garbage}: "),
                        (["--addon-zip", "nope.zip"], "batch: error: --addon-zip nope.zip: no such file")):
        proc = run_batch(bpy_python, tmp_path, str(shots), "--addon-zip", zip_path, "--address", dead, *args,
                         timeout=120)
        assert proc.returncode == 2 and words in proc.stderr, (args, proc.stdout + proc.stderr)
        assert "Traceback" not in proc.stderr and not out.exists(), proc.stderr


def test_batch_renders_into_the_sequencers_scene(addon_zips, backend_factory, tmp_path: Path) -> None:
    """Blender 5's Video Sequencer edits a scene of its own (the workspace's sequencer scene),
    often not the window's: the batch renders with that scene's settings (frame count, render
    size, current frame) and puts the strips there, as the panel does -- it used the window's
    scene, a 3D shot the edit never shows.  An --address pasted with spaces is stripped."""
    bpy_python = newest()
    blend = tmp_path / "film.blend"
    made = run_bpy(bpy_python, "batch_sequencer_scene.py", {"mode": "make", "blend": str(blend)}, tmp_path)
    assert (made["window"], made["sequencer"]) == ("Shot3D", "Edit"), made  # the case under test
    backend = backend_factory()
    shots = tmp_path / "shots.toml"
    shots.write_text('[[shot]]\nname = "edit"\nprompt = "a fox"\nsteps = 2\n')
    proc = run_batch(bpy_python, tmp_path, str(shots), "--blend", str(blend), "--addon-zip",
                     str(addon_zips[bpy_python.py_tag]), "--address", f"  {backend.address} ",
                     "--key-file", str(backend.key_file))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "on channel 2 at frame 30, 6 frames" in proc.stdout, proc.stdout  # the Edit scene's frame and length
    r = run_bpy(bpy_python, "batch_sequencer_scene.py", {"mode": "look", "blend": str(blend)}, tmp_path)
    assert r["strips"]["Shot3D"] == [], r["strips"]
    assert r["strips"]["Edit"] == [{"channel": 2, "start": 30, "duration": 6, "size": [64, 48], "prompt": "a fox"}], r


@pytest.mark.parametrize("which", ["oldest", "newest"])
def test_batch_refuses_bad_shots_in_words(which, addon_zips, tmp_path: Path) -> None:
    """Shot values no size or channel can be, and keys that are arguments of the API's calls,
    are errors of the shot list (exit 2, `batch: error: <shot>: ...`, nothing saved): they
    ended in tracebacks (OverflowError for `width = inf`, TypeError for `scene = ...`), or
    were clamped without a word (channel 0 became 1, start frame 12.9 became 12).  A
    400-digit number is not printed in full.  All in one Blender: batch.run() per case."""
    bpy_python = oldest() if which == "oldest" else newest()
    (tmp_path / "server.key").write_text("not needed: refused before it is read\n")
    huge = "1" + "0" * 400
    cases = {
        "inf": ("width = inf", "width must be a finite number of pixels, not inf"),
        "neg_inf": ("height = -inf", "height must be a finite number of pixels, not -inf"),
        "nan": ("width = nan", "width must be a finite number of pixels, not nan"),
        "huge_width": (f"width = {huge}", "<= 8192 - at `$.width`"),
        "negative_width": ("width = -512", "width -512 is below the smallest size (8 pixels)"),
        "huge_channel": (f"channel = {huge}", "channel 100000000000...(401 digits) is above"),
        "huge_address": (f"address = {huge}", "address must be a ZeroMQ address"),
        "channel_0": ("channel = 0", "channel 0 is below the sequencer's first channel (1)"),
        "channel_frac": ("channel = 2.7", "channel must be a whole number, not 2.7"),
        "start_frac": ("start_frame = 12.9", "start_frame must be a whole number, not 12.9"),
        "frames_frac": ("frames = 2.5", "frames must be a whole number, not 2.5"),
        "scene": ('scene = "Scene"', "unknown setting(s): scene"),
        "timeout": ("timeout = 30\non_event = 1", "unknown setting(s): on_event, timeout (the time limit"),
        "shot_key_file": ('key_file = "nope.key"', "key_file nope.key: no such file"),
        "lone_curve_key": ('server_public_key_file = "server.key"', "CurveZMQ needs both"),
    }
    out_blend = tmp_path / "o.blend"
    r = run_bpy(bpy_python, "batch_refusals.py", {
        "zip": str(addon_zips[bpy_python.py_tag]), "batch": str(ROOT / "blender_addon" / "batch.py"),
        "workdir": str(tmp_path), "args": ["--address", f"tcp://127.0.0.1:{free_port()}", "--out-blend", str(out_blend)],
        "cases": {name: f'[[shot]]\nprompt = "a"\n\n[[shot]]\nname = "bad"\nprompt = "b"\n{line}\n'
                  for name, (line, _words) in cases.items()},
    }, tmp_path)
    for name, (_line, words) in cases.items():
        got = r["cases"][name]
        assert got["code"] == 2, (name, got)
        assert got["stderr"].startswith("batch: error: bad: ") and words in got["stderr"], (name, got)
        assert len(got["stderr"]) < 400, (name, got)  # no 400-digit number in full
    assert not out_blend.exists()


def test_batch_refuses_missing_key_files_before_saving(tmp_path: Path) -> None:
    """A --key-file that is not there, or one CurveZMQ certificate without the other, is a
    bad argument: exit 2 before anything is saved.  It used to fail every shot at connect,
    after a <shots>.blend was saved that then refused the corrected run."""
    bpy_python = newest()
    shots = _one_shot(tmp_path)
    cert = tmp_path / "server.key"
    cert.write_text("x")
    for args, words in ((["--key-file", "nope.key"], "batch: error: --key-file nope.key: no such file"),
                        (["--key-file", str(tmp_path)], f"batch: error: --key-file {tmp_path}: not a file"),
                        (["--server-public-key", str(cert)], "batch: error: CurveZMQ needs both"),
                        (["--client-secret-key", "nope.key_secret"], "--client-secret-key nope.key_secret: no such")):
        proc = run_batch(bpy_python, tmp_path, str(shots), *args, timeout=60)
        assert proc.returncode == 2 and words in proc.stderr, (args, proc.stdout + proc.stderr)
        assert not (tmp_path / "shots.blend").exists()


def test_batch_says_why_an_addon_zip_does_not_install(addon_zips, tmp_path: Path) -> None:
    """An --addon-zip Blender does not install (made for another Blender and Python, or not a
    zip at all) is reported with Blender's reason -- it used to say the extension was not
    installed and to pass --addon-zip, the option that had just been passed."""
    bpy_python = newest()
    shots = _one_shot(tmp_path)
    other = addon_zips["py311" if bpy_python.py_tag == "py313" else "py313"]
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"not a zip")
    for zip_path, words in ((other, "Blender version"), (garbage, "not a zip file")):
        proc = run_batch(bpy_python, tmp_path, str(shots), "--addon-zip", str(zip_path),
                         "--address", f"tcp://127.0.0.1:{free_port()}", timeout=120)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert f"batch: error: installing {zip_path} failed: " in proc.stderr and words in proc.stderr, proc.stderr
        assert "not installed in this Blender profile" not in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "shots.blend").exists()


def test_ctrl_c_in_a_batch_cancels_the_shot_and_keeps_what_is_done(addon_zips, backend_factory, tmp_path: Path) -> None:
    """Ctrl+C used to end a batch with a KeyboardInterrupt traceback while the shot's job ran
    on for nobody on the shared GPU.  Now: the job is cancelled, the .blend keeps the shots
    done, one line says where it stopped, exit 130."""
    import signal
    import time

    bpy_python = newest()
    backend = backend_factory("--fake-step-delay", "0.2")
    shots = tmp_path / "shots.toml"
    shots.write_text('[defaults]\nwidth = 64\nheight = 64\nframes = 2\n\n'
                     '[[shot]]\nname = "quick"\nprompt = "a"\nsteps = 1\n\n'
                     '[[shot]]\nname = "long"\nprompt = "b"\nsteps = 100\n')
    out_blend = tmp_path / "film.blend"
    cmd, env = batch_command(bpy_python, tmp_path, str(shots), "--addon-zip", str(addon_zips[bpy_python.py_tag]),
                             "--address", backend.address, "--key-file", str(backend.key_file),
                             "--out-blend", str(out_blend))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    seen: list[str] = []
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen.append(line)
        if any("[2/2] long" in x for x in seen) and "step " in line:  # the long shot is running
            break
        if not line and proc.poll() is not None:
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    out = "".join(seen) + rest
    assert proc.returncode == 130, out
    assert "batch: interrupted at shot 2 of 2 (long); 1 ok before it; saved" in out, out
    assert "Traceback" not in out, out
    assert "cancelled on the backend" in out, out
    assert "event=cancel_requested" in backend.log.read_text()
    deadline = time.monotonic() + 10  # the engine stops at its next step
    while "event=cancelled" not in backend.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "event=cancelled" in backend.log.read_text(), backend.log.read_text()[-2000:]
    r = run_bpy(bpy_python, "check_blend.py", {"zip": str(addon_zips[bpy_python.py_tag]), "blend": str(out_blend)},
                tmp_path)
    assert len(r["strips"]) == 1  # the quick shot, kept


def test_batch_leaves_no_throwaway_profile_behind(addon_zips, tmp_path: Path) -> None:
    """`python batch.py --addon-zip` without a profile of its own makes one in the temp folder
    (~5 MB): it used to stay there after every run, and a farm runs thousands."""
    bpy_python = require(oldest())
    temp = tmp_path / "tmp"
    temp.mkdir()
    shots = tmp_path / "shots.toml"
    shots.write_text('[[shot]]\nprompt = "x"\nwidth = -5\n')  # refused once the extension is in
    env = {k: v for k, v in os.environ.items() if k != "BLENDER_USER_RESOURCES"}
    env.update(TMPDIR=str(temp), HOME=str(tmp_path / "home"), ANIMATEDIFF_BLENDER_CONFIG=str(tmp_path / "config"))
    proc = subprocess.run([str(bpy_python.python), str(ROOT / "blender_addon" / "batch.py"), str(shots),
                           "--addon-zip", str(addon_zips[bpy_python.py_tag]), "--address", "tcp://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "width -5 is below the smallest size" in proc.stderr, proc.stdout + proc.stderr
    assert "Installed" in proc.stdout  # (the profile was made and used)
    assert list(temp.iterdir()) == []


def test_batch_finds_the_extension_in_the_system_repository(addon_zips, tmp_path: Path) -> None:
    """A TD deploys the extension once to the shared *system* repository
    (BLENDER_SYSTEM_EXTENSIONS) and the farm runs the batch script from that copy: it looked
    only in user_default ("not installed in this Blender profile") unless given --repo."""
    bpy_python = require(oldest())
    site = next(bpy_python.python.parent.parent.glob("lib/python3*/site-packages/bpy"))
    tool = next(site.glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
    system = tmp_path / "system_ext"
    (system / "system").mkdir(parents=True)
    versions = subprocess.run([str(bpy_python.python), "-c", "import sys, bpy; print(bpy.app.version_string.split()[0], "
                               "'%d.%d.%d' % sys.version_info[:3])"], capture_output=True, text=True, timeout=120)  # fmt: skip
    blender_version, python_version = versions.stdout.split()[-2:]
    subprocess.run([str(bpy_python.python), str(tool), "install-files", "--local-dir", str(system / "system"),
                    "--blender-version", blender_version, "--python-version", python_version,
                    str(addon_zips[bpy_python.py_tag])], check=True, capture_output=True, timeout=120)  # fmt: skip
    installed_batch = system / "system" / "animatediff_blender" / "batch.py"
    shots = tmp_path / "shots.toml"
    shots.write_text('[[shot]]\nprompt = "x"\nwidth = -5\n')  # refused once the extension is found
    env = dict(os.environ, BLENDER_SYSTEM_EXTENSIONS=str(system), BLENDER_USER_RESOURCES=str(tmp_path / "artist"),
               HOME=str(tmp_path / "home"), ANIMATEDIFF_BLENDER_CONFIG=str(tmp_path / "config"))  # fmt: skip
    proc = subprocess.run([str(bpy_python.python), str(installed_batch), str(shots), "--address", "tcp://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "width -5 is below the smallest size" in proc.stderr, proc.stdout + proc.stderr
    # A repository that does not have it is said, with the option to name another.
    proc = subprocess.run([str(bpy_python.python), str(installed_batch), str(shots), "--repo", "user_default",
                           "--address", "tcp://127.0.0.1:9"], capture_output=True, text=True, timeout=180, env=env,
                          cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "looked for bl_ext.user_default.animatediff_blender" in proc.stderr
    assert "--repo NAME" in proc.stderr
