"""The attention calls of one denoising step, each shape timed alone with each SDPA backend.

The profiles of a compiled quality step on an H200 put ~31-33 ms of its ~109 ms in
attention kernels, at ~130 TFLOP/s by the FLOPs of the spatial self-attentions alone.  They
cannot say which calls take that time: the spatial self-attentions (up to 4096 tokens, heads
40 wide where flash kernels work in tiles of 64), the cross-attentions on 77 text tokens, or
the motion modules' temporal attentions -- sequences of 16 frames, up to 2 x 64 x 64 of them
per head, which kernels built for long sequences tile 64-128 queries at a time.  FreeNoise's
windows multiply only the temporal calls (3.25x at stride 4), which may be why a 64-frame
step reached 259 TFLOP/s where 16 frames reach 303.

Here: every attention call of one UNet call of a benchmark case (the SD1.5 + v2 structure,
FreeNoise windows batched as the engine batches them), recorded on the meta device (no
weights: seconds), grouped by shape; then each shape timed alone on the device with each
backend, on inputs laid out as diffusers' processors lay them out (heads a strided view of
the projections).  The sums per kind say where a step's attention time goes and which
backend serves each kind best; the engine's `temporal-sdpa` lever then picks one for the
motion modules only (a whole-job measurement, `bench --lever default+temporal-sdpa:...`),
or "reduced" (the attention written out, compiled by inductor).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from animatediff_blender.backend.bench.models import Size, meta_motion_unet, unet_configs
from animatediff_blender.backend.bench.profile import wrapped
from animatediff_blender.backend.bench.run import Case
from animatediff_blender.backend.engine.attention import SDPA_BACKENDS, reduced_attention

# torch's SDPA backends, each forced alone ("auto": torch's own choice, named in the results).
BACKENDS = SDPA_BACKENDS
# The attention written out as float32 multiply-sums and compiled by inductor (the engine's
# `temporal_sdpa="reduced"`): for the temporal calls' 16-token sequences, kernels of its own
# may beat kernels tiled for long sequences.  (Written as matmuls, inductor's pattern matcher
# turns it back into SDPA.)
REDUCED = "reduced"
# The project's Triton kernel for short sequences (`temporal_sdpa="triton"`,
# `engine/short_attention.py`); "triton:ROWS" times it with other tile rows.  Sequences over
# its 64 tokens are reported as not run, not silently handed to SDPA.
TRITON = "triton"
KINDS = ("spatial", "cross", "temporal")
TEXT_TOKENS = 77


@dataclass(frozen=True)
class AttentionCall:
    """One attention shape of a UNet call: q is (batch, heads, q_len, head_dim), k and v
    (batch, heads, kv_len, head_dim); `calls` of them per UNet call."""

    kind: str
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    calls: int = 1

    @property
    def flops(self) -> float:
        """q @ k^T and p @ v of one call, 2 FLOPs per multiply-add."""
        return 4.0 * self.batch * self.heads * self.q_len * self.kv_len * self.head_dim

    def describe(self) -> str:
        return f"{self.batch}x{self.heads}x{self.q_len}x{self.kv_len}x{self.head_dim}"


@dataclass
class Timing:
    """One shape with one backend: microseconds per call, or why it could not run."""

    backend: str
    us: float | None = None
    chosen: str | None = None  # for "auto": the backend torch picked
    max_abs_err: float | None = None  # against float32 maths on the same inputs
    error: str | None = None

    def tflops(self, call: AttentionCall) -> float | None:
        return None if not self.us else call.flops / (self.us * 1e-6) / 1e12


def record_step_attention(case: Case, size: Size) -> list[AttentionCall]:
    """Every scaled-dot-product attention of one UNet call of `case` (the CFG batch when its
    guidance is above 1), grouped by kind and shape in the order first seen."""
    import torch
    import torch.nn.functional as F
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    unet_cfg, _ = unet_configs(size)
    windows = None
    if case.free_noise:
        assert case.context_length is not None and case.context_stride is not None
        windows = (case.context_length, case.context_stride)
    unet = meta_motion_unet(size, windows)
    motion_modules = [m for m in unet.modules() if isinstance(m, AnimateDiffTransformer3D)]
    batch = 2 if case.guidance > 1.0 else 1
    scale = 2 ** (len(unet_cfg["block_out_channels"]) - 1)  # the VAE's: same depth as the UNet's here
    sample = torch.zeros(batch, unet_cfg["in_channels"], case.frames, case.height // scale, case.width // scale,
                         device="meta")  # fmt: skip
    # The pipeline repeats the prompt's embedding for every frame.
    context = torch.zeros(batch * case.frames, TEXT_TOKENS, unet_cfg["cross_attention_dim"], device="meta")

    depth = [0]  # > 0 inside a motion module
    seen: dict[tuple[str, int, int, int, int, int], int] = {}

    def recording(inner: Callable[..., Any]) -> Callable[..., Any]:
        def sdpa(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
            b, h, n_q, d = query.shape
            n_kv = key.shape[-2]
            kind = "temporal" if depth[0] > 0 else ("spatial" if n_kv == n_q and n_q != TEXT_TOKENS else "cross")
            shape = (kind, b, h, n_q, n_kv, d)
            seen[shape] = seen.get(shape, 0) + 1
            return inner(query, key, value, *args, **kwargs)

        return sdpa

    def enter(*_: Any) -> None:
        depth[0] += 1

    def leave(*_: Any) -> None:
        depth[0] -= 1

    handles = [h for m in motion_modules for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.no_grad(), wrapped(F, "scaled_dot_product_attention", recording):
            unet(sample, torch.tensor(10), encoder_hidden_states=context)
    finally:
        for handle in handles:
            handle.remove()
    return [AttentionCall(kind, b, h, q, kv, d, calls) for (kind, b, h, q, kv, d), calls in seen.items()]


@contextmanager
def _only_backend(name: str) -> Iterator[None]:
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }.get(name)
    with nullcontext() if backend is None else sdpa_kernel([backend]):
        yield


def _inputs(call: AttentionCall, device: Any, dtype: Any, seed: int) -> tuple[Any, Any, Any]:
    """q, k, v as diffusers' processors make them: (batch, len, heads x dim) projections
    viewed as heads and transposed (strided, not contiguous)."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    inner = call.heads * call.head_dim

    def one(length: int) -> Any:
        x = torch.randn(call.batch, length, inner, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        return x.view(call.batch, length, call.heads, call.head_dim).transpose(1, 2)

    return one(call.q_len), one(call.kv_len), one(call.kv_len)


def _reference(q: Any, k: Any, v: Any) -> Any:
    """float32 attention, in batch chunks of at most ~256 MiB of scores."""
    import torch

    b, h, n_q, _ = q.shape
    per = max(1, (1 << 26) // max(1, h * n_q * k.shape[-2]))
    out = []
    for i in range(0, b, per):
        qq, kk, vv = (t[i : i + per].float() for t in (q, k, v))
        scores = (qq @ kk.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        out.append(torch.softmax(scores, dim=-1) @ vv)
    return torch.cat(out)


def _chosen_backend(q: Any, k: Any, v: Any) -> str:
    import torch
    from torch.nn.attention import SDPBackend

    try:
        return SDPBackend(torch._fused_sdp_choice(q, k, v)).name.lower()
    except Exception:  # noqa: BLE001 - a private helper: the name is a nicety
        return "?"


def time_call(
    call: AttentionCall, backend: str, *, device: Any, dtype: Any, iters: int, seed: int = 0,
    reference: Any = None, inputs: tuple[Any, Any, Any] | None = None,
) -> Timing:  # fmt: skip
    """Time `iters` calls of one shape with one backend (after two untimed ones); a backend
    that cannot run the shape is reported, not raised."""
    import torch
    import torch.nn.functional as F

    cuda = torch.device(device).type == "cuda"
    q, k, v = inputs if inputs is not None else _inputs(call, device, dtype, seed)
    timing = Timing(backend)
    if backend == REDUCED:
        fn: Callable[[], Any] = _compiled(q, k, v)
    elif backend.partition(":")[0] == TRITON:
        from animatediff_blender.backend.engine import short_attention as sa

        why = sa.unsupported_reason(q, k, v)
        if why is not None:
            return Timing(backend, error=f"not run: {why}")
        rows = int(backend.partition(":")[2] or sa.ROWS)

        def fn() -> Any:
            return sa.short_attention(q, k, v, rows=rows)
    else:

        def fn() -> Any:
            with _only_backend(backend):
                return F.scaled_dot_product_attention(q, k, v)

        if backend == "auto":
            timing.chosen = _chosen_backend(q, k, v)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flash attention not used because ..." for each refusal
            out = fn()
            fn()
            sync()
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            sync()
            timing.us = (time.perf_counter() - start) * 1e6 / max(1, iters)
            if reference is not None:
                timing.max_abs_err = float((out.float() - reference).abs().max())
    except Exception as exc:  # noqa: BLE001 - "no kernel for this shape" is a result
        timing.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    return timing


def _compiled(q: Any, k: Any, v: Any) -> Callable[[], Any]:
    import torch

    compiled = torch.compile(reduced_attention, dynamic=False)
    return lambda: compiled(q, k, v)


@dataclass
class ShapeResult:
    call: AttentionCall
    timings: list[Timing]


@dataclass
class CaseAttention:
    case: str
    frames: int
    width: int
    height: int
    cfg_batch: int
    shapes: list[ShapeResult]

    def total_flops(self) -> float:
        return sum(s.call.flops * s.call.calls for s in self.shapes)

    def per_unet_call_ms(self, kind: str | None, backend: str) -> float | None:
        """Milliseconds of one UNet call's attention of `kind` (None: all) with `backend`
        ("best": the fastest backend per shape); None when a shape has no time."""
        total = 0.0
        for shape in self.shapes:
            if kind is not None and shape.call.kind != kind:
                continue
            times = [t.us for t in shape.timings if t.us is not None and (backend in ("best", t.backend))]
            if not times:
                return None
            total += min(times) * shape.call.calls / 1000
        return total

    def to_json(self) -> dict[str, Any]:
        backends = [t.backend for t in self.shapes[0].timings] if self.shapes else []
        return {
            "case": self.case, "frames": self.frames, "width": self.width, "height": self.height,
            "cfg_batch": self.cfg_batch, "attention_tflop_per_unet_call": self.total_flops() / 1e12,
            "shapes": [
                {**asdict(s.call), "gflop_per_call": s.call.flops / 1e9,
                 "timings": [{**asdict(t), "tflops": t.tflops(s.call)} for t in s.timings]}
                for s in self.shapes
            ],
            "per_unet_call_ms": {
                kind or "all": {b: self.per_unet_call_ms(kind, b) for b in [*backends, "best"]}
                for kind in (*KINDS, None)
            },
        }  # fmt: skip


def bench_case(
    case: Case, size: Size, *, device: str, dtype: str, backends: list[str], iters: int,
    compiled_kinds: tuple[str, ...] = (), print_fn: Callable[[str], None] = print,
) -> CaseAttention:  # fmt: skip
    """Record `case`'s attention calls and time each shape with each backend (plus the
    inductor-compiled reduced attention for `compiled_kinds`)."""
    import torch

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    calls = record_step_attention(case, size)
    result = CaseAttention(case.name, case.frames, case.width, case.height, 2 if case.guidance > 1 else 1, [])
    for i, call in enumerate(calls):
        inputs = _inputs(call, device, torch_dtype, seed=i)
        reference = _reference(*inputs)
        timings = [
            time_call(call, b, device=device, dtype=torch_dtype, iters=iters, reference=reference, inputs=inputs)
            for b in backends
        ]
        if call.kind in compiled_kinds:
            timings.append(time_call(call, REDUCED, device=device, dtype=torch_dtype, iters=iters,
                                     reference=reference, inputs=inputs))  # fmt: skip
        else:
            timings.append(Timing(REDUCED, error="not compiled for this kind"))
        del inputs, reference
        shape = ShapeResult(call, timings)
        result.shapes.append(shape)
        print_fn(format_shape(shape))
    return result


def _cell(call: AttentionCall, t: Timing) -> str:
    if t.us is None:
        return f"{'-':>17s}"
    tf = t.tflops(call) or 0.0
    return f"{t.us:9.1f}us {tf:4.0f}TF"


def format_header(case: CaseAttention | Case, backends: list[str]) -> str:
    cols = "".join(f"{b:>17s}" for b in [*backends, REDUCED])
    return f"  {'kind':8s} {'calls':>5s}  {'b x heads x q x kv x dim':26s} {'GFLOP':>7s}{cols}"


def format_shape(shape: ShapeResult) -> str:
    call = shape.call
    cells = "".join(_cell(call, t) for t in shape.timings)
    notes = [f"auto={t.chosen}" for t in shape.timings if t.chosen]
    errs = [t.max_abs_err for t in shape.timings if t.max_abs_err is not None]
    if errs:
        notes.append(f"max err {max(errs):.1e}")
    return f"  {call.kind:8s} {call.calls:5d}  {call.describe():26s} {call.flops / 1e9:7.1f}{cells}  {' '.join(notes)}"


def format_summary(result: CaseAttention) -> str:
    backends = [t.backend for t in result.shapes[0].timings] if result.shapes else []
    lines = [f"  per UNet call (ms)  {''.join(f'{b:>11s}' for b in [*backends, 'best'])}"]
    for kind in (*KINDS, None):
        cells = []
        for b in [*backends, "best"]:
            ms = result.per_unet_call_ms(kind, b)
            cells.append(f"{'-':>11s}" if ms is None else f"{ms:11.2f}")
        lines.append(f"  {kind or 'all':19s} {''.join(cells)}")
    return "\n".join(lines)


def best_temporal_backend(result: dict[str, Any], min_gain: float = 0.05) -> str | None:
    """From a `bench-attention` JSON result: the implementation (an SDPA backend other than
    "auto", "reduced" or "triton") whose temporal attention, summed over the result's cases, beats
    torch's own choice by more than `min_gain` of the cases' whole attention time with that
    choice; None if none does (or torch's choice is not timed).  What the `temporal` phase
    of gpu_bench.sh measures next as the `temporal-sdpa` lever."""
    totals: dict[str, float] = {}
    everything = 0.0
    for case in result.get("cases", []):
        per_kind = case.get("per_unet_call_ms", {})
        everything += per_kind.get("all", {}).get("auto") or 0.0
        for backend, ms in per_kind.get("temporal", {}).items():
            if backend in (*BACKENDS, REDUCED, TRITON):  # one that cannot run a case's shapes is out
                totals[backend] = totals.get(backend, 0.0) + (math.inf if ms is None else ms)
    auto = totals.pop("auto", None)
    if auto is None or not totals or everything <= 0:
        return None
    name, ms = min(totals.items(), key=lambda kv: kv[1])
    return name if auto - ms > min_gain * everything else None
