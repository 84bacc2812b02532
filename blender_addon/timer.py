"""The persistent main-thread timer that drains the worker's messages.

Each call works for at most `BUDGET_S` and then yields back to Blender, so the UI stays
responsive whatever the backend sends.  Under `blender -b` timers never run: the API's
synchronous path is used there instead.
"""

from __future__ import annotations

import queue
import time

import bpy

from . import jobs
from .properties import PENDING_STATES
from .state import STATE

INTERVAL_S = 0.1
BUDGET_S = 0.004
REDRAW_AREAS = {"SEQUENCE_EDITOR", "VIEW_3D", "PREFERENCES"}


def drain() -> float:
    t0 = time.perf_counter()
    changed = False
    previews: dict[str, str] = {}
    while time.perf_counter() - t0 < BUDGET_S:
        try:
            msg = STATE.outbox.get_nowait()
        except queue.Empty:
            break
        t1 = time.perf_counter()
        try:
            jobs.apply(msg)
            kind = type(msg).__name__
            STATE.apply_max_s[kind] = max(STATE.apply_max_s.get(kind, 0.0), time.perf_counter() - t1)
        except Exception as exc:  # noqa: BLE001 - a bad message must not stop the timer
            print(f"AnimateDiff: could not apply {type(msg).__name__}: {exc}")
        path = getattr(msg, "preview_path", "")
        if path:
            previews[msg.job_id] = path
        changed = True
    if STATE.previews is not None and (previews or STATE.preview_keys):
        try:
            update_previews(previews)
        except Exception as exc:  # noqa: BLE001 - nor must a preview
            print(f"AnimateDiff: could not update the step previews: {exc}")
    if changed:
        tag_redraw()
    elapsed = time.perf_counter() - t0
    STATE.drain_calls += 1
    STATE.drain_max_s = max(STATE.drain_max_s, elapsed)
    return INTERVAL_S


def update_previews(previews: dict[str, str]) -> None:
    """Load the newest preview of each job (`previews`: job id -> file) that the panel may
    show, and release those of jobs it no longer can.  Checked on every call while previews
    are loaded, not only after a message: a row also goes with Clear finished, an undo or
    another file opened."""
    showable = previewed_jobs()
    for job_id, path in previews.items():
        if job_id in showable:  # not one of a job that ended in this same call
            load_preview(job_id, path)
    for job_id in [x for x in STATE.preview_keys if x not in showable]:
        release_preview(job_id)


def load_preview(job_id: str, path: str) -> None:
    pcoll = STATE.previews
    if pcoll is None:
        return
    old = STATE.preview_keys.get(job_id)
    key = f"{job_id}:{path}"
    if old == key:
        return
    try:
        pcoll.load(key, path, "IMAGE", force_reload=True)
    except (KeyError, RuntimeError, OSError):
        return
    if old and old in pcoll:
        try:
            del pcoll[old]
        except (KeyError, TypeError):
            pass
    STATE.preview_keys[job_id] = key


def previewed_jobs() -> set[str]:
    """The jobs whose step preview the panel may show: those of pending rows (`draw_jobs`
    shows a running row's, and lists every pending row), and those whose row an undo removed
    (it comes back with the job's next message).  A job that ended shows none."""
    keep: set[str] = set()
    rows: set[str] = set()
    for scene in bpy.data.scenes:
        for job in scene.animatediff.jobs:
            rows.add(job.local_id)
            if job.job_id and job.state in PENDING_STATES:
                keep.add(job.job_id)
    keep.update(str(v["job_id"]) for k, v in STATE.job_shadow.items() if v.get("job_id") and k not in rows)
    return keep


def release_preview(job_id: str) -> None:
    """Free a job's preview, so that previews do not pile up over a long session.  Again, or
    once the collection is gone (the add-on disabled), it does nothing."""
    key = STATE.preview_keys.pop(job_id, None)
    pcoll = STATE.previews
    if key is None or pcoll is None or key not in pcoll:
        return
    try:
        del pcoll[key]
    except (KeyError, TypeError):
        pass


def preview_icon(job_id: str) -> int:
    key = STATE.preview_keys.get(job_id)
    pcoll = STATE.previews
    if not key or pcoll is None or key not in pcoll:
        return 0
    return int(pcoll[key].icon_id)


def tag_redraw() -> None:
    wm = getattr(bpy.context, "window_manager", None)
    if wm is None:
        return
    for window in wm.windows:
        for area in window.screen.areas:
            if area.type in REDRAW_AREAS:
                area.tag_redraw()


def register() -> None:
    if not bpy.app.timers.is_registered(drain):
        bpy.app.timers.register(drain, first_interval=INTERVAL_S, persistent=True)


def unregister() -> None:
    if bpy.app.timers.is_registered(drain):
        bpy.app.timers.unregister(drain)
