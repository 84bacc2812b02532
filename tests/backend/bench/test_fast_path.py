"""The engine's opt-in fast path (FastPath): each lever switchable, applied where it
should be, kept across a job's LoRA / FreeNoise state changes, and frames within a
stated tolerance of the eager path.  On the CPU, torch.compile runs with the "eager"
backend (dynamo's graph capture and the regional wiring, no C++/Triton codegen): the
inductor kernels themselves are measured by the GPU benchmark."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from animatediff_blender.backend.bench.run import parse_lever
from animatediff_blender.backend.engine.animatediff import AnimateDiffEngine, FastPath
from animatediff_blender.backend.engine.interface import EngineError
from animatediff_blender.backend.models.zoo import write_motion_module
from animatediff_blender.protocol.messages import GenerateRequest

pytestmark = pytest.mark.timeout(600)

BASE = "base:tiny-sd15"
MOTION = "motion:tiny-motion-adapter-v2"
ADAPTER = "adapter:v3_sd15_adapter.ckpt"
# Compiled graphs and fused projections sum in another order than eager diffusers.
TOLERANCE = 2  # uint8 levels


def _request(**kw: Any) -> GenerateRequest:
    fields: dict[str, Any] = dict(
        prompt="a cat walking on the beach", negative_prompt="blurry", base_model=BASE, motion_module=MOTION,
        frames=4, width=64, height=64, steps=2, seed=7, preview_every=0,
    )  # fmt: skip
    fields.update(kw)
    return GenerateRequest(**fields)


def _frames(engine: AnimateDiffEngine, **kw: Any) -> np.ndarray:
    result = engine.generate(_request(**kw), lambda _p: None, lambda: False)
    return np.stack(result.frames).astype(np.int16)


def test_lever_specs() -> None:
    assert parse_lever("default", "cpu", "fp32", "inductor").fast == FastPath.off()
    default = parse_lever("default", "cuda", "fp16", "inductor").fast
    # The CUDA default: what the H200 runs measured to pay (backend/bench/README.md).
    assert (default.compile, default.batch_windows, default.compile_vae, default.vae_channels_last) == (
        "regional", True, True, True,
    )  # fmt: skip
    assert not (default.cudnn_benchmark or default.share_window_projections or default.fuse_qkv)
    assert default.ff_chunk_elements == 2**26 and "ff_chunk=67108864" in default.describe()
    assert parse_lever("default+no-ff-chunk", "cuda", "fp16", "inductor").fast.ff_chunk_elements == 0
    assert parse_lever("ff-chunk:4096", "cuda", "fp16", "inductor").fast.ff_chunk_elements == 4096
    split = parse_lever("default+split-batch", "cuda", "fp16", "inductor").fast
    assert split == dataclasses.replace(default, split_batch_over=32) and "split_batch_over=32" in split.describe()
    plus = parse_lever("default+share-projections", "cuda", "fp16", "inductor").fast
    assert plus == dataclasses.replace(default, share_window_projections=True)
    previous = parse_lever("compile+batch-windows", "cuda", "fp16", "inductor").fast
    assert (previous.compile_vae, previous.vae_channels_last) == (False, False)
    cudnn = parse_lever("default+cudnn-benchmark", "cuda", "fp16", "inductor").fast
    assert cudnn == dataclasses.replace(default, cudnn_benchmark=True) and "cudnn_benchmark" in cudnn.describe()
    lever = parse_lever(
        "compile:max-autotune-no-cudagraphs+channels-last+fuse-qkv+sdpa:flash+bf16",
        "cuda",
        "fp16",
        "inductor",
    )
    fast = lever.fast
    assert (fast.compile, fast.compile_mode, fast.channels_last, fast.fuse_qkv, fast.sdpa) == (
        "regional", "max-autotune-no-cudagraphs", True, True, "flash",
    )  # fmt: skip
    assert lever.dtype == "bf16"
    assert parse_lever("compile-full", "cuda", "fp16", "inductor").fast.compile == "full"
    dynamic = parse_lever("compile-dynamic", "cuda", "fp16", "inductor").fast
    assert (dynamic.compile, dynamic.compile_dynamic) == ("regional", True)
    assert "dynamic" in dynamic.describe() and not parse_lever("compile", "cuda", "fp16", "inductor").fast.compile_dynamic
    assert not parse_lever("eager", "cuda", "fp16", "inductor").fast.enabled
    with pytest.raises(ValueError, match="unknown lever"):
        parse_lever("compile+turbo", "cuda", "fp16", "inductor")
    with pytest.raises(ValueError, match="sdpa must be one of"):
        parse_lever("sdpa:warp", "cuda", "fp16", "inductor")
    temporal = parse_lever("default+temporal-sdpa:math", "cuda", "fp16", "inductor").fast
    assert temporal == dataclasses.replace(default, temporal_sdpa="math")
    assert "temporal_sdpa=math" in temporal.describe() and temporal.sdpa == "auto"
    with pytest.raises(ValueError, match="temporal_sdpa must be one of"):
        parse_lever("temporal-sdpa:fastest", "cuda", "fp16", "inductor")
    assert parse_lever("temporal-sdpa:reduced", "cuda", "fp16", "inductor").fast.temporal_sdpa == "reduced"
    assert parse_lever("default+temporal-sdpa:triton", "cuda", "fp16", "inductor").fast.temporal_sdpa == "triton"
    with pytest.raises(ValueError, match="sdpa must be one of"):
        parse_lever("sdpa:reduced", "cuda", "fp16", "inductor")  # the whole UNet: not for 4096 tokens


def test_defaults_per_device(tiny_zoo: Path) -> None:
    assert AnimateDiffEngine(tiny_zoo, "cpu").fast == FastPath.off()  # CPU: stock eager, bit-identical
    assert FastPath.default_for("cuda").compile == "regional"
    assert AnimateDiffEngine(tiny_zoo, "cpu", fast=True).fast.compile == "regional"
    # auto (serve's default): the CUDA default only where inductor can build its kernels.
    assert FastPath.auto_for("cuda", has_triton=True) == FastPath.default_for("cuda")
    assert FastPath.auto_for("cuda", has_triton=False) == FastPath.off()
    assert FastPath.auto_for("cpu", has_triton=True) == FastPath.off()
    with pytest.raises(EngineError, match="compile must be one of"):
        FastPath(compile="everything")
    with pytest.raises(EngineError, match="ff_chunk_elements must be 0"):
        FastPath(ff_chunk_elements=-1)
    with pytest.raises(ValueError, match="split_batch_over must be 0"):
        parse_lever("split-batch:-4", "cuda", "fp16", "inductor")


@pytest.fixture
def one_thread() -> Any:
    """Tiny models: one OpenMP thread is faster than several fighting over shared CI cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def test_cudnn_benchmark_is_on_while_the_engine_runs_on_cuda_and_set_back_after(
    tiny_zoo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from animatediff_blender.backend.engine.interface import GenerationResult

    seen: list[bool] = []
    engine = AnimateDiffEngine(tiny_zoo, "cpu", fast=FastPath(cudnn_benchmark=True))
    result = GenerationResult(frames=[], settings=_request(), timings={})

    def run(*_args: Any, **_kwargs: Any) -> GenerationResult:
        seen.append(torch.backends.cudnn.benchmark)
        return result

    monkeypatch.setattr(engine, "_run", run)
    before = torch.backends.cudnn.benchmark
    assert engine.generate(_request(), lambda _p: None, lambda: False) is result
    engine.device = torch.device("cuda")  # the lever is for cuDNN's convolutions: CUDA only
    engine.generate(_request(), lambda _p: None, lambda: False)
    monkeypatch.setattr(engine, "fast", FastPath())
    engine.generate(_request(), lambda _p: None, lambda: False)
    assert seen == [False, True, False] and torch.backends.cudnn.benchmark == before


def _sdpa_ops_by_query_shape(run: Any) -> dict[tuple[int, ...], set[str]]:
    """The SDPA implementations (aten ops) that ran, by the query's shape."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    found: dict[tuple[int, ...], set[str]] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key.startswith("aten::_scaled_dot_product") and event.input_shapes:
            found.setdefault(tuple(event.input_shapes[0]), set()).add(event.key)
    return found


@pytest.mark.parametrize(
    ("implementation", "long"),
    [("math", True), ("reduced", False), ("reduced", True), ("triton", False), ("triton", True)],
    ids=["math-freenoise-shared-windows", "reduced", "reduced-freenoise-shared-windows", "triton",
         "triton-freenoise-shared-windows"],
)
def test_temporal_sdpa_lever_reaches_only_the_motion_modules(
    tiny_zoo: Path, one_thread: None, implementation: str, long: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compiled (dynamo traces the backend choice / the function mode), with FreeNoise's
    batched windows and their shared projections (which call attention directly): the
    temporal attentions run with the forced backend or written out ("reduced", or the
    project's Triton kernel in Triton's CPU interpreter: no SDPA op at all), the spatial ones
    with torch's choice, the frames unchanged."""
    import torch._dynamo.utils

    launched: list[tuple[int, ...]] = []
    if implementation == "triton":
        # The kernel's maths is checked in Triton's CPU interpreter by
        # tests/backend/engine/test_short_attention.py; here, where a job makes ~170 launches
        # that the interpreter would take minutes over, the launch computes the same thing in
        # torch, and the test checks the wiring: the operator inside compiled motion modules
        # only, its output layout, the frames.
        pytest.importorskip("triton")
        from animatediff_blender.backend.engine import short_attention

        def launch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, rows: int,
                   out: torch.Tensor) -> None:  # fmt: skip
            launched.append(tuple(query.shape))
            weights = torch.softmax((query.float() @ key.float().transpose(-1, -2)) * scale, dim=-1)
            out.copy_(weights @ value.float())

        monkeypatch.setattr(short_attention, "_launch", launch)

    torch._dynamo.utils.counters.clear()
    shape = {"frames": 8, "context_length": 4, "context_stride": 2} if long else {}
    eager = AnimateDiffEngine(tiny_zoo, "cpu", "fp32")
    fast = AnimateDiffEngine(
        tiny_zoo, "cpu", "fp32",
        fast=FastPath(compile="regional", compile_backend="eager", batch_windows=True,
                      share_window_projections=True, temporal_sdpa=implementation, warm_shapes=()),
        defer_compile=False,
    )  # fmt: skip
    _frames(fast, **shape)  # compiles
    frames: list[np.ndarray] = []
    ops = _sdpa_ops_by_query_shape(lambda: frames.append(_frames(fast, **shape)))
    # Query (batch, heads, tokens, dim).  Tiny sizes make some shapes ambiguous; these are not:
    # temporal attention runs on batch x positions sequences of 4 frames (or windows of 4),
    # spatial attention on batch x frames images of 64, 16 or 1 tokens.
    frame_count = shape.get("frames", 4)
    temporal = {s: o for s, o in ops.items() if s[0] > 2 * frame_count}
    spatial = {s: o for s, o in ops.items() if s[2] not in (4, frame_count)}
    assert len(spatial) >= 3
    if implementation in ("reduced", "triton"):
        assert not temporal, temporal
        if implementation == "triton":  # they went to the kernel (4 frames or windows of 4)
            assert launched and {s[2] for s in launched} == {4}
    else:
        assert temporal and all(s[2] == 4 for s in temporal)
        assert all(o == {"aten::_scaled_dot_product_attention_math"} for o in temporal.values()), temporal
    assert all("aten::_scaled_dot_product_attention_math" not in o for o in spatial.values()), spatial
    assert np.abs(frames[0] - _frames(eager, **shape)).max() <= TOLERANCE
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


def test_levers_apply_survive_job_state_and_keep_frames(
    tiny_zoo: Path, tmp_path: Path, one_thread: None
) -> None:
    from diffusers.models.attention import FreeNoiseTransformerBlock
    from diffusers.models.attention_processor import FusedAttnProcessor2_0
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    kinds = (Transformer2DModel, AnimateDiffTransformer3D, ResnetBlock2D)

    eager = AnimateDiffEngine(tiny_zoo, "cpu", "fp32")
    fast = AnimateDiffEngine(
        tiny_zoo, "cpu", "fp32",
        fast=FastPath(compile="regional", compile_backend="eager", channels_last=True, fuse_qkv=True, sdpa="math",
                      warm_shapes=((4, 64, 64, True),)),
        compile_cache_dir=tmp_path / "cache", defer_compile=False,
    )  # fmt: skip
    fast.warm_up(BASE, MOTION)  # compiles here, not in the first job
    assert fast.warm_up_s is not None and fast.warm_up_s > 0
    unet = fast.pipeline.unet
    blocks = [m for m in unet.modules() if isinstance(m, kinds)]
    assert {type(b) for b in blocks} == set(kinds) and all(_compiled(m) for m in blocks)
    spatial = fast._spatial_attentions(unet)
    assert spatial and all(isinstance(a.processor, FusedAttnProcessor2_0) for a in spatial)
    conv = unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()

    plain = _frames(eager)
    assert np.abs(_frames(fast) - plain).max() <= TOLERANCE

    # A domain adapter (a LoRA on the spatial attention projections) must take effect: the
    # fused processor would bypass peft's layers, so the engine unfuses for the job.
    with_adapter = _frames(eager, domain_adapter=ADAPTER, domain_adapter_scale=1.0)
    assert np.abs(with_adapter - plain).max() > 10 * TOLERANCE  # the adapter matters
    assert (
        np.abs(_frames(fast, domain_adapter=ADAPTER, domain_adapter_scale=1.0) - with_adapter).max()
        <= TOLERANCE
    )
    assert all(isinstance(a.processor, FusedAttnProcessor2_0) for a in fast._spatial_attentions(unet))

    # FreeNoise swaps the motion modules' blocks in and out: its window loop runs eagerly,
    # each window's attention and the feed-forward compiled; afterwards the plain blocks
    # (still compiled) are back.
    long = {"frames": 8, "context_length": 4, "context_stride": 2}
    windowed: list[Any] = []

    def watch(_progress: Any) -> None:
        if not windowed:
            windowed.extend(m for m in unet.modules() if isinstance(m, FreeNoiseTransformerBlock))

    result = fast.generate(_request(**long), watch, lambda: False)
    assert np.abs(np.stack(result.frames).astype(np.int16) - _frames(eager, **long)).max() <= TOLERANCE
    assert windowed and all(_compiled(w.attn1) and _compiled(w.ff) for w in windowed)
    blocks = [m for m in unet.modules() if isinstance(m, kinds)]
    assert all(_compiled(m) for m in blocks)
    assert not any(isinstance(m, FreeNoiseTransformerBlock) for m in unet.modules())


def test_compile_cache_dir_is_used_and_a_bad_cache_is_survived(
    tiny_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "mega-cache.bin").write_bytes(b"not a cache")
    engine = AnimateDiffEngine(
        tiny_zoo, "cpu", fast=FastPath(compile="regional", compile_backend="eager"), compile_cache_dir=cache
    )
    engine._load_compile_cache()  # logs a warning, does not raise
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache / "inductor")
    assert (cache / "inductor").is_dir()

    # Inductor puts its own default into the environment when first asked: that is not a
    # user's choice and gives way to the data directory's cache (else the compiled kernels
    # would sit in /tmp, gone after a reboot).  A user's own setting is kept.
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    for preset, expected in ((default_cache_dir(), str(cache / "inductor")), (str(tmp_path / "mine"), None)):
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", preset)
        again = AnimateDiffEngine(
            tiny_zoo, "cpu", fast=FastPath(compile="regional", compile_backend="eager"), compile_cache_dir=cache
        )
        again._load_compile_cache()
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == (expected or preset)
    engine._save_compile_cache()  # nothing compiled yet: no crash


def test_dynamic_compile_serves_two_clip_lengths(tiny_zoo: Path, one_thread: None) -> None:
    """compile_dynamic: the same compiled blocks serve another clip length (torch makes the
    changed dimension symbolic) and the frames still match the eager path."""
    eager = AnimateDiffEngine(tiny_zoo, "cpu", "fp32")
    fast = AnimateDiffEngine(
        tiny_zoo, "cpu", "fp32",
        fast=FastPath(compile="regional", compile_backend="eager", compile_dynamic=True, warm_shapes=((4, 64, 64, True),)),
        defer_compile=False,  # the second length compiles in its job: that is what is tested
    )  # fmt: skip
    fast.warm_up(BASE, MOTION)
    for frames in (4, 6):
        assert np.abs(_frames(fast, frames=frames) - _frames(eager, frames=frames)).max() <= TOLERANCE


@pytest.mark.parametrize("share", [False, True], ids=["batch-windows", "share-projections"])
def test_batched_windows_lever_traces_long_clips_whole(tiny_zoo: Path, one_thread: None, share: bool) -> None:
    """batch_windows: long clips run FreeNoise's windows batched, inside the compiled motion
    modules without a graph break, with frames within the tolerance of stock FreeNoise's;
    share_window_projections the same, each frame's shared projections run once."""
    from torch._dynamo.utils import counters

    from animatediff_blender.backend.engine.freenoise import BatchedWindowsBlock

    eager = AnimateDiffEngine(tiny_zoo, "cpu", "fp32")
    fast = AnimateDiffEngine(
        tiny_zoo, "cpu", "fp32",
        fast=FastPath(compile="regional", compile_backend="eager", batch_windows=True, share_window_projections=share,
                      warm_shapes=()),
        defer_compile=False,  # the long job compiles in place: its graphs are what is checked
    )  # fmt: skip
    assert "batch_windows" in fast.fast.describe()
    assert ("share_window_projections" in fast.fast.describe()) == share
    assert parse_lever("compile+batch-windows", "cuda", "fp16", "inductor").fast.batch_windows
    lever = parse_lever("default+share-projections", "cuda", "fp16", "inductor").fast
    assert lever.batch_windows and lever.share_window_projections and lever.compile == "regional"
    with pytest.raises(EngineError, match="needs batch_windows"):
        FastPath(share_window_projections=True)
    fast.warm_up(BASE, MOTION)
    unet = fast.pipeline.unet
    seen: list[Any] = []

    def watch(_progress: Any) -> None:
        if not seen:
            seen.extend(m for m in unet.modules() if isinstance(m, BatchedWindowsBlock))
            assert all(m.share_projections == share and m._can_share() for m in seen)

    long = {"frames": 10, "context_length": 4, "context_stride": 2}
    torch._dynamo.reset()  # count this job's graphs from nothing
    counters.clear()
    result = fast.generate(_request(**long), watch, lambda: False)
    assert seen, "no batched-window block was swapped in"
    # diffusers' window loop, compiler-disabled inside the motion module's own loop over its
    # blocks, made dynamo skip the whole motion module ("graph break in loop").
    assert counters["stats"]["unique_graphs"] > 0
    assert not counters["graph_break"] and not counters["unimplemented"], dict(counters["unimplemented"])
    reference = _frames(eager, **long)
    assert np.abs(np.stack(result.frames).astype(np.int16) - reference).max() <= TOLERANCE
    assert not any(isinstance(m, BatchedWindowsBlock) for m in unet.modules())  # plain blocks back

    # After an out-of-memory the job reruns with diffusers' split inference wrapped around
    # each motion block: the batched block runs per spatial chunk, same frames.
    fast.memory_saving = True
    assert np.abs(_frames(fast, **long) - reference).max() <= TOLERANCE


def test_compiled_vae_decodes_fixed_chunks(tiny_zoo: Path, one_thread: None) -> None:
    """compile_vae: the decoder is compiled, sees one batch shape whatever the clip length
    (the last chunk padded, the copies dropped), and the frames match the eager path."""
    eager = AnimateDiffEngine(tiny_zoo, "cpu", "fp32")
    fast = AnimateDiffEngine(
        tiny_zoo, "cpu", "fp32", stream_chunk_size=4,
        fast=FastPath(compile_backend="eager", compile_vae=True, vae_channels_last=True, warm_shapes=((4, 64, 64, True),)),
        defer_compile=False,
    )  # fmt: skip
    assert fast.fast.compiles and "compile_vae" in fast.fast.describe()
    assert parse_lever("vae-compile+vae-channels-last", "cuda", "fp16", "inductor").fast.compile_vae
    fast.warm_up(BASE, MOTION)
    vae = fast.pipeline.vae
    assert _compiled(vae.decoder) and not _compiled(fast.pipeline.unet)
    assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    shapes: list[tuple[int, ...]] = []
    decode = vae.decode

    def recording(latents: torch.Tensor, *a: Any, **kw: Any) -> Any:
        shapes.append(tuple(latents.shape))
        return decode(latents, *a, **kw)

    vae.decode = recording
    streamed: list[tuple[int, int]] = []
    result = fast.generate(
        _request(frames=6), lambda _p: None, lambda: False, on_frames=lambda start, f: streamed.append((start, len(f)))
    )
    assert len(result.frames) == 6 and streamed == [(0, 4), (4, 2)]
    assert {s[0] for s in shapes} == {4}  # 4 frames, then 2 padded to 4
    assert np.abs(np.stack(result.frames).astype(np.int16) - _frames(eager, frames=6)).max() <= TOLERANCE


def test_a_shape_not_compiled_yet_runs_eagerly_and_compiles_while_idle(tiny_zoo: Path, one_thread: None) -> None:
    """defer_compile (the default): no job waits for a compile.  A job whose shape was not
    warmed runs eagerly (no graph traced), its shape compiles in warm_pending(), and the
    next job of that shape runs compiled without tracing anything new.  warm_up stops before
    a shape when a job is waiting and leaves that shape to warm_pending()."""
    from torch._dynamo.utils import counters

    eager = AnimateDiffEngine(tiny_zoo, "cpu", "fp32")
    fast = AnimateDiffEngine(
        tiny_zoo, "cpu", "fp32",
        fast=FastPath(compile="regional", compile_backend="eager", warm_shapes=((4, 64, 64, True), (6, 64, 64, True))),
    )  # fmt: skip
    # A job arrives once the first shape is compiled (should_yield is also asked inside a
    # shape's run: see the next test).
    assert fast.warm_up(BASE, MOTION, should_yield=lambda: len(fast._warm_keys) == 1) is False
    assert fast.pending_warm_ups == 1  # the 6-frame shape

    def graphs() -> int:
        return int(counters["stats"]["unique_graphs"])

    before = graphs()
    deferred = _frames(fast, frames=6)
    assert graphs() == before  # ran eagerly: nothing traced in the artist's job
    assert np.abs(deferred - _frames(eager, frames=6)).max() == 0  # eager maths: the same frames
    odd = _frames(fast, frames=5)  # another shape, not warmed either
    assert fast.pending_warm_ups == 2 and graphs() == before

    assert fast.warm_pending(should_yield=lambda: False) is True
    assert fast.pending_warm_ups == 0 and graphs() > before
    compiled = graphs()
    assert np.abs(_frames(fast, frames=6) - deferred).max() <= TOLERANCE
    assert np.abs(_frames(fast, frames=5) - odd).max() <= TOLERANCE
    assert graphs() == compiled  # both shapes were compiled while idle
    assert fast.warm_pending(should_yield=lambda: True) is True  # nothing left


def test_a_job_arriving_mid_compile_interrupts_it_between_unet_blocks(tiny_zoo: Path, one_thread: None) -> None:
    """A cold shape compiles inside its first UNet call (over a minute on an H200): a job
    arriving meanwhile stops it at the next UNet block, not at the end of the shape.  The
    regions compiled so far are kept; the shape is compiled first when the device is idle."""
    from torch._dynamo.utils import counters

    eager = AnimateDiffEngine(tiny_zoo, "cpu", "fp32")
    fast = AnimateDiffEngine(
        tiny_zoo, "cpu", "fp32",
        fast=FastPath(compile="regional", compile_backend="eager", warm_shapes=((4, 64, 64, True), (6, 64, 64, True))),
    )  # fmt: skip
    torch._dynamo.reset()
    counters.clear()
    asked: list[int] = []  # graphs traced so far, at each question

    def job_arrives_in_the_second_unet_block() -> bool:
        # asked before the shape, at the run's start, then before each UNet block
        asked.append(int(counters["stats"]["unique_graphs"]))
        return len(asked) >= 4

    assert fast.warm_up(BASE, MOTION, should_yield=job_arrives_in_the_second_unet_block) is False
    partial = int(counters["stats"]["unique_graphs"])
    # Asked in the middle of the first UNet call: the first down block's regions were traced
    # between the last two questions (asked at step ends only, nothing would be new there).
    assert len(asked) == 4 and asked[2] < asked[3] == partial
    assert partial > 0  # the first block's regions compiled ...
    assert fast.pending_warm_ups == 2  # ... but neither shape counts as compiled
    assert _frames(fast, frames=6).shape[0] == 6  # the waiting job runs (eagerly)

    # Idle again: interrupted once more mid-shape, the shape stays first in line.
    asked.clear()
    assert fast.warm_pending(should_yield=job_arrives_in_the_second_unet_block) is False
    assert fast.pending_warm_ups == 2
    assert fast.warm_pending(should_yield=lambda: False) is True
    assert fast.pending_warm_ups == 0 and int(counters["stats"]["unique_graphs"]) > partial
    compiled = int(counters["stats"]["unique_graphs"])
    assert np.abs(_frames(fast, frames=4) - _frames(eager, frames=4)).max() <= TOLERANCE
    assert int(counters["stats"]["unique_graphs"]) == compiled  # nothing left to compile


@pytest.fixture
def failing_backend() -> str:
    """A torch.compile backend that fails as inductor does without triton."""
    from torch._dynamo import register_backend
    from torch._dynamo.backends.registry import _BACKENDS, _COMPILER_FNS

    name = "adb_failing_test_backend"

    def failing(gm: Any, example_inputs: Any) -> Any:
        raise RuntimeError("Cannot find a working triton installation")

    register_backend(failing, name=name)
    yield name
    _COMPILER_FNS.pop(name, None)
    _BACKENDS.pop(name, None)


def test_a_compiler_that_fails_leaves_jobs_running_eagerly(
    tiny_zoo: Path, one_thread: None, failing_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """No triton (or a compiler bug): the warm-up does not raise, says why once, and from
    then on every job runs eagerly -- the same frames as stock -- and nothing is queued
    to compile again (each try would hold the device and fail the same way)."""
    eager = AnimateDiffEngine(tiny_zoo, "cpu", "fp32")
    fast = AnimateDiffEngine(
        tiny_zoo, "cpu", "fp32",
        fast=FastPath(compile="regional", compile_backend=failing_backend, warm_shapes=((4, 64, 64, True),)),
    )  # fmt: skip
    with caplog.at_level("ERROR"):
        assert fast.warm_up(BASE, MOTION) is True  # ready: nothing left that could compile
    assert fast.compile_error is not None and "triton" in fast.compile_error
    assert "jobs run at stock speed" in caplog.text
    for frames in (4, 6):  # the failed shape and one never tried
        assert np.abs(_frames(fast, frames=frames) - _frames(eager, frames=frames)).max() == 0
        assert fast.pending_warm_ups == 0

    # The same when the first failure comes while compiling an idle shape.
    idle = AnimateDiffEngine(
        tiny_zoo, "cpu", "fp32",
        fast=FastPath(compile="regional", compile_backend=failing_backend, warm_shapes=()),
    )  # fmt: skip
    idle.warm_up(BASE, MOTION)
    _frames(idle, frames=4)
    assert idle.pending_warm_ups == 1 and idle.compile_error is None
    assert idle.warm_pending() is True and idle.compile_error is not None
    assert np.abs(_frames(idle, frames=6) - _frames(eager, frames=6)).max() == 0
    assert idle.pending_warm_ups == 0


def test_idle_compiling_follows_the_loaded_models(tiny_zoo: Path, one_thread: None) -> None:
    """A shape left to compile for a model that is no longer loaded is dropped (compiling it
    would reload that model); a rebuilt pipeline's shapes count as not compiled again."""
    other = "base:tiny-sd15-ldm.safetensors"
    fast = AnimateDiffEngine(
        tiny_zoo, "cpu", "fp32",
        fast=FastPath(compile="regional", compile_backend="eager", warm_shapes=((4, 64, 64, True),)),
    )  # fmt: skip
    fast.warm_up(BASE, MOTION)
    assert fast.pending_warm_ups == 0
    _frames(fast, base_model=other)  # another base model: loaded, runs eagerly
    assert fast.pending_warm_ups == 1
    _frames(fast)  # back to the first: a new pipeline, so its shape is not compiled any more
    assert fast.pending_warm_ups == 2
    loads = fast.load_counts["base"]
    assert fast.warm_pending() is True and fast.pending_warm_ups == 0
    assert fast.load_counts["base"] == loads  # the other model's shape was dropped, not reloaded


def _v2_models(tiny_zoo: Path, tmp_path: Path) -> Path:
    """A writable models folder: the tiny base and the v2 motion module (original layout)."""
    import shutil

    models = tmp_path / "models"
    shutil.copytree(tiny_zoo / "base/tiny-sd15", models / "base/tiny-sd15")
    (models / "motion").mkdir()
    shutil.copy2(tiny_zoo / "motion/mm_sd_v15_v2.safetensors", models / "motion")
    return models


def test_a_pending_shape_of_the_swapped_out_module_compiles_on_the_loaded_one(
    tiny_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Fast job ran eagerly (its shape not compiled yet) and the artist went back to Quality
    before the device was idle: the pending shape is compiled on the loaded v2 module, whose
    UNet the Lightning module's weights will take again (the graphs serve both).  It used to
    be dropped as "for models no longer loaded", and the next Fast job ran eagerly again."""
    models = _v2_models(tiny_zoo, tmp_path)
    write_motion_module(models / "motion/animatediff_lightning_4step.safetensors", "v2", 5)
    fast = AnimateDiffEngine(
        models, "cpu", "fp32", fast=FastPath(compile="regional", compile_backend="eager", warm_shapes=()),
    )  # fmt: skip
    _frames(fast, base_model=None, motion_module=None, preset="lightning", steps=1, guidance=1.0)
    _frames(fast, base_model=None, motion_module=None)  # Quality: back to v2 by a weight copy
    assert fast.load_counts["motion_swap"] == 1 and fast.pending_warm_ups == 2
    warmed: list[Any] = []
    monkeypatch.setattr(fast, "_warm_run", lambda request, _should_yield: warmed.append(request))
    assert fast.warm_pending() is True
    v2 = "motion:mm_sd_v15_v2.safetensors"
    assert [(r.motion_module, r.guidance) for r in warmed] == [(v2, 1.0), (v2, 7.5)]


def test_a_motion_module_replaced_on_disk_runs_compiled_or_is_compiled_anew_while_idle(
    tiny_zoo: Path, tmp_path: Path, one_thread: None
) -> None:
    """A motion module replaced under its name.  Of the same architecture (a retrained v2):
    its weights go into the compiled motion UNet, and the next job runs compiled at once (no
    new graph, nothing left to warm) with the new weights.  Of another (v3, no mid-block
    module): the UNet is rebuilt, its shape is not compiled any more -- the job runs eagerly
    (no graph traced in it) and the shape compiles in warm_pending(), on the new modules."""
    import os

    from torch._dynamo.utils import counters

    models = _v2_models(tiny_zoo, tmp_path)
    mm = models / "motion/mm_sd_v15_v2.safetensors"
    motion = "motion:mm_sd_v15_v2.safetensors"
    fast = AnimateDiffEngine(
        models, "cpu", "fp32",
        fast=FastPath(compile="regional", compile_backend="eager", warm_shapes=((4, 64, 64, True),)),
    )  # fmt: skip
    fast.warm_up(BASE, motion)
    assert fast.pending_warm_ups == 0
    unet = fast.pipeline.unet
    before = _frames(fast, motion_module=motion)

    def replace(version: str, seed: int) -> None:
        old = mm.stat()
        tmp = mm.with_name("new.partial")
        write_motion_module(tmp, version, seed)
        os.replace(tmp, mm)
        os.utime(mm, ns=(old.st_atime_ns, old.st_mtime_ns + 1_000_000_000))

    replace("v2", 77)
    graphs = int(counters["stats"]["unique_graphs"])
    retrained = _frames(fast, motion_module=motion)
    assert fast.pipeline.unet is unet and fast.load_counts["motion_swap"] == 1
    assert int(counters["stats"]["unique_graphs"]) == graphs and fast.pending_warm_ups == 0
    eager = AnimateDiffEngine(models, "cpu", "fp32")
    assert np.abs(retrained - _frames(eager, motion_module=motion)).max() <= TOLERANCE
    assert np.abs(retrained - before).max() > TOLERANCE  # the new weights, not the compiled old ones

    replace("v3", 78)
    graphs = int(counters["stats"]["unique_graphs"])
    replaced = _frames(fast, motion_module=motion)
    assert fast.pipeline.unet is not unet and fast.load_counts["motion"] == 3
    assert int(counters["stats"]["unique_graphs"]) == graphs  # ran eagerly
    assert fast.pending_warm_ups == 1
    assert fast.warm_pending() is True and fast.pending_warm_ups == 0
    eager = AnimateDiffEngine(models, "cpu", "fp32")
    assert np.abs(_frames(fast, motion_module=motion) - _frames(eager, motion_module=motion)).max() <= TOLERANCE
    assert np.abs(replaced - _frames(eager, motion_module=motion)).max() == 0
    assert fast.load_counts["motion"] == 3
