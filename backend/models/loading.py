"""Loading registry entries into diffusers objects: the only loading path of the backend.

The engine calls exactly these (each takes a `registry.RegistryEntry`, or a `Path`):

* `load_base(entry, dtype, device) -> BaseComponents` — a diffusers SD1.5 folder, or a
  single `.safetensors`/`.ckpt` with LDM/CompVis key names.  Single files need a diffusers
  config: a sidecar folder `<stem>.config/` next to the file (the zoo writes one) or else the
  SD1.5 configs shipped in `configs/sd15/`.  The real SD1.5 tokenizer is not shipped: it is
  looked for in the sidecar, then in `<models>/base/stable-diffusion-v1-5/tokenizer`
  (`animatediff-blender models fetch` downloads it there).
* `load_motion_adapter(entry, dtype) -> MotionAdapter` — original AnimateDiff files
  (v1/v2/v3, AnimateLCM, `.ckpt` or `.safetensors`), diffusers-layout files
  (AnimateDiff-Lightning) and diffusers folders; widths and version from the weights.
* `load_motion_lora(entry) -> convert.LoraWeights` — MotionLoRAs (original `v2_lora_*.ckpt`,
  diffusers hub folders, peft files) as peft keys for
  `pipe.load_lora_weights(lora.state_dict, adapter_name=...)`; the r / lora_alpha that
  diffusers' `save_lora_weights` keeps in a safetensors header set `network_alpha`.
* `load_domain_adapter(entry) -> convert.LoraWeights` — the v3 domain adapter (spatial LoRA).
* `verify_lora_applied(unet, lora, adapter_name, text_encoder=None)` — after
  `load_lora_weights`, raises unless every target module (UNet, and text encoder when given)
  received the adapter (diffusers ignores keys it does not map).

Every loader reads local files only and raises `convert.ConversionError` (a `ValueError`)
with the file name and reason on a file it cannot use completely: no silent partial loads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .convert import (
    LORA_WEIGHT_NAMES,
    MOTION_ADAPTER_WEIGHT_NAMES,
    PICKLE_SUFFIXES,
    WEIGHT_SUFFIXES,
    ConversionError,
    LoraScope,
    LoraWeights,
    check_folder_pickles_allowed,
    check_zip_checksums,
    component_pickles,
    diffusers_variant,
    folder_weights_file,
    motion_adapter_config,
    motion_to_diffusers,
    read_lora,
    read_state_dict,
)

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from .registry import RegistryEntry

log = logging.getLogger(__name__)

CONFIGS_DIR = Path(__file__).parent / "configs"
SD15_CONFIG_DIR = CONFIGS_DIR / "sd15"
SD15_TOKENIZER_DIRS = ("base/stable-diffusion-v1-5/tokenizer",)

# Serve-time loading never reaches the network: every load passes local_files_only=True,
# and `serve` sets HF_HUB_OFFLINE before importing diffusers.  (Not set here: importing this
# module must not switch `models fetch` in the same process offline.)


@dataclass
class BaseComponents:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]
    source_format: str  # "diffusers" or "single_file"


def _path(entry: RegistryEntry | Path) -> Path:
    return Path(entry) if isinstance(entry, (str, Path)) else Path(entry.path)


def _default_dtype(dtype: torch.dtype | None) -> torch.dtype:
    import torch

    return dtype if dtype is not None else torch.float32


def _cast(model: Any, dtype: torch.dtype) -> Any:
    """`.to(dtype)` only when needed (diffusers warns on every cast)."""
    if any(p.dtype != dtype for p in model.parameters()):
        model = model.to(dtype)
    return model


# --------------------------------------------------------------------------- base models


def load_base(
    entry: RegistryEntry | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> BaseComponents:
    path = _path(entry)
    dtype = _default_dtype(dtype)
    if path.is_dir():
        comps = _load_base_folder(path, dtype)
    elif path.suffix.lower() in WEIGHT_SUFFIXES:
        comps = _load_base_single_file(path, dtype)
    else:
        raise ConversionError(f"{path.name}: not a diffusers folder or a weights file")
    comps.unet.to(device)
    comps.vae.to(device)
    comps.text_encoder.to(device)
    return comps


def _load_base_folder(folder: Path, dtype: torch.dtype) -> BaseComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (folder / sub).is_dir():
            raise ConversionError(f"{folder.name}: diffusers folder lacks {sub}/")
    # `models fetch` downloads only the fp16 files of SD1.5 (`*.fp16.safetensors`).
    variant = diffusers_variant(folder)
    # Pickle weights get the policy of single pickle files (read_state_dict): refused below
    # torch 2.10, CRCs checked (torch's zip reader skips them).  Components that have
    # safetensors load with use_safetensors=True, which never falls back to a pickle beside
    # them; the others with use_safetensors=False and weights_only=True (diffusers'
    # `load_state_dict` always passes weights_only=True to torch.load; transformers' default,
    # passed explicitly here).
    pickles = {sub: component_pickles(folder / sub, variant) for sub in ("unet", "vae", "text_encoder")}
    check_folder_pickles_allowed(folder, [p for files in pickles.values() for p in files])
    for files in pickles.values():
        for file in files:
            try:
                check_zip_checksums(file)
            except ConversionError as exc:
                raise ConversionError(f"{folder.name}: {file.parent.name}/{exc}") from exc
            except OSError as exc:
                raise ConversionError(f"{folder.name}: cannot read {file.parent.name}/{file.name} ({exc})") from exc
    try:
        unet = UNet2DConditionModel.from_pretrained(
            folder,
            subfolder="unet",
            dtype=dtype,
            variant=variant,
            use_safetensors=not pickles["unet"],
            local_files_only=True,
        )
        vae = AutoencoderKL.from_pretrained(
            folder,
            subfolder="vae",
            dtype=dtype,
            variant=variant,
            use_safetensors=not pickles["vae"],
            local_files_only=True,
        )
        text_encoder = CLIPTextModel.from_pretrained(
            folder / "text_encoder",
            dtype=dtype,
            variant=variant,
            use_safetensors=not pickles["text_encoder"],
            weights_only=True,
            local_files_only=True,
        )
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConversionError(f"{folder.name}: cannot load diffusers folder ({exc})") from exc
    return BaseComponents(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler_config=_read_scheduler_config(folder),
        source_format="diffusers",
    )


def _read_scheduler_config(folder: Path) -> dict[str, Any]:
    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    if not isinstance(cfg, dict):
        raise ConversionError(f"{folder}: bad scheduler config")
    return cfg


def single_file_config_dir(path: Path) -> Path:
    """The diffusers config for a single-file checkpoint: `<stem>.config/` next to it, else SD1.5."""
    sidecar = path.with_name(path.stem + ".config")
    return sidecar if sidecar.is_dir() else SD15_CONFIG_DIR


def _find_tokenizer(path: Path, config_dir: Path) -> Path:
    candidates = [config_dir / "tokenizer"]
    models_dir = path.parent.parent  # <models>/base/<file>
    candidates += [models_dir / rel for rel in SD15_TOKENIZER_DIRS]
    for c in candidates:
        if (c / "vocab.json").is_file() and (c / "merges.txt").is_file():
            return c
    raise ConversionError(
        f"{path.name}: no CLIP tokenizer found for this single-file checkpoint (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); run `animatediff-blender models fetch --only sd15` to download the SD1.5 tokenizer"
    )


def _strict_load(
    model: Any,
    sd: dict[str, Any],
    what: str,
    *,
    assign: bool = False,
    may_be_missing: Callable[[str], bool] | None = None,
) -> None:
    """load_state_dict that reports every missing and unexpected key (diffusers' single-file
    helpers load with strict=False, which would hide a partial conversion).  Only keys for
    which `may_be_missing` is true (recomputed buffers) may be absent from `sd`."""
    own = model.state_dict()
    unexpected = sorted(set(sd) - set(own))
    missing = sorted(k for k in set(own) - set(sd) if not (may_be_missing and may_be_missing(k)))
    if missing or unexpected:
        raise ConversionError(
            f"{what}: checkpoint does not match the model config: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for key, value in sd.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ConversionError(
                f"{what}: {key} has shape {tuple(value.shape)}, the config needs {tuple(own[key].shape)}"
            )
    model.load_state_dict(sd, strict=may_be_missing is None, assign=assign)


@contextmanager
def _empty_weights() -> Iterator[None]:
    """Build a model with its parameters on the meta device and its buffers real.

    Random init of weights that are then overwritten is most of a load's time (2-core CPU:
    11.5 s for a v2 motion module, 22.6 s for diffusers' `from_unet2d`).  Buffers stay real
    because they are computed, not read: the motion modules' sinusoidal `pos_embed.pe`, CLIP's
    `position_ids`.  accelerate's helper is the one diffusers and transformers use for this.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def _check_materialised(model: Any, what: str) -> None:
    """After an assign-load every parameter must be real (a strict load guarantees it)."""
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ConversionError(f"{what}: {len(meta)} weights were never loaded (e.g. {meta[:3]})")


def _build_and_load(cls: Any, config: dict[str, Any], sd: dict[str, Any], what: str) -> Any:
    """Build without random init (a 860M UNet) and assign the weights."""
    with _empty_weights():
        model = cls.from_config(config)
    _strict_load(model, sd, what, assign=True)
    _check_materialised(model, what)
    return model.eval()


def _load_base_single_file(path: Path, dtype: torch.dtype) -> BaseComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    config_dir = single_file_config_dir(path)
    tokenizer_dir = _find_tokenizer(path, config_dir)
    ckpt = read_state_dict(path)
    if not any(k.startswith("model.diffusion_model.") for k in ckpt):
        raise ConversionError(
            f"{path.name}: not an SD1.x single-file checkpoint (no model.diffusion_model.* keys)"
        )

    unet_cfg = dict(UNet2DConditionModel.load_config(config_dir / "unet", local_files_only=True))
    vae_cfg = dict(AutoencoderKL.load_config(config_dir / "vae", local_files_only=True))
    try:
        unet_sd = convert_ldm_unet_checkpoint(ckpt, unet_cfg)
        vae_sd = convert_ldm_vae_checkpoint(ckpt, vae_cfg)
        text_sd = convert_ldm_clip_checkpoint(ckpt)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConversionError(f"{path.name}: cannot convert LDM keys ({type(exc).__name__}: {exc})") from exc

    unet = _build_and_load(UNet2DConditionModel, unet_cfg, unet_sd, f"{path.name} (unet)")
    vae = _build_and_load(AutoencoderKL, vae_cfg, vae_sd, f"{path.name} (vae)")

    text_config = CLIPTextConfig.from_pretrained(config_dir / "text_encoder", local_files_only=True)
    with _empty_weights():
        text_encoder = CLIPTextModel(text_config)
    if not hasattr(text_encoder, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        text_sd = {k.removeprefix("text_model."): v for k, v in text_sd.items()}
    own = text_encoder.state_dict()
    # Older checkpoints carry the position_ids buffer, which newer transformers do not save.
    text_sd = {k: v for k, v in text_sd.items() if not (k.endswith("position_ids") and k not in own)}
    _strict_load(text_encoder, text_sd, f"{path.name} (text encoder)", assign=True)
    _check_materialised(text_encoder, f"{path.name} (text encoder)")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    if len(tokenizer) > text_config.vocab_size:
        raise ConversionError(
            f"{path.name}: tokenizer ({len(tokenizer)} tokens) does not fit the text encoder"
        )
    return BaseComponents(
        unet=_cast(unet, dtype),
        vae=_cast(vae, dtype),
        text_encoder=_cast(text_encoder, dtype).eval(),
        tokenizer=tokenizer,
        scheduler_config=_read_scheduler_config(config_dir),
        source_format="single_file",
    )


# --------------------------------------------------------------------------- motion modules


def _weights_file(folder: Path, preferred: tuple[str, ...]) -> Path:
    try:
        return folder_weights_file(folder, preferred)
    except ConversionError as exc:
        raise ConversionError(f"{folder.name}: {exc}") from exc


def load_motion_adapter(entry: RegistryEntry | Path, dtype: torch.dtype | None = None) -> MotionAdapter:
    """A MotionAdapter with every weight of the file loaded (only the positional encodings,
    which are fixed sinusoids, are recomputed)."""
    import inspect

    from diffusers import MotionAdapter

    path = _path(entry)
    dtype = _default_dtype(dtype)
    weights = _weights_file(path, MOTION_ADAPTER_WEIGHT_NAMES) if path.is_dir() else path
    if path.is_dir() and weights.suffix.lower() in PICKLE_SUFFIXES:
        check_folder_pickles_allowed(path, [weights])  # (read_state_dict's refusal, naming the folder)
    sd = read_state_dict(weights)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    try:
        converted = motion_to_diffusers(sd)
        config = motion_adapter_config(shapes)
    except ConversionError as exc:
        raise ConversionError(f"{path.name}: {exc}") from exc
    if path.is_dir() and (path / "config.json").is_file():
        # A folder's config also knows what weights cannot tell (head count, groups).
        saved = json.loads((path / "config.json").read_text(encoding="utf-8"))
        allowed = set(inspect.signature(MotionAdapter.__init__).parameters) - {"self"}
        config.update({k: v for k, v in saved.items() if k in allowed})
    what = f"{path.name} (motion module)"
    try:
        with _empty_weights():
            adapter = MotionAdapter(**config)
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{path.name}: cannot build a MotionAdapter for these weights ({exc})") from exc
    # Positional encodings are recomputed by diffusers (real buffers), never read from the file.
    _strict_load(adapter, converted, what, assign=True, may_be_missing=lambda k: k.endswith(".pos_embed.pe"))
    _check_materialised(adapter, what)
    return _cast(adapter, dtype).eval()


def build_motion_unet(unet: UNet2DConditionModel, adapter: MotionAdapter, device: str | torch.device) -> Any:
    """diffusers' `UNetMotionModel.from_unet2d(unet, adapter)` on `device`, without its random
    init of ~1.3 B parameters (22.6 of a 2-core CPU's 39 s model load).

    The motion UNet's module names are the UNet2D's plus the adapter's `motion_modules`, so
    its weights are the two state dicts together.  They are copied to `device` (never shared
    with the UNet2D, which stays on the CPU for the next motion module).  Anything that does
    not map one to one (PIA's 9-channel conv_in, extra embeddings) takes diffusers' own path.
    """
    import torch
    from diffusers import UNetMotionModel

    if not adapter.config.get("conv_in_channels"):
        with _empty_weights():
            model = UNetMotionModel.from_unet2d(unet, adapter, load_weights=False)
        sd = dict(unet.state_dict())
        sd.update((k, v) for k, v in adapter.state_dict().items() if ".motion_modules." in f".{k}")
        if set(sd) == set(model.state_dict()):
            sd = {k: v.to(device=device, copy=True) for k, v in sd.items()}
            _strict_load(model, sd, "motion UNet", assign=True)
            _check_materialised(model, "motion UNet")
            # from_unet2d's last step: the UNet2D's dtype everywhere (non-persistent buffers
            # too); only when something differs, since diffusers warns on every cast.
            target, dtype = torch.device(device), unet.dtype  # (.dtype walks every module)
            tensors = [*model.parameters(), *model.buffers()]
            if any(
                t.device.type != target.type or (t.is_floating_point() and t.dtype != dtype) for t in tensors
            ):
                model = model.to(device=target, dtype=dtype)
            return model.eval()
        log.info("motion UNet: weights do not map one to one, building it with diffusers' from_unet2d")
    return UNetMotionModel.from_unet2d(unet, adapter).to(device).eval()


def _motion_tensors(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if ".motion_modules." in f".{k}"}


def same_motion_architecture(a: MotionAdapter, b: MotionAdapter) -> bool:
    """Whether one motion module's weights can stand in for the other's in a built motion UNet
    (same config; PIA-style modules with their own conv_in never)."""

    def architecture(adapter: MotionAdapter) -> dict[str, Any]:
        return {k: v for k, v in adapter.config.items() if not k.startswith("_")}

    return architecture(a) == architecture(b) and not b.config.get("conv_in_channels")


def swap_motion_weights(unet: Any, current: MotionAdapter, new: MotionAdapter) -> bool:
    """Copy `new`'s motion-module weights into a motion UNet built with `current`, in place,
    when both have the same architecture (AnimateDiff-Lightning and AnimateLCM are v2's):
    the UNet2D's weights are not copied again, and compiled blocks and CUDA graphs keep their
    tensors (same objects, same addresses), so nothing recompiles.  Returns False, with
    nothing changed, when the architectures differ: the UNet is then rebuilt."""
    import torch

    if not same_motion_architecture(current, new):
        return False
    target = _motion_tensors(unet.state_dict(keep_vars=True))
    source = _motion_tensors(new.state_dict())
    if set(target) != set(source) or any(target[k].shape != v.shape for k, v in source.items()):
        return False  # (a UNet with a job's LoRA or FreeNoise blocks still in it, say)
    with torch.no_grad():
        for k, tensor in target.items():
            tensor.copy_(source[k])  # cast to the UNet's dtype and device, layout kept
    return True


# --------------------------------------------------------------------------- LoRAs


def _load_lora(entry: RegistryEntry | Path, scope: LoraScope) -> LoraWeights:
    path = _path(entry)
    weights = _weights_file(path, LORA_WEIGHT_NAMES) if path.is_dir() else path
    if path.is_dir() and weights.suffix.lower() in PICKLE_SUFFIXES:
        check_folder_pickles_allowed(path, [weights])
    try:
        lora = read_lora(weights, scope)  # (with the alpha of a peft header, as diffusers reads it)
    except ConversionError as exc:
        raise ConversionError(f"{path.name}: {exc}") from exc
    lora.metadata["path"] = str(path)
    return lora


def load_motion_lora(entry: RegistryEntry | Path) -> LoraWeights:
    return _load_lora(entry, "motion")


def load_domain_adapter(entry: RegistryEntry | Path) -> LoraWeights:
    return _load_lora(entry, "spatial")


def verify_lora_applied(unet: Any, lora: LoraWeights, adapter_name: str, text_encoder: Any = None) -> None:
    """Raise unless each of `lora.target_modules` in `unet` (the pipeline's UNetMotionModel)
    carries a peft LoRA layer for `adapter_name`, and, given the `text_encoder`, each of
    `lora.text_encoder_modules` in it (a style LoRA's CLIP layers)."""
    missing = []
    wanted: list[tuple[Any, str, tuple[str, ...]]] = [(unet, name, (name,)) for name in sorted(lora.target_modules)]
    if text_encoder is not None:
        # "text_model.encoder...": CLIPTextModel nests it under text_model, or not (transformers 5)
        wanted += [(text_encoder, name, (name, name.removeprefix("text_model.")))
                   for name in sorted(lora.text_encoder_modules)]  # fmt: skip
    for model, name, paths in wanted:
        module = None
        for path in paths:
            try:
                module = model.get_submodule(path)
                break
            except AttributeError:
                continue
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or adapter_name not in lora_a:
            missing.append(name)
    if missing:
        raise ConversionError(
            f"LoRA {adapter_name!r} was not applied to {len(missing)} of {len(wanted)} modules "
            f"(e.g. {missing[:3]})"
        )
