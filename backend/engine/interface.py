"""The small interface between the server and whatever generates frames.

The server owns sockets, the queue and persistence; an `Engine` owns models and
the device.  The server calls `generate` from its single GPU worker thread, never
from the network loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from animatediff_blender.protocol.messages import GenerateRequest, ModelInfo


@dataclass(frozen=True)
class StepProgress:
    step: int  # 1-based, steps completed
    total_steps: int
    preview: np.ndarray | None = None  # small HxWx3 uint8 image, or None
    phase: str = "denoise"


class JobCancelled(Exception):
    """Raised by an engine when `should_cancel()` turned true between steps."""


class EngineError(Exception):
    """A failure to report to the client with a code and a message a person understands."""

    def __init__(self, code: str, message: str, field: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field  # the request field at fault ("$.request.steps"), if one is


@dataclass
class GenerationResult:
    frames: list[np.ndarray]  # each HxWx3 uint8, RGB
    settings: GenerateRequest  # the request with preset defaults resolved
    timings: dict[str, float] = field(default_factory=dict)  # "load", "denoise", "decode" seconds


ProgressCallback = Callable[[StepProgress], None]
CancelCheck = Callable[[], bool]
# on_frames(start, frames): frames start..start+len-1 are final (HxWx3 uint8 RGB).
FrameSink = Callable[[int, list[np.ndarray]], None]


class Engine(Protocol):
    def device_name(self) -> str:
        """Human-readable device, e.g. "cuda:0 NVIDIA H200" or "cpu"."""
        ...

    def capabilities(self) -> list[str]: ...

    def list_models(self, rescan: bool = False) -> list[ModelInfo]: ...

    def default_models(self) -> dict[str, str]:
        """Default registry id per kind ("base", "motion"), used when a request leaves them out."""
        ...

    def resolve(self, request: GenerateRequest) -> GenerateRequest:
        """Fill preset defaults and default model ids; raise EngineError("unknown_model", ...)
        for ids not in the registry.  Cheap: the server calls it before queueing."""
        ...

    def generate(
        self,
        request: GenerateRequest,
        progress: ProgressCallback,
        should_cancel: CancelCheck,
        on_frames: FrameSink | None = None,
    ) -> GenerationResult:
        """Run one job.  Calls `progress` after every denoising step and checks
        `should_cancel` between steps (raising JobCancelled).  Raises EngineError
        with code "out_of_memory" on device OOM (after freeing what it can).

        `on_frames`, when given, is called as frames become final (while later ones are
        still decoding), in order, each frame once, all of them before `generate`
        returns: the server encodes and stores them while the device works on.  The
        result still carries every frame."""
        ...
