"""The project's short-sequence attention kernel (`engine/short_attention.py`), run by
Triton's CPU interpreter: the same kernel source the GPU compiles, checked against torch's
SDPA in float32 maths.  Its speed is the GPU benchmark's business (`temporal-sdpa:triton`)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from animatediff_blender.backend.engine import short_attention as sa

pytest.importorskip("triton")
# CPU tensors: Triton's interpreter, which tests/conftest.py selects before Triton loads.
assert os.environ.get("TRITON_INTERPRET") == "1"


def _qkv(batch: int, heads: int, tokens: int, dim: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q/k/v as diffusers' processors hand them over: (batch, heads, tokens, dim) views of
    one (batch, tokens, heads * dim) projection each."""
    gen = torch.Generator().manual_seed(seed)
    projections = torch.randn(batch, tokens, 3 * heads * dim, generator=gen).to(dtype)
    return tuple(p.view(batch, tokens, heads, dim).transpose(1, 2) for p in projections.chunk(3, dim=-1))


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)


@pytest.mark.parametrize(
    ("batch", "heads", "tokens", "dim"),
    [
        (19, 8, 16, 40),  # the motion modules' shapes (head dims 40/80/160), 19: a partial last tile
        (5, 2, 16, 80),
        (3, 2, 16, 160),
        (7, 3, 12, 24),  # tokens and dim not powers of two: padded and masked
        (4, 1, 1, 8),  # one token: every weight is 1
        (2, 2, 33, 16),  # over 32 tokens: one sequence per 64-row tile
    ],
)
def test_matches_sdpa_in_float32(batch: int, heads: int, tokens: int, dim: int) -> None:
    q, k, v = _qkv(batch, heads, tokens, dim, torch.float32)
    out = sa.short_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _reference(q, k, v), atol=2e-6, rtol=1e-5)


def test_float16_within_half_precision_and_scale_honoured() -> None:
    q, k, v = _qkv(9, 4, 16, 40, torch.float16, seed=1)
    out = sa.short_attention(q, k, v)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), _reference(q, k, v), atol=2e-3, rtol=2e-3)
    scaled = sa.short_attention(q, k, v, scale=0.5)
    torch.testing.assert_close(scaled.double(), _reference(q, k, v, scale=0.5), atol=2e-3, rtol=2e-3)
    assert (scaled - out).abs().max() > 1e-2  # the scale changed the result


def test_output_is_laid_out_for_the_processors_reshape() -> None:
    """Written in (batch, tokens, heads, dim) order: diffusers' `transpose(1, 2).reshape(...)`
    after the attention is then a view, not a copy."""
    q, k, v = _qkv(6, 4, 16, 40, torch.float32)
    out = sa.short_attention(q, k, v)
    merged = out.transpose(1, 2)
    assert merged.is_contiguous()
    assert merged.reshape(6, 16, 160).data_ptr() == out.data_ptr()


def test_any_input_strides() -> None:
    """Contiguous (batch, heads, tokens, dim) and sliced inputs give the same answer."""
    q, k, v = (t.contiguous() for t in _qkv(10, 2, 16, 40, torch.float32, seed=2))
    torch.testing.assert_close(sa.short_attention(q, k, v).double(), _reference(q, k, v), atol=2e-6, rtol=1e-5)
    qs, ks, vs = q[::2], k[::2], v[::2]
    torch.testing.assert_close(sa.short_attention(qs, ks, vs).double(), _reference(qs, ks, vs), atol=2e-6, rtol=1e-5)


def test_sequences_never_see_each_other() -> None:
    """Several sequences share a tile: changing one sequence's keys and values must leave every
    other sequence's output bit-identical."""
    q, k, v = (t.clone() for t in _qkv(8, 2, 16, 40, torch.float32, seed=3))
    before = sa.short_attention(q, k, v)
    k[3] += 5.0
    v[3] *= -2.0
    after = sa.short_attention(q, k, v)
    others = [i for i in range(8) if i != 3]
    assert torch.equal(before[others], after[others])
    assert not torch.allclose(before[3], after[3])


def test_calls_it_does_not_cover_go_to_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_kernel() -> None:
        raise AssertionError("the kernel must not run for this call")

    monkeypatch.setattr(sa, "_operator", no_kernel)
    monkeypatch.setattr(sa, "load", no_kernel)
    for q, k, v in (
        _qkv(2, 2, sa.MAX_TOKENS + 1, 8, torch.float32),  # long sequences: SDPA's own tiles fit
        _qkv(2, 2, 16, 8, torch.float32)[:2] + (_qkv(2, 2, 8, 8, torch.float32)[2],),  # unequal lengths
        _qkv(2, 1, 4, sa.MAX_HEAD_DIM + 8, torch.float32),
        _qkv(2, 2, 16, 8, torch.bfloat16),  # not checked: the CPU interpreter has no bfloat16
    ):
        assert not sa.supported(q, k, v)
        if q.shape[-2] == k.shape[-2]:
            torch.testing.assert_close(sa.short_attention(q, k, v).double(), _reference(q, k, v), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("rows", [16, 32, 64, 128, 256])
def test_tiles_stay_within_the_register_budget(rows: int) -> None:
    for tokens, dim in ((16, 40), (16, 80), (16, 160), (16, 256), (1, 8), (64, 256), (5, 3)):
        group, block_tokens, block_dim = sa.tile_shape(tokens, dim, rows)
        assert block_tokens >= max(16, tokens) and block_dim >= max(16, dim)
        tile_rows = group * block_tokens
        assert tile_rows & (tile_rows - 1) == 0 and 16 <= tile_rows <= max(rows, block_tokens)
        assert group == 1 or tile_rows * block_dim <= max(sa.TILE_ELEMENTS, rows * 64)
    assert [sa.tile_shape(16, d)[0] for d in (40, 80, 160)] == [4, 4, 2]  # the default: 64 x 64, 64 x 128, 32 x 256


@pytest.mark.parametrize("rows", [16, 128])
def test_other_tile_rows_give_the_same_answer(rows: int) -> None:
    q, k, v = _qkv(11, 2, 16, 40, torch.float32, seed=5)
    torch.testing.assert_close(sa.short_attention(q, k, v, rows=rows).double(), _reference(q, k, v), atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="rows must be a power of two"):
        sa.short_attention(q, k, v, rows=48)


def test_traced_by_torch_compile_without_graph_breaks() -> None:
    """Inside a compiled region the kernel is one operator call (inductor launches it on the
    GPU); the CPU check uses the aot_eager backend."""
    import torch._dynamo.utils

    sa.load()  # as `attention.with_attention` does before compiling
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    q, k, v = _qkv(6, 2, 16, 40, torch.float32, seed=4)

    def block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sa.short_attention(q * 1.0, k, v).transpose(1, 2).reshape(6, 16, 80) + 1.0

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), block(q, k, v))
    assert not torch._dynamo.utils.counters["graph_break"]
