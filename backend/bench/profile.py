"""Where one denoising step's time goes: the UNet call of a real pipeline step, replayed
under torch.profiler, its kernels grouped into a few categories (matrix products,
convolutions, attention, norms, compiled fusions, copies, element-wise).

The numbers answer "what is in the way" when a speed target is missed: the share of the
step the GPU is busy at all (launch gaps), and which kind of kernel takes the time.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any

from animatediff_blender.backend.bench.timeline import (
    JOB_LABEL,
    LABEL_PREFIX,
    analyse,
    format_timeline,
    load_trace,
)

# Checked in order: the first pattern that matches a kernel (or, on the CPU, an aten op)
# name gives its category.  cuDNN's convolution kernels mention "gemm" too, so
# convolutions come before matrix products.
_CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("attention", re.compile(r"flash|fmha|attention|scaled_dot_product|sdpa", re.I)),
    ("convolution", re.compile(r"conv|fprop|dgrad|wgrad|cudnn", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|cublas|xmma|matmul|aten::(mm|addmm|bmm|baddbmm|linear)\b", re.I)),
    ("norm", re.compile(r"norm", re.I)),
    ("copy/layout", re.compile(r"copy|transpose|permute|\bcat\b|cat_|contiguous|clone|memcpy|memset|nchw|nhwc", re.I)),
    ("element-wise", re.compile(r"elementwise|vectorized|unrolled|reduce|silu|gelu|add|mul|div|softmax", re.I)),
)  # fmt: skip


def categorize(name: str) -> str:
    """The category of one kernel (CUDA) or aten op (CPU) name."""
    if name.startswith("triton_"):
        # Inductor's generated kernels: name the fused work they mostly do.
        if "norm" in name:
            return "compiled: norm"
        if re.search(r"_(mm|addmm|bmm)_|tem_fused", name):
            return "compiled: matmul"
        return "compiled: fused"
    for category, pattern in _CATEGORIES:
        if pattern.search(name):
            return category
    return "other"


@contextmanager
def wrapped(obj: Any, attr: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Iterator[None]:
    """Inside the block, `obj.<attr>` is `wrap(obj.<attr>)`; afterwards exactly what was
    there before: an instance-level (or module-level) value is put back, a class's method
    shows through again."""
    own = obj.__dict__ if hasattr(obj, "__dict__") else {}
    had = attr in own
    previous = own.get(attr)
    setattr(obj, attr, wrap(getattr(obj, attr)))
    try:
        yield
    finally:
        if had:
            setattr(obj, attr, previous)
        else:
            delattr(obj, attr)


def around_forward(module: Any, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> AbstractContextManager[None]:
    """Inside the block, `module.forward` is `wrap(module.forward)` (an instance-level
    wrapper already there, such as the engine's sdpa lever, comes back afterwards)."""
    return wrapped(module, "forward", wrap)


@contextmanager
def labelled_job(engine: Any) -> Iterator[None]:
    """Inside the block, the engine's pipeline parts carry `adb:` profiler labels, which
    `timeline.analyse` attributes the device's idle gaps to."""
    from torch.profiler import record_function

    def label(obj: Any, attr: str, name: str) -> AbstractContextManager[None]:
        def wrap(inner: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                with record_function(LABEL_PREFIX + name):
                    return inner(*args, **kwargs)

            return call

        return wrapped(obj, attr, wrap)

    import animatediff_blender.backend.engine.animatediff as animatediff

    pipe = engine.pipeline
    with ExitStack() as stack:
        if pipe is not None:
            stack.enter_context(label(pipe, "encode_prompt", "encode_prompt"))
            stack.enter_context(label(pipe, "prepare_latents", "prepare_latents"))
            stack.enter_context(label(pipe.unet, "forward", "unet"))
            stack.enter_context(label(pipe.vae, "decode", "vae.decode"))
            stack.enter_context(label(pipe.video_processor, "postprocess_video", "postprocess_video"))
        stack.enter_context(label(animatediff, "_to_uint8_frames", "to_uint8_frames"))
        yield


@contextmanager
def profile_first_unet_call(unet: Any, profile: Callable[[Callable[[], Any]], None]) -> Iterator[list[int]]:
    """Inside the block, the UNet's first call is handed to `profile` (which may run it
    several times) before it runs for real: in place, with the job's state -- FreeNoise's
    windowed blocks, LoRAs -- as the pipeline set it up.  Yields a list that records
    the calls seen (a profile that never ran is an error for the caller to report)."""
    seen: list[int] = []

    def profiling(inner: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if not seen:
                profile(lambda: inner(*args, **kwargs))
            seen.append(1)
            return inner(*args, **kwargs)

        return forward

    with around_forward(unet, profiling):
        yield seen


def _device_us(event: Any) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, attr, None)
        if value:
            return float(value)
    return 0.0


def profile_call(
    runner: str,
    call: Callable[[], Any],
    *,
    cuda: bool,
    what: str = "one UNet step",
    repeats: int = 3,
    flops_per_step: float = 0.0,
    top: int = 15,
    timeline: bool = False,
    trace_path: Path | None = None,
) -> dict[str, Any]:
    """Profile `call` (`what`: one UNet step on the CFG batch, or a whole job) `repeats`
    times; per call: wall time (un-profiled, synchronised), summed kernel time, busy share,
    time per category and the top kernels.  For a whole job the busy share says how much
    of its time the GPU waited for the host (launches, syncs, host-side work).

    `timeline`: also record the host side (each call labelled `adb:job`; the caller's
    `adb:` labels inside it) and say when the device was idle and what the host was doing
    then (`timeline.analyse`); `trace_path`: keep the trace there, gzipped, to read again
    without a GPU."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    with torch.no_grad():
        call()  # anything lazy (a compile left over, cuBLAS handles) happens here
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            call()
        sync()
        wall_ms = (time.perf_counter() - t0) * 1000 / repeats
        activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
        # The host's ops: the timeline needs its labels and launches, the attention table the
        # SDPA ops' input shapes.  Recording shapes costs host time per op, which would show
        # as idle device time in a timeline: one or the other.
        activities = [activity, ProfilerActivity.CPU] if cuda else [activity]
        with profile(activities=activities, record_shapes=not timeline) as prof:
            for _ in range(repeats):
                if timeline:
                    with record_function(JOB_LABEL):
                        call()
                else:
                    call()
            sync()
    kernels: dict[str, list[float]] = {}  # name -> [count, total us]
    for event in prof.key_averages():
        if cuda and str(getattr(event, "device_type", "")).endswith("CPU"):
            continue  # host ops (recorded for the timeline) carry their kernels' time too
        if event.key.startswith("adb:"):
            continue  # our own labels (CPU runs): the calls inside them, not work of their own
        us = _device_us(event) if cuda else float(getattr(event, "self_cpu_time_total", 0.0))
        if us <= 0:
            continue
        if not cuda and not event.key.startswith("aten::"):
            continue
        entry = kernels.setdefault(event.key, [0.0, 0.0])
        entry[0] += event.count
        entry[1] += us
    total_ms = sum(us for _, us in kernels.values()) / 1000 / repeats
    categories: dict[str, float] = {}
    for name, (_, us) in kernels.items():
        cat = categorize(name)
        categories[cat] = categories.get(cat, 0.0) + us / 1000 / repeats
    ranked = sorted(kernels.items(), key=lambda kv: kv[1][1], reverse=True)[:top]
    result = {
        "runner": runner,
        "what": what,
        "device": "cuda" if cuda else "cpu",
        "repeats": repeats,
        "wall_ms": wall_ms,
        "kernel_ms": total_ms,
        # Kernel time over wall time: well under 1 means the GPU waits for the CPU (launches).
        "busy_share": total_ms / wall_ms if wall_ms > 0 else 0.0,
        "tflops": flops_per_step / (wall_ms / 1000) / 1e12 if wall_ms > 0 and flops_per_step else 0.0,
        "kernel_count": sum(int(c) for c, _ in kernels.values()) // repeats,
        "categories": dict(sorted(categories.items(), key=lambda kv: kv[1], reverse=True)),
        "top": [
            {"name": name[:160], "calls": int(count) // repeats, "ms": us / 1000 / repeats,
             "category": categorize(name)}
            for name, (count, us) in ranked
        ],  # fmt: skip
    }
    if timeline:
        result["timeline"] = _timeline(prof, trace_path)
    else:
        result["attention"] = attention_by_shape(prof, cuda=cuda, repeats=repeats)
    return result


# The SDPA implementations (alternatives, never nested in one another): each one's total
# device time covers the kernels it launched.
_SDPA_OP = re.compile(
    r"^aten::_scaled_dot_product_(flash_attention|efficient_attention|cudnn_attention|attention_math|"
    r"flash_attention_for_cpu|fused_attention_overrideable)$"
)


def attention_by_shape(prof: Any, *, cuda: bool, repeats: int) -> list[dict[str, Any]]:
    """The profiled calls' attention time by implementation and shape (compiled regions
    call the same aten ops), slowest first: which attentions the category's time is."""
    rows = []
    for event in prof.key_averages(group_by_input_shape=True):
        if not _SDPA_OP.match(event.key) or not event.input_shapes or len(event.input_shapes) < 2:
            continue
        q, k = event.input_shapes[0], event.input_shapes[1]
        if len(q) != 4 or len(k) != 4:
            continue
        us = float(getattr(event, "device_time_total", 0.0) or 0.0) if cuda else float(event.cpu_time_total)
        ms = us / 1000 / repeats
        flops = 4.0 * q[0] * q[1] * q[2] * k[2] * q[3] * event.count / repeats
        rows.append({
            "op": event.key.removeprefix("aten::_scaled_dot_product_"), "q": list(q), "kv_len": k[2],
            "calls": event.count // repeats, "ms": ms, "tflops": flops / (ms / 1000) / 1e12 if ms > 0 else 0.0,
        })  # fmt: skip
    return sorted(rows, key=lambda r: r["ms"], reverse=True)


def _timeline(prof: Any, trace_path: Path | None) -> dict[str, Any]:
    """The profile's timeline analysis; the trace kept (gzipped) at `trace_path`.  A
    failure here is reported in the result, never raised: the rest of the profile stands."""
    try:
        fd, raw = tempfile.mkstemp(suffix=".json", dir=trace_path.parent if trace_path else None)
        os.close(fd)
        try:
            prof.export_chrome_trace(raw)
            found = analyse(load_trace(Path(raw)), min_gap_us=20.0)
            if trace_path is not None:
                with open(raw, "rb") as src, gzip.open(trace_path, "wb", compresslevel=6) as dst:
                    shutil.copyfileobj(src, dst)
                found["trace"] = str(trace_path)
            return found
        finally:
            os.unlink(raw)
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not cost the run's numbers
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def format_profile(p: dict[str, Any]) -> str:
    """A short table for the log."""
    kernel_ms = p["kernel_ms"] or 1.0
    lines = [
        f"profile {p['runner']}: {p.get('what', 'one UNet step')} {p['wall_ms']:.1f} ms wall, {p['kernel_ms']:.1f} ms in "
        f"{p['kernel_count']} kernels (busy {100 * p['busy_share']:.0f}%)"
        + (f", {p['tflops']:.0f} TFLOP/s" if p.get("tflops") else "")
    ]
    for cat, ms in p["categories"].items():
        lines.append(f"    {cat:18s} {ms:8.2f} ms  {100 * ms / kernel_ms:5.1f}%")
    lines.append("  top kernels:")
    for k in p["top"]:
        lines.append(f"    {k['ms']:8.2f} ms  x{k['calls']:<4d} {k['category']:16s} {k['name'][:110]}")
    if p.get("attention"):
        lines.append("  attention by shape (q: batch x heads x tokens x dim; kv tokens):")
        for a in p["attention"]:
            q = "x".join(str(n) for n in a["q"])
            lines.append(f"    {a['ms']:8.2f} ms  x{a['calls']:<4d} {a['op']:24s} q {q:22s} kv {a['kv_len']:<5d} "
                         f"{a['tflops']:6.1f} TFLOP/s")  # fmt: skip
    t = p.get("timeline")
    if t is not None:
        lines.append(f"  timeline failed: {t['error']}" if "error" in t else format_timeline(t))
        if t.get("trace"):
            lines.append(f"  trace: {t['trace']}")
    return "\n".join(lines)
