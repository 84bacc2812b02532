"""backend/png.py: the frame PNG writer, read back by Pillow and checked chunk by chunk."""

from __future__ import annotations

import io
import struct
import zlib
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from animatediff_blender.backend import png

try:
    from isal import isal_zlib
except ImportError:  # pragma: no cover - isal is a backend dependency
    isal_zlib = None

DEFLATES = [pytest.param(zlib, id="zlib")] + (
    [pytest.param(isal_zlib, id="isal")] if isal_zlib is not None else []
)


def _smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    image = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)
    return np.clip(image + rng.integers(-3, 4, image.shape), 0, 255).astype(np.uint8)


def _read(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im)


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of every chunk, each CRC checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, payload = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + payload), f"bad CRC on {kind!r}"
        chunks.append((kind, payload))
        pos += 12 + length
    return chunks


@pytest.mark.parametrize("deflate", DEFLATES)
@pytest.mark.parametrize("level", range(10))
def test_every_level_round_trips_losslessly(deflate: ModuleType, level: int) -> None:
    rng = np.random.default_rng(level)
    for frame in (rng.integers(0, 256, (17, 23, 3), dtype=np.uint8), _smooth(32, 48)):
        data = png.encode_rgb_png(frame, level, deflate=deflate)
        assert np.array_equal(_read(data), frame)


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 9, 3), (9, 1, 3), (3, 5, 3), (64, 40, 3)])
def test_odd_sizes_round_trip(shape: tuple[int, int, int]) -> None:
    frame = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    assert np.array_equal(_read(png.encode_rgb_png(frame)), frame)


def test_a_view_that_is_not_contiguous_is_encoded_as_it_looks() -> None:
    frame = _smooth(20, 30)[:, ::-1]
    assert not frame.flags.c_contiguous
    assert np.array_equal(_read(png.encode_rgb_png(frame)), frame)


def test_layout_is_signature_ihdr_idat_iend_with_valid_crcs() -> None:
    frame = _smooth(12, 34)
    chunks = _chunks(png.encode_rgb_png(frame))
    assert [kind for kind, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    assert struct.unpack(">IIBBBBB", chunks[0][1]) == (34, 12, 8, 2, 0, 0, 0)
    raw = zlib.decompress(chunks[1][1])
    assert len(raw) == 12 * (1 + 34 * 3)
    assert chunks[2][1] == b""


def test_level_zero_stores_and_higher_levels_compress() -> None:
    frame = _smooth(64, 64)
    stored = png.encode_rgb_png(frame, 0)
    assert len(stored) > frame.nbytes  # stored blocks: every byte plus the filter bytes
    assert len(png.encode_rgb_png(frame, 1)) < 0.8 * len(stored)


def test_smooth_frames_come_out_no_larger_than_pillows() -> None:
    frame = _smooth(256, 256)
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG", compress_level=1)
    assert len(png.encode_rgb_png(frame, 1)) <= 1.05 * len(buf.getvalue())


@pytest.mark.parametrize(
    "frame",
    [
        np.zeros((4, 4), np.uint8),
        np.zeros((4, 4, 4), np.uint8),
        np.zeros((4, 4, 3), np.float32),
        np.zeros((0, 4, 3), np.uint8),
        [[0, 0, 0]],
    ],
    ids=["2d", "rgba", "float", "empty", "list"],
)
def test_bad_frames_are_refused(frame: object) -> None:
    with pytest.raises(ValueError, match="uint8 frame|pixels per side"):
        png.encode_rgb_png(frame)  # type: ignore[arg-type]


@pytest.mark.parametrize("level", [-1, 10])
def test_levels_outside_zero_to_nine_are_refused(level: int) -> None:
    with pytest.raises(ValueError, match="0-9"):
        png.encode_rgb_png(_smooth(4, 4), level)


def test_the_backend_deflates_with_isal_when_it_is_installed() -> None:
    assert png.deflate_backend() == ("isal" if isal_zlib is not None else "zlib")
