"""Reading checkpoint files safely and converting original layouts to diffusers.

Everything here is pure key/tensor work on state dicts (no model construction), shared by
`loading.py` (serving) and `registry.py` (version detection) for real files and the zoo alike.

* `read_state_dict(path)`: safetensors preferred; pickle files (`.ckpt .pt .pth .bin`) only via
  `torch.load(..., weights_only=True)` on torch >= 2.10.  Unwraps `{"state_dict": ...}`.
* `read_tensor_shapes(path)`: key -> shape without loading tensors (safetensors header);
  `read_pickle_shapes(path)` the same for a torch zip checkpoint (only its pickle is read).
* `folder_weights_file(folder, preferred)`: which weights file of a model folder is loaded.
* `component_pickles(folder)`, `check_folder_pickles_allowed(...)`: the same pickle policy for
  diffusers folders, whose weights diffusers' / transformers' `from_pretrained` read.
* `motion_original_to_diffusers(sd)`: original AnimateDiff motion module keys -> MotionAdapter keys.
* `motion_adapter_config(shapes, ...)`: MotionAdapter kwargs inferred from the weights.
* `lora_to_peft(sd, scope, config)`: MotionLoRA / domain-adapter files (original AnimateDiff,
  diffusers hub, peft or kohya layout) -> `unet.<module>.lora_A.weight` / `lora_B.weight`
  (and `text_encoder.<module>...` for a kohya style LoRA's CLIP text-encoder layers);
  `lora_adapter_config(path)` reads the peft config (rank, alpha) diffusers saves in a
  safetensors header, and `read_lora(path, scope)` does both.

Every converter raises `ConversionError` on a key it does not understand: a key that is
silently ignored is a LoRA or module that silently does nothing.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import struct
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
MIN_TORCH_FOR_PICKLE = (2, 10)
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
# Every SD1.x UNet (and so every motion module made for one) has 4 down blocks; SDXL has 3.
SD15_DOWN_BLOCKS = 4


EMBEDDINGS_UNSUPPORTED = "textual-inversion embeddings are not supported"


class ConversionError(ValueError):
    """A checkpoint whose layout is not understood (unknown keys, missing parts, bad file)."""


# --------------------------------------------------------------------------- reading files


def _torch_version() -> tuple[int, int]:
    import torch

    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def pickles_allowed() -> bool:
    """weights_only=True is only trustworthy from torch 2.10 (CVE-2025-32434, CVE-2026-24747)."""
    return _torch_version() >= MIN_TORCH_FOR_PICKLE


def check_pickle_allowed(
    what: str = "a pickle checkpoint", fix: str = "convert the file to .safetensors"
) -> None:
    """Raise unless pickles may be read here (`pickles_allowed`); `what` names the file or
    folder in the message, `fix` says how to do without the pickle."""
    if not pickles_allowed():
        import torch

        raise ConversionError(
            f"refusing to read {what} with torch {torch.__version__}: torch.load(weights_only=True) "
            f"is only safe from torch 2.10; upgrade torch or {fix}"
        )


# --------------------------------------------------------------------------- diffusers folders

# The weights that diffusers' and transformers' `from_pretrained` look for first (then the
# index of their shards); each would fall back to `.bin` pickles without them.
DIFFUSERS_SAFE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors")
FOLDER_PICKLE_FIX = (
    "convert the folder to .safetensors (where torch >= 2.10 is installed: load it with "
    "diffusers' from_pretrained and save_pretrained it to a new folder)"
)


def _with_variant(name: str, variant: str | None) -> str:
    """diffusers' / transformers' `_add_variant`: "a.safetensors", "fp16" -> "a.fp16.safetensors"."""
    if not variant:
        return name
    parts = name.split(".")
    return ".".join([*parts[:-1], variant, parts[-1]])


def diffusers_variant(folder: Path) -> str | None:
    """The variant to load a pipeline folder with: "fp16" where it has only the fp16 files
    (what `models fetch` downloads of SD1.5: `unet/diffusion_pytorch_model.fp16.safetensors`),
    else None."""
    unet = folder / "unet"
    if (unet / "diffusion_pytorch_model.safetensors").is_file():
        return None
    return "fp16" if (unet / "diffusion_pytorch_model.fp16.safetensors").is_file() else None


def component_pickles(component: Path, variant: str | None = None) -> list[Path]:
    """The pickle files that `from_pretrained(component, variant=variant)` of diffusers or
    transformers could read: [] when the folder holds the safetensors weights they look for
    (load with `use_safetensors=True` then, which never falls back to a pickle), else every
    pickle in it (`diffusion_pytorch_model.bin`, `pytorch_model.bin`, shards).  A transformers
    config may also name its weights file (`transformers_weights`), loaded before any other."""
    config = component / "config.json"
    if config.is_file():
        try:
            named = json.loads(config.read_text(encoding="utf-8")).get("transformers_weights")
        except (ValueError, AttributeError):
            named = None  # the loader reports a bad config
        if (
            isinstance(named, str)
            and not Path(named).is_absolute()  # (refused by transformers)
            and not named.endswith((".safetensors", ".safetensors.index.json"))
        ):
            return [component / named]
    for name in DIFFUSERS_SAFE_WEIGHTS:
        for candidate in (name, name + ".index.json"):
            if (component / _with_variant(candidate, variant)).is_file():
                return []
    return sorted(p for p in component.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


def check_folder_pickles_allowed(folder: Path, pickles: Iterable[Path]) -> None:
    """`check_pickle_allowed` for a diffusers folder whose weights (`pickles`, inside it) are
    pickles, naming the folder and those files."""
    names = ", ".join(sorted(p.relative_to(folder).as_posix() for p in pickles))
    if names:
        check_pickle_allowed(
            f"the pickle weights of the diffusers folder {folder.name} ({names}; no .safetensors for them)",
            FOLDER_PICKLE_FIX,
        )


# What diffusers loads from a LoRA folder (hub MotionLoRA repos; `save_lora_weights`) and from
# a MotionAdapter folder.
LORA_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "pytorch_lora_weights.safetensors")
MOTION_ADAPTER_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def folder_weights_file(folder: Path, preferred: tuple[str, ...]) -> Path:
    """The weights file of a model folder that is loaded: the first of `preferred` present,
    else its only `.safetensors` file, else its only weights file.  The registry and the
    loaders both use this, so a folder listed as usable is the one that loads."""
    for name in preferred:
        if (folder / name).is_file():
            return folder / name
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SAFETENSORS_SUFFIXES and p.is_file())
    if not files:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in WEIGHT_SUFFIXES and p.is_file())
    if len(files) != 1:
        raise ConversionError(f"expected one weights file in the folder, found {len(files)}")
    return files[0]


def _unwrap(obj: Any, path: Path) -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path.name}: not a state dict (got {type(obj).__name__})")
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    return dict(obj)


def check_zip_complete(path: Path) -> None:
    """Raise for a torch zip checkpoint cut short (a download stopped, a full disk), which is
    no zip archive any more: torch's own message for it is an internal zip-reader error."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        raise ConversionError(
            f"{path.name}: truncated checkpoint (the end of its zip archive is missing: a download "
            "that stopped?); download it again"
        )


def check_zip_checksums(path: Path) -> None:
    """torch's zip reader does not verify CRCs: a corrupted byte inside a tensor of a
    `.ckpt` would load as a silently different weight."""
    if not zipfile.is_zipfile(path):
        check_zip_complete(path)
        return  # legacy (pre-1.6) torch pickles carry no checksums
    with zipfile.ZipFile(path) as zf:
        bad = zf.testzip()
    if bad is not None:
        raise ConversionError(f"{path.name}: corrupt checkpoint ({bad} fails its checksum)")


def _refused_pickle(path: Path, exc: pickle.UnpicklingError) -> ConversionError:
    """A short reason instead of torch's advice to retry with weights_only=False; a file
    that is no checkpoint at all (an HTML error page saved as .ckpt, random bytes) is
    called what it is, not a pickle of code."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        head = b""
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):  # torch's zip, a legacy pickle
        return ConversionError(
            f"{path.name}: not a PyTorch checkpoint (corrupt, or another kind of file such as a saved "
            "web page); download it again"
        )
    m = re.search(r"GLOBAL ([\w.]+)", str(exc))
    what = f"Python objects that are not tensors ({m.group(1)})" if m else "pickle code that is not plain tensors"
    return ConversionError(
        f"{path.name}: refused: the checkpoint holds {what}, and pickled code is never run; "
        "convert it to .safetensors"
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a weights file, on the CPU.  Non-tensor entries (metadata such as
    AnimateDiff's `animatediff_config`) are dropped."""
    import torch

    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in WEIGHT_SUFFIXES and path.is_file() and path.stat().st_size == 0:
            raise ConversionError(f"{path.name}: empty file (0 bytes)")
        if suffix in SAFETENSORS_SUFFIXES:
            from safetensors.torch import load_file

            raw: dict[str, Any] = dict(load_file(str(path), device="cpu"))
        elif suffix in PICKLE_SUFFIXES:
            check_pickle_allowed(f"{path.name} (a pickle checkpoint)")
            check_zip_checksums(path)
            raw = _unwrap(torch.load(str(path), map_location="cpu", weights_only=True), path)
        else:
            raise ConversionError(f"{path.name}: unsupported weights file type {suffix!r}")
    except ConversionError:
        raise
    except pickle.UnpicklingError as exc:
        raise _refused_pickle(path, exc) from exc
    except Exception as exc:  # corrupt or refused files: say which and why
        raise ConversionError(f"{path.name}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    tensors = {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors and "string_to_param" in raw:  # A1111's .pt embeddings
        raise ConversionError(f"{path.name}: a textual-inversion embedding, not a model: {EMBEDDINGS_UNSUPPORTED}")
    if not tensors:  # e.g. tensors nested one level deeper ({"model": {...}}): say so, not "empty"
        keys = ", ".join(sorted(str(k) for k in raw)[:5]) or "none"
        raise ConversionError(f"{path.name}: holds no tensors at the top level (keys: {keys})")
    return tensors


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor dtypes, shapes, offsets), validated
    against the file size, without reading any tensor."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ConversionError(f"{path.name}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
            raise ConversionError(f"{path.name}: truncated or corrupt safetensors header")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise ConversionError(f"{path.name}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ConversionError(f"{path.name}: corrupt safetensors header")
    data_len = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and offsets[1] <= data_len):
            raise ConversionError(f"{path.name}: truncated safetensors file (tensor {key} lies past the end)")
        shape = info.get("shape")  # callers read shapes from here: check them once
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ConversionError(f"{path.name}: corrupt safetensors header (tensor {key} has no valid shape)")
    return header


def read_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """key -> shape.  Cheap for safetensors (header only); pickles are loaded (weights_only)."""
    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        header = read_safetensors_header(path)
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    return {k: tuple(v.shape) for k, v in read_state_dict(path).items()}


def read_pickle_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """key -> shape of a torch zip checkpoint without reading its tensors: only its pickle is
    unpickled (weights_only), the storages are mapped onto the meta device.  For checkpoints
    too large to load at scan time.  A refused pickle raises ConversionError (as
    `read_state_dict` would); a file torch cannot map (a legacy pickle) raises what torch raises."""
    import torch

    path = Path(path)
    check_pickle_allowed(f"{path.name} (a pickle checkpoint)")
    try:
        raw = torch.load(str(path), map_location="meta", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise _refused_pickle(path, exc) from exc
    return {
        k: tuple(v.shape)
        for k, v in _unwrap(raw, path).items()
        if isinstance(k, str) and isinstance(v, torch.Tensor)
    }


# --------------------------------------------------------------------------- motion modules

# <block>.motion_modules.<i>.  in both layouts
_MM_BLOCK = r"(?P<block>(?:down_blocks|up_blocks)\.\d+|mid_block)\.motion_modules\.(?P<mm>\d+)\."
_ORIG_MM = re.compile(
    "^" + _MM_BLOCK + r"temporal_transformer\.(?P<rest>"
    r"(?:norm|proj_in|proj_out)\.(?:weight|bias)"
    r"|transformer_blocks\.\d+\.(?:"
    r"attention_blocks\.[01]\.(?:to_q\.weight|to_k\.weight|to_v\.weight|to_out\.0\.(?:weight|bias)|pos_encoder\.pe)"
    r"|norms\.[01]\.(?:weight|bias)"
    r"|ff_norm\.(?:weight|bias)"
    r"|ff\.net\.(?:0\.proj|2)\.(?:weight|bias)"
    r"))$"
)
_DIFF_MM = re.compile(
    "^" + _MM_BLOCK + r"(?P<rest>"
    r"(?:norm|proj_in|proj_out)\.(?:weight|bias)"
    r"|transformer_blocks\.\d+\.(?:"
    r"attn[12]\.(?:to_q\.weight|to_k\.weight|to_v\.weight|to_out\.0\.(?:weight|bias))"
    r"|pos_embed\.pe"
    r"|norm[123]\.(?:weight|bias)"
    r"|ff\.net\.(?:0\.proj|2)\.(?:weight|bias)"
    r"))$"
)

MotionLayout = Literal["original", "diffusers"]


def _fail_unknown(what: str, keys: Iterable[str]) -> None:
    bad = sorted(keys)
    if bad:
        shown = ", ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        raise ConversionError(f"{what}: {len(bad)} key(s) not understood: {shown}")


def motion_layout(keys: Iterable[str]) -> MotionLayout:
    """Which motion-module layout these keys are in; raises if neither (or a mix)."""
    keys = list(keys)
    if not keys:
        raise ConversionError("empty motion module file")
    orig = [k for k in keys if _ORIG_MM.match(k)]
    if len(orig) == len(keys):
        return "original"
    diff = [k for k in keys if _DIFF_MM.match(k)]
    if len(diff) == len(keys):
        return "diffusers"
    if orig and len(orig) >= len(diff):
        _fail_unknown("original motion module", (k for k in keys if not _ORIG_MM.match(k)))
    if diff:
        _fail_unknown("diffusers motion module", (k for k in keys if not _DIFF_MM.match(k)))
    _fail_unknown("motion module", keys)
    raise AssertionError("unreachable")


def _orig_rest_to_diffusers(rest: str) -> str:
    return (
        rest.replace(".norms.0.", ".norm1.")
        .replace(".norms.1.", ".norm2.")
        .replace(".ff_norm.", ".norm3.")
        .replace(".attention_blocks.0.", ".attn1.")
        .replace(".attention_blocks.1.", ".attn2.")
    )


def motion_original_to_diffusers(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Original AnimateDiff motion module -> diffusers MotionAdapter names.

    The renames are those of diffusers' `convert_animatediff_checkpoint_to_diffusers`;
    positional encodings (`pos_encoder.pe`) are dropped (the adapter recomputes the same
    sinusoids).  Unlike diffusers' helper this raises on any key it does not recognise."""
    out: dict[str, Any] = {}
    unknown = []
    for key, value in sd.items():
        m = _ORIG_MM.match(key)
        if not m:
            unknown.append(key)
            continue
        if key.endswith(".pos_encoder.pe"):
            continue
        new = f"{m.group('block')}.motion_modules.{m.group('mm')}.{_orig_rest_to_diffusers('.' + m.group('rest'))[1:]}"
        out[new] = value
    _fail_unknown("original motion module", unknown)
    return out


def motion_to_diffusers(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Either layout -> MotionAdapter keys without positional encodings."""
    if motion_layout(sd.keys()) == "original":
        return motion_original_to_diffusers(sd)
    return {k: v for k, v in sd.items() if not k.endswith(".pos_embed.pe")}


def motion_max_seq_length(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """From the positional encodings' shape (1, max_len, C), if the file has them."""
    for key, shape in shapes.items():
        if key.endswith((".pos_encoder.pe", ".pos_embed.pe")) and len(shape) == 3:
            return int(shape[1])
    return None


def _indices(keys: Iterable[str], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def check_sd15_motion_blocks(n_down: int) -> None:
    """An SDXL motion module (mm_sdxl_v10_beta: 3 blocks) reads like a v3 one otherwise."""
    if n_down != SD15_DOWN_BLOCKS:
        raise ConversionError(
            f"not an SD1.5 motion module: {n_down} down blocks, SD1.5 has {SD15_DOWN_BLOCKS} "
            "(an SDXL motion module such as mm_sdxl_v10_beta?)"
        )


def motion_adapter_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """MotionAdapter kwargs inferred from the weights (either layout): widths from the
    motion modules' norms, layer counts from the indices, max length from `pe`.
    Head count and group count cannot be read from weights: AnimateDiff uses 8 and 32."""
    layout = motion_layout(shapes.keys())
    keys = list(shapes)
    tt = "temporal_transformer." if layout == "original" else ""
    down = _indices(keys, r"^down_blocks\.(\d+)\.motion_modules\.")
    if not down or down != list(range(len(down))):
        raise ConversionError("motion module has no (or non-contiguous) down block motion modules")
    check_sd15_motion_blocks(len(down))
    widths = []
    for i in down:
        key = f"down_blocks.{i}.motion_modules.0.{tt}norm.weight"
        if key not in shapes:
            raise ConversionError(f"motion module lacks {key}")
        widths.append(int(shapes[key][0]))
    layers = _indices(keys, r"^down_blocks\.0\.motion_modules\.(\d+)\.")
    tblocks = _indices(
        keys, r"^down_blocks\.0\.motion_modules\.0\.(?:temporal_transformer\.)?transformer_blocks\.(\d+)\."
    )
    mid = _indices(keys, r"^mid_block\.motion_modules\.(\d+)\.")
    max_len = motion_max_seq_length(shapes)
    return {
        "block_out_channels": widths,
        "motion_layers_per_block": len(layers),
        "motion_transformer_layers_per_block": max(len(tblocks), 1),
        "motion_mid_block_layers_per_block": max(len(mid), 1),
        "motion_num_attention_heads": 8,
        "motion_norm_num_groups": 32,
        "motion_max_seq_length": max_len if max_len is not None else 32,
        "use_motion_mid_block": bool(mid),
        "conv_in_channels": None,
    }


def names_lcm(filename: str) -> bool:
    """Whether a file name says AnimateLCM / LCM ("AnimateLCM_sd15_t2v.ckpt", "lcm-lora-sdv1-5")."""
    name = filename.lower()
    return "animatelcm" in name or re.search(r"(^|[_\-.])lcm([_\-.]|$)", name) is not None


def detect_motion_version(shapes: Mapping[str, tuple[int, ...]], filename: str = "") -> str:
    """Version: "v1" (max length 24), "v2" (mid block), "v3" (no mid block, length 32); files whose
    names say so are labelled "lightning" (AnimateDiff-Lightning) or "lcm" (AnimateLCM)."""
    name = filename.lower()
    if "lightning" in name:
        return "lightning"
    if names_lcm(name):
        return "lcm"
    motion_layout(shapes.keys())  # raises on files that are no motion module
    if any(k.startswith("mid_block.motion_modules.") for k in shapes):
        return "v2"
    if motion_max_seq_length(shapes) == 24:
        return "v1"
    return "v3"


# --------------------------------------------------------------------------- LoRAs

LoraScope = Literal["motion", "spatial"]

_LORA_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
# original AnimateDiff MotionLoRA (v2_lora_*.ckpt)
_ORIG_MOTION_LORA = re.compile(
    "^"
    + _MM_BLOCK
    + r"temporal_transformer\.transformer_blocks\.(?P<tb>\d+)\.attention_blocks\.(?P<attn>[01])\."
    r"processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$"
)
# attention-processor LoRA on diffusers names (hub MotionLoRA repos, v3 domain adapter)
_OLD_LORA = re.compile(
    r"^(?:unet\.)?(?P<module>.+\.attn[12])\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$"
)
# peft naming
_PEFT_LORA = re.compile(r"^(?:unet\.)?(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")
_PEFT_ALPHA = re.compile(r"^(?:unet\.)?(?P<module>.+)\.alpha$")

_MOTION_TARGET = re.compile(
    r"^(?:down_blocks|up_blocks)\.\d+\.motion_modules\.\d+\.transformer_blocks\.\d+\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0)$"
    r"|^mid_block\.motion_modules\.\d+\.transformer_blocks\.\d+\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0)$"
)
# The UNet's own layers (never its motion modules): the attention projections the v3 domain
# adapter adapts, and the rest of the linear and conv layers that LCM-LoRA-style spatial LoRAs
# (AnimateLCM's `AnimateLCM_sd15_t2v_lora.safetensors`) and kohya LoRAs also adapt.
_SPATIAL_TARGET = re.compile(
    r"^(?:(?:down_blocks|up_blocks)\.\d+|mid_block)\.(?:"
    r"attentions\.\d+\.(?:proj_in|proj_out|transformer_blocks\.\d+\.(?:"
    r"attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))"
    r"|resnets\.\d+\.(?:conv1|conv2|conv_shortcut|time_emb_proj)"
    r"|(?:downsamplers|upsamplers)\.0\.conv)$"
    r"|^(?:conv_in|conv_out|time_embedding\.linear_[12])$"
)

# kohya-ss LoRAs for SD1.x (sd-scripts trains them on the diffusers UNet, so a module keeps its
# diffusers path with "_" for "."): `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` /
# `.alpha`.  The LCM-LoRA, AnimateLCM's spatial LoRA and most style LoRAs come this way.
_KOHYA_KEY = re.compile(
    r"^lora_(?P<net>unet|te\d?)_(?P<name>[A-Za-z0-9_]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$"
)
_KOHYA_UNET_MODULE = re.compile(
    r"^(?:(?P<block>(?:down|up)_blocks_\d+|mid_block)_(?:"
    r"attentions_(?P<attn>\d+)_(?:(?P<proj>proj_in|proj_out)"
    r"|transformer_blocks_(?P<tb>\d+)_(?:attn(?P<attn_n>[12])_(?P<qkvo>to_q|to_k|to_v|to_out_0)"
    r"|(?P<ff>ff_net_0_proj|ff_net_2)))"
    r"|resnets_(?P<res>\d+)_(?P<res_layer>conv1|conv2|conv_shortcut|time_emb_proj)"
    r"|(?P<sampler>downsamplers|upsamplers)_0_conv)"
    r"|(?P<top>conv_in|conv_out|time_embedding_linear_[12]))$"
)
# kohya names of SD1.x's CLIP text encoder (sd-scripts trains transformers' CLIPTextModel):
# `lora_te_text_model_encoder_layers_<N>_<self_attn_q_proj|...|mlp_fc2>`.
_KOHYA_TE_MODULE = re.compile(
    r"^text_model_encoder_layers_(?P<layer>\d+)_(?P<proj>self_attn_(?:q|k|v|out)_proj|mlp_fc[12])$"
)
SD1_TEXT_ENCODER_LAYERS = 12  # CLIP ViT-L/14's text transformer; SD2's OpenCLIP ViT-H has 23 (24)


def _kohya_te_module(name: str) -> str | None:
    """`text_model_encoder_layers_3_self_attn_q_proj` -> `text_model.encoder.layers.3.self_attn.q_proj`
    (CLIPTextModel's path as checkpoints and diffusers' keys name it; diffusers drops
    `text_model.` for transformers' flattened class); None for no layer of it."""
    m = _KOHYA_TE_MODULE.match(name)
    if m is None:
        return None
    proj = m["proj"].replace("self_attn_", "self_attn.", 1).replace("mlp_", "mlp.", 1)
    return f"text_model.encoder.layers.{m['layer']}.{proj}"


# kohya names of the LDM UNet (`input_blocks_1_1_...`, written by some SDXL-era trainers), and
# the LyCORIS variants (LoHa, LoKr, DoRA) that are no low-rank pair.
_KOHYA_LDM_BLOCKS = re.compile(r"^lora_unet_(?:input_blocks|middle_block|output_blocks)_")
_LYCORIS_PARTS = re.compile(r"\.(?:hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t2|dora_scale|diff|diff_b)$")


def _kohya_unet_module(name: str) -> str | None:
    """`down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0` ->
    `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`; None for a name that is
    no layer of the SD1.x UNet (so the caller can say which)."""
    m = _KOHYA_UNET_MODULE.match(name)
    if m is None:
        return None
    if m["top"]:
        return m["top"].replace("embedding_linear_", "embedding.linear_")
    block = m["block"] if m["block"] == "mid_block" else m["block"].replace("blocks_", "blocks.")
    if m["sampler"]:
        return f"{block}.{m['sampler']}.0.conv"
    if m["res"] is not None:
        return f"{block}.resnets.{m['res']}.{m['res_layer']}"
    attn = f"{block}.attentions.{m['attn']}"
    if m["proj"]:
        return f"{attn}.{m['proj']}"
    tb = f"{attn}.transformer_blocks.{m['tb']}"
    if m["ff"]:
        return f"{tb}.{m['ff'].replace('_', '.')}"
    return f"{tb}.attn{m['attn_n']}.{_LORA_PROJ[m['qkvo'].removesuffix('_0')]}"


@dataclass
class LoraWeights:
    """A LoRA ready for `AnimateDiffPipeline.load_lora_weights(state_dict, adapter_name=...)`.

    `state_dict` keys are `unet.<module>.lora_A.weight` (down, rank x in) and
    `unet.<module>.lora_B.weight` (up, out x rank), `<module>` a diffusers module path of the
    pipeline's UNetMotionModel.  `target_modules` lists those module paths (without `unet.`),
    so callers can assert that every one received a LoRA layer (see
    `loading.verify_lora_applied`).  A kohya style LoRA may also hold CLIP text-encoder
    layers: keys `text_encoder.<module>.lora_A.weight` / `.lora_B.weight`, their module paths
    (`text_model.encoder.layers.N.self_attn.q_proj`, ...) in `text_encoder_modules`."""

    state_dict: dict[str, torch.Tensor]
    target_modules: set[str]
    rank: int
    network_alpha: float | None
    source_format: str  # "original", "diffusers", "peft", "kohya"
    scope: LoraScope = "motion"
    metadata: dict[str, Any] = field(default_factory=dict)
    text_encoder_modules: set[str] = field(default_factory=set)


def lora_format(keys: Iterable[str]) -> str:
    keys = list(keys)
    if keys and all(_ORIG_MOTION_LORA.match(k) for k in keys):
        return "original"
    if keys and all(_OLD_LORA.match(k) for k in keys):
        # `unet.`-prefixed: diffusers' hub conversion; bare module names: AnimateDiff's own
        # files (the v3 domain adapter), which its loader applies relative to the UNet.
        return "diffusers" if all(k.startswith("unet.") for k in keys) else "original"
    if keys and all(_PEFT_LORA.match(k) or _PEFT_ALPHA.match(k) for k in keys):
        return "peft"
    if keys and all(k.startswith(_KOHYA_PREFIXES) for k in keys):
        return "kohya"  # its layers are checked by `lora_to_peft`, which says what it cannot apply
    raise ConversionError(
        "LoRA layout not understood: "
        + ", ".join(
            sorted(
                k
                for k in keys
                if not (_ORIG_MOTION_LORA.match(k) or _OLD_LORA.match(k) or _PEFT_LORA.match(k))
            )[:5]
        )
        if keys
        else "empty LoRA file"
    )


# diffusers' LORA_ADAPTER_METADATA_KEY: the safetensors header entry holding a LoRA's peft config.
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
_PEFT_DEFAULT_R = _PEFT_DEFAULT_ALPHA = 8  # peft's LoraConfig defaults, which diffusers falls back to


def lora_adapter_config(path: Path) -> dict[str, Any] | None:
    """The peft LoraConfig that diffusers' `save_lora_weights(..., unet_lora_adapter_metadata=)`
    and `save_lora_adapter` keep in a safetensors header (`{"unet.r": 4, "unet.lora_alpha": 2,
    ...}` as JSON under `lora_adapter_metadata`), without its `unet.` prefix; None when the file
    has none (pickles never do).  Stock `load_lora_weights` scales the LoRA by it."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return None
    meta = read_safetensors_header(path).get("__metadata__")
    raw = meta.get(LORA_ADAPTER_METADATA_KEY) if isinstance(meta, dict) else None
    if raw is None:
        return None
    try:
        config = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{path.name}: corrupt {LORA_ADAPTER_METADATA_KEY} in the header ({exc})") from exc
    if not isinstance(config, dict):
        raise ConversionError(f"{path.name}: corrupt {LORA_ADAPTER_METADATA_KEY} in the header (not an object)")
    unet = {k.removeprefix("unet."): v for k, v in config.items() if k.startswith("unet.")}
    # `save_lora_adapter` of a bare UNet writes the keys without a prefix.
    return unet or {k: v for k, v in config.items() if "." not in k} or None


def _config_alpha(config: Mapping[str, Any], rank: int) -> float:
    """The network alpha (scale = alpha / rank, as the engine applies it) that makes a LoRA
    as strong as diffusers' `LoraConfig(**config)` does."""
    r = config.get("r", _PEFT_DEFAULT_R)
    alpha = config.get("lora_alpha", _PEFT_DEFAULT_ALPHA)
    if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
        raise ConversionError(f"LoRA header: bad rank r={r!r}")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)):
        raise ConversionError(f"LoRA header: bad lora_alpha={alpha!r}")
    if r != rank:
        raise ConversionError(f"LoRA header says rank {r}, its weights have rank {rank}")
    for name, default in (("rank_pattern", r), ("alpha_pattern", alpha)):
        pattern = config.get(name) or {}
        if not isinstance(pattern, dict) or any(v != default for v in pattern.values()):
            raise ConversionError(f"LoRA header sets per-module ranks or alphas ({name}), which is not supported")
    if config.get("use_dora"):
        raise ConversionError("DoRA LoRAs are not supported")
    if config.get("use_rslora"):
        return float(alpha) * math.sqrt(r)  # rsLoRA scales by alpha / sqrt(r)
    return float(alpha)


def lora_to_peft(
    sd: Mapping[str, torch.Tensor], scope: LoraScope, config: Mapping[str, Any] | None = None
) -> LoraWeights:
    """Convert a LoRA file's state dict (original, diffusers-hub or peft layout) to the
    peft keys diffusers applies; raises on unknown keys, unpaired halves, inconsistent
    ranks or modules outside `scope` ("motion": motion-module attention, "spatial": the
    UNet's own attention layers, where the v3 domain adapter lives).  `config` is the
    file's peft config (`lora_adapter_config`): its alpha sets `network_alpha`."""
    fmt = lora_format(sd.keys())
    if fmt == "kohya":
        return _kohya_to_peft(sd, scope)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for key, value in sd.items():
        if _ORIG_MOTION_LORA.match(key):
            m = _ORIG_MOTION_LORA.match(key)
            assert m is not None
            module = (
                f"{m.group('block')}.motion_modules.{m.group('mm')}.transformer_blocks.{m.group('tb')}."
                f"attn{int(m.group('attn')) + 1}.{_LORA_PROJ[m.group('proj')]}"
            )
            part = "A" if m.group("part") == "down" else "B"
        elif _OLD_LORA.match(key):
            m = _OLD_LORA.match(key)
            assert m is not None
            module = f"{m.group('module')}.{_LORA_PROJ[m.group('proj')]}"
            part = "A" if m.group("part") == "down" else "B"
        else:
            if (ma := _PEFT_ALPHA.match(key)) and not _PEFT_LORA.match(key):
                alphas[ma.group("module")] = float(value.item())
                continue
            m = _PEFT_LORA.match(key)
            assert m is not None
            module, part = m.group("module"), m.group("part")
        slot = parts.setdefault(module, {})
        if part in slot:
            raise ConversionError(f"LoRA has two {part} weights for {module}")
        slot[part] = value

    _check_scope(parts, scope)
    pairs = {module: _lora_pair(module, slot) for module, slot in sorted(parts.items())}
    if scope == "spatial":
        _check_sd1_spatial(pairs)
    out: dict[str, torch.Tensor] = {}
    ranks = set()
    for module, (a, b) in pairs.items():
        ranks.add(int(a.shape[0]))
        out[f"unet.{module}.lora_A.weight"] = a
        out[f"unet.{module}.lora_B.weight"] = b
    if len(ranks) != 1:
        raise ConversionError(f"LoRA has mixed ranks {sorted(ranks)}")
    alpha_values = set(alphas.values())
    if len(alpha_values) > 1:
        raise ConversionError("LoRA has per-module alphas, which is not supported")
    rank = ranks.pop()
    alpha = alpha_values.pop() if alpha_values else None
    if config is not None:
        header_alpha = _config_alpha(config, rank)
        if alpha is not None and alpha != header_alpha:
            raise ConversionError(f"LoRA has alpha {alpha:g} in its keys but {header_alpha:g} in its header")
        alpha = header_alpha
    return LoraWeights(
        state_dict=out,
        target_modules=set(parts),
        rank=rank,
        network_alpha=alpha,
        source_format=fmt,
        scope=scope,
    )


_SCOPE_LAYERS = {"motion": "the motion attention layers", "spatial": "the spatial layers (the UNet's own)"}


def _check_scope(modules: Iterable[str], scope: LoraScope) -> None:
    target = _MOTION_TARGET if scope == "motion" else _SPATIAL_TARGET
    _fail_unknown(
        f"{scope} LoRA (modules outside {_SCOPE_LAYERS[scope]})", (m for m in modules if not target.match(m))
    )


SD1_CROSS_ATTENTION_WIDTH = 768  # CLIP ViT-L's hidden size; SD2 has 1024, SDXL 2048
_TRANSFORMER_BLOCK = re.compile(r"\.transformer_blocks\.(\d+)\.")


def _check_sd1_spatial(pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Refuse a spatial LoRA made for another base (SD2, SDXL) at scan time, by its shapes:
    its names alone fit an SD1.x UNet, but loading it fails on every job with hundreds of
    lines of size mismatches.  SD1.x: cross-attention keys/values from 768 features, one
    transformer block per attention, 1x1 conv projections in and out (SD2 and SDXL project
    with linear layers)."""
    for module, (a, _b) in sorted(pairs.items()):
        reason = ""
        if module.endswith(("attn2.to_k", "attn2.to_v")) and a.shape[1] > SD1_CROSS_ATTENTION_WIDTH:
            reason = f"its cross-attention takes {a.shape[1]} features, SD1.x {SD1_CROSS_ATTENTION_WIDTH}"
        elif (m := _TRANSFORMER_BLOCK.search(module)) and int(m.group(1)) > 0:
            reason = "it has several transformer blocks per attention, SD1.x one"
        elif module.endswith((".proj_in", ".proj_out")) and a.ndim == 2:
            reason = "its attention projections are linear layers, SD1.x's 1x1 convolutions"
        if reason:
            raise ConversionError(f"made for another base model (SD2 or SDXL?), not SD1.x: {reason} ({module})")


def _lora_pair(module: str, slot: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A module's (down, up) matrices, checked to pair: (rank, in) / (out, rank) for a linear
    layer; (rank, in, kh, kw) / (out, rank, 1, 1) for a conv layer, as peft's conv LoRA holds them."""
    if "A" not in slot or "B" not in slot:
        raise ConversionError(f"LoRA for {module} lacks its {'up' if 'A' in slot else 'down'} weight")
    a, b = slot["A"], slot["B"]
    linear = a.ndim == b.ndim == 2
    conv = a.ndim == b.ndim == 4 and tuple(b.shape[2:]) == (1, 1)
    if not (linear or conv) or a.shape[0] != b.shape[1]:
        raise ConversionError(f"LoRA for {module}: shapes {tuple(a.shape)} / {tuple(b.shape)} do not pair")
    return a, b


_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_KOHYA_PART = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}
# The key prefix diffusers' `load_lora_weights` routes to the pipeline's text encoder (its
# `text_encoder_name`; `unet.` goes to the UNet).
TEXT_ENCODER_PREFIX = "text_encoder."


def _kohya_to_peft(sd: Mapping[str, torch.Tensor], scope: LoraScope) -> LoraWeights:
    """A kohya LoRA (see `_KOHYA_KEY`) as peft keys.  Each layer's alpha / rank (kohya's
    per-layer scale; 1 without an alpha) is multiplied into its up matrix, so layers with
    their own ranks or alphas (a LoCon's conv layers) run exactly as kohya runs them, and
    `network_alpha` is None.  A spatial LoRA's CLIP text-encoder layers (`lora_te_`: most
    style LoRAs train them) become `text_encoder.` keys, applied at the same weight, as
    kohya / A1111 / diffusers apply them.  Refused in words: SDXL's two text encoders
    (`lora_te1_` / `lora_te2_`), text-encoder layers in a MotionLoRA, LDM block names,
    LyCORIS layers (LoHa, LoKr, DoRA)."""
    lycoris = sorted(k for k in sd if _LYCORIS_PARTS.search(k))
    if lycoris:
        raise ConversionError(
            f"LyCORIS layers ({lycoris[0]}) are not supported: only plain LoRA layers (lora_down / lora_up)"
        )
    sdxl = sorted(k for k in sd if k.startswith(("lora_te1_", "lora_te2_")))
    if sdxl:
        raise ConversionError(
            f"made for SDXL, not SD1.x: the LoRA changes SDXL's two text encoders (e.g. {sdxl[0]})"
        )
    text = sorted({k.split(".", 1)[0] for k in sd if k.startswith("lora_te_")})
    if text and scope == "motion":
        raise ConversionError(
            f"the LoRA also changes the text encoder ({len(text)} layers, e.g. {text[0]}), "
            "which a MotionLoRA never does: a style LoRA is a spatial LoRA (adapter/)"
        )
    ldm = sorted(k for k in sd if _KOHYA_LDM_BLOCKS.match(k))
    if ldm:
        raise ConversionError(
            f"the LoRA names the LDM UNet's blocks ({ldm[0]}), which is not supported: "
            "only kohya LoRAs on diffusers names (lora_unet_down_blocks_...) are"
        )
    unet_parts, te_parts = _kohya_parts(sd)
    _check_scope(unet_parts, scope)
    unet_pairs = {module: _lora_pair(module, slot) for module, slot in sorted(unet_parts.items())}
    te_pairs = {module: _lora_pair(module, slot) for module, slot in sorted(te_parts.items())}
    if scope == "spatial":
        _check_sd1_spatial(unet_pairs)
    _check_sd1_text_encoder(te_pairs)
    out: dict[str, torch.Tensor] = {}
    ranks: list[int] = []
    for prefix, parts, pairs in (("unet.", unet_parts, unet_pairs), (TEXT_ENCODER_PREFIX, te_parts, te_pairs)):
        for module, (a, b) in pairs.items():
            ranks.append(int(a.shape[0]))
            out[f"{prefix}{module}.lora_A.weight"] = a
            out[f"{prefix}{module}.lora_B.weight"] = _kohya_scaled_up(module, parts[module], a, b)
    return LoraWeights(
        state_dict=out,
        target_modules=set(unet_parts),
        rank=max(set(ranks), key=ranks.count),  # the commonest (layers may differ: see above)
        network_alpha=None,
        source_format="kohya",
        scope=scope,
        text_encoder_modules=set(te_parts),
    )


_KohyaParts = dict[str, dict[str, "torch.Tensor"]]  # module -> {"A", "B", "alpha"} -> tensor


def _kohya_parts(sd: Mapping[str, torch.Tensor]) -> tuple[_KohyaParts, _KohyaParts]:
    """The UNet's and the text encoder's layers of a kohya LoRA, by module path; raises on
    a key that names no layer of either (SD1.x's)."""
    unet: _KohyaParts = {}
    text: _KohyaParts = {}
    unknown_unet: list[str] = []
    unknown_text: list[str] = []
    for key, value in sd.items():
        is_text = key.startswith("lora_te_")
        m = _KOHYA_KEY.match(key)
        module = (_kohya_te_module if is_text else _kohya_unet_module)(m["name"]) if m else None
        if m is None or module is None:
            (unknown_text if is_text else unknown_unet).append(key)
            continue
        (text if is_text else unet).setdefault(module, {})[_KOHYA_PART[m["part"]]] = value
    _fail_unknown("kohya LoRA (no layer of an SD1.x UNet)", unknown_unet)
    _fail_unknown("kohya LoRA (no layer of SD1.x's CLIP text encoder)", unknown_text)
    return unet, text


def _kohya_scaled_up(
    module: str, slot: Mapping[str, torch.Tensor], a: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """The up matrix `b` times the layer's alpha / rank (peft then scales by 1)."""
    if "alpha" not in slot:
        return b
    alpha = slot["alpha"]
    if alpha.numel() != 1 or not math.isfinite(float(alpha.reshape(()).item())):
        raise ConversionError(f"LoRA for {module}: bad alpha {alpha.tolist()!r}")
    scale = float(alpha.reshape(()).item()) / int(a.shape[0])
    return b if scale == 1.0 else (b.float() * scale).to(b.dtype)


def _check_sd1_text_encoder(pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Refuse text-encoder layers made for another base (SD2's OpenCLIP: 1024 wide, 23
    layers, under the same kohya names) at scan time, as `_check_sd1_spatial` does the
    UNet's: by upper bounds, so the zoo's narrow, shallow CLIP passes as its UNet does."""
    n = SD1_TEXT_ENCODER_LAYERS
    for module, (a, b) in sorted(pairs.items()):
        if a.ndim != 2:
            raise ConversionError(f"LoRA for {module}: a conv-shaped pair {tuple(a.shape)} on a linear layer")
        layer = int(module.split(".")[3])  # text_model.encoder.layers.<N>.
        width = int(b.shape[0] if module.endswith(".fc2") else a.shape[1])  # fc2: intermediate -> hidden
        reason = ""
        if layer >= n:
            reason = f"its text encoder has more than {n} layers (layer {layer}), SD1.x's {n}"
        elif width > SD1_CROSS_ATTENTION_WIDTH:
            reason = f"its text encoder is {width} wide, SD1.x's {SD1_CROSS_ATTENTION_WIDTH}"
        if reason:
            raise ConversionError(f"made for another base model (SD2?), not SD1.x: {reason} ({module})")


def read_lora(path: Path, scope: LoraScope) -> LoraWeights:
    """A LoRA weights file as `lora_to_peft` gives it, with the alpha of its header."""
    return lora_to_peft(read_state_dict(path), scope, lora_adapter_config(path))
