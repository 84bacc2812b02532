"""The offline zoo: layouts as real users have them, deterministic, idempotent, fast."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from animatediff_blender.backend.models import zoo
from animatediff_blender.backend.models.fetch import verify


def _keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    return list(obj.get("state_dict", obj))


def _hashes(dest: Path) -> dict[str, str]:
    return {f["path"]: f["sha256"] for f in json.loads((dest / "zoo.json").read_text())["files"]}


def test_build_is_fast_deterministic_and_idempotent(tiny_zoo: Path, tmp_path: Path) -> None:
    dest = tmp_path / "zoo"
    t0 = time.monotonic()
    zoo.build_zoo(dest)
    assert time.monotonic() - t0 < 20
    # Same bytes as the session's zoo, built independently (including the .ckpt pickles).
    assert _hashes(dest) == _hashes(tiny_zoo)
    assert len(_hashes(dest)) > 30

    # Second call: marker matches, nothing is rewritten.
    mtimes = {p: p.stat().st_mtime_ns for p in dest.rglob("*") if p.is_file()}
    t0 = time.monotonic()
    assert zoo.build_zoo(dest) == dest
    assert time.monotonic() - t0 < 1
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*") if p.is_file()} == mtimes

    # A stale marker (other version) or force rebuilds, to the same content; user files survive.
    (dest / "motion" / "user_model.safetensors").write_bytes(b"mine")
    (dest / zoo.MARKER).write_text("0:old\n")
    (dest / "lora" / "v2_lora_ZoomIn.ckpt").write_bytes(b"damaged")
    zoo.build_zoo(dest)
    assert _hashes(dest) == _hashes(tiny_zoo)
    zoo.build_zoo(dest, force=True)
    assert _hashes(dest) == _hashes(tiny_zoo)
    assert (dest / "motion" / "user_model.safetensors").read_bytes() == b"mine"


def test_manifest_matches_files(tiny_zoo: Path) -> None:
    result = verify(tiny_zoo)
    assert result.problems == []
    listed = set(_hashes(tiny_zoo))
    on_disk = {
        p.relative_to(tiny_zoo).as_posix()
        for p in tiny_zoo.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.name != "zoo.json"
    }
    assert listed == on_disk


def test_layout_has_every_format(tiny_zoo: Path) -> None:
    expected = [
        "base/tiny-sd15/model_index.json",
        "base/tiny-sd15/unet/diffusion_pytorch_model.safetensors",
        "base/tiny-sd15/vae/diffusion_pytorch_model.safetensors",
        "base/tiny-sd15/text_encoder/model.safetensors",
        "base/tiny-sd15/tokenizer/vocab.json",
        "base/tiny-sd15/tokenizer/merges.txt",
        "base/tiny-sd15/scheduler/scheduler_config.json",
        "base/tiny-sd15-ldm.safetensors",
        "base/tiny-sd15-ldm.config/unet/config.json",
        "base/tiny-sd15-ldm.config/tokenizer/vocab.json",
        "motion/tiny-motion-adapter-v2/config.json",
        "motion/tiny-motion-adapter-v2/diffusion_pytorch_model.safetensors",
        "motion/mm_sd_v15_v2.ckpt",
        "motion/mm_sd_v15_v2.safetensors",
        "motion/v3_sd15_mm.ckpt",
        "motion/v3_sd15_mm.safetensors",
        "motion/mm_sd_v15.ckpt",
        "lora/motion-lora-zoom-in/diffusion_pytorch_model.safetensors",
        "lora/zoom-in-peft/pytorch_lora_weights.safetensors",
        "adapter/v3_sd15_adapter.ckpt",
        zoo.KOHYA_ADAPTER,
        zoo.KOHYA_STYLE_ADAPTER,
    ] + [f"lora/v2_lora_{m}.ckpt" for m in zoo.CAMERA_MOVES]
    for rel in expected:
        assert (tiny_zoo / rel).is_file(), rel
    index = json.loads((tiny_zoo / "base/tiny-sd15/model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]


def test_original_key_names(tiny_zoo: Path) -> None:
    """The files carry the names real community/official files have."""
    mm = set(_keys(tiny_zoo / "motion/mm_sd_v15_v2.ckpt"))
    prefix = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0."
    for suffix in (
        "attention_blocks.0.to_q.weight",
        "attention_blocks.1.to_out.0.bias",
        "attention_blocks.0.pos_encoder.pe",
        "attention_blocks.1.pos_encoder.pe",
        "norms.0.weight",
        "norms.1.bias",
        "ff_norm.weight",
        "ff.net.0.proj.weight",
        "ff.net.2.weight",
    ):
        assert prefix + suffix in mm, suffix
    assert "down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight" in mm
    assert any(k.startswith("mid_block.motion_modules.0.") for k in mm)
    assert set(_keys(tiny_zoo / "motion/mm_sd_v15_v2.safetensors")) == mm
    assert not any(k.startswith("mid_block.") for k in _keys(tiny_zoo / "motion/v3_sd15_mm.ckpt"))
    wrapped = torch.load(str(tiny_zoo / "motion/v3_sd15_mm.ckpt"), weights_only=True)
    assert set(wrapped) == {"state_dict"}  # the wrapped variant some real files use

    lora = _keys(tiny_zoo / "lora/v2_lora_PanLeft.ckpt")
    assert (
        "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0."
        "attention_blocks.0.processor.to_q_lora.down.weight" in lora
    )
    assert any(".processor.to_out_lora.up.weight" in k for k in lora)
    assert any(k.startswith("mid_block.") for k in lora)
    assert not any(k.startswith("unet.") for k in lora)
    hub = _keys(tiny_zoo / "lora/motion-lora-zoom-in/diffusion_pytorch_model.safetensors")
    assert all(k.startswith("unet.") and ".attn" in k and "_lora." in k for k in hub)
    # diffusers' save_lora_weights: peft keys, r and lora_alpha in the header, not in the keys
    peft = tiny_zoo / "lora/zoom-in-peft/pytorch_lora_weights.safetensors"
    assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in _keys(peft))
    with safe_open(str(peft), "pt") as f:
        config = json.loads((f.metadata() or {})["lora_adapter_metadata"])
    assert (config["unet.r"], config["unet.lora_alpha"]) == (zoo.LORA_RANK, zoo.PEFT_LORA_ALPHA)

    adapter = _keys(tiny_zoo / "adapter/v3_sd15_adapter.ckpt")
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight" in adapter
    assert any(k.startswith("mid_block.attentions.0.") for k in adapter)
    # a kohya style LoRA: sd-scripts' names for the UNet's and the CLIP text encoder's layers
    style = set(_keys(tiny_zoo / zoo.KOHYA_STYLE_ADAPTER))
    for stem in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
                 "lora_te_text_model_encoder_layers_1_self_attn_out_proj", "lora_te_text_model_encoder_layers_0_mlp_fc2"):  # fmt: skip
        assert {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"} <= style, stem

    ldm = _keys(tiny_zoo / "base/tiny-sd15-ldm.safetensors")
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in ldm
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in ldm
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in ldm


def test_lora_weights_are_nonzero(tiny_zoo: Path) -> None:
    sd = torch.load(str(tiny_zoo / "lora/v2_lora_TiltUp.ckpt"), weights_only=True)
    assert all(v.abs().sum() > 0 for v in sd.values())
    other = torch.load(str(tiny_zoo / "lora/v2_lora_TiltDown.ckpt"), weights_only=True)
    assert any(not torch.equal(sd[k], other[k]) for k in sd)


def test_tokenizer_is_a_working_clip_tokenizer(tiny_zoo: Path) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_zoo / "base/tiny-sd15/tokenizer", local_files_only=True)
    config = json.loads((tiny_zoo / "base/tiny-sd15/text_encoder/config.json").read_text())
    assert len(tok) == config["vocab_size"]
    ids = tok("A cat, on the MOON!").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:3]) == ["a</w>", "cat</w>"]
    # Unknown words fall back to byte-level pieces rather than failing.
    assert len(tok("zqxj").input_ids) > 2
    padded = tok("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77


def test_cli_builds_zoo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from animatediff_blender.backend.cli import main

    assert main(["models", "zoo", str(tmp_path / "z"), "--force"]) == 0
    assert (tmp_path / "z" / zoo.MARKER).is_file()
    assert str(tmp_path / "z") in capsys.readouterr().out
