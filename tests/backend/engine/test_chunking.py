"""Feed-forwards in row chunks (`engine/chunking.py`, the `ff_chunk_elements` lever): the
same tokens out, no chunk over the budget, every feed-forward of a long clip reached
(FreeNoise's windowed blocks included), frames unchanged, no graph break when compiled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.models.attention import FeedForward

from animatediff_blender.backend.engine.animatediff import AnimateDiffEngine, FastPath
from animatediff_blender.backend.engine.chunking import chunk_feed_forwards, in_row_chunks, rows_per_chunk
from animatediff_blender.backend.engine.freenoise import WINDOW_BATCH_ELEMENTS
from animatediff_blender.protocol.messages import GenerateRequest

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize(
    ("shape", "budget", "rows"),
    [
        ((10, 5, 8), 400, 10),  # fits: whole
        ((10, 5, 8), 399, 5),  # two chunks of 5
        ((10, 5, 8), 100, 2),  # 2 rows fit (80 elements): 5 chunks of 2
        ((10, 5, 8), 130, 3),  # 3 rows fit: 4 chunks, as equal as possible (3, 3, 3, 1 -> 3)
        ((10, 5, 8), 10, 1),  # not even a row fits: one row at a time
        ((1, 500), 10, 1),
    ],
)
def test_rows_per_chunk(shape: tuple[int, ...], budget: int, rows: int) -> None:
    assert rows_per_chunk(shape, budget) == rows
    assert rows * int(np.prod(shape[1:])) <= max(budget, int(np.prod(shape[1:])))


def test_chunked_feed_forward_gives_the_same_tokens_within_the_budget() -> None:
    torch.manual_seed(0)
    ff = FeedForward(8, activation_fn="geglu").eval()
    hidden = torch.randn(10, 5, 8)
    with torch.no_grad():
        whole = ff(hidden)
        seen: list[int] = []
        ff.net[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].numel()))
        assert chunk_feed_forwards(torch.nn.Sequential(ff), 100) == 1
        assert chunk_feed_forwards(ff, 100) == 0  # idempotent
        chunked = ff(hidden)
    assert seen == [80] * 5
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    with torch.no_grad():
        seen.clear()
        ff(hidden[:2])  # within the budget: one call
    assert seen == [80]
    plain = in_row_chunks(lambda x: x * 2, 10**9)
    assert torch.equal(plain(hidden), hidden * 2)


def _request(**kw: Any) -> GenerateRequest:
    fields: dict[str, Any] = dict(
        prompt="a cat walking on the beach", negative_prompt="blurry", base_model="base:tiny-sd15",
        motion_module="motion:tiny-motion-adapter-v2", frames=8, width=64, height=64, steps=2, seed=7,
        preview_every=0, context_length=4, context_stride=2,
    )  # fmt: skip
    fields.update(kw)
    return GenerateRequest(**fields)


def _frames(engine: AnimateDiffEngine, **kw: Any) -> np.ndarray:
    result = engine.generate(_request(**kw), lambda _p: None, lambda: False)
    return np.stack(result.frames).astype(np.int16)


def _feed_forward_inputs(engine: AnimateDiffEngine) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """A second long job of `engine` (the first loads the models and builds the windowed
    blocks, which later jobs reuse): its frames, and every feed-forward input as (elements,
    elements of one row)."""
    _frames(engine)
    modules = [*engine.pipeline.unet.modules()]
    for windowed in engine._free_noise_blocks.values():
        modules.extend(windowed.modules())
    calls: list[tuple[int, int]] = []
    handles = [
        m.net[0].register_forward_pre_hook(lambda _m, args: calls.append((args[0].numel(), args[0][0].numel())))
        for m in modules
        if isinstance(m, FeedForward)
    ]
    try:
        frames = _frames(engine)
    finally:
        for handle in handles:
            handle.remove()
    return frames, calls


def test_long_clip_feed_forwards_run_in_chunks_with_the_same_frames(tiny_zoo: Path) -> None:
    budget = 4096
    eager = AnimateDiffEngine(tiny_zoo, "cpu", "fp32", fast=FastPath(batch_windows=True))
    chunked = AnimateDiffEngine(tiny_zoo, "cpu", "fp32", fast=FastPath(batch_windows=True, ff_chunk_elements=budget))
    expected, whole = _feed_forward_inputs(eager)
    frames, calls = _feed_forward_inputs(chunked)
    assert any(n > budget for n, _row in whole)  # the clip reaches the budget ...
    assert all(n <= max(budget, row) for n, row in calls), calls  # ... and no chunk goes over it
    assert sum(n for n, _row in calls) == sum(n for n, _row in whole)  # every token, once
    windowed = [*chunked._free_noise_blocks.values()]
    assert windowed and all(getattr(b.ff, "_adb_row_chunks", None) == budget for b in windowed)
    assert np.abs(frames - expected).max() <= 1  # per-token maths: rounding only


def test_compiled_chunked_feed_forwards_trace_without_graph_breaks(tiny_zoo: Path) -> None:
    import torch._dynamo.utils

    torch._dynamo.utils.counters.clear()
    eager = AnimateDiffEngine(tiny_zoo, "cpu", "fp32")
    fast = AnimateDiffEngine(
        tiny_zoo, "cpu", "fp32",
        fast=FastPath(compile="regional", compile_backend="eager", batch_windows=True, ff_chunk_elements=4096,
                      warm_shapes=()),
        defer_compile=False,
    )  # fmt: skip
    assert np.abs(_frames(fast) - _frames(eager)).max() <= 2
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


def _unet_batches(engine: AnimateDiffEngine, **kw: Any) -> tuple[np.ndarray, list[int]]:
    """A job's frames (after a first job that loads the models) and the batch of every UNet
    call in it (seen at conv_in: once per call)."""
    _frames(engine, **kw)
    batches: list[int] = []
    handle = engine.pipeline.unet.conv_in.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    try:
        frames = _frames(engine, **kw)
    finally:
        handle.remove()
    return frames, batches


@pytest.mark.parametrize("travel", [False, True])
def test_split_batch_runs_one_cfg_half_at_a_time_with_the_same_frames(tiny_zoo: Path, travel: bool) -> None:
    """Prompt travel: each frame has its own text embedding, negative frames first; a half
    that got the other half's embeddings would change the frames far beyond rounding."""
    kw: dict[str, Any] = {"prompt_travel": {0: "a cat", 6: "a dog"}} if travel else {}
    whole = AnimateDiffEngine(tiny_zoo, "cpu", "fp32", fast=FastPath(batch_windows=True))
    split = AnimateDiffEngine(tiny_zoo, "cpu", "fp32", fast=FastPath(batch_windows=True, split_batch_over=8))
    expected, whole_batches = _unet_batches(whole, **kw)
    frames, batches = _unet_batches(split, **kw)
    assert set(whole_batches) == {2 * 8} and len(batches) == 2 * len(whole_batches)  # 8 frames x the CFG pair
    assert set(batches) == {8}
    assert np.abs(frames - expected).max() <= 1
    # Each half batches as many FreeNoise windows as the whole pair did: half the budget.
    budgets = {e: {b.window_batch_elements for b in e._free_noise_blocks.values()} for e in (whole, split)}
    assert budgets == {whole: {WINDOW_BATCH_ELEMENTS}, split: {WINDOW_BATCH_ELEMENTS // 2}}
    # Within the limit (4 frames x 2 = 8 images): one call per step, as before.
    _short, short_batches = _unet_batches(split, frames=4, context_length=None, context_stride=None)
    assert set(short_batches) == {8} and len(short_batches) == 2
