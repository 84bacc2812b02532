"""AnimateDiff for Blender: type a prompt, get a generated clip on the Video Sequencer.

Registration is light on purpose: no network, no thread and no import of the bundled
wheels happens here.  The worker thread starts on first use (Generate, Refresh, or a
.blend with pending jobs), and `api.py` is the synchronous path for scripts and
`blender -b` (where timers never run).
"""

import atexit

import bpy
import bpy.utils.previews
from bpy.app.handlers import persistent

from . import files, operators, owed, panels, preferences, properties, timer
from .state import STATE

_MODULES = (properties, preferences, operators, panels)
UNREGISTER_JOIN_S = 0.05


@persistent
def _on_load_post(*_args):
    from . import jobs

    jobs.forget_other_files()
    STATE.job_final.clear()  # a new undo history: rows of the opened file are resumed instead
    STATE.job_orphans.clear()
    _resume()


@persistent
def _on_save_pre(filepath="", *_args):
    from . import strips

    try:
        strips.adopt_unsaved_takes(filepath or bpy.data.filepath)
    except Exception as exc:  # noqa: BLE001 - never break saving
        print(f"AnimateDiff: could not move unsaved takes beside the .blend: {exc}")


@persistent
def _on_undo_redo(*_args):
    from . import jobs

    try:
        jobs.restore_ended()
    except Exception as exc:  # noqa: BLE001 - never break undo
        print(f"AnimateDiff: could not restore the job list after undo: {exc}")


def _resume():
    """Reconnect to jobs stored in the opened .blend that were still running."""
    if bpy.app.background:
        return  # batch scripts use the synchronous API
    from . import jobs

    try:
        _ensure_rows()
        jobs.resume_pending()
    except Exception as exc:  # noqa: BLE001 - never break file loading
        print(f"AnimateDiff: could not resume pending jobs: {exc}")


def _ensure_rows():
    from .properties import ensure_camera_loras

    for scene in bpy.data.scenes:
        ensure_camera_loras(scene.animatediff)


def _first_resume():
    # Start the worker soon after Blender starts: it connects once for the model list, and
    # the one-time import of the bundled wheels happens now rather than on the first Generate.
    from . import jobs
    from .settings import network_refusal

    try:
        if network_refusal(jobs.client_config()["address"]) is None:
            jobs.worker()
    except Exception as exc:  # noqa: BLE001
        print(f"AnimateDiff: could not start the worker: {exc}")
    _resume()
    return None  # run once


def _keep_owed_cancels() -> None:
    """At a quit (exit handler): what the workers still owe the backend goes to a file that
    the next session's worker claims (owed.py).  That is the running worker's, and that of
    every worker stopped by a disable whose cancels no new worker took over: the add-on may
    be disabled when Blender quits, so this handler stays registered after `unregister`."""
    if not STATE.owed_folder:
        return
    for w in [*STATE.stopped_workers, STATE.worker]:
        if w is None:
            continue
        try:
            owed.save(STATE.owed_folder, str(w.config.get("address", "")), w.owed_now())
        except Exception as exc:  # noqa: BLE001 - an exit handler must not fail Blender's quit
            print(f"AnimateDiff: could not keep the cancels owed to the backend: {exc}")


def register():
    for mod in _MODULES:
        mod.register()
    if not bpy.app.background:
        STATE.previews = bpy.utils.previews.new()
        timer.register()
        # The add-on may be enabled with a file already open: look at its jobs soon.
        bpy.app.timers.register(_first_resume, first_interval=0.5)
    if _on_load_post not in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.append(_on_load_post)
    if _on_save_pre not in bpy.app.handlers.save_pre:
        bpy.app.handlers.save_pre.append(_on_save_pre)
    for handlers in (bpy.app.handlers.undo_post, bpy.app.handlers.redo_post):
        if _on_undo_redo not in handlers:
            handlers.append(_on_undo_redo)
    # Blender does not unregister add-ons when it quits: stop a backend we started anyway,
    # and remove this process's step previews (a folder per Blender session was left).
    atexit.register(operators.stop_backend)
    atexit.register(files.remove_preview_folder)
    # ...and keep the cancels its worker still owes the backend for the next session.
    try:
        STATE.owed_folder = bpy.utils.extension_path_user(__package__, create=True)
    except (ValueError, AttributeError):  # loaded as a legacy add-on: nowhere of its own
        STATE.owed_folder = ""
    atexit.unregister(_keep_owed_cancels)  # still registered after a disable: once is enough
    atexit.register(_keep_owed_cancels)


def unregister():
    atexit.unregister(operators.stop_backend)
    atexit.unregister(files.remove_preview_folder)
    # `_keep_owed_cancels` stays: a disabled add-on's stopped worker may still owe cancels at
    # the quit (they wait in the outbox for a worker that an enable would start).
    if _on_load_post in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.remove(_on_load_post)
    if _on_save_pre in bpy.app.handlers.save_pre:
        bpy.app.handlers.save_pre.remove(_on_save_pre)
    for handlers in (bpy.app.handlers.undo_post, bpy.app.handlers.redo_post):
        if _on_undo_redo in handlers:
            handlers.remove(_on_undo_redo)
    if bpy.app.timers.is_registered(_first_resume):
        bpy.app.timers.unregister(_first_resume)
    timer.unregister()
    if STATE.worker is not None:
        # Told to stop, not waited for: a request in flight to a backend that does not answer
        # would hold Blender for the whole join.  The thread ends after that request; what it
        # still owed (a submit without an answer) is sent again by the next worker.
        STATE.worker.stop(timeout=UNREGISTER_JOIN_S)
        # What it owes is kept at a quit (the worker stopped earlier and owing nothing are dropped).
        STATE.stopped_workers[:] = [w for w in STATE.stopped_workers if w.is_alive() or not w.owed_now().is_empty()]
        STATE.stopped_workers.append(STATE.worker)
        STATE.worker = None
    operators.stop_backend()
    if STATE.previews is not None:
        bpy.utils.previews.remove(STATE.previews)
        STATE.previews = None
        STATE.preview_keys.clear()
    for mod in reversed(_MODULES):
        mod.unregister()
