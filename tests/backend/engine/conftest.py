"""Fixtures for the AnimateDiff engine tests (helpers live in engine_helpers.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from engine_helpers import never, no_progress, request, stock_pipeline


@pytest.fixture(scope="session")
def zoo(tiny_zoo: Path) -> Path:
    return tiny_zoo


@pytest.fixture(scope="session")
def make_engine(zoo: Path) -> Callable[..., Any]:
    from animatediff_blender.backend.engine.animatediff import AnimateDiffEngine

    def make(**kw: Any) -> Any:
        return AnimateDiffEngine(zoo, device="cpu", **kw)

    return make


@pytest.fixture(scope="session")
def engine(make_engine: Callable[..., Any]) -> Any:
    """One warm engine shared by the tests that do not count loads."""
    return make_engine()


@pytest.fixture(scope="session")
def stock(zoo: Path) -> Iterator[Any]:
    yield stock_pipeline(zoo)


@pytest.fixture
def generate(engine: Any) -> Callable[..., list[np.ndarray]]:
    def gen(**kw: Any) -> list[np.ndarray]:
        return list(engine.generate(request(**kw), no_progress, never).frames)

    return gen
