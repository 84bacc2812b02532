"""Generation presets: a scheduler and the defaults that suit it.

A preset only fills what the request leaves as `None`; explicit request fields win.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from animatediff_blender.backend.schedules import ANIMATEDIFF_DDIM, SD15_BETAS

DEFAULT_CONTEXT_LENGTH = 16
DEFAULT_CONTEXT_STRIDE = 4
LCM_ORIGINAL_STEPS = 50  # LCMScheduler's default, pinned: a base model's config may not override it


@dataclass(frozen=True)
class Preset:
    name: str
    scheduler_class: type[SchedulerMixin]
    scheduler_kwargs: dict[str, Any]
    steps: int
    guidance: float
    min_steps: int = 1
    max_steps: int | None = None  # None: only the server's Limits apply
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # A spatial LoRA distilled with the preset's motion module (the registry's default
    # "adapter_<name>"), added at this scale when a request names no domain adapter.
    companion_adapter_scale: float | None = None

    def make_scheduler(self, base_config: dict[str, Any] | None = None) -> SchedulerMixin:
        """The preset's scheduler, on top of the base model's scheduler config (num_train_timesteps
        and friends), with the preset's settings winning."""
        config = {k: v for k, v in (base_config or {}).items() if not k.startswith("_")}
        config.update(self.scheduler_kwargs)
        scheduler: SchedulerMixin = self.scheduler_class.from_config(config)
        return scheduler


PRESETS: dict[str, Preset] = {
    # AnimateDiff's own inference schedule (configs/inference/inference-v2.yaml).
    "quality": Preset(
        name="quality",
        scheduler_class=DDIMScheduler,
        scheduler_kwargs=dict(ANIMATEDIFF_DDIM),
        steps=25,
        guidance=7.5,
    ),
    # AnimateDiff-Lightning's model card: Euler, trailing spacing, linear betas, no CFG.
    "lightning": Preset(
        name="lightning",
        scheduler_class=EulerDiscreteScheduler,
        scheduler_kwargs={**SD15_BETAS, "timestep_spacing": "trailing"},
        steps=4,
        guidance=1.0,
        min_steps=1,
        max_steps=8,
    ),
    # AnimateLCM: LCM scheduler with linear betas, ~4-8 steps, low CFG.  Its schedule is a
    # subset of the distillation's `original_inference_steps` (50): more steps than that
    # make diffusers' set_timesteps raise.  Its motion module was distilled together with a
    # spatial LCM LoRA (AnimateLCM_sd15_t2v_lora.safetensors), which its model card applies
    # at 0.8.
    "lcm": Preset(
        name="lcm",
        scheduler_class=LCMScheduler,
        scheduler_kwargs={**SD15_BETAS, "original_inference_steps": LCM_ORIGINAL_STEPS},
        steps=6,
        guidance=1.5,
        max_steps=LCM_ORIGINAL_STEPS,
        companion_adapter_scale=0.8,
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
