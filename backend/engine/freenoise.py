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

With `share_projections` (the `share-projections` lever) it also skips work that the windows
repeat.  Windows of 16 at stride 4 put every frame through a motion block's two attentions
3.25 times, but two parts of that are the same for every window a frame is in:
the first attention's q/k/v projections (the input is per token: the layer norm of the
frame, plus the window position's sinusoidal embedding, which through a linear layer is a
per-position constant) and the second attention's output projection (linear, so it can be
applied once to the windows' weighted average).  These run once per frame instead of once
per window; the attention itself stays per window.  On a 64-frame clip that is ~9 % of a
step's FLOPs (`tests/backend/engine/test_freenoise.py` counts them).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention import FreeNoiseTransformerBlock, _chunked_feed_forward
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.embeddings import SinusoidalPositionalEmbedding

# Gathered window tokens (batch x window length x channels) per batch of windows: bounds the
# extra memory of batching (~5 tensors of this size live at once; 2**27 fp16 elements are
# 256 MiB) while stacking many windows of the lower-resolution blocks into one batch.  At
# 512x512 with CFG: 3 windows per batch at 64x64 latents, 6 at 32x32, 12 at 16x16, all at 8x8.
WINDOW_BATCH_ELEMENTS = 2**27


def windowed_like(
    plain: Any, kind: type[FreeNoiseTransformerBlock], context_length: int, context_stride: int, weighting: str
) -> Any:
    """A FreeNoise block of class `kind` for the plain motion block `plain`, built on the
    meta device around plain's own tensors (no random init, no copy)."""
    with torch.device("meta"):
        windowed = kind(
            dim=plain.dim,
            num_attention_heads=plain.num_attention_heads,
            attention_head_dim=plain.attention_head_dim,
            dropout=plain.dropout,
            cross_attention_dim=plain.cross_attention_dim,
            activation_fn=plain.activation_fn,
            attention_bias=plain.attention_bias,
            only_cross_attention=plain.only_cross_attention,
            double_self_attention=plain.double_self_attention,
            positional_embeddings=plain.positional_embeddings,
            num_positional_embeddings=plain.num_positional_embeddings,
            context_length=context_length,
            context_stride=context_stride,
            weighting_scheme=weighting,
        )
    windowed.load_state_dict(plain.state_dict(), strict=True, assign=True)
    return windowed


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


def window_weight_sums(num_frames: int, starts: list[int], tail: int, weights: list[float]) -> list[float]:
    """Per frame, the sum of the weights its windows are accumulated with (the last window
    counts only its last `tail` frames)."""
    return _sum_windows(num_frames, starts, tail, weights, quirk=False)


def window_normaliser(num_frames: int, starts: list[int], tail: int, weights: list[float]) -> list[float]:
    """Per frame, the sum that diffusers divides the accumulated windows by: the weight sums,
    except that a last window added to cover the clip's end adds that window's weight at its
    first counted frame to every counted frame (diffusers 0.42.1 indexes `weights[:, -n]`,
    not a slice): kept, because the frames must match stock FreeNoise's."""
    return _sum_windows(num_frames, starts, tail, weights, quirk=True)


def _sum_windows(num_frames: int, starts: list[int], tail: int, weights: list[float], quirk: bool) -> list[float]:
    length = len(weights)
    sums = [0.0] * num_frames
    for i, start in enumerate(starts):
        last = i == len(starts) - 1
        first_counted = length - tail if last else 0
        for j in range(first_counted, length):
            sums[start + j] += weights[length - tail] if quirk and last and tail != length else weights[j]
    return sums


class BatchedWindowsBlock(FreeNoiseTransformerBlock):  # type: ignore[misc]
    """A `FreeNoiseTransformerBlock` whose windows run as one batch (see the module doc)."""

    window_batch_elements: int = WINDOW_BATCH_ELEMENTS
    share_projections: bool = False

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

        if self.share_projections and encoder_hidden_states is None and self._can_share():
            hidden_states = self._windows_shared(hidden_states, starts, tail, weights, norm)
            return self._feed_forward(hidden_states)

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
        return self._feed_forward(hidden_states)

    def _feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """3. Feed-forward, on all frames at once (as diffusers)."""
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

    # --- share_projections ---------------------------------------------------------------

    def _can_share(self) -> bool:
        """The shared path reimplements diffusers' AttnProcessor2_0 for plain self-attention
        with an additive positional embedding; anything else takes the per-window path."""
        if not isinstance(self.pos_embed, SinusoidalPositionalEmbedding) or self.only_cross_attention:
            return False
        if self.norm_type != "layer_norm":
            return False
        return all(_plain_self_attention(a) for a in (self.attn1, self.attn2))

    def _windows_shared(
        self, hidden_states: torch.Tensor, starts: list[int], tail: int, weights: list[float], norm: list[float]
    ) -> torch.Tensor:
        batch, num_frames, channels = hidden_states.shape
        length = self.context_length
        attn1, attn2 = self.attn1, self.attn2
        device, dtype = hidden_states.device, hidden_states.dtype

        # 1. attn1's q/k/v of every frame, once: to(norm1(x) + pe[j]) = to(norm1(x)) + (to(pe[j]) - to(0)).
        normed = self.norm1(hidden_states)
        pe = self.pos_embed.pe[:, :length].to(dtype)
        zero = torch.zeros_like(pe)
        q_all, k_all, v_all = attn1.to_q(normed), attn1.to_k(normed), attn1.to_v(normed)
        del normed
        q_pe, k_pe, v_pe = (attn1.to_q(pe) - attn1.to_q(zero), attn1.to_k(pe) - attn1.to_k(zero),
                            attn1.to_v(pe) - attn1.to_v(zero))  # fmt: skip

        # 2. Per batch of windows: attn1's attention and output, attn2 up to its output
        # projection; the windows' residual stream and attn2's attention output are averaged.
        per_batch = max(1, self.window_batch_elements // max(1, batch * length * channels))
        offsets = torch.arange(length, device=device)
        frame_weights = torch.tensor(weights, device=device, dtype=torch.float32).view(1, length, 1)
        residual = torch.zeros(hidden_states.shape, device=device, dtype=torch.float32)
        attended = torch.zeros(hidden_states.shape, device=device, dtype=torch.float32)
        for first in range(0, len(starts), per_batch):
            group = starts[first : first + per_batch]
            index = torch.tensor(group, device=device).view(-1, 1) + offsets
            rows = batch * len(group)
            q = (q_all[:, index] + q_pe).reshape(rows, length, channels)
            k = (k_all[:, index] + k_pe).reshape(rows, length, channels)
            v = (v_all[:, index] + v_pe).reshape(rows, length, channels)
            out1 = _attention(attn1, q, k, v)
            del q, k, v  # (eager) the group's temporaries go as soon as they are used
            windows = hidden_states[:, index].reshape(rows, length, channels)
            windows = windows + attn1.to_out[1](attn1.to_out[0](out1))
            del out1
            normed2 = self.pos_embed(self.norm2(windows))
            q, k, v = attn2.to_q(normed2), attn2.to_k(normed2), attn2.to_v(normed2)
            del normed2
            out2 = _attention(attn2, q, k, v).view(batch, len(group), length, channels)
            del q, k, v
            windows = windows.view(batch, len(group), length, channels)
            for j, start in enumerate(group):
                skip = length - tail if first + j == len(starts) - 1 else 0
                w = frame_weights[:, skip:]
                residual[:, start + skip : start + length] += windows[:, j, skip:] * w
                attended[:, start + skip : start + length] += out2[:, j, skip:] * w
            del windows, out2
        del q_all, k_all, v_all

        # 3. attn2's output projection once, on the average: sum_i w_i (A o_i + b) / N is
        # A (sum_i w_i o_i / N) + b (sum_i w_i / N), and sum_i w_i is not N for the frames
        # of diffusers' added last window (its normaliser quirk).  In place: a 64-frame
        # clip's float32 accumulators are 0.6 GiB each at 64x64 latents.
        normaliser = torch.tensor(norm, device=device, dtype=torch.float32).view(1, num_frames, 1)
        projected = attn2.to_out[1](attn2.to_out[0](attended.div_(normaliser).to(dtype)))
        del attended
        residual.div_(normaliser).add_(projected)
        bias = attn2.to_out[0].bias
        if bias is not None:
            counted = window_weight_sums(num_frames, starts, tail, weights)
            scale = torch.tensor(counted, device=device, dtype=torch.float32).view(1, num_frames, 1) / normaliser
            residual.add_(bias.float() * (scale - 1))
        return residual.to(dtype)


def _plain_self_attention(attn: Any) -> bool:
    return (
        isinstance(attn, Attention)
        and type(attn.processor) is AttnProcessor2_0
        and not attn.is_cross_attention
        and attn.spatial_norm is None
        and attn.group_norm is None
        and attn.norm_q is None
        and attn.norm_k is None
        and not attn.residual_connection
        and attn.rescale_output_factor == 1.0
        and not getattr(attn, "fused_projections", False)
    )


def _attention(attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """AttnProcessor2_0's core, from projected q/k/v [rows, length, inner] to the attention
    output before `to_out`."""
    rows, length, inner = query.shape
    head_dim = inner // attn.heads
    shape = (rows, length, attn.heads, head_dim)
    q, k, v = query.view(shape).transpose(1, 2), key.view(shape).transpose(1, 2), value.view(shape).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(rows, length, inner).to(query.dtype)
