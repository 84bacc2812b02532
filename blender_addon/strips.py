"""Result frames -> one image strip at the place fixed when the job was submitted.  Main thread."""

from __future__ import annotations

import json
import os
from typing import Any

from . import sequencer_compat as sc
from .files import move_frames, short_id

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


def adopt_unsaved_takes(blend_path: str) -> int:
    """Before a save to `blend_path`: takes that landed while the file had never been saved
    are in the add-on's user folder (`settings.unsaved_root`), which goes when the extension is
    uninstalled, and would be referred to from the project by a path into the Blender profile.
    They move to `animatediff/` beside the .blend, their strips pointing there relatively.
    Returns how many strips were repointed."""
    import bpy

    from .settings import unsaved_root

    root = os.path.realpath(unsaved_root())
    dest_root = os.path.join(os.path.dirname(os.path.abspath(blend_path)), "animatediff")
    moved: dict[str, str] = {}  # old folder -> new (strips may share a take: duplicates)
    count = 0
    for scene in bpy.data.scenes:
        for strip in sc.all_strips(scene):
            info = stored_settings(strip)
            if not info or not isinstance(info.get("job_id"), str) or not hasattr(strip, "elements"):
                continue
            src = os.path.realpath(bpy.path.abspath(strip.directory))
            if not _inside(src, root):
                continue
            try:
                if src not in moved:
                    names = [e.filename for e in strip.elements]
                    moved[src] = str(move_frames(src, names, dest_root, info["job_id"]))
                strip.directory = f"//animatediff/{os.path.basename(moved[src])}/"
                count += 1
            except (OSError, ValueError) as exc:  # never break the save: the take stays where it is
                print(f"AnimateDiff: could not move the take of {strip.name} beside the .blend: {exc}")
    return count


def _inside(path: str, root: str) -> bool:
    try:
        return path != root and os.path.commonpath([path, root]) == root
    except ValueError:  # another drive (Windows)
        return False
