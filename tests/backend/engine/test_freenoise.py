"""BatchedWindowsBlock (the batch-windows lever) against diffusers' FreeNoiseTransformerBlock:
same weights, same input, every window layout (complete, an added last window, a single
window), each weighting scheme, one batch of windows or several."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers.models.attention import FreeNoiseTransformerBlock

from animatediff_blender.backend.bench.memory import LiveBytes
from animatediff_blender.backend.engine.freenoise import BatchedWindowsBlock, window_normaliser, window_starts


def _blocks(length: int, stride: int, weighting: str, attention_bias: bool = False) -> tuple[Any, BatchedWindowsBlock]:
    # An AnimateDiff motion block: two temporal self-attentions, sinusoidal positions.
    kwargs: dict[str, Any] = dict(
        dim=16, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=None,
        activation_fn="geglu", attention_bias=attention_bias, double_self_attention=True,
        positional_embeddings="sinusoidal", num_positional_embeddings=32,
        context_length=length, context_stride=stride, weighting_scheme=weighting,
    )  # fmt: skip
    torch.manual_seed(0)
    stock = FreeNoiseTransformerBlock(**kwargs).eval()
    batched = BatchedWindowsBlock(**kwargs).eval()
    batched.load_state_dict(stock.state_dict(), strict=True)
    return stock, batched


@pytest.mark.parametrize(
    ("frames", "length", "stride", "weighting"),
    [
        (24, 8, 4, "pyramid"),  # windows end exactly at the last frame
        (25, 8, 4, "pyramid"),  # a last window added to cover frame 24
        (26, 8, 4, "pyramid"),  # ... to cover frames 24-25 (diffusers' normaliser quirk shows)
        (27, 8, 4, "delayed_reverse_sawtooth"),
        (23, 8, 3, "delayed_reverse_sawtooth"),
        (10, 8, 4, "flat"),
        (8, 8, 4, "pyramid"),  # one window
        (9, 7, 2, "pyramid"),  # odd window length
    ],
)
def test_batched_windows_match_diffusers(frames: int, length: int, stride: int, weighting: str) -> None:
    stock, batched = _blocks(length, stride, weighting)
    hidden = torch.randn(6, frames, 16)
    with torch.no_grad():
        expected = stock(hidden)
        for budget in (batched.window_batch_elements, 6 * length * 16 * 2, 1):  # all / 2 / 1 per batch
            batched.window_batch_elements = budget
            torch.testing.assert_close(batched(hidden), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("share", [False, True], ids=["per-window", "shared-projections"])
def test_half_precision_accumulates_in_float32(share: bool) -> None:
    stock, batched = _blocks(8, 4, "pyramid", attention_bias=share)
    batched.share_projections = share
    hidden = torch.randn(4, 25, 16)
    with torch.no_grad():
        reference = stock(hidden)
        out = batched.to(torch.bfloat16)(hidden.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)


def test_window_layout_follows_diffusers() -> None:
    assert window_starts(24, 8, 4) == ([0, 4, 8, 12, 16], 8)
    assert window_starts(25, 8, 4) == ([0, 4, 8, 12, 16, 17], 1)
    stock, _ = _blocks(8, 4, "pyramid")
    assert [s for s, _ in stock._get_frame_indices(25)] == [0, 4, 8, 12, 16]
    with pytest.raises(ValueError, match="greater or equal"):
        window_starts(6, 8, 4)
    # The added last window counts only its last frame, with diffusers' normaliser quirk:
    # the weight at the window's first counted position for each counted frame.
    weights = [1.0, 2.0, 3.0, 4.0, 4.0, 3.0, 2.0, 1.0]
    norm = window_normaliser(25, *window_starts(25, 8, 4), weights)
    assert norm[24] == weights[7] and norm[0] == 1.0
    assert norm[20] == weights[4] and norm[16] == weights[4] + weights[0]
    norm = window_normaliser(26, *window_starts(26, 8, 4), weights)
    assert norm[24:] == [weights[6], weights[6]]  # not [weights[6], weights[7]]


def test_masks_fall_back_to_the_window_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    stock, batched = _blocks(8, 4, "pyramid")
    calls: list[int] = []
    loop = FreeNoiseTransformerBlock.forward

    def counting(self: Any, *a: Any, **kw: Any) -> Any:
        calls.append(1)
        return loop(self, *a, **kw)

    monkeypatch.setattr(FreeNoiseTransformerBlock, "forward", counting)
    hidden = torch.randn(2, 12, 16)
    with torch.no_grad():
        batched(hidden)
        assert not calls
        batched(hidden, attention_mask=torch.zeros(2, 1, 8))
        assert calls == [1]


# --- share_projections: attn1's q/k/v and attn2's output projection once per frame -------


# SD1.5's first motion block (width 320) with FreeNoise windows of 16 at stride 4.
SD15_FIRST_MOTION_BLOCK: dict[str, Any] = dict(
    dim=320, num_attention_heads=8, attention_head_dim=40, cross_attention_dim=None,
    activation_fn="geglu", attention_bias=False, double_self_attention=True,
    positional_embeddings="sinusoidal", num_positional_embeddings=32,
    context_length=16, context_stride=4, weighting_scheme="pyramid",
)  # fmt: skip


@pytest.mark.parametrize(
    ("frames", "length", "stride", "weighting", "bias"),
    [
        (24, 8, 4, "pyramid", False),
        (25, 8, 4, "pyramid", True),  # added last window: the bias correction of attn2's output
        (26, 8, 4, "pyramid", True),
        (27, 8, 4, "delayed_reverse_sawtooth", True),
        (23, 8, 3, "delayed_reverse_sawtooth", False),
        (10, 8, 4, "flat", True),
        (8, 8, 4, "pyramid", False),
        (9, 7, 2, "pyramid", True),
    ],
)
def test_shared_projections_match_diffusers(frames: int, length: int, stride: int, weighting: str, bias: bool) -> None:
    stock, batched = _blocks(length, stride, weighting, attention_bias=bias)
    batched.share_projections = True
    assert batched._can_share()
    hidden = torch.randn(6, frames, 16)
    with torch.no_grad():
        expected = stock(hidden)
        for budget in (batched.window_batch_elements, 6 * length * 16 * 2, 1):
            batched.window_batch_elements = budget
            torch.testing.assert_close(batched(hidden), expected, rtol=1e-5, atol=1e-5)


def test_shared_projections_with_a_motion_lora() -> None:
    """MotionLoRAs wrap the projections (peft): still linear, still shared."""
    from peft import LoraConfig, inject_adapter_in_model

    stock, batched = _blocks(8, 4, "pyramid", attention_bias=True)
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    torch.manual_seed(1)
    inject_adapter_in_model(config, stock)
    inject_adapter_in_model(config, batched)
    batched.load_state_dict(stock.state_dict(), strict=True)
    batched.share_projections = True
    assert batched.attn2.to_out[0].bias is not None  # peft's layer shows its base layer's bias
    hidden = torch.randn(4, 26, 16)  # an added last window of 2 frames: the bias correction applies
    with torch.no_grad():
        torch.testing.assert_close(batched(hidden), stock(hidden), rtol=1e-5, atol=1e-5)


def test_other_attentions_take_the_per_window_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers.models.attention_processor import AttnProcessor

    _, batched = _blocks(8, 4, "pyramid")
    batched.share_projections = True
    shared: list[int] = []
    original = BatchedWindowsBlock._windows_shared
    monkeypatch.setattr(
        BatchedWindowsBlock, "_windows_shared", lambda self, *a: (shared.append(1), original(self, *a))[1]
    )
    hidden = torch.randn(2, 12, 16)
    with torch.no_grad():
        batched(hidden)
        assert shared == [1]
        batched.attn2.set_processor(AttnProcessor())  # not the processor the shared path reimplements
        assert not batched._can_share()
        batched(hidden)
        assert shared == [1]


def test_shared_projections_count_fewer_flops_at_motion_module_sizes() -> None:
    """A 64-frame clip, windows of 16 at stride 4, SD1.5's first motion block width (320)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        block = BatchedWindowsBlock(**SD15_FIRST_MOTION_BLOCK)
        hidden = torch.zeros(8, 64, 320)
    counts = []
    for share in (False, True):
        block.share_projections = share
        with FlopCounterMode(display=False) as counter:
            block(hidden)
        counts.append(counter.get_total_flops())
    # Per token, in units of dim^2 multiply-adds: the windows' 2 x (3 + 1) projections 3.25 times
    # plus the feed-forward's 12, against 3.25 x (1 + 3) + 3 + 1 + 12 when shared.
    assert counts[1] / counts[0] == pytest.approx((3.25 * 4 + 16) / (3.25 * 8 + 12), rel=0.03)


def test_shared_projections_hold_little_more_memory() -> None:
    """The first motion block of a 64-frame clip at 512x512 with CFG, at 1/32 of its 8192
    spatial rows (the window budget scaled alike: 3 windows per batch, as at full size)."""
    with torch.device("meta"):
        block = BatchedWindowsBlock(**SD15_FIRST_MOTION_BLOCK).half()
        hidden = torch.zeros(256, 64, 320, dtype=torch.float16)
    block.window_batch_elements = BatchedWindowsBlock.window_batch_elements // 32
    peaks = []
    for share in (False, True):
        block.share_projections = share
        with torch.no_grad(), LiveBytes() as probe:
            block(hidden)
        peaks.append(probe.peak)
    assert peaks[1] <= 1.05 * peaks[0], peaks
