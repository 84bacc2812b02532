"""`animatediff-blender models fetch` / `verify`: the standard model set from the Hugging Face
hub into the registry layout, with a sha256 manifest.

What is fetched (group names for `--only`):

    sd15            stable-diffusion-v1-5/stable-diffusion-v1-5 -> base/stable-diffusion-v1-5/
                    (diffusers folders, fp16 safetensors only, no safety checker; its
                    tokenizer is also what single-file SD1.5 checkpoints load with)
    motion-v2       guoyww/animatediff-motion-adapter-v1-5-2 -> motion/animatediff-motion-adapter-v1-5-2/
    motion-v3       guoyww/animatediff-motion-adapter-v1-5-3 -> motion/animatediff-motion-adapter-v1-5-3/
    loras           guoyww/animatediff-motion-lora-<move> (8 camera moves) -> lora/animatediff-motion-lora-<move>/
    adapter-v3      guoyww/animatediff: v3_sd15_adapter.ckpt -> adapter/v3_sd15_adapter.ckpt
    lightning       ByteDance/AnimateDiff-Lightning: animatediff_lightning_4step_diffusers.safetensors
                    -> motion/animatediff_lightning_4step_diffusers.safetensors
    lcm             wangfuyun/AnimateLCM: its diffusers MotionAdapter -> motion/AnimateLCM/, and its
                    spatial LCM LoRA (kohya layout), which the `lcm` preset adds at 0.8
                    -> adapter/AnimateLCM_sd15_t2v_lora.safetensors

Downloads go through `huggingface_hub` (`hf_hub_download` / `snapshot_download`, which resume
interrupted files and show progress).  Where the hub publishes a file's sha256 (LFS files)
the download is checked against it.  `<models>/manifest.json` records every fetched file's
size and sha256; `verify` re-hashes them (and the zoo's `zoo.json` entries, if present).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

MANIFEST = "manifest.json"
ZOO_MANIFEST = "zoo.json"

LORA_MOVES = (
    "zoom-in",
    "zoom-out",
    "pan-left",
    "pan-right",
    "tilt-up",
    "tilt-down",
    "rolling-clockwise",
    "rolling-anticlockwise",
)

SD15_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
)


@dataclass(frozen=True)
class FetchItem:
    group: str
    repo_id: str
    dest: str  # relative to the models dir: a folder (files kept at their repo paths) or a file
    files: tuple[str, ...]  # repo paths
    is_folder: bool = True


def standard_items() -> list[FetchItem]:
    items = [
        FetchItem(
            "sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "base/stable-diffusion-v1-5", SD15_FILES
        ),
        FetchItem(
            "motion-v2",
            "guoyww/animatediff-motion-adapter-v1-5-2",
            "motion/animatediff-motion-adapter-v1-5-2",
            ("config.json", "diffusion_pytorch_model.safetensors"),
        ),
        FetchItem(
            "motion-v3",
            "guoyww/animatediff-motion-adapter-v1-5-3",
            "motion/animatediff-motion-adapter-v1-5-3",
            ("config.json", "diffusion_pytorch_model.safetensors"),
        ),
    ]
    items += [
        FetchItem(
            "loras",
            f"guoyww/animatediff-motion-lora-{move}",
            f"lora/animatediff-motion-lora-{move}",
            ("diffusion_pytorch_model.safetensors",),
        )
        for move in LORA_MOVES
    ]
    items += [
        FetchItem(
            "adapter-v3",
            "guoyww/animatediff",
            "adapter/v3_sd15_adapter.ckpt",
            ("v3_sd15_adapter.ckpt",),
            False,
        ),
        FetchItem(
            "lightning",
            "ByteDance/AnimateDiff-Lightning",
            "motion/animatediff_lightning_4step_diffusers.safetensors",
            ("animatediff_lightning_4step_diffusers.safetensors",),
            False,
        ),
        FetchItem(
            "lcm", "wangfuyun/AnimateLCM", "motion/AnimateLCM", ("config.json", "diffusion_pytorch_model.safetensors")
        ),
        FetchItem(
            "lcm",
            "wangfuyun/AnimateLCM",
            "adapter/AnimateLCM_sd15_t2v_lora.safetensors",
            ("AnimateLCM_sd15_t2v_lora.safetensors",),
            False,
        ),
    ]
    return items


GROUPS = tuple(dict.fromkeys(item.group for item in standard_items()))


class FetchError(RuntimeError):
    pass


class Downloader(Protocol):
    """How files reach the disk (the hub in real use; a fake in tests)."""

    def download(self, repo_id: str, filename: str, local_dir: Path) -> Path:
        """Download `filename` of `repo_id` to `local_dir / filename` (resuming); return it."""
        ...

    def expected_sha256(self, repo_id: str, filenames: Iterable[str]) -> dict[str, str]:
        """sha256 the hub publishes for these files (LFS files); may be empty."""
        ...


def _hub_logs_once() -> None:
    """huggingface_hub gives its logger a handler of its own (added when it is imported) and
    lets its records propagate as well: where the root logger has a handler too (the CLI's
    `logging.basicConfig`), each of its warnings (every retry of a failing download) was
    printed twice.  Then its own handler goes, and the root handler prints them once, in the
    CLI's format.  Without a root handler (a library caller) huggingface_hub's stays."""
    import huggingface_hub.utils.logging  # noqa: F401  (where the handler is added)

    hub = logging.getLogger("huggingface_hub")
    if not (hub.propagate and logging.getLogger().handlers):
        return
    for handler in list(hub.handlers):
        if type(handler) is logging.StreamHandler:  # huggingface_hub's, not one a user added
            hub.removeHandler(handler)


class HubDownloader:
    def download(self, repo_id: str, filename: str, local_dir: Path) -> Path:
        from huggingface_hub import hf_hub_download

        _hub_logs_once()
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, local_dir=str(local_dir)))

    def expected_sha256(self, repo_id: str, filenames: Iterable[str]) -> dict[str, str]:
        from huggingface_hub import HfApi

        _hub_logs_once()
        wanted = set(filenames)
        info = HfApi().model_info(repo_id, files_metadata=True)
        out = {}
        for sib in info.siblings or []:
            lfs = getattr(sib, "lfs", None)
            sha = getattr(lfs, "sha256", None) if lfs is not None else None
            if sib.rfilename in wanted and sha:
                out[sib.rfilename] = str(sha)
        return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def plan(only: Iterable[str] | None = None) -> list[FetchItem]:
    items = standard_items()
    if not only:
        return items
    wanted = set(only)
    unknown = wanted - set(GROUPS)
    if unknown:
        raise FetchError(f"unknown group(s) {sorted(unknown)}; choose from {', '.join(GROUPS)}")
    return [i for i in items if i.group in wanted]


@dataclass
class FetchReport:
    fetched: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def _read_manifest(models_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((models_dir / MANIFEST).read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("files"), list):
            return data
    except (OSError, ValueError):
        pass
    return {"version": 1, "files": []}


def _write_manifest(models_dir: Path, data: dict[str, Any]) -> None:
    tmp = models_dir / (MANIFEST + ".tmp")
    data["files"].sort(key=lambda f: f["path"])
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, models_dir / MANIFEST)


def _no_safety_checker(model_index: Path) -> None:
    """The SD1.5 repo's model_index names a safety checker we do not download."""
    data = json.loads(model_index.read_text(encoding="utf-8"))
    data["safety_checker"] = [None, None]
    data["feature_extractor"] = [None, None]
    data["requires_safety_checker"] = False
    model_index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def fetch(
    models_dir: Path,
    only: Iterable[str] | None = None,
    downloader: Downloader | None = None,
    out: Any = None,
) -> FetchReport:
    """Download the standard set (or the `only` groups) into `models_dir`, check hub
    sha256s where published, and record every file in the manifest."""
    out = out or sys.stdout
    downloader = downloader or HubDownloader()
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(models_dir)
    report = FetchReport()
    for item in plan(only):
        target = models_dir / item.dest
        local_dir = target if item.is_folder else target.parent
        print(f"fetching {item.repo_id} -> {item.dest}", file=out, flush=True)
        try:
            try:
                expected = downloader.expected_sha256(item.repo_id, item.files)
            except Exception as exc:  # metadata is a bonus; the download itself still resumes
                print(f"  (no hub checksums: {exc})", file=out)
                expected = {}
            records = []
            for name in item.files:
                path = downloader.download(item.repo_id, name, local_dir)
                digest = sha256_file(path)
                if name in expected and expected[name] != digest:
                    path.unlink(missing_ok=True)
                    raise FetchError(
                        f"{item.repo_id}/{name}: sha256 {digest} differs from the hub's {expected[name]}"
                    )
                if name == "model_index.json":
                    _no_safety_checker(path)
                    digest = sha256_file(path)
                rel = path.relative_to(models_dir).as_posix()
                records.append(
                    {
                        "path": rel,
                        "size": path.stat().st_size,
                        "sha256": digest,
                        "repo_id": item.repo_id,
                        "file": name,
                    }
                )
        except Exception as exc:
            report.failed.append(f"{item.repo_id}: {exc}")
            print(f"  FAILED: {exc}", file=out)
            continue
        paths = {r["path"] for r in records}
        manifest["files"] = [f for f in manifest["files"] if f.get("path") not in paths] + records
        _write_manifest(models_dir, manifest)
        report.fetched.append(item.dest)
    return report


@dataclass
class VerifyResult:
    checked: int = 0
    problems: list[str] = field(default_factory=list)


def verify(models_dir: Path) -> VerifyResult:
    """Re-hash every file listed in `manifest.json` and `zoo.json`; list what is missing or differs."""
    models_dir = Path(models_dir)
    result = VerifyResult()
    listed = []
    for name in (MANIFEST, ZOO_MANIFEST):
        p = models_dir / name
        if p.is_file():
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
                listed += list(data["files"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                result.problems.append(f"{name}: unreadable ({exc})")
    if not listed and not result.problems:
        result.problems.append(f"no {MANIFEST} or {ZOO_MANIFEST} in {models_dir}: nothing to verify")
    for rec in listed:
        if not isinstance(rec, dict):
            result.problems.append(f"{rec!r}: not a file record of the manifest")
            continue
        rel = str(rec.get("path", ""))
        # Checked as written, not resolved: a link in the models directory (large models kept on
        # shared storage) is followed, as the registry follows it; `..` or an absolute path is not.
        parts = PurePosixPath(rel.replace("\\", "/")).parts
        if not parts or PurePosixPath(rel).is_absolute() or Path(rel).is_absolute() or ".." in parts:
            result.problems.append(f"{rel}: outside the models directory")
            continue
        path = models_dir / rel
        result.checked += 1
        if not path.is_file():
            result.problems.append(f"{rel}: missing")
        elif path.stat().st_size != rec.get("size"):
            result.problems.append(f"{rel}: size {path.stat().st_size}, expected {rec.get('size')}")
        elif sha256_file(path) != rec.get("sha256"):
            result.problems.append(f"{rel}: sha256 mismatch")
    return result


def default_data_dir() -> Path:
    """The backend's data folder (jobs, frames, models): $ANIMATEDIFF_BLENDER_DATA, else
    %LOCALAPPDATA% (Windows) or $XDG_DATA_HOME (~/.local/share) + `animatediff-blender`.
    One function for `serve` and `models`, so that both look in the same folder."""
    override = os.environ.get("ANIMATEDIFF_BLENDER_DATA")
    if override:
        return Path(override).expanduser()
    if os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    else:
        xdg = os.environ.get("XDG_DATA_HOME")
        base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "animatediff-blender"


def default_models_dir() -> Path:
    """`<data>/models` (see `default_data_dir`): where `serve` looks by default."""
    return default_data_dir() / "models"
