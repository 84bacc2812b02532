"""backend/media.py: PNG round trip, animated GIF, MP4 and contact sheet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from animatediff_blender.backend import media


def _frames(n: int = 5, h: int = 24, w: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_png_round_trip_is_lossless() -> None:
    frame = _frames(1)[0]
    assert np.array_equal(media.decode_png(media.encode_png(frame)), frame)


def test_gif_has_every_frame_and_loops(tmp_path: Path) -> None:
    gif = media.write_gif(_frames(5), tmp_path / "a.gif", fps=10)
    with Image.open(gif) as im:
        assert im.n_frames == 5
        assert im.size == (40, 24)
        assert im.info.get("loop") == 0
        assert im.info.get("duration") == 100


def test_contact_sheet_lays_frames_out_in_a_grid(tmp_path: Path) -> None:
    frames = _frames(5)
    sheet = media.contact_sheet(frames, tmp_path / "s.png", gap=2)
    with Image.open(sheet) as im:
        assert im.size == (3 * 40 + 2 * 2, 2 * 24 + 2)  # 3 columns, 2 rows for 5 frames
        pixels = np.asarray(im.convert("RGB"))
    # frame 4 (index) sits in row 1, column 1
    assert np.array_equal(pixels[26 : 26 + 24, 42 : 42 + 40], frames[4])


def test_mp4_when_ffmpeg_is_available(tmp_path: Path) -> None:
    pytest.importorskip("imageio_ffmpeg")
    mp4 = media.write_mp4(_frames(8, 32, 32), tmp_path / "a.mp4", fps=8)
    assert mp4 is not None and mp4.stat().st_size > 0


def test_bad_frames_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        media.encode_png(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="no frames"):
        media.write_gif([], tmp_path / "x.gif")
