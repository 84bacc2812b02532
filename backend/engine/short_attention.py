"""Attention over many short sequences in one Triton kernel (`FastPath.temporal_sdpa="triton"`).

The motion modules attend over 16 frames, up to 24,576 sequences x 8 heads per call.  Every
SDPA kernel torch has tiles 64-128 query rows and 64-128 key rows of *one* sequence per
thread block, so at 16 tokens most of each tile is padding and the block count is huge: run
5 (H200) measured cuDNN's flash kernel at 1.3-3 TFLOP/s there, ~20x slower than reading
q/k/v and writing the output once (a 64-frame step spent ~400 of its 668 ms in these calls).

Here one program takes `GROUP` whole sequences of one head as a single tile of
`GROUP x block_tokens` rows: one q k^T product over the tile, a mask that keeps each row to
the keys of its own sequence (and to real tokens), a float32 softmax, one product with v.
The products are `GROUP` times larger than needed -- cheap, the tensor cores idle here
anyway -- and the data is read once.  q/k/v are taken with any strides (diffusers hands them
over as (batch, heads, tokens, dim) views of (batch, tokens, heads*dim) projections); the
output is written in (batch, tokens, heads, dim) order, so the processor's
`transpose(1, 2).reshape(...)` afterwards is free.

One difference from SDPA: a NaN or infinity in one sequence's values reaches the other
sequences of its tile (their zero weights times infinity), where SDPA keeps it to its own;
a clip with such values is lost either way.

Triton is imported on first use only: it exists where torch has CUDA (and, for the tests, as
the CPU interpreter with `TRITON_INTERPRET=1`).  Calls it does not cover (longer sequences,
unequal q/kv lengths, head dims over 256, masks, no Triton) go to torch's SDPA unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Any

import torch
import torch.nn.functional as F

# What one tile may hold: longer sequences gain nothing from grouping (SDPA's tiles fit them).
MAX_TOKENS = 64
MAX_HEAD_DIM = 256
# Rows per tile (whole sequences: 4 of 16 tokens), and at most this many rows x padded head
# dim, which bounds the registers of the q/k/v tiles and the float32 output (64 x 64 for head
# dim 40, 64 x 128 for 80, 32 x 256 for 160).  `bench-attention --backend triton:ROWS` times
# other row counts.
ROWS = 64
TILE_ELEMENTS = 8192
# Triton's CPU interpreter (the tests): read when Triton loads, so once here too.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def unsupported_reason(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> str | None:
    """Why `short_attention` hands these (batch, heads, tokens, dim) tensors to SDPA; None
    when its kernel takes them."""
    if not (query.dim() == 4 and query.shape == key.shape == value.shape):
        return "not one (batch, heads, tokens, dim) shape for q, k and v"
    if query.shape[-2] > MAX_TOKENS or query.shape[-1] > MAX_HEAD_DIM:
        return f"over {MAX_TOKENS} tokens or head dim {MAX_HEAD_DIM}"
    # bfloat16 is left out: Triton's CPU interpreter, which checks the kernel here, has none.
    if not (query.dtype == key.dtype == value.dtype and query.dtype in (torch.float16, torch.float32)):
        return f"{query.dtype}: float16 and float32 only"
    if not (query.device == key.device == value.device and (query.is_cuda or INTERPRETED)):
        return f"on {query.device}: CUDA only (or Triton's CPU interpreter)"
    if query.numel() == 0:
        return "empty"
    return None


def supported(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether `short_attention` runs its kernel on these tensors."""
    return unsupported_reason(query, key, value) is None


def tile_shape(tokens: int, head_dim: int, rows: int = ROWS) -> tuple[int, int, int]:
    """(sequences per tile, padded tokens, padded head dim) for a call.  Triton's products
    need every side a power of two and at least 16."""
    block_tokens = max(16, triton_next_power_of_2(tokens))
    block_dim = max(16, triton_next_power_of_2(head_dim))
    group = max(1, rows // block_tokens)
    while group > 1 and group * block_tokens * block_dim > max(TILE_ELEMENTS, rows * 64):
        group //= 2
    return group, block_tokens, block_dim


def triton_next_power_of_2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def short_attention_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations
        q, k, v, out,
        sqb, sqh, sqs, sqd,
        skb, skh, sks, skd,
        svb, svh, svs, svd,
        sob, soh, sos, sod,
        batch, heads, tokens, scale,
        HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_TOKENS: tl.constexpr, BLOCK_DIM: tl.constexpr,
        ALIGN: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        TILE_ROWS: tl.constexpr = GROUP * BLOCK_TOKENS
        # One axis, heads fastest: the heads of a group of sequences run side by side and
        # share the cache lines of their rows (a row holds every head's slice).
        program = tl.program_id(0)
        head = program % heads
        rows = tl.arange(0, TILE_ROWS)
        seq = (program // heads) * GROUP + rows // BLOCK_TOKENS
        tok = rows % BLOCK_TOKENS
        dims = tl.arange(0, BLOCK_DIM)
        row_ok = (seq < batch) & (tok < tokens)
        # HEAD_DIM a constant: the mask is then uniform over ALIGN-wide runs of a row, which
        # lets Triton load 16 bytes at a time (head dim 40 is not a multiple of 16, the only
        # alignment Triton infers for itself).
        mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
        # 64-bit offsets: a call's tensors exceed 2**31 elements at long clips' batch sizes.
        seq64 = seq.to(tl.int64)
        tok64 = tok.to(tl.int64)
        d64 = dims.to(tl.int64)
        # Each row starts ALIGN-aligned (the host checked strides, offsets and pointers).
        q_row = tl.multiple_of(seq64 * sqb + head * sqh + tok64 * sqs, ALIGN)
        k_row = tl.multiple_of(seq64 * skb + head * skh + tok64 * sks, ALIGN)
        v_row = tl.multiple_of(seq64 * svb + head * svh + tok64 * svs, ALIGN)
        o_row = tl.multiple_of(seq64 * sob + head * soh + tok64 * sos, ALIGN)
        qt = tl.load(q + q_row[:, None] + d64[None, :] * sqd, mask=mask, other=0.0)
        kt = tl.load(k + k_row[:, None] + d64[None, :] * skd, mask=mask, other=0.0)
        vt = tl.load(v + v_row[:, None] + d64[None, :] * svd, mask=mask, other=0.0)
        # float32 (TILE_ROWS, TILE_ROWS); float32 inputs multiply in full precision, not TF32.
        if IEEE:
            scores = tl.dot(qt, tl.trans(kt), input_precision="ieee") * scale
        else:
            scores = tl.dot(qt, tl.trans(kt)) * scale
        # Each row sees the real tokens of its own sequence only.
        same = (rows[:, None] // BLOCK_TOKENS) == (rows[None, :] // BLOCK_TOKENS)
        keep = same & (tok < tokens)[None, :]
        scores = tl.where(keep, scores, float("-inf"))
        scores = scores - tl.max(scores, axis=1)[:, None]
        weights = tl.exp(scores)
        weights = weights / tl.sum(weights, axis=1)[:, None]
        if IEEE:
            result = tl.dot(weights, vt, input_precision="ieee")
        else:
            result = tl.dot(weights.to(vt.dtype), vt)
        tl.store(out + o_row[:, None] + d64[None, :] * sod, result.to(out.dtype.element_ty), mask=mask)

    return short_attention_kernel


def alignment(head_dim: int, *tensors: torch.Tensor) -> int:
    """Elements (a power of two, at most 16 bytes' worth) that every row of every tensor
    starts at a multiple of, with the head dim a multiple too: what the kernel may load and
    store at a time.  1 when a tensor's last dim is not contiguous."""
    size = tensors[0].element_size()
    align = 16 // size
    for t in tensors:
        if t.stride(-1) != 1:
            return 1
        for value in (head_dim, *t.stride()[:-1], t.data_ptr() // size):
            while align > 1 and value % align:
                align //= 2
    return align


def _launch(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, rows: int, out: torch.Tensor
) -> None:
    batch, heads, tokens, head_dim = query.shape
    if query.dtype == torch.float32:
        rows = max(16, rows // 2)  # twice the bytes per element: half the tile, no register spills
    group, block_tokens, block_dim = tile_shape(tokens, head_dim, rows)
    grid = (-(-batch // group) * heads,)
    # Triton launches on the current device, not the tensors': `serve --device cuda:1`.
    with torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext():
        _kernel()[grid](
            query, key, value, out,
            *query.stride(), *key.stride(), *value.stride(), *out.stride(),
            batch, heads, tokens, scale,
            HEAD_DIM=head_dim, GROUP=group, BLOCK_TOKENS=block_tokens, BLOCK_DIM=block_dim,
            ALIGN=alignment(head_dim, query, key, value, out), IEEE=query.dtype == torch.float32,
            num_warps=4 if group * block_tokens * block_dim <= 4096 else 8,
        )  # fmt: skip


def _empty_out(query: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, head_dim = query.shape
    # (batch, tokens, heads, dim) in memory: the caller's transpose + reshape is then a view.
    return query.new_empty(batch, tokens, heads, head_dim).transpose(1, 2)


_operator: Any = None


def load() -> Any:
    """Define the kernel and its torch operator (`adb::short_attention`; imports Triton).
    Called before compiling (`attention.with_attention`): torch.compile then sees a ready
    operator, one opaque call inside a compiled region (an extern call in inductor's code).
    An opaque custom op rather than `triton_op`: tracing never runs the kernel on fake
    tensors, which Triton's CPU interpreter (the tests) would try to read."""
    global _operator
    if _operator is None:
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "temporal attention 'triton' needs Triton, which comes with torch's CUDA builds "
                "(pip install triton elsewhere)"
            ) from exc

        @torch.library.custom_op("adb::short_attention", mutates_args=())
        def short_attention_op(
            query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, rows: int
        ) -> torch.Tensor:
            out = _empty_out(query)
            _launch(query, key, value, scale, rows, out)
            return out

        short_attention_op.register_fake(lambda query, key, value, scale, rows: _empty_out(query))
        _operator = short_attention_op
    return _operator


def short_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None, *, rows: int = ROWS
) -> torch.Tensor:
    """softmax(q k^T * scale) v for (batch, heads, tokens, dim) tensors with few tokens
    (`supported`); else torch's SDPA.  `rows`: tile rows to aim for (a power of two, 16-256)."""
    if rows not in (16, 32, 64, 128, 256):
        raise ValueError(f"short_attention: rows must be a power of two from 16 to 256, got {rows}")
    if not supported(query, key, value):
        return F.scaled_dot_product_attention(query, key, value, scale=scale)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    return (_operator or load())(query, key, value, scale, rows)
