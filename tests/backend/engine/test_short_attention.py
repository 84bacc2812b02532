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


@pytest.fixture
def kernel_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel must answer: a call that fell back to SDPA would compare SDPA with itself."""

    class NoSdpa:
        @staticmethod
        def scaled_dot_product_attention(*_args: object, **_kwargs: object) -> None:
            raise AssertionError("fell back to SDPA")

    monkeypatch.setattr(sa, "F", NoSdpa)


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
def test_matches_sdpa_in_float32(batch: int, heads: int, tokens: int, dim: int, kernel_only: None) -> None:
    q, k, v = _qkv(batch, heads, tokens, dim, torch.float32)
    out = sa.short_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _reference(q, k, v), atol=2e-6, rtol=1e-5)


def test_float16_within_half_precision_and_scale_honoured(kernel_only: None) -> None:
    q, k, v = _qkv(9, 4, 16, 40, torch.float16, seed=1)
    out = sa.short_attention(q, k, v)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), _reference(q, k, v), atol=2e-3, rtol=2e-3)
    scaled = sa.short_attention(q, k, v, scale=0.5)
    torch.testing.assert_close(scaled.double(), _reference(q, k, v, scale=0.5), atol=2e-3, rtol=2e-3)
    assert (scaled - out).abs().max() > 1e-2  # the scale changed the result


def test_output_is_laid_out_for_the_processors_reshape(kernel_only: None) -> None:
    """Written in (batch, tokens, heads, dim) order: diffusers' `transpose(1, 2).reshape(...)`
    after the attention is then a view, not a copy."""
    q, k, v = _qkv(6, 4, 16, 40, torch.float32)
    out = sa.short_attention(q, k, v)
    merged = out.transpose(1, 2)
    assert merged.is_contiguous()
    assert merged.reshape(6, 16, 160).data_ptr() == out.data_ptr()


def test_any_input_strides(kernel_only: None) -> None:
    """Contiguous (batch, heads, tokens, dim) and sliced inputs give the same answer."""
    q, k, v = (t.contiguous() for t in _qkv(10, 2, 16, 40, torch.float32, seed=2))
    torch.testing.assert_close(sa.short_attention(q, k, v).double(), _reference(q, k, v), atol=2e-6, rtol=1e-5)
    qs, ks, vs = q[::2], k[::2], v[::2]
    torch.testing.assert_close(sa.short_attention(qs, ks, vs).double(), _reference(qs, ks, vs), atol=2e-6, rtol=1e-5)


def test_sequences_never_see_each_other(kernel_only: None) -> None:
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
        assert sa.unsupported_reason(q, k, v)
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
def test_other_tile_rows_give_the_same_answer(rows: int, kernel_only: None) -> None:
    q, k, v = _qkv(11, 2, 16, 40, torch.float32, seed=5)
    torch.testing.assert_close(sa.short_attention(q, k, v, rows=rows).double(), _reference(q, k, v), atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="rows must be a power of two"):
        sa.short_attention(q, k, v, rows=48)


def test_traced_by_torch_compile_without_graph_breaks(kernel_only: None) -> None:
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


def test_cpu_tensors_without_the_interpreter_go_to_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton runs on CUDA only: a CPU job with the lever set falls back instead of failing."""
    q, k, v = _qkv(2, 2, 16, 8, torch.float32)
    assert sa.supported(q, k, v)  # the interpreter, here
    monkeypatch.setattr(sa, "INTERPRETED", False)
    assert sa.unsupported_reason(q, k, v) == "on cpu: CUDA only (or Triton's CPU interpreter)"


def test_alignment_is_what_every_row_start_allows() -> None:
    """The kernel loads ALIGN elements at a time from each row: diffusers' layout allows
    16 bytes; an odd stride or offset, less; a strided last dim, one."""
    q, k, v = _qkv(4, 8, 16, 40, torch.float16)
    assert sa.alignment(40, q, k, v, sa._empty_out(q)) == 8  # rows of 320 halves, heads 40 apart
    assert sa.alignment(40, q.float(), k.float(), v.float()) == 4
    odd = torch.randn(4 * 16 * 8 * 40 + 1, dtype=torch.float16)[1:].view(4, 16, 8, 40).transpose(1, 2)
    assert sa.alignment(40, q, odd) == 1
    assert sa.alignment(36, q) == 4  # the head dim itself: a run of 8 would cross its end
    assert sa.alignment(40, q.transpose(-1, -2).contiguous().transpose(-1, -2)) == 1


@pytest.mark.slow
def test_compiles_for_hopper_with_wide_loads_and_no_spills() -> None:
    """The interpreter never runs Triton's compiler: compile the real kernel for sm_90 (the
    H100/H200) ahead of time with the ptxas in Triton's wheel, at the motion modules' three
    head dims as `_launch` would call it, and check that it loads and stores 16 bytes at a time
    and keeps its tiles in registers.  In a child process: the interpreter is off there."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent('''
        import os, re, subprocess, sys, tempfile
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, compile
        from animatediff_blender.backend.engine import short_attention as sa
        kernel = sa._kernel()
        names = kernel.arg_names
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        for dim in (40, 80, 160):
            group, block_tokens, block_dim = sa.tile_shape(16, dim)
            const = dict(HEAD_DIM=dim, GROUP=group, BLOCK_TOKENS=block_tokens, BLOCK_DIM=block_dim, ALIGN=8,
                         IEEE=False, sqd=1, skd=1, svd=1, sod=1)
            sig = {n: "constexpr" if n in const else "*fp16" if n in ("q", "k", "v", "out")
                   else "fp32" if n == "scale" else "i32" for n in names}
            aligned = ("q", "k", "v", "out", "sqb", "sqs", "skb", "sks", "svb", "svs", "sob", "sos")
            attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
            warps = 4 if group * block_tokens * block_dim <= 4096 else 8
            compiled = compile(ASTSource(kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": warps})
            ptx = compiled.asm["ptx"]
            narrow = re.findall(r"(?:ld|st)\\.global\\.b16", ptx)
            wide = re.findall(r"(?:ld|st)\\.global(?:\\.\\w+)*\\.v4\\.b32", ptx)
            with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                cubin.write(compiled.asm["cubin"])
                cubin.flush()
                usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name],
                                       capture_output=True, text=True, check=True).stdout
            stack = [int(n) for n in re.findall(r"STACK:(\\d+)", usage)]
            print(dim, len(narrow), len(wide), usage.strip().splitlines()[-1])
            assert not narrow and wide and stack == [0], (dim, len(narrow), len(wide), usage)
    ''')
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    if "No module named" in done.stderr and "triton.compiler" in done.stderr:
        pytest.skip("this Triton has no ahead-of-time compile API")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert len(done.stdout.strip().splitlines()) == 3, done.stdout
