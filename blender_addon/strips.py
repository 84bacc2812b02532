"""Result frames -> one image strip at the place fixed when the job was submitted.  Main thread."""

from __future__ import annotations

import json
import os
from typing import Any

from . import sequencer_compat as sc
from .files import short_id

SETTINGS_KEY = "animatediff"  # custom property on the strip: JSON of job id, seed, request


def blend_relative(path: str) -> str:
    """`//animatediff/...` when the folder is next to the saved .blend, else absolute."""
    import bpy

    if bpy.data.filepath:
        try:
            rel = bpy.path.relpath(path)
        except ValueError:  # other drive on Windows
            return path
        if rel.startswith("//") and not rel.startswith("//.."):
            return rel
    return path


def insert_strip(scene: Any, job_id: str, directory: str, files: list[str], channel: int, frame_start: int,
                 info: dict[str, Any]) -> Any:
    """Create the strip; the channel moves up when the frames there are taken."""
    for name in files:
        if not os.path.isfile(os.path.join(directory, name)):
            raise FileNotFoundError(f"frame {name} is missing in {directory}")
    ch = sc.free_channel(scene, channel, frame_start, len(files))
    folder = blend_relative(directory)
    strip = sc.new_image_strip(scene, f"AD {short_id(job_id)}", folder, files, ch, frame_start)
    strip[SETTINGS_KEY] = json.dumps({"job_id": job_id, **info}, sort_keys=True, default=str)
    return strip


def stored_settings(strip: Any) -> dict[str, Any] | None:
    raw = strip.get(SETTINGS_KEY) if hasattr(strip, "get") else None
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def strip_frame_paths(strip: Any) -> list[str]:
    """Absolute paths of every frame of an image strip (for checks and tools)."""
    import bpy

    directory = bpy.path.abspath(strip.directory)
    return [os.path.join(directory, e.filename) for e in strip.elements]
