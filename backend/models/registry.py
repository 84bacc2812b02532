"""The model registry: what is in the models directory, under which id.

    ModelRegistry(models_dir).scan() -> list[ModelInfo]       (protocol/messages.py)
    ModelRegistry(models_dir).get("motion:mm_sd_v15_v2.ckpt") -> RegistryEntry
    ModelRegistry(models_dir).default_ids() -> {"base": ..., "motion": ...}

Layout: `<models>/base/`, `motion/`, `lora/`, `adapter/`; each file or folder directly in
one of them is an entry with id `kind:name` (name = file name with extension, or folder
name).  Safetensors files dropped at the top level are classified by their keys.  Clients
only ever name ids: `get()` accepts nothing but an id of the last scan, so no request can
reach a path outside the models directory.

Every entry's version and layout are detected from its keys (safetensors headers are read
without loading tensors; pickles through `torch.load(weights_only=True)`, those over
PICKLE_SCAN_LIMIT without their tensors), and files that cannot be used are listed with
`ok=False` and the reason instead of stopping the scan (for a model in the wrong kind folder:
which folder it belongs in; for a file of no kind used here, such as a VAE on its own or an
embedding: what it is).

Camera motions: only v2 MotionLoRAs under an official name (`v2_lora_ZoomIn.ckpt`, optionally
`mm_sd15_`-prefixed or converted to `.safetensors`; the hub folders `animatediff-motion-lora-
zoom-in`, also without `animatediff-`) carry `camera_motion`; a user's `zoomin_mix.ckpt` is an
ordinary LoRA.

Order of the model list (`scan`, `infos`, `entries`; the engine's `list_models`): by kind
(base, motion, lora, adapter), then the camera-motion LoRAs by move, the names exactly as
published (`v2_lora_<Move>.ckpt`, `animatediff-motion-lora-<move>`) before other official
ones, then every other entry by id.  Clients that need one LoRA for a camera move (the add-on)
take the first entry with that `camera_motion` in this order.  Entries of one kind never share
a label: colliding labels get the file suffix, format or name added.

Content hashes (sha256 of the file, or of a folder's files in sorted order, hidden ones aside;
"" for entries that cannot be used, which are not read whole) and detection results are cached in `<models>/.registry-cache.json` by (path, size, mtime, inode, ctime),
so rescans only re-read what changed.  `is_current(entry)` compares an entry's files with that
signature again (a stat each, nothing read): how a user of the entry learns that a file
was replaced under its name since the scan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from animatediff_blender.protocol.messages import MODEL_ID_PATTERN, ModelInfo, model_id_name

from .convert import (
    EMBEDDINGS_UNSUPPORTED,
    LORA_WEIGHT_NAMES,
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    WEIGHT_SUFFIXES,
    ConversionError,
    check_folder_pickles_allowed,
    check_pickle_allowed,
    check_sd15_motion_blocks,
    check_zip_complete,
    component_pickles,
    detect_motion_version,
    diffusers_variant,
    folder_weights_file,
    lora_format,
    motion_adapter_config,
    motion_layout,
    names_lcm,
    pickles_allowed,
    read_lora,
    read_pickle_shapes,
    read_state_dict,
    read_tensor_shapes,
)

log = logging.getLogger(__name__)

KINDS = ("base", "motion", "lora", "adapter")
CACHE_FILE = ".registry-cache.json"
STALE_CACHE_TMP_S = 3600.0  # a cache write's temporary file older than this was abandoned
# Cached detection results are only valid for the code that produced them.
CACHE_VERSION = hashlib.sha256(
    b"".join(Path(m).read_bytes() for m in (__file__, Path(__file__).with_name("convert.py")))
).hexdigest()[:16]
# Above this size a pickle is not loaded at scan time (a 4 GB base checkpoint would otherwise
# be unpickled on every new file): its zip structure is checked, and a base checkpoint's keys
# and shapes are read without its tensors; loading checks the rest.
PICKLE_SCAN_LIMIT = 512 * 1024 * 1024

# The 8 official MotionLoRAs: official name -> label.
CAMERA_MOTIONS = {
    "ZoomIn": "Zoom in",
    "ZoomOut": "Zoom out",
    "PanLeft": "Pan left",
    "PanRight": "Pan right",
    "TiltUp": "Tilt up",
    "TiltDown": "Tilt down",
    "RollingClockwise": "Rolling clockwise",
    "RollingAnticlockwise": "Rolling anticlockwise",
}
# Only the official names carry a camera motion (a user's "zoomin_mix.ckpt" is a LoRA of its
# own): guoyww/animatediff's `v2_lora_<Move>.ckpt` (also seen with a `mm_sd15_` prefix) and the
# hub repos `animatediff-motion-lora-<move>` (`models fetch` folders; the zoo's `motion-lora-zoom-in`).
_CAMERA_FILE_RX = re.compile(r"^(?:mm_sd15_|mm_sd_v15_)?v2_lora_(?P<move>[a-z]+)$", re.IGNORECASE)
_CAMERA_HUB_RX = re.compile(r"^(?:animatediff-)?motion-lora-(?P<move>[a-z-]+)$", re.IGNORECASE)
_CAMERA_BY_NAME = {m.lower(): m for m in CAMERA_MOTIONS} | {
    re.sub(r"(?<!^)(?=[A-Z])", "-", m).lower(): m for m in CAMERA_MOTIONS  # "ZoomIn" -> "zoom-in"
}
# The names exactly as published (the original file, the `models fetch` folder): listed first.
_CAMERA_PUBLISHED_RX = re.compile(r"^v2_lora_[A-Za-z]+\.ckpt$|^animatediff-motion-lora-[a-z-]+$")

_ID_RX = re.compile(MODEL_ID_PATTERN)


class UnknownModel(KeyError):
    """No usable model has this id (unknown, malformed, or listed as broken)."""

    def __init__(self, model_id: object, reason: str = "") -> None:
        super().__init__(model_id)
        self.model_id = model_id
        self.reason = reason or "no such model in the registry"

    def __str__(self) -> str:
        return f"{self.model_id!r}: {self.reason}"


@dataclass
class RegistryEntry:
    id: str
    kind: str  # base | motion | lora | adapter
    format: str  # diffusers | single_file | original | peft
    version: str  # v1 v2 v3 lightning lcm (motion), sd15 / tiny (base), v2 (lora), v3 (adapter)
    path: Path
    label: str
    size: int
    sha256: str
    camera_motion: str = ""
    ok: bool = True
    error: str = ""
    # [relative name, size, mtime_ns, inode, ctime_ns] per file at scan time (see _signature,
    # is_current); not sent to clients.
    signature: list[list[Any]] = field(default_factory=list)

    def to_info(self) -> ModelInfo:
        return ModelInfo(
            id=self.id,
            kind=self.kind,  # type: ignore[arg-type]
            format=self.format,
            label=self.label,
            version=self.version,
            size_bytes=self.size,
            sha256=self.sha256,
            ok=self.ok,
            error=self.error,
            camera_motion=self.camera_motion,
        )


def _stem(name: str) -> str:
    for suffix in WEIGHT_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def camera_motion_of(name: str) -> str:
    """The camera move ("PanLeft") of an official MotionLoRA file or folder name
    ("v2_lora_PanLeft.ckpt", "animatediff-motion-lora-pan-left"), or "" for any other name."""
    stem = _stem(name)
    m = _CAMERA_FILE_RX.match(stem) or _CAMERA_HUB_RX.match(stem)
    return _CAMERA_BY_NAME.get(m.group("move").lower(), "") if m else ""


def is_valid_id(model_id: object) -> bool:
    return (
        isinstance(model_id, str)
        and len(model_id) <= 180
        and _ID_RX.fullmatch(model_id) is not None
        and ".." not in model_id
        and "/" not in model_id
        and "\\" not in model_id
    )


# --------------------------------------------------------------------------- hashing


def _files_of(path: Path) -> list[Path]:
    """A file itself; a folder's files, but not hidden ones or those in hidden folders: no loader
    reads them, and huggingface_hub rewrites its `.cache/huggingface/download/*.metadata` in
    every folder that `models fetch` fills at each rerun (Finder adds `.DS_Store`)."""
    if path.is_file():
        return [path]
    files = (p for p in path.rglob("*") if not any(part.startswith(".") for part in p.relative_to(path).parts))
    return sorted((p for p in files if p.is_file()), key=lambda p: p.relative_to(path).as_posix())


def _signature(path: Path) -> list[list[Any]]:
    """[relative name, size, mtime_ns, inode, ctime_ns] per file.  Size and mtime alone miss a
    file replaced by one of the same size with its mtime kept (`cp --preserve=timestamps`,
    `rsync -t`, a rename over it): a rename gives another inode, and any write, rename or
    utime sets the change time, which no user tool can set back."""
    out = []
    for p in _files_of(path):
        st = p.stat()
        rel = p.relative_to(path).as_posix() if p != path else ""
        out.append([rel, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns])
    return out


def content_sha256(path: Path) -> str:
    """sha256 of a file; for a folder, of each file's relative name and bytes in sorted order."""
    h = hashlib.sha256()
    for p in _files_of(path):
        if p != path:
            h.update(p.relative_to(path).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- inspection


@dataclass
class _Detected:
    kind: str
    format: str
    version: str
    ok: bool = True
    error: str = ""


def _check_pickle(path: Path) -> None:
    """The scan's check of a pickle too large to unpickle there: the policy and the zip structure."""
    import zipfile

    check_pickle_allowed(f"{path.name} (a pickle checkpoint)")
    check_zip_complete(path)
    if not zipfile.is_zipfile(path):
        raise ConversionError(f"{path.name}: not a torch checkpoint (no zip archive)")
    with zipfile.ZipFile(path) as zf:
        if not any(n.endswith("data.pkl") for n in zf.namelist()):
            raise ConversionError(f"{path.name}: not a torch checkpoint (no data.pkl)")


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """key -> shape: a safetensors file's header; a pickle through `torch.load(weights_only=True)`,
    above PICKLE_SCAN_LIMIT its pickle alone, the tensors mapped onto the meta device (a 1.8 GB
    mm_sd_v15_v2.ckpt or AnimateLCM_sd15_t2v.ckpt is not loaded whole to read its keys)."""
    if _is_large_pickle(path):
        shapes = _large_pickle_shapes(path)
        if shapes is not None:
            return shapes
        # (torch cannot map it, a legacy pickle: loaded, as below the limit)
    return read_tensor_shapes(path)


def _is_large_pickle(path: Path) -> bool:
    """A pickle file too large to unpickle whole at scan time."""
    return path.suffix.lower() in PICKLE_SUFFIXES and path.stat().st_size > PICKLE_SCAN_LIMIT


def _large_pickle_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """A large pickle's key -> shape from its pickle alone (the tensors mapped onto the meta
    device), after the checks of `_check_pickle`; None when torch cannot map it (a legacy
    pickle).  ConversionError for refused pickle code: the loader refuses it too."""
    _check_pickle(path)
    try:
        return read_pickle_shapes(path)
    except ConversionError:
        raise
    except Exception as exc:
        log.info("cannot read the shapes of %s without loading it: %s", path, exc)
        return None


def _check_folder_pickles(folder: Path, pickles: list[Path]) -> None:
    """A diffusers folder's pickle weights (those its loader would read) get the checks of
    single pickle files: the torch >= 2.10 policy, then restricted unpickling and CRCs
    (`read_state_dict`), or above PICKLE_SCAN_LIMIT the zip structure only."""
    check_folder_pickles_allowed(folder, pickles)
    for p in pickles:
        rel = p.relative_to(folder).parent.as_posix()
        try:
            if p.stat().st_size > PICKLE_SCAN_LIMIT:
                _check_pickle(p)
            else:
                read_state_dict(p)
        except ConversionError as exc:
            raise ConversionError(f"{rel}/{exc}" if rel != "." else str(exc)) from exc


def _read_config(path: Path) -> dict[str, Any]:
    """A JSON object from a config file (a half-written or foreign one is a reason, not a crash)."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConversionError(f"{path.parent.name}/{path.name}: not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path.parent.name}/{path.name}: not a JSON object")
    return cfg


def _not_text_to_image(in_channels: Any) -> str:
    # Inpainting (9: latents + mask + masked image) or depth (5) UNets load, then fail at
    # their first step: say so at the scan.
    return (
        f"not a text-to-image model: its UNet takes {in_channels} input channels, not 4 "
        "(an inpainting or depth model?)"
    )


def _inspect_base(path: Path) -> _Detected:
    if path.is_dir():
        index = path / "model_index.json"
        unet_cfg = path / "unet" / "config.json"
        if not index.is_file() or not unet_cfg.is_file():
            return _Detected(
                "base",
                "diffusers",
                "",
                False,
                "not a diffusers pipeline folder (no model_index.json or unet/)",
            )
        unet = _read_config(unet_cfg)
        if unet.get("in_channels", 4) != 4:
            return _Detected("base", "diffusers", "", False, _not_text_to_image(unet.get("in_channels")))
        cad = unet.get("cross_attention_dim")
        # Wider, or per-block lists: not SD1.x's UNet.
        if cad is not None and (not isinstance(cad, int) or cad > 768):
            return _Detected("base", "diffusers", "", False, f"not an SD1.x model (cross_attention_dim {cad})")
        variant = diffusers_variant(path)
        pickles = []
        for sub in ("unet", "vae", "text_encoder"):
            if (path / sub).is_dir():  # (the loader says which is missing)
                pickles += component_pickles(path / sub, variant)
        _check_folder_pickles(path, pickles)
        return _Detected("base", "diffusers", "sd15" if cad in (None, 768) else "tiny")
    if _is_large_pickle(path):
        large = _large_pickle_shapes(path)
        if large is None:  # torch cannot map it: listed, but unchecked (not loaded whole either)
            return _Detected("base", "single_file", "")  # "" (unchecked): default_ids prefers checked bases
        shapes = large
    else:
        shapes = _shapes(path)
    return _Detected("base", "single_file", _base_version(shapes))


def _base_version(shapes: dict[str, tuple[int, ...]]) -> str:
    """"sd15" or "tiny" (the zoo) for an SD1.x single-file checkpoint's key -> shape; raises for
    other models (SDXL, SD2, inpainting, no UNet) and for checkpoints the single-file loader
    cannot build a pipeline from (no VAE or no text encoder in them)."""
    unet = {k: s for k, s in shapes.items() if k.startswith("model.diffusion_model.")}
    if not unet:
        raise ConversionError("not an SD1.x single-file checkpoint (no model.diffusion_model.* keys)")
    # SDXL (base and refiner) keeps its text encoders under conditioner.* and has a class
    # embedding for its size conditioning, also in UNet-only exports without conditioner.*;
    # its first level has no attention, so it has no cross-attention width where SD1.x has one.
    if any(k.startswith("conditioner.") for k in shapes) or any(".label_emb." in k for k in unet):
        raise ConversionError("SDXL checkpoints are not supported (AnimateDiff here is SD1.5)")
    conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        raise ConversionError(_not_text_to_image(conv_in[1]))
    widths = {s[1] for k, s in unet.items() if k.endswith(".attn2.to_k.weight") and len(s) == 2}
    cad = max(widths) if widths else None
    if cad is not None and cad > 768:
        raise ConversionError(f"not an SD1.x checkpoint (cross-attention width {cad}: an SD2.x model?)")
    # The loader builds the VAE and the CLIP text encoder from the checkpoint too.
    if not any(k.startswith(("first_stage_model.", "vae.")) for k in shapes):
        raise ConversionError(
            "the checkpoint has no VAE (no first_stage_model.* keys: a UNet-only or no-VAE file), and a "
            "single-file base model must have its VAE baked in: use a version of it with its VAE"
        )
    if not any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        raise ConversionError(
            "the checkpoint has no text encoder (no cond_stage_model.transformer.* keys: a UNet-only "
            "file?), and a single-file base model must hold its CLIP text encoder"
        )
    return "sd15" if cad in (None, 768) else "tiny"


def _foreign_file(keys: Iterable[str]) -> str:
    """What a weights file that is no model of a kind used here is, from its keys ("a VAE on
    its own: ..."), or "" when it is none of these."""
    keys = set(keys)
    if keys and keys <= {"emb_params", "clip_l", "clip_g"}:  # A1111 / SDXL embeddings
        return f"a textual-inversion embedding ({EMBEDDINGS_UNSUPPORTED})"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return ""
    if any(k.startswith(("control_model.", "controlnet_cond_embedding.")) for k in keys):
        return "a ControlNet: ControlNets are not supported"
    vae_parts = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "first_stage_model.", "vae.")
    if any(k.endswith("decoder.conv_in.weight") for k in keys) and all(
        k.startswith((*vae_parts, "loss.", "model_ema.")) for k in keys
    ):
        return (
            "a VAE on its own: separate VAE files are not supported (a single-file checkpoint with "
            "its VAE baked in is, or a diffusers folder)"
        )
    if {"conv_in.weight", "time_embedding.linear_1.weight"} <= keys:
        return (
            "the UNet of a diffusers folder on its own: put the whole diffusers folder (model_index.json, "
            "unet/, vae/, text_encoder/, tokenizer/, scheduler/) into base/"
        )
    return ""


def _inspect_motion(path: Path) -> _Detected:
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ConversionError("motion adapter folder lacks config.json")
        cfg = _read_config(cfg_file)
        if cfg.get("_class_name", "MotionAdapter") != "MotionAdapter":
            raise ConversionError(f"folder holds a {cfg.get('_class_name')}, not a MotionAdapter")
        widths = cfg.get("block_out_channels", (320, 640, 1280, 1280))
        check_sd15_motion_blocks(len(widths) if isinstance(widths, (list, tuple)) else 0)
        weights = [p for p in path.iterdir() if p.suffix.lower() in WEIGHT_SUFFIXES and p.is_file()]
        if not weights:
            raise ConversionError("motion adapter folder has no weights file")
        if not any(p.suffix.lower() in SAFETENSORS_SUFFIXES for p in weights):
            _check_folder_pickles(path, sorted(weights))  # what the loader would read
        name = path.name.lower()
        if "lightning" in name:
            version = "lightning"
        elif "lcm" in name:
            version = "lcm"
        elif cfg.get("use_motion_mid_block", True):
            version = "v2"
        else:
            version = "v1" if cfg.get("motion_max_seq_length", 32) == 24 else "v3"
        return _Detected("motion", "diffusers", version)
    shapes = _shapes(path)
    layout = motion_layout(shapes)
    motion_adapter_config(shapes)  # raises for modules the loader could not build (SDXL ones)
    return _Detected("motion", layout, detect_motion_version(shapes, path.name))


def _lora_file(path: Path) -> Path:
    # The loaders' rule (a hub folder may also hold a .bin copy or an fp16 variant).
    return path if path.is_file() else folder_weights_file(path, LORA_WEIGHT_NAMES)


def _inspect_lora(path: Path, kind: str) -> _Detected:
    file = _lora_file(path)
    if file.suffix.lower() in SAFETENSORS_SUFFIXES or _is_large_pickle(file):
        # From the keys first (a header, or a large pickle's keys alone): a multi-GB checkpoint
        # in the wrong folder is not loaded to find that it is no LoRA.
        lora_format(_shapes(file))
    lora = read_lora(file, "motion" if kind == "lora" else "spatial")
    if kind == "lora":
        has_mid = any(m.startswith("mid_block.") for m in lora.target_modules)
        return _Detected(kind, lora.source_format, "v2" if has_mid else "")
    # A spatial LoRA named for (Animate)LCM is the `lcm` preset's companion ("adapter_lcm");
    # the others are domain adapters in AnimateDiff v3's sense.
    return _Detected(kind, lora.source_format, "lcm" if names_lcm(path.name) else "v3")


# Folders other tools keep models in (AUTOMATIC1111, ComfyUI, AnimateDiff's own repository),
# lowercased -> the folder here their files belong in.
_OTHER_LAYOUTS = {
    "stable-diffusion": "base", "stable_diffusion": "base", "checkpoints": "base", "checkpoint": "base",
    "sd": "base", "models": "base", "diffusers": "base",
    "motion_module": "motion", "motion_modules": "motion", "motion-module": "motion", "motion-modules": "motion",
    "animatediff_models": "motion", "animatediff": "motion", "motionmodule": "motion",
    "motion_lora": "lora", "motion_loras": "lora", "motion-lora": "lora", "motionlora": "lora",
    "animatediff_motion_lora": "lora",
}


def _holds_models(folder: Path, depth: int = 2) -> bool:
    """A weights file or a diffusers model folder within `depth` levels (hidden ones aside)."""
    try:
        for child in folder.iterdir():
            if child.name.startswith("."):
                continue
            if child.is_file() and (child.suffix.lower() in WEIGHT_SUFFIXES or child.name == "model_index.json"):
                return True
            if depth > 1 and child.is_dir() and _holds_models(child, depth - 1):
                return True
    except OSError:  # unreadable: nothing to say about it
        return False
    return False


def _stray_folder_reason(name: str) -> str:
    """Why a folder at the top of the models directory that holds models is not scanned, and
    where its files go."""
    lower = name.lower()
    where = (
        "the models directory scans only base/ (SD1.5 checkpoints and diffusers folders), motion/ (motion "
        "modules), lora/ (MotionLoRAs) and adapter/ (spatial LoRAs: the domain adapter, AnimateLCM's LoRA)"
    )
    if lower in ("lora", "loras"):  # A1111's Lora/ holds spatial (style) LoRAs
        return (f"folder {name}/ is not scanned (folder names are lowercase): {where}; MotionLoRAs go "
                "into lora/, a spatial LoRA (AnimateLCM's, a domain adapter) into adapter/")
    if lower in KINDS:
        return f"folder {name}/ is not scanned: folder names are lowercase, rename it to {lower}/"
    if lower in _OTHER_LAYOUTS:
        return f"folder {name}/ is not scanned: {where}; move its files into {_OTHER_LAYOUTS[lower]}/"
    return f"folder {name}/ is not scanned: {where}"


def _classify_top_level(path: Path) -> _Detected:
    """Kind of a safetensors file dropped at the top of the models dir, from its keys."""
    shapes = _shapes(path)
    keys = list(shapes)
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return _inspect_base(path)
    try:
        motion_layout(keys)
        return _inspect_motion(path)
    except ConversionError:
        pass
    what = _foreign_file(keys)
    if what:
        raise ConversionError(f"not a base model, motion module or LoRA: it is {what}")
    lora_format(keys)  # raises if no LoRA either
    for kind in ("lora", "adapter"):
        try:
            return _inspect_lora(path, kind)
        except ConversionError:
            continue
    raise ConversionError("LoRA targets neither motion modules nor the spatial attention layers")


_KIND_WORDS = {"base": "base model", "motion": "motion module", "lora": "MotionLoRA", "adapter": "domain adapter"}


def _other_kind(path: Path, kind: str) -> _Detected | None:
    """What a file or folder that failed the inspection of its kind folder is, when it is a
    usable model of another kind (a file in the wrong folder); else None."""
    if path.is_dir():
        if (path / "model_index.json").is_file():
            tries = [lambda: _inspect_base(path)]
        elif (path / "config.json").is_file():
            tries = [lambda: _inspect_motion(path)]
        else:
            tries = [lambda: _inspect_lora(path, "lora"), lambda: _inspect_lora(path, "adapter")]
    elif _is_large_pickle(path):
        tries = [lambda: _classify_large_pickle(path)]  # (not unpickled whole at scan time)
    else:
        tries = [lambda: _classify_top_level(path)]
    for attempt in tries:
        try:
            det = attempt()
        except Exception:  # no model of another kind: the original reason stands
            continue
        if det.ok and det.kind != kind:
            return det
    return None


def _classify_large_pickle(path: Path) -> _Detected:
    """Base model or motion module, from the keys of a pickle too large to load at scan time."""
    shapes = read_pickle_shapes(path)
    if any(k.startswith("model.diffusion_model.") for k in shapes):
        return _Detected("base", "single_file", _base_version(shapes))
    motion_adapter_config(shapes)
    return _Detected("motion", motion_layout(shapes), detect_motion_version(shapes, path.name))


def _wrong_folder(path: Path, kind: str, exc: ConversionError) -> ConversionError:
    """`exc`, or where the file is a model of another kind, an error that says where it goes."""
    try:
        det = _other_kind(path, kind)
    except OSError:  # (gone or unreadable since: the original reason stands)
        det = None
    if det is None:
        what = _foreign_kind_of(path)
        return ConversionError(f"not a {_KIND_WORDS[kind]}: it is {what}") if what else exc
    detail = det.version or det.format
    return ConversionError(
        f"not a {_KIND_WORDS[kind]}: it looks like a {_KIND_WORDS[det.kind]}"
        + (f" ({detail})" if detail else "")
        + f": move it to {det.kind}/"
    )


def _foreign_kind_of(path: Path) -> str:
    """`_foreign_file` of a file's keys ("" for folders and files whose keys cannot be read)."""
    if not path.is_file():
        return ""
    try:
        return _foreign_file(_shapes(path))
    except Exception:  # unreadable: the original reason stands
        return ""


def _only_hidden(folder: Path) -> bool:
    """A folder holding nothing but hidden entries (huggingface_hub's `.cache/` of a download
    that failed before its first file): no model yet, not a broken one."""
    try:
        return all(entry.name.startswith(".") for entry in folder.iterdir())
    except OSError:
        return False  # unreadable: inspected, and listed with its reason


def _label(kind: str, name: str, det: _Detected, camera: str) -> str:
    stem = _stem(name)
    if camera:
        return CAMERA_MOTIONS[camera]
    if kind == "motion" and det.version:
        return f"{stem} ({det.version})"
    if kind == "adapter":
        return f"{stem} (LCM LoRA)" if det.version == "lcm" else f"{stem} (domain adapter)"
    return stem


def _cached_result(cached: Any, sig: list[list[Any]]) -> tuple[_Detected, str] | None:
    """A cache entry's (detection, sha256) when its signature is `sig`; None when it is not,
    or is malformed (a cache written by other code: inspected again, never an error)."""
    if not isinstance(cached, dict) or cached.get("signature") != sig:
        return None
    try:
        det = _Detected(**cached["detected"])
    except (KeyError, TypeError):
        return None
    sha = cached.get("sha256")
    return (det, sha) if isinstance(sha, str) else None


def _list_order(entry: RegistryEntry) -> tuple[Any, ...]:
    """The model list's order (see the module docstring): by kind, camera-motion LoRAs first
    (by move, the published names before other official ones), then by id."""
    kind = KINDS.index(entry.kind) if entry.kind in KINDS else len(KINDS)
    if entry.camera_motion:
        move = list(CAMERA_MOTIONS).index(entry.camera_motion)
        published = _CAMERA_PUBLISHED_RX.match(entry.path.name) is not None
        return (kind, 0, move, not published, entry.id)
    return (kind, 1, 0, False, entry.id)


def _id_is_own_name(entry: RegistryEntry) -> bool:
    return entry.id.partition(":")[2] == entry.path.name


def _duplicate(entry: RegistryEntry, holder: RegistryEntry, entries: Mapping[str, RegistryEntry]) -> None:
    """List `entry` as broken: `holder` has its id.  It is keyed by its own file name (or
    "#top") so that both stay in the list."""
    entry.ok, entry.error = False, f"duplicate id {entry.id} (also {holder.path}): rename one of them"
    kind = entry.id.partition(":")[0]
    key = f"{kind}:{entry.path.name}" if not _id_is_own_name(entry) else f"{entry.id}#top"
    n = 2
    while key in entries:
        key, n = f"{key.rsplit('#', 1)[0]}#{n}", n + 1
    entry.id = key


def _distinct_labels(entries: list[RegistryEntry]) -> None:
    """Entries of one kind with the same label ("Zoom in" of the .ckpt and of the hub folder,
    "mm_sd_v15_v2 (v2)" of the .ckpt and the .safetensors) get what tells them apart: the file
    name for camera moves, else the suffix, format, file name or id, whichever differs."""
    groups: dict[tuple[str, str], list[RegistryEntry]] = {}
    for e in entries:
        groups.setdefault((e.kind, e.label), []).append(e)
    details: list[Callable[[RegistryEntry], str]] = [
        lambda e: e.path.suffix.lower() if e.path.is_file() else "folder",
        lambda e: e.format,
        lambda e: e.path.name,
        lambda e: e.id,
    ]
    for (_kind, label), group in groups.items():
        if len(group) < 2:
            continue
        for detail in details[2:] if group[0].camera_motion else details:
            values = [detail(e) for e in group]
            if all(values) and len(set(values)) == len(values):
                break
        for e, value in zip(group, values, strict=True):
            e.label = f"{label[:-1]}, {value})" if label.endswith(")") else f"{label} ({value})"


# --------------------------------------------------------------------------- registry


class ModelRegistry:
    """Scans a models directory; thread-safe.  Readers (`get`, `entries`) never wait for a
    scan: they see the last complete scan's entries until a rescan swaps in its own."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = Path(models_dir)
        self._entries: dict[str, RegistryEntry] = {}
        self._scanned = False
        self._lock = threading.Lock()  # held only to read or swap `_entries`
        # One scan at a time: two would race on the cache file, and an older one finishing
        # last would put back entries from before a newer one.
        self._scan_lock = threading.Lock()

    # -- cache
    def _cache_path(self) -> Path:
        return self.models_dir / CACHE_FILE

    def _load_cache(self) -> dict[str, Any]:
        try:
            data = json.loads(self._cache_path().read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if (
            not isinstance(data, dict)
            or data.get("version") != CACHE_VERSION
            # results of pickles depend on the torch version (check_pickle_allowed)
            or data.get("pickles_allowed") != pickles_allowed()
            or not isinstance(data.get("entries"), dict)
        ):
            return {}
        return data["entries"]

    def _save_cache(self, entries: dict[str, Any]) -> None:
        tmp = self._cache_path().with_suffix(f".tmp{os.getpid()}")
        # Left by a process that stopped mid-write (a shutdown does not wait for a rescan
        # stuck on a hung disk); an hour old, no write is still going on.
        for stale in self.models_dir.glob(f"{self._cache_path().stem}.tmp*"):
            try:
                if stale != tmp and time.time() - stale.stat().st_mtime > STALE_CACHE_TMP_S:
                    stale.unlink()
            except OSError:
                pass
        try:
            tmp.write_text(
                json.dumps(
                    {"version": CACHE_VERSION, "pickles_allowed": pickles_allowed(), "entries": entries},
                    indent=1,
                    sort_keys=True,
                )
            )
            os.replace(tmp, self._cache_path())
        except OSError as exc:  # a read-only models dir still scans, just without the cache
            log.debug("cannot write registry cache: %s", exc)
            tmp.unlink(missing_ok=True)

    # -- scanning
    def _candidates(self) -> list[tuple[str | None, Path]]:
        out: list[tuple[str | None, Path]] = []
        if not self.models_dir.is_dir():
            return out
        for kind in KINDS:
            folder = self.models_dir / kind
            try:
                if not folder.is_dir():
                    continue
                children = sorted(folder.iterdir())
            except OSError:  # unreadable: listed as broken (its reason comes from inspecting it)
                out.append((kind, folder))
                continue
            for child in children:
                if child.name.startswith("."):
                    continue
                if child.is_dir():
                    # `<stem>.config/` is the sidecar config of a single-file checkpoint
                    if child.name.endswith(".config") and any(
                        (folder / (child.name[: -len(".config")] + s)).exists() for s in WEIGHT_SUFFIXES
                    ):
                        continue
                    if _only_hidden(child):  # a download that never got a file (its .cache only)
                        continue
                    out.append((kind, child))
                elif child.suffix.lower() in WEIGHT_SUFFIXES:
                    out.append((kind, child))
        try:
            top = sorted(self.models_dir.iterdir())
        except OSError as exc:
            log.warning("cannot list the models directory: %s", exc)
            top = []
        for child in top:
            if child.name.startswith("."):
                continue
            if child.is_file() and child.suffix.lower() in WEIGHT_SUFFIXES:
                out.append((None, child))
            elif child.name not in KINDS and child.is_dir() and _holds_models(child):
                # An A1111 layout (Stable-diffusion/, Lora/), a capitalised Base/: listed with
                # where its files go, not skipped without a word.
                out.append((None, child))
        return out

    def _inspect(self, kind: str | None, path: Path) -> _Detected:
        if kind is None and path.is_dir():
            return _Detected("base", "", "", False, _stray_folder_reason(path.name))
        if kind is None:
            if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
                return _Detected(
                    "base",
                    "",
                    "",
                    False,
                    "pickle files at the top level are not inspected: move it into base/, motion/, lora/ or adapter/",
                )
            return _classify_top_level(path)
        try:
            if kind == "base":
                return _inspect_base(path)
            if kind == "motion":
                return _inspect_motion(path)
            return _inspect_lora(path, kind)
        except ConversionError as exc:
            raise _wrong_folder(path, kind, exc) from exc

    def _entry(
        self, kind: str | None, path: Path, cache: dict[str, Any], new_cache: dict[str, Any]
    ) -> RegistryEntry:
        rel = path.relative_to(self.models_dir).as_posix()
        try:
            if not (path.is_file() or path.is_dir()):
                # Opening a named pipe would block the scan; a dangling link has nothing to read.
                raise OSError(f"{path.name}: not a regular file or folder (a broken link, a pipe or a device?)")
            sig = _signature(path)
            size = sum(s[1] for s in sig)
        except OSError as exc:
            return RegistryEntry(
                f"{kind or 'base'}:{path.name}",
                kind or "base",
                "",
                "",
                path,
                path.name,
                0,
                "",
                ok=False,
                error=str(exc),
            )
        cached = _cached_result(cache.get(rel), sig)
        if cached is not None:
            det, sha = cached
        else:
            try:
                det = self._inspect(kind, path)
            except (ConversionError, OSError, ValueError, KeyError) as exc:
                det = _Detected(kind or "base", "", "", False, str(exc))
            except Exception as exc:  # one odd file must not stop the scan of all the others
                log.warning("cannot inspect %s", path, exc_info=True)
                det = _Detected(kind or "base", "", "", False, f"cannot inspect: {type(exc).__name__}: {exc}")
            # Hashing reads the whole file (a multi-GB checkpoint: seconds to minutes); one that
            # cannot be used (an SDXL checkpoint by mistake, an unusable name) needs no hash.
            sha = ""
            if det.ok and model_id_name(path.name) is not None:
                try:
                    sha = content_sha256(path)
                except OSError as exc:
                    det = _Detected(det.kind, det.format, det.version, False, str(exc))
        new_cache[rel] = {"signature": sig, "detected": asdict(det), "sha256": sha}
        # Official names of v2 MotionLoRAs only: the add-on picks a camera move's LoRA by this tag.
        camera = camera_motion_of(path.name) if det.kind == "lora" and det.ok and det.version == "v2" else ""
        id_name = model_id_name(path.name)
        model_id = f"{det.kind}:{id_name or path.name}"
        ok, error = det.ok, det.error
        if id_name is None or not is_valid_id(model_id):
            ok = False
            error = (
                f"name {path.name!r} cannot be used as a model id (it needs a letter or digit before "
                "its suffix): rename it"
            )
        return RegistryEntry(
            id=model_id,
            kind=det.kind,
            format=det.format,
            version=det.version,
            path=path,
            label=_label(det.kind, path.name, det, camera),
            size=size,
            sha256=sha,
            camera_motion=camera,
            ok=ok,
            error=error,
            signature=sig,
        )

    def scan(self) -> list[ModelInfo]:
        """Re-read the models directory (cached hashes for unchanged files).  Hashing a new
        multi-GB file takes seconds to minutes: it happens without `_lock`, into new dicts
        swapped in at the end, so readers get the previous entries meanwhile."""
        with self._scan_lock:
            cache = self._load_cache()
            new_cache: dict[str, Any] = {}
            made = [self._entry(kind, path, cache, new_cache) for kind, path in self._candidates()]
            entries: dict[str, RegistryEntry] = {}
            # One id, two files ("a b.ckpt" beside "a_b.ckpt", a name at top level and in its
            # kind folder): the file named as its id keeps it, else the first met.
            for entry in sorted(made, key=lambda e: not _id_is_own_name(e)):
                if entry.id in entries:
                    _duplicate(entry, entries[entry.id], entries)
                entries[entry.id] = entry
            if new_cache != cache and self.models_dir.is_dir():
                self._save_cache(new_cache)
            entries = {e.id: e for e in sorted(entries.values(), key=_list_order)}
            _distinct_labels(list(entries.values()))
            with self._lock:
                self._entries = entries
                self._scanned = True
        return [e.to_info() for e in entries.values()]

    def entries(self) -> list[RegistryEntry]:
        self._ensure_scanned()
        with self._lock:
            return list(self._entries.values())

    def infos(self) -> list[ModelInfo]:
        return [e.to_info() for e in self.entries()]

    def _ensure_scanned(self) -> None:
        if not self._scanned:
            self.scan()

    def get(self, model_id: object, *, kind: str | None = None, require_ok: bool = False) -> RegistryEntry:
        """The entry with this id (check `entry.ok`: broken files are entries too, with the
        reason in `entry.error`).  `UnknownModel` for malformed, path-like or unknown ids, for
        an entry of another kind than `kind`, and with `require_ok` for a broken entry."""
        if not is_valid_id(model_id):
            raise UnknownModel(model_id, "not a model id (expected kind:name, no paths)")
        assert isinstance(model_id, str)
        self._ensure_scanned()
        with self._lock:
            entry = self._entries.get(model_id)
        if entry is None:
            raise UnknownModel(model_id)
        if kind is not None and entry.kind != kind:
            raise UnknownModel(model_id, f"is a {entry.kind} model, not a {kind} model")
        if require_ok and not entry.ok:
            raise UnknownModel(model_id, f"cannot be used: {entry.error}")
        return entry

    def is_current(self, entry: RegistryEntry) -> bool:
        """Whether `entry`'s files are still the ones scanned (same names, sizes, mtimes, inodes
        and change times: `_signature`).  A stat per file and no reading, so cheap enough
        before every use of a loaded model;
        False means a rescan would give another entry (another hash, maybe another version)."""
        try:
            return bool(entry.signature) and _signature(entry.path) == entry.signature
        except OSError:  # gone or unreadable since the scan
            return False

    def default_ids(self) -> dict[str, str]:
        """Sensible defaults: the real SD1.5 folder over other bases, checked bases over
        unchecked ones (version "": a pickle whose shapes could not be read at scan time),
        diffusers folders over single files; the v2 motion module (what the MotionLoRAs were
        trained on) over v3, v1.  Adds "motion_lightning" / "motion_lcm" when such a motion
        module is present, and "adapter_lcm" for a spatial LCM LoRA (which the `lcm` preset
        adds when a request names no domain adapter)."""
        usable = [e for e in self.entries() if e.ok]
        out: dict[str, str] = {}
        bases = sorted(
            (e for e in usable if e.kind == "base"),
            key=lambda e: (e.version != "sd15", e.version == "", e.format != "diffusers", e.id),
        )
        if bases:
            out["base"] = bases[0].id
        motion_rank = {"v2": 0, "v3": 1, "v1": 2}
        motions = sorted(
            (e for e in usable if e.kind == "motion" and e.version in motion_rank),
            key=lambda e: (motion_rank[e.version], e.format != "diffusers", e.id),
        )
        if motions:
            out["motion"] = motions[0].id
        for version in ("lightning", "lcm"):
            special = sorted(e.id for e in usable if e.kind == "motion" and e.version == version)
            if special:
                out[f"motion_{version}"] = special[0]
        adapters = sorted((e for e in usable if e.kind == "adapter"), key=lambda e: (e.version == "lcm", e.id))
        if adapters:
            out["adapter"] = adapters[0].id
        lcm = [e.id for e in adapters if e.version == "lcm"]
        if lcm:
            out["adapter_lcm"] = lcm[0]
        return out
