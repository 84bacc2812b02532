"""Side-by-side benchmark: stock diffusers `AnimateDiffPipeline` (the anchor) against
our engine, in one process, on one device, on the same random-weight models and inputs.

Per case it reports denoise seconds, seconds per step, VAE decode seconds, end-to-end
seconds, peak device memory, achieved TFLOP/s (FLOPs counted with torch's
FlopCounterMode on one UNet call, not assumed) and the share of the card's peak, the
ratio to the anchor, and the PSNR of our decoded frames against the anchor's.

`--size tiny --device cpu` is the smoke mode CI runs: it only proves the benchmark works.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from animatediff_blender.backend.bench.models import BASE_NAME, MOTION_NAME, Size, build_bench_models
from animatediff_blender.protocol.messages import GenerateRequest

# Dense fp16/bf16 tensor throughput used for "share of peak".  Override with --peak-tflops.
PEAK_TFLOPS = {"H200": 790.0, "H100": 790.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}


@dataclass
class CaseResult:
    case: str
    runner: str  # "stock", "stock+compile", "engine"
    frames: int
    width: int
    height: int
    steps: int
    guidance: float
    denoise_s: float
    decode_s: float
    end_to_end_s: float
    peak_mem_gib: float
    flops_per_step: float
    tflops: float
    share_of_peak: float
    ratio_to_anchor: float = 1.0
    psnr_vs_anchor_db: float | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def s_per_step(self) -> float:
        return self.denoise_s / max(self.steps, 1)


@dataclass
class Case:
    name: str
    frames: int
    width: int
    height: int
    steps: int
    guidance: float
    preset: str
    context_length: int | None = None
    context_stride: int | None = None


def cases_for(size: Size) -> list[Case]:
    if size == "real":
        return [
            Case("quality", 16, 512, 512, 25, 7.5, "quality"),
            Case("lightning", 16, 512, 512, 4, 1.0, "lightning"),
            Case("long64", 64, 512, 512, 25, 7.5, "quality", 16, 4),
            Case("long128", 128, 512, 512, 25, 7.5, "quality", 16, 4),
        ]
    return [
        Case("quality", 8, 64, 64, 3, 7.5, "quality"),
        Case("lightning", 8, 64, 64, 2, 1.0, "lightning"),
        Case("long", 24, 64, 64, 2, 7.5, "quality", 8, 4),
    ]


# --------------------------------------------------------------------------- device helpers


class Clock:
    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        if self.cuda:
            return float(self.torch.cuda.max_memory_allocated()) / 2**30
        return 0.0


def psnr(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    x = np.stack(a).astype(np.float64)
    y = np.stack(b).astype(np.float64)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def count_unet_flops(unet: Any, case: Case, dtype: Any, device: str) -> float:
    """FLOPs of one UNet call on the CFG batch (2 x frames when guidance > 1)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    batch = 2 if case.guidance > 1.0 else 1
    window = case.context_length or case.frames
    frames = min(window, case.frames)
    cfg = unet.config
    latents = torch.randn(batch, cfg.in_channels, frames, case.height // 8, case.width // 8, device=device, dtype=dtype)
    text = torch.randn(batch, 77, cfg.cross_attention_dim, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(latents, t, encoder_hidden_states=text)
    flops = float(counter.get_total_flops())
    if case.context_length and case.frames > case.context_length:
        # FreeNoise runs one UNet call per context window.
        stride = case.context_stride or 4
        windows = len(range(0, case.frames - case.context_length + 1, stride))
        if (case.frames - case.context_length) % stride:
            windows += 1
        flops *= windows
    return flops


# --------------------------------------------------------------------------- runners


def run_stock(
    models: Path, case: Case, device: str, dtype_name: str, clock: Clock, compile_unet: bool, seed: int
) -> tuple[CaseResult, list[np.ndarray]]:
    import torch
    from diffusers import AnimateDiffPipeline, DDIMScheduler, EulerDiscreteScheduler, MotionAdapter

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    adapter = MotionAdapter.from_pretrained(models / "motion" / MOTION_NAME, torch_dtype=dtype)
    pipe = AnimateDiffPipeline.from_pretrained(
        models / "base" / BASE_NAME, motion_adapter=adapter, torch_dtype=dtype, local_files_only=True
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    if case.preset == "lightning":
        pipe.scheduler = EulerDiscreteScheduler.from_config(
            pipe.scheduler.config, timestep_spacing="trailing", beta_schedule="linear"
        )
    else:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if case.context_length and case.frames > case.context_length:
        pipe.enable_free_noise(context_length=case.context_length, context_stride=case.context_stride or 4)
    if compile_unet:
        pipe.unet = torch.compile(pipe.unet, fullgraph=False)
    flops = count_unet_flops(pipe.unet, case, dtype, device)

    def once() -> tuple[float, float, float, list[np.ndarray]]:
        gen = torch.Generator("cpu").manual_seed(seed)
        t0 = clock.now()
        latents = pipe(
            prompt="a lighthouse on a cliff at sunset",
            negative_prompt="blurry",
            num_frames=case.frames,
            width=case.width,
            height=case.height,
            num_inference_steps=case.steps,
            guidance_scale=case.guidance,
            generator=gen,
            output_type="latent",
        ).frames
        t1 = clock.now()
        video = pipe.decode_latents(latents, decode_chunk_size=16)
        video = pipe.video_processor.postprocess_video(video=video, output_type="np")[0]
        t2 = clock.now()
        frames = [np.clip(np.round(f * 255), 0, 255).astype(np.uint8) for f in video]
        return t1 - t0, t2 - t1, t2 - t0, frames

    runner = "stock+compile" if compile_unet else "stock"
    return _measure(case, runner, once, clock, flops), []


def run_engine(
    models: Path, case: Case, device: str, dtype_name: str, clock: Clock, seed: int
) -> tuple[CaseResult, list[np.ndarray]]:
    from animatediff_blender.backend.engine.animatediff import AnimateDiffEngine

    engine = AnimateDiffEngine(models, device=device, dtype=dtype_name)
    request = engine.resolve(
        GenerateRequest(
            prompt="a lighthouse on a cliff at sunset",
            negative_prompt="blurry",
            base_model=f"base:{BASE_NAME}",
            motion_module=f"motion:{MOTION_NAME}",
            frames=case.frames,
            width=case.width,
            height=case.height,
            steps=case.steps,
            guidance=case.guidance,
            seed=seed,
            preset=case.preset,  # type: ignore[arg-type]
            context_length=case.context_length,
            context_stride=case.context_stride,
            preview_every=0,
        )
    )
    unet = engine_unet(engine)
    flops = count_unet_flops(unet, case, unet.dtype, device) if unet is not None else 0.0

    def once() -> tuple[float, float, float, list[np.ndarray]]:
        t0 = clock.now()
        result = engine.generate(request, lambda _p: None, lambda: False)
        t1 = clock.now()
        denoise = float(result.timings.get("denoise", t1 - t0))
        decode = float(result.timings.get("decode", 0.0))
        return denoise, decode, t1 - t0, result.frames

    return _measure(case, "engine", once, clock, flops), []


def engine_unet(engine: Any) -> Any:
    for name in ("unet", "_unet"):
        if getattr(engine, name, None) is not None:
            return getattr(engine, name)
    pipe = getattr(engine, "pipeline", None) or getattr(engine, "_pipe", None) or getattr(engine, "pipe", None)
    return getattr(pipe, "unet", None)


_LAST_FRAMES: dict[tuple[str, str], list[np.ndarray]] = {}


def _measure(
    case: Case,
    runner: str,
    once: Callable[[], tuple[float, float, float, list[np.ndarray]]],
    clock: Clock,
    flops: float,
    repeats: int = 2,
) -> CaseResult:
    once()  # warm-up (and compilation)
    clock.reset_peak()
    runs = [once() for _ in range(repeats)]
    denoise = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    e2e = statistics.median(r[2] for r in runs)
    _LAST_FRAMES[(case.name, runner)] = runs[-1][3]
    tflops = flops * case.steps / denoise / 1e12 if denoise > 0 else 0.0
    return CaseResult(
        case=case.name, runner=runner, frames=case.frames, width=case.width, height=case.height,
        steps=case.steps, guidance=case.guidance, denoise_s=denoise, decode_s=decode, end_to_end_s=e2e,
        peak_mem_gib=clock.peak_gib(), flops_per_step=flops, tflops=tflops, share_of_peak=0.0,
    )  # fmt: skip


# --------------------------------------------------------------------------- main


def run_benchmark(
    *,
    size: Size,
    device: str,
    dtype: str,
    workdir: Path,
    only: list[str] | None = None,
    compile_anchor: bool = False,
    peak_tflops: float | None = None,
    seed: int = 0,
    out_json: Path | None = None,
    print_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    import diffusers
    import torch

    models = build_bench_models(workdir / f"models-{size}", size)
    clock = Clock(device)
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu"
    peak = peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in gpu), 0.0)
    results: list[CaseResult] = []
    for case in cases_for(size):
        if only and case.name not in only:
            continue
        print_fn(f"bench: {case.name} ({case.frames} frames, {case.width}x{case.height}, {case.steps} steps)")
        stock, _ = run_stock(models, case, device, dtype, clock, False, seed)
        group = [stock]
        if compile_anchor:
            group.append(run_stock(models, case, device, dtype, clock, True, seed)[0])
        group.append(run_engine(models, case, device, dtype, clock, seed)[0])
        anchor_frames = _LAST_FRAMES[(case.name, "stock")]
        for r in group:
            r.ratio_to_anchor = stock.denoise_s / r.denoise_s if r.denoise_s else 0.0
            r.share_of_peak = r.tflops / peak if peak else 0.0
            r.psnr_vs_anchor_db = psnr(_LAST_FRAMES[(case.name, r.runner)], anchor_frames)
            print_fn(format_row(r))
        results.extend(group)
    report = {
        "device": gpu,
        "device_kind": device,
        "dtype": dtype,
        "size": size,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peak_tflops": peak,
        "results": [dict(asdict(r), s_per_step=r.s_per_step) for r in results],
    }
    if out_json:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(report, indent=2, default=str))
    return report


def format_row(r: CaseResult) -> str:
    psnr_txt = "inf" if r.psnr_vs_anchor_db == math.inf else f"{r.psnr_vs_anchor_db or 0:.1f}"
    return (
        f"  {r.runner:14s} denoise {r.denoise_s:7.3f} s ({r.s_per_step:.4f} s/step)  decode {r.decode_s:6.3f} s  "
        f"e2e {r.end_to_end_s:7.3f} s  peak {r.peak_mem_gib:5.2f} GiB  {r.tflops:7.1f} TFLOP/s "
        f"({100 * r.share_of_peak:4.1f}% of peak)  x{r.ratio_to_anchor:.2f} vs stock  PSNR {psnr_txt} dB"
    )
