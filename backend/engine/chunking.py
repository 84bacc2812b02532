"""Bounded activations for long clips: feed-forwards in row chunks, and (a lever) the UNet
called one CFG half at a time.

A transformer block's feed-forward widens every token 8x in SD1.5 (GEGLU: a projection to
2 x 4 x channels, then the gated half).  For a 16-frame 512x512 clip with CFG that widened
tensor is the largest thing a UNet call holds (640 MiB in fp16, in the motion modules and
in the spatial transformers alike); for 64 frames it is four times that, 2.5 GiB, next to
1.25 GiB for each half.  The feed-forward is per token, so running it on a few rows at a
time (images for the spatial blocks, spatial positions for the motion blocks) gives the
same tokens out and holds only one chunk's widened tensor.  Inputs within the budget run
whole, so clips of up to 16 frames at 512x512 are untouched.

`scripts/memory_probe.py` (meta device, eager, SD1.5 + v2 at 512x512 with CFG) estimates
the activations' peak of one UNet call: 16 frames 2.03 GiB; 64 frames 8.59 GiB, 5.47 GiB
with feed-forwards chunked at 2**26 elements; 128 frames 17.19 / 9.37 GiB.

What is left at 64 frames is the clip itself: the skip connections and hidden states of 128
images (64 frames x the CFG pair) and the windows' float32 accumulator.  The CFG halves never
meet inside the UNet, so calling it once per half holds half of that: 3.13 GiB at 64 frames
with the chunked feed-forwards, the FreeNoise windows batched as many per batch as for the
whole pair (3.52 GiB with twice as many).  Run 5 (H200) measured 4.55 GiB for the 16-frame
clip (2.03 GiB of it activations by this estimate) and 7.94 GiB for 64 frames without the
split (5.47): with it, ~5.65 GiB, ~1.24x the 16-frame peak against 1.75x, for two calls per
step on 64 images instead of one on 128.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch

# Largest feed-forward input (elements) run whole: a 16-frame 512x512 clip's with CFG is
# 2**25.3 (8192 rows x 16 frames x 320 channels, or 32 images x 4096 tokens x 320).
FF_CHUNK_ELEMENTS = 2**26
# The `split-batch` lever's threshold: a 16-frame clip's CFG batch (32 images) runs whole.
SPLIT_BATCH_IMAGES = 32


def rows_per_chunk(shape: torch.Size | tuple[int, ...], max_elements: int) -> int:
    """Rows (first dimension) per chunk so that a chunk holds at most `max_elements`, in
    chunks as equal as possible; all rows when the whole input fits."""
    rows = shape[0]
    total = math.prod(shape)
    if total <= max_elements or rows <= 1:
        return rows
    fit = max(1, max_elements // (total // rows))  # rows within the budget (one, if a row is over it)
    return math.ceil(rows / math.ceil(rows / fit))


def in_row_chunks(forward: Callable[..., torch.Tensor], max_elements: int) -> Callable[..., torch.Tensor]:
    """`forward` (a per-token module's, e.g. a FeedForward's), run on chunks of the input's
    rows when the input holds more than `max_elements` elements, the results concatenated."""

    @functools.wraps(forward)
    def chunked(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows = rows_per_chunk(hidden_states.shape, max_elements)
        if rows >= hidden_states.shape[0]:
            return forward(hidden_states, *args, **kwargs)
        return torch.cat(
            [forward(hidden_states[s : s + rows], *args, **kwargs) for s in range(0, hidden_states.shape[0], rows)]
        )

    return chunked


def chunk_feed_forwards(module: torch.nn.Module, max_elements: int) -> int:
    """Make every diffusers `FeedForward` in `module` run in row chunks (instance-level, so
    state dicts, LoRA injection and compiled regions see the same modules).  Idempotent;
    returns how many it changed."""
    from diffusers.models.attention import FeedForward

    changed = 0
    for ff in module.modules():
        if isinstance(ff, FeedForward) and not getattr(ff, "_adb_row_chunks", None):
            ff.forward = in_row_chunks(ff.forward, max_elements)  # type: ignore[method-assign]
            ff._adb_row_chunks = max_elements
            changed += 1
    return changed


# Keyword arguments that say nothing per batch element (anything else: the call runs whole).
_SHARED_KWARGS = ("cross_attention_kwargs", "return_dict", "added_cond_kwargs", "timestep_cond")


def in_batch_elements(forward: Callable[..., Any], max_images: int) -> Callable[..., Any]:
    """A motion UNet's `forward` (sample: batch x channels x frames x h x w; text embeddings
    batch-major, one per frame: diffusers' pipelines put the negative prompt's frames first),
    called once per batch element (for CFG: per half) when a call holds more than
    `max_images` images, the predictions concatenated."""

    @functools.wraps(forward)
    def split(sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        batch, frames = sample.shape[0], sample.shape[2]
        per_element = (
            batch > 1
            and batch * frames > max_images
            and not args
            and encoder_hidden_states.shape[0] == batch * frames
            and all(k in _SHARED_KWARGS and not v for k, v in kwargs.items() if k != "return_dict")
        )
        if not per_element:
            return forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
        per_batch_t = isinstance(timestep, torch.Tensor) and timestep.dim() > 0 and timestep.shape[0] == batch
        outs = [
            forward(
                sample[i : i + 1], timestep[i : i + 1] if per_batch_t else timestep,
                encoder_hidden_states[i * frames : (i + 1) * frames], **kwargs,
            )  # fmt: skip
            for i in range(batch)
        ]
        if isinstance(outs[0], tuple):
            return (torch.cat([o[0] for o in outs]),)
        return type(outs[0])(sample=torch.cat([o.sample for o in outs]))

    return split
