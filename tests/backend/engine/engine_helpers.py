"""Helpers for the AnimateDiff engine tests: requests on the tiny zoo, and stock diffusers
pipelines built independently of the project's loaders (plain `from_pretrained` on the
zoo's diffusers folders) to compare against."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

BASE = "base:tiny-sd15"
BASE_SINGLE = "base:tiny-sd15-ldm.safetensors"
MOTION = "motion:tiny-motion-adapter-v2"
MOTION_CKPT = "motion:mm_sd_v15_v2.ckpt"
MOTION_SAFETENSORS = "motion:mm_sd_v15_v2.safetensors"
MOTION_V3 = "motion:v3_sd15_mm.ckpt"
LORA_ZOOM = "lora:v2_lora_ZoomIn.ckpt"
LORA_ZOOM_DIFFUSERS = "lora:motion-lora-zoom-in"
LORA_PAN = "lora:v2_lora_PanLeft.ckpt"
ADAPTER = "adapter:v3_sd15_adapter.ckpt"
ADAPTER_KOHYA = "adapter:AnimateLCM_sd15_t2v_lora.safetensors"  # kohya, the lcm preset's companion


def get_dummy_components(zoo: Path, motion_folder: str = "tiny-motion-adapter-v2") -> dict[str, Any]:
    """AnimateDiffPipeline components, diffusers-style, straight from the zoo's diffusers
    folders (the UNet stays a UNet2DConditionModel: the pipeline builds the motion UNet)."""
    from diffusers import AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base = zoo / "base" / "tiny-sd15"
    return {
        "unet": UNet2DConditionModel.from_pretrained(base / "unet"),
        "vae": AutoencoderKL.from_pretrained(base / "vae"),
        "text_encoder": CLIPTextModel.from_pretrained(base / "text_encoder"),
        "tokenizer": CLIPTokenizer.from_pretrained(base / "tokenizer"),
        "motion_adapter": MotionAdapter.from_pretrained(zoo / "motion" / motion_folder),
        # As diffusers' AnimateDiff docs set it up (AnimateDiff's inference schedule).
        "scheduler": DDIMScheduler.from_pretrained(
            base / "scheduler",
            beta_schedule="linear",
            clip_sample=False,
            timestep_spacing="linspace",
            steps_offset=1,
        ),
    }


def stock_pipeline(zoo: Path) -> Any:
    from diffusers import AnimateDiffPipeline

    pipe = AnimateDiffPipeline(**get_dummy_components(zoo))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_stock(pipe: Any, **kwargs: Any) -> list[np.ndarray]:
    """Stock call with a seeded CPU generator; frames as the PIL images diffusers returns."""
    seed = kwargs.pop("seed", 0)
    out = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="pil", **kwargs).frames[0]
    return [np.asarray(im) for im in out]


def max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    assert len(a) == len(b), (len(a), len(b))
    assert all(x.shape == y.shape and x.dtype == np.uint8 for x, y in zip(a, b, strict=True))
    return max(int(np.abs(x.astype(np.int16) - y.astype(np.int16)).max()) for x, y in zip(a, b, strict=True))


def request(**kw: Any) -> Any:
    """A tiny request: 64x64, 8 frames, 2 steps, explicit models."""
    from animatediff_blender.protocol.messages import GenerateRequest

    fields: dict[str, Any] = {
        "prompt": "a cat walking on the beach",
        "negative_prompt": "blurry",
        "base_model": BASE,
        "motion_module": MOTION,
        "frames": 8,
        "width": 64,
        "height": 64,
        "steps": 2,
        "seed": 7,
        "preview_every": 0,
    }
    fields.update(kw)
    return GenerateRequest(**fields)


def no_progress(_p: Any) -> None:
    pass


def never() -> bool:
    return False
