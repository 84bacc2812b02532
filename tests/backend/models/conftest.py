"""Fixtures for the model zoo, registry and loader tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def models_copy(tiny_zoo: Path, tmp_path: Path):
    """A function copying chosen zoo entries into a fresh, writable models directory."""

    def make(*rel_paths: str) -> Path:
        dest = tmp_path / "models"
        dest.mkdir(exist_ok=True)
        for rel in rel_paths:
            src = tiny_zoo / rel
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dest / rel)
            else:
                shutil.copy2(src, dest / rel)
        return dest

    return make
