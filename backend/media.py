"""Image and video files on the backend side: PNG encoding, animated previews and
contact sheets.  Frames are written by `backend.png` (the server's hot path), the rest by
Pillow and imageio (ffmpeg for MP4 when imageio-ffmpeg is installed)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .png import encode_rgb_png


def encode_png(frame: np.ndarray, compress_level: int = 1) -> bytes:
    """HxWx3 uint8 RGB -> PNG bytes (lossless at every level; 1 is the fastest that compresses).
    `backend.png`'s writer: ~20x faster than Pillow's for the same size."""
    return encode_rgb_png(frame, compress_level)


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def write_gif(frames: Sequence[np.ndarray], path: Path, fps: float = 8.0) -> Path:
    images = [Image.fromarray(_as_rgb8(f)) for f in frames]
    if not images:
        raise ValueError("no frames to write")
    images[0].save(
        path, save_all=True, append_images=images[1:], duration=int(round(1000 / fps)), loop=0, optimize=False
    )
    return path


def write_mp4(frames: Sequence[np.ndarray], path: Path, fps: float = 8.0) -> Path | None:
    """MP4 (H.264) through imageio-ffmpeg; None when ffmpeg is not available."""
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (presence check: ships its own ffmpeg binary)
    except ImportError:
        return None
    # yuv420p plays everywhere (browsers, QuickTime); macro_block_size=1 keeps the size as is.
    imageio.mimwrite(
        path,
        [_even_size(_as_rgb8(f)) for f in frames],
        fps=fps,
        codec="libx264",
        macro_block_size=1,
        pixelformat="yuv420p",
    )
    return path


def contact_sheet(frames: Sequence[np.ndarray], path: Path, columns: int | None = None, gap: int = 2) -> Path:
    """All frames in a grid on one PNG, in order, left to right then top to bottom."""
    if not frames:
        raise ValueError("no frames to lay out")
    h, w = frames[0].shape[:2]
    cols = columns or math.ceil(math.sqrt(len(frames)))
    rows = math.ceil(len(frames) / cols)
    sheet = Image.new("RGB", (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), (24, 24, 24))
    for i, frame in enumerate(frames):
        r, c = divmod(i, cols)
        sheet.paste(Image.fromarray(_as_rgb8(frame)), (c * (w + gap), r * (h + gap)))
    sheet.save(path, format="PNG")
    return path


def _as_rgb8(frame: np.ndarray) -> np.ndarray:
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 frame, got {frame.dtype} {frame.shape}")
    return frame


def _even_size(frame: np.ndarray) -> np.ndarray:
    # H.264 with yuv420p needs even sides.
    h, w = frame.shape[:2]
    return frame[: h - h % 2, : w - w % 2]
