"""Offline evidence for the `share-projections` lever (issue #6), no GPU needed.

1. FLOPs of one UNet call (SD1.5 + v2 motion modules, 512x512, CFG batch) with FreeNoise
   windows of 16 at stride 4, per-window against shared projections, counted with
   FlopCounterMode on the meta device (no weights, seconds).
2. CPU time of one batched-windows motion block (64 frames) at each of SD1.5's three
   motion-block widths, with as many spatial rows as keep a run to a few seconds
   (fp32, the machine's threads), per-window and shared alternating, best of three.

Usage: python scripts/window_block_probe.py [FRAMES=64 ...]
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from animatediff_blender.backend.bench.models import meta_motion_unet
from animatediff_blender.backend.engine.freenoise import BatchedWindowsBlock


def block_kwargs(dim: int) -> dict[str, Any]:
    return dict(
        dim=dim, num_attention_heads=8, attention_head_dim=dim // 8, cross_attention_dim=None,
        activation_fn="geglu", attention_bias=False, double_self_attention=True,
        positional_embeddings="sinusoidal", num_positional_embeddings=32,
        context_length=16, context_stride=4, weighting_scheme="pyramid",
    )  # fmt: skip


def unet_flops(frames: int) -> tuple[float, float]:
    unet = meta_motion_unet("real", (16, 4))
    blocks = [m for m in unet.modules() if isinstance(m, BatchedWindowsBlock)]
    sample = torch.zeros(2, 4, frames, 64, 64, device="meta")
    context = torch.zeros(2 * frames, 77, 768, device="meta")  # the pipeline repeats the prompt per frame
    counts = []
    for share in (False, True):
        for block in blocks:
            block.share_projections = share
        with FlopCounterMode(display=False) as counter:
            unet(sample, torch.tensor(10), encoder_hidden_states=context)
        counts.append(counter.get_total_flops() / 1e12)
    return counts[0], counts[1]


def block_seconds(dim: int, rows: int, frames: int = 64) -> tuple[float, float]:
    torch.manual_seed(0)
    block = BatchedWindowsBlock(**block_kwargs(dim)).eval()
    block.window_batch_elements = BatchedWindowsBlock.window_batch_elements * rows // 8192  # as at 512x512
    hidden = torch.randn(rows, frames, dim)
    best = {False: float("inf"), True: float("inf")}
    with torch.no_grad():
        for share in (False, True) * 3:
            block.share_projections = share
            block(hidden)
            start = time.perf_counter()
            block(hidden)
            best[share] = min(best[share], time.perf_counter() - start)
    return best[False], best[True]


def main() -> None:
    for frames in [int(a) for a in sys.argv[1:]] or [64]:
        per_window, shared = unet_flops(frames)
        print(
            f"UNet call, {frames} frames: per-window {per_window:.1f} TFLOP, shared {shared:.1f} ({shared / per_window - 1:+.1%})"
        )
    for dim, rows in ((320, 512), (640, 128), (1280, 32)):
        per_window, shared = block_seconds(dim, rows)
        print(f"CPU, one motion block of width {dim}, {rows} rows x 64 frames: per-window {per_window * 1e3:.0f} ms, "
              f"shared {shared * 1e3:.0f} ms ({shared / per_window - 1:+.1%})")  # fmt: skip


if __name__ == "__main__":
    main()
