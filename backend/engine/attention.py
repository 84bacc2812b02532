"""Attention implementations the fast path can pin for part of the UNet (`FastPath.sdpa`,
`FastPath.temporal_sdpa`).

The motion modules' temporal attention runs over sequences of 16 frames, up to 2 x 64 x 64
of them per head, head dims 40-160: ~2 % of a step's attention FLOPs in 42 of its 74
attention calls.  Kernels built for long sequences tile 64-128 queries at a time, so most
of their work there is padding.  Besides forcing one of torch's SDPA backends, "reduced"
writes the attention out as multiply-and-sum reductions (float32 accumulation), which
inductor fuses into kernels of its own -- written as matmuls, inductor's pattern matcher
would turn it back into SDPA.  "triton" runs them in a kernel of the project's own that
puts several sequences in one tile (`short_attention.py`).  Memory-bound either way: a
step's temporal q/k/v/out are a few hundred MB.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
REDUCED = "reduced"
TRITON = "triton"
TEMPORAL_ATTENTION = (*SDPA_BACKENDS, REDUCED, TRITON)


def reduced_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the last two dims, as broadcast multiply-sums in
    float32 (for short sequences: q/k/v (..., tokens, dim))."""
    scale = 1.0 / math.sqrt(query.shape[-1])
    scores = (query.unsqueeze(-2) * key.unsqueeze(-3)).sum(-1, dtype=torch.float32) * scale
    weights = torch.softmax(scores, dim=-1)
    return (weights.unsqueeze(-1) * value.unsqueeze(-3).float()).sum(-2).to(query.dtype)


class _ReplacedAttention(TorchFunctionMode):
    """Inside: plain scaled-dot-product attention calls (no mask, dropout, causality or
    custom scale) go to `implementation`; anything else runs as called."""

    def __init__(self, implementation: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.implementation = implementation

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and len(args) == 3 and _plain(kwargs):
            return self.implementation(*args)
        return func(*args, **kwargs)


def _plain(kwargs: dict[str, Any]) -> bool:
    return (
        kwargs.get("attn_mask") is None
        and not kwargs.get("dropout_p")
        and not kwargs.get("is_causal")
        and kwargs.get("scale") is None
        and not kwargs.get("enable_gqa")
    )


def with_attention(inner: Callable[..., Any], implementation: str) -> Callable[..., Any]:
    """`inner`, its scaled-dot-product attention calls pinned to `implementation` (one of
    TEMPORAL_ATTENTION but "auto").  Both ways trace into a compiled region."""
    if implementation in (REDUCED, TRITON):
        if implementation == REDUCED:
            replacement = reduced_attention
        else:
            from . import short_attention

            short_attention.load()  # not inside a traced region
            replacement = short_attention.short_attention

        def replaced(*args: Any, **kwargs: Any) -> Any:
            with _ReplacedAttention(replacement):
                return inner(*args, **kwargs)

        return replaced
    from torch.nn.attention import SDPBackend, sdpa_kernel

    allowed = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[implementation]

    def forward(*args: Any, **kwargs: Any) -> Any:
        with sdpa_kernel([allowed]):
            return inner(*args, **kwargs)

    return forward
