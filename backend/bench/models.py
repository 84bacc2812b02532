"""Random-weight model sets for the benchmark, written as a normal models directory.

Timing does not depend on weight values, so real SD1.5 + AnimateDiff v2 sizes with
random weights give real GPU timings.  The set is written in the diffusers folder
layout so that the engine loads it through its ordinary loading path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from animatediff_blender.backend.models import tiny

Size = Literal["real", "tiny"]

BASE_NAME = "bench-sd15"
MOTION_NAME = "bench-motion-adapter-v2"

# Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5) component configurations.
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}


def unet_configs(size: Size) -> tuple[dict[str, Any], dict[str, Any]]:
    """The UNet's and the motion adapter's config at `size`."""
    if size == "real":
        return SD15_UNET, {}  # MotionAdapter() defaults are the mm_sd_v15_v2 layout
    return tiny.UNET_CONFIG, tiny.motion_adapter_config("v2")


def meta_motion_unet(size: Size, windows: tuple[int, int] | None = None) -> Any:
    """The motion UNet's structure on the meta device (no weights: seconds, no memory), for
    counting what a step does (`bench-attention`, `scripts/memory_probe.py`).  `windows`:
    (length, stride) of FreeNoise windows, batched as the engine's fast path batches them."""
    import torch
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
    from diffusers.utils import logging as diffusers_logging

    from animatediff_blender.backend.engine.freenoise import BatchedWindowsBlock, windowed_like

    unet_cfg, motion_cfg = unet_configs(size)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # from_unet2d's note about float32 modules (there are none)
    try:
        with torch.device("meta"):
            unet = UNetMotionModel.from_unet2d(UNet2DConditionModel(**unet_cfg), MotionAdapter(**motion_cfg))
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if windows is not None:
        for module in (m for m in unet.modules() if isinstance(m, AnimateDiffTransformer3D)):
            for i, plain in enumerate(module.transformer_blocks):
                module.transformer_blocks[i] = windowed_like(plain, BatchedWindowsBlock, *windows, "pyramid")
    return unet


def build_bench_models(dest: Path, size: Size, seed: int = 0, init_device: str = "cpu") -> Path:
    """Write `base/bench-sd15/` and `motion/bench-motion-adapter-v2/` under `dest` (once per
    size).  `init_device="cuda"` draws the real-size random weights on the GPU (seconds
    instead of a minute of CPU initialisation; the values differ, the timings do not)."""
    import torch
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from animatediff_blender.backend.models.zoo import write_tokenizer

    marker = dest / f".bench-{size}"
    if marker.exists():
        return dest
    torch.manual_seed(seed)
    base = dest / "base" / BASE_NAME
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(base / "tokenizer")
    if size == "real":
        unet_cfg, vae_cfg, text_cfg = SD15_UNET, SD15_VAE, dict(SD15_TEXT)
        motion_cfg: dict[str, Any] = {}  # MotionAdapter() defaults are the mm_sd_v15_v2 layout
    else:
        unet_cfg, vae_cfg = tiny.UNET_CONFIG, tiny.VAE_CONFIG
        text_cfg = dict(tiny.TEXT_ENCODER_CONFIG, vocab_size=vocab)
        motion_cfg = tiny.motion_adapter_config("v2")
    # Real sizes are stored in fp16 (half the disk and load time; the GPU runs fp16/bf16),
    # tiny ones in fp32 so that the CPU run can be bit-identical to stock.
    store = torch.float16 if size == "real" else torch.float32
    with torch.device(init_device):
        UNet2DConditionModel(**unet_cfg).to(store).save_pretrained(base / "unet")
        AutoencoderKL(**vae_cfg).to(store).save_pretrained(base / "vae")
        CLIPTextModel(CLIPTextConfig(**text_cfg)).to(store).save_pretrained(base / "text_encoder")
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps(tiny.SCHEDULER_CONFIG, indent=2))
    (base / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.42.1",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDIMScheduler"],
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
            },
            indent=2,
        )
    )
    with torch.device(init_device):
        MotionAdapter(**motion_cfg).to(store).save_pretrained(dest / "motion" / MOTION_NAME)
    marker.write_text("ok")
    return dest
