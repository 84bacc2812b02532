"""Side-by-side benchmark: stock diffusers `AnimateDiffPipeline` (the anchor) against
our engine, in one process, on one device, on the same random-weight models and inputs.

Per case and runner it reports denoise seconds (the pipeline call: prompt encoding and
the denoising loop), seconds per step, VAE decode seconds, end-to-end seconds, peak
device memory, achieved TFLOP/s (FLOPs counted with torch's FlopCounterMode on the UNet
calls of a real pipeline run, not assumed) and the share of the card's peak, the speed-up
over the anchor, and the PSNR of the runner's uint8 frames against the anchor's.

Runners: "stock" (eager diffusers), "stock+compile" (`--compile-anchor`: the UNet under
torch.compile), one "engine[<lever>]" per `--lever` (our engine with that fast path), and
for the "server" case the engine behind an in-process server with a real client (submit
to all frames persisted on the server and received by the client).

`--size tiny --device cpu` is the smoke mode CI runs: it proves the benchmark works, its
timings mean nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import io
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from animatediff_blender.backend.bench.models import BASE_NAME, MOTION_NAME, Size, build_bench_models
from animatediff_blender.backend.bench.profile import (
    around_forward,
    format_profile,
    labelled_job,
    profile_call,
    profile_first_unet_call,
)
from animatediff_blender.protocol.messages import GenerateRequest

# Dense fp16/bf16 tensor throughput (TFLOP/s) for "share of peak".  Override with --peak-tflops.
PEAK_TFLOPS = {"H200": 790.0, "H100": 790.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}
PROMPT = "a lighthouse on a cliff at sunset, waves crashing"
NEGATIVE = "blurry, low quality"

CASE_NAMES = ("quality", "lightning", "long64", "long128", "server")

# Fields every result row carries (the smoke test checks them).
RESULT_FIELDS = (
    "case", "runner", "frames", "width", "height", "steps", "guidance", "denoise_s", "s_per_step",
    "decode_s", "end_to_end_s", "peak_mem_gib", "flops_per_step", "tflops", "share_of_peak",
    "ratio_to_anchor", "ratio_e2e_to_anchor", "psnr_vs_anchor_db", "warm_up_s", "first_run_s", "error",
)  # fmt: skip


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
    server: bool = False
    repeats: int = 2
    compile_anchor: bool = True  # whether --compile-anchor applies (skipped for long clips: time)

    @property
    def free_noise(self) -> bool:
        return self.context_length is not None and self.frames > self.context_length

    def settings_key(self) -> tuple[Any, ...]:
        return (self.frames, self.width, self.height, self.steps, self.guidance, self.preset,
                self.context_length if self.free_noise else None, self.context_stride if self.free_noise else None)  # fmt: skip


def cases_for(size: Size) -> dict[str, Case]:
    if size == "real":
        return {
            "quality": Case("quality", 16, 512, 512, 25, 7.5, "quality"),
            # No compiled anchor: the targets compare stock + compile on the quality case only,
            # and a second compile of the stock UNet costs a minute of GPU time.
            "lightning": Case("lightning", 16, 512, 512, 4, 1.0, "lightning", compile_anchor=False),
            "long64": Case(
                "long64", 64, 512, 512, 25, 7.5, "quality", 16, 4, repeats=1, compile_anchor=False
            ),
            "long128": Case(
                "long128", 128, 512, 512, 25, 7.5, "quality", 16, 4, repeats=1, compile_anchor=False
            ),
            "server": Case("server", 16, 512, 512, 4, 1.0, "lightning", server=True, repeats=3),
        }
    # Tiny: same structure, CPU-sized and as small as still meaningful (windows of 4).
    return {
        "quality": Case("quality", 4, 64, 64, 2, 7.5, "quality", repeats=1),
        "lightning": Case("lightning", 4, 64, 64, 1, 1.0, "lightning", repeats=1),
        "long64": Case("long64", 8, 64, 64, 2, 7.5, "quality", 4, 2, repeats=1, compile_anchor=False),
        "long128": Case("long128", 12, 64, 64, 2, 7.5, "quality", 4, 2, repeats=1, compile_anchor=False),
        "server": Case("server", 4, 64, 64, 1, 1.0, "lightning", server=True, repeats=1),
    }


@dataclass
class CaseResult:
    case: str
    runner: str
    frames: int
    width: int
    height: int
    steps: int
    guidance: float
    denoise_s: float = 0.0
    decode_s: float = 0.0
    end_to_end_s: float = 0.0
    peak_mem_gib: float = 0.0
    flops_per_step: float = 0.0
    tflops: float = 0.0
    share_of_peak: float = 0.0
    ratio_to_anchor: float = 0.0  # anchor denoise / this denoise
    ratio_e2e_to_anchor: float = 0.0  # anchor end-to-end / this end-to-end
    psnr_vs_anchor_db: float | None = None
    warm_up_s: float | None = None  # engine: warm_up() (load + compile); server: start to ready
    first_run_s: float | None = None  # the first run after warm-up (compile left over shows here)
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def s_per_step(self) -> float:
        return self.denoise_s / max(self.steps, 1)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["s_per_step"] = self.s_per_step
        if d["psnr_vs_anchor_db"] == math.inf:
            d["psnr_vs_anchor_db"] = "inf"  # JSON has no infinity
        return d


@dataclass
class Lever:
    """One engine configuration to measure: `name` is the --lever spec."""

    name: str
    fast: Any  # engine.animatediff.FastPath
    dtype: str


def parse_lever(spec: str, device: str, dtype: str, compile_backend: str) -> Lever:
    """`default` (the engine's default for the device), `eager`, or `+`-joined levers, on
    top of the default when the first is `default`:
    `compile` (regional), `compile-full`, `compile:<mode>`, `compile-dynamic` (regional,
    shapes made symbolic once they change), `channels-last`, `fuse-qkv`,
    `sdpa:<flash|efficient|cudnn|math>`, `temporal-sdpa:<...>` (the motion modules' only),
    `batch-windows` (FreeNoise windows batched),
    `share-projections` (batched windows sharing their per-frame projections),
    `vae-compile`, `vae-channels-last`, `ff-chunk[:ELEMENTS]` / `no-ff-chunk` (feed-forwards
    in row chunks beyond that many input elements), `split-batch[:IMAGES]` (the UNet called per
    CFG half beyond that many images, default a 16-frame clip's 32), `cudnn-benchmark`, `bf16`, `fp16`."""
    from animatediff_blender.backend.engine.animatediff import FastPath
    from animatediff_blender.backend.engine.chunking import FF_CHUNK_ELEMENTS, SPLIT_BATCH_IMAGES
    from animatediff_blender.backend.engine.interface import EngineError

    parts = spec.split("+")
    fast = FastPath.default_for(device) if parts[0] == "default" else FastPath.off()
    lever_dtype = dtype
    kw: dict[str, Any] = {}
    for part in parts:
        name, _, arg = part.partition(":")
        if part == parts[0] and name in ("default", "eager", "off"):
            continue
        if name == "compile":
            kw.update(compile="regional", compile_mode=arg or "default")
        elif name == "compile-full":
            kw.update(compile="full", compile_mode=arg or "default")
        elif name == "compile-dynamic":
            kw.update(compile="regional", compile_mode=arg or "default", compile_dynamic=True)
        elif name == "channels-last":
            kw["channels_last"] = True
        elif name == "fuse-qkv":
            kw["fuse_qkv"] = True
        elif name == "batch-windows":
            kw["batch_windows"] = True
        elif name == "share-projections":
            kw.update(batch_windows=True, share_window_projections=True)
        elif name == "vae-compile":
            kw["compile_vae"] = True
        elif name == "vae-channels-last":
            kw["vae_channels_last"] = True
        elif name == "ff-chunk":
            kw["ff_chunk_elements"] = int(arg) if arg else FF_CHUNK_ELEMENTS
        elif name == "no-ff-chunk":
            kw["ff_chunk_elements"] = 0
        elif name == "split-batch":
            kw["split_batch_over"] = int(arg) if arg else SPLIT_BATCH_IMAGES
        elif name == "cudnn-benchmark":
            kw["cudnn_benchmark"] = True
        elif name == "sdpa":
            kw["sdpa"] = arg
        elif name == "temporal-sdpa":
            kw["temporal_sdpa"] = arg
        elif name in ("bf16", "fp16", "fp32"):
            lever_dtype = name
        else:
            raise ValueError(f"unknown lever {part!r} in {spec!r}")
    try:
        return Lever(spec, dataclasses.replace(fast, compile_backend=compile_backend, **kw), lever_dtype)
    except EngineError as exc:
        raise ValueError(f"lever {spec!r}: {exc.message}") from None


# --------------------------------------------------------------------------- device helpers


class Clock:
    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.cuda = device.startswith("cuda")

    def now(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def reset_peak(self) -> None:
        """Between runners: free what the last one cached, then start a new peak."""
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def reset_peak_stats(self) -> None:
        """Between a runner's warm run and its timed runs: a new peak, the allocator's
        cache kept.  Emptying it there made the first timed run allocate every block from
        the driver again (cudaMalloc/cudaFree, which synchronise), a cost no job in a
        running server pays; with two timed runs the median is their mean, so it showed
        in the result (run 3: lightning's denoise 0.328 s in the engine case, 0.271 s in
        the server case, whose median of three dropped that run)."""
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        if self.cuda:
            return float(self.torch.cuda.max_memory_allocated()) / 2**30
        return 0.0


def psnr(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """PSNR in dB of uint8 frames `a` against `b` (inf when identical)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"cannot compare {len(a)} frames with {len(b)}")
    x = np.stack(a).astype(np.float64)
    y = np.stack(b).astype(np.float64)
    if x.shape != y.shape:
        raise ValueError(f"frame shapes differ: {x.shape} vs {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


class UnetFlops:
    """Counts the FLOPs of every UNet call while installed (FlopCounterMode per call)."""

    def __init__(self, unet: Any) -> None:
        self.unet = unet
        self.total = 0.0
        self.calls = 0
        self._patch = around_forward(unet, self._counting)

    def _counting(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        from torch.utils.flop_counter import FlopCounterMode

        def forward(*args: Any, **kwargs: Any) -> Any:
            counter = FlopCounterMode(display=False)
            with counter:
                out = inner(*args, **kwargs)
            self.total += float(counter.get_total_flops())
            self.calls += 1
            return out

        return forward

    def __enter__(self) -> UnetFlops:
        self._patch.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._patch.__exit__(*exc)


def _request(case: Case, seed: int) -> GenerateRequest:
    return GenerateRequest(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
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


def _timed_runs(
    once: Callable[[], tuple[float, float, float, list[np.ndarray]]], repeats: int, clock: Clock
) -> tuple[float, float, float, float, list[np.ndarray]]:
    """(first run s, median denoise, median decode, median end-to-end, last frames);
    peak memory covers the timed runs.  `repeats=0` (smoke runs): the first run is the
    only one."""
    if repeats <= 0:
        clock.reset_peak_stats()
        only = once()
        return only[2], only[0], only[1], only[2], only[3]
    first = once()
    clock.reset_peak_stats()
    runs = [once() for _ in range(repeats)]
    return (
        first[2],
        statistics.median(r[0] for r in runs),
        statistics.median(r[1] for r in runs),
        statistics.median(r[2] for r in runs),
        runs[-1][3],
    )


# --------------------------------------------------------------------------- runners


@dataclass
class Run:
    result: CaseResult
    frames: list[np.ndarray]


def _blank(case: Case, runner: str) -> CaseResult:
    return CaseResult(case.name, runner, case.frames, case.width, case.height, case.steps, case.guidance)


def run_stock(
    models: Path, cases: list[Case], device: str, dtype_name: str, clock: Clock, seed: int,
    compile_backend: str, compile_anchor: bool, print_fn: Callable[[str], None],
    profile_case: str | None = None, profiles: list[dict[str, Any]] | None = None,
) -> dict[str, tuple[list[Run], float]]:  # fmt: skip
    """Stock diffusers, built once: every case eager, then (with `compile_anchor`) the
    short cases again with the UNet compiled, then the FreeNoise cases (FreeNoise stays
    on once enabled).  Returns per case its runs and the counted FLOPs per step."""
    import torch
    from diffusers import AnimateDiffPipeline, MotionAdapter

    from animatediff_blender.backend.engine.presets import get_preset

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    adapter = MotionAdapter.from_pretrained(models / "motion" / MOTION_NAME, torch_dtype=dtype)
    pipe = AnimateDiffPipeline.from_pretrained(
        models / "base" / BASE_NAME, motion_adapter=adapter, torch_dtype=dtype, local_files_only=True
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    base_scheduler = dict(pipe.scheduler.config)

    def call(case: Case, steps: int) -> tuple[float, float, float, list[np.ndarray]]:
        gen = torch.Generator("cpu").manual_seed(seed)  # FreeNoise's shuffle needs a CPU generator
        t0 = clock.now()
        with torch.no_grad():
            latents = pipe(
                prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=case.frames, width=case.width,
                height=case.height, num_inference_steps=steps, guidance_scale=case.guidance,
                generator=gen, output_type="latent",
            ).frames  # fmt: skip
            t1 = clock.now()
            video = pipe.decode_latents(latents, 16)
            video_np = pipe.video_processor.postprocess_video(video=video, output_type="np")
        frames = [np.ascontiguousarray(f) for f in (np.asarray(video_np)[0] * 255).round().astype("uint8")]
        t2 = clock.now()
        return t1 - t0, t2 - t1, t2 - t0, frames

    def prepare(case: Case) -> None:
        pipe.scheduler = get_preset(case.preset).make_scheduler(base_scheduler)
        if case.free_noise:
            assert case.context_length is not None
            pipe.enable_free_noise(
                context_length=case.context_length, context_stride=case.context_stride or 4,
                weighting_scheme="pyramid", noise_type="shuffle_context",
            )  # fmt: skip

    out: dict[str, tuple[list[Run], float]] = {}
    short = [c for c in cases if not c.free_noise]
    long = [c for c in cases if c.free_noise]
    for case in [*short, *long]:
        if case.free_noise and compile_anchor and case is long[0]:
            _compile_anchor(pipe, short, call, prepare, clock, compile_backend, out, print_fn)
        print_fn(f"bench: stock, {case.name}")
        res = _blank(case, "stock")
        try:
            prepare(case)
            # Warm-up: 1 step with the FLOP counter on the UNet (FLOPs per step do not
            # depend on the scheduler or the step).
            with UnetFlops(pipe.unet) as counted:
                call(case, 1)
            res.flops_per_step = counted.total
            res.first_run_s, res.denoise_s, res.decode_s, res.end_to_end_s, frames = _timed_runs(
                functools.partial(call, case, case.steps), case.repeats, clock
            )
            res.peak_mem_gib = clock.peak_gib()
            print_fn(format_row(res))
            out[case.name] = ([Run(res, frames)], res.flops_per_step)
            if case.name == profile_case and profiles is not None:
                _profile(
                    profiles, "stock", pipe.unet, functools.partial(call, case, 1), clock, res.flops_per_step,
                    print_fn,
                )  # fmt: skip
        except Exception as exc:
            traceback.print_exc()
            res.error = _error(exc)
            out[case.name] = ([Run(res, [])], 0.0)
            clock.reset_peak()
    if compile_anchor and not long:
        _compile_anchor(pipe, short, call, prepare, clock, compile_backend, out, print_fn)
    return out


def _compile_anchor(
    pipe: Any, cases: list[Case], call: Callable[[Case, int], Any], prepare: Callable[[Case], None],
    clock: Clock, backend: str, out: dict[str, tuple[list[Run], float]], print_fn: Callable[[str], None],
) -> None:  # fmt: skip
    """Stock with the UNet compiled in place (the baseline's `torch.compile(unet)`), then
    back to eager for the FreeNoise cases."""
    pipe.unet.compile(backend=backend)
    try:
        for case in cases:
            if not case.compile_anchor or case.name not in out or out[case.name][0][0].result.error:
                continue
            print_fn(f"bench: stock+compile, {case.name}")
            res = _blank(case, "stock+compile")
            try:
                prepare(case)
                t0 = clock.now()
                call(case, 2)  # compiles this case's shapes
                res.warm_up_s = clock.now() - t0
                res.first_run_s, res.denoise_s, res.decode_s, res.end_to_end_s, frames = _timed_runs(
                    functools.partial(call, case, case.steps), case.repeats, clock
                )
                res.peak_mem_gib = clock.peak_gib()
                print_fn(format_row(res))
                out[case.name][0].append(Run(res, frames))
            except Exception as exc:
                traceback.print_exc()
                res.error = _error(exc)
                out[case.name][0].append(Run(res, []))
                clock.reset_peak()
    finally:
        pipe.unet._compiled_call_impl = None  # eager again


# With --profile, the engine's whole job is profiled too for this case (GPU idle time).
JOB_PROFILE_CASE = "lightning"


def _profile(
    profiles: list[dict[str, Any]], runner: str, unet: Any, one_step_run: Callable[[], Any], clock: Clock,
    flops: float, print_fn: Callable[[str], None],
) -> None:  # fmt: skip
    """Profile one UNet step: the first UNet call of a 1-step run of the real pipeline,
    in place (a long clip's FreeNoise blocks exist only during the run).  A profiler
    failure is recorded, never fatal."""
    found: list[dict[str, Any]] = []
    try:
        with profile_first_unet_call(
            unet, lambda call: found.append(profile_call(runner, call, cuda=clock.cuda, flops_per_step=flops))
        ) as seen:
            one_step_run()
        if not seen:
            raise RuntimeError("the run made no UNet call to profile")
        profiles.append(found[0])
        print_fn(format_profile(found[0]))
    except Exception as exc:
        traceback.print_exc()
        profiles.append({"runner": runner, "error": _error(exc)})


def _engine(models: Path, device: str, lever: Lever, cache_dir: Path) -> Any:
    from animatediff_blender.backend.engine.animatediff import AnimateDiffEngine

    return AnimateDiffEngine(
        models, device=device, dtype=lever.dtype, fast=lever.fast, compile_cache_dir=cache_dir
    )


def run_engine(
    models: Path, cases: list[Case], device: str, lever: Lever, clock: Clock, seed: int, cache_dir: Path,
    print_fn: Callable[[str], None], profile_case: str | None = None,
    profiles: list[dict[str, Any]] | None = None, flops: dict[str, float] | None = None,
    trace_prefix: Path | None = None,
) -> dict[str, Run]:  # fmt: skip
    """One engine (models loaded once) through every case: warm-up for the case's shape
    (compiles when the lever compiles), then the timed runs.  A profiled job's trace is
    kept beside `trace_prefix` (the result file without its suffix)."""
    engine = _engine(models, device, lever, cache_dir)
    out: dict[str, Run] = {}
    try:
        for case in cases:
            print_fn(f"bench: engine[{lever.name}], {case.name}")
            res = _blank(case, f"engine[{lever.name}]")
            res.extra["fast"] = lever.fast.describe()
            res.extra["dtype"] = lever.dtype
            try:
                request = engine.resolve(_request(case, seed))
                t0 = clock.now()
                engine.warm_up(request.base_model, request.motion_module, requests=[request])
                res.warm_up_s = clock.now() - t0

                def once(request: GenerateRequest = request) -> tuple[float, float, float, list[np.ndarray]]:
                    t0 = clock.now()
                    result = engine.generate(request, lambda _p: None, lambda: False)
                    t1 = clock.now()
                    return (
                        float(result.timings["denoise"]),
                        float(result.timings["decode"]),
                        t1 - t0,
                        result.frames,
                    )

                res.first_run_s, res.denoise_s, res.decode_s, res.end_to_end_s, frames = _timed_runs(
                    once, case.repeats, clock
                )
                res.peak_mem_gib = clock.peak_gib()
                print_fn(format_row(res))
                out[case.name] = Run(res, frames)
                if profile_case is not None and case.name == JOB_PROFILE_CASE and profiles is not None:
                    # The whole job: what share of a short clip the GPU spends waiting.
                    try:
                        # Its timeline: when the GPU waits, and what the host does then.
                        with labelled_job(engine):
                            found = profile_call(
                                f"engine[{lever.name}]", functools.partial(once, request), cuda=clock.cuda,
                                what=f"one {case.name} job", repeats=2, timeline=True,
                                trace_path=_trace_path(trace_prefix, f"engine-{lever.name}", case.name),
                            )  # fmt: skip
                        profiles.append(found)
                        print_fn(format_profile(found))
                    except Exception as exc:
                        traceback.print_exc()
                        profiles.append({"runner": f"engine[{lever.name}]", "what": case.name, "error": _error(exc)})
                if case.name == profile_case and profiles is not None:
                    one_step = msgspec.structs.replace(request, steps=1)
                    _profile(
                        profiles, f"engine[{lever.name}]", engine.pipeline.unet,
                        functools.partial(engine.generate, one_step, lambda _p: None, lambda: False), clock,
                        (flops or {}).get(case.name, 0.0), print_fn,
                    )  # fmt: skip
            except Exception as exc:
                traceback.print_exc()
                res.error = _error(exc)
                out[case.name] = Run(res, [])
                clock.reset_peak()
    finally:
        engine.unload()
    return out


def _trace_path(prefix: Path | None, runner: str, case: str) -> Path | None:
    """`<prefix>.<runner>-<case>-trace.json.gz`, in letters, digits, '.', '_' and '-' only
    (what a GPU machine's results folder hands back)."""
    if prefix is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{runner}-{case}").strip("-")
    return prefix.parent / f"{prefix.name}.{slug}-trace.json.gz"


def run_server(
    models: Path, case: Case, device: str, lever: Lever, clock: Clock, seed: int, cache_dir: Path
) -> Run:
    """The engine behind an in-process server; a client on the same machine submits and
    waits for every frame (persisted on the server before it is sent)."""
    from PIL import Image

    from animatediff_blender.backend.server.config import ServerConfig
    from animatediff_blender.backend.server.server import Server
    from animatediff_blender.protocol.client import BackendClient, ClientConfig

    res = _blank(case, f"server[{lever.name}]")
    res.extra["fast"] = lever.fast.describe()
    warm_request = _request(case, seed)
    lever = dataclasses.replace(
        lever,
        fast=dataclasses.replace(
            lever.fast, warm_shapes=((case.frames, case.width, case.height, case.guidance > 1.0),)
        ),
    )
    engine = _engine(models, device, lever, cache_dir)
    timings: list[dict[str, float]] = []
    generate = engine.generate

    def recording_generate(*args: Any, **kwargs: Any) -> Any:
        result = generate(*args, **kwargs)
        timings.append(dict(result.timings))
        return result

    setattr(engine, "generate", recording_generate)  # noqa: B010 - the server calls engine.generate
    key = os.urandom(32)
    with tempfile.TemporaryDirectory(prefix="adb-bench-server-") as tmp:
        data = Path(tmp)
        server = Server(ServerConfig(key=key, data_dir=data, bind="tcp://127.0.0.1:0"), engine)  # type: ignore[arg-type]
        t0 = clock.now()
        endpoint = server.start()
        try:
            client = BackendClient(ClientConfig(address=endpoint, key=key, client_id="bench", timeout_s=120))
            with client:
                # The handshake during warm-up says so (compiling happens there, not in a job).
                welcome = client.connect()
                res.extra["handshake_warming_up"] = bool(welcome.warming_up)
                # An artist's job submitted as the server starts (after a restart): it waits
                # for the models to load, not for compiling (which yields to it).
                t_submit = clock.now()
                first = client.run_job(warm_request, timeout_s=1200)
                if len(first.frames) != case.frames:
                    raise RuntimeError(f"first job: expected {case.frames} frames, received {len(first.frames)}")
                res.extra["first_job_after_start_s"] = clock.now() - t0
                res.extra["first_job_s"] = clock.now() - t_submit
                deadline = time.monotonic() + 1200
                while server.warming_up and time.monotonic() < deadline:
                    time.sleep(0.01)
                res.warm_up_s = clock.now() - t0

                def once() -> tuple[float, float, float, list[np.ndarray]]:
                    t0 = clock.now()
                    result = client.run_job(warm_request, timeout_s=1200)
                    e2e = clock.now() - t0
                    stored = sorted((data / "jobs" / result.job_id).glob("*.png"))
                    if len(result.frames) != case.frames or len(stored) != case.frames:
                        raise RuntimeError(
                            f"expected {case.frames} frames, received {len(result.frames)}, stored {len(stored)}"
                        )
                    frames = [np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in result.frames]
                    t = timings[-1]
                    return float(t["denoise"]), float(t["decode"]), e2e, frames

                res.first_run_s, res.denoise_s, res.decode_s, res.end_to_end_s, frames = _timed_runs(
                    once, case.repeats, clock
                )
            res.peak_mem_gib = clock.peak_gib()
            engine_total = statistics.median(t["total"] for t in timings[-max(1, case.repeats) :])
            # What the server adds on top of the engine: queueing, PNG encoding, storing,
            # signing, sending, the client's decoding.
            res.extra["engine_total_s"] = engine_total
            res.extra["server_overhead_s"] = res.end_to_end_s - engine_total
            res.extra["server_overhead_share"] = (res.end_to_end_s - engine_total) / res.end_to_end_s
            # What the first job after a (re)start paid on top of a warm job's end to end.
            res.extra["first_job_extra_s"] = res.extra["first_job_after_start_s"] - res.end_to_end_s
            print(format_row(res), flush=True)
        finally:
            server.stop()
    engine.unload()
    return Run(res, frames)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


# --------------------------------------------------------------------------- main


def run_benchmark(
    *,
    size: Size,
    device: str,
    dtype: str,
    workdir: Path,
    only: list[str] | None = None,
    levers: list[str] | None = None,
    compile_anchor: bool = False,
    compile_backend: str = "inductor",
    repeats: int | None = None,
    peak_tflops: float | None = None,
    seed: int = 0,
    out_json: Path | None = None,
    print_fn: Callable[[str], None] = print,
    profile: bool = False,
    engine_only: bool = False,
    anchors: list[str] | None = None,
    profile_case: str = "quality",
    profile_every_lever: bool = False,
) -> dict[str, Any]:
    """`profile`: also profile one UNet step of `profile_case` (stock and the first
    lever, or every lever with `profile_every_lever`).  `engine_only`: no stock runs (no ratios, PSNR or counted FLOPs): for cases
    whose targets compare the engine with itself (128 vs 64 frames, restart warm-up).
    `anchors`: run stock only for these cases (the others as with `engine_only`)."""
    if out_json is not None and out_json.is_dir():  # found now, not when the first rows are saved
        raise ValueError(f"the result file {out_json} is a directory")
    import torch

    cuda = device.startswith("cuda")
    gpu = torch.cuda.get_device_name(torch.device(device)) if cuda else (platform.processor() or "cpu")
    peak = peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in gpu), 0.0)
    all_cases = cases_for(size)
    unknown = sorted(set(only or ()) - set(all_cases))
    if profile_case not in all_cases:
        unknown.append(profile_case)
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; choose from {list(all_cases)}")
    for spec in levers or ["default"]:
        parse_lever(spec, device, dtype, compile_backend)  # bad specs fail before any work
    threads = torch.get_num_threads()
    if size == "tiny" and not cuda:
        # The smoke run's work is tiny: on a shared CI machine, several OpenMP threads
        # per process spin against each other and run ~10x slower than one.
        torch.set_num_threads(1)
    try:
        return _run(
            size=size, device=device, dtype=dtype, workdir=workdir, only=only, levers=levers,
            compile_anchor=compile_anchor, compile_backend=compile_backend, repeats=repeats, peak=peak,
            gpu=gpu, seed=seed, out_json=out_json, print_fn=print_fn, all_cases=all_cases,
            profile_case=profile_case if profile else None, anchors=[] if engine_only else anchors,
            profile_every_lever=profile_every_lever,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def _run(
    *, size: Size, device: str, dtype: str, workdir: Path, only: list[str] | None, levers: list[str] | None,
    compile_anchor: bool, compile_backend: str, repeats: int | None, peak: float, gpu: str, seed: int,
    out_json: Path | None, print_fn: Callable[[str], None], all_cases: dict[str, Case],
    profile_case: str | None, anchors: list[str] | None, profile_every_lever: bool = False,
) -> dict[str, Any]:  # fmt: skip
    import diffusers
    import torch

    started = time.time()
    parsed = [parse_lever(spec, device, dtype, compile_backend) for spec in (levers or ["default"])]
    t_models = time.perf_counter()
    models = build_bench_models(workdir / f"models-{size}", size, init_device=device if size == "real" else "cpu")
    print_fn(f"bench: models ready in {time.perf_counter() - t_models:.1f} s ({models})")
    cache_dir = workdir / "compile-cache"
    clock = Clock(device)
    report: dict[str, Any] = {
        "device": gpu,
        "device_kind": device,
        "dtype": dtype,
        "size": size,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": sys.version.split()[0],
        "cuda": getattr(torch.version, "cuda", None),
        "peak_tflops": peak,
        "levers": [lv.name for lv in parsed],
        "compile_anchor": compile_anchor,
        "compile_backend": compile_backend,
        "anchors": anchors,  # None: every case has its stock anchor
        "started_at": started,
        "cases": {},
        "results": [],
    }

    def save() -> None:
        report["total_s"] = time.time() - started
        if out_json:
            out_json.parent.mkdir(parents=True, exist_ok=True)
            tmp = out_json.with_suffix(".tmp")
            tmp.write_text(json.dumps(report, indent=2, default=str))
            os.replace(tmp, out_json)

    selected = [c for name, c in all_cases.items() if not only or name in only]
    if repeats is not None:
        selected = [dataclasses.replace(c, repeats=repeats) for c in selected]
    for case in selected:
        report["cases"][case.name] = asdict(case)
    # The server case reuses the lightning anchor when that ran (same settings).
    keys = {c.settings_key(): c.name for c in selected if not c.server}
    anchor_of = {c.name: keys.get(c.settings_key(), c.name) for c in selected}
    if anchors is not None:
        unknown_anchors = sorted(set(anchors) - {c.name for c in selected})
        if unknown_anchors:
            raise ValueError(f"--anchor {unknown_anchors}: not among the selected cases")
        anchor_of = {c.name: anchor_of[c.name] for c in selected if anchor_of[c.name] in anchors}
    stock_cases = [c for c in selected if anchor_of.get(c.name) == c.name]

    runs: dict[str, list[Run]] = {c.name: [] for c in selected}
    flops: dict[str, float] = {}

    compared: set[int] = set()

    def partial() -> None:
        """Rows so far, compared with their anchor as soon as it exists (printed then): kept
        if the process is stopped mid-way (a GPU lease running out)."""
        for case in selected:
            anchor_name = anchor_of.get(case.name)
            if anchor_name is None or not runs.get(anchor_name):
                continue
            anchor_run = runs[anchor_name][0]
            for run in runs[case.name]:
                if run is anchor_run or id(run) in compared or run.result.error or anchor_run.result.error:
                    continue
                compared.add(id(run))
                _compare(run.result, run.frames, anchor_run, case, flops.get(anchor_name, 0.0), peak)
                print_fn(format_row(run.result))
        report["partial"] = [r.result.as_dict() for rs in runs.values() for r in rs]
        save()

    profiles: list[dict[str, Any]] = []
    report["profiles"] = profiles
    stock = {} if not stock_cases else run_stock(
        models, stock_cases, device, dtype, clock, seed, compile_backend, compile_anchor, print_fn,
        profile_case, profiles,
    )  # fmt: skip
    for name, (stock_runs, counted) in stock.items():
        runs[name].extend(stock_runs)
        flops[name] = counted
    clock.reset_peak()
    partial()
    for index, lever in enumerate(parsed):
        engine_cases = [c for c in selected if not c.server]
        if engine_cases:
            for name, run in run_engine(
                models, engine_cases, device, lever, clock, seed, cache_dir, print_fn,
                profile_case if index == 0 or profile_every_lever else None, profiles, flops,
                out_json.with_suffix("") if out_json is not None else None,
            ).items():  # fmt: skip
                runs[name].append(run)
            clock.reset_peak()
            partial()
        for case in (c for c in selected if c.server):
            print_fn(f"bench: server[{lever.name}], {case.name}")
            try:
                runs[case.name].append(run_server(models, case, device, lever, clock, seed, cache_dir))
            except Exception as exc:
                traceback.print_exc()
                failed = _blank(case, f"server[{lever.name}]")
                failed.error = _error(exc)
                runs[case.name].append(Run(failed, []))
            clock.reset_peak()
        partial()

    report.pop("partial", None)
    print_fn("bench: results")
    for case in selected:
        print_fn(
            f"bench: {case.name} ({case.frames} frames, {case.width}x{case.height}, {case.steps} steps, "
            f"CFG {case.guidance:g}{', context ' + str(case.context_length) if case.free_noise else ''}"
            f"{', through the server' if case.server else ''})"
        )
        anchor_name = anchor_of.get(case.name)
        if anchor_name is None:  # no stock run for this case: raw rows
            for run in runs[case.name]:
                report["results"].append(run.result.as_dict())
                print_fn(format_row(run.result))
            continue
        anchor_run = runs[anchor_name][0]
        anchor = anchor_run.result
        group = runs[case.name] if anchor_name == case.name else [
            Run(dataclasses.replace(anchor_run.result, case=case.name), anchor_run.frames), *runs[case.name]
        ]  # fmt: skip
        for run in group:
            r = run.result
            r.case = case.name
            if not r.error and anchor.error:
                r.error = f"no anchor: {anchor.error}"
            if r.error:
                report["results"].append(r.as_dict())
                print_fn(format_row(r))
                continue
            if id(run) not in compared:  # the rows partial() compared already keep their fields
                _compare(r, run.frames, anchor_run, case, flops.get(anchor_name, 0.0), peak)
            report["results"].append(r.as_dict())
            print_fn(format_row(r))
    save()
    return report


def _compare(
    r: CaseResult, frames: list[np.ndarray], anchor_run: Run, case: Case, flops_per_step: float, peak: float
) -> None:
    """Fill the fields that compare a successful row with its (successful) stock anchor."""
    anchor = anchor_run.result
    r.flops_per_step = flops_per_step
    r.tflops = flops_per_step * case.steps / r.denoise_s / 1e12 if r.denoise_s > 0 else 0.0
    r.share_of_peak = r.tflops / peak if peak else 0.0
    r.ratio_to_anchor = anchor.denoise_s / r.denoise_s if r.denoise_s > 0 else 0.0
    r.ratio_e2e_to_anchor = anchor.end_to_end_s / r.end_to_end_s if r.end_to_end_s > 0 else 0.0
    try:
        r.psnr_vs_anchor_db = psnr(frames, anchor_run.frames)
    except ValueError as exc:
        r.error = f"PSNR: {exc}"


def format_row(r: CaseResult) -> str:
    """One result line; rows printed while measuring (no anchor comparison yet) leave out
    FLOP/s, ratios and PSNR."""
    if r.error:
        return f"  {r.runner:28s} FAILED: {r.error.splitlines()[0] if r.error else ''}"
    warm = f"  warm-up {r.warm_up_s:.1f} s" if r.warm_up_s is not None else ""
    extra = ""
    if "server_overhead_s" in r.extra:
        extra = f"  server adds {r.extra['server_overhead_s']:.3f} s ({100 * r.extra['server_overhead_share']:.1f}%)"
    if "first_job_extra_s" in r.extra:
        extra += f"  first job after start +{r.extra['first_job_extra_s']:.1f} s"
    line = (
        f"  {r.runner:28s} denoise {r.denoise_s:8.3f} s ({r.s_per_step:.4f} s/step)  decode {r.decode_s:6.3f} s  "
        f"e2e {r.end_to_end_s:8.3f} s  peak {r.peak_mem_gib:6.2f} GiB"
    )
    if r.psnr_vs_anchor_db is not None:
        psnr_txt = "inf" if r.psnr_vs_anchor_db == math.inf else f"{r.psnr_vs_anchor_db:.1f}"
        line += (
            f"  {r.tflops:7.3g} TFLOP/s ({100 * r.share_of_peak:4.1f}% of peak)  x{r.ratio_to_anchor:.2f} denoise"
            f" / x{r.ratio_e2e_to_anchor:.2f} e2e vs stock  PSNR {psnr_txt} dB"
        )
    return f"{line}  first run {r.first_run_s or 0:.2f} s{warm}{extra}"
