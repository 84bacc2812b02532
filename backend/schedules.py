"""AnimateDiff's noise schedules as plain settings, in one place: the presets build their
schedulers from them and the model zoo writes them into its scheduler configs.  No
diffusers import here (the zoo must not need it)."""

from __future__ import annotations

from typing import Any

# SD1.5's training betas, which every preset keeps.
SD15_BETAS: dict[str, Any] = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "linear"}

# AnimateDiff's own inference schedule (configs/inference/inference-v2.yaml), for DDIM.
ANIMATEDIFF_DDIM: dict[str, Any] = {
    **SD15_BETAS,
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "timestep_spacing": "linspace",
}
