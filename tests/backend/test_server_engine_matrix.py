"""Issue 4's "done when", through the real server: jobs submitted with `BackendClient.run_job`
to one in-process `Server` running the real `AnimateDiffEngine` (CPU, fp32, the settings
`serve` uses) on the tiny zoo return the frames stock diffusers 0.42.1 `AnimateDiffPipeline`
produces for the same components, seed and settings.

The matrix covers, not multiplies: base as diffusers folder and as single-file LDM
`.safetensors`; motion module v1 (`mm_sd_v15.ckpt`), v2 (diffusers folder, `.ckpt`,
`.safetensors`) and v3 (`v3_sd15_mm.safetensors`); 0, 1, 2 and 3 MotionLoRAs in both
layouts with weights, one negative; the domain adapter with a scale on v3; the quality and
lightning presets; 16 frames and 64 frames in sliding context windows; prompt travel.
References: matrix_helpers.py (built without the project's loaders).

Tolerances, on the PNG frames as received, decoded to uint8:
* one context window (16 frames, no prompt travel): bit-identical (max abs diff 0): same
  weights, same ops, same CPU generator, fp32, and PNG is lossless;
* sliding windows / prompt travel (diffusers' FreeNoise on both sides): at most 1 level of
  255, `FREENOISE_TOLERANCE` of tests/backend/engine/test_stock_parity.py: the engine bounds
  memory with split inference and chunked feed-forwards, which sum the same per-frame maths
  in another order.

All at 64x64 and 2 denoising steps (the lightning case: its 4 default steps without CFG);
64 frames run in windows of 16 frames, stride 4, and of 12, stride 6.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matrix_helpers import FREENOISE_TOLERANCE, StockReferences, decode_png, max_abs_diff, run_stock

from animatediff_blender.backend.server.config import ServerConfig
from animatediff_blender.backend.server.server import Server
from animatediff_blender.protocol.client import BackendClient, ClientConfig, ClientError, Event, JobResult
from animatediff_blender.protocol.messages import Failed, GenerateRequest, Limits, MotionLora

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

KEY = secrets.token_hex(32).encode()

BASE = "base:tiny-sd15"
BASE_SINGLE = "base:tiny-sd15-ldm.safetensors"
V2_FOLDER = "motion:tiny-motion-adapter-v2"
V2_CKPT = "motion:mm_sd_v15_v2.ckpt"
V2_SAFETENSORS = "motion:mm_sd_v15_v2.safetensors"
V1 = "motion:mm_sd_v15.ckpt"
V3 = "motion:v3_sd15_mm.safetensors"
ZOOM_IN = "lora:v2_lora_ZoomIn.ckpt"
ZOOM_IN_DIFFUSERS = "lora:motion-lora-zoom-in"
PAN_LEFT = "lora:v2_lora_PanLeft.ckpt"
TILT_UP = "lora:v2_lora_TiltUp.ckpt"
ROLL = "lora:v2_lora_RollingClockwise.ckpt"
DOMAIN_ADAPTER = "adapter:v3_sd15_adapter.ckpt"

PROMPT = "a cat walking on the beach"
NEGATIVE = "blurry"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real server for the module: the engine keeps models warm between the cases."""
    from animatediff_blender.backend.engine.animatediff import AnimateDiffEngine

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        config = ServerConfig(
            key=KEY,
            data_dir=tmp_path_factory.mktemp("matrix-data"),
            bind="tcp://127.0.0.1:*",
            limits=Limits(),
            linger_ms=0,
            shutdown_timeout_s=30,
        )
        srv = Server(config, AnimateDiffEngine(tiny_zoo, device="cpu"))
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[BackendClient]:
    # Long per-request timeout: fetch of 64 frames while the CI machine is busy.
    c = BackendClient(ClientConfig(address=server.endpoint, key=KEY, client_id="matrix", timeout_s=120))
    c.connect()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def stock(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> StockReferences:
    return StockReferences(tiny_zoo, tmp_path_factory.mktemp("matrix-stock"))


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    id: str
    base: str
    motion: str
    version: str  # the stock reference's motion module: "v1", "v2", "v3"
    loras: tuple[tuple[str, float], ...] = ()
    adapter_scale: float | None = None  # domain adapter, when set
    frames: int = 16
    context: tuple[int, int] | None = None  # (length, stride) asked for; None: server default
    travel: dict[int, str] = field(default_factory=dict)
    preset: str = "quality"
    steps: int | None = 2
    guidance: float | None = 7.5
    seed: int = 7

    @property
    def windows(self) -> bool:
        """Whether FreeNoise runs: more frames than one window (16 by default), or travel."""
        length = self.context[0] if self.context else 16
        return self.frames > length or bool(self.travel)

    def request(self) -> GenerateRequest:
        return GenerateRequest(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            prompt_travel=dict(self.travel) or None,
            base_model=self.base,
            motion_module=self.motion,
            motion_loras=[MotionLora(id=i, weight=w) for i, w in self.loras],
            domain_adapter=DOMAIN_ADAPTER if self.adapter_scale is not None else None,
            domain_adapter_scale=self.adapter_scale if self.adapter_scale is not None else 1.0,
            frames=self.frames,
            width=64,
            height=64,
            steps=self.steps,
            guidance=self.guidance,
            seed=self.seed,
            preset=self.preset,  # type: ignore[arg-type]
            context_length=self.context[0] if self.context else None,
            context_stride=self.context[1] if self.context else None,
            preview_every=0,
        )


CASES = [
    # 1 MotionLoRA (original layout), single-file base, v2 as .ckpt.
    Case("single-file-base/v2-ckpt/1-lora", BASE_SINGLE, V2_CKPT, "v2", loras=((ZOOM_IN, 0.75),)),
    # 3 MotionLoRAs, both layouts, one negative, one above 1.
    Case(
        "folder-base/v2-safetensors/3-loras",
        BASE,
        V2_SAFETENSORS,
        "v2",
        loras=((ZOOM_IN_DIFFUSERS, 0.5), (PAN_LEFT, -0.6), (TILT_UP, 1.3)),
        seed=3,
    ),
    Case("single-file-base/v1", BASE_SINGLE, V1, "v1", seed=5),
    Case("folder-base/v3/domain-adapter", BASE, V3, "v3", adapter_scale=0.6, seed=9),
    # The lightning preset's defaults (Euler trailing, 4 steps, CFG 1) on v2 + a LoRA.
    Case(
        "folder-base/v2-folder/lightning-defaults/1-lora",
        BASE,
        V2_FOLDER,
        "v2",
        loras=((ROLL, 0.9),),
        preset="lightning",
        steps=None,
        guidance=None,
    ),
    # Prompt travel: FreeNoise's per-frame prompt interpolation, two windows of 8.
    Case(
        "folder-base/v2-folder/prompt-travel",
        BASE,
        V2_FOLDER,
        "v2",
        context=(8, 4),
        travel={0: PROMPT, 10: "a dog running in the snow"},
    ),
    # 64 frames in sliding windows of 16, stride 4 (13 windows), with 2 MotionLoRAs, one negative.
    Case(
        "single-file-base/v2-folder/2-loras/64-frames",
        BASE_SINGLE,
        V2_FOLDER,
        "v2",
        loras=((ZOOM_IN, 0.8), (PAN_LEFT, -0.5)),
        frames=64,
        context=(16, 4),
        seed=21,
    ),
    # 64 frames on v3 with the domain adapter, windows of 12, stride 6 (9 windows).
    Case(
        "folder-base/v3/domain-adapter/64-frames",
        BASE,
        V3,
        "v3",
        adapter_scale=1.2,
        frames=64,
        context=(12, 6),
        seed=13,
    ),
]


def _frames(result: JobResult, case_frames: int) -> list[np.ndarray]:
    assert result.finished.frames == case_frames == len(result.frames)
    frames = [decode_png(b) for b in result.frames]
    assert all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in frames)
    return frames


def _reference(stock: StockReferences, case: Case, settings: GenerateRequest) -> list[np.ndarray]:
    """Stock frames for what the server says it ran (`Finished.settings`).  Order as the
    engine: FreeNoise first (it rebuilds the motion blocks), then the LoRAs."""
    pipe = stock.pipe(case.version)
    loras = list(case.loras)
    if case.adapter_scale is not None:
        loras.append((DOMAIN_ADAPTER, case.adapter_scale))
    assert settings.steps is not None and settings.guidance is not None
    assert settings.context_length is not None and settings.context_stride is not None
    context = (settings.context_length, settings.context_stride) if case.windows else None
    prompt: Any = PROMPT
    if case.travel:
        prompt = dict(case.travel)
    with stock.scheduler(pipe, case.preset), stock.free_noise(pipe, context), stock.loras(pipe, loras):
        return run_stock(
            pipe,
            prompt=prompt,
            negative_prompt=NEGATIVE,
            num_frames=case.frames,
            height=64,
            width=64,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            seed=settings.seed,
        )


# --------------------------------------------------------------------------- tests


def test_default_job_is_stored_refetched_and_matches_stock(
    client: BackendClient, stock: StockReferences
) -> None:
    """Default models and preset (only size, frames, steps and seed given): the job is
    stored as finished, a re-fetch gives the same bytes, `Finished.settings` carries the
    resolved defaults, and the frames equal stock diffusers' bit for bit."""
    request = GenerateRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, steps=2, seed=11)
    assert request.frames == 16 and request.guidance is None and request.base_model is None
    result = client.run_job(request)
    status = client.status(result.job_id)
    assert (status.state, status.frames, status.error_code) == ("finished", 16, "")
    again = client.fetch(result.job_id)
    assert again.frames == result.frames
    assert again.finished.settings == result.finished.settings

    s = result.finished.settings
    assert client.welcome is not None
    assert (s.base_model, s.motion_module) == (
        client.welcome.defaults["base"],
        client.welcome.defaults["motion"],
    )
    assert (s.base_model, s.motion_module) == (BASE, V2_FOLDER)
    # The quality preset's defaults, filled in; explicit fields kept.
    assert (s.preset, s.steps, s.guidance, s.context_length, s.context_stride) == ("quality", 2, 7.5, 16, 4)
    assert (s.seed, s.frames, s.width, s.height) == (11, 16, 64, 64)
    assert (result.finished.seed, result.finished.width, result.finished.height) == (11, 64, 64)

    ours = _frames(result, 16)
    ref = _reference(stock, Case("defaults", BASE, V2_FOLDER, "v2", seed=11), s)
    assert max_abs_diff(ours, ref) == 0
    assert np.ptp(np.stack(ours)) > 20  # not flat: the comparison means something


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_zoo_combination_matches_stock(client: BackendClient, stock: StockReferences, case: Case) -> None:
    t0 = time.perf_counter()
    result = client.run_job(case.request())
    t1 = time.perf_counter()
    s = result.finished.settings
    # What ran is what was asked, with only the unset fields filled in.
    assert (s.base_model, s.motion_module, s.frames, s.seed, s.preset) == (
        case.base,
        case.motion,
        case.frames,
        case.seed,
        case.preset,
    )
    assert [(m.id, m.weight) for m in s.motion_loras] == list(case.loras)
    if case.context is not None:
        assert (s.context_length, s.context_stride) == case.context
    if case.preset == "lightning":
        assert (s.steps, s.guidance) == (4, 1.0)
    ours = _frames(result, case.frames)
    ref = _reference(stock, case, s)
    diff = max_abs_diff(ours, ref)
    print(f"{case.id}: max abs diff {diff}; server {t1 - t0:.1f} s, stock {time.perf_counter() - t1:.1f} s")
    if case.windows:
        assert diff <= FREENOISE_TOLERANCE, diff
    else:
        assert diff == 0, diff
    assert np.ptp(np.stack(ours)) > 20


def test_v2_motion_lora_on_v3_is_refused_and_the_server_stays_healthy(
    client: BackendClient, stock: StockReferences
) -> None:
    """v3 has no mid-block motion module, so part of a v2 MotionLoRA would go nowhere: the
    job fails with a clear `model_error`, nothing of it leaks into the next job."""
    bad = Case("v2-lora-on-v3", BASE, V3, "v3", loras=((ZOOM_IN, 1.0),), frames=8).request()
    events: list[Event] = []
    with pytest.raises(ClientError) as info:
        client.run_job(bad, on_event=events.append)
    failed = [e.content for e in events if isinstance(e.content, Failed)]
    assert len(failed) == 1 and failed[0].code == info.value.code == "model_error"
    message = failed[0].message
    assert ZOOM_IN in message and "mid_block" in message and "v2" in message
    status = client.status(failed[0].job_id)
    assert (status.state, status.error_code, status.error) == ("failed", "model_error", message)
    assert client.ping().running_job == ""
    # The same module right after, without the LoRA: stock frames, bit for bit.
    good = Case("v3-after-refusal", BASE, V3, "v3", frames=8, seed=4)
    result = client.run_job(good.request())
    assert max_abs_diff(_frames(result, 8), _reference(stock, good, result.finished.settings)) == 0
