"""The add-on's bpy-free modules, in plain Python: atomic frame writing, weight mapping."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from .conftest import ROOT


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
    assert sorted(p.name for p in folder.iterdir()) == ["frame_0000.png", "frame_0001.png"]
    assert (folder / "frame_0000.png").read_bytes() == PNG
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


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

