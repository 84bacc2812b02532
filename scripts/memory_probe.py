"""Offline estimate of the denoise's peak device memory (issue #6's "long64 peak <= 1.3x our
16-frame peak"), no GPU needed.

One UNet call (SD1.5 + v2 motion modules, 512x512, CFG batch, fp16) runs eagerly on the
meta device under a dispatch mode that adds up the bytes of the tensors alive after each
op; attention is counted as a fused kernel would hold it (its output only), not as the
meta device's math fallback would (the whole score matrix).  Weights are not counted.
Compiled regions hold fewer intermediates than eager ops, so this is an upper bound of the
eager kind, for comparing clip lengths and levers with each other, not a GPU figure.

Usage: python scripts/memory_probe.py [FRAMES=16 64 ...] [--chunk-ff [ELEMENTS]] [--split-batch]

2026-11-27 (CPU, seconds): 16 frames 2.03 GiB; 64 frames 8.59 GiB (x4.23), 5.47 GiB (x2.69)
with --chunk-ff (2**26, the engine's CUDA default), 3.13 GiB (x1.54) with --split-batch too
(3.52 with the whole pair's window budget per half); 128 frames 17.19 / 9.37 / 5.47 GiB.
Run 5 (H200) measured 4.55 and 7.94 GiB for 16 and 64 frames with --chunk-ff: these
estimates plus ~2.5 GiB (weights, the VAE, allocator slack).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from animatediff_blender.backend.bench.memory import LiveBytes
from animatediff_blender.backend.bench.models import meta_motion_unet
from animatediff_blender.backend.engine.chunking import (
    FF_CHUNK_ELEMENTS,
    SPLIT_BATCH_IMAGES,
    chunk_feed_forwards,
)
from animatediff_blender.backend.engine.freenoise import WINDOW_BATCH_ELEMENTS, BatchedWindowsBlock

GiB = 1024**3


def fused_attention(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
    """What a flash/efficient kernel allocates: the output (and a small logsumexp)."""
    return torch.empty(*query.shape[:-1], value.shape[-1], dtype=query.dtype, device=query.device)


def unet_peak(frames: int, chunk_ff: int | None, split_batch: bool = False) -> float:
    unet = meta_motion_unet("real", (16, 4) if frames > 16 else None).half()
    if chunk_ff:
        chunk_feed_forwards(unet, chunk_ff)  # as the engine does (windowed blocks included)
    # --split-batch: beyond a 16-frame clip's CFG batch, one CFG half per call (its peak is the
    # call's), with as many FreeNoise windows per batch as the whole pair had (as the engine does).
    batch = 1 if split_batch and 2 * frames > SPLIT_BATCH_IMAGES else 2
    if batch == 1:
        for block in unet.modules():
            if isinstance(block, BatchedWindowsBlock):
                block.window_batch_elements = WINDOW_BATCH_ELEMENTS // 2
    sample = torch.zeros(batch, 4, frames, 64, 64, device="meta", dtype=torch.half)
    context = torch.zeros(batch * frames, 77, 768, device="meta", dtype=torch.half)
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = fused_attention
    try:
        with torch.no_grad(), LiveBytes() as probe:
            unet(sample, torch.tensor(10), encoder_hidden_states=context)
    finally:
        F.scaled_dot_product_attention = original
    return probe.peak / GiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("frames", nargs="*", type=int, default=[16, 64])
    parser.add_argument(
        "--chunk-ff", type=int, nargs="?", const=FF_CHUNK_ELEMENTS, default=None, metavar="ELEMENTS",
        help=f"feed-forwards in row chunks beyond this many input elements (default {FF_CHUNK_ELEMENTS})",
    )
    parser.add_argument(
        "--split-batch", action="store_true",
        help=f"the UNet called per CFG half beyond {SPLIT_BATCH_IMAGES} images",
    )  # fmt: skip
    args = parser.parse_args()
    base = None
    for frames in args.frames:
        peak = unet_peak(frames, args.chunk_ff, args.split_batch)
        base = base or peak
        print(f"{frames:4d} frames (CFG batch {2 * frames}): activations peak {peak:6.2f} GiB  x{peak / base:.2f}"
              + (f"  (feed-forwards chunked beyond {args.chunk_ff} elements)" if args.chunk_ff else "")
              + ("  (one CFG half per call)" if args.split_batch and 2 * frames > SPLIT_BATCH_IMAGES else ""))


if __name__ == "__main__":
    main()
