"""`bench-server` (backend/bench/overhead.py): the server's CPU-side cost measured around
an engine stand-in that takes a device's time.  Small frames here: the numbers are
meaningless, the plumbing is what is tested."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from animatediff_blender.backend.bench.overhead import PacedEngine
from animatediff_blender.backend.cli import main
from animatediff_blender.backend.png import deflate_backend
from animatediff_blender.protocol.messages import GenerateRequest

pytestmark = pytest.mark.timeout(120)


def test_paced_engine_takes_its_time_and_hands_frames_over_in_chunks() -> None:
    engine = PacedEngine(denoise_s=0.06, decode_s=0.04, decode_chunk=4)
    request = GenerateRequest(prompt="p", frames=6, width=32, height=32, steps=3, seed=2)
    engine.prepare(request)
    handed: list[tuple[int, int]] = []
    steps: list[int] = []
    t0 = time.perf_counter()
    result = engine.generate(
        request, lambda p: steps.append(p.step), lambda: False, lambda s, f: handed.append((s, len(f)))
    )
    elapsed = time.perf_counter() - t0
    assert handed == [(0, 4), (4, 2)] and steps == [1, 2, 3]
    assert elapsed >= 0.1 and result.timings["denoise"] >= 0.06 and result.timings["decode"] >= 0.04
    assert len(result.frames) == 6 and result.frames[0].shape == (32, 32, 3)


def test_bench_server_reports_what_the_server_adds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "overhead.json"
    code = main(
        ["bench-server", "--frames", "4", "--size", "64", "--denoise-s", "0.05", "--decode-s", "0.02",
         "--repeats", "2", "--png-compress-level", "1", "--png-compress-level", "6", "--json", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    rows = json.loads(out.read_text())
    assert [r["png_compress_level"] for r in rows] == [1, 6]
    for row in rows:
        assert row["frames"] == 4 and len(row["runs_s"]) == 2
        assert row["engine_s"] >= 0.07  # the stand-in's own time
        assert row["end_to_end_s"] > row["engine_s"]  # the server and the client cost something
        assert row["overhead_s"] == pytest.approx(row["end_to_end_s"] - row["engine_s"])
        assert 0 < row["overhead_share"] < 1
        # The split: both parts happen, and together they are the overhead (the engine's
        # own time lies between them).
        assert 0 < row["before_engine_s"] < row["overhead_s"]
        assert 0 < row["after_engine_s"] < row["overhead_s"]
        assert row["before_engine_s"] + row["after_engine_s"] == pytest.approx(row["overhead_s"], abs=0.02)
        assert row["payload_bytes"] > 4 * 64 * 64  # four 64x64 PNGs of a noisy gradient
        assert row["png_deflate"] == deflate_backend()
    assert "server + client add" in printed and "after it returns" in printed
    assert f"PNG deflate: {deflate_backend()}" in printed


def test_bench_server_refuses_bad_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench-server", "--size", "30"]) == 2
    assert "multiple of 8" in capsys.readouterr().err
