"""Requests that pass the schema (and the server's default limits) but once broke the engine:
each one gets a clear EngineError or the frames the artist asked for, never an "internal"
failure with a traceback, nor a silently wrong clip."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from engine_helpers import max_abs_diff, never, no_progress, request

from animatediff_blender.backend.engine.animatediff import AnimateDiffEngine
from animatediff_blender.backend.engine.interface import EngineError
from animatediff_blender.backend.engine.presets import PRESETS
from animatediff_blender.backend.models import tiny
from animatediff_blender.protocol.messages import GenerateRequest, Limits, MotionLora


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_presets_step_range_is_one_its_scheduler_runs(preset: str) -> None:
    """resolve() refuses steps outside a preset's range; every count inside it, up to the
    schema's (and a server's) largest, must be one the scheduler can set up.  LCM's
    schedule is a subset of its 50 distillation steps: 51-100 passed the server's limits
    and failed inside diffusers (a ValueError: an "internal" error)."""
    p = PRESETS[preset]
    top = p.max_steps if p.max_steps is not None else _schema_max_steps()
    for steps in (p.min_steps, min(top, Limits().max_steps), top):
        p.make_scheduler(tiny.SCHEDULER_CONFIG).set_timesteps(steps)


def _schema_max_steps() -> int:
    from animatediff_blender.backend.server.config import _schema_bound

    bound = _schema_bound(GenerateRequest, "steps", "le")
    assert bound is not None
    return int(bound)


def test_lcm_steps_beyond_its_schedule_are_an_invalid_request(engine: AnimateDiffEngine) -> None:
    assert engine.resolve(request(preset="lcm", steps=50)).steps == 50
    with pytest.raises(EngineError) as info:
        engine.resolve(request(preset="lcm", steps=51))
    assert info.value.code == "invalid_request" and "lcm" in info.value.message and "51" in info.value.message


def test_prompt_travel_on_a_single_frame_uses_its_prompt(engine: AnimateDiffEngine) -> None:
    """A one-frame clip has nothing to travel between: diffusers' FreeNoise interpolation
    then filled no frame (zero text embeddings), so the prompt was silently ignored."""

    def run(**kw: Any) -> list[np.ndarray]:
        return list(engine.generate(request(frames=1, **kw), no_progress, never).frames)

    car = run(prompt="a red car")
    assert max_abs_diff(run(prompt="a cat", prompt_travel={0: "a red car"}), car) == 0
    assert max_abs_diff(run(prompt="a red car", prompt_travel={}), car) == 0
    assert max_abs_diff(run(prompt="a cat"), car) > 0


def _models_with_motion(zoo: Path, dest: Path, motion: dict[str, Any]) -> Path:
    """A models folder with the zoo's diffusers base and the given motion modules
    (file name -> original-layout state dict)."""
    from animatediff_blender.backend.models.zoo import _save_safetensors

    shutil.copytree(zoo / "base/tiny-sd15", dest / "base/tiny-sd15")
    for name, state in motion.items():
        _save_safetensors(state, dest / "motion" / name)
    return dest


def _v2_state(seed: int = 10) -> dict[str, Any]:
    from animatediff_blender.backend.models.zoo import original_motion_module

    return dict(original_motion_module("v2", seed))


def test_non_finite_model_output_is_a_model_error_not_black_frames(zoo: Path, tmp_path: Path) -> None:
    """A checkpoint holding NaNs (a bad merge, a corrupted download that still parses) or an
    overflow in fp16: the clip came back as black frames, reported as finished."""
    state = _v2_state()
    key = next(k for k in state if k.endswith("proj_out.weight"))
    state[key] = torch.full_like(state[key], float("nan"))
    models = _models_with_motion(zoo, tmp_path / "models", {"nan_v2.safetensors": state})
    eng = AnimateDiffEngine(models, device="cpu")
    assert all(m.ok for m in eng.list_models())  # it parses: only running it tells
    delivered: list[int] = []
    with pytest.raises(EngineError) as info:
        eng.generate(
            request(motion_module="motion:nan_v2.safetensors"), no_progress, never,
            on_frames=lambda start, frames: delivered.append(start),
        )  # fmt: skip
    assert info.value.code == "model_error" and "NaN" in info.value.message
    assert "motion:nan_v2.safetensors" in info.value.message
    assert delivered == []  # found before decoding: no frame was handed over


def test_non_finite_decoded_frames_are_a_model_error(
    engine: AnimateDiffEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finite latents, but a VAE that overflows (fp16) or holds NaNs: black frames before."""
    good = engine.generate(request(), no_progress, never).frames
    pipe_cls = type(engine._pipe)
    original = pipe_cls.decode_latents

    def nan_decode(self: Any, latents: torch.Tensor, chunk: int) -> torch.Tensor:
        video = original(self, latents, chunk)
        video[:, :, -1] = float("nan")
        return video

    monkeypatch.setattr(pipe_cls, "decode_latents", nan_decode)
    with pytest.raises(EngineError) as info:
        engine.generate(request(), no_progress, never)
    assert info.value.code == "model_error" and "NaN" in info.value.message
    monkeypatch.setattr(pipe_cls, "decode_latents", original)
    assert max_abs_diff(engine.generate(request(), no_progress, never).frames, good) == 0


def test_presets_default_to_the_motion_module_made_for_them(zoo: Path, tmp_path: Path) -> None:
    """The registry names a default motion module per few-step preset ("motion_lightning",
    "motion_lcm"); a request that leaves motion_module out ("the server's default", the
    add-on's empty field) with the Fast (lightning) preset ran the v2 module for 4 Euler
    steps without CFG instead of AnimateDiff-Lightning, with no word said."""
    state = _v2_state()
    models = _models_with_motion(
        zoo,
        tmp_path / "models",
        {
            "mm_sd_v15_v2.safetensors": state,
            "animatediff_lightning_4step_diffusers.safetensors": _v2_state(11),
            "AnimateLCM_sd15_t2v.safetensors": _v2_state(12),
        },
    )
    eng = AnimateDiffEngine(models, device="cpu")
    defaults = eng.default_models()
    lightning = "motion:animatediff_lightning_4step_diffusers.safetensors"
    lcm = "motion:AnimateLCM_sd15_t2v.safetensors"
    assert (defaults["motion"], defaults["motion_lightning"], defaults["motion_lcm"]) == (
        "motion:mm_sd_v15_v2.safetensors", lightning, lcm,
    )  # fmt: skip
    chosen = {
        p: eng.resolve(request(preset=p, motion_module=None, steps=None)).motion_module for p in PRESETS
    }
    assert chosen == {"quality": defaults["motion"], "lightning": lightning, "lcm": lcm}
    # An explicit choice wins, whatever the preset.
    explicit = eng.resolve(request(preset="lightning", motion_module="motion:mm_sd_v15_v2.safetensors", steps=None))
    assert explicit.motion_module == "motion:mm_sd_v15_v2.safetensors"
    # Without a module made for it, the preset keeps running on the default one.
    plain = AnimateDiffEngine(zoo, device="cpu")
    assert plain.resolve(request(preset="lightning", motion_module=None)).motion_module == (
        plain.default_models()["motion"]
    )


def test_the_lcm_preset_adds_animatelcms_spatial_lora(
    engine: AnimateDiffEngine, zoo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """AnimateLCM's motion module was distilled with a spatial LCM LoRA; run without it, its
    frames come out blurred and washed out.  An `lcm` job naming no domain adapter runs with
    the server's "adapter_lcm" at the model card's 0.8, and its settings say so; a named
    domain adapter wins (scale 0 runs without), other presets never get it.  It is decided
    when the job runs: a job queued while the file went away runs without it (logged), not
    failing on a field its request never had; a server without one runs the preset as before."""
    from engine_helpers import ADAPTER, ADAPTER_KOHYA

    defaults = engine.default_models()
    assert defaults["adapter_lcm"] == ADAPTER_KOHYA and defaults["adapter"] == ADAPTER

    def run(eng: AnimateDiffEngine = engine, **kw: Any) -> tuple[list[np.ndarray], GenerateRequest]:
        result = eng.generate(request(preset="lcm", steps=2, **kw), no_progress, never)
        return list(result.frames), result.settings

    with_lora, ran = run()
    assert (ran.domain_adapter, ran.domain_adapter_scale) == (ADAPTER_KOHYA, 0.8)
    named, ran = run(domain_adapter=ADAPTER_KOHYA, domain_adapter_scale=0.8)
    assert max_abs_diff(with_lora, named) == 0
    off, ran = run(domain_adapter=ADAPTER_KOHYA, domain_adapter_scale=0.0)
    assert max_abs_diff(with_lora, off) > 0 and ran.domain_adapter_scale == 0.0
    own, ran = run(domain_adapter=ADAPTER, domain_adapter_scale=0.5)
    assert (ran.domain_adapter, ran.domain_adapter_scale) == (ADAPTER, 0.5)
    quality = engine.generate(request(preset="quality", steps=2), no_progress, never).settings
    assert quality.domain_adapter is None

    models = tmp_path / "models"
    for rel in ("base/tiny-sd15", "motion/tiny-motion-adapter-v2"):
        shutil.copytree(zoo / rel, models / rel)
    (models / "adapter").mkdir()
    shutil.copy2(zoo / "adapter/AnimateLCM_sd15_t2v_lora.safetensors", models / "adapter")
    eng = AnimateDiffEngine(models, device="cpu")
    queued = eng.resolve(request(preset="lcm", steps=2))  # what the server keeps at submit
    assert queued.domain_adapter is None and eng.default_models()["adapter_lcm"] == ADAPTER_KOHYA
    (models / "adapter/AnimateLCM_sd15_t2v_lora.safetensors").unlink()
    with caplog.at_level("WARNING"):
        frames, ran = run(eng)
    assert ran.domain_adapter is None and "runs without its spatial LoRA" in caplog.text
    assert max_abs_diff(frames, off) == 0  # the same as the LoRA at 0
    assert "adapter_lcm" not in eng.default_models()


def test_a_lora_made_for_a_wider_model_fails_in_one_line(zoo: Path, tmp_path: Path) -> None:
    """A spatial LoRA for real-size SD1.5 (320 channels) on a narrower base: torch lists a
    size mismatch per tensor, which reached the artist cut at 1,000 characters of raw
    "size mismatch" lines; the error now counts them and says what it means."""
    from animatediff_blender.backend.models.zoo import _save_safetensors

    models = tmp_path / "models"
    for rel in ("base/tiny-sd15", "motion/tiny-motion-adapter-v2"):
        shutil.copytree(zoo / rel, models / rel)
    layers = ("down_blocks_0_resnets_0_conv1", "down_blocks_0_resnets_0_conv2")
    lora = {f"lora_unet_{n}.lora_down.weight": torch.zeros(4, 320, 3, 3) for n in layers}
    lora |= {f"lora_unet_{n}.lora_up.weight": torch.zeros(320, 4, 1, 1) for n in layers}
    _save_safetensors(lora, models / "adapter" / "style_sd15_real.safetensors")
    eng = AnimateDiffEngine(models, device="cpu")
    with pytest.raises(EngineError) as info:
        eng.generate(request(domain_adapter="adapter:style_sd15_real.safetensors"), no_progress, never)
    assert info.value.code == "model_error"
    assert "4 of its tensors do not fit the loaded model" in info.value.message
    assert "made for another base model" in info.value.message and len(info.value.message) < 400


def test_a_pending_shape_whose_models_went_away_does_not_stop_compiling(
    zoo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A job with a LoRA ran eagerly (its shape not compiled yet); the LoRA file was then
    removed (or replaced by a broken one) before the device was idle.  Compiling that shape
    fails with the job's own EngineError: that shape is dropped, and compiling goes on.  It
    was taken for a compiler failure, and every later job ran eagerly until a restart
    (about 1.4x slower on a GPU)."""
    from animatediff_blender.backend.engine.animatediff import FastPath

    models = tmp_path / "models"
    shutil.copytree(zoo / "base/tiny-sd15", models / "base/tiny-sd15")
    for rel in ("motion/mm_sd_v15_v2.safetensors", "lora/v2_lora_ZoomIn.ckpt"):
        (models / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(zoo / rel, models / rel)
    motion, lora = "motion:mm_sd_v15_v2.safetensors", "lora:v2_lora_ZoomIn.ckpt"
    fast = AnimateDiffEngine(
        models, "cpu", fast=FastPath(compile="regional", compile_backend="eager", warm_shapes=((4, 64, 64, True),))
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: faster than threads fighting over the cores
    try:
        assert fast.warm_up(None, motion) is True
        fast.generate(request(motion_module=motion, frames=4, motion_loras=[MotionLora(id=lora)]), no_progress, never)
        fast.generate(request(motion_module=motion, frames=6), no_progress, never)
        assert fast.pending_warm_ups == 2
        (models / "lora/v2_lora_ZoomIn.ckpt").unlink()
        with caplog.at_level("INFO"):
            assert fast.warm_pending() is True
        assert fast.compile_error is None and fast.pending_warm_ups == 0
        assert lora in caplog.text and "jobs run at stock speed" not in caplog.text
        assert fast._shape_key(fast.resolve(request(motion_module=motion, frames=6))) in fast._warm_keys
    finally:
        torch.set_num_threads(threads)
