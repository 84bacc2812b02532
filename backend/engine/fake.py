"""A fast, deterministic stand-in for the AnimateDiff engine.

It implements the whole `Engine` protocol without torch: frames are gradients plus
noise derived from (prompt, seed, frame index), so every job's frames are
job-specific and reproducible (`FakeEngine.render` gives the expected pixels).
The server and protocol tests use it; `serve --engine fake` demos the protocol.

Directives in the prompt make it misbehave on purpose (tests only):

* `!oom`            -> EngineError("out_of_memory", ...) at the first step
* `!fail:<code>`    -> EngineError(<code>, ...) at the first step
* `!crash`          -> RuntimeError (an unexpected engine bug)
* `!delay=<sec>`    -> sleep that long per step (overrides `step_delay_s`)
"""

from __future__ import annotations

import hashlib
import re
import threading
import time

import msgspec
import numpy as np

from animatediff_blender.protocol.messages import GenerateRequest, ModelInfo

from .interface import (
    CancelCheck,
    EngineError,
    FrameSink,
    GenerationResult,
    JobCancelled,
    ProgressCallback,
    StepProgress,
)

FAKE_MODELS: tuple[ModelInfo, ...] = (
    ModelInfo(id="base:fake-sd15", kind="base", format="diffusers", label="Fake SD 1.5"),
    ModelInfo(
        id="motion:fake-mm-v2", kind="motion", format="diffusers", label="Fake motion v2", version="v2"
    ),
    ModelInfo(
        id="motion:fake-mm-v3", kind="motion", format="diffusers", label="Fake motion v3", version="v3"
    ),
    ModelInfo(
        id="lora:fake_ZoomIn", kind="lora", format="diffusers", label="Zoom in", camera_motion="ZoomIn"
    ),
    ModelInfo(
        id="lora:fake_PanLeft", kind="lora", format="diffusers", label="Pan left", camera_motion="PanLeft"
    ),
    ModelInfo(id="adapter:fake-adapter", kind="adapter", format="diffusers", label="Fake domain adapter"),
)

# preset -> (steps, guidance), as the real engine's presets.
PRESETS: dict[str, tuple[int, float]] = {"quality": (25, 7.5), "lightning": (4, 1.0), "lcm": (6, 1.5)}

_DELAY = re.compile(r"!delay=([0-9]*\.?[0-9]+)")
_FAIL = re.compile(r"!fail:([a-z_]{1,32})")


class FakeEngine:
    """Deterministic frames in milliseconds.  `step_delay_s` slows every step down (for
    tests of a busy server); `generate_calls` counts runs (tests check that refused
    requests never reached the engine)."""

    def __init__(self, step_delay_s: float = 0.0, device: str = "cpu (fake engine)") -> None:
        self.step_delay_s = step_delay_s
        self.decode_chunk = 4  # frames handed to `on_frames` at a time
        self._device = device
        self._models = {m.id: m for m in FAKE_MODELS}
        self._lock = threading.Lock()
        self.generate_calls = 0

    # ------------------------------------------------------------------ Engine protocol

    def device_name(self) -> str:
        return self._device

    def capabilities(self) -> list[str]:
        return ["motion_lora", "domain_adapter", "prompt_travel", "context_windows", "preview"]

    def list_models(self, rescan: bool = False) -> list[ModelInfo]:
        return list(self._models.values())

    def default_models(self) -> dict[str, str]:
        return {"base": "base:fake-sd15", "motion": "motion:fake-mm-v2"}

    def resolve(self, request: GenerateRequest) -> GenerateRequest:
        defaults = self.default_models()
        steps, guidance = PRESETS[request.preset]
        resolved = msgspec.structs.replace(
            request,
            base_model=request.base_model or defaults["base"],
            motion_module=request.motion_module or defaults["motion"],
            steps=request.steps if request.steps is not None else steps,
            guidance=request.guidance if request.guidance is not None else guidance,
        )
        self._check_id(resolved.base_model, "base")
        self._check_id(resolved.motion_module, "motion")
        for lora in resolved.motion_loras:
            self._check_id(lora.id, "lora")
        if resolved.domain_adapter is not None:
            self._check_id(resolved.domain_adapter, "adapter")
        return resolved

    def generate(
        self,
        request: GenerateRequest,
        progress: ProgressCallback,
        should_cancel: CancelCheck,
        on_frames: FrameSink | None = None,
    ) -> GenerationResult:
        with self._lock:
            self.generate_calls += 1
        settings = self.resolve(request)
        total = settings.steps or 1
        delay = self.step_delay_s
        m = _DELAY.search(settings.prompt)
        if m:
            delay = float(m.group(1))
        started = time.perf_counter()
        for step in range(1, total + 1):
            if should_cancel():
                raise JobCancelled()
            if step == 1:
                self._misbehave(settings.prompt)
            if delay > 0:
                time.sleep(delay)
            preview = None
            if settings.preview_every and step % settings.preview_every == 0:
                preview = self.render_frame(settings, 0)[::4, ::4].copy()
            progress(StepProgress(step=step, total_steps=total, preview=preview))
        if should_cancel():
            raise JobCancelled()
        denoise = time.perf_counter() - started
        # Frames come out in chunks, as a real engine's VAE decode hands them over.
        frames: list[np.ndarray] = []
        for start in range(0, settings.frames, self.decode_chunk):
            end = min(start + self.decode_chunk, settings.frames)
            chunk = [self.render_frame(settings, i) for i in range(start, end)]
            frames.extend(chunk)
            if on_frames is not None:
                on_frames(start, chunk)
        return GenerationResult(
            frames=frames,
            settings=settings,
            timings={"denoise": denoise, "decode": time.perf_counter() - started - denoise},
        )

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def render(settings: GenerateRequest) -> list[np.ndarray]:
        """The frames `generate` returns for these (resolved) settings."""
        return [FakeEngine.render_frame(settings, i) for i in range(settings.frames)]

    @staticmethod
    def render_frame(settings: GenerateRequest, index: int) -> np.ndarray:
        # Prompt travel picks the prompt in effect at this frame, so the content follows it.
        prompt = settings.prompt
        if settings.prompt_travel:
            keys = sorted(k for k in settings.prompt_travel if k <= index)
            if keys:
                prompt = settings.prompt_travel[keys[-1]]
        digest = hashlib.sha256(f"{prompt}\x00{settings.seed}\x00{index}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
        h, w = settings.height, settings.width
        ys = np.linspace(0, 255, h, dtype=np.float32)[:, None]
        xs = np.linspace(0, 255, w, dtype=np.float32)[None, :]
        base = np.stack(
            [
                np.broadcast_to(xs, (h, w)) * (digest[8] / 255.0),
                np.broadcast_to(ys, (h, w)) * (digest[9] / 255.0),
                np.full((h, w), float(digest[10])),
            ],
            axis=-1,
        )
        noise = rng.integers(0, 32, size=(h, w, 3)).astype(np.float32)
        return np.clip(base + noise, 0, 255).astype(np.uint8)

    def _check_id(self, model_id: str | None, kind: str) -> None:
        info = self._models.get(model_id or "")
        if info is None:
            raise EngineError("unknown_model", f"unknown model id {model_id!r}: not in the registry")
        if info.kind != kind:
            raise EngineError("unknown_model", f"model {model_id!r} is a {info.kind}, not a {kind}")

    @staticmethod
    def _misbehave(prompt: str) -> None:
        if "!oom" in prompt:
            raise EngineError(
                "out_of_memory", "the device ran out of memory (fake engine, '!oom' in the prompt)"
            )
        m = _FAIL.search(prompt)
        if m:
            raise EngineError(m.group(1), f"fake engine failure {m.group(1)!r} requested by the prompt")
        if "!crash" in prompt:
            raise RuntimeError("fake engine crash requested by the prompt")
