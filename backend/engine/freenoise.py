"""FreeNoise's windowed motion block with its windows batched (a fast-path lever).

diffusers' `FreeNoiseTransformerBlock` runs the temporal self-attentions of a long clip
window by window in a Python loop: for 64 frames in windows of 16 at stride 4 that is 13
iterations in each of the 21 motion blocks of a UNet call, each a dozen small kernels and
eager glue (slicing, norms, weights, an accumulation in the hidden dtype).  On an H200 the
64-frame clip ran at 192 TFLOP/s where 16 frames run at 306.

`BatchedWindowsBlock` computes the same thing with the windows stacked along the batch
dimension (the temporal attention of one window never looks at another, nor across
spatial positions), a bounded number of windows at a time, and the weighted average of
overlapping windows accumulated in float32.  It has no graph break, so a compiled motion
module traces it whole.  Weights, window placement and FreeNoise's normaliser (including
diffusers' treatment of an incomplete last window) are diffusers'; only the order of the
float sums differs.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention import FreeNoiseTransformerBlock, _chunked_feed_forward

# Gathered window tokens (batch x window length x channels) per batch of windows: bounds the
# extra memory of batching (~5 tensors of this size live at once; 2**27 fp16 elements are
# 256 MiB) while stacking many windows of the lower-resolution blocks into one batch.  At
# 512x512 with CFG: 3 windows per batch at 64x64 latents, 6 at 32x32, 12 at 16x16, all at 8x8.
WINDOW_BATCH_ELEMENTS = 2**27


def window_starts(num_frames: int, context_length: int, context_stride: int) -> tuple[list[int], int]:
    """First frame of each window, as diffusers places them, and how many frames of the last
    window count (all of them, unless it was added to cover the clip's end)."""
    if num_frames < context_length:
        raise ValueError(f"Expected {num_frames=} to be greater or equal than {context_length=}")
    starts = list(range(0, num_frames - context_length + 1, context_stride))
    tail = context_length
    if starts[-1] + context_length != num_frames:
        tail = num_frames - (starts[-1] + context_length)
        starts.append(num_frames - context_length)
    return starts, tail


def window_normaliser(num_frames: int, starts: list[int], tail: int, weights: list[float]) -> list[float]:
    """Per frame, the sum that diffusers divides the accumulated windows by.  For a last
    window added to cover the clip's end it adds that window's weight at its first counted
    frame to every counted frame (diffusers 0.42.1 indexes `weights[:, -n]`, not a slice):
    kept, because the frames must match stock FreeNoise's."""
    length = len(weights)
    norm = [0.0] * num_frames
    for i, start in enumerate(starts):
        last = i == len(starts) - 1
        first_counted = length - tail if last else 0
        for j in range(first_counted, length):
            norm[start + j] += weights[length - tail] if last and tail != length else weights[j]
    return norm


class BatchedWindowsBlock(FreeNoiseTransformerBlock):  # type: ignore[misc]
    """A `FreeNoiseTransformerBlock` whose windows run as one batch (see the module doc)."""

    window_batch_elements: int = WINDOW_BATCH_ELEMENTS

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if attention_mask is not None or encoder_attention_mask is not None or cross_attention_kwargs:
            # Masks per window are not batched here (AnimateDiff's motion modules pass none).
            return super().forward(
                hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                cross_attention_kwargs, *args, **kwargs,
            )  # fmt: skip

        # hidden_states: [batch x height x width, frames, channels]
        batch, num_frames, channels = hidden_states.shape
        length = self.context_length
        starts, tail = window_starts(num_frames, length, self.context_stride)
        weights = self._get_frame_weights(length, self.weighting_scheme)
        norm = window_normaliser(num_frames, starts, tail, weights)

        # 1. The windows' attentions, as many windows per batch as the budget allows.
        per_batch = max(1, self.window_batch_elements // max(1, batch * length * channels))
        offsets = torch.arange(length, device=hidden_states.device)
        frame_weights = torch.tensor(weights, device=hidden_states.device, dtype=torch.float32).view(1, length, 1)
        accumulated = torch.zeros(hidden_states.shape, device=hidden_states.device, dtype=torch.float32)
        for first in range(0, len(starts), per_batch):
            group = starts[first : first + per_batch]
            index = torch.tensor(group, device=hidden_states.device).view(-1, 1) + offsets
            windows = hidden_states[:, index].reshape(batch * len(group), length, channels)
            context = encoder_hidden_states
            if context is not None:
                context = context.repeat_interleave(len(group), dim=0)
            out = self._attend(windows, context).view(batch, len(group), length, channels)
            # 2. Weighted sum of the overlapping windows (float32, whatever the model's dtype).
            for j, start in enumerate(group):
                skip = length - tail if first + j == len(starts) - 1 else 0
                accumulated[:, start + skip : start + length] += out[:, j, skip:] * frame_weights[:, skip:]

        normaliser = torch.tensor(norm, device=hidden_states.device, dtype=torch.float32).view(1, num_frames, 1)
        hidden_states = (accumulated / normaliser).to(hidden_states.dtype)

        # 3. Feed-forward, on all frames at once (as diffusers).
        norm_hidden_states = self.norm3(hidden_states)
        if self._chunk_size is not None:
            ff_output = _chunked_feed_forward(self.ff, norm_hidden_states, self._chunk_dim, self._chunk_size)
        else:
            ff_output = self.ff(norm_hidden_states)
        return ff_output + hidden_states

    def _attend(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> torch.Tensor:
        """Self-attention (+ the second attention) with residuals, on a batch of windows."""
        norm_hidden_states = self.norm1(hidden_states)
        if self.pos_embed is not None:
            norm_hidden_states = self.pos_embed(norm_hidden_states)
        hidden_states = hidden_states + self.attn1(
            norm_hidden_states, encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None
        )
        if self.attn2 is not None:
            norm_hidden_states = self.norm2(hidden_states)
            if self.pos_embed is not None and self.norm_type != "ada_norm_single":
                norm_hidden_states = self.pos_embed(norm_hidden_states)
            hidden_states = hidden_states + self.attn2(norm_hidden_states, encoder_hidden_states=encoder_hidden_states)
        return hidden_states
