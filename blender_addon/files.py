"""Frames on disk (no bpy: the worker thread calls this).

Frames go to a hidden temporary folder first and are renamed into place in one step,
so a crash or a dead backend never leaves a half-written take where a strip points.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

FRAME_NAME = "frame_{:04d}.png"
FRAME_FILE = re.compile(r"^frame_([0-9]{4,})\.png$")  # a name FRAME_NAME makes, and its number
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def preview_folder() -> str:
    """This Blender process's folder of step previews, in the temp folder."""
    return os.path.join(tempfile.gettempdir(), f"animatediff_blender_previews_{os.getpid()}")


def remove_preview_folder() -> None:
    """At exit: Blender quits without unregistering add-ons, so the worker cannot."""
    shutil.rmtree(preview_folder(), ignore_errors=True)


# In each take folder: the full id of the job whose frames it holds.  Folders are named by
# the first 8 characters of the id, which two jobs of one project may share (1 in 2^32 a pair).
JOB_MARKER = ".animatediff-job"
# Beside it: the seed and settings the backend reports it rendered the take with (camera
# MotionLoRAs as ids and weights).  A take placed from disk once the backend has forgotten the
# job gets them from here: the job's row knows its camera moves by name only.
TAKE_SETTINGS = ".animatediff-settings.json"


def short_id(job_id: str) -> str:
    return job_id[:8]


def frame_names(count: int) -> list[str]:
    return [FRAME_NAME.format(i) for i in range(count)]


def job_dir(out_root: str | os.PathLike[str], job_id: str) -> Path:
    """`<out_root>/<first 8 characters of the id>`, unless that folder holds another job's take
    (its marker says so): then the first 16 characters, then the whole id.  A folder without
    a marker (made before markers were written) counts as this job's, as it always did."""
    root = Path(out_root)
    for length in (8, 16):
        folder = root / job_id[:length]
        if folder_owner(folder) in (None, job_id):
            return folder
    return root / job_id


def in_place(directory: str | os.PathLike[str], out_root: str | os.PathLike[str], job_id: str) -> bool:
    """Whether a take written at `directory` is where `out_root` keeps the job's take."""
    return os.path.realpath(directory) == os.path.realpath(job_dir(out_root, job_id))


def folder_owner(folder: Path) -> str | None:
    """The job id in a take folder's marker; None without one (or without the folder)."""
    try:
        return (folder / JOB_MARKER).read_text(encoding="ascii").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def take_settings(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The take's `TAKE_SETTINGS` ({"seed", "settings"}); None without a readable one."""
    try:
        data = json.loads((Path(folder) / TAKE_SETTINGS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("settings"), dict) else None


def write_frames(out_root: str | os.PathLike[str], job_id: str, frames: list[bytes],
                 settings: dict[str, Any] | None = None) -> tuple[Path, list[str]]:
    """Write PNG frames to `<out_root>/<short id>/frame_0000.png...` (`job_dir`), with the job's
    marker and, when given, its `TAKE_SETTINGS`; returns (folder, names).

    An existing complete folder for this job (collected before) is reused as it is.
    """
    if not frames:
        raise ValueError("the backend sent no frames")
    for i, data in enumerate(frames):
        if not data.startswith(PNG_MAGIC):
            raise ValueError(f"frame {i} is not a PNG image")
    root = Path(out_root)
    root.mkdir(parents=True, exist_ok=True)
    dest = job_dir(root, job_id)
    names = frame_names(len(frames))
    if dest.is_dir() and all((dest / n).is_file() for n in names):
        return dest, names
    tmp = Path(tempfile.mkdtemp(prefix=f".{short_id(job_id)}-partial-", dir=root))
    extra = [(JOB_MARKER, job_id.encode("ascii"))]
    if settings is not None:
        extra.append((TAKE_SETTINGS, json.dumps(settings, sort_keys=True, default=str).encode("utf-8")))
    try:
        for name, data in [*zip(names, frames, strict=True), *extra]:
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        if dest.exists():  # an incomplete leftover: replace it
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest, names


def move_frames(directory: str | os.PathLike[str], names: list[str], out_root: str | os.PathLike[str],
                job_id: str) -> Path:
    """Move a written take to `<out_root>/<short id>/`; returns that folder.  The copy is put in
    place in one step (as `write_frames` does), and only then is the old folder removed."""
    src = Path(directory)
    dest = job_dir(out_root, job_id)
    if dest.is_dir() and os.path.samefile(src, dest):
        return dest
    moved, _names = write_frames(out_root, job_id, [(src / name).read_bytes() for name in names],
                                 take_settings(src))
    shutil.rmtree(src, ignore_errors=True)
    try:
        src.parent.rmdir()  # the old output folder, when this take was all it held
    except OSError:
        pass
    return moved
