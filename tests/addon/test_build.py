"""build.py: reproducible zips (same sha256 twice), refused bad options."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT


def test_build_is_reproducible(addon_zips, tmp_path: Path) -> None:
    # The session fixture built once; build again elsewhere (offline: the cache has the wheels).
    proc = subprocess.run([sys.executable, str(ROOT / "build.py"), "--platform", "current", "--offline",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for path in addon_zips.values():
        again = tmp_path / path.name
        assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(path.read_bytes()).digest()


def test_build_rejects_unknown_platform(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "build.py"), "--platform", "amiga-68k", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "unknown platform" in proc.stderr
