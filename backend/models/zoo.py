"""The offline model zoo: a tiny, structurally faithful AnimateDiff model set on disk.

`build_zoo(dest)` writes, deterministically (fixed seeds) and in seconds, every on-disk
format real users have, so that the backend's loaders and key converters
(`convert.py`, `loading.py`) are exercised on the same layouts as real files:

    base/tiny-sd15/                      diffusers StableDiffusionPipeline folder
    base/tiny-sd15-ldm.safetensors       same weights, original LDM/CompVis key names
    base/tiny-sd15-ldm.config/           sidecar diffusers config (+ tokenizer) for it
    motion/tiny-motion-adapter-v2/       diffusers MotionAdapter folder (v2 weights)
    motion/mm_sd_v15_v2.ckpt|.safetensors  original AnimateDiff layout, same v2 weights
    motion/v3_sd15_mm.ckpt|.safetensors    original layout, v3 (no mid block), own weights
    motion/mm_sd_v15.ckpt                  original layout, v1 (max length 24, no mid block)
    lora/v2_lora_<Move>.ckpt             the 8 camera MotionLoRAs, original layout
    lora/motion-lora-zoom-in/            diffusers layout of v2_lora_ZoomIn (as on the hub)
    lora/zoom-in-peft/                   v2_lora_ZoomIn's weights in peft layout, saved by diffusers'
                                         save_lora_weights with r=4, lora_alpha=2 in the header
                                         (as diffusers' training scripts write them): half as strong
    adapter/v3_sd15_adapter.ckpt         v3 domain adapter (LoRA on the spatial attention)
    adapter/AnimateLCM_sd15_t2v_lora.safetensors
                                         kohya LoRA on every linear and conv layer of the UNet's
                                         blocks (AnimateLCM's spatial LoRA and LCM-LoRA are so made),
                                         with per-layer ranks and alphas as a LoCon has them
    adapter/watercolor_style_lora.safetensors
                                         kohya style LoRA as sd-scripts trains one by default: the
                                         UNet's transformer layers and the CLIP text encoder's
                                         (`lora_te_...`) attention and MLP layers
    zoo.json                             manifest: files with size and sha256
    .zoo-marker                          version + config hash; a rebuild happens only when it differs

Run as `python -m animatediff_blender.backend.models.zoo DEST` or `animatediff-blender models zoo DEST`.

`.ckpt` files are written with `torch.save`, whose zip records are byte-stable for the same
tensors; every other file is byte-identical across builds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import struct
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from . import tiny

log = logging.getLogger(__name__)

ZOO_VERSION = "4"
MARKER = ".zoo-marker"
MANIFEST = "zoo.json"

CAMERA_MOVES = (
    "ZoomIn",
    "ZoomOut",
    "PanLeft",
    "PanRight",
    "TiltUp",
    "TiltDown",
    "RollingClockwise",
    "RollingAnticlockwise",
)
LORA_RANK = 4
PEFT_LORA_ALPHA = 2  # of lora/zoom-in-peft: scale alpha / rank = 0.5
KOHYA_LINEAR_ALPHA = 2  # of the kohya adapter's linear layers (rank LORA_RANK): scale 0.5
KOHYA_CONV_RANK, KOHYA_CONV_ALPHA = 2, 1.5  # of its conv layers: scale 0.75
KOHYA_ADAPTER = "adapter/AnimateLCM_sd15_t2v_lora.safetensors"
# Sorts after v3_sd15_adapter.ckpt, which stays the registry's default adapter.
KOHYA_STYLE_ADAPTER = "adapter/watercolor_style_lora.safetensors"
KOHYA_STYLE_UNET_ALPHA = 2  # of its UNet layers (rank LORA_RANK): scale 0.5
KOHYA_STYLE_TE_ALPHA = LORA_RANK  # of its text-encoder layers: scale 1
DIFFUSERS_VERSION = "0.42.1"

# Top-level entries this module owns inside dest (only these are removed on rebuild).
_OWNED = (
    "base/tiny-sd15",
    "base/tiny-sd15-ldm.safetensors",
    "base/tiny-sd15-ldm.config",
    "motion/tiny-motion-adapter-v2",
    "motion/mm_sd_v15_v2.ckpt",
    "motion/mm_sd_v15_v2.safetensors",
    "motion/v3_sd15_mm.ckpt",
    "motion/v3_sd15_mm.safetensors",
    "motion/mm_sd_v15.ckpt",
    *(f"lora/v2_lora_{m}.ckpt" for m in CAMERA_MOVES),
    "lora/motion-lora-zoom-in",
    "lora/zoom-in-peft",
    "adapter/v3_sd15_adapter.ckpt",
    KOHYA_ADAPTER,
    KOHYA_STYLE_ADAPTER,
    MANIFEST,
)

# Words the tiny tokenizer knows as whole tokens (everything else falls back to bytes).
_WORDS = (
    "a cat dog astronaut riding horse on the moon beach sunset forest city street night rain snow "
    "walking running flying car robot girl boy woman man portrait cinematic lighting masterpiece best "
    "quality high detailed photo of in with and camera zoom pan tilt rolling ocean waves fire smoke "
    "mountain river sky clouds bird flower tree blender animation low worst bad blurry"
).split()


# --------------------------------------------------------------------------- helpers


def _marker_value() -> str:
    """Version + hash of everything that determines the zoo's content."""
    payload = json.dumps(
        {
            "version": ZOO_VERSION,
            "unet": tiny.UNET_CONFIG,
            "vae": tiny.VAE_CONFIG,
            "text": tiny.TEXT_ENCODER_CONFIG,
            "sched": tiny.SCHEDULER_CONFIG,
            "motion": [tiny.motion_adapter_config(v) for v in ("v1", "v2", "v3")],
            "words": _WORDS,
            "rank": LORA_RANK,
            "peft_alpha": PEFT_LORA_ALPHA,
        },
        sort_keys=True,
    )
    return f"{ZOO_VERSION}:{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _randomize_zero_weights(module: Any, seed: int) -> None:
    """Give zero-initialised matrices (diffusers zero-inits the motion modules' proj_out)
    small random values, so that motion modules and LoRAs on them change outputs."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in sorted(module.named_parameters()):
            if p.ndim >= 2 and not torch.any(p):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


# --------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: every byte maps to a printable character."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def tokenizer_files() -> tuple[dict[str, int], list[str]]:
    """A small CLIP byte-level BPE vocabulary: the 256-symbol alphabet (with and without
    the `</w>` word end), merges that build `_WORDS`, then the two special tokens."""
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    seen = set(vocab_list)
    for word in _WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        # Merge left to right: ((w o) r) d</w> ...
        while len(symbols) > 1:
            pair = f"{symbols[0]} {symbols[1]}"
            merged = symbols[0] + symbols[1]
            if pair not in merges:
                merges.append(pair)
            if merged not in seen:
                seen.add(merged)
                vocab_list.append(merged)
            symbols = [merged] + symbols[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def write_tokenizer(folder: Path) -> int:
    """Write a CLIPTokenizer folder; returns the vocabulary size."""
    vocab, merges = tokenizer_files()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(
        folder / "tokenizer_config.json",
        {
            **special,
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": 77,
            "do_lower_case": True,
            "errors": "replace",
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": True,
        },
    )
    return len(vocab)


# --------------------------------------------------------------------------- LDM (CompVis) key names


def _unet_diffusers_to_ldm_map(layers_per_block: int = 2, n_blocks: int = 4) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) pairs for the SD1.x UNet (the inverse of diffusers'
    `convert_ldm_unet_checkpoint`, checked by a round-trip test)."""
    pairs: list[tuple[str, str]] = []
    lpb = layers_per_block
    for i in range(n_blocks):
        for j in range(lpb):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(lpb + 1) * i + j + 1}.0."))
            if i < n_blocks - 1:
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(lpb + 1) * i + j + 1}.1."))
        for j in range(lpb + 1):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(lpb + 1) * i + j}.0."))
            if i > 0:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(lpb + 1) * i + j}.1."))
        if i < n_blocks - 1:
            pairs.append(
                (f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(lpb + 1) * (i + 1)}.0.op.")
            )
            pairs.append(
                (f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(lpb + 1) * i + lpb}.{1 if i == 0 else 2}.")
            )
    pairs.append(("mid_block.attentions.0.", "middle_block.1."))
    for j in range(2):
        pairs.append((f"mid_block.resnets.{j}.", f"middle_block.{2 * j}."))
    return pairs


_UNET_LAYERS = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_RESNET = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
)


def unet_to_ldm(sd: dict[str, Any]) -> dict[str, Any]:
    pairs = _unet_diffusers_to_ldm_map(
        tiny.UNET_CONFIG["layers_per_block"], len(tiny.UNET_CONFIG["down_block_types"])
    )
    out: dict[str, Any] = {}
    for key, value in sd.items():
        new = key
        for d, ldm in _UNET_LAYERS.items():
            if key.startswith(d):
                new = ldm + key[len(d) :]
                break
        else:
            for d, ldm in pairs:
                if key.startswith(d):
                    rest = key[len(d) :]
                    if ".resnets." in d:
                        for a, b in _RESNET:
                            if rest.startswith(a):
                                rest = b + rest[len(a) :]
                                break
                    new = ldm + rest
                    break
            else:
                raise KeyError(f"no LDM name for UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(sd: dict[str, Any]) -> dict[str, Any]:
    n = len(tiny.VAE_CONFIG["down_block_types"])
    pairs: list[tuple[str, str]] = [
        ("conv_norm_out.", "norm_out."),
        ("mid_block.attentions.0.", "mid.attn_1."),
    ]
    for i in range(n):
        pairs.append((f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."))
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        pairs.append((f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block."))
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample."))
    for i in range(2):
        pairs.append((f"mid_block.resnets.{i}.", f"mid.block_{i + 1}."))
    attn = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
    out: dict[str, Any] = {}
    for key, value in sd.items():
        new = key.replace("conv_shortcut.", "nin_shortcut.")
        for d, ldm in pairs:
            new = new.replace(d, ldm)
        if ".mid.attn_1." in new:
            for d, ldm in attn.items():
                new = new.replace(".mid.attn_1." + d, ".mid.attn_1." + ldm)
            if value.ndim == 2:  # LDM keeps 1x1 convolutions where diffusers has linears
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def text_encoder_to_ldm(sd: dict[str, Any]) -> dict[str, Any]:
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.`); checkpoints keep it.
    return {
        "cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
        for k, v in sd.items()
    }


# --------------------------------------------------------------------------- motion module layouts


_MM_PREFIX = re.compile(
    r"^((?:down_blocks|up_blocks)\.\d+\.motion_modules\.\d+\.|mid_block\.motion_modules\.\d+\.)(.*)$"
)


def _split_motion_key(key: str) -> tuple[str, str]:
    """`down_blocks.0.motion_modules.1.transformer_blocks.0.attn1.to_q.weight` ->
    (`down_blocks.0.motion_modules.1.`, `transformer_blocks.0.attention_blocks.0.to_q.weight`):
    the motion module's prefix, and the rest with attention blocks under their original names."""
    m = _MM_PREFIX.match(key)
    if not m:
        raise KeyError(f"not a motion module key: {key}")
    rest = re.sub(r"(^|\.)attn1\.", r"\1attention_blocks.0.", m.group(2))
    rest = re.sub(r"(^|\.)attn2\.", r"\1attention_blocks.1.", rest)
    return m.group(1), rest


def motion_diffusers_to_original(sd: dict[str, Any]) -> dict[str, Any]:
    """Diffusers MotionAdapter keys -> original AnimateDiff keys (the inverse of
    `convert.motion_original_to_diffusers`).  Keeps `pos_embed.pe` as `pos_encoder.pe`."""
    out: dict[str, Any] = {}
    for key, value in sd.items():
        module, rest = _split_motion_key(key)
        rest = re.sub(r"\.norm1\.", ".norms.0.", rest)
        rest = re.sub(r"\.norm2\.", ".norms.1.", rest)
        rest = re.sub(r"\.norm3\.", ".ff_norm.", rest)
        if rest.endswith(".pos_embed.pe"):
            # diffusers keeps one table per transformer block; the original one per attention block
            block = rest.removesuffix(".pos_embed.pe")
            for i in (0, 1):
                out[f"{module}temporal_transformer.{block}.attention_blocks.{i}.pos_encoder.pe"] = (
                    value.clone()
                )
            continue
        out[module + "temporal_transformer." + rest] = value
    return out


_ATTENTION_LINEARS = r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
MOTION_LORA_TARGETS = re.compile(r"motion_modules\.\d+\." + _ATTENTION_LINEARS)  # what MotionLoRAs adapt
SPATIAL_LORA_TARGETS = re.compile(r"attentions\.\d+\." + _ATTENTION_LINEARS)  # the v3 domain adapter
# what kohya spatial LoRAs adapt: every linear and conv layer of the UNet's own blocks
KOHYA_SPATIAL_TARGETS = re.compile(
    r"^(?:down_blocks|up_blocks|mid_block)\b.*\.(?:attentions\.\d+\.(?:proj_in|proj_out|"
    r"transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))"
    r"|resnets\.\d+\.(?:conv1|conv2|conv_shortcut|time_emb_proj)|(?:downsamplers|upsamplers)\.0\.conv)$"
)
# what sd-scripts' default LoRA (networks/lora.py) adapts: the linear and 1x1 conv layers of
# the UNet's transformers, and of the CLIP text encoder's attention and MLP
KOHYA_TRANSFORMER_TARGETS = re.compile(
    r"\.attentions\.\d+\.(?:proj_in|proj_out|transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)"
    r"|ff\.net\.0\.proj|ff\.net\.2))$"
)
KOHYA_TEXT_ENCODER_TARGETS = re.compile(r"(?:^|\.)encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")


def _matching_modules(model: Any, pattern: re.Pattern[str]) -> list[str]:
    """Sorted module paths (diffusers names) of `model` that `pattern` finds."""
    return sorted(name for name, _ in model.named_modules() if pattern.search(name))


def _old_lora_key(module: str, part: str) -> str:
    """`...attn1.to_q` -> `...attn1.processor.to_q_lora.down.weight` (the pre-peft
    attention-processor LoRA names used by AnimateDiff's files)."""
    parent, leaf = module.rsplit(".attn", 1)
    attn, proj = leaf.split(".", 1)
    proj = "to_out" if proj == "to_out.0" else proj
    return f"{parent}.attn{attn}.processor.{proj}_lora.{part}.weight"


def _random_lora(
    module_shapes: dict[str, tuple[int, int]], seed: int, rank: int = LORA_RANK
) -> dict[str, Any]:
    """Old-style LoRA dict (diffusers module names) with non-zero up and down weights."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for module in sorted(module_shapes):
        out_f, in_f = module_shapes[module]
        out[_old_lora_key(module, "down")] = torch.randn((rank, in_f), generator=gen) * 0.1
        out[_old_lora_key(module, "up")] = torch.randn((out_f, rank), generator=gen) * 0.1
    return out


# --------------------------------------------------------------------------- builders


def _save_safetensors(sd: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})


def _save_ckpt(obj: Any, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, str(path))


def _build_base(dest: Path) -> tuple[Any, Any]:
    """The base model in both layouts; returns its UNet and text encoder."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = dest / "base" / "tiny-sd15"
    vocab_size = write_tokenizer(folder / "tokenizer")

    torch.manual_seed(1)
    unet = UNet2DConditionModel(**tiny.UNET_CONFIG)
    torch.manual_seed(2)
    vae = AutoencoderKL(**tiny.VAE_CONFIG)
    torch.manual_seed(3)
    text_config = CLIPTextConfig(**tiny.TEXT_ENCODER_CONFIG, vocab_size=vocab_size)
    text_encoder = CLIPTextModel(text_config).eval()

    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    _write_json(
        folder / "scheduler" / "scheduler_config.json",
        {**tiny.SCHEDULER_CONFIG, "_diffusers_version": DIFFUSERS_VERSION},
    )
    _write_json(folder / "model_index.json", _model_index())

    # Same weights as one LDM/CompVis single file, plus the sidecar config it needs.
    single: dict[str, Any] = {}
    single.update(unet_to_ldm(unet.state_dict()))
    single.update(vae_to_ldm(vae.state_dict()))
    single.update(text_encoder_to_ldm(text_encoder.state_dict()))
    _save_safetensors(single, dest / "base" / "tiny-sd15-ldm.safetensors")
    sidecar = dest / "base" / "tiny-sd15-ldm.config"
    for sub in ("unet", "vae", "text_encoder", "scheduler", "tokenizer"):
        for f in sorted((folder / sub).glob("*.json")) + sorted((folder / sub).glob("*.txt")):
            (sidecar / sub).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, sidecar / sub / f.name)
    shutil.copyfile(folder / "model_index.json", sidecar / "model_index.json")
    return unet, text_encoder


def _model_index() -> dict[str, Any]:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _make_adapter(version: str, seed: int) -> Any:
    import torch
    from diffusers import MotionAdapter

    torch.manual_seed(seed)
    adapter = MotionAdapter(**tiny.motion_adapter_config(version))
    _randomize_zero_weights(adapter, seed + 1000)
    return adapter


def original_motion_module(version: str, seed: int) -> dict[str, Any]:
    """A tiny motion module of `version`'s layout ("v1", "v2", "v3") with its own random
    weights, in the original AnimateDiff key names (what `mm_sd_v15_v2.ckpt` holds)."""
    return motion_diffusers_to_original(_make_adapter(version, seed).state_dict())


def write_motion_module(dest: Path, version: str, seed: int) -> None:
    """`original_motion_module` as a .safetensors file: a retrained module, or a distilled one
    (Lightning, LCM) of the same architecture, for tests that replace or add one."""
    _save_safetensors(original_motion_module(version, seed), dest)


def _build_motion(dest: Path) -> Any:
    motion = dest / "motion"
    v2 = _make_adapter("v2", 10)
    v2.save_pretrained(motion / "tiny-motion-adapter-v2", safe_serialization=True)
    original = motion_diffusers_to_original(v2.state_dict())
    _save_ckpt(original, motion / "mm_sd_v15_v2.ckpt")
    _save_safetensors(original, motion / "mm_sd_v15_v2.safetensors")

    v3 = original_motion_module("v3", 20)
    # Real v3 files are sometimes wrapped as {"state_dict": ...}; the loader handles both.
    _save_ckpt({"state_dict": v3}, motion / "v3_sd15_mm.ckpt")
    _save_safetensors(v3, motion / "v3_sd15_mm.safetensors")

    v1 = original_motion_module("v1", 30)
    _save_ckpt(v1, motion / "mm_sd_v15.ckpt")
    return v2


def _build_loras(dest: Path, adapter: Any) -> None:
    shapes = {}
    modules = dict(adapter.named_modules())
    for name in _matching_modules(adapter, MOTION_LORA_TARGETS):
        w = modules[name].weight
        shapes[name] = (int(w.shape[0]), int(w.shape[1]))
    for i, move in enumerate(CAMERA_MOVES):
        old = _random_lora(shapes, seed=100 + i)
        original = motion_diffusers_to_original_lora(old)
        _save_ckpt(original, dest / "lora" / f"v2_lora_{move}.ckpt")
        if move == "ZoomIn":
            # As diffusers' scripts/convert_animatediff_motion_lora_to_diffusers.py writes the
            # hub repos guoyww/animatediff-motion-lora-*: `unet.` + diffusers motion names,
            # attention-processor LoRA suffixes kept.
            hub = {"unet." + k: v for k, v in old.items()}
            _save_safetensors(
                hub, dest / "lora" / "motion-lora-zoom-in" / "diffusion_pytorch_model.safetensors"
            )
            _save_peft_lora(old, sorted(shapes), dest / "lora" / "zoom-in-peft")


def _save_peft_lora(old: dict[str, Any], modules: list[str], folder: Path) -> None:
    """An old-style LoRA dict as diffusers' training scripts save a LoRA: peft keys, and the
    peft config (r, lora_alpha) in the safetensors header, where stock `load_lora_weights`
    reads the scale alpha / r from."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    layers = {}
    for module in modules:
        layers[f"{module}.lora_A.weight"] = old[_old_lora_key(module, "down")].contiguous()
        layers[f"{module}.lora_B.weight"] = old[_old_lora_key(module, "up")].contiguous()
    config = {  # what `unet.peft_config["default"].to_dict()` holds (its set of targets sorted)
        "r": LORA_RANK,
        "lora_alpha": PEFT_LORA_ALPHA,
        "target_modules": modules,
        "alpha_pattern": {},
        "rank_pattern": {},
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": "gaussian",
        "use_dora": False,
        "use_rslora": False,
        "peft_type": "LORA",
    }
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        folder,
        unet_lora_layers=layers,
        unet_lora_adapter_metadata=config,
        weight_name="pytorch_lora_weights.safetensors",
    )
    _sort_safetensors_header(folder / "pytorch_lora_weights.safetensors")


def _sort_safetensors_header(path: Path) -> None:
    """safetensors writes a header's metadata entries in hash order, which changes between
    processes: sort the header so that the file is byte-identical across builds."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # (the writer's alignment of the tensor data)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n :])


def motion_diffusers_to_original_lora(sd: dict[str, Any]) -> dict[str, Any]:
    """Old-style LoRA keys on diffusers motion names -> original v2_lora_*.ckpt keys."""
    out: dict[str, Any] = {}
    for key, value in sd.items():
        module, rest = _split_motion_key(key)
        out[module + "temporal_transformer." + rest] = value
    return out


def _build_domain_adapter(dest: Path, unet: Any) -> None:
    modules = dict(unet.named_modules())
    shapes = {}
    for name in _matching_modules(unet, SPATIAL_LORA_TARGETS):
        w = modules[name].weight
        shapes[name] = (int(w.shape[0]), int(w.shape[1]))
    # AnimateDiff's own loader (animatediff/utils/convert_lora_safetensor_to_diffusers.py,
    # load_diffusers_lora) reads exactly these names, relative to the UNet.
    _save_ckpt(_random_lora(shapes, seed=200), dest / "adapter" / "v3_sd15_adapter.ckpt")


def kohya_spatial_lora(unet: Any, seed: int) -> dict[str, Any]:
    """A kohya LoRA (`lora_unet_<module with _ for .>.lora_down.weight` / `.lora_up.weight` /
    `.alpha`) on every linear and conv layer of `unet`'s own blocks, as AnimateLCM's spatial
    LoRA and LCM-LoRA adapt them.  Like a LoCon, the conv layers get their own rank and alpha
    (rank 2, alpha 1; the linear layers rank 4, alpha 2): the loader must scale each layer."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for name, module in sorted(unet.named_modules()):
        if not KOHYA_SPATIAL_TARGETS.search(name):
            continue
        conv = module.weight.ndim == 4
        rank, alpha = (KOHYA_CONV_RANK, KOHYA_CONV_ALPHA) if conv else (LORA_RANK, KOHYA_LINEAR_ALPHA)
        out.update(_kohya_layer("lora_unet_" + name.replace(".", "_"), module.weight, rank, alpha, gen))
    return out


def _kohya_layer(key: str, w: Any, rank: int, alpha: float, gen: Any) -> dict[str, Any]:
    """One kohya layer (down, up, alpha) with random non-zero weights for the weight `w` of a
    linear or conv layer (whose LoRA down is a conv of its kernel, up a 1x1 conv)."""
    import torch

    if w.ndim == 4:
        down = torch.randn((rank, w.shape[1], *w.shape[2:]), generator=gen) * 0.1
        up = torch.randn((w.shape[0], rank, 1, 1), generator=gen) * 0.1
    else:
        down = torch.randn((rank, w.shape[1]), generator=gen) * 0.1
        up = torch.randn((w.shape[0], rank), generator=gen) * 0.1
    return {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(float(alpha))}


def kohya_text_encoder_key(module: str) -> str:
    """kohya's key stem of a CLIPTextModel layer: `encoder.layers.0.mlp.fc1` (transformers >=
    5.6, flattened) or `text_model.encoder.layers.0.mlp.fc1` -> `lora_te_text_model_encoder_layers_0_mlp_fc1`."""
    return "lora_te_text_model_" + module.removeprefix("text_model.").replace(".", "_")


def kohya_style_lora(unet: Any, text_encoder: Any, seed: int) -> dict[str, Any]:
    """A kohya style LoRA as sd-scripts' default network trains one (most civitai LoRAs):
    `lora_unet_` layers on the UNet's transformers and `lora_te_` layers on the CLIP text
    encoder's attention and MLP, each with rank LORA_RANK and its part's alpha."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for name, module in sorted(unet.named_modules()):
        if KOHYA_TRANSFORMER_TARGETS.search(name):
            key = "lora_unet_" + name.replace(".", "_")
            out.update(_kohya_layer(key, module.weight, LORA_RANK, KOHYA_STYLE_UNET_ALPHA, gen))
    for name, module in sorted(text_encoder.named_modules()):
        if KOHYA_TEXT_ENCODER_TARGETS.search(name):
            out.update(_kohya_layer(kohya_text_encoder_key(name), module.weight, LORA_RANK, KOHYA_STYLE_TE_ALPHA, gen))
    return out


def _build_kohya_adapter(dest: Path, unet: Any) -> None:
    # Under the name AnimateLCM publishes its spatial LoRA, which the `lcm` preset adds.
    _save_safetensors(kohya_spatial_lora(unet, seed=210), dest / KOHYA_ADAPTER)


def _build_kohya_style_adapter(dest: Path, unet: Any, text_encoder: Any) -> None:
    _save_safetensors(kohya_style_lora(unet, text_encoder, seed=220), dest / KOHYA_STYLE_ADAPTER)


def _iter_files(dest: Path) -> Iterable[Path]:
    for owned in _OWNED:
        p = dest / owned
        if p.is_dir():
            yield from sorted(q for q in p.rglob("*") if q.is_file())
        elif p.is_file() and owned != MANIFEST:
            yield p


def _write_manifest(dest: Path) -> None:
    files = [
        {"path": p.relative_to(dest).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in _iter_files(dest)
    ]
    _write_json(dest / MANIFEST, {"zoo_version": ZOO_VERSION, "marker": _marker_value(), "files": files})


def build_zoo(dest: Path, *, force: bool = False) -> Path:
    """Build the tiny model zoo in `dest` (idempotent: a marker file records the version and
    config hash; nothing is rewritten when it matches unless `force`).  Returns `dest`."""
    dest = Path(dest)
    marker = dest / MARKER
    want = _marker_value()
    if not force and marker.is_file() and marker.read_text(encoding="utf-8").strip() == want:
        return dest

    dest.mkdir(parents=True, exist_ok=True)
    # Several test sessions may share one zoo (ANIMATEDIFF_BLENDER_TEST_ZOO): build under a lock.
    with _locked(dest / ".zoo-lock"):
        if not force and marker.is_file() and marker.read_text(encoding="utf-8").strip() == want:
            return dest
        _build(dest, marker, want)
    return dest


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as f:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; builds there are not shared
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _build(dest: Path, marker: Path, want: str) -> None:
    import torch

    t0 = time.monotonic()
    marker.unlink(missing_ok=True)
    for owned in _OWNED:
        p = dest / owned
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for sub in ("base", "motion", "lora", "adapter"):
        (dest / sub).mkdir(exist_ok=True)

    threads = torch.get_num_threads()
    try:
        unet, text_encoder = _build_base(dest)
        v2 = _build_motion(dest)
        _build_loras(dest, v2)
        _build_domain_adapter(dest, unet)
        _build_kohya_adapter(dest, unet)
        _build_kohya_style_adapter(dest, unet, text_encoder)
    finally:
        torch.set_num_threads(threads)
    _write_manifest(dest)
    marker.write_text(want + "\n", encoding="utf-8")
    log.info("built model zoo in %s (%.1f s)", dest, time.monotonic() - t0)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m animatediff_blender.backend.models.zoo")
    parser.add_argument("dest", type=Path)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    print(build_zoo(args.dest, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
