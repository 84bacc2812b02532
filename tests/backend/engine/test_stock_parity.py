"""The engine produces what stock diffusers 0.42.1 `AnimateDiffPipeline` produces.

Stock pipelines here are built with plain `from_pretrained` from the zoo's diffusers
folders and called the documented way; the engine goes through the registry and the
project's loaders.  Tolerance: bit-identical uint8 frames (max abs diff 0) on the CPU in
fp32 -- same weights, same ops, same CPU generator.  FreeNoise runs (long clips, prompt
travel) allow at most 1 level of 255: the engine bounds memory with split inference and
chunked feed-forwards, which batch the same per-frame maths differently (float
summation order), while the stock reference runs unsplit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from engine_helpers import (
    ADAPTER,
    ADAPTER_KOHYA,
    BASE_SINGLE,
    LORA_PAN,
    LORA_ZOOM,
    LORA_ZOOM_DIFFUSERS,
    MOTION_CKPT,
    MOTION_SAFETENSORS,
    max_abs_diff,
    run_stock,
)

from animatediff_blender.protocol.messages import MotionLora

FREENOISE_TOLERANCE = 1  # uint8 levels; see the module docstring


def _stock_kwargs(**kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "prompt": "a cat walking on the beach",
        "negative_prompt": "blurry",
        "num_frames": 8,
        "height": 64,
        "width": 64,
        "num_inference_steps": 2,
        "guidance_scale": 7.5,
        "seed": 7,
    }
    args.update(kw)
    return args


def test_plain_job_is_bit_identical_to_stock(generate: Any, stock: Any) -> None:
    ours = generate()
    ref = run_stock(stock, **_stock_kwargs())
    assert len(ours) == 8 and ours[0].shape == (64, 64, 3)
    assert max_abs_diff(ours, ref) == 0
    # And the frames are not trivially constant (the comparison means something).
    assert np.ptp(np.stack(ours)) > 20


def test_a_size_that_is_no_multiple_of_64_is_bit_identical_to_stock(generate: Any, stock: Any) -> None:
    """The panel's default size keeps the render's aspect (1920x1080 -> 680x384): latents
    whose sides the UNet's down-sampling does not halve evenly (9x5 here) must run as stock."""
    ours = generate(width=72, height=40)
    assert len(ours) == 8 and ours[0].shape == (40, 72, 3)
    assert max_abs_diff(ours, run_stock(stock, **_stock_kwargs(width=72, height=40))) == 0


def test_other_seed_other_frames(generate: Any) -> None:
    # (Same seed -> same frames: the leak and cancel tests repeat jobs bit for bit.)
    assert max_abs_diff(generate(seed=3), generate(seed=4)) > 0


def test_motion_loras_match_stock_peft(generate: Any, stock: Any, zoo: Path) -> None:
    """Two MotionLoRAs, one with a negative weight.  Stock: diffusers' own
    `load_lora_weights` on the hub-layout ZoomIn file (which diffusers reads as is) and on
    PanLeft converted to peft keys, then `set_adapters`."""
    from safetensors.torch import load_file

    from animatediff_blender.backend.models.loading import load_motion_lora

    ours = generate(motion_loras=[MotionLora(id=LORA_ZOOM, weight=0.8), MotionLora(id=LORA_PAN, weight=-0.6)])
    zoom = load_file(zoo / "lora" / "motion-lora-zoom-in" / "diffusion_pytorch_model.safetensors")
    pan = load_motion_lora(zoo / "lora" / "v2_lora_PanLeft.ckpt").state_dict
    stock.load_lora_weights(dict(zoom), adapter_name="zoom")
    stock.load_lora_weights(dict(pan), adapter_name="pan")
    stock.set_adapters(["zoom", "pan"], adapter_weights=[0.8, -0.6])
    try:
        ref = run_stock(stock, **_stock_kwargs())
    finally:
        stock.unload_lora_weights()
    assert max_abs_diff(ours, ref) == 0
    assert max_abs_diff(ours, generate()) > 0


def test_domain_adapter_matches_stock(generate: Any, stock: Any, zoo: Path) -> None:
    """The v3 domain adapter file keeps AnimateDiff's names relative to the UNet
    (`...attn1.processor.to_q_lora.down.weight`); prefixed with `unet.` diffusers reads it."""
    raw = torch.load(zoo / "adapter" / "v3_sd15_adapter.ckpt", weights_only=True)
    ours = generate(domain_adapter=ADAPTER, domain_adapter_scale=0.7)
    stock.load_lora_weights({"unet." + k: v for k, v in raw.items()}, adapter_name="domain")
    stock.set_adapters(["domain"], adapter_weights=[0.7])
    try:
        ref = run_stock(stock, **_stock_kwargs())
    finally:
        stock.unload_lora_weights()
    assert max_abs_diff(ours, ref) == 0
    assert max_abs_diff(ours, generate()) > 0


def test_kohya_spatial_lora_matches_stock(generate: Any, stock: Any, zoo: Path) -> None:
    """A kohya LoRA on every linear and conv layer, with its own rank and alpha on the conv
    layers (the zoo's AnimateLCM-named file), against diffusers' own kohya conversion in
    `load_lora_weights`, the way AnimateLCM's model card loads its LoRA.  The engine scales
    each layer's up matrix by alpha / rank where peft scales the layer's output: float
    rounding, so 1 level of 255 is allowed."""
    from safetensors.torch import load_file

    from animatediff_blender.backend.models.zoo import KOHYA_ADAPTER

    ours = generate(domain_adapter=ADAPTER_KOHYA, domain_adapter_scale=0.8)
    stock.load_lora_weights(load_file(zoo / KOHYA_ADAPTER), adapter_name="lcm-lora")
    stock.set_adapters(["lcm-lora"], adapter_weights=[0.8])
    try:
        ref = run_stock(stock, **_stock_kwargs())
    finally:
        stock.unload_lora_weights()
    assert max_abs_diff(ours, ref) <= 1
    assert max_abs_diff(ours, generate()) > 10  # it does change the frames


def test_long_clip_matches_stock_free_noise(
    generate: Any, stock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """24 frames in windows of 8, stride 4 (the tiny v2 module handles 32 at most)."""
    from diffusers.models.attention import FreeNoiseTransformerBlock

    windows: list[int] = []
    forward = FreeNoiseTransformerBlock.forward

    def counting(self: Any, hidden_states: torch.Tensor, *a: Any, **kw: Any) -> Any:
        windows.append(len(self._get_frame_indices(hidden_states.shape[1])))
        return forward(self, hidden_states, *a, **kw)

    monkeypatch.setattr(FreeNoiseTransformerBlock, "forward", counting)
    ours = generate(frames=24, context_length=8, context_stride=4)
    # Every motion-module call ran FreeNoise's windows: (24 - 8) / 4 + 1 = 5 of them.
    assert windows and set(windows) == {5}
    monkeypatch.undo()
    stock.enable_free_noise(
        context_length=8, context_stride=4, weighting_scheme="pyramid", noise_type="shuffle_context"
    )
    try:
        ref = run_stock(stock, **_stock_kwargs(num_frames=24))
    finally:
        stock.disable_free_noise()
    assert len(ours) == 24
    assert max_abs_diff(ours, ref) <= FREENOISE_TOLERANCE


def test_prompt_travel_matches_stock_free_noise(generate: Any, stock: Any) -> None:
    travel = {6: "a dog running in the snow"}
    ours = generate(frames=12, context_length=8, context_stride=4, prompt_travel=travel)
    stock.enable_free_noise(
        context_length=8, context_stride=4, weighting_scheme="pyramid", noise_type="shuffle_context"
    )
    try:
        ref = run_stock(
            stock, **_stock_kwargs(num_frames=12, prompt={0: "a cat walking on the beach", **travel})
        )
        no_travel = run_stock(stock, **_stock_kwargs(num_frames=12))
    finally:
        stock.disable_free_noise()
    assert max_abs_diff(ours, ref) <= FREENOISE_TOLERANCE
    assert max_abs_diff(ours, no_travel) > FREENOISE_TOLERANCE


def test_original_and_diffusers_layouts_give_identical_frames(generate: Any) -> None:
    folder = generate()
    assert max_abs_diff(generate(motion_module=MOTION_CKPT), folder) == 0
    assert max_abs_diff(generate(motion_module=MOTION_SAFETENSORS), folder) == 0
    assert max_abs_diff(generate(base_model=BASE_SINGLE), folder) == 0
    lora_orig = generate(motion_loras=[MotionLora(id=LORA_ZOOM, weight=1.0)])
    lora_diffusers = generate(motion_loras=[MotionLora(id=LORA_ZOOM_DIFFUSERS, weight=1.0)])
    assert max_abs_diff(lora_orig, lora_diffusers) == 0


def test_long_clip_with_motion_lora_without_cfg_matches_stock(generate: Any, stock: Any, zoo: Path) -> None:
    """FreeNoise + a MotionLoRA + the lightning preset (Euler trailing, CFG 1: no negative
    batch).  Stock order: FreeNoise first (it rebuilds the motion blocks), then the LoRA."""
    from diffusers import EulerDiscreteScheduler
    from safetensors.torch import load_file

    ours = generate(
        frames=12,
        context_length=8,
        context_stride=4,
        preset="lightning",
        guidance=None,
        motion_loras=[MotionLora(id=LORA_ZOOM, weight=0.9)],
    )
    zoom = load_file(zoo / "lora" / "motion-lora-zoom-in" / "diffusion_pytorch_model.safetensors")
    ddim = stock.scheduler
    stock.scheduler = EulerDiscreteScheduler.from_config(
        ddim.config, timestep_spacing="trailing", beta_schedule="linear"
    )
    stock.enable_free_noise(
        context_length=8, context_stride=4, weighting_scheme="pyramid", noise_type="shuffle_context"
    )
    stock.load_lora_weights(dict(zoom), adapter_name="zoom")
    stock.set_adapters(["zoom"], adapter_weights=[0.9])
    try:
        ref = run_stock(stock, **_stock_kwargs(num_frames=12, guidance_scale=1.0))
    finally:
        stock.unload_lora_weights()
        stock.disable_free_noise()
        stock.scheduler = ddim
    assert max_abs_diff(ours, ref) <= FREENOISE_TOLERANCE
