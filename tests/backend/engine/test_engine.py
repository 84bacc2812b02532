"""Engine behaviour beyond stock parity: presets, resolve, LoRA bookkeeping, progress,
cancellation, the warm cache and OOM reporting."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from copy import deepcopy
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from engine_helpers import (
    ADAPTER,
    BASE,
    LORA_PAN,
    LORA_ZOOM,
    MOTION,
    MOTION_CKPT,
    MOTION_V3,
    max_abs_diff,
    never,
    no_progress,
    request,
)

from animatediff_blender.backend.engine.animatediff import AnimateDiffEngine, latents_to_preview
from animatediff_blender.backend.engine.interface import EngineError, JobCancelled, StepProgress
from animatediff_blender.backend.engine.presets import PRESETS
from animatediff_blender.protocol.messages import MotionLora

# --------------------------------------------------------------------------- resolve / presets


def test_resolve_fills_preset_defaults_and_explicit_fields_win(engine: AnimateDiffEngine) -> None:
    r = engine.resolve(request(steps=None, guidance=None, base_model=None, motion_module=None))
    assert (r.steps, r.guidance, r.context_length, r.context_stride) == (25, 7.5, 16, 4)
    defaults = engine.default_models()
    assert r.base_model == defaults["base"] and r.motion_module == defaults["motion"]
    lightning = engine.resolve(request(preset="lightning", steps=None, guidance=None))
    assert (lightning.steps, lightning.guidance) == (4, 1.0)
    lcm = engine.resolve(request(preset="lcm", steps=None, guidance=None))
    assert (lcm.steps, lcm.guidance) == (6, 1.5)
    explicit = engine.resolve(
        request(preset="lightning", steps=2, guidance=1.2, context_length=12, context_stride=3)
    )
    assert (explicit.steps, explicit.guidance, explicit.context_length, explicit.context_stride) == (
        2,
        1.2,
        12,
        3,
    )


@pytest.mark.parametrize(
    ("fields", "code", "words", "field"),
    [
        ({"base_model": "base:nope"}, "unknown_model", ["base:nope", "base"], "base_model"),
        ({"motion_module": "motion:nope.ckpt"}, "unknown_model", ["motion:nope.ckpt", "motion"], "motion_module"),
        ({"motion_module": LORA_ZOOM}, "unknown_model", [LORA_ZOOM, "lora", "motion"], "motion_module"),
        ({"base_model": MOTION}, "unknown_model", [MOTION, "base"], "base_model"),
        ({"motion_loras": [MotionLora(id=LORA_ZOOM), MotionLora(id=ADAPTER)]}, "unknown_model",
         [ADAPTER, "adapter", "lora"], "motion_loras[1].id"),
        ({"domain_adapter": LORA_PAN}, "unknown_model", [LORA_PAN, "adapter"], "domain_adapter"),
        ({"preset": "lightning", "steps": 9}, "invalid_request", ["lightning", "9"], "steps"),
        ({"context_length": 8, "context_stride": 9}, "invalid_request", ["context_stride"], "context_stride"),
        ({"frames": 8, "prompt_travel": {8: "x"}}, "invalid_request", ["prompt_travel", "8"], "prompt_travel.8"),
    ],
)
def test_resolve_rejects_bad_requests(
    engine: AnimateDiffEngine, fields: dict[str, Any], code: str, words: list[str], field: str
) -> None:
    with pytest.raises(EngineError) as info:
        engine.resolve(request(**fields))
    assert info.value.code == code
    for word in words:
        assert word in info.value.message
    assert info.value.field == f"$.request.{field}"  # the server's reply names it (`fields`), for forms


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_runs_end_to_end_with_its_scheduler(engine: AnimateDiffEngine, preset: str) -> None:
    seen: list[StepProgress] = []
    steps = 2
    result = engine.generate(request(preset=preset, steps=steps, guidance=None), seen.append, never)
    assert type(engine._pipe.scheduler) is PRESETS[preset].scheduler_class
    assert result.settings.guidance == PRESETS[preset].guidance
    assert [p.step for p in seen if p.phase == "denoise"] == list(range(1, steps + 1))
    assert len(result.frames) == 8
    assert all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in result.frames)
    assert set(result.timings) >= {"load", "denoise", "decode"}


def test_schedulers_are_reused_per_preset_without_carrying_state(engine: AnimateDiffEngine) -> None:
    """A preset's scheduler is built once and reused; each job resets it (set_timesteps),
    so a job's frames do not depend on what ran before, whatever the preset or steps."""
    first = {p: engine.generate(request(preset=p, steps=3, guidance=None), no_progress, never) for p in PRESETS}
    schedulers = dict(engine._schedulers)
    assert set(schedulers) == set(PRESETS)
    for preset in reversed(PRESETS):  # other orders, other step counts in between
        engine.generate(request(preset=preset, steps=2, guidance=None), no_progress, never)
        again = engine.generate(request(preset=preset, steps=3, guidance=None), no_progress, never)
        assert engine._pipe.scheduler is schedulers[preset]
        assert all(np.array_equal(a, b) for a, b in zip(first[preset].frames, again.frames, strict=True)), preset


def test_lightning_scheduler_settings() -> None:
    sched: Any = PRESETS["lightning"].make_scheduler(
        {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear"}
    )
    assert sched.config.timestep_spacing == "trailing" and sched.config.beta_schedule == "linear"
    quality: Any = PRESETS["quality"].make_scheduler({"num_train_timesteps": 1000})
    assert (quality.config.steps_offset, quality.config.clip_sample, quality.config.beta_end) == (
        1,
        False,
        0.012,
    )


# --------------------------------------------------------------------------- LoRAs


def test_lora_changes_output_sign_matters_and_never_leaks(engine: AnimateDiffEngine) -> None:
    def run(**kw: Any) -> list[np.ndarray]:
        return engine.generate(request(**kw), no_progress, never).frames

    plain = run()
    plus = run(motion_loras=[MotionLora(id=LORA_ZOOM, weight=1.0)])
    reads = engine.load_counts["lora"]
    minus = run(motion_loras=[MotionLora(id=LORA_ZOOM, weight=-1.0)])
    assert engine.load_counts["lora"] == reads  # the file is read once, then cached by id
    run(domain_adapter=ADAPTER, domain_adapter_scale=1.0)
    after = run()
    assert max_abs_diff(plus, plain) > 0
    assert max_abs_diff(minus, plain) > 0
    assert max_abs_diff(plus, minus) > 0
    # A job without LoRAs after LoRA jobs gives the frames of a clean pipeline (which
    # test_stock_parity shows equal stock diffusers)...
    assert max_abs_diff(after, plain) == 0
    # ...and no peft layer is left behind.
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(isinstance(m, BaseTunerLayer) for m in engine._pipe.unet.modules())


STYLE = "adapter:watercolor_style_lora.safetensors"  # the zoo's kohya style LoRA (UNet + text encoder)
STYLE_UNET = "adapter:style_unet_only.safetensors"  # its UNet layers alone
STYLE_TEXT = "adapter:style_text_only.safetensors"  # its text-encoder layers alone


@pytest.fixture
def style_models(zoo: Path, tmp_path: Path) -> Path:
    """A models folder with the zoo's style LoRA and copies of it cut to one part."""
    from safetensors.torch import load_file, save_file

    from animatediff_blender.backend.models.zoo import KOHYA_STYLE_ADAPTER

    models = tmp_path / "models"
    shutil.copytree(zoo / "base/tiny-sd15", models / "base/tiny-sd15")
    shutil.copytree(zoo / "motion/tiny-motion-adapter-v2", models / "motion/tiny-motion-adapter-v2")
    (models / "adapter").mkdir()
    shutil.copy2(zoo / KOHYA_STYLE_ADAPTER, models / KOHYA_STYLE_ADAPTER)
    raw = load_file(zoo / KOHYA_STYLE_ADAPTER)
    for model_id, prefix in ((STYLE_UNET, "lora_unet_"), (STYLE_TEXT, "lora_te_")):
        part = {k: v for k, v in raw.items() if k.startswith(prefix)}
        save_file(part, str(models / "adapter" / model_id.split(":", 1)[1]))
    return models


def test_a_style_lora_adapts_the_text_encoder_too_and_never_leaks(
    style_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kohya style LoRA with `lora_te_` layers as the spatial LoRA: its text-encoder part
    acts (frames differ from its UNet part alone, and its text-encoder part alone changes
    them), both parts at the request's scale (0: the frames of no LoRA), verified on both
    models; afterwards no peft layer or config is left, a plain job gives the frames of
    before, and the prompt cache (off under the LoRA) serves plain jobs again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    eng = AnimateDiffEngine(style_models, device="cpu")
    scales: list[set[float]] = []
    apply = eng._apply_loras

    def recording(pipe: Any, jobs: Any) -> None:
        apply(pipe, jobs)
        scales.append({
            s for model in (pipe.unet, pipe.text_encoder) for m in model.modules()
            if isinstance(m, BaseTunerLayer) for s in m.scaling.values()
        })  # fmt: skip

    monkeypatch.setattr(eng, "_apply_loras", recording)

    def run(model_id: str | None = None, scale: float = 1.0, **kw: Any) -> list[np.ndarray]:
        job = request(domain_adapter=model_id, domain_adapter_scale=scale, **kw)
        return list(eng.generate(job, no_progress, never).frames)

    plain = run()
    style, unet_only, text_only = run(STYLE), run(STYLE_UNET), run(STYLE_TEXT)
    half, off = run(STYLE, 0.5), run(STYLE, 0.0)
    after = run()
    assert max_abs_diff(style, plain) > 0
    assert max_abs_diff(style, unet_only) > 0  # (the prompt cache served no plain embeddings)
    assert max_abs_diff(text_only, plain) > 0
    assert max_abs_diff(half, style) > 0 and max_abs_diff(half, plain) > 0
    assert scales[3:] == [{0.5}, {0.0}]  # set_adapters scales both models' layers
    assert max_abs_diff(off, plain) == 0
    assert max_abs_diff(after, plain) == 0
    pipe = eng._pipe
    assert not any(isinstance(m, BaseTunerLayer) for m in (*pipe.unet.modules(), *pipe.text_encoder.modules()))
    assert not getattr(pipe.text_encoder, "peft_config", None)
    run(prompt="a dog running in the snow")
    assert any(key[0] == "a dog running in the snow" for key in pipe.__dict__["_adb_prompt_cache"])


def test_a_style_lora_runs_beside_a_camera_motion_lora(zoo: Path) -> None:
    """What artists do: a style LoRA (UNet + text encoder) and a camera MotionLoRA in one
    job.  The MotionLoRA has no text-encoder layers, and setting both adapters' weights must
    not fail on the model that lacks one; each changes the frames the other gives alone."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    eng = AnimateDiffEngine(zoo, device="cpu")

    def run(**kw: Any) -> list[np.ndarray]:
        return list(eng.generate(request(**kw), no_progress, never).frames)

    zoom = [MotionLora(id=LORA_ZOOM, weight=1.0)]
    both = run(domain_adapter=STYLE, motion_loras=zoom)
    assert max_abs_diff(both, run(motion_loras=zoom)) > 0
    assert max_abs_diff(both, run(domain_adapter=STYLE)) > 0
    pipe = eng._pipe
    assert not any(isinstance(m, BaseTunerLayer) for m in (*pipe.unet.modules(), *pipe.text_encoder.modules()))


def test_lora_apply_proof_checks_the_text_encoder(style_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The proof covers a style LoRA's text-encoder layers: a layer diffusers did not adapt,
    or A/B matrices that are not the file's, fail the job; the pipeline is left clean."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from animatediff_blender.backend.engine.animatediff import _engine_pipeline_class
    from animatediff_blender.backend.models import loading

    eng = AnimateDiffEngine(style_models, device="cpu")
    good = loading.load_domain_adapter(eng._entry(STYLE, "domain_adapter"))
    unknown = replace(good, text_encoder_modules={*good.text_encoder_modules, "text_model.encoder.layers.1.mlp.fc3"})
    monkeypatch.setattr(loading, "load_domain_adapter", lambda entry: unknown)

    def fails(words: str) -> None:
        eng._lora_cache.pop(STYLE, None)
        with pytest.raises(EngineError) as info:
            eng.generate(request(domain_adapter=STYLE), no_progress, never)
        assert info.value.code == "model_error" and words in info.value.message, info.value.message
        pipe = eng._pipe
        assert not any(isinstance(m, BaseTunerLayer) for m in (*pipe.unet.modules(), *pipe.text_encoder.modules()))

    fails("1 of its layers are not in the model (e.g. encoder.layers.1.mlp.fc3)")
    monkeypatch.setattr(loading, "load_domain_adapter", lambda entry: good)
    cls = _engine_pipeline_class()
    load = cls.load_lora_weights

    def altered(pipe: Any, state_dict: Any, adapter_name: str) -> None:  # one text-encoder matrix off
        load(pipe, state_dict, adapter_name=adapter_name)
        layer = next(m for m in pipe.text_encoder.modules() if isinstance(m, BaseTunerLayer)).lora_B[adapter_name]
        # (a new tensor: transformers' load_adapter keeps the state dict's own tensors)
        layer.weight = torch.nn.Parameter(layer.weight.detach() + 1)

    monkeypatch.setattr(cls, "load_lora_weights", altered)
    fails("did not load as read from the file")


def test_lora_apply_proof_raises_when_keys_target_nothing(
    engine: AnimateDiffEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The silent no-op trap: an unconverted original MotionLoRA (no `unet.` prefix,
    original names) makes `load_lora_weights` load nothing and say nothing."""
    from animatediff_blender.backend.models import loading
    from animatediff_blender.backend.models.convert import LoraWeights

    good = loading.load_motion_lora(engine._entry(LORA_ZOOM, "motion_loras"))
    raw = {k[len("unet.") :]: v for k, v in good.state_dict.items()}  # prefix lost: diffusers skips all
    bad = LoraWeights(
        state_dict=raw,
        target_modules=set(good.target_modules),
        rank=good.rank,
        network_alpha=None,
        source_format="original",
    )
    monkeypatch.setattr(loading, "load_motion_lora", lambda entry: bad)
    engine._lora_cache.pop(LORA_ZOOM, None)
    try:
        with pytest.raises(EngineError) as info:
            engine.generate(request(motion_loras=[MotionLora(id=LORA_ZOOM)]), no_progress, never)
    finally:
        engine._lora_cache.pop(LORA_ZOOM, None)
    assert info.value.code == "model_error" and LORA_ZOOM in info.value.message
    # The failed job left the pipeline clean.
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(isinstance(m, BaseTunerLayer) for m in engine._pipe.unet.modules())


def test_lora_apply_proof_raises_when_tensors_differ(
    engine: AnimateDiffEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Targets all present but one tensor would not land as read (simulated by a diffusers
    load that perturbs a weight): the tensor comparison catches it."""
    eng = engine
    eng.generate(request(), no_progress, never)
    pipe = eng._pipe
    original = type(pipe).load_lora_weights

    def tampering(self: Any, state_dict: dict[str, Any], **kw: Any) -> None:
        original(self, state_dict, **kw)
        for m in self.unet.modules():
            if hasattr(m, "lora_B") and kw["adapter_name"] in m.lora_B:
                # A new Parameter: on the CPU peft may share storage with the file's tensor.
                m.lora_B[kw["adapter_name"]].weight = torch.nn.Parameter(
                    m.lora_B[kw["adapter_name"]].weight * 0
                )
                break

    monkeypatch.setattr(type(pipe), "load_lora_weights", tampering)
    with pytest.raises(EngineError) as info:
        eng.generate(request(motion_loras=[MotionLora(id=LORA_ZOOM)]), no_progress, never)
    assert info.value.code == "model_error" and "did not load" in info.value.message


def test_v2_motion_lora_on_v3_module_is_refused(engine: AnimateDiffEngine) -> None:
    """v3 has no mid-block motion module: part of a v2 LoRA would silently go nowhere."""
    with pytest.raises(EngineError) as info:
        engine.generate(
            request(motion_module=MOTION_V3, motion_loras=[MotionLora(id=LORA_ZOOM)]), no_progress, never
        )
    assert info.value.code == "model_error" and "mid_block" in info.value.message



def test_motion_module_that_does_not_fit_the_base_is_a_model_error(zoo: Path, tmp_path: Path) -> None:
    """Widths of another base model (a real-size module on the tiny base): a clear model
    error naming both models, not the worker's "internal" failure with a traceback."""
    from diffusers import MotionAdapter

    from animatediff_blender.backend.models.zoo import _save_safetensors, motion_diffusers_to_original

    models = tmp_path / "models"
    shutil.copytree(zoo / "base/tiny-sd15", models / "base/tiny-sd15")
    wide = MotionAdapter(block_out_channels=[64, 64, 64, 64], motion_norm_num_groups=32)
    _save_safetensors(motion_diffusers_to_original(wide.state_dict()), models / "motion/wide_v2.safetensors")
    eng = AnimateDiffEngine(models, device="cpu")
    with pytest.raises(EngineError) as info:
        eng.generate(request(motion_module="motion:wide_v2.safetensors"), no_progress, never)
    assert info.value.code == "model_error"
    assert "does not fit the base model 'base:tiny-sd15'" in info.value.message


# --------------------------------------------------------------------------- progress / cancel


def test_progress_every_step_and_previews_at_cadence(engine: AnimateDiffEngine) -> None:
    seen: list[StepProgress] = []
    engine.generate(request(steps=4, preview_every=2), seen.append, never)
    denoise = [p for p in seen if p.phase == "denoise"]
    assert [p.step for p in denoise] == [1, 2, 3, 4]
    assert all(p.total_steps == 4 for p in denoise)
    assert [p.step for p in denoise if p.preview is not None] == [2, 4]
    preview = denoise[1].preview
    assert preview is not None and preview.dtype == np.uint8 and preview.shape == (8, 8, 3)
    assert seen[-1].phase == "decode"
    seen.clear()
    engine.generate(request(steps=2, preview_every=0), seen.append, never)
    assert all(p.preview is None for p in seen)


def test_preview_is_small_rgb_of_the_middle_frame() -> None:
    latents = torch.zeros(1, 4, 5, 96, 200)
    latents[0, 0, 2] = 1.0  # only the middle frame's first channel
    img = latents_to_preview(latents)
    assert img.dtype == np.uint8 and img.shape == (48, 100, 3) and max(img.shape) <= 128
    assert img[0, 0].tolist() == [172, 157, 169]  # (1 + 0.3512/0.2297/0.3227) * 127.5, rounded
    latents[0, 0, 2] = 0.0
    assert latents_to_preview(latents)[0, 0].tolist() == [128, 128, 128]


def test_cancel_between_steps_then_next_job_is_unaffected(engine: AnimateDiffEngine) -> None:
    fresh = engine.generate(request(frames=12, context_length=8), no_progress, never).frames
    seen: list[StepProgress] = []

    def should_cancel() -> bool:
        return any(p.phase == "denoise" for p in seen)  # cancel after the first step

    with pytest.raises(JobCancelled):
        engine.generate(
            request(steps=3, frames=12, context_length=8, motion_loras=[MotionLora(id=LORA_ZOOM)]),
            seen.append,
            should_cancel,
        )
    assert [p.step for p in seen if p.phase == "denoise"] == [1]
    # No LoRA, FreeNoise block or split-inference wrapper survived the cancelled job.
    again = engine.generate(request(frames=12, context_length=8), no_progress, never).frames
    assert max_abs_diff(again, fresh) == 0
    from diffusers.models.attention import FreeNoiseTransformerBlock
    from diffusers.pipelines.free_noise_utils import SplitInferenceModule

    leftovers = (FreeNoiseTransformerBlock, SplitInferenceModule)
    assert not any(isinstance(m, leftovers) for m in engine._pipe.unet.modules())


def test_cancel_while_decoding_stops_between_chunks(engine: AnimateDiffEngine) -> None:
    """A long clip decodes for seconds after its last step: a cancel then used to wait for
    every frame.  It now stops at the next chunk; what was handed over is the server's to drop."""
    handed: list[int] = []
    with pytest.raises(JobCancelled):
        engine.generate(request(steps=1, frames=12, context_length=8), no_progress,
                        lambda: bool(handed), on_frames=lambda start, frames: handed.append(start))
    assert handed == [0]  # one chunk of 4 (stream_chunk_size), not 3
    assert len(engine.generate(request(steps=1, frames=12, context_length=8), no_progress, never).frames) == 12


def test_cancel_while_loading_keeps_what_was_loaded(make_engine: Any) -> None:
    """Loading a model can take many seconds: a cancel is honoured between the base model and
    the motion module, and the next job does not load the base model again."""
    fresh = make_engine()
    seen: list[StepProgress] = []
    with pytest.raises(JobCancelled):
        fresh.generate(request(steps=1), seen.append, lambda: any(p.phase == "loading" for p in seen))
    assert (fresh.load_counts["base"], fresh.load_counts["motion"], fresh.load_counts["pipeline"]) == (1, 0, 0)
    assert not any(p.phase == "denoise" for p in seen)
    assert len(fresh.generate(request(steps=1), no_progress, never).frames) == request().frames
    assert (fresh.load_counts["base"], fresh.load_counts["motion"], fresh.load_counts["pipeline"]) == (1, 1, 1)


def test_a_job_cancelled_before_it_starts_loads_nothing_and_keeps_the_built_unet(make_engine: Any) -> None:
    """A job cancelled while queued (an artist's ✕ right after Generate, a resent submit that
    was cancelled) loads no model; one cancelled while its motion module of another
    architecture loads keeps the built UNet (and its compiled shapes) for the next job, the
    module read kept for when it is asked for again."""
    fresh = make_engine()
    with pytest.raises(JobCancelled):
        fresh.generate(request(), no_progress, lambda: True)
    assert not fresh.load_counts
    fresh.generate(request(), no_progress, never)
    unet = fresh.pipeline.unet
    seen: list[StepProgress] = []
    with pytest.raises(JobCancelled):
        fresh.generate(request(motion_module=MOTION_V3), seen.append, lambda: bool(seen))
    assert fresh.pipeline is not None and fresh.pipeline.unet is unet and fresh._motion_id == MOTION
    assert fresh.load_counts == {"base": 1, "motion": 2, "pipeline": 1}
    fresh.generate(request(motion_module=MOTION_V3), no_progress, never)
    assert fresh.load_counts == {"base": 1, "motion": 2, "pipeline": 2}  # v3 not read again


def test_long_clip_swaps_motion_blocks_without_rebuilding_them(engine: AnimateDiffEngine) -> None:
    """FreeNoise windows stand in for the plain motion blocks during a long job, on the same
    weight tensors (no copy, nothing left on the meta device), and the very same plain
    blocks come back afterwards (already compiled ones stay compiled)."""
    from diffusers.models.attention import BasicTransformerBlock, FreeNoiseTransformerBlock

    engine.generate(request(), no_progress, never)
    unet = engine._pipe.unet

    def motion_blocks() -> list[Any]:
        return [b for name, b in unet.named_modules() if "motion_modules" in name and name.endswith(
            tuple(f"transformer_blocks.{i}" for i in range(4)))]  # fmt: skip

    before = motion_blocks()
    assert before and all(type(b) is BasicTransformerBlock for b in before)
    storage = {b.attn1.to_q.weight.data_ptr() for b in before}
    seen: list[Any] = []

    def watch(progress: StepProgress) -> None:
        if not seen:  # the memory saver wraps each block in a SplitInferenceModule
            seen.extend(getattr(b, "module", b) for b in motion_blocks())

    engine.generate(request(frames=12, context_length=8), watch, never)
    assert seen and all(isinstance(b, FreeNoiseTransformerBlock) for b in seen)
    assert {b.attn1.to_q.weight.data_ptr() for b in seen} == storage
    assert not any(t.is_meta for b in seen for t in [*b.parameters(), *b.buffers()])
    after = motion_blocks()
    assert len(after) == len(before) and all(a is b for a, b in zip(after, before, strict=True))
    assert not engine._plain_motion_blocks
    # The next long job (other window settings) reuses the same stand-ins, re-set.
    first = list(seen)
    seen.clear()
    engine.generate(request(frames=12, context_length=8, context_stride=2), watch, never)
    assert len(seen) == len(first) and all(a is b for a, b in zip(seen, first, strict=True))
    assert {b.context_stride for b in seen} == {2}
    # A plain block whose tensors were replaced gets a fresh stand-in on its tensors.
    plain = before[0]
    with torch.no_grad():
        plain.attn1.to_q.weight = torch.nn.Parameter(plain.attn1.to_q.weight.clone())
    seen.clear()
    engine.generate(request(frames=12, context_length=8), watch, never)
    assert seen[0] is not first[0] and seen[0].attn1.to_q.weight.data_ptr() == plain.attn1.to_q.weight.data_ptr()
    assert all(a is b for a, b in zip(seen[1:], first[1:], strict=True))


def test_a_plain_job_skips_the_undo_walks_and_the_device_search(
    engine: AnimateDiffEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host time the device would wait for: a job without LoRAs or FreeNoise undoes
    nothing (each undo walks the UNet's modules), and no job searches the modules for
    offloading hooks to find its device (diffusers' `_execution_device`)."""
    import diffusers.hooks.group_offloading as group_offloading

    engine.generate(request(), no_progress, never)  # builds the pipeline
    calls: list[str] = []
    for name in ("_disable_memory_saving", "_disable_free_noise", "_compile"):
        inner = getattr(engine, name)
        monkeypatch.setattr(engine, name, lambda *a, _n=name, _f=inner: (calls.append(_n), _f(*a))[1])
    searched: list[Any] = []
    search = group_offloading._get_top_level_group_offload_hook
    monkeypatch.setattr(group_offloading, "_get_top_level_group_offload_hook", lambda m: (searched.append(m), search(m))[1])
    assert engine.pipeline._execution_device == engine.device
    engine.generate(request(), no_progress, never)
    assert calls == [] and searched == []
    # What a job did is undone: FreeNoise (a long clip) and LoRAs.
    engine.generate(request(frames=12, context_length=8), no_progress, never)
    assert calls == ["_disable_free_noise", "_compile"] and searched == []
    calls.clear()
    engine.generate(request(motion_loras=[MotionLora(id=LORA_ZOOM, weight=1.0)]), no_progress, never)
    assert calls == ["_compile"] and not getattr(engine.pipeline.unet, "peft_config", None)


def test_the_motion_unets_dtype_is_diffusers_answer_without_the_walk(
    engine: AnimateDiffEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """UNetMotionModel.forward asks for its dtype every step; diffusers' answer walks
    every submodule for casting hooks.  The engine's motion UNet gives the same answer
    without the walk, under the same class name (diffusers and peft look things up by it)."""
    import diffusers.models.modeling_utils as modeling_utils
    from diffusers import ModelMixin, UNetMotionModel

    engine.generate(request(), no_progress, never)
    unet = engine.pipeline.unet
    assert isinstance(unet, UNetMotionModel) and type(unet).__name__ == "UNetMotionModel"
    assert unet.dtype == ModelMixin.dtype.fget(unet) == torch.float32
    walked: list[Any] = []
    walk = modeling_utils.get_parameter_dtype
    monkeypatch.setattr(modeling_utils, "get_parameter_dtype", lambda m: (walked.append(m), walk(m))[1])
    engine.generate(request(), no_progress, never)
    assert unet not in walked
    # Modules kept in float32 are skipped, as diffusers does (on a copy: the engine's
    # weights must not go through float16).
    copy = deepcopy(unet).to(torch.float16)
    copy._keep_in_fp32_modules = ["conv_in"]
    copy.conv_in.to(torch.float32)
    assert copy.dtype == ModelMixin.dtype.fget(copy) == torch.float16


def test_encoded_prompts_are_reused_with_the_same_frames(
    engine: AnimateDiffEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from animatediff_blender.backend.engine.animatediff import PROMPT_CACHE_SIZE

    first = engine.generate(request(), no_progress, never)
    encoder = engine.pipeline.text_encoder
    encoded: list[Any] = []
    inner = encoder.forward
    monkeypatch.setattr(encoder, "forward", lambda *a, **k: (encoded.append(1), inner(*a, **k))[1])
    again = engine.generate(request(seed=7), no_progress, never)
    assert encoded == []  # prompt and negative prompt: both from the cache
    assert all(np.array_equal(a, b) for a, b in zip(first.frames, again.frames, strict=True))
    engine.generate(request(negative_prompt="ugly"), no_progress, never)
    assert len(encoded) == 2  # another key: both prompts encoded again (one call per prompt with CFG)
    engine.generate(request(guidance=1.0), no_progress, never)
    assert len(encoded) == 3  # no CFG: the prompt alone, a key of its own
    # Prompt travel interpolates per frame from lists of prompts: never cached.
    for _ in range(2):
        engine.generate(request(prompt_travel={4: "a dog"}), no_progress, never)
    assert len(encoded) > 5
    # At most PROMPT_CACHE_SIZE kept, the least recently used dropped first.
    pipe = engine.pipeline
    for i in range(PROMPT_CACHE_SIZE + 3):
        pipe.encode_prompt(f"prompt {i}", engine.device, 1, True, "")
    cache = pipe.__dict__["_adb_prompt_cache"]
    assert len(cache) == PROMPT_CACHE_SIZE and next(iter(cache))[0] == "prompt 3"


# --------------------------------------------------------------------------- warm cache


def test_warm_cache_reuses_components_and_swaps_only_the_motion_module(make_engine: Any) -> None:
    eng = make_engine()
    assert eng.pipeline is None and not eng.load_counts  # nothing loads before it is needed
    eng.warm_up(BASE, MOTION)
    assert eng.load_counts == {"base": 1, "motion": 1, "pipeline": 1}
    eng.generate(request(), no_progress, never)
    assert eng.load_counts == {"base": 1, "motion": 1, "pipeline": 1}
    vae, text_encoder, adapter = eng._base.vae, eng._base.text_encoder, eng._adapter
    eng.generate(request(seed=99, prompt="a dog"), no_progress, never)
    assert eng.load_counts == {"base": 1, "motion": 1, "pipeline": 1}
    assert eng._adapter is adapter
    unet = eng.pipeline.unet
    eng.generate(request(motion_module=MOTION_CKPT), no_progress, never)
    # Another v2 module: its weights are copied into the motion UNet built before.
    assert eng.load_counts == {"base": 1, "motion": 2, "pipeline": 1, "motion_swap": 1}
    assert eng._base.vae is vae and eng._base.text_encoder is text_encoder
    assert eng._adapter is not adapter and eng.pipeline.unet is unet
    eng.generate(request(motion_module=MOTION_CKPT, base_model=BASE), no_progress, never)
    assert eng.load_counts["pipeline"] == 1
    # Back to the first: kept on the CPU, not read again.  v3 (no mid-block motion module)
    # is another architecture: the UNet is built again.
    eng.generate(request(), no_progress, never)
    assert eng.load_counts == {"base": 1, "motion": 2, "pipeline": 1, "motion_swap": 2}
    assert eng._adapter is adapter
    eng.generate(request(motion_module=MOTION_V3), no_progress, never)
    assert eng.load_counts == {"base": 1, "motion": 3, "pipeline": 2, "motion_swap": 2}
    assert eng.pipeline.unet is not unet


# --------------------------------------------------------------------------- models replaced on disk

MM = "motion:mm_sd_v15_v2.safetensors"


def _replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """Replace `path` under its name as a sync tool or downloader does: a new file written
    beside it, renamed over it (with a later mtime even where the file system's clock is coarse)."""
    old = path.stat()
    tmp = path.with_name(path.name + ".partial")
    write(tmp)
    os.replace(tmp, path)
    if path.stat().st_mtime_ns <= old.st_mtime_ns:
        os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 1_000_000_000))


def _retrained_motion_module(seed: int) -> Callable[[Path], None]:
    """Writes another v2 motion module (own random weights, same layout and size)."""
    from animatediff_blender.backend.models.zoo import write_motion_module

    return lambda dest: write_motion_module(dest, "v2", seed)


@pytest.fixture
def own_models(zoo: Path, tmp_path: Path) -> Path:
    """A writable models folder with a base, a motion module, two LoRAs and the adapter."""
    models = tmp_path / "models"
    shutil.copytree(zoo / "base/tiny-sd15", models / "base/tiny-sd15")
    for rel in ("motion/mm_sd_v15_v2.safetensors", "lora/v2_lora_ZoomIn.ckpt", "lora/v2_lora_PanLeft.ckpt",
                "adapter/v3_sd15_adapter.ckpt"):  # fmt: skip
        (models / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(zoo / rel, models / rel)
    return models


def test_quality_and_fast_alternate_without_rebuilding_or_rereading(own_models: Path) -> None:
    """An artist alternating Quality and Fast: Fast runs on the backend's Lightning module (a
    v2 distillation), Quality on v2.  Each switch copies the other module's weights into the
    motion UNet already built (compiled blocks kept) instead of building a new one; each
    module is read from disk once; the frames are a fresh engine's."""
    _retrained_motion_module(seed=5)(own_models / "motion/animatediff_lightning_4step.safetensors")
    eng = AnimateDiffEngine(own_models, device="cpu")
    assert eng.default_models()["motion_lightning"] == "motion:animatediff_lightning_4step.safetensors"
    quality = request(base_model=None, motion_module=None)
    fast = request(base_model=None, motion_module=None, preset="lightning", steps=None, guidance=None)

    def run(job: Any, engine: AnimateDiffEngine = eng) -> list[np.ndarray]:
        return list(engine.generate(job, no_progress, never).frames)

    q1, f1 = run(quality), run(fast)
    unet = eng.pipeline.unet
    q2, f2 = run(quality), run(fast)
    assert eng.load_counts == {"base": 1, "motion": 2, "pipeline": 1, "motion_swap": 3}
    assert eng.pipeline.unet is unet
    assert max_abs_diff(q1, q2) == 0 and max_abs_diff(f1, f2) == 0 and max_abs_diff(q1, f1) > 0
    assert max_abs_diff(f2, run(fast, AnimateDiffEngine(own_models, device="cpu"))) == 0
    assert max_abs_diff(q2, run(quality, AnimateDiffEngine(own_models, device="cpu"))) == 0
    # The baseline the switch is measured against (scripts/switch_probe.py): rebuilt, same frames.
    rebuild = AnimateDiffEngine(own_models, device="cpu", swap_motion_weights=False)
    run(quality, rebuild)
    assert max_abs_diff(run(fast, rebuild), f1) == 0
    assert rebuild.load_counts["pipeline"] == 2 and not rebuild.load_counts["motion_swap"]
    # The server's warm-up reads the Fast module ahead too: the first Fast job reads nothing.
    warm = AnimateDiffEngine(own_models, device="cpu")
    warm.warm_up()
    assert warm.load_counts == {"base": 1, "motion": 2, "pipeline": 1}
    assert max_abs_diff(run(fast, warm), f1) == 0
    assert warm.load_counts == {"base": 1, "motion": 2, "pipeline": 1, "motion_swap": 1}


def test_models_replaced_on_disk_are_reloaded_and_unchanged_ones_are_not(zoo: Path, own_models: Path) -> None:
    """A studio replaces a MotionLoRA and the motion module under their names while the
    server runs: the next job that uses them loads the new files (with no rescan, or after
    one), and gives a fresh engine's frames; models that did not change are not reloaded."""
    models = own_models
    eng = AnimateDiffEngine(models, device="cpu")
    zoom = request(motion_module=MM, motion_loras=[MotionLora(id=LORA_ZOOM)])
    pan = request(motion_module=MM, motion_loras=[MotionLora(id=LORA_PAN)], domain_adapter=ADAPTER)

    def run(job: Any, engine: AnimateDiffEngine = eng) -> list[np.ndarray]:
        return list(engine.generate(job, no_progress, never).frames)

    def fresh(job: Any) -> list[np.ndarray]:
        return run(job, AnimateDiffEngine(models, device="cpu"))

    first = run(zoom)
    run(pan)
    loads = {"base": 1, "motion": 1, "pipeline": 1, "lora": 3}
    assert eng.load_counts == loads

    # A retrained ZoomIn, simply picked up by the next job (no rescan asked for).
    _replace_file(models / "lora/v2_lora_ZoomIn.ckpt", lambda dest: shutil.copyfile(zoo / "lora/v2_lora_TiltUp.ckpt", dest))
    second = run(zoom)
    assert eng.load_counts == {**loads, "lora": 4}  # that LoRA alone is read again
    assert max_abs_diff(second, first) > 0
    assert max_abs_diff(second, fresh(zoom)) == 0
    pan_frames = run(pan)
    assert eng.load_counts == {**loads, "lora": 4}  # PanLeft and the adapter: still cached
    assert max_abs_diff(pan_frames, fresh(pan)) == 0

    # A new motion module under the same name, then a rescan (list-models with rescan).
    _replace_file(models / "motion/mm_sd_v15_v2.safetensors", _retrained_motion_module(seed=77))
    eng.list_models(rescan=True)
    third = run(zoom)
    # Its weights go into the motion UNet; the base model stays, and so do the LoRAs.
    assert eng.load_counts == {"base": 1, "motion": 2, "pipeline": 1, "motion_swap": 1, "lora": 4}
    assert max_abs_diff(third, second) > 0
    assert max_abs_diff(third, fresh(zoom)) == 0

    # Again without the rescan: the next job still sees it.
    _replace_file(models / "motion/mm_sd_v15_v2.safetensors", _retrained_motion_module(seed=78))
    fourth = run(zoom)
    assert eng.load_counts == {"base": 1, "motion": 3, "pipeline": 1, "motion_swap": 2, "lora": 4}
    assert max_abs_diff(fourth, third) > 0
    assert max_abs_diff(fourth, fresh(zoom)) == 0

    # Nothing changed (a rescan, a file touched or copied over with the same bytes): nothing reloads.
    eng.list_models(rescan=True)
    path = models / "lora/v2_lora_ZoomIn.ckpt"
    _replace_file(path, lambda dest: shutil.copyfile(path, dest))
    again = run(zoom)
    run(pan)
    assert eng.load_counts == {"base": 1, "motion": 3, "pipeline": 1, "motion_swap": 2, "lora": 4}
    assert max_abs_diff(again, fourth) == 0


def test_a_job_checks_each_model_file_once(own_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether a loaded model was replaced on disk costs a stat per file, once per job: the
    job's loading decides how it runs (compiled or not), and the run uses what it loaded.  The
    run checked the base model and motion module a second time."""
    from collections import Counter

    eng = AnimateDiffEngine(own_models, device="cpu")
    job = request(motion_module=MM, motion_loras=[MotionLora(id=LORA_ZOOM)], domain_adapter=ADAPTER)
    eng.generate(job, no_progress, never)
    checked: Counter[str] = Counter()
    is_current = eng._registry.is_current

    def counting(entry: Any) -> bool:
        checked[entry.id] += 1
        return is_current(entry)

    monkeypatch.setattr(eng._registry, "is_current", counting)
    eng.generate(job, no_progress, never)
    assert set(checked) >= {MM, LORA_ZOOM, ADAPTER} and set(checked.values()) == {1}, checked


def test_a_replaced_model_that_is_broken_now_is_a_model_error(own_models: Path) -> None:
    """The replacement is checked as a rescan checks it: a truncated file is refused with its
    reason (not served from the old weights); once fixed, the job runs again."""
    eng = AnimateDiffEngine(own_models, device="cpu")
    job = request(motion_module=MM, motion_loras=[MotionLora(id=LORA_ZOOM)])
    good = eng.generate(job, no_progress, never).frames
    path = own_models / "lora/v2_lora_ZoomIn.ckpt"
    data = path.read_bytes()
    _replace_file(path, lambda dest: dest.write_bytes(data[: len(data) // 2]))
    with pytest.raises(EngineError) as info:
        eng.generate(job, no_progress, never)
    assert info.value.code == "model_error" and LORA_ZOOM in info.value.message
    _replace_file(path, lambda dest: dest.write_bytes(data))
    assert max_abs_diff(eng.generate(job, no_progress, never).frames, good) == 0



@pytest.mark.parametrize("trigger", ["list_models", "job"])
def test_the_servers_calls_never_wait_for_a_rescan(
    zoo: Path, own_models: Path, held_first_hash: Callable[[], tuple[threading.Event, threading.Event]], trigger: str
) -> None:
    """hello, list-models and submit (resolve) run on the server's network loop: while a
    rescan hashes a checkpoint dropped in or replaced (held here: GBs on a network disk take
    longer than the clients' timeout), asked by a client or by a job using a replaced model,
    they answer at once from the previous scan; the new contents come when it completes."""
    eng = AnimateDiffEngine(own_models, device="cpu")
    before, defaults = eng.list_models(), eng.default_models()
    tilt = "lora:v2_lora_TiltUp.ckpt"
    shutil.copy2(zoo / "lora/v2_lora_TiltUp.ckpt", own_models / "lora/v2_lora_TiltUp.ckpt")
    _replace_file(own_models / "lora/v2_lora_ZoomIn.ckpt", lambda dest: shutil.copyfile(zoo / "lora/v2_lora_PanLeft.ckpt", dest))
    hashing, release = held_first_hash()

    def loop_calls() -> tuple[Any, ...]:
        try:
            eng.resolve(request(motion_module=MM, motion_loras=[MotionLora(id=tilt)]))
            refused = ""
        except EngineError as exc:
            refused = exc.code
        zoom = eng.resolve(request(motion_module=MM, motion_loras=[MotionLora(id=LORA_ZOOM)]))
        return eng.list_models(), eng.default_models(), zoom.motion_loras[0].id, refused

    with ThreadPoolExecutor(2) as pool:
        if trigger == "list_models":
            rescan = pool.submit(eng.list_models, rescan=True)
        else:  # the worker, about to load the replaced LoRA
            rescan = pool.submit(eng._current_entry, LORA_ZOOM, "motion_loras")
        assert hashing.wait(30)
        try:
            assert pool.submit(loop_calls).result(timeout=1) == (before, defaults, LORA_ZOOM, "unknown_model")
        finally:
            release.set()
        rescan.result(timeout=30)
    old, new = ({m.id: m.sha256 for m in infos} for infos in (before, eng.list_models()))
    assert tilt in new and tilt not in old
    assert new[LORA_ZOOM] != old[LORA_ZOOM]


# --------------------------------------------------------------------------- errors


def test_out_of_memory_becomes_a_readable_engine_error(
    engine: AnimateDiffEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    eng = engine
    good = eng.generate(request(), no_progress, never).frames
    pipe_cls = type(eng._pipe)
    original_call = pipe_cls.__call__

    def oom(self: Any, *a: Any, **kw: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pipe_cls, "__call__", oom)
    with pytest.raises(EngineError) as info:
        eng.generate(request(frames=16, motion_loras=[MotionLora(id=LORA_ZOOM)]), no_progress, never)
    assert info.value.code == "out_of_memory"
    assert (
        "16 frames" in info.value.message
        and "64x64" in info.value.message
        and "fewer frames" in info.value.message
    )
    monkeypatch.setattr(pipe_cls, "__call__", original_call)
    assert max_abs_diff(eng.generate(request(), no_progress, never).frames, good) == 0


def test_long_clip_out_of_memory_is_retried_with_the_memory_savers(
    make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Default (memory_saving=None): a long clip runs without the savers (faster); when it
    runs out of memory it is retried once with them, and the frames match the savers'
    always-on path.  Short clips and memory_saving=False are not retried."""
    from diffusers.pipelines.free_noise_utils import SplitInferenceModule

    eng = make_engine()
    always = make_engine(memory_saving=True)
    long_job = request(frames=12, context_length=8)
    reference = always.generate(long_job, no_progress, never).frames
    eng.generate(request(), no_progress, never)
    pipe_cls = type(eng._pipe)
    original_call = pipe_cls.__call__
    attempts: list[bool] = []  # per pipeline call: were the savers on?

    def oom_without_savers(self: Any, *a: Any, **kw: Any) -> Any:
        saving = any(isinstance(m, SplitInferenceModule) for m in self.unet.modules())
        attempts.append(saving)
        if not saving:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return original_call(self, *a, **kw)

    monkeypatch.setattr(pipe_cls, "__call__", oom_without_savers)
    frames = eng.generate(long_job, no_progress, never).frames
    assert attempts == [False, True]
    assert max_abs_diff(frames, reference) == 0
    attempts.clear()
    with pytest.raises(EngineError) as info:  # a short clip has nothing to save: no retry
        eng.generate(request(), no_progress, never)
    assert info.value.code == "out_of_memory" and attempts == [False]
    attempts.clear()
    never_saving = make_engine(memory_saving=False)
    with pytest.raises(EngineError):
        never_saving.generate(long_job, no_progress, never)
    assert attempts == [False]
    monkeypatch.setattr(pipe_cls, "__call__", original_call)
    # Nothing of the savers stayed behind.
    assert not any(isinstance(m, SplitInferenceModule) for m in eng._pipe.unet.modules())


def test_capabilities_and_device(engine: AnimateDiffEngine) -> None:
    caps = engine.capabilities()
    for cap in ("motion_lora", "domain_adapter", "context_windows", "prompt_travel", "preview"):
        assert cap in caps
    assert "presets:quality,lightning,lcm" in caps
    assert engine.device_name() == "cpu" and engine.dtype == torch.float32
    ids = {m.id for m in engine.list_models()}
    assert {BASE, MOTION, LORA_ZOOM, ADAPTER} <= ids


def test_unknown_dtype_or_device_is_refused(zoo: Any) -> None:
    with pytest.raises(EngineError) as info:
        AnimateDiffEngine(zoo, device="cpu", dtype="fp8")
    assert info.value.code == "device" and "fp8" in info.value.message
    with pytest.raises(EngineError) as info:
        AnimateDiffEngine(zoo, device="tpu-ish")
    assert info.value.code == "device"
    if not torch.cuda.is_available():
        with pytest.raises(EngineError) as info:
            AnimateDiffEngine(zoo, device="cuda")
        assert info.value.code == "device" and "CUDA" in info.value.message
