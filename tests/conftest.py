"""Shared fixtures.  Sub-folders add their own conftest.py for their concerns."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

# No GPU here or in CI: the project's Triton kernel (backend/engine/short_attention.py) runs
# in Triton's CPU interpreter, which `triton.jit` picks when Triton loads with this set.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the real user's config or data directories."""
    monkeypatch.setenv("ANIMATEDIFF_BLENDER_CONFIG", str(tmp_path / "config"))
    monkeypatch.setenv("ANIMATEDIFF_BLENDER_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline model zoo, built once per test session (deterministic, seconds)."""
    from animatediff_blender.backend.models.zoo import build_zoo

    cached = os.environ.get("ANIMATEDIFF_BLENDER_TEST_ZOO")
    dest = Path(cached) if cached else tmp_path_factory.mktemp("zoo")
    return build_zoo(dest)


@pytest.fixture
def held_first_hash(monkeypatch: pytest.MonkeyPatch) -> Callable[[], tuple[threading.Event, threading.Event]]:
    """Call it to hold the model registry's next file hash (a multi-GB checkpoint on a slow
    disk): it returns (`hashing`, set once that hash started; `release`, set by the test to let
    it go on).  Armed by the call, not by the fixture: scans before it (an engine's first) run."""
    from animatediff_blender.backend.models import registry

    def arm() -> tuple[threading.Event, threading.Event]:
        hashing, release = threading.Event(), threading.Event()
        real = registry.content_sha256

        def slow_first_hash(path: Path) -> str:
            if not hashing.is_set():
                hashing.set()
                release.wait(30)
            return real(path)

        monkeypatch.setattr(registry, "content_sha256", slow_first_hash)
        return hashing, release

    return arm
