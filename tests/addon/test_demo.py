"""`make demo`, the README's first command: `animatediff-blender demo` end to end (tiny zoo,
extension zip, local backend, headless Blender, saved .blend, previews).  Nothing else runs
it, and it is the first thing a new user tries."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from .conftest import ROOT, SERVE, oldest, require


def test_the_demo_command_places_a_clip_and_writes_its_previews(tmp_path: Path) -> None:
    bpy_python = require(oldest())  # the demo's default: Blender 4.2 LTS (.venv-bpy42)
    out = tmp_path / "demo out"  # a space: every path the demo hands on must be quoted

    def demo() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SERVE[0], "demo", "--out", str(out), "--blender-python", str(bpy_python.python),
             "--frames", "8", "--size", "64", "--steps", "2"],
            cwd=ROOT, capture_output=True, text=True, timeout=420,
        )  # fmt: skip

    proc = demo()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "demo: done" in proc.stdout

    # The .blend, reopened by the demo itself, holds an 8-frame strip on channel 2 from frame 1.
    assert "on channel 2, frames 1-8 (8 frames)" in proc.stdout, proc.stdout[-2000:]
    assert (out / "demo.blend").is_file()
    takes = [p for p in (out / "animatediff").iterdir() if p.is_dir()]
    assert len(takes) == 1
    frames = sorted(takes[0].glob("*.png"))
    assert len(frames) == 8
    with Image.open(frames[0]) as im:
        assert im.size == (64, 64)
        first = np.asarray(im.convert("RGB"))
    assert first.std() > 0  # a picture, not a flat fill

    # The previews: an 8-frame GIF and a contact sheet of the frames.
    with Image.open(out / "preview.gif") as gif:
        assert gif.n_frames == 8 and gif.size == (64, 64)
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.format == "PNG" and sheet.width >= 64 and sheet.height >= 64

    # Run again into the same folder (the README calls `make demo` idempotent): it refused,
    # "demo.blend exists and is not the .blend being worked on", naming batch.py's flags.
    again = demo()
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "on channel 2, frames 1-8 (8 frames)" in again.stdout, again.stdout[-2000:]
