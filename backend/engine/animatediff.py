"""The real engine: AnimateDiff on diffusers 0.42.1's `AnimateDiffPipeline`.

Everything that decides the frames is stock diffusers (the pipeline's own denoising loop,
FreeNoise for long clips, peft LoRA adapters); this module only chooses settings, keeps
models warm between jobs, reports progress and makes sure that one job's state (LoRAs,
context windows, memory-saving wrappers) never leaks into the next.

Per job the pipeline goes through a fixed sequence, undone in reverse in a `finally`:

1. FreeNoise on (long clips, prompt travel).  It swaps the motion modules' transformer
   blocks, keeping their names, and must come before LoRAs: the swap reloads the blocks'
   state dicts strictly and would fail on peft-wrapped layers.
2. LoRAs (MotionLoRAs + domain adapter, whose kohya style LoRAs may also adapt the text
   encoder) injected with peft and *verified* (see `_verify_lora`): every tensor read from
   the file must be in the model.
3. Memory savers for long clips (split inference wrappers, chunked feed-forward).  These
   rename modules, which is why they come after LoRA injection and verification.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import re
import threading
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch

from animatediff_blender.backend.models.convert import TEXT_ENCODER_PREFIX
from animatediff_blender.protocol.messages import GenerateRequest, ModelInfo

from .attention import SDPA_BACKENDS, TEMPORAL_ATTENTION, with_attention
from .chunking import FF_CHUNK_ELEMENTS, chunk_feed_forwards, in_batch_elements
from .interface import (
    CancelCheck,
    EngineError,
    FrameSink,
    GenerationResult,
    JobCancelled,
    ProgressCallback,
    StepProgress,
)
from .presets import DEFAULT_CONTEXT_LENGTH, DEFAULT_CONTEXT_STRIDE, PRESETS, get_preset

log = logging.getLogger(__name__)

# Latent -> RGB approximation for SD1.x latents (the widely used factors of
# ComfyUI's / A1111's "approx" previewer): rgb = latent^T @ F, roughly in [-1, 1].
SD15_LATENT_RGB_FACTORS = torch.tensor(
    [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ]
)
PREVIEW_MAX_SIDE = 128

# Which registry kind each request field must name.
_FIELD_KINDS = {
    "base_model": "base",
    "motion_module": "motion",
    "motion_loras": "lora",
    "domain_adapter": "adapter",
}

_DTYPES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}

_COMPILE_KINDS = ("off", "regional", "full")
MEGA_CACHE_FILE = "mega-cache.bin"


@dataclass(frozen=True)
class FastPath:
    """Opt-in speed levers on top of stock diffusers (each one switchable, for measuring).

    None of them changes the maths beyond float rounding: compiled kernels and fused
    projections sum in another order, so frames match the eager pipeline within a
    tolerance (the benchmark reports the PSNR), not bit for bit.  `FastPath.off()` is the
    stock eager path, the CPU default, bit-identical to stock diffusers.

    compile: "regional" compiles each whole spatial transformer, motion module, ResNet block
        and sampler in place with `dynamic=False` (one graph per class and input shape), so
        FreeNoise/LoRA/memory-saving swaps of submodules only recompile what they touch.
        On an H200 it matched compiling the whole UNet (2.90 s vs 2.87 s for 16 frames,
        25 steps; stock 4.09 s) after ~90 s of warm-up; each new clip length or size
        compiles its shapes once (~50 s for 64 frames) -- with the engine's
        `defer_compile` (default) while the device is idle, its first job running
        eagerly.  "full" compiles the whole UNet (a LoRA set or clip length recompiles
        all of it).
    compile_mode: torch.compile mode ("default", "max-autotune-no-cudagraphs",
        "reduce-overhead" = CUDA graphs, "max-autotune").
    compile_backend: "inductor"; tests use "aot_eager" (no C++/Triton codegen).
    compile_dynamic: False compiles one graph per input shape (each new clip length or size
        compiles on its first job); True lets torch make a dimension symbolic once it has
        seen it change (`dynamic=None`): fewer compiles, possibly slower kernels.
    channels_last: UNet weights in NHWC layout.
    fuse_qkv: one QKV projection per spatial self-attention (KV for cross-attention);
        undone for jobs with LoRAs (peft adapts to_q/to_k/to_v, which the fused processor
        would bypass).
    sdpa: scaled-dot-product attention backend ("auto" lets torch choose).
    temporal_sdpa: the backend of the motion modules' temporal attention only (16-frame
        sequences, up to 131,072 of them per head, where kernels built for long sequences
        may waste most of their tiles; `bench-attention` times each backend at each of a
        step's shapes); inside them it overrides `sdpa`.  "reduced" is no SDPA backend:
        the attention written out as float32 multiply-sums, fused by inductor
        (`engine/attention.py`).
    batch_windows: long clips (FreeNoise) run each motion block's context windows as one
        batch (`freenoise.BatchedWindowsBlock`, bounded memory) instead of diffusers' loop
        of one window at a time with eager glue; compiled, the block traces whole.
    share_window_projections: with `batch_windows`, the projections that every window of a
        frame repeats (the first attention's q/k/v, the second's output) run once per frame:
        -9.1 % of a 64-frame step's FLOPs (174.3 -> 158.4 TFLOP), same maths up to the
        order of float sums; about the same memory (eager peak of the first motion block of a
        64-frame 512x512 CFG clip: 6.60 against 6.41 GiB, both set by the feed-forward).
        Not the default until a GPU run shows it pays.
    compile_vae: compile the VAE decoder (same mode/backend as the UNet, one graph per
        chunk shape: clips decode in chunks of `stream_chunk_size` frames, the last chunk
        padded).  The decode was 0.27 s of a 0.57 s lightning clip on an H200.
    vae_channels_last: VAE weights in NHWC layout (its convolutions dominate the decode).
    ff_chunk_elements: every feed-forward (spatial and motion, FreeNoise's windowed blocks
        included) whose input holds more elements than this runs on chunks of its rows
        (`engine/chunking.py`; 0: never).  Per-token maths, so the same tokens come out; only
        long or large clips reach the budget, where the feed-forward's widened tensor set
        the peak (64 frames at 512x512: 8.59 -> 5.47 GiB of activations per UNet call,
        estimated on the meta device by `scripts/memory_probe.py`; 16 frames: 2.03 GiB,
        untouched).
    split_batch_over: a UNet call on more images than this (batch x frames) runs one batch
        element, i.e. one CFG half, at a time (`chunking.in_batch_elements`; 0: never): the
        halves never meet inside the UNet, so a long clip holds half the activations, with
        batched windows as many windows per batch as the whole pair had (estimated: 64 frames
        5.47 -> 3.13 GiB with the feed-forward chunks, ~1.24x the 16-frame clip's measured
        peak) for two calls per step on half the images.  Not the default until a GPU run
        measures its time.
    cudnn_benchmark: while the engine runs (jobs and warm-up), cuDNN times its convolution
        algorithms for each new input shape and keeps the fastest (`torch.backends.cudnn.
        benchmark`, off in torch by default; set back afterwards).  The UNet's and the VAE's
        convolutions go through cuDNN, compiled or not; the shapes of a clip are fixed, so the
        timing is paid once per shape, during warm-up for the warm shapes.  Another
        algorithm may round differently (the benchmark reports the PSNR).
    warm_shapes: (frames, width, height, cfg) that `warm_up` compiles for, so that the
        first artist's job does not pay for compilation.
    """

    compile: str = "off"
    compile_mode: str = "default"
    compile_backend: str = "inductor"
    compile_dynamic: bool = False
    channels_last: bool = False
    fuse_qkv: bool = False
    sdpa: str = "auto"
    temporal_sdpa: str = "auto"
    batch_windows: bool = False
    share_window_projections: bool = False
    compile_vae: bool = False
    vae_channels_last: bool = False
    ff_chunk_elements: int = 0
    split_batch_over: int = 0
    cudnn_benchmark: bool = False
    warm_shapes: tuple[tuple[int, int, int, bool], ...] = field(
        default=((16, 512, 512, True), (16, 512, 512, False))
    )

    def __post_init__(self) -> None:
        if self.compile not in _COMPILE_KINDS:
            raise EngineError(
                "device", f"fast path: compile must be one of {_COMPILE_KINDS}, got {self.compile!r}"
            )
        for name, allowed in (("sdpa", SDPA_BACKENDS), ("temporal_sdpa", TEMPORAL_ATTENTION)):
            if getattr(self, name) not in allowed:
                raise EngineError(
                    "device", f"fast path: {name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        for name in ("ff_chunk_elements", "split_batch_over"):
            if getattr(self, name) < 0:
                raise EngineError("device", f"fast path: {name} must be 0 (off) or positive, got {getattr(self, name)}")
        if self.share_window_projections and not self.batch_windows:
            raise EngineError("device", "fast path: share_window_projections needs batch_windows")

    @classmethod
    def off(cls) -> FastPath:
        return cls()

    @classmethod
    def default_for(cls, device: torch.device | str) -> FastPath:
        """On by default on CUDA, off on the CPU (inductor's CPU compile costs more than it
        saves, and the CPU path stays bit-identical to stock diffusers).  On CUDA: regional
        compile (measured: x1.41 on 16 frames) and batched FreeNoise windows (diffusers'
        window loop, a graph break inside the motion module's loop over its blocks, made
        dynamo run every motion module of a long clip eagerly; 64 frames ran at 192 TFLOP/s
        against 306 for 16), and the VAE decoder compiled and channels-last (H200, one run,
        lightning clip: decode 0.213 -> 0.141 s, through the server 0.403 s end to end, peak
        memory 10.9 -> 4.2 GiB since a compiled decoder decodes a few frames at a time;
        cuDNN's benchmark mode, measured with it, made the denoise slower: left off), and
        feed-forwards in row chunks beyond 16 frames' worth (long clips' peak; estimated, not yet
        measured on a GPU)."""
        if torch.device(device).type != "cuda":
            return cls.off()
        return cls(
            compile="regional", batch_windows=True, compile_vae=True, vae_channels_last=True,
            ff_chunk_elements=FF_CHUNK_ELEMENTS,
        )  # fmt: skip

    @classmethod
    def auto_for(cls, device: torch.device | str, has_triton: bool | None = None) -> FastPath:
        """`default_for`, where it can run: inductor compiles CUDA kernels with triton, which
        some installs lack (Windows wheels of torch come without it).  Without it, the stock
        path, and a warning saying so, rather than a compile that fails at every warm-up."""
        fast = cls.default_for(device)
        if has_triton is None:
            import importlib.util

            has_triton = importlib.util.find_spec("triton") is not None
        if fast.compiles and not has_triton:
            log.warning(
                "fast path off: torch.compile needs the triton package, which is not installed "
                "(install triton for about 1.4x faster jobs, or pass --fast off to silence this)"
            )
            return cls.off()
        return fast

    @property
    def compiles(self) -> bool:
        """Whether anything is compiled (the UNet's blocks or the VAE decoder)."""
        return self.compile != "off" or self.compile_vae

    @property
    def enabled(self) -> bool:
        return self != replace(FastPath.off(), warm_shapes=self.warm_shapes)

    def describe(self) -> str:
        if not self.enabled:
            return "off"
        parts = []
        if self.compile != "off":
            parts.append(f"compile={self.compile}:{self.compile_mode}" + (":dynamic" if self.compile_dynamic else ""))
        if self.channels_last:
            parts.append("channels_last")
        if self.fuse_qkv:
            parts.append("fuse_qkv")
        if self.sdpa != "auto":
            parts.append(f"sdpa={self.sdpa}")
        if self.temporal_sdpa != "auto":
            parts.append(f"temporal_sdpa={self.temporal_sdpa}")
        if self.batch_windows:
            parts.append("batch_windows")
        if self.share_window_projections:
            parts.append("share_window_projections")
        if self.compile_vae:
            parts.append("compile_vae")
        if self.vae_channels_last:
            parts.append("vae_channels_last")
        if self.ff_chunk_elements:
            parts.append(f"ff_chunk={self.ff_chunk_elements}")
        if self.split_batch_over:
            parts.append(f"split_batch_over={self.split_batch_over}")
        if self.cudnn_benchmark:
            parts.append("cudnn_benchmark")
        return ",".join(parts)


@contextmanager
def _cudnn_benchmark(on: bool) -> Iterator[None]:
    """Inside the block, cuDNN picks convolution algorithms by timing them (when `on`)."""
    if not on:
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


PROMPT_CACHE_SIZE = 16  # encoded prompts kept per pipeline (~0.24 MB each in fp16)


@functools.cache
def _quick_dtype_class(cls: Any) -> type:
    """`cls` (a diffusers model class) whose `dtype` does not walk the model.

    diffusers' `ModelMixin.dtype` first looks through every submodule for a layerwise-
    casting hook, and `UNetMotionModel.forward` asks for it once per call: 4.6-8.4 ms of
    host time per denoising step at SD1.5 + v2 size (1,348 modules) on the 2-core CPU
    dev machine (6.5 us this way).  The engine adds no such hooks; without one, diffusers' answer is the first
    floating-point parameter's dtype outside `_keep_in_fp32_modules`, which is what this
    returns.  The class keeps its name: diffusers and peft look some things up by it."""

    def dtype(self: Any) -> torch.dtype:
        keep = getattr(self, "_keep_in_fp32_modules", None) or ()
        for name, param in self.named_parameters():
            if param.is_floating_point() and not any(m in name for m in keep):
                return param.dtype
        return cls.dtype.fget(self)  # type: ignore[no-any-return]

    quick = type(cls.__name__, (cls,), {"dtype": property(dtype), "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__})  # fmt: skip
    return quick


@functools.cache
def _engine_pipeline_class() -> type:
    """diffusers' AnimateDiffPipeline with two host-side shortcuts, both before the first
    kernel of a job, while a GPU waits:

    * its execution device is given instead of searched: diffusers walks every module of
      every component for offloading hooks, more than once per call (~35 ms of host time
      per job at SD1.5 + v2 size on the 2-core CPU dev machine,
      `scripts/host_overhead_probe.py`).  The engine never offloads: its models live on
      `execution_device`.
    * encoded prompts are kept (the last PROMPT_CACHE_SIZE): an artist re-runs a prompt
      with another seed, motion or length, and the tokenizer and the text encoder's
      dozen layers give the same tensors again.  Only plain string prompts, and only while
      no LoRA sits on the text encoder (a style LoRA's text-encoder layers change them):
      nothing is cached under one, and `unload_lora_weights` deletes the encoder's
      `peft_config`, so the cache serves the next plain job again."""
    from diffusers import AnimateDiffPipeline

    class EnginePipeline(AnimateDiffPipeline):  # type: ignore[misc]
        execution_device: torch.device | None = None

        @property
        def _execution_device(self) -> torch.device:
            if self.execution_device is not None:
                return self.execution_device
            return super()._execution_device  # type: ignore[no-any-return]

        def encode_prompt(  # type: ignore[override]
            self, prompt: Any, device: Any, num_images_per_prompt: int, do_classifier_free_guidance: bool,
            negative_prompt: Any = None, prompt_embeds: Any = None, negative_prompt_embeds: Any = None,
            lora_scale: float | None = None, clip_skip: int | None = None,
        ) -> Any:  # fmt: skip
            args = (prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt)
            kwargs = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds,
                      "lora_scale": lora_scale, "clip_skip": clip_skip}  # fmt: skip
            cacheable = (
                isinstance(prompt, str) and isinstance(negative_prompt, str | None)
                and prompt_embeds is None and negative_prompt_embeds is None
                and not getattr(self.text_encoder, "peft_config", None)
            )  # fmt: skip
            if not cacheable:
                return super().encode_prompt(*args, **kwargs)
            # The pipeline never writes into the returned tensors (it concatenates and
            # repeats them into new ones), so the same ones can be handed out again.
            cache: OrderedDict[tuple[Any, ...], Any] = self.__dict__.setdefault("_adb_prompt_cache", OrderedDict())
            key = (prompt, negative_prompt, num_images_per_prompt, do_classifier_free_guidance,
                   lora_scale, clip_skip, str(device), self.text_encoder.dtype)  # fmt: skip
            if key in cache:
                cache.move_to_end(key)
                return cache[key]
            encoded = super().encode_prompt(*args, **kwargs)
            cache[key] = encoded
            while len(cache) > PROMPT_CACHE_SIZE:
                cache.popitem(last=False)
            return encoded

    return EnginePipeline


LORA_CACHE_SIZE = 16  # LoRA files read from disk, kept on the CPU by registry id
# Motion modules kept on the CPU besides the one in use (~0.9 GB each in fp16): an artist
# alternating Quality and Fast switches between two without reading either again.
KEPT_MOTION_ADAPTERS = 1
DOMAIN_ADAPTER_NAME = "adb_domain"


def latents_to_preview(latents: torch.Tensor, max_side: int = PREVIEW_MAX_SIDE) -> np.ndarray:
    """A cheap RGB preview of the middle frame of video latents (B, C, F, h, w): the SD1.5
    linear latent->RGB approximation, no VAE.  Returns an HxWx3 uint8 array, at most
    `max_side` pixels on its longer side (the latent resolution, strided down if larger)."""
    frame = latents[0, :, latents.shape[2] // 2].detach().to("cpu", torch.float32)  # (C, h, w)
    if frame.shape[0] != SD15_LATENT_RGB_FACTORS.shape[0]:
        raise ValueError(f"expected {SD15_LATENT_RGB_FACTORS.shape[0]} latent channels, got {frame.shape[0]}")
    rgb = torch.einsum("chw,cr->hwr", frame, SD15_LATENT_RGB_FACTORS)
    stride = max(1, -(-max(rgb.shape[0], rgb.shape[1]) // max_side))
    rgb = rgb[::stride, ::stride]
    out = ((rgb + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)
    return out.numpy()


def _to_uint8_frames(video: torch.Tensor) -> list[np.ndarray]:
    """(B, F, 3, H, W) float in [0, 1] -> list of HxWx3 uint8, rounded exactly as diffusers'
    `numpy_to_pil` does (x * 255, round half to even), so frames equal the stock pipeline's
    PIL output.  Done where the tensor is: on a GPU, a quarter of the bytes cross to the
    host and the CPU does no per-pixel work."""
    arr = (video[0] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return list(arr)


def _all_finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def _shares_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two modules with the same structure still hold the very same tensors."""
    ours, theirs = a.state_dict(), b.state_dict()
    return ours.keys() == theirs.keys() and all(
        x.data_ptr() == theirs[k].data_ptr() and x.shape == theirs[k].shape for k, x in ours.items()
    )


def _inductor_default_cache_dir() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # moved in some torch release: only an explicit setting is kept then
        return ""
    return str(default_cache_dir())


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


@contextmanager
def _model_errors(model_id: str) -> Iterator[None]:
    """Loader failures (unreadable or unconvertible files) -> EngineError("model_error")."""
    try:
        yield
    except (EngineError, JobCancelled):
        raise
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        if _is_oom(exc):
            raise
        raise EngineError("model_error", f"{model_id}: cannot load: {exc}") from exc


def _strip_unet(name: str) -> str:
    return name[len("unet.") :] if name.startswith("unet.") else name


def _text_encoder_module(text_encoder: Any, module: str) -> str:
    """A LoRA's CLIP module path (`text_model.encoder.layers.0.mlp.fc1`, as checkpoints name
    it) in the loaded text encoder: transformers >= 5.6 flattened CLIPTextModel (no
    `text_model.`), and diffusers drops the prefix for it."""
    return module if hasattr(text_encoder, "text_model") else module.removeprefix("text_model.")


def _injected_lora_layers(model: Any, adapter_name: str) -> dict[str, Any]:
    """module path -> peft layer of `model` that carries `adapter_name`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "lora_A", {})
    }


# Keys of LoRA state dicts in the formats diffusers reads -> (module, "A" | "B").
_LORA_KEY_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(?P<m>.+)\.lora_A(?:\.[^.]+)?\.weight$"), "A"),
    (re.compile(r"^(?P<m>.+)\.lora_B(?:\.[^.]+)?\.weight$"), "B"),
    (re.compile(r"^(?P<m>.+)\.lora(?:_linear_layer)?\.down\.weight$"), "A"),
    (re.compile(r"^(?P<m>.+)\.lora(?:_linear_layer)?\.up\.weight$"), "B"),
    (re.compile(r"^(?P<m>.+)\.lora_down\.weight$"), "A"),
    (re.compile(r"^(?P<m>.+)\.lora_up\.weight$"), "B"),
]
_OLD_PROCESSOR = re.compile(
    r"^(?P<p>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$"
)


def lora_key_target(key: str) -> tuple[str, str] | None:
    """Module name (relative to the UNet) and matrix ("A" down, "B" up) a LoRA tensor key
    feeds, for the key formats `load_lora_weights` accepts; None for other keys (alphas)."""
    key = _strip_unet(key)
    m = _OLD_PROCESSOR.match(key)
    if m:
        proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        return f"{m['p']}.{proj}", "A" if m["part"] == "down" else "B"
    for pattern, part in _LORA_KEY_PATTERNS:
        mm = pattern.match(key)
        if mm:
            return mm["m"], part
    return None


_SIZE_MISMATCH = re.compile(r"size mismatch for (?P<name>\S+): copying a param with shape (?P<file>.+?) from "
                            r"checkpoint, the shape in current model is (?P<model>.+?)\.?$", re.MULTILINE)


def _lora_failure(exc: BaseException) -> str:
    """Why `load_lora_weights` failed, in one line: torch lists a size mismatch per tensor
    (hundreds of lines for a LoRA made for another base model)."""
    mismatches = list(_SIZE_MISMATCH.finditer(str(exc)))
    if not mismatches:
        return str(exc)
    first = mismatches[0]
    return (
        f"{len(mismatches)} of its tensors do not fit the loaded model (e.g. {first['name']}: "
        f"{first['file']} in the file, {first['model']} in the model): it was made for another base model"
    )


@dataclass
class _LoraJob:
    adapter_name: str
    model_id: str
    weight: float
    weights: Any  # models.loading.LoraWeights


class AnimateDiffEngine:
    """`Engine` (see interface.py) on diffusers' AnimateDiffPipeline.

    `generate` must be called from one thread at a time (the server's GPU worker);
    `resolve`, `list_models` and `default_models` are safe from other threads.
    """

    def __init__(
        self,
        models_dir: Path,
        device: str | None = None,
        dtype: str | None = None,
        *,
        decode_chunk_size: int = 16,
        stream_chunk_size: int = 4,
        memory_saving: bool | None = None,
        fast: FastPath | bool | None = None,
        compile_cache_dir: Path | None = None,
        defer_compile: bool = True,
        swap_motion_weights: bool = True,
    ) -> None:
        from animatediff_blender.backend.models.registry import ModelRegistry

        self.models_dir = Path(models_dir)
        self.device = self._pick_device(device)
        self.dtype = self._pick_dtype(dtype, self.device)
        self.decode_chunk_size = decode_chunk_size
        # Frames per hand-over to a frame sink (generate(on_frames=...)).
        self.stream_chunk_size = max(1, stream_chunk_size)
        # Long clips: FreeNoise split inference + chunked feed-forward bound memory; the
        # maths are the same per frame / per position, only batched differently, but on an
        # H200 they made a 64-frame clip 2.75x slower for 1 GiB less peak.  None (default):
        # only when a long clip ran out of memory without them (the job is retried once);
        # True: always for long clips; False: never.
        self.memory_saving = memory_saving
        # None: the device's default (on for CUDA where triton is installed, off on the
        # CPU); True: the CUDA default wherever we run; False: stock eager.
        if fast is None:
            fast = FastPath.auto_for(self.device)
        elif fast is True:
            fast = FastPath.default_for("cuda")
        elif fast is False:
            fast = FastPath.off()
        self.fast: FastPath = fast
        self.compile_cache_dir = Path(compile_cache_dir) if compile_cache_dir is not None else None
        self._cache_loaded = False
        # With compilation on, no job waits for a compile: a job whose shape (see _shape_key)
        # has not been compiled yet runs eagerly (stock speed) and its shape is compiled
        # later, by warm_pending(), when the device is idle.  False: the job compiles.
        self.defer_compile = defer_compile
        # Another motion module of the same architecture takes the built UNet's place by a
        # weight copy (`_ensure_pipeline`); False rebuilds the UNet (the baseline it is measured
        # against: `scripts/switch_probe.py`).
        self.swap_motion_weights = swap_motion_weights
        self._warm_keys: set[tuple[Any, ...]] = set()  # shapes compiled in this process
        # Set when compiling failed once (no triton for this GPU, a compiler bug): every job
        # then runs eagerly and nothing is compiled again in this process.
        self.compile_error: str | None = None
        self._to_warm: OrderedDict[tuple[Any, ...], GenerateRequest] = OrderedDict()  # shapes to compile
        # FreeNoise block id -> the plain motion transformer block it stands in for (one job).
        self._plain_motion_blocks: dict[int, Any] = {}
        self._schedulers: dict[str, Any] = {}  # preset name -> its scheduler, for the loaded base
        # plain motion transformer block -> its FreeNoise stand-in (same tensors), kept
        # while the plain block lives.
        self._free_noise_blocks: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self.warm_up_s: float | None = None  # how long the last warm_up took (load + compile)

        # Thread-safe on its own, and no lock of ours is held around it: a rescan hashing a new
        # multi-GB file (a client's list-models, or a job using a replaced model) must not
        # stall hello, list-models and resolve on the server's loop past the clients' timeout.
        self._registry = ModelRegistry(self.models_dir)
        self._registry.scan()

        self._gpu_lock = threading.Lock()
        # Loaded models are known by id and content (the registry's sha256 of the files read):
        # a file replaced under the same name is loaded again by the next job that uses it.
        self._base_id: str | None = None
        self._base_sha = ""
        self._base: Any = None  # models.loading.BaseComponents; its UNet2D stays on the CPU
        self._motion_id: str | None = None
        self._motion_sha = ""
        self._adapter: Any = None  # MotionAdapter (CPU)
        self._pipe: Any = None  # AnimateDiffPipeline on self.device
        self._lora_cache: OrderedDict[str, tuple[str, Any]] = OrderedDict()  # id -> (sha256, weights)
        # Motion modules used before, on the CPU, newest last: (id, sha256) -> MotionAdapter.
        self._adapters: OrderedDict[tuple[str, str], Any] = OrderedDict()
        # What was (re)loaded from disk or rebuilt, for tests and logs: "base", "motion",
        # "pipeline", "lora"; "motion_swap": motion weights copied into the built UNet.
        self.load_counts: Counter[str] = Counter()

    # ------------------------------------------------------------------ device

    @staticmethod
    def _pick_device(device: str | None) -> torch.device:
        if device:
            try:
                dev = torch.device(device)
            except RuntimeError as exc:
                raise EngineError("device", f"unknown device {device!r} ({exc})") from None
            if dev.type == "cuda":
                if not torch.cuda.is_available():
                    raise EngineError(
                        "device", f"device {device!r} asked for, but CUDA is not available here"
                    )
                if dev.index is None:
                    dev = torch.device("cuda", torch.cuda.current_device())
            return dev
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @staticmethod
    def _pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
        if dtype is None:
            # fp16 is AnimateDiff's usual precision on GPUs; CPUs are slow and imprecise in it.
            return torch.float16 if device.type == "cuda" else torch.float32
        try:
            return _DTYPES[dtype.lower()]
        except KeyError:
            raise EngineError("device", f"unknown dtype {dtype!r}; use fp16, bf16 or fp32") from None

    def device_name(self) -> str:
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            return f"cuda:{index} {torch.cuda.get_device_name(index)}"
        return str(self.device)

    def capabilities(self) -> list[str]:
        return [
            "motion_lora",
            "domain_adapter",
            "context_windows",
            "prompt_travel",
            "preview",
            "presets:" + ",".join(PRESETS),
        ]

    # ------------------------------------------------------------------ registry

    def list_models(self, rescan: bool = False) -> list[ModelInfo]:
        if rescan:
            return list(self._registry.scan())  # other callers get the last scan meanwhile
        return list(self._registry.infos())

    def default_models(self) -> dict[str, str]:
        return dict(self._registry.default_ids())

    def _entry(self, model_id: str, field: str, path: str = "") -> Any:
        kind = _FIELD_KINDS[field]
        path = path or f"$.request.{field}"  # (the request field, for the client's form)
        try:
            entry = self._registry.get(model_id)
        except (KeyError, LookupError, ValueError) as exc:
            reason = getattr(exc, "reason", "") or "not in the server's models folder"
            raise EngineError("unknown_model", f"{field}: no {kind} model {model_id!r}: {reason}", path) from None
        if entry.kind != kind:
            raise EngineError(
                "unknown_model",
                f"{field}: {model_id!r} is a model of kind {entry.kind!r}, but {field} takes kind {kind!r}",
                path,
            )
        if not getattr(entry, "ok", True):
            # A broken file replaced since the scan may be fixed now: let the job rescan it
            # (_current_entry, on the worker thread) rather than hash it here, maybe on the
            # server's loop.
            replaced = bool(getattr(entry, "signature", None)) and not self._registry.is_current(entry)
            if not replaced:
                raise EngineError(
                    "model_error",
                    f"{field}: {model_id!r} cannot be used: {getattr(entry, 'error', '') or 'broken file'}",
                    path,
                )
        return entry

    def _current_entry(self, model_id: str, field: str) -> Any:
        """`_entry` for loading or reusing a model (the worker thread): when the model's files
        changed on disk since the last scan (replaced under the same name), rescan first --
        re-hashing only what changed -- so that the entry's sha256 is the content there now.
        Unchanged files cost a stat each: no job reads or hashes a file it already loaded."""
        try:
            entry = self._registry.get(model_id)
        except (LookupError, ValueError):
            pass  # _entry says why
        else:
            if not self._registry.is_current(entry):
                self._registry.scan()
        return self._entry(model_id, field)

    # ------------------------------------------------------------------ resolve

    def resolve(self, request: GenerateRequest) -> GenerateRequest:
        preset = get_preset(request.preset)
        defaults = self.default_models()
        base = request.base_model or defaults.get("base")
        # A few-step preset runs on the motion module distilled for it (the registry's
        # "motion_lightning" / "motion_lcm") when one is installed and none is asked for.
        motion = request.motion_module or defaults.get(f"motion_{preset.name}") or defaults.get("motion")
        if not base:
            raise EngineError(
                "unknown_model", "base_model: none given and the server has no base model installed"
            )
        if not motion:
            raise EngineError(
                "unknown_model", "motion_module: none given and the server has no motion module installed"
            )
        self._entry(base, "base_model")
        motion_entry = self._entry(motion, "motion_module")
        for i, lora in enumerate(request.motion_loras):
            self._entry(lora.id, "motion_loras", f"$.request.motion_loras[{i}].id")
        if request.domain_adapter:
            self._entry(request.domain_adapter, "domain_adapter")

        steps = request.steps if request.steps is not None else preset.steps
        if steps < preset.min_steps or (preset.max_steps is not None and steps > preset.max_steps):
            raise EngineError(
                "invalid_request",
                f"steps: the {preset.name} preset runs {preset.min_steps}-{preset.max_steps} steps, got {steps}",
                field="$.request.steps",
            )
        guidance = request.guidance if request.guidance is not None else preset.guidance
        context_length = request.context_length or DEFAULT_CONTEXT_LENGTH
        context_stride = request.context_stride or DEFAULT_CONTEXT_STRIDE
        if context_stride > context_length:
            raise EngineError(
                "invalid_request",
                f"context_stride ({context_stride}) must not exceed context_length ({context_length}): "
                "frames between windows would get no motion context",
                field="$.request.context_stride",
            )
        max_len = self._max_context(motion_entry)
        if max_len is not None and context_length > max_len and request.frames > min(context_length, max_len):
            raise EngineError(
                "invalid_request",
                f"context_length: the motion module {motion!r} handles at most {max_len} frames at once, "
                f"got {context_length}",
                field="$.request.context_length",
            )
        if request.prompt_travel:
            bad = sorted(k for k in request.prompt_travel if not 0 <= k < request.frames)
            if bad:
                raise EngineError(
                    "invalid_request",
                    f"prompt_travel: frame {bad[0]} is outside the clip (frames 0-{request.frames - 1})",
                    field=f"$.request.prompt_travel.{bad[0]}",
                )
        return msgspec.structs.replace(
            request,
            base_model=base,
            motion_module=motion,
            steps=steps,
            guidance=float(guidance),
            context_length=context_length,
            context_stride=context_stride,
        )

    @staticmethod
    def _max_context(motion_entry: Any) -> int | None:
        version = str(getattr(motion_entry, "version", "") or "")
        if version == "v1":
            return 24
        if version in ("v2", "v3", "lightning", "lcm"):
            return 32
        return None  # unknown: checked against the loaded adapter's config at run time

    # ------------------------------------------------------------------ warm cache

    def _free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _ensure_pipeline(
        self, base_id: str, motion_id: str, progress: ProgressCallback, should_cancel: CancelCheck = lambda: False
    ) -> Any:
        """The pipeline of these two models, loading what changed.  A cancel is honoured
        between loads (each can take many seconds); what was loaded stays for the next job."""
        from animatediff_blender.backend.models import loading

        base_entry = self._current_entry(base_id, "base_model")
        motion_entry = self._current_entry(motion_id, "motion_module")
        if (self._base_id, self._base_sha) != (base_id, base_entry.sha256):
            progress(StepProgress(0, 0, None, phase="loading"))
            self._pipe = None
            self._base = None
            self._base_id, self._base_sha = None, ""
            self._free()
            with _model_errors(base_id):
                base = loading.load_base(base_entry, self.dtype, "cpu")
            # The UNet2D stays on the CPU: the motion UNet is rebuilt from it when the
            # motion module changes, without rereading the base model.
            base.vae.to(self.device)
            base.text_encoder.to(self.device)
            self._base, self._base_id, self._base_sha = base, base_id, base_entry.sha256
            self._schedulers.clear()  # built on the base model's scheduler config
            self.load_counts["base"] += 1
            if should_cancel():
                raise JobCancelled()
        if (self._motion_id, self._motion_sha) != (motion_id, motion_entry.sha256):
            progress(StepProgress(0, 0, None, phase="loading"))
            key = (motion_id, motion_entry.sha256)
            adapter = self._adapters.pop(key, None)
            if adapter is None:
                with _model_errors(motion_id):
                    adapter = loading.load_motion_adapter(motion_entry, self.dtype)
                self.load_counts["motion"] += 1
            try:
                swapped = self._pipe is not None and self.swap_motion_weights and loading.swap_motion_weights(
                    self._pipe.unet, self._adapter, adapter
                )
            except BaseException:
                self._pipe = None  # half copied: built again from the adapters
                raise
            if swapped:
                # Quality <-> Fast alternates v2 and its Lightning distillation: new motion
                # weights in the same UNet, whose compiled shapes now serve this module too
                # (regional compiles only: a whole-UNet graph also guards on the timesteps'
                # dtype, which Lightning's scheduler changes).
                self._pipe.motion_adapter = adapter
                if self.fast.compile != "full":
                    self._warm_keys |= {(k[0], motion_id, *k[2:]) for k in self._warm_keys if k[1] == self._motion_id}
                self.load_counts["motion_swap"] += 1
            else:
                if should_cancel():  # before the built (compiled) UNet is dropped for nothing
                    self._keep_adapter(key, adapter)
                    raise JobCancelled()
                self._pipe = None
                self._free()
            if self._adapter is not None and self._motion_id is not None:
                self._keep_adapter((self._motion_id, self._motion_sha), self._adapter)  # to come back to
            self._adapter, self._motion_id, self._motion_sha = adapter, motion_id, motion_entry.sha256
            if should_cancel():
                raise JobCancelled()
        if self._pipe is None:
            # Both models' weights copied to the device, in the UNet2D's dtype (self.dtype).
            try:
                unet = loading.build_motion_unet(self._base.unet, self._adapter, self.device)
            except (ValueError, RuntimeError) as exc:  # widths or blocks of another model family
                if _is_oom(exc):
                    raise
                raise EngineError(
                    "model_error",
                    f"motion_module: {motion_id!r} does not fit the base model {base_id!r}: {exc}",
                ) from exc
            unet.__class__ = _quick_dtype_class(type(unet))  # type: ignore[arg-type]
            pipe = _engine_pipeline_class()(
                vae=self._base.vae,
                text_encoder=self._base.text_encoder,
                tokenizer=self._base.tokenizer,
                unet=unet,
                motion_adapter=self._adapter,
                scheduler=PRESETS["quality"].make_scheduler(self._base.scheduler_config),
            )
            pipe.set_progress_bar_config(disable=True)
            pipe.execution_device = self.device
            self._apply_fast(pipe)
            self._pipe = pipe
            self._warm_keys.clear()  # new modules: nothing of theirs is compiled yet
            self.load_counts["pipeline"] += 1
        return self._pipe

    # ------------------------------------------------------------------ fast path

    def _apply_fast(self, pipe: Any) -> None:
        """Apply the opt-in levers to a freshly built pipeline (nothing when fast is off)."""
        fast = self.fast
        if not fast.enabled:
            return
        if fast.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
        if fast.vae_channels_last:
            pipe.vae.to(memory_format=torch.channels_last)
        if fast.compile_vae:
            self._load_compile_cache()
            self._compile_module(pipe.vae.decoder)
        if fast.ff_chunk_elements:
            chunk_feed_forwards(pipe.unet, fast.ff_chunk_elements)
        if fast.split_batch_over:
            pipe.unet.forward = in_batch_elements(pipe.unet.forward, fast.split_batch_over)
        if fast.fuse_qkv:
            self._set_fused(pipe.unet, True)
        if fast.sdpa != "auto":
            # Around the UNet only: the text encoder's masked attention has no flash kernel.
            unet = pipe.unet
            inner = unet.forward
            unet.forward = with_attention(inner, fast.sdpa)
        if fast.temporal_sdpa != "auto":
            # Inside each motion module (compiled whole: dynamo traces the backend choice).
            for module in self._motion_modules(pipe.unet):
                module.forward = with_attention(module.forward, fast.temporal_sdpa)
        self._compile(pipe.unet)

    @staticmethod
    def _motion_modules(unet: Any) -> list[Any]:
        from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

        return [m for m in unet.modules() if isinstance(m, AnimateDiffTransformer3D)]

    @staticmethod
    def _spatial_attentions(unet: Any) -> list[Any]:
        from diffusers.models.attention_processor import Attention

        return [
            m
            for name, m in unet.named_modules()
            if isinstance(m, Attention) and ".attentions." in f".{name}" and "motion_modules" not in name
        ]

    def _set_fused(self, unet: Any, fused: bool) -> None:
        """Spatial attention only: FreeNoise swaps the motion modules' blocks with a strict
        state-dict load, which extra fused weights would break."""
        from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

        for attn in self._spatial_attentions(unet):
            if fused:
                if not getattr(attn, "fused_projections", False):
                    with torch.no_grad():
                        attn.fuse_projections(fuse=True)
                attn.set_processor(FusedAttnProcessor2_0())
            else:
                attn.set_processor(AttnProcessor2_0())

    def _compile_targets(self, unet: Any) -> list[torch.nn.Module]:
        from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
        from diffusers.models.transformers.transformer_2d import Transformer2DModel
        from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

        # Whole spatial and temporal transformers, not just their inner blocks: the group
        # norm, the 5D<->4D permutes and copies, the projections and the residual around
        # the blocks fuse with them (eager, that glue took ~17% of a step on an H200).
        # FreeNoise's window blocks inside a motion module run their Python loop eagerly
        # (a graph break), their attention and feed-forward compiled: see
        # _swap_in_free_noise_blocks.
        kinds = (Transformer2DModel, AnimateDiffTransformer3D, ResnetBlock2D, Downsample2D, Upsample2D)
        return [m for m in unet.modules() if isinstance(m, kinds)]

    def _compile_module(self, module: torch.nn.Module) -> None:
        fast = self.fast
        # Modes are inductor's; other backends (tests: "eager") take none.
        mode = fast.compile_mode if fast.compile_backend == "inductor" else None
        if getattr(module, "_compiled_call_impl", None) is None:
            module.compile(dynamic=None if fast.compile_dynamic else False, mode=mode, backend=fast.compile_backend)

    def _compile(self, unet: Any) -> None:
        """Compile in place (idempotent): module names and state dicts stay as they are,
        so LoRA injection, FreeNoise and the memory savers work unchanged.  Blocks that a
        job swapped in (FreeNoise) are compiled when next seen."""
        fast = self.fast
        if fast.compile == "off":
            return
        self._load_compile_cache()
        import torch._dynamo.config as dynamo_config

        # dynamic=False compiles one graph per input shape: SD1.5's blocks see a few dozen
        # (channels x resolution x frames x CFG batch); the default limit of 8 per code
        # object would silently fall back to eager for the rest.
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 256)
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4096)
        targets = [unet] if fast.compile == "full" else self._compile_targets(unet)
        for module in targets:
            self._compile_module(module)

    def _load_compile_cache(self) -> None:
        """Point inductor's on-disk cache at `compile_cache_dir` and load torch's
        mega-cache from the last run, so a restarted server skips most of the compile."""
        if self._cache_loaded or self.compile_cache_dir is None:
            return
        self._cache_loaded = True
        inductor_dir = self.compile_cache_dir / "inductor"
        inductor_dir.mkdir(parents=True, exist_ok=True)
        # Inductor and Triton read these on every lookup; a setting of the user's wins.
        # Inductor writes its default (/tmp/torchinductor_<user>, lost on reboot) into the
        # environment the first time anything asks for it -- which may have happened
        # already -- so that value is not the user's and is replaced.
        current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        if current is None or os.path.abspath(current) == os.path.abspath(_inductor_default_cache_dir()):
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_dir)
        os.environ.setdefault("TRITON_CACHE_DIR", str(inductor_dir / "triton"))
        mega = self.compile_cache_dir / MEGA_CACHE_FILE
        if mega.is_file() and hasattr(torch.compiler, "load_cache_artifacts"):
            try:
                torch.compiler.load_cache_artifacts(mega.read_bytes())
                log.info("loaded compiled artefacts from %s", mega)
            except Exception as exc:  # a stale or foreign cache only costs a recompile
                log.warning("could not load compiled artefacts from %s: %r", mega, exc)

    def _save_compile_cache(self) -> None:
        if self.compile_cache_dir is None or not self.fast.compiles:
            return
        if not hasattr(torch.compiler, "save_cache_artifacts"):
            return
        try:
            saved = torch.compiler.save_cache_artifacts()
        except Exception as exc:
            log.warning("could not collect compiled artefacts: %r", exc)
            return
        if not saved:
            return
        data = saved[0]
        mega = self.compile_cache_dir / MEGA_CACHE_FILE
        tmp = mega.with_suffix(".tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, mega)
        except OSError as exc:
            log.warning("could not write %s: %r", mega, exc)

    def _lora_weights(self, model_id: str, field: str) -> Any:
        from animatediff_blender.backend.models import loading

        entry = self._current_entry(model_id, field)
        cached = self._lora_cache.get(model_id)
        if cached is not None and cached[0] == entry.sha256:
            self._lora_cache.move_to_end(model_id)
            return cached[1]
        self._lora_cache.pop(model_id, None)  # another file now: its old weights are never used again
        with _model_errors(model_id):
            weights = (
                loading.load_domain_adapter(entry)
                if field == "domain_adapter"
                else loading.load_motion_lora(entry)
            )
        self._lora_cache[model_id] = (entry.sha256, weights)
        self.load_counts["lora"] += 1
        while len(self._lora_cache) > LORA_CACHE_SIZE:
            self._lora_cache.popitem(last=False)
        return weights

    # ------------------------------------------------------------------ per-job pipeline state

    @staticmethod
    def _motion_blocks(unet: Any) -> list[Any]:
        blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
        return [b for b in blocks if getattr(b, "motion_modules", None) is not None]

    def _enable_free_noise(self, pipe: Any, context_length: int, context_stride: int) -> None:
        # diffusers' own swap builds every FreeNoise block afresh (random init on the CPU,
        # then a copy of the weights) and, on disable, every plain block again: seconds per
        # long job at real sizes.  Ours builds them on the meta device around the plain
        # blocks' own tensors (no init, no copy) and keeps the plain blocks to put back.
        pipe._enable_free_noise_in_block = lambda block: self._swap_in_free_noise_blocks(pipe, block)
        try:
            pipe.enable_free_noise(
                context_length=context_length,
                context_stride=context_stride,
                weighting_scheme="pyramid",
                noise_type="shuffle_context",
            )
        finally:
            del pipe._enable_free_noise_in_block

    def _swap_in_free_noise_blocks(self, pipe: Any, block: Any) -> None:
        from diffusers.models.attention import FreeNoiseTransformerBlock

        settings = (
            pipe._free_noise_context_length,
            pipe._free_noise_context_stride,
            pipe._free_noise_weighting_scheme,
        )
        for motion_module in block.motion_modules:
            blocks = motion_module.transformer_blocks
            for i, plain in enumerate(blocks):
                if isinstance(plain, FreeNoiseTransformerBlock):
                    plain.set_free_noise_properties(*settings)
                    continue
                windowed = self._free_noise_blocks.get(plain)
                if windowed is None or not _shares_weights(windowed, plain):
                    windowed = self._windowed_block(plain, *settings)
                    self._free_noise_blocks[plain] = windowed
                else:
                    windowed.set_free_noise_properties(*settings)
                windowed.set_chunk_feed_forward(plain._chunk_size, plain._chunk_dim)
                self._plain_motion_blocks[id(windowed)] = plain
                blocks[i] = windowed

    def _windowed_block(self, plain: Any, context_length: int, context_stride: int, weighting: str) -> Any:
        """A FreeNoise block for `plain`, built on the meta device around plain's own tensors
        (no init, no copy) and kept for later long jobs (compiled once)."""
        from diffusers.models.attention import FreeNoiseTransformerBlock

        from .freenoise import WINDOW_BATCH_ELEMENTS, BatchedWindowsBlock, windowed_like

        kind = BatchedWindowsBlock if self.fast.batch_windows else FreeNoiseTransformerBlock
        windowed = windowed_like(plain, kind, context_length, context_stride, weighting)
        if self.fast.ff_chunk_elements:
            # Its feed-forward is a new module: all of a long clip's frames go through it at once.
            chunk_feed_forwards(windowed, self.fast.ff_chunk_elements)
        if self.fast.batch_windows:
            windowed.share_projections = self.fast.share_window_projections
            if self.fast.split_batch_over:
                # One CFG half per call: as many windows per batch as the whole pair had (half
                # the budget), so the window batches' memory halves with the rest of the call.
                windowed.window_batch_elements = WINDOW_BATCH_ELEMENTS // 2
        # Batched windows have no loop to keep eager: the compiled motion module traces them.
        if self.fast.compile != "off" and not self.fast.batch_windows:
            # The window loop stays eager (traced, it would unroll into one graph per clip
            # length); each window's attention has the same shape whatever the length, so
            # compiled once it serves every clip.
            windowed.forward = torch.compiler.disable(windowed.forward)  # type: ignore[method-assign]
            for child in (windowed.attn1, windowed.attn2, windowed.ff):
                if child is not None:
                    self._compile_module(child)
        return windowed

    def _disable_free_noise(self, pipe: Any) -> None:
        # Not pipe.disable_free_noise(): in 0.42.1 it also walks a mid block without motion
        # modules (v1/v3 motion modules) and raises.
        from diffusers.models.attention import FreeNoiseTransformerBlock

        pipe._free_noise_context_length = None
        for block in self._motion_blocks(pipe.unet):
            for motion_module in block.motion_modules:
                blocks = motion_module.transformer_blocks
                for i, current in enumerate(blocks):
                    if isinstance(current, FreeNoiseTransformerBlock):
                        plain = self._plain_motion_blocks.pop(id(current), None)
                        if plain is not None:
                            blocks[i] = plain
            pipe._disable_free_noise_in_block(block)  # anything not swapped by us (none expected)
        self._plain_motion_blocks.clear()

    @staticmethod
    def _spatial_transformer_blocks(unet: Any) -> list[Any]:
        from diffusers.models.attention import BasicTransformerBlock

        return [
            m
            for name, m in unet.named_modules()
            if isinstance(m, BasicTransformerBlock)
            and ".attentions." in f".{name}"
            and "motion_modules" not in name
        ]

    def _enable_memory_saving(self, pipe: Any) -> None:
        from diffusers.pipelines.free_noise_utils import SplitInferenceModule

        pipe.enable_free_noise_split_inference()
        # Motion modules without a motion mid block (v1, v3) keep the UNet2D's
        # UNetMidBlock2DCrossAttn, which calls its resnets and attentions positionally:
        # SplitInferenceModule only splits keyword tensors, so it would run nothing (IndexError)
        # or mismatch batches.  Leave that block whole: at the lowest resolution it is small.
        mid = pipe.unet.mid_block
        if mid is not None and getattr(mid, "motion_modules", None) is None:
            for modules in (mid.resnets, getattr(mid, "attentions", [])):
                for i, module in enumerate(modules):
                    if isinstance(module, SplitInferenceModule):
                        modules[i] = module.module
        # Chunk the spatial feed-forwards per frame (what `unet.enable_forward_chunking()` does),
        # but not the motion modules': per spatial position that would be thousands of calls.
        for block in self._spatial_transformer_blocks(pipe.unet):
            block.set_chunk_feed_forward(1, 0)

    def _disable_memory_saving(self, pipe: Any) -> None:
        from diffusers.pipelines.free_noise_utils import SplitInferenceModule

        def unwrap(module: torch.nn.Module) -> None:
            for name, child in list(module.named_children()):
                while isinstance(child, SplitInferenceModule):
                    child = child.module
                    setattr(module, name, child)
                unwrap(child)

        unwrap(pipe.unet)
        for block in self._spatial_transformer_blocks(pipe.unet):
            block.set_chunk_feed_forward(None, 0)

    def _apply_loras(self, pipe: Any, jobs: list[_LoraJob]) -> None:
        for job in jobs:
            try:
                pipe.load_lora_weights(dict(job.weights.state_dict), adapter_name=job.adapter_name)
            except EngineError:
                raise
            except Exception as exc:
                raise EngineError("model_error", f"{job.model_id}: could not apply the LoRA: {_lora_failure(exc)}") from exc
            self._verify_lora(pipe, job)
        pipe.set_adapters(
            [j.adapter_name for j in jobs], adapter_weights=[self._effective_weight(j) for j in jobs]
        )

    @staticmethod
    def _effective_weight(job: _LoraJob) -> float:
        # The peft keys carry no alpha, so peft scales by 1 (its default alpha = rank);
        # a file's network alpha scales by alpha / rank as in kohya/diffusers.
        alpha = getattr(job.weights, "network_alpha", None)
        rank = getattr(job.weights, "rank", None)
        if alpha is not None and rank:
            return job.weight * float(alpha) / float(rank)
        return job.weight

    @classmethod
    def _verify_lora(cls, pipe: Any, job: _LoraJob) -> None:
        """Prove that every LoRA tensor read from the file is in the model.

        `load_lora_weights` ignores keys it does not understand or modules it cannot find
        (an unconverted original MotionLoRA loads *nothing*, silently).  Checks, on the UNet
        and on the text encoder (a style LoRA's `text_encoder.` layers): the peft layers of
        this adapter sit on exactly the file's target modules, and their A/B matrices equal
        the file's tensors (or, for key formats this check cannot map, the number of
        injected matrices equals the number read)."""
        name = job.adapter_name
        unet_layers = _injected_lora_layers(pipe.unet, name)
        text_layers = _injected_lora_layers(pipe.text_encoder, name)
        unet_expected = {_strip_unet(t) for t in job.weights.target_modules}
        text_expected = {
            _text_encoder_module(pipe.text_encoder, t) for t in getattr(job.weights, "text_encoder_modules", ())
        }
        if not unet_layers and not text_layers:
            raise EngineError(
                "model_error",
                f"{job.model_id}: the LoRA changed nothing: none of its {len(unet_expected | text_expected)} target "
                "layers exist in the loaded model (wrong format, or made for another model?)",
            )
        hint = "A MotionLoRA must match its motion module's version (the official ones are for v2)."
        cls._check_lora_targets(job, unet_expected, unet_layers, hint)
        cls._check_lora_targets(job, text_expected, text_layers, "Its text-encoder layers must fit the base model's.")
        read = 0
        mapped = 0
        for key, tensor in job.weights.state_dict.items():
            if not torch.is_tensor(tensor) or tensor.ndim < 2:
                continue  # alphas
            read += 1
            is_text = key.startswith(TEXT_ENCODER_PREFIX)
            target = lora_key_target(key.removeprefix(TEXT_ENCODER_PREFIX) if is_text else key)
            if target is None:
                continue
            module_name = _text_encoder_module(pipe.text_encoder, target[0]) if is_text else target[0]
            layers = text_layers if is_text else unet_layers
            if module_name not in layers:
                continue
            loaded = (layers[module_name].lora_A if target[1] == "A" else layers[module_name].lora_B)[name].weight
            if loaded.shape != tensor.shape or not torch.equal(
                loaded.detach().cpu(), tensor.to(loaded.dtype).cpu()
            ):
                raise EngineError(
                    "model_error",
                    f"{job.model_id}: the LoRA weights of {module_name} did not load as read from the file",
                )
            mapped += 1
        # Every tensor is either compared above or, when the key format is one this check
        # cannot map, at least counted against the injected matrices.
        count = 2 * (len(unet_layers) + len(text_layers))
        if (mapped and mapped != read) or (not mapped and count != read):
            raise EngineError(
                "model_error",
                f"{job.model_id}: {read} LoRA tensors were read but {count} were applied",
            )

    @staticmethod
    def _check_lora_targets(job: _LoraJob, expected: set[str], injected: dict[str, Any], hint: str) -> None:
        """Raise unless the adapter's peft layers in one model sit on exactly `expected`."""
        missing = sorted(expected - set(injected))
        extra = sorted(set(injected) - expected)
        if not (missing or extra):
            return
        detail = f"{len(missing)} of its layers are not in the model (e.g. {missing[0]})" if missing else ""
        if extra:
            detail += ("; " if detail else "") + f"{len(extra)} unexpected layers were adapted (e.g. {extra[0]})"
        raise EngineError("model_error", f"{job.model_id}: the LoRA does not fit the loaded model: {detail}. {hint}")

    @contextmanager
    def _job_state(
        self, pipe: Any, free_noise: tuple[int, int] | None, loras: list[_LoraJob], memory_saving: bool
    ) -> Iterator[None]:
        # What was (begun to be) done, undone in reverse order.  A plain job does nothing
        # here: the undo steps walk the UNet's ~1,350 modules, ~10 ms of host time at SD1.5
        # size between the denoise and the decode, with the device idle.
        done: set[str] = set()
        try:
            if free_noise is not None:
                done.add("free_noise")
                self._enable_free_noise(pipe, *free_noise)
            if loras and self.fast.fuse_qkv:
                done.add("unfused")
                self._set_fused(pipe.unet, False)  # the fused processor would skip peft's layers
            if loras:
                done.add("loras")
                self._apply_loras(pipe, loras)
            if free_noise is not None and memory_saving:
                done.add("memory_saving")
                self._enable_memory_saving(pipe)
            yield
        finally:
            if "memory_saving" in done:
                self._disable_memory_saving(pipe)
            if "loras" in done:
                pipe.unload_lora_weights()
            if "free_noise" in done:
                self._disable_free_noise(pipe)
            if "unfused" in done:
                self._set_fused(pipe.unet, True)
            if done:
                self._compile(pipe.unet)  # whatever the undo put back is compiled

    # ------------------------------------------------------------------ generate

    def generate(
        self,
        request: GenerateRequest,
        progress: ProgressCallback,
        should_cancel: CancelCheck,
        on_frames: FrameSink | None = None,
    ) -> GenerationResult:
        settings = self._with_companion(self.resolve(request))
        key = self._shape_key(settings)
        result, deferred = self._generate_with_retry(settings, key, progress, should_cancel, on_frames)
        if deferred:
            if self.compile_error is None:
                self._to_warm.setdefault(key, self._warm_request(settings))
        elif self.fast.compiles:
            self._warm_keys.add(key)
        return result

    def _with_companion(self, s: GenerateRequest) -> GenerateRequest:
        """`s` with its preset's companion spatial LoRA (the registry's "adapter_<preset>":
        AnimateLCM's, for `lcm`) as the domain adapter, when it names none and one is
        installed and loads now.  Decided when the job runs, not at submit: the file may
        have gone or broken meanwhile, and then the job runs without it (logged) instead of
        failing on a field its request never had.  A request naming its own domain adapter
        (or this one at another scale, or 0 to run without) runs as asked."""
        preset = get_preset(s.preset)
        if s.domain_adapter or preset.companion_adapter_scale is None:
            return s
        companion = self.default_models().get(f"adapter_{preset.name}")
        if not companion:
            return s
        try:
            self._lora_weights(companion, "domain_adapter")  # (cached for the run)
        except EngineError as exc:
            log.warning("the %s preset runs without its spatial LoRA %s: %s", preset.name, companion, exc.message)
            return s
        return msgspec.structs.replace(
            s, domain_adapter=companion, domain_adapter_scale=preset.companion_adapter_scale
        )

    def _generate_with_retry(
        self, settings: GenerateRequest, key: tuple[Any, ...], progress: ProgressCallback,
        should_cancel: CancelCheck, on_frames: FrameSink | None,
    ) -> tuple[GenerationResult, bool]:  # fmt: skip
        """A job, retried with the memory savers after running out of memory; and whether it
        ran eagerly because its shape (`key`) is not compiled yet (deferred to warm_pending)."""
        delivered = 0  # frames handed to on_frames: a job that delivered some is not retried
        deferred: bool | None = None
        load_s = 0.0
        pipe: Any = None

        def sink(start: int, frames: list[np.ndarray]) -> None:
            nonlocal delivered
            delivered += len(frames)
            assert on_frames is not None
            on_frames(start, frames)

        with self._gpu_lock:
            saving = self.memory_saving is True
            while True:
                try:
                    if deferred is None:
                        if should_cancel():  # (cancelled while queued: load nothing)
                            raise JobCancelled()
                        # The models first: what is compiled depends on what the loading keeps
                        # (a UNet rebuilt has nothing compiled; one that took another motion
                        # module's weights in keeps its graphs: `_warm_keys`).
                        assert settings.base_model and settings.motion_module  # (resolved)
                        t0 = time.perf_counter()
                        pipe = self._ensure_pipeline(
                            settings.base_model, settings.motion_module, progress, should_cancel
                        )
                        load_s = time.perf_counter() - t0
                        deferred = self.fast.compiles and (
                            self.compile_error is not None or (self.defer_compile and key not in self._warm_keys)
                        )
                    # A shape not compiled yet runs eagerly; it compiles while the device is idle.
                    with torch.compiler.set_stance("force_eager") if deferred else nullcontext():
                        result = self._generate(
                            settings, progress, should_cancel, memory_saving=saving,
                            on_frames=sink if on_frames is not None else None, pipe=pipe,
                        )  # fmt: skip
                    result.timings["load"] = result.timings.get("load", 0.0) + load_s
                    result.timings["total"] = result.timings.get("total", 0.0) + load_s
                    return result, deferred
                except (JobCancelled, EngineError):
                    self._free()
                    raise
                except Exception as exc:
                    if not _is_oom(exc):
                        # Unknown failure: do not trust the pipeline's state; the next job
                        # rebuilds it from the still-loaded models (no disk reads).
                        self._pipe = None
                        self._free()
                        raise
                    self._free()
                    if saving or delivered or self.memory_saving is False or not self._is_long(settings):
                        raise EngineError("out_of_memory", self._oom_message(settings)) from exc
                    log.warning(
                        "out of memory for %d frames at %dx%d: retrying with the memory savers on",
                        settings.frames, settings.width, settings.height,
                    )  # fmt: skip
                    saving = True

    def _shape_key(self, s: GenerateRequest) -> tuple[Any, ...]:
        """What decides the compiled graphs a (resolved) job runs through: models, clip
        shape, CFG, FreeNoise windows, prompt travel and how many LoRAs (peft adds layers)."""
        assert s.context_length is not None
        windows = (min(s.context_length, s.frames), s.context_stride) if self._is_long(s) else None
        return (
            s.base_model, s.motion_module, s.frames, s.width, s.height, (s.guidance or 0.0) > 1.0, windows,
            bool(s.prompt_travel), len(s.motion_loras), s.domain_adapter is not None,
        )  # fmt: skip

    @staticmethod
    def _warm_request(s: GenerateRequest) -> GenerateRequest:
        """A 2-step job of the same shape: what compiling a shape runs."""
        return msgspec.structs.replace(s, steps=2, preview_every=0)

    @property
    def pending_warm_ups(self) -> int:
        """Shapes that ran eagerly and wait for warm_pending() to compile them."""
        return len(self._to_warm)

    def warm_pending(self, should_yield: Callable[[], bool] = lambda: False) -> bool:
        """Compile the shapes that jobs ran eagerly (deferred), one 2-step run each,
        stopping as soon as `should_yield()` says a job is waiting (between shapes, or
        between the UNet's blocks of the shape compiling, which then comes first next time).  Returns
        True when none is left.  When a shape fails to compile, compiling stops for good
        (`compile_error`, logged): every job runs eagerly from then on."""
        ran = False
        while self._to_warm:
            if should_yield():
                return False
            key, request = self._to_warm.popitem(last=False)
            if request.base_model == self._base_id and self._swaps_in(request.motion_module):
                # Its motion module takes the loaded one's place by a weight copy: the same
                # graphs serve both, compiled here on the loaded one (the swap relabels them).
                request = msgspec.structs.replace(request, motion_module=self._motion_id)
                key = self._shape_key(request)
            if key in self._warm_keys or (request.base_model, request.motion_module) != (self._base_id, self._motion_id):
                continue  # compiled meanwhile, or for models no longer loaded (not worth reloading them)
            t0 = time.perf_counter()
            try:
                with self._gpu_lock:
                    self._warm_run(request, should_yield)
            except JobCancelled:  # a job (or a stop) arrived mid-shape: first in line next time
                self._to_warm[key] = request
                self._to_warm.move_to_end(key, last=False)
                return False
            except EngineError as exc:  # its models went away or broke since its job: not the compiler
                with self._gpu_lock:
                    self._shape_dropped(request, exc)
                continue
            except Exception as exc:
                with self._gpu_lock:
                    self._compile_failed(request, exc)
                return True
            self._warm_keys.add(key)
            ran = True
            log.info(
                "compiled for %d frames at %dx%d in %.1f s (while idle)",
                request.frames, request.width, request.height, time.perf_counter() - t0,
            )  # fmt: skip
        if ran:
            self._save_compile_cache()
        return True

    @staticmethod
    def _is_long(s: GenerateRequest) -> bool:
        """Whether the job runs FreeNoise (the memory savers only apply there)."""
        assert s.context_length is not None
        return s.frames > s.context_length or (bool(s.prompt_travel) and s.frames > 1)

    def _oom_message(self, s: GenerateRequest) -> str:
        return (
            f"Out of memory on {self.device_name()} for {s.frames} frames at {s.width}x{s.height} "
            f"(context window {s.context_length} frames).  Try fewer frames, a smaller size, or a shorter "
            "context_length: clips longer than the window are generated window by window, so length costs "
            "less memory than size."
        )

    def _generate(
        self, s: GenerateRequest, progress: ProgressCallback, should_cancel: CancelCheck, *,
        memory_saving: bool = False, on_frames: FrameSink | None = None, pipe: Any = None,
    ) -> GenerationResult:  # fmt: skip
        """One run on the device (a job, or a warm-up run that compiles a shape), on `pipe`
        when the caller has just ensured it (a job: what it loaded decided how it runs)."""
        with _cudnn_benchmark(self.fast.cudnn_benchmark and self.device.type == "cuda"):
            return self._run(s, progress, should_cancel, memory_saving=memory_saving, on_frames=on_frames, pipe=pipe)

    def _run(
        self, s: GenerateRequest, progress: ProgressCallback, should_cancel: CancelCheck, *,
        memory_saving: bool, on_frames: FrameSink | None, pipe: Any = None,
    ) -> GenerationResult:  # fmt: skip
        assert s.base_model and s.motion_module and s.steps is not None and s.guidance is not None
        assert s.context_length is not None and s.context_stride is not None
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        if should_cancel():
            raise JobCancelled()
        if pipe is None:
            pipe = self._ensure_pipeline(s.base_model, s.motion_module, progress, should_cancel)
        loras = [
            _LoraJob(f"adb_lora{i}", lora.id, float(lora.weight), self._lora_weights(lora.id, "motion_loras"))
            for i, lora in enumerate(s.motion_loras)
        ]
        if s.domain_adapter:
            loras.append(
                _LoraJob(
                    DOMAIN_ADAPTER_NAME,
                    s.domain_adapter,
                    float(s.domain_adapter_scale),
                    self._lora_weights(s.domain_adapter, "domain_adapter"),
                )
            )
        max_len = int(pipe.motion_adapter.config.motion_max_seq_length)
        if s.context_length > max_len and s.frames > min(s.context_length, max_len):
            raise EngineError(
                "invalid_request",
                f"context_length: the motion module {s.motion_module!r} handles at most {max_len} frames at once, "
                f"got {s.context_length}",
            )
        # Sliding windows when the clip is longer than one window; prompt travel needs
        # FreeNoise's per-frame prompt interpolation even for a single window.
        free_noise: tuple[int, int] | None = None
        if self._is_long(s):
            free_noise = (min(s.context_length, s.frames), s.context_stride)
        prompt: str | dict[int, str] = s.prompt
        if s.prompt_travel:
            prompt = {0: s.prompt, **{int(k): v for k, v in s.prompt_travel.items()}}
            if s.frames == 1:
                # Nothing to travel between: diffusers' interpolation would fill no frame
                # (zero text embeddings, the prompt silently ignored).
                prompt = prompt[0]

        scheduler = self._schedulers.get(s.preset)
        if scheduler is None:
            # One per preset and base model, reused: every call's set_timesteps resets its
            # state (as in any diffusers pipeline called twice), and building one from its
            # config is milliseconds of host time before the first kernel.
            scheduler = self._schedulers[s.preset] = get_preset(s.preset).make_scheduler(self._base.scheduler_config)
        if pipe.scheduler is not scheduler:
            pipe.scheduler = scheduler
        timings["load"] = time.perf_counter() - t0

        preview_every = s.preview_every

        def on_step_end(_pipe: Any, i: int, _t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            step = i + 1
            preview = None
            if preview_every and step % preview_every == 0:
                preview = latents_to_preview(callback_kwargs["latents"])
            progress(StepProgress(step, int(_pipe.num_timesteps), preview, phase="denoise"))
            if should_cancel():
                raise JobCancelled()
            return callback_kwargs

        with self._job_state(pipe, free_noise, loras, memory_saving):
            t1 = time.perf_counter()
            generator = torch.Generator("cpu").manual_seed(s.seed)
            latents = self._call_pipe(pipe, s, prompt, generator, on_step_end)
            self._sync()
            timings["denoise"] = time.perf_counter() - t1
        if should_cancel():
            raise JobCancelled()
        if not _all_finite(latents):  # before any frame is decoded or handed over
            raise EngineError("model_error", self._non_finite_message(s, "denoising"))
        progress(StepProgress(s.steps, s.steps, None, phase="decode"))
        t2 = time.perf_counter()
        # With a frame sink, decode a few frames at a time and hand each batch over at
        # once: the server encodes and stores them while the device decodes the next.
        # A compiled VAE decoder sees one batch shape: always chunks of that size.
        fixed = self.fast.compile_vae
        step = self.stream_chunk_size if on_frames is not None or fixed else s.frames
        frames: list[np.ndarray] = []
        with torch.no_grad():
            for start in range(0, s.frames, step):
                if start and should_cancel():  # a long clip decodes for seconds
                    raise JobCancelled()
                ready = self._decode(pipe, latents[:, :, start : start + step], step if fixed else 0, s)
                frames.extend(ready)
                if on_frames is not None:
                    on_frames(start, ready)
        del latents
        timings["decode"] = time.perf_counter() - t2
        timings["total"] = time.perf_counter() - t0
        return GenerationResult(frames=frames, settings=s, timings=timings)

    def _decode(self, pipe: Any, latents: torch.Tensor, pad_to: int, s: GenerateRequest) -> list[np.ndarray]:
        """Frames of video latents (1, C, F, h, w) as uint8 arrays.  `pad_to`: decode that
        many frames (the last one repeated, the copies dropped) so that a compiled decoder
        sees no new shape for a clip's last, shorter chunk."""
        count = latents.shape[2]
        if pad_to > count:
            latents = torch.cat([latents, latents[:, :, -1:].expand(-1, -1, pad_to - count, -1, -1)], dim=2)
        video = pipe.decode_latents(latents, self.decode_chunk_size)[:, :, :count]
        if not _all_finite(video):  # NaN would come out as black pixels
            raise EngineError("model_error", self._non_finite_message(s, "decoding"))
        video = pipe.video_processor.postprocess_video(video=video, output_type="pt")  # (B, F, 3, H, W)
        return _to_uint8_frames(video)

    def _non_finite_message(self, s: GenerateRequest, stage: str) -> str:
        models = [f"base_model {s.base_model}", f"motion_module {s.motion_module}"]
        models += [f"motion_loras {lora.id} (weight {lora.weight:g})" for lora in s.motion_loras]
        if s.domain_adapter:
            models.append(f"domain_adapter {s.domain_adapter} (scale {s.domain_adapter_scale:g})")
        dtype = str(self.dtype).removeprefix("torch.")
        hint = "lower LoRA weights, or another model" if s.motion_loras or s.domain_adapter else "another model"
        return (
            f"The clip came out as NaN or infinite values while {stage} (it would be black frames): a model "
            f"file holds broken weights, or the numbers overflowed in {dtype}.  Models used: "
            f"{', '.join(models)}.  Try {hint}."
        )

    @staticmethod
    def _call_pipe(pipe: Any, s: GenerateRequest, prompt: Any, generator: Any, on_step_end: Any) -> Any:
        return pipe(
            prompt=prompt,
            negative_prompt=s.negative_prompt,
            num_frames=s.frames,
            height=s.height,
            width=s.width,
            num_inference_steps=s.steps,
            guidance_scale=s.guidance,
            generator=generator,
            output_type="latent",
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        ).frames

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ housekeeping

    @property
    def pipeline(self) -> Any:
        """The loaded AnimateDiffPipeline (None before the first job), for benchmarks and tests.
        Between jobs it holds no LoRA, FreeNoise or memory-saving state."""
        return self._pipe

    def warm_up(
        self,
        base_model: str | None = None,
        motion_module: str | None = None,
        requests: list[GenerateRequest] | None = None,
        should_yield: Callable[[], bool] | None = None,
    ) -> bool:
        """Load the given (default: the server's default) base model and motion module now,
        so that the first job does not pay for it.  With compilation on, also run each of
        `requests` (default: one per `fast.warm_shapes`) for 2 steps, so that compiling
        happens here -- while the server's handshake says "warming up" -- and not in the
        first artist's job, and save the compiled artefacts for the next start.

        `should_yield()` is asked before each shape and, while one compiles, between the
        UNet's blocks (`_warm_run`): when it says a job is waiting, that shape and the ones
        left are handed to warm_pending() (the job runs eagerly meanwhile).  Returns True
        when every shape was compiled."""
        t0 = time.perf_counter()
        settings = self.resolve(
            GenerateRequest(prompt="", base_model=base_model, motion_module=motion_module)
        )
        assert settings.base_model and settings.motion_module
        with self._gpu_lock:
            self._ensure_pipeline(settings.base_model, settings.motion_module, lambda _p: None)
            self._preload_fast_motion_module()
            if self.fast.compiles:
                if requests is None:
                    requests = [
                        GenerateRequest(
                            prompt="warm-up",
                            frames=frames,
                            width=width,
                            height=height,
                            guidance=7.5 if cfg else 1.0,
                        )
                        for frames, width, height, cfg in self.fast.warm_shapes
                    ]
                jobs = [
                    self.resolve(
                        msgspec.structs.replace(
                            request,
                            base_model=settings.base_model,
                            motion_module=settings.motion_module,
                            preset="quality",
                            steps=2,
                            preview_every=0,
                            motion_loras=[],
                            domain_adapter=None,
                        )
                    )
                    for request in requests
                ]
                for i, job in enumerate(jobs):
                    if should_yield is not None and should_yield():
                        for later in jobs[i:]:
                            self._to_warm.setdefault(self._shape_key(later), later)
                        break
                    try:
                        self._warm_run(job, should_yield)
                    except JobCancelled:  # a job arrived mid-shape: it and the rest compile later
                        for later in jobs[i:]:
                            self._to_warm.setdefault(self._shape_key(later), later)
                        break
                    except EngineError as exc:  # the models' fault (as any job would say), not the compiler's
                        self._shape_dropped(job, exc)
                        continue
                    except Exception as exc:
                        self._compile_failed(job, exc)
                        break
                    self._warm_keys.add(self._shape_key(job))
                self._save_compile_cache()
        self.warm_up_s = time.perf_counter() - t0
        return not self._to_warm

    def _preload_fast_motion_module(self) -> None:
        """Read the Fast preset's motion module (the registry's "motion_lightning") onto the
        CPU now: the first Fast job then only copies its weights into the UNet (or builds
        one) instead of reading a file first.  A file that cannot be read is the job's to say."""
        from animatediff_blender.backend.models import loading

        motion_id = self.default_models().get("motion_lightning")
        if not motion_id or motion_id == self._motion_id:
            return
        try:
            entry = self._current_entry(motion_id, "motion_module")
            if (motion_id, entry.sha256) not in self._adapters:
                self._keep_adapter((motion_id, entry.sha256), loading.load_motion_adapter(entry, self.dtype))
                self.load_counts["motion"] += 1
        except Exception as exc:  # noqa: BLE001 - warm-up goes on without it
            log.warning("could not read the Fast preset's motion module %s ahead of time: %s", motion_id, exc)

    def _swaps_in(self, motion_id: str | None) -> bool:
        """Whether `motion_id`, another module kept on the CPU, would take the loaded one's place
        by a weight copy (same architecture) rather than a rebuild."""
        from animatediff_blender.backend.models import loading

        if self._adapter is None or motion_id == self._motion_id or self.fast.compile == "full":
            return False
        kept = [a for (kept_id, _sha), a in self._adapters.items() if kept_id == motion_id]
        return bool(kept) and self.swap_motion_weights and loading.same_motion_architecture(self._adapter, kept[-1])

    def _keep_adapter(self, key: tuple[str, str], adapter: Any) -> None:
        """Keep a motion module on the CPU for later, dropping the oldest beyond the limit."""
        self._adapters[key] = adapter
        while len(self._adapters) > KEPT_MOTION_ADAPTERS:
            self._adapters.popitem(last=False)

    def _warm_run(self, request: GenerateRequest, should_yield: Callable[[], bool] | None) -> None:
        """One 2-step run of a shape, which compiles it; JobCancelled as soon as
        `should_yield()` says a job is waiting.  A cold shape compiles for over a minute on an
        H200, all of it inside the first UNet call: with regional compilation the call is
        interruptible between the UNet's blocks (eager containers, outside every compiled
        region), and the regions compiled so far stay in dynamo's cache for the next try."""
        if should_yield is None:
            self._generate(request, lambda _p: None, lambda: False)
            return

        def check(_module: Any, _args: Any) -> None:
            if should_yield():
                raise JobCancelled()

        handles = []
        unet = self._pipe.unet if self._pipe is not None else None
        if unet is not None and self.fast.compile == "regional":
            blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
            handles = [block.register_forward_pre_hook(check) for block in blocks if block is not None]
        denoised = False

        def progress(p: StepProgress) -> None:
            nonlocal denoised
            denoised = denoised or p.phase == "decode"

        try:
            # Not during the decode: the shape's graphs are all compiled by then, and a run
            # stopped there would leave it not marked warm (the waiting job would run eagerly).
            self._generate(request, progress, lambda: not denoised and should_yield())
        finally:
            for handle in handles:
                handle.remove()

    def _shape_dropped(self, request: GenerateRequest, exc: EngineError) -> None:
        """A shape could not run for a reason of its own (a model deleted, replaced by a
        broken file, or giving NaNs): it is not compiled, the others still are."""
        log.warning(
            "not compiling for %d frames at %dx%d: %s (%s)",
            request.frames, request.width, request.height, exc.message, exc.code,
        )  # fmt: skip
        self._free()

    def _compile_failed(self, request: GenerateRequest, exc: Exception) -> None:
        """Compiling one shape failed: stop compiling for good (each further try would fail
        the same way, holding the device meanwhile); jobs keep running, eagerly."""
        log.error(
            "could not compile for %d frames at %dx%d (%s: %s): jobs run at stock speed from now on",
            request.frames, request.width, request.height, type(exc).__name__, exc, exc_info=exc,
        )  # fmt: skip
        self.compile_error = f"{type(exc).__name__}: {exc}"
        self._to_warm.clear()
        self._free()

    def unload(self) -> None:
        """Drop every loaded model (the next job loads again)."""
        with self._gpu_lock:
            self._pipe = None
            self._base = self._adapter = None
            self._base_id = self._motion_id = None
            self._base_sha = self._motion_sha = ""
            self._lora_cache.clear()
            self._adapters.clear()
            self._free()
