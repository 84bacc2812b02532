"""Stock diffusers references for the server x engine matrix (test_server_engine_matrix.py).

Everything here is built without the project's loaders or converters, so that a bug there
cannot hide in the reference too:

* base model and v2 motion module: `from_pretrained` of the zoo's diffusers folders
  (`engine_helpers.get_dummy_components`, shared with the engine's parity tests);
* v1 and v3 motion modules (the zoo has them in the original layout only): diffusers' own
  `MotionAdapter.from_single_file`, given a local config since there is no hub here;
* original `v2_lora_*.ckpt` MotionLoRAs: the rename of diffusers'
  `scripts/convert_animatediff_motion_lora_to_diffusers.py` (the motion-module rename,
  `convert_animatediff_checkpoint_to_diffusers`, plus the `unet.` prefix); the
  diffusers-layout ZoomIn folder is read as is;
* the v3 domain adapter: its keys prefixed with `unet.` (diffusers reads the old
  attention-processor LoRA names itself).

Stock LoRA loading is checked too: `load_lora_weights` silently skips keys it does not
understand (the trap in shared/notes/facts.md), which would make a reference without LoRAs.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# engine_helpers lives beside the engine tests; pytest puts that folder on sys.path only
# when it collects them, so make it importable when this module runs on its own too.
_ENGINE_TESTS = str(Path(__file__).resolve().parent / "engine")
if _ENGINE_TESTS not in sys.path:
    sys.path.insert(0, _ENGINE_TESTS)

from engine_helpers import get_dummy_components, max_abs_diff, run_stock  # noqa: E402
from test_stock_parity import FREENOISE_TOLERANCE  # noqa: E402  (one tolerance, stated there)

__all__ = ["FREENOISE_TOLERANCE", "StockReferences", "decode_png", "max_abs_diff", "run_stock"]

# Original-layout motion modules without a diffusers folder in the zoo -> version.
SINGLE_FILE_MOTION = {"v1": "mm_sd_v15.ckpt", "v3": "v3_sd15_mm.safetensors"}


def decode_png(data: bytes) -> np.ndarray:
    """A received frame as HxWx3 uint8; the server must send plain 8-bit RGB PNGs."""
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.mode == "RGB", (image.format, image.mode)
    return np.asarray(image)


class StockReferences:
    """One stock `AnimateDiffPipeline` per motion module version, built on first use."""

    def __init__(self, zoo: Path, scratch: Path) -> None:
        self.zoo = zoo
        self.scratch = scratch
        self._components: dict[str, Any] | None = None
        self._pipes: dict[str, Any] = {}

    def _motion_adapter(self, version: str) -> Any:
        from diffusers import MotionAdapter

        from animatediff_blender.backend.models import tiny

        config_dir = self.scratch / f"motion-config-{version}"
        config_dir.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": "MotionAdapter", **tiny.motion_adapter_config(version)}
        (config_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")
        path = self.zoo / "motion" / SINGLE_FILE_MOTION[version]
        return MotionAdapter.from_single_file(str(path), config=str(config_dir))

    def pipe(self, version: str) -> Any:
        """Stock pipeline with the v1, v2 (diffusers folder) or v3 motion module."""
        from diffusers import AnimateDiffPipeline

        if version not in self._pipes:
            if self._components is None:
                self._components = get_dummy_components(self.zoo)
            components = dict(self._components)
            if version != "v2":
                components["motion_adapter"] = self._motion_adapter(version)
            pipe = AnimateDiffPipeline(**components)
            pipe.set_progress_bar_config(disable=True)
            assert pipe.unet.config.motion_max_seq_length == (24 if version == "v1" else 32)
            self._pipes[version] = pipe
        return self._pipes[version]

    # ------------------------------------------------------------------ LoRA files

    def lora_state_dict(self, model_id: str) -> dict[str, torch.Tensor]:
        """A registry id's LoRA as diffusers' `load_lora_weights` reads it."""
        from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers
        from safetensors.torch import load_file

        kind, name = model_id.split(":", 1)
        if kind == "lora" and name.endswith(".ckpt"):
            raw = torch.load(self.zoo / "lora" / name, map_location="cpu", weights_only=True)
            converted = convert_animatediff_checkpoint_to_diffusers(raw)
            return {"unet." + k: v for k, v in converted.items()}
        if kind == "lora":
            return dict(load_file(self.zoo / "lora" / name / "diffusion_pytorch_model.safetensors"))
        if kind == "adapter":
            raw = torch.load(self.zoo / "adapter" / name, map_location="cpu", weights_only=True)
            return {"unet." + k: v for k, v in raw.items()}
        raise ValueError(f"not a LoRA id: {model_id}")

    @contextmanager
    def loras(self, pipe: Any, loras: list[tuple[str, float]]) -> Iterator[None]:
        """Stock `load_lora_weights` + `set_adapters` for (registry id, weight) pairs, checked
        to have adapted one layer per (down, up) pair of each file; unloaded afterwards."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        if not loras:
            yield
            return
        names = []
        try:
            for i, (model_id, _weight) in enumerate(loras):
                name = f"ref{i}"
                state = self.lora_state_dict(model_id)
                pipe.load_lora_weights(dict(state), adapter_name=name)
                names.append(name)
                adapted = sum(
                    1
                    for m in pipe.unet.modules()
                    if isinstance(m, BaseTunerLayer) and name in getattr(m, "lora_A", {})
                )
                matrices = sum(1 for v in state.values() if v.ndim == 2)
                assert adapted > 0 and 2 * adapted == matrices, (model_id, adapted, matrices)
            pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
            yield
        finally:
            if names:
                pipe.unload_lora_weights()

    @contextmanager
    def free_noise(self, pipe: Any, context: tuple[int, int] | None) -> Iterator[None]:
        """diffusers' FreeNoise as the engine configures it (pyramid weights, shuffled context)."""
        if context is None:
            yield
            return
        pipe.enable_free_noise(
            context_length=context[0],
            context_stride=context[1],
            weighting_scheme="pyramid",
            noise_type="shuffle_context",
        )
        try:
            yield
        finally:
            # Not pipe.disable_free_noise(): in 0.42.1 it walks the mid block even when that
            # has no motion modules (v1, v3) and raises; undo exactly the blocks enable did.
            pipe._free_noise_context_length = None
            unet = pipe.unet
            for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
                if getattr(block, "motion_modules", None) is not None:
                    pipe._disable_free_noise_in_block(block)

    @contextmanager
    def scheduler(self, pipe: Any, preset: str) -> Iterator[None]:
        """The quality preset is the pipeline's own DDIM set-up; lightning as its model card
        (and diffusers' docs) set it up: Euler, trailing spacing, linear betas."""
        from diffusers import EulerDiscreteScheduler

        if preset == "quality":
            yield
            return
        assert preset == "lightning", preset
        ddim = pipe.scheduler
        pipe.scheduler = EulerDiscreteScheduler.from_config(
            ddim.config, timestep_spacing="trailing", beta_schedule="linear"
        )
        try:
            yield
        finally:
            pipe.scheduler = ddim
