"""What the server adds to a clip's end-to-end time on the CPU side, measurable without a GPU.

An engine stand-in (`PacedEngine`) holds "the device" for a given denoise time and decode
time -- sleeping, as the engine's thread does while it waits on a GPU, without the GIL --
and hands real-size frames over in decode chunks, as the real engine's VAE decode does.
Behind it run the real server (PNG encoding on the pool, fsync'd storage, atomic commit,
signing, sending) and a real client on the same machine (receiving, digest checks).  The
end-to-end time minus the stand-in's own time is what the server's CPU work did not hide
behind the device's (issue #6's target: at most 5 % of end to end).

The defaults are the engine's lightning clip measured on an H200 (16 frames 512x512,
4 steps: denoise 0.303 s, decode 0.265 s).  The frames are FakeEngine's (a gradient under
5-bit noise): they compress worse than generated images, so PNG encoding costs at least
as much as with real frames.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from animatediff_blender.backend.engine.fake import FakeEngine
from animatediff_blender.backend.engine.interface import (
    CancelCheck,
    FrameSink,
    GenerationResult,
    JobCancelled,
    ProgressCallback,
    StepProgress,
)
from animatediff_blender.protocol.messages import Finished, GenerateRequest

H200_LIGHTNING_DENOISE_S = 0.303
H200_LIGHTNING_DECODE_S = 0.265


class PacedEngine(FakeEngine):
    """FakeEngine's models and frames, the timing of a real device: `denoise_s` spread over
    the steps, then `decode_s` spread over the decode chunks, frames handed over per chunk.
    Frames are rendered before the clock starts (`prepare`): a GPU engine's frames cost the
    host nothing but the copy."""

    def __init__(self, denoise_s: float, decode_s: float, decode_chunk: int = 4) -> None:
        super().__init__()
        self.denoise_s = denoise_s
        self.decode_s = decode_s
        self.decode_chunk = decode_chunk
        self._rendered: dict[tuple[Any, ...], list[np.ndarray]] = {}
        self.totals: list[float] = []  # each job's own time, in order
        self.started: list[float] = []  # perf_counter() as each job reached the engine
        self.returned: list[float] = []  # ... and as the engine gave it back

    @staticmethod
    def _key(settings: GenerateRequest) -> tuple[Any, ...]:
        return (settings.prompt, settings.seed, settings.frames, settings.width, settings.height)

    def prepare(self, request: GenerateRequest) -> None:
        settings = self.resolve(request)
        self._rendered[self._key(settings)] = self.render(settings)

    def generate(
        self,
        request: GenerateRequest,
        progress: ProgressCallback,
        should_cancel: CancelCheck,
        on_frames: FrameSink | None = None,
    ) -> GenerationResult:
        t0 = time.perf_counter()
        self.started.append(t0)
        settings = self.resolve(request)
        frames = self._rendered.get(self._key(settings)) or self.render(settings)
        steps = settings.steps or 1
        for step in range(1, steps + 1):
            if should_cancel():
                raise JobCancelled()
            time.sleep(self.denoise_s / steps)
            progress(StepProgress(step=step, total_steps=steps, preview=None))
        t1 = time.perf_counter()
        for start in range(0, len(frames), self.decode_chunk):
            chunk = frames[start : start + self.decode_chunk]
            time.sleep(self.decode_s * len(chunk) / len(frames))
            if on_frames is not None:
                on_frames(start, chunk)
        t2 = time.perf_counter()
        self.totals.append(t2 - t0)
        self.returned.append(t2)
        return GenerationResult(
            frames=list(frames),
            settings=settings,
            timings={"denoise": t1 - t0, "decode": t2 - t1, "total": t2 - t0},
        )


@dataclass
class OverheadResult:
    frames: int
    width: int
    height: int
    png_compress_level: int
    engine_s: float  # median of the stand-in's own time per job
    end_to_end_s: float  # median submit -> every frame received
    runs: list[float] = field(default_factory=list)
    # Where the overhead is (medians): submit -> the engine starts (request, queue, dispatch),
    # and the engine returns -> the client has every frame and the Finished message (the
    # frames not yet encoded and stored, the commit, signing, sending, checking).
    before_engine_s: float = 0.0
    after_engine_s: float = 0.0
    payload_bytes: int = 0  # the clip's PNGs, as sent

    @property
    def overhead_s(self) -> float:
        return self.end_to_end_s - self.engine_s

    @property
    def overhead_share(self) -> float:
        return self.overhead_s / self.end_to_end_s if self.end_to_end_s > 0 else 0.0

    def describe(self) -> str:
        return (
            f"{self.frames} frames {self.width}x{self.height}, PNG level {self.png_compress_level}: "
            f"engine {self.engine_s:.3f} s, end to end {self.end_to_end_s:.3f} s, "
            f"server + client add {self.overhead_s * 1000:.0f} ms ({self.overhead_share:.1%}): "
            f"{self.before_engine_s * 1000:.0f} ms before the engine starts, "
            f"{self.after_engine_s * 1000:.0f} ms after it returns (PNGs {self.payload_bytes / 1e6:.1f} MB)"
        )


def measure_server_overhead(
    *,
    frames: int = 16,
    width: int = 512,
    height: int = 512,
    steps: int = 4,
    denoise_s: float = H200_LIGHTNING_DENOISE_S,
    decode_s: float = H200_LIGHTNING_DECODE_S,
    repeats: int = 5,
    png_compress_level: int | None = None,
    data_dir: Path | None = None,
) -> OverheadResult:
    """Run `repeats` jobs (after one untimed) through a real server and client."""
    from animatediff_blender.backend.server.config import ServerConfig
    from animatediff_blender.backend.server.server import Server
    from animatediff_blender.protocol.client import BackendClient, ClientConfig

    engine = PacedEngine(denoise_s, decode_s)
    request = GenerateRequest(
        prompt="a lighthouse at dusk, waves", frames=frames, width=width, height=height, steps=steps,
        preset="lightning", seed=1, preview_every=0,
    )  # fmt: skip
    engine.prepare(request)
    key = os.urandom(32)
    with tempfile.TemporaryDirectory(prefix="adb-overhead-", dir=data_dir) as tmp:
        config = ServerConfig(key=key, data_dir=Path(tmp), bind="tcp://127.0.0.1:0")
        if png_compress_level is not None:
            config = dataclasses.replace(config, png_compress_level=png_compress_level)
        server = Server(config, engine)
        endpoint = server.start()
        try:
            client = BackendClient(
                ClientConfig(address=endpoint, key=key, client_id="overhead", timeout_s=120)
            )
            with client:
                client.connect()
                runs: list[float] = []
                before: list[float] = []
                after: list[float] = []
                payload = 0
                finished_at: list[float] = []  # when the client had each job's Finished

                def on_event(event: Any) -> None:
                    if isinstance(event.content, Finished):
                        finished_at.append(time.perf_counter())

                for i in range(repeats + 1):
                    finished_at.clear()
                    t0 = time.perf_counter()
                    result = client.run_job(request, on_event=on_event, timeout_s=120)
                    elapsed = time.perf_counter() - t0
                    if len(result.frames) != frames:
                        raise RuntimeError(f"received {len(result.frames)} frames, expected {frames}")
                    if i > 0:
                        runs.append(elapsed)
                        before.append(engine.started[-1] - t0)
                        after.append((finished_at[-1] if finished_at else t0 + elapsed) - engine.returned[-1])
                        payload = sum(len(png) for png in result.frames)
        finally:
            server.stop()
    return OverheadResult(
        frames=frames,
        width=width,
        height=height,
        png_compress_level=config.png_compress_level,
        engine_s=statistics.median(engine.totals[1:] if len(engine.totals) > 1 else engine.totals),
        end_to_end_s=statistics.median(runs) if runs else 0.0,
        runs=runs,
        before_engine_s=statistics.median(before) if before else 0.0,
        after_engine_s=statistics.median(after) if after else 0.0,
        payload_bytes=payload,
    )
