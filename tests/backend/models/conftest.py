"""Fixtures for the model zoo, registry and loader tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def models_copy(tiny_zoo: Path, tmp_path: Path):
    """A function copying chosen zoo entries into a fresh, writable models directory."""

    def make(*rel_paths: str) -> Path:
        dest = tmp_path / "models"
        dest.mkdir(exist_ok=True)
        for rel in rel_paths:
            src = tiny_zoo / rel
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dest / rel)
            else:
                shutil.copy2(src, dest / rel)
        return dest

    return make


def _resave_as_pickles(folder: Path, model_cls: type) -> None:
    """A diffusers model folder re-saved with `safe_serialization=False`: `.bin` weights only."""
    model = model_cls.from_pretrained(folder, local_files_only=True)
    for st in folder.glob("*.safetensors"):
        st.unlink()
    model.save_pretrained(folder, safe_serialization=False)


@pytest.fixture
def pickle_folders(tiny_zoo: Path, tmp_path: Path) -> Path:
    """A models directory with the zoo's diffusers base folder and MotionAdapter folder, both
    with pickle weights only (`base/tiny-sd15-bin`, `motion/tiny-motion-adapter-v2-bin`), as
    older hub snapshots are."""
    import torch
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
    from safetensors.torch import load_file

    models = tmp_path / "pickle-models"
    base = models / "base" / "tiny-sd15-bin"
    motion = models / "motion" / "tiny-motion-adapter-v2-bin"
    shutil.copytree(tiny_zoo / "base/tiny-sd15", base)
    shutil.copytree(tiny_zoo / "motion/tiny-motion-adapter-v2", motion)
    _resave_as_pickles(base / "unet", UNet2DConditionModel)
    _resave_as_pickles(base / "vae", AutoencoderKL)
    _resave_as_pickles(motion, MotionAdapter)
    # transformers 5 always writes safetensors: its pickle format is a torch.save'd state dict.
    text = base / "text_encoder"
    torch.save(load_file(str(text / "model.safetensors")), str(text / "pytorch_model.bin"))
    (text / "model.safetensors").unlink()
    assert not list(models.rglob("*.safetensors"))
    assert {p.relative_to(models).as_posix() for p in models.rglob("*.bin")} == {
        "base/tiny-sd15-bin/unet/diffusion_pytorch_model.bin",
        "base/tiny-sd15-bin/vae/diffusion_pytorch_model.bin",
        "base/tiny-sd15-bin/text_encoder/pytorch_model.bin",
        "motion/tiny-motion-adapter-v2-bin/diffusion_pytorch_model.bin",
    }
    return models
