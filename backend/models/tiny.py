"""Configurations of the tiny, structurally faithful SD1.5 + AnimateDiff model set.

Tiny means narrow, not different: the same block types in the same places as
SD1.5 (3 cross-attention down blocks + 1 plain down block, mid block with
attention, mirrored up blocks, 2 layers per block, 8x VAE) and the motion
modules where AnimateDiff puts them.  Only widths shrink, which keeps every
loading and key-conversion path of the real models exercised.
"""

from __future__ import annotations

from typing import Any

from animatediff_blender.backend.schedules import ANIMATEDIFF_DDIM

BLOCK_OUT_CHANNELS = (32, 32, 64, 64)
CROSS_ATTENTION_DIM = 32
NORM_NUM_GROUPS = 32  # as SD1.5; widths are multiples of it
LATENT_CHANNELS = 4
DEFAULT_SIZE = 64  # pixels; the tests' default width and height

UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": list(BLOCK_OUT_CHANNELS),
    "layers_per_block": 2,
    "cross_attention_dim": CROSS_ATTENTION_DIM,
    "attention_head_dim": 8,
    "norm_num_groups": NORM_NUM_GROUPS,
}

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": list(BLOCK_OUT_CHANNELS),
    "layers_per_block": 2,
    "latent_channels": LATENT_CHANNELS,
    "norm_num_groups": NORM_NUM_GROUPS,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": CROSS_ATTENTION_DIM,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": CROSS_ATTENTION_DIM,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    # vocab_size is set from the generated tokenizer
}

# AnimateDiff's own inference schedule (configs/inference/inference-v2.yaml).
SCHEDULER_CONFIG: dict[str, Any] = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, **ANIMATEDIFF_DDIM}


def motion_adapter_config(version: str) -> dict[str, Any]:
    """MotionAdapter kwargs matching the tiny UNet for an AnimateDiff version.

    v1 (mm_sd_v14/v15): max length 24, no mid block.  v2: 32, mid block.  v3: 32, no mid block.
    """
    if version not in ("v1", "v2", "v3"):
        raise ValueError(f"unknown motion module version {version!r}")
    return {
        "block_out_channels": list(BLOCK_OUT_CHANNELS),
        "motion_layers_per_block": 2,
        "motion_mid_block_layers_per_block": 1,
        "motion_num_attention_heads": 8,
        "motion_norm_num_groups": NORM_NUM_GROUPS,
        "motion_max_seq_length": 24 if version == "v1" else 32,
        "use_motion_mid_block": version == "v2",
        "conv_in_channels": None,
    }
