"""Loading and key conversion: every zoo file through the backend's own loaders, and the
same weights in different layouts giving identical tensors."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from animatediff_blender.backend.models import convert, loading
from animatediff_blender.backend.models.convert import ConversionError


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def base_folder(tiny_zoo: Path) -> loading.BaseComponents:
    return loading.load_base(tiny_zoo / "base/tiny-sd15")


def test_single_file_equals_folder(tiny_zoo: Path, base_folder: loading.BaseComponents) -> None:
    single = loading.load_base(tiny_zoo / "base/tiny-sd15-ldm.safetensors")
    assert single.source_format == "single_file" and base_folder.source_format == "diffusers"
    for part in ("unet", "vae", "text_encoder"):
        _assert_same_state(getattr(base_folder, part), getattr(single, part))
    assert single.tokenizer("a cat").input_ids == base_folder.tokenizer("a cat").input_ids
    assert single.scheduler_config["_class_name"] == "DDIMScheduler"
    # And the folder equals the files on disk (diffusers' own loader, nothing dropped).
    raw = load_file(str(tiny_zoo / "base/tiny-sd15/unet/diffusion_pytorch_model.safetensors"))
    assert set(raw) == set(base_folder.unet.state_dict())


def test_single_file_ckpt_and_dtype(
    tiny_zoo: Path, tmp_path: Path, base_folder: loading.BaseComponents
) -> None:
    """A pickled single file ({"state_dict": ...}, as old checkpoints) loads the same weights."""
    base = tmp_path / "base"
    base.mkdir()
    sd = load_file(str(tiny_zoo / "base/tiny-sd15-ldm.safetensors"))
    torch.save({"state_dict": sd, "global_step": 1}, base / "tiny.ckpt")
    shutil.copytree(tiny_zoo / "base/tiny-sd15-ldm.config", base / "tiny.config")
    comps = loading.load_base(base / "tiny.ckpt", dtype=torch.float16)
    assert comps.unet.dtype == torch.float16 and comps.text_encoder.dtype == torch.float16
    ref = base_folder.vae.state_dict()
    for k, v in comps.vae.state_dict().items():
        assert torch.equal(v, ref[k].half()), k


def test_single_file_without_config_falls_back_to_sd15(tiny_zoo: Path, tmp_path: Path) -> None:
    base = tmp_path / "models" / "base"
    base.mkdir(parents=True)
    shutil.copy(tiny_zoo / "base/tiny-sd15-ldm.safetensors", base / "community.safetensors")
    assert loading.single_file_config_dir(base / "community.safetensors") == loading.SD15_CONFIG_DIR
    with pytest.raises(ConversionError, match="models fetch"):
        loading.load_base(base / "community.safetensors")  # no SD1.5 tokenizer yet
    shutil.copytree(tiny_zoo / "base/tiny-sd15/tokenizer", base / "stable-diffusion-v1-5" / "tokenizer")
    # Now the shipped SD1.5 config is used, which the tiny weights do not fit: a clear error.
    with pytest.raises(ConversionError, match="does not match|shape"):
        loading.load_base(base / "community.safetensors")


def test_shipped_sd15_configs_are_sd15_sized() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    d = loading.SD15_CONFIG_DIR
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(d / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(d / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(d / "text_encoder"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(unet), count(vae), count(text)) == (859_520_964, 83_653_863, 123_060_480)
    assert not (d / "tokenizer").exists()  # never invented: fetched instead


def test_motion_adapter_layouts_identical(tiny_zoo: Path) -> None:
    folder = loading.load_motion_adapter(tiny_zoo / "motion/tiny-motion-adapter-v2")
    ckpt = loading.load_motion_adapter(tiny_zoo / "motion/mm_sd_v15_v2.ckpt")
    st = loading.load_motion_adapter(tiny_zoo / "motion/mm_sd_v15_v2.safetensors")
    _assert_same_state(folder, ckpt)
    _assert_same_state(folder, st)
    # Every tensor of the folder file reached the adapter (incl. the recomputed sinusoids).
    raw = load_file(str(tiny_zoo / "motion/tiny-motion-adapter-v2/diffusion_pytorch_model.safetensors"))
    own = ckpt.state_dict()
    assert set(raw) == set(own)
    for k, v in raw.items():
        assert torch.equal(own[k], v), k
    assert ckpt.config.use_motion_mid_block is True and ckpt.config.motion_max_seq_length == 32
    assert list(ckpt.config.block_out_channels) == [32, 32, 64, 64]


def test_motion_versions(tiny_zoo: Path) -> None:
    v3_ckpt = loading.load_motion_adapter(tiny_zoo / "motion/v3_sd15_mm.ckpt")  # {"state_dict": ...} wrapped
    v3_st = loading.load_motion_adapter(tiny_zoo / "motion/v3_sd15_mm.safetensors", dtype=torch.float16)
    assert v3_ckpt.config.use_motion_mid_block is False
    assert v3_st.dtype == torch.float16
    for k, v in v3_ckpt.state_dict().items():
        assert torch.equal(v.half(), v3_st.state_dict()[k]), k
    v1 = loading.load_motion_adapter(tiny_zoo / "motion/mm_sd_v15.ckpt")
    assert v1.config.motion_max_seq_length == 24 and v1.config.use_motion_mid_block is False

    shapes = {
        n: convert.read_tensor_shapes(tiny_zoo / "motion" / n)
        for n in ("mm_sd_v15_v2.safetensors", "v3_sd15_mm.safetensors", "mm_sd_v15.ckpt")
    }
    assert convert.detect_motion_version(shapes["mm_sd_v15_v2.safetensors"]) == "v2"
    assert convert.detect_motion_version(shapes["v3_sd15_mm.safetensors"]) == "v3"
    assert convert.detect_motion_version(shapes["mm_sd_v15.ckpt"]) == "v1"
    assert (
        convert.detect_motion_version(shapes["mm_sd_v15_v2.safetensors"], "AnimateLCM_sd15_t2v.ckpt") == "lcm"
    )
    assert (
        convert.detect_motion_version(
            shapes["mm_sd_v15_v2.safetensors"], "animatediff_lightning_4step_diffusers.safetensors"
        )
        == "lightning"
    )


def test_lightning_style_diffusers_layout_file(tiny_zoo: Path, tmp_path: Path) -> None:
    """AnimateDiff-Lightning ships MotionAdapter keys in one file (no config): widths inferred."""
    raw = load_file(str(tiny_zoo / "motion/tiny-motion-adapter-v2/diffusion_pytorch_model.safetensors"))
    path = tmp_path / "animatediff_lightning_4step_diffusers.safetensors"
    save_file(raw, str(path))
    adapter = loading.load_motion_adapter(path)
    _assert_same_state(adapter, loading.load_motion_adapter(tiny_zoo / "motion/tiny-motion-adapter-v2"))
    assert convert.detect_motion_version(convert.read_tensor_shapes(path), path.name) == "lightning"


def test_motion_converter_raises_on_unknown_or_missing_keys(tiny_zoo: Path, tmp_path: Path) -> None:
    sd = load_file(str(tiny_zoo / "motion/mm_sd_v15_v2.safetensors"))
    bad = dict(sd)
    bad[
        "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_qq.weight"
    ] = torch.zeros(1)
    with pytest.raises(ConversionError, match="not understood"):
        convert.motion_original_to_diffusers(bad)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConversionError, match="bad.safetensors"):
        loading.load_motion_adapter(tmp_path / "bad.safetensors")
    # A file missing one weight must not load partially.
    partial = {k: v for k, v in sd.items() if not k.endswith("ff_norm.weight")}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ConversionError, match="missing"):
        loading.load_motion_adapter(tmp_path / "partial.safetensors")


def test_motion_lora_original_equals_diffusers_layout(tiny_zoo: Path) -> None:
    orig = loading.load_motion_lora(tiny_zoo / "lora/v2_lora_ZoomIn.ckpt")
    hub = loading.load_motion_lora(tiny_zoo / "lora/motion-lora-zoom-in")
    assert (orig.source_format, hub.source_format) == ("original", "diffusers")
    assert orig.state_dict.keys() == hub.state_dict.keys()
    for k in orig.state_dict:
        assert torch.equal(orig.state_dict[k], hub.state_dict[k]), k
    assert orig.target_modules == hub.target_modules
    assert orig.rank == 4 and orig.network_alpha is None
    # q, k, v, out of both attention blocks of every motion module (2x4 down, 1 mid, 3x4 up).
    assert len(orig.target_modules) == 8 * (8 + 1 + 12)
    assert "mid_block.motion_modules.0.transformer_blocks.0.attn2.to_out.0" in orig.target_modules
    key = "unet.down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q"
    assert orig.state_dict[key + ".lora_A.weight"].shape == (4, 32)
    assert orig.state_dict[key + ".lora_B.weight"].shape == (32, 4)
    # peft layout round trip (what diffusers itself saves) gives the same again.
    again = convert.lora_to_peft(orig.state_dict, "motion")
    assert again.source_format == "peft" and again.state_dict.keys() == orig.state_dict.keys()


def test_lora_converter_raises_instead_of_ignoring(tiny_zoo: Path) -> None:
    sd = torch.load(str(tiny_zoo / "lora/v2_lora_PanLeft.ckpt"), weights_only=True)
    with pytest.raises(ConversionError, match="not understood"):
        convert.lora_to_peft(
            {**sd, "lora_unet_down_blocks_0_attentions_0.alpha": torch.tensor(1.0)}, "motion"
        )
    half = {k: v for k, v in sd.items() if not k.endswith("to_q_lora.up.weight")}
    with pytest.raises(ConversionError, match="lacks its up weight"):
        convert.lora_to_peft(half, "motion")
    # A spatial LoRA (the domain adapter) is not a MotionLoRA, and vice versa.
    adapter = torch.load(str(tiny_zoo / "adapter/v3_sd15_adapter.ckpt"), weights_only=True)
    with pytest.raises(ConversionError, match="outside the motion attention"):
        convert.lora_to_peft(adapter, "motion")
    with pytest.raises(ConversionError, match="outside the spatial layers"):
        convert.lora_to_peft(sd, "spatial")
    with pytest.raises(ConversionError, match="empty"):
        convert.lora_to_peft({}, "motion")


def test_domain_adapter_targets_spatial_attention(
    tiny_zoo: Path, base_folder: loading.BaseComponents
) -> None:
    lora = loading.load_domain_adapter(tiny_zoo / "adapter/v3_sd15_adapter.ckpt")
    assert lora.scope == "spatial" and lora.source_format == "original"
    names = dict(base_folder.unet.named_modules())
    for module in lora.target_modules:
        assert module in names and isinstance(names[module], torch.nn.Linear), module
    # every attention projection of every spatial transformer (attn1 and attn2)
    expected = {
        n for n in names if ".attentions." in n and n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))
    }
    assert lora.target_modules == expected


def test_a_ckpt_that_is_no_checkpoint_is_not_called_pickled_code(tmp_path: Path) -> None:
    """An HTML error page saved as .ckpt (a failed download) was refused as "pickle code that
    is not plain tensors ... convert it to .safetensors", which no converter can do."""
    page = tmp_path / "mm_sd_v15_v2.ckpt"
    page.write_bytes(b"<!DOCTYPE html><html>404</html>\n")
    with pytest.raises(ConversionError, match="not a PyTorch checkpoint .*download it again"):
        convert.read_state_dict(page)
    import pathlib

    torch.save({"w": torch.zeros(1), "odd": pathlib.PurePosixPath("x")}, tmp_path / "code.ckpt")
    with pytest.raises(ConversionError, match="pickled code is never run"):
        convert.read_state_dict(tmp_path / "code.ckpt")


def test_kohya_lora_maps_every_layer_and_scales_each_by_its_alpha(
    tiny_zoo: Path, base_folder: loading.BaseComponents
) -> None:
    """The zoo's kohya LoRA (AnimateLCM's file name): every `lora_unet_<module>` is a real
    layer of the UNet (conv ones with 4-D pairs), and each layer's up matrix carries its own
    alpha / rank, linear and conv layers alike, since peft then scales by 1."""
    from safetensors.torch import load_file

    from animatediff_blender.backend.models import zoo

    raw = load_file(tiny_zoo / zoo.KOHYA_ADAPTER)
    lora = loading.load_domain_adapter(tiny_zoo / zoo.KOHYA_ADAPTER)
    assert (lora.source_format, lora.scope, lora.network_alpha, lora.rank) == ("kohya", "spatial", None, 4)
    names = dict(base_folder.unet.named_modules())
    expected = {n for n in names if zoo.KOHYA_SPATIAL_TARGETS.search(n)}
    assert lora.target_modules == expected
    assert {type(names[m]).__name__ for m in expected} == {"Linear", "Conv2d"}
    for module in expected:
        key = "lora_unet_" + module.replace(".", "_")
        down, up = raw[f"{key}.lora_down.weight"], raw[f"{key}.lora_up.weight"]
        scale = float(raw[f"{key}.alpha"]) / down.shape[0]
        assert scale == (0.75 if down.ndim == 4 else 0.5), module
        assert torch.equal(lora.state_dict[f"unet.{module}.lora_A.weight"], down)
        torch.testing.assert_close(lora.state_dict[f"unet.{module}.lora_B.weight"], up * scale)
        assert names[module].weight.shape[0] == up.shape[0] and names[module].weight.shape[1] == down.shape[1]


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0", "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0"),
        ("mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj", "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"),
        ("up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2", "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2"),
        ("up_blocks_1_attentions_0_proj_out", "up_blocks.1.attentions.0.proj_out"),
        ("down_blocks_1_resnets_0_conv_shortcut", "down_blocks.1.resnets.0.conv_shortcut"),
        ("mid_block_resnets_1_time_emb_proj", "mid_block.resnets.1.time_emb_proj"),
        ("down_blocks_2_downsamplers_0_conv", "down_blocks.2.downsamplers.0.conv"),
        ("up_blocks_0_upsamplers_0_conv", "up_blocks.0.upsamplers.0.conv"),
        ("conv_in", "conv_in"),
        ("time_embedding_linear_2", "time_embedding.linear_2"),
        ("down_blocks_0_motion_modules_0_proj_in", None),  # a motion module's: no spatial layer
        ("down_blocks_0_attentions_0_norm", None),
    ],
)
def test_kohya_names_of_the_sd15_unet(name: str, module: str | None) -> None:
    assert convert._kohya_unet_module(name) == module


def test_kohya_loras_it_cannot_apply_are_refused_in_words(tiny_zoo: Path) -> None:
    from safetensors.torch import load_file

    from animatediff_blender.backend.models import zoo

    raw = load_file(tiny_zoo / zoo.KOHYA_ADAPTER)
    one = torch.zeros(4, 8)
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    cases = {
        "made for SDXL": {**raw, "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": one},
        "no layer of SD1.x's CLIP text encoder": {**raw, "lora_te_text_projection.lora_down.weight": one},
        "more than 12 layers": {
            f"{te.replace('_0_', '_12_')}.lora_down.weight": torch.zeros(4, 768),
            f"{te.replace('_0_', '_12_')}.lora_up.weight": torch.zeros(768, 4),
        },
        "text encoder is 1024 wide": {
            f"{te}.lora_down.weight": torch.zeros(4, 1024), f"{te}.lora_up.weight": torch.zeros(1024, 4)
        },
        "LDM UNet": {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": one},
        "LyCORIS": {**raw, "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": one},
        "not understood": {**raw, "lora_unet_down_blocks_0_attentions_0_norm.lora_down.weight": one},
        "lacks its up weight": {
            k: v for k, v in raw.items() if k != "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"
        },
        "do not pair": {**raw, "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(3, 3, 3, 3)},
        "bad alpha": {**raw, "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(float("nan"))},
    }
    # Names that fit SD1.x, shapes of another base: refused at the scan, not on every job.
    to_k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    second = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q"
    proj = "lora_unet_down_blocks_1_attentions_0_proj_in"
    cases |= {
        "cross-attention takes 2048 features": {
            f"{to_k}.lora_down.weight": torch.zeros(4, 2048), f"{to_k}.lora_up.weight": torch.zeros(640, 4)
        },
        "several transformer blocks": {
            f"{second}.lora_down.weight": torch.zeros(4, 640), f"{second}.lora_up.weight": torch.zeros(640, 4)
        },
        "projections are linear": {
            f"{proj}.lora_down.weight": torch.zeros(4, 640), f"{proj}.lora_up.weight": torch.zeros(640, 4)
        },
    }
    for words, sd in cases.items():
        with pytest.raises(ConversionError, match=words):
            convert.lora_to_peft(sd, "spatial")
    with pytest.raises(ConversionError, match="made for another base model"):  # any layout
        peft = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
        convert.lora_to_peft({f"{peft}.lora_A.weight": torch.zeros(4, 1024), f"{peft}.lora_B.weight": torch.zeros(640, 4)},
                             "spatial")
    with pytest.raises(ConversionError, match="outside the motion attention layers"):
        convert.lora_to_peft(raw, "motion")
    with pytest.raises(ConversionError, match="changes the text encoder.*MotionLoRA"):
        convert.lora_to_peft({f"{te}.lora_down.weight": one, f"{te}.lora_up.weight": torch.zeros(8, 4)}, "motion")


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("text_model_encoder_layers_0_self_attn_q_proj", "text_model.encoder.layers.0.self_attn.q_proj"),
        ("text_model_encoder_layers_11_self_attn_out_proj", "text_model.encoder.layers.11.self_attn.out_proj"),
        ("text_model_encoder_layers_3_mlp_fc2", "text_model.encoder.layers.3.mlp.fc2"),
        ("text_model_encoder_layers_3_layer_norm1", None),
        ("text_model_embeddings_token_embedding", None),
    ],
)
def test_kohya_names_of_the_sd15_text_encoder(name: str, module: str | None) -> None:
    assert convert._kohya_te_module(name) == module


def _text_encoder_targets(text_encoder: torch.nn.Module) -> set[str]:
    """The zoo style LoRA's text-encoder modules, named as checkpoints name them."""
    from animatediff_blender.backend.models import zoo

    names = (n for n, _ in text_encoder.named_modules() if zoo.KOHYA_TEXT_ENCODER_TARGETS.search(n))
    return {n if n.startswith("text_model.") else f"text_model.{n}" for n in names}


def test_kohya_style_lora_keeps_its_text_encoder_layers(tiny_zoo: Path, base_folder: loading.BaseComponents) -> None:
    """A style LoRA with `lora_te_` layers (most civitai LoRAs): its UNet layers as before,
    its CLIP layers as `text_encoder.` peft keys (what diffusers routes to the text encoder),
    each up matrix scaled by its layer's alpha / rank; both parts listed apart."""
    from animatediff_blender.backend.models import zoo

    raw = load_file(tiny_zoo / zoo.KOHYA_STYLE_ADAPTER)
    lora = loading.load_domain_adapter(tiny_zoo / zoo.KOHYA_STYLE_ADAPTER)
    assert (lora.source_format, lora.scope, lora.network_alpha, lora.rank) == ("kohya", "spatial", None, 4)
    unet_names = {n for n, _ in base_folder.unet.named_modules()}
    assert lora.target_modules == {n for n in unet_names if zoo.KOHYA_TRANSFORMER_TARGETS.search(n)}
    assert lora.text_encoder_modules == _text_encoder_targets(base_folder.text_encoder)
    assert len(lora.text_encoder_modules) == 6 * 2  # every projection of the tiny CLIP's 2 layers
    assert {k.split(".", 1)[0] for k in lora.state_dict} == {"unet", "text_encoder"}
    for module in lora.text_encoder_modules:
        key = zoo.kohya_text_encoder_key(module)
        down, up = raw[f"{key}.lora_down.weight"], raw[f"{key}.lora_up.weight"]
        scale = float(raw[f"{key}.alpha"]) / down.shape[0]
        assert torch.equal(lora.state_dict[f"text_encoder.{module}.lora_A.weight"], down)
        torch.testing.assert_close(lora.state_dict[f"text_encoder.{module}.lora_B.weight"], up * scale)
    unet_only = {k: v for k, v in raw.items() if k.startswith("lora_unet_")}
    assert convert.lora_to_peft(unet_only, "spatial").text_encoder_modules == set()
    # A LoRA of the text encoder alone is a spatial LoRA too (diffusers loads it; the UNet keeps none).
    te_only = convert.lora_to_peft({k: v for k, v in raw.items() if k.startswith("lora_te_")}, "spatial")
    assert te_only.target_modules == set() and te_only.text_encoder_modules == lora.text_encoder_modules
    assert all(k.startswith("text_encoder.") for k in te_only.state_dict)


def _v2_pipeline(tiny_zoo: Path, b: loading.BaseComponents) -> Any:
    """Stock AnimateDiffPipeline on the zoo's base and v2 motion module (diffusers applies LoRAs to it).
    The text encoder is a copy: a LoRA loaded into the pipeline goes into it in place, and `b`
    is shared by the session's tests (the UNet is copied into a UNetMotionModel anyway)."""
    import copy

    from diffusers import AnimateDiffPipeline, DDIMScheduler

    return AnimateDiffPipeline(
        vae=b.vae,
        text_encoder=copy.deepcopy(b.text_encoder),
        tokenizer=b.tokenizer,
        unet=b.unet,
        motion_adapter=loading.load_motion_adapter(tiny_zoo / "motion/mm_sd_v15_v2.ckpt"),
        scheduler=DDIMScheduler.from_config(b.scheduler_config),
    )


def test_loras_apply_through_diffusers(tiny_zoo: Path, base_folder: loading.BaseComponents) -> None:
    """The state dicts are what AnimateDiffPipeline.load_lora_weights applies, and they change outputs."""
    pipe = _v2_pipeline(tiny_zoo, base_folder)
    pipe.set_progress_bar_config(disable=True)

    def run() -> torch.Tensor:
        out = pipe(
            "a cat",
            num_frames=2,
            height=64,
            width=64,
            num_inference_steps=2,  # with one step DDIM denoises only at t=1, where the UNet barely matters
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        )
        return out.frames

    plain = run()
    motion = loading.load_motion_lora(tiny_zoo / "lora/v2_lora_ZoomIn.ckpt")
    pipe.load_lora_weights(motion.state_dict, adapter_name="zoom")
    loading.verify_lora_applied(pipe.unet, motion, "zoom")
    with_motion = run()
    assert (with_motion - plain).abs().max() > 1e-3

    domain = loading.load_domain_adapter(tiny_zoo / "adapter/v3_sd15_adapter.ckpt")
    pipe.load_lora_weights(domain.state_dict, adapter_name="domain")
    loading.verify_lora_applied(pipe.unet, domain, "domain")
    pipe.set_adapters(["zoom", "domain"], adapter_weights=[1.0, 1.0])
    with_domain = run()
    assert (with_domain - with_motion).abs().max() > 1e-3
    with pytest.raises(ConversionError, match="not applied"):
        loading.verify_lora_applied(pipe.unet, motion, "never-loaded")

    # A style LoRA's text-encoder layers land on the text encoder (flattened or not).
    from peft.tuners.tuners_utils import BaseTunerLayer

    from animatediff_blender.backend.models import zoo

    style = loading.load_domain_adapter(tiny_zoo / zoo.KOHYA_STYLE_ADAPTER)
    pipe.load_lora_weights(style.state_dict, adapter_name="style")
    loading.verify_lora_applied(pipe.unet, style, "style", pipe.text_encoder)
    assert style.text_encoder_modules
    with pytest.raises(ConversionError, match="not applied"):  # "domain" has no text-encoder layers
        loading.verify_lora_applied(pipe.unet, dataclasses.replace(domain, target_modules=set(),
                                    text_encoder_modules=style.text_encoder_modules), "domain", pipe.text_encoder)
    adapted = {n for n, m in pipe.text_encoder.named_modules() if isinstance(m, BaseTunerLayer)}
    assert _text_encoder_targets(pipe.text_encoder) == {
        n if n.startswith("text_model.") else f"text_model.{n}" for n in adapted
    }
    pipe.set_adapters(["zoom", "domain", "style"], adapter_weights=[1.0, 1.0, 1.0])
    assert (run() - with_domain).abs().max() > 1e-3


def _save_peft_lora(path: Path, lora: convert.LoraWeights, config: dict[str, object] | None) -> None:
    """`lora` as diffusers' `save_lora_weights(..., unet_lora_adapter_metadata=config)` writes it."""
    metadata = {"format": "pt"}
    if config is not None:
        prefixed = {f"unet.{k}": v for k, v in config.items()}
        metadata[convert.LORA_ADAPTER_METADATA_KEY] = json.dumps(prefixed, indent=2, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in lora.state_dict.items()}, str(path), metadata=metadata)


def test_peft_lora_takes_its_alpha_from_the_safetensors_header(
    tiny_zoo: Path, base_folder: loading.BaseComponents
) -> None:
    """diffusers' `save_lora_weights` keeps r and lora_alpha in the safetensors header, not in
    the keys; stock `load_lora_weights` scales by alpha / r, and so must the loaders."""
    from safetensors import safe_open

    folder = tiny_zoo / "lora/zoom-in-peft"
    with safe_open(str(folder / "pytorch_lora_weights.safetensors"), "pt") as f:
        header = json.loads((f.metadata() or {})["lora_adapter_metadata"])
    assert (header["unet.r"], header["unet.lora_alpha"]) == (4, 2)
    peft = loading.load_motion_lora(folder)
    zoom = loading.load_motion_lora(tiny_zoo / "lora/v2_lora_ZoomIn.ckpt")
    assert peft.source_format == "peft" and (peft.rank, peft.network_alpha) == (4, 2.0)
    assert peft.state_dict.keys() == zoom.state_dict.keys()
    assert all(torch.equal(v, zoom.state_dict[k]) for k, v in peft.state_dict.items())

    pipe = _v2_pipeline(tiny_zoo, base_folder)
    pipe.load_lora_weights(str(folder), adapter_name="stock")
    for module in peft.target_modules:
        assert pipe.unet.get_submodule(module).scaling["stock"] == peft.network_alpha / peft.rank == 0.5


def test_engine_applies_a_peft_lora_at_the_strength_of_its_header(tiny_zoo: Path) -> None:
    """End to end: the header's alpha 2 at rank 4 makes the LoRA at weight 1 what the same
    weights without a header are at 0.5 (before the fix it ran at full strength)."""
    from animatediff_blender.backend.engine.animatediff import AnimateDiffEngine
    from animatediff_blender.protocol.messages import GenerateRequest, MotionLora

    engine = AnimateDiffEngine(tiny_zoo, device="cpu")

    def frames(lora: str, weight: float) -> list[torch.Tensor]:
        request = GenerateRequest(
            prompt="a cat walking on the beach",
            base_model="base:tiny-sd15",
            motion_module="motion:tiny-motion-adapter-v2",
            motion_loras=[MotionLora(lora, weight)],
            frames=4,
            width=64,
            height=64,
            steps=2,
            seed=3,
            preview_every=0,
        )
        result = engine.generate(request, lambda _p: None, lambda: False)
        return [torch.as_tensor(f).to(torch.int16) for f in result.frames]

    def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> int:
        return max(int((x - y).abs().max()) for x, y in zip(a, b, strict=True))

    peft = frames("lora:zoom-in-peft", 1.0)
    assert max_diff(peft, frames("lora:v2_lora_ZoomIn.ckpt", 0.5)) <= 1
    assert max_diff(peft, frames("lora:v2_lora_ZoomIn.ckpt", 1.0)) > 1


def test_peft_header_variants(tiny_zoo: Path, tmp_path: Path) -> None:
    """What the header may say: rsLoRA's alpha / sqrt(r), a bare UNet's `save_lora_adapter`
    (no `unet.` prefix), the domain adapter; per-module patterns and a wrong r are refused."""
    zoom = loading.load_motion_lora(tiny_zoo / "lora/v2_lora_ZoomIn.ckpt")
    zoom = convert.lora_to_peft(zoom.state_dict, "motion")

    def load(config: dict[str, object] | None, name: str = "x.safetensors") -> convert.LoraWeights:
        _save_peft_lora(tmp_path / name, zoom, config)
        return loading.load_motion_lora(tmp_path / name)

    assert load(None).network_alpha is None  # no header: peft's scale 1
    assert load({"r": 4, "lora_alpha": 8}).network_alpha == 8.0
    assert load({"r": 4, "lora_alpha": 2, "use_rslora": True}).network_alpha == pytest.approx(4.0)  # 2/sqrt(4)*4
    # patterns that repeat the global values change nothing
    assert load({"r": 4, "lora_alpha": 2, "alpha_pattern": {"attn1.to_q": 2}, "rank_pattern": {}}).network_alpha == 2
    bare = tmp_path / "bare.safetensors"
    save_file(
        {k.removeprefix("unet."): v.contiguous() for k, v in zoom.state_dict.items()},
        str(bare),
        metadata={"format": "pt", convert.LORA_ADAPTER_METADATA_KEY: json.dumps({"r": 4, "lora_alpha": 1})},
    )
    assert loading.load_motion_lora(bare).network_alpha == 1.0
    with pytest.raises(ConversionError, match=r"x.safetensors: .*per-module .*alpha_pattern"):
        load({"r": 4, "lora_alpha": 2, "alpha_pattern": {"down_blocks.0.motion_modules.0": 4}})
    with pytest.raises(ConversionError, match="rank_pattern"):
        load({"r": 4, "lora_alpha": 2, "rank_pattern": {"mid_block": 8}})
    with pytest.raises(ConversionError, match="header says rank 8, its weights have rank 4"):
        load({"r": 8, "lora_alpha": 8})
    with pytest.raises(ConversionError, match="lora_alpha"):
        load({"r": 4, "lora_alpha": "two"})
    (tmp_path / "corrupt.safetensors").write_bytes(b"")
    save_file(
        {k: v.contiguous() for k, v in zoom.state_dict.items()},
        str(tmp_path / "corrupt.safetensors"),
        metadata={convert.LORA_ADAPTER_METADATA_KEY: "{not json"},
    )
    with pytest.raises(ConversionError, match="corrupt lora_adapter_metadata"):
        loading.load_motion_lora(tmp_path / "corrupt.safetensors")

    # The domain adapter (a spatial LoRA) reads the same header.
    adapter = loading.load_domain_adapter(tiny_zoo / "adapter/v3_sd15_adapter.ckpt")
    _save_peft_lora(tmp_path / "adapter/pytorch_lora_weights.safetensors", adapter, {"r": 4, "lora_alpha": 1})
    loaded = loading.load_domain_adapter(tmp_path / "adapter")
    assert (loaded.source_format, loaded.rank, loaded.network_alpha) == ("peft", 4, 1.0)


def test_lora_folder_weights_file_rule(tiny_zoo: Path, tmp_path: Path) -> None:
    """The rule the registry shares: the diffusers names first, then the only safetensors."""
    folder = tmp_path / "hub"
    shutil.copytree(tiny_zoo / "lora/motion-lora-zoom-in", folder)
    torch.save(load_file(folder / "diffusion_pytorch_model.safetensors"), folder / "diffusion_pytorch_model.bin")
    assert convert.folder_weights_file(folder, convert.LORA_WEIGHT_NAMES).name == "diffusion_pytorch_model.safetensors"
    assert loading.load_motion_lora(folder).source_format == "diffusers"
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "zoom.safetensors")
    assert convert.folder_weights_file(folder, convert.LORA_WEIGHT_NAMES).name == "zoom.safetensors"
    shutil.copy(folder / "zoom.safetensors", folder / "zoom.fp16.safetensors")
    with pytest.raises(ConversionError, match="hub: expected one weights file in the folder, found 2"):
        loading.load_motion_lora(folder)


def test_pickles_only_with_weights_only(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"x": Evil()}, str(tmp_path / "evil.ckpt"), pickle_module=pickle)
    with pytest.raises(ConversionError, match="evil.ckpt"):
        convert.read_state_dict(tmp_path / "evil.ckpt")
    assert not (tmp_path / "pwned").exists()


def test_old_torch_refuses_pickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.save({"w": torch.zeros(2)}, str(tmp_path / "ok.ckpt"))
    assert set(convert.read_state_dict(tmp_path / "ok.ckpt")) == {"w"}
    monkeypatch.setattr(convert, "_torch_version", lambda: (2, 5))
    with pytest.raises(ConversionError, match="2.10"):
        convert.read_state_dict(tmp_path / "ok.ckpt")
    # safetensors need no pickle and still load
    save_file({"w": torch.zeros(2)}, str(tmp_path / "ok.safetensors"))
    assert set(convert.read_state_dict(tmp_path / "ok.safetensors")) == {"w"}


def test_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "garbage.ckpt").write_bytes(os.urandom(256))
    with pytest.raises(ConversionError, match="garbage.ckpt"):
        convert.read_state_dict(tmp_path / "garbage.ckpt")
    save_file({"w": torch.zeros(1000)}, str(tmp_path / "t.safetensors"))
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated"):
        convert.read_tensor_shapes(tmp_path / "t.safetensors")
    with pytest.raises(ConversionError, match="t.safetensors"):
        convert.read_state_dict(tmp_path / "t.safetensors")
    (tmp_path / "x.onnx").write_bytes(b"")
    with pytest.raises(ConversionError, match="unsupported"):
        convert.read_state_dict(tmp_path / "x.onnx")


def test_every_zoo_lora_loads(tiny_zoo: Path) -> None:
    """All 8 camera MotionLoRAs (and the hub and peft copies, the v3 domain adapter, the
    kohya LCM LoRA and the kohya style LoRA) through the loaders."""
    from animatediff_blender.backend.models.registry import ModelRegistry

    reg = ModelRegistry(tiny_zoo)
    reg.scan()
    loaded = {}
    for entry in reg.entries():
        if entry.kind == "lora":
            loaded[entry.id] = loading.load_motion_lora(entry)
        elif entry.kind == "adapter":
            loaded[entry.id] = loading.load_domain_adapter(entry)
    assert len(loaded) == 13
    zoom_in = loaded["lora:v2_lora_ZoomIn.ckpt"].state_dict
    for model_id, lora in loaded.items():
        assert lora.rank == 4 and all(v.abs().sum() > 0 for v in lora.state_dict.values()), model_id
        if model_id.startswith("lora:v2_lora_") and model_id != "lora:v2_lora_ZoomIn.ckpt":
            assert lora.state_dict.keys() == zoom_in.keys()
            assert any(not torch.equal(v, zoom_in[k]) for k, v in lora.state_dict.items())  # own weights


@pytest.mark.parametrize(
    ("kwargs", "version"),
    [
        ({}, "v2"),
        ({"use_motion_mid_block": False}, "v3"),
        ({"use_motion_mid_block": False, "motion_max_seq_length": 24}, "v1"),
    ],
)
def test_real_size_motion_modules_infer_their_config(kwargs: dict[str, object], version: str) -> None:
    """Real mm_sd_v15_v2 / v3_sd15_mm / mm_sd_v15 shapes (built on the meta device, no memory)."""
    from diffusers import MotionAdapter

    from animatediff_blender.backend.models.zoo import motion_diffusers_to_original

    with torch.device("meta"):
        real = MotionAdapter(**kwargs)  # type: ignore[arg-type]
    original = motion_diffusers_to_original(real.state_dict())
    shapes = {k: tuple(v.shape) for k, v in original.items()}
    assert shapes["down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight"] == (320, 320)
    config = convert.motion_adapter_config(shapes)
    assert config["block_out_channels"] == [320, 640, 1280, 1280]
    for key, value in config.items():
        assert real.config[key] == value or list(real.config[key] or []) == value, key
    assert convert.detect_motion_version(shapes) == version
    assert set(convert.motion_original_to_diffusers(original)) == {
        k for k in real.state_dict() if not k.endswith("pos_embed.pe")
    }


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, non-persistent buffers included."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


@pytest.mark.parametrize(
    ("motion", "dtype"),
    [("motion/tiny-motion-adapter-v2", torch.float32), ("motion/v3_sd15_mm.safetensors", torch.float16)],
)
def test_motion_unet_equals_diffusers_from_unet2d(tiny_zoo: Path, motion: str, dtype: torch.dtype) -> None:
    """Built without random init, the motion UNet is diffusers' from_unet2d exactly (v2 with
    its mid-block module, v3 without), and owns its weights: the UNet2D kept for the next
    motion module and the adapter are never written through it."""
    from diffusers import UNetMotionModel

    base = loading.load_base(tiny_zoo / "base/tiny-sd15", dtype)
    adapter = loading.load_motion_adapter(tiny_zoo / motion, dtype)
    ours = loading.build_motion_unet(base.unet, adapter, "cpu")
    ref = UNetMotionModel.from_unet2d(base.unet, adapter)
    mine, theirs = _tensors(ours), _tensors(ref)
    assert set(mine) == set(theirs)
    for k, v in theirs.items():
        assert mine[k].dtype == v.dtype == dtype and not mine[k].is_meta, k
        assert torch.equal(mine[k], v), k
    assert not ours.training and dict(ours.config) == dict(ref.config)
    sources = {t.data_ptr() for m in (base.unet, adapter) for t in _tensors(m).values()}
    assert not sources & {t.data_ptr() for t in mine.values()}


def test_motion_unet_that_does_not_map_takes_diffusers_path(
    tiny_zoo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A UNet2D with weights the motion UNet has no place for (a class embedding) is built
    by diffusers' from_unet2d, as before, not refused and not half-assigned."""
    from diffusers import UNet2DConditionModel

    base = loading.load_base(tiny_zoo / "base/tiny-sd15")
    config = dict(base.unet.config, class_embed_type="timestep")
    unet = UNet2DConditionModel.from_config(config)
    adapter = loading.load_motion_adapter(tiny_zoo / "motion/tiny-motion-adapter-v2")
    with caplog.at_level("INFO", logger=loading.__name__):
        ours = loading.build_motion_unet(unet, adapter, "cpu")
    assert "diffusers' from_unet2d" in caplog.text
    assert not any(t.is_meta for t in _tensors(ours).values())
    assert torch.equal(ours.conv_in.weight, unet.conv_in.weight)
    assert torch.equal(
        ours.down_blocks[0].motion_modules[0].proj_in.weight,
        adapter.down_blocks[0].motion_modules[0].proj_in.weight,
    )


def test_loaders_skip_random_init(tiny_zoo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No weight is initialised only to be overwritten (the slow part of a real-size load):
    every loader builds its modules with meta parameters and assigns the file's tensors."""
    inits: list[tuple[int, ...]] = []
    real = torch.nn.init.kaiming_uniform_

    def spy(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if not tensor.is_meta:
            inits.append(tuple(tensor.shape))
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", spy)
    base = loading.load_base(tiny_zoo / "base/tiny-sd15-ldm.safetensors")
    adapter = loading.load_motion_adapter(tiny_zoo / "motion/mm_sd_v15_v2.ckpt")
    loading.build_motion_unet(base.unet, adapter, "cpu")
    assert inits == []


def test_corrupted_ckpt_is_refused_not_loaded(tiny_zoo: Path, tmp_path: Path) -> None:
    """torch's zip reader skips CRCs: one flipped byte in a tensor loaded as a wrong weight."""
    src = tiny_zoo / "motion/mm_sd_v15_v2.ckpt"
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("/data/0"))
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # the tensor's bytes (stored, not deflated)
    data[start] ^= 0xFF
    (tmp_path / "bitrot.ckpt").write_bytes(bytes(data))
    with pytest.raises(ConversionError, match="bitrot.ckpt: corrupt checkpoint .*checksum"):
        convert.read_state_dict(tmp_path / "bitrot.ckpt")
    assert convert.read_state_dict(src)  # intact files still load


def test_unusable_pickles_say_why(tmp_path: Path) -> None:
    import argparse

    torch.save({"state_dict": {"w": torch.zeros(2)}, "hparams": argparse.Namespace(lr=1)}, str(tmp_path / "ns.ckpt"))
    with pytest.raises(ConversionError) as info:
        convert.read_state_dict(tmp_path / "ns.ckpt")
    message = str(info.value)
    assert "refused" in message and "argparse.Namespace" in message and ".safetensors" in message
    assert "weights_only" not in message and "\x1b" not in message  # no advice to unpickle, no ANSI codes

    (tmp_path / "zero.ckpt").write_bytes(b"")
    with pytest.raises(ConversionError, match="zero.ckpt: empty file"):
        convert.read_state_dict(tmp_path / "zero.ckpt")
    torch.save({"model": {"w": torch.zeros(2)}}, str(tmp_path / "nested.ckpt"))
    with pytest.raises(ConversionError, match=r"no tensors at the top level \(keys: model\)"):
        convert.read_state_dict(tmp_path / "nested.ckpt")


def test_sdxl_motion_module_is_refused(tmp_path: Path) -> None:
    from diffusers import MotionAdapter

    from animatediff_blender.backend.models.zoo import motion_diffusers_to_original

    xl = MotionAdapter(block_out_channels=[32, 64, 64], motion_norm_num_groups=32, use_motion_mid_block=False)
    save_file(motion_diffusers_to_original(xl.state_dict()), str(tmp_path / "mm_sdxl_v10_beta.safetensors"))
    with pytest.raises(ConversionError, match="not an SD1.5 motion module: 3 down blocks"):
        loading.load_motion_adapter(tmp_path / "mm_sdxl_v10_beta.safetensors")


def _spy_torch_load(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """Records the keyword arguments of every torch.load (diffusers', transformers', ours)."""
    calls: list[dict[str, object]] = []
    real = torch.load

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "load", spy)
    return calls


def test_pickle_only_diffusers_folders_follow_the_pickle_policy(
    pickle_folders: Path, tiny_zoo: Path, base_folder: loading.BaseComponents, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Diffusers folders whose weights are only `.bin` (diffusers' and transformers' own
    torch.load) get the policy of single pickle files: refused below torch 2.10, naming the
    folder and what to do; from 2.10 loaded with weights_only=True."""
    base = pickle_folders / "base/tiny-sd15-bin"
    motion = pickle_folders / "motion/tiny-motion-adapter-v2-bin"

    # torch >= 2.10 (this venv): they load, every torch.load with weights_only=True.
    calls = _spy_torch_load(monkeypatch)
    comps = loading.load_base(base)
    adapter = loading.load_motion_adapter(motion)
    assert len(calls) == 4 and all(c.get("weights_only") is True for c in calls), calls
    for part in ("unet", "vae", "text_encoder"):
        _assert_same_state(getattr(comps, part), getattr(base_folder, part))
    _assert_same_state(adapter, loading.load_motion_adapter(tiny_zoo / "motion/tiny-motion-adapter-v2"))

    # torch < 2.10: refused before anything is unpickled; safetensors folders still load.
    monkeypatch.setattr(convert, "_torch_version", lambda: (2, 5))
    calls.clear()
    with pytest.raises(ConversionError, match=r"tiny-sd15-bin.*2\.10.*safetensors"):
        loading.load_base(base)
    with pytest.raises(ConversionError, match=r"tiny-motion-adapter-v2-bin.*2\.10.*safetensors"):
        loading.load_motion_adapter(motion)
    assert calls == []
    loading.load_base(tiny_zoo / "base/tiny-sd15")
    loading.load_motion_adapter(tiny_zoo / "motion/tiny-motion-adapter-v2")
    # Only the components without safetensors are refused.
    mixed = pickle_folders / "base/mixed"
    shutil.copytree(tiny_zoo / "base/tiny-sd15", mixed)
    shutil.rmtree(mixed / "vae")
    shutil.copytree(base / "vae", mixed / "vae")
    with pytest.raises(ConversionError, match=r"mixed.*vae/diffusion_pytorch_model\.bin"):
        loading.load_base(mixed)
    assert calls == []


def test_pickle_only_diffusers_folder_checks(
    pickle_folders: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder's pickles get the single files' checks: no code runs, corrupt bytes are
    found (torch's zip reader skips the CRCs), and safetensors are never passed over for a
    pickle beside them."""
    base = pickle_folders / "base/tiny-sd15-bin"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    evil = pickle_folders / "base/evil"
    shutil.copytree(base, evil)
    torch.save({"x": Evil()}, str(evil / "vae/diffusion_pytorch_model.bin"), pickle_module=pickle)
    with pytest.raises(ConversionError, match="evil"):
        loading.load_base(evil)
    assert not (tmp_path / "pwned").exists()

    corrupt = pickle_folders / "base/corrupt"
    shutil.copytree(base, corrupt)
    vae_bin = corrupt / "vae/diffusion_pytorch_model.bin"
    with zipfile.ZipFile(vae_bin) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)  # a tensor (stored, not deflated)
    data = bytearray(vae_bin.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0xFF
    vae_bin.write_bytes(bytes(data))
    with pytest.raises(ConversionError, match=r"corrupt.*checksum"):
        loading.load_base(corrupt)

    # Safetensors beside a pickle: the pickle is never read (not even on torch < 2.10).
    both = pickle_folders / "base/both"
    shutil.copytree(base, both)
    shutil.copy(evil / "vae/diffusion_pytorch_model.bin", both / "unet/diffusion_pytorch_model.bin")
    zoo_unet = pickle_folders.parent / "zoo-unet"
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(base / "unet").save_pretrained(zoo_unet, safe_serialization=True)
    shutil.copy(zoo_unet / "diffusion_pytorch_model.safetensors", both / "unet")
    monkeypatch.setattr(convert, "_torch_version", lambda: (2, 5))
    with pytest.raises(ConversionError, match=r"both.*vae/diffusion_pytorch_model\.bin") as info_:
        loading.load_base(both)
    assert "unet" not in str(info_.value)
    assert not (tmp_path / "pwned").exists()


def test_component_pickles_are_what_from_pretrained_would_read(tmp_path: Path) -> None:
    part = tmp_path / "text_encoder"
    part.mkdir()
    (part / "pytorch_model.bin").write_bytes(b"")
    (part / "pytorch_model-00001-of-00002.bin").write_bytes(b"")
    assert [p.name for p in convert.component_pickles(part)] == [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model.bin",
    ]
    (part / "model.fp16.safetensors").write_bytes(b"")
    assert convert.component_pickles(part, "fp16") == []
    assert len(convert.component_pickles(part)) == 2  # no fp32 safetensors: the pickles load
    (part / "model.safetensors.index.json").write_bytes(b"{}")
    assert convert.component_pickles(part) == []
    # transformers loads a weights file named in its config before any other.
    (part / "config.json").write_text(json.dumps({"transformers_weights": "adapter_model.bin"}))
    assert convert.component_pickles(part) == [part / "adapter_model.bin"]
    (part / "config.json").write_text(json.dumps({"transformers_weights": "model.safetensors"}))
    assert convert.component_pickles(part) == []
