"""BatchedWindowsBlock (the batch-windows lever) against diffusers' FreeNoiseTransformerBlock:
same weights, same input, every window layout (complete, an added last window, a single
window), each weighting scheme, one batch of windows or several."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers.models.attention import FreeNoiseTransformerBlock

from animatediff_blender.backend.engine.freenoise import BatchedWindowsBlock, window_normaliser, window_starts


def _blocks(length: int, stride: int, weighting: str) -> tuple[Any, BatchedWindowsBlock]:
    # An AnimateDiff motion block: two temporal self-attentions, sinusoidal positions.
    kwargs: dict[str, Any] = dict(
        dim=16, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=None,
        activation_fn="geglu", attention_bias=False, double_self_attention=True,
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


def test_half_precision_accumulates_in_float32() -> None:
    stock, batched = _blocks(8, 4, "pyramid")
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
