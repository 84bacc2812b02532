"""Checks and PNG encoding of engine output (numpy HxWx3 uint8 RGB -> PNG bytes); the
encoder itself is `backend.media.encode_png`."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ..media import encode_png

__all__ = ["check_frame", "encode_png", "encode_preview"]


def check_frame(frame: np.ndarray, width: int, height: int) -> None:
    """An engine must return HxWx3 uint8 RGB at the requested size."""
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.shape != (height, width, 3):
        shape = getattr(frame, "shape", None)
        dtype = getattr(frame, "dtype", type(frame).__name__)
        raise ValueError(
            f"engine returned a frame of shape {shape} and type {dtype}, expected ({height}, {width}, 3) uint8"
        )


def encode_preview(frame: np.ndarray, max_px: int) -> bytes:
    """A small PNG: previews ride along every few steps and must stay cheap."""
    image = Image.fromarray(np.ascontiguousarray(frame[..., :3]))
    if max(image.size) > max_px:
        image.thumbnail((max_px, max_px))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
