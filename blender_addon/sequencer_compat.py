"""The one place that knows how the Video Sequencer API differs between Blender versions.

| | 4.2 | 4.4 / 4.5 | 5.0+ |
|---|---|---|---|
| top-level strips | `sequences` | `strips` (+ deprecated `sequences`) | `strips` |
| all strips | `sequences_all` | `strips_all` (+ `sequences_all`) | `strips_all` |
| context selection | `selected_sequences` | both | `selected_strips` |

5.1 adds `duration` / `left_handle` / `right_handle`; `frame_final_*` go away in 6.0, and so
does `frame_start` (5.3 has `content_start` for it).
Never write `se.strips or se.sequences`: an empty collection is falsy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

# new_image's fit_method defaults to ORIGINAL (pixel size): "FIT" scales the clip into the
# render frame whatever resolution the backend produced.
FIT_METHOD = "FIT"
MAX_CHANNEL = 128
MAX_FRAME = 1048574  # Blender's MAXFRAME: a strip asked to start further out is put at the limit


def edit_scene(context: Any) -> Any:
    """The scene whose Sequencer the artist edits.  From 5.0 the Video Sequencer shows a scene
    of its own (`context.sequencer_scene`, picked in its header), often not the window's: an
    edit scene holding strips of 3D shot scenes.  Takes, the panel's settings, the current
    frame and the selection are that scene's; before 5.0 (or with none picked) the window's."""
    return getattr(context, "sequencer_scene", None) or context.scene


def editor(scene: Any, create: bool = True) -> Any:
    se = scene.sequence_editor
    if se is None and create:
        se = scene.sequence_editor_create()
    return se


def top_strips(scene: Any) -> Any:
    """The collection that `new_image` lives on (top level, not inside meta strips)."""
    return _top(editor(scene))


def _top(se: Any) -> Any:
    return se.strips if hasattr(se, "strips") else se.sequences


def all_strips(scene: Any) -> list[Any]:
    se = editor(scene, create=False)
    if se is None:
        return []
    coll = se.strips_all if hasattr(se, "strips_all") else se.sequences_all
    return list(coll)


def selected_strips(context: Any) -> list[Any]:
    sel = getattr(context, "selected_strips", None)
    if sel is None:
        sel = getattr(context, "selected_sequences", None)
    if sel is None:  # no sequencer context (e.g. a script): fall back to the select flags
        sel = [s for s in all_strips(edit_scene(context)) if s.select]
    return list(sel)


def active_strip(context: Any) -> Any:
    se = editor(edit_scene(context), create=False)
    if se is None:
        return None
    return getattr(se, "active_strip", None)


def strip_start(strip: Any) -> int:
    left = getattr(strip, "left_handle", None)
    return int(left if left is not None else strip.frame_final_start)


def content_start(strip: Any) -> int:
    """The frame the strip's first image is at, whatever its trim (`frame_start` until 5.x)."""
    start = getattr(strip, "content_start", None)
    return int(start if start is not None else strip.frame_start)


def strip_duration(strip: Any) -> int:
    dur = getattr(strip, "duration", None)
    return int(dur if dur is not None else strip.frame_final_duration)


def channel_is_free(scene: Any, channel: int, start: int, length: int) -> bool:
    """Whether no top-level strip is on `channel` within [start, start+length).  Strips inside
    meta strips do not count: their channels are the meta's own, not the timeline's."""
    end = start + length
    se = editor(scene, create=False)
    if se is None:
        return True
    for s in _top(se):
        if s.channel != channel:
            continue
        s_start = strip_start(s)
        if s_start < end and start < s_start + strip_duration(s):
            return False
    return True


def free_channel(scene: Any, channel: int, start: int, length: int) -> int:
    """`channel` if [start, start+length) is free there, else the next free one above."""
    for ch in range(max(1, channel), MAX_CHANNEL + 1):
        if channel_is_free(scene, ch, start, length):
            return ch
    raise RuntimeError(f"no free sequencer channel from {channel} up at frames {start}-{start + length - 1}")


def new_image_strip(scene: Any, name: str, directory: str, files: Sequence[str], channel: int,
                    frame_start: int) -> Any:
    """One image strip showing `files` (all inside `directory`), one frame each."""
    if not files:
        raise ValueError("an image strip needs at least one frame")
    sep = "" if directory.endswith(("/", "\\")) else "/"
    strip = top_strips(scene).new_image(
        name=name, filepath=directory + sep + files[0], channel=channel, frame_start=frame_start,
        fit_method=FIT_METHOD,
    )
    for f in files[1:]:
        strip.elements.append(f)
    # new_image creates a 1-frame strip; the appended elements extend the content, and
    # the final duration follows in every supported version.  Make sure of it anyway.
    if strip_duration(strip) != len(files):
        if hasattr(strip, "duration"):
            strip.duration = len(files)
        else:
            strip.frame_final_duration = len(files)
    return strip


def strips_named(scene: Any, names: Iterable[str]) -> list[Any]:
    wanted = set(names)
    return [s for s in all_strips(scene) if s.name in wanted]
