"""Operators: Generate, Cancel, Regenerate, Match camera, seed, models, connection, backend."""

import json
import os
import shlex
import subprocess
from typing import Any

import bpy
from bpy.props import BoolProperty, StringProperty
from bpy.types import Operator

from . import jobs
from . import messages as m
from . import sequencer_compat as sc
from . import settings as st
from .preset_check import preset_mismatch
from .properties import PENDING_STATES, ensure_camera_loras, sync_extra_loras
from .state import STATE


class ADB_OT_generate(Operator):
    """Send the prompt to the AnimateDiff backend; the clip lands on the sequencer when done"""

    bl_idname = "animatediff.generate"
    bl_label = "Generate"
    # An undo step of its own (with the job row): without one, Ctrl+Z of the take went back to
    # before the row existed, and Ctrl+Z after Generate undid the artist's previous edit too.
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        scene = sc.edit_scene(context)
        ensure_camera_loras(scene.animatediff)
        try:
            plan = st.plan_from_scene(scene)
        except ValueError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        refusal = st.network_refusal(jobs.client_config()["address"])
        if refusal:
            self.report({"ERROR"}, refusal)
            return {"CANCELLED"}
        patience, not_started = maybe_autostart()
        job = jobs.submit(scene, plan, patient_s=patience)
        mismatch = preset_mismatch(str(plan.request.get("preset")), plan.request.get("motion_module") or "",
                                   STATE.models, STATE.defaults, plan.request.get("domain_adapter") or "")
        if not_started:
            self.report({"WARNING"}, f"AnimateDiff: submitted, but {not_started}")
        elif mismatch:
            self.report({"WARNING"}, f"AnimateDiff: submitted, but {mismatch[0].lower()}{mismatch[1:]}")
        else:
            self.report({"INFO"}, f"AnimateDiff: submitted ({job.frames} frames -> channel {job.channel})")
        return {"FINISHED"}


class ADB_OT_cancel(Operator):
    """Cancel this job on the backend"""

    bl_idname = "animatediff.cancel"
    bl_label = "Cancel"

    local_id: StringProperty()  # type: ignore[valid-type]

    def execute(self, context):
        _scene, job = jobs.find_job(self.local_id, by="local_id")
        if job is None:
            s = sc.edit_scene(context).animatediff
            job = s.jobs[s.active_job] if 0 <= s.active_job < len(s.jobs) else None
        if job is None or job.state not in PENDING_STATES:
            self.report({"WARNING"}, "no running job to cancel")
            return {"CANCELLED"}
        jobs.cancel(job)
        return {"FINISHED"}


class ADB_OT_clear_jobs(Operator):
    """Remove finished, failed and cancelled jobs from the list"""

    bl_idname = "animatediff.clear_jobs"
    bl_label = "Clear finished"
    bl_options = {"REGISTER", "UNDO"}  # Ctrl+Z brings the rows back, and only them

    def execute(self, context):
        s = sc.edit_scene(context).animatediff
        for i in reversed(range(len(s.jobs))):
            if s.jobs[i].state not in PENDING_STATES:
                s.jobs.remove(i)
        s.active_job = min(s.active_job, max(0, len(s.jobs) - 1))
        return {"FINISHED"}


class ADB_OT_randomize_seed(Operator):
    """Pick a new random seed"""

    bl_idname = "animatediff.randomize_seed"
    bl_label = "Random seed"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        sc.edit_scene(context).animatediff.seed = st.random_seed()
        return {"FINISHED"}


class ADB_OT_match_camera(Operator):
    """Read the active camera's animation over the frames the clip will cover and set the camera MotionLoRAs"""

    bl_idname = "animatediff.match_camera"
    bl_label = "Match scene camera"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        from . import camera_match

        # The rows are listed even when there is no camera to read (a new scene has none of
        # them, and the panel says to press this): the artist can then pick moves by hand.
        edit = sc.edit_scene(context)
        ensure_camera_loras(edit.animatediff)
        first, last = clip_frames(context.scene, edit)
        try:
            # The camera of the 3D scene being worked on
            motion = camera_match.analyse(context.scene, frame_start=first, frame_end=last)
        except ValueError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        camera_match.apply_to_settings(edit.animatediff, motion.weights)
        used = ", ".join(f"{k} {v:.2f}" for k, v in motion.weights.items() if v > 0) or "no camera move found"
        self.report({"INFO"}, f"Camera over frames {first}-{last}: {used}")
        return {"FINISHED"}


def clip_frames(shot: Any, edit: Any) -> tuple[int, int]:
    """The frames whose camera move the clip shows: those it will cover on the timeline (its
    start and its Frames, or the scene's length), when the 3D scene is the one the Sequencer
    edits; else (Blender 5's own sequencer scene) the 3D scene's frame range, its shot."""
    if shot != edit:
        return shot.frame_start, shot.frame_end
    start, frames = st.panel_span(edit)
    return start, start + max(1, frames) - 1


class ADB_OT_refresh_models(Operator):
    """Ask the backend for its model list (in the background)"""

    bl_idname = "animatediff.refresh_models"
    bl_label = "Refresh models"

    def execute(self, context):
        refusal = st.network_refusal(jobs.client_config()["address"])
        if refusal:
            self.report({"ERROR"}, refusal)
            return {"CANCELLED"}
        _patience, not_started = maybe_autostart()
        if not_started:
            self.report({"WARNING"}, f"AnimateDiff: {not_started}")
        jobs.worker().send(m.RefreshModels())
        return {"FINISHED"}


class ADB_OT_sync_loras(Operator):
    """Add rows for the LoRAs the backend lists"""

    bl_idname = "animatediff.sync_loras"
    bl_label = "Sync LoRAs"

    def execute(self, context):
        sync_extra_loras(sc.edit_scene(context).animatediff)
        return {"FINISHED"}


class ADB_OT_test_connection(Operator):
    """Connect to the backend and report its version, device and models"""

    bl_idname = "animatediff.test_connection"
    bl_label = "Test connection"

    def execute(self, context):
        from .worker import test_connection

        cfg = jobs.client_config()
        refusal = st.network_refusal(cfg["address"])
        if refusal:
            STATE.test_message = "Failed: " + refusal
            return {"CANCELLED"}
        STATE.test_running = True
        STATE.test_message = ""
        test_connection(cfg, STATE.outbox)
        return {"FINISHED"}


class ADB_OT_regenerate(Operator):
    """Submit the selected AnimateDiff strip's settings again, as a new take on the channel above"""

    bl_idname = "animatediff.regenerate"
    bl_label = "Regenerate"
    # An undo step as Generate, without REGISTER: its redo panel would re-run it on a toggle of
    # New seed, submitting a second job while the first still renders.
    bl_options = {"UNDO"}

    new_seed: BoolProperty(name="New seed", default=True)  # type: ignore[valid-type]

    def execute(self, context):
        from .strips import stored_settings

        scene = sc.edit_scene(context)
        strip = sc.active_strip(context)
        selected = sc.selected_strips(context)
        if strip is None or (selected and strip not in selected):
            strip = selected[0] if selected else strip
        data = stored_settings(strip) if strip is not None else None
        if not data:
            self.report({"ERROR"}, "select a strip made by AnimateDiff")
            return {"CANCELLED"}
        if strip.channel >= sc.MAX_CHANNEL:  # else it fails only after the render, with no strip
            self.report({"ERROR"}, f"no channel above {strip.channel} for a new take: move the strip down first")
            return {"CANCELLED"}
        stored = data.get("request")
        if not isinstance(stored, dict) or not stored:
            # Edited by hand or damaged: say so (it used to end in a traceback).
            self.report({"ERROR"}, f"the strip's stored AnimateDiff settings have no request: {strip.name}")
            return {"CANCELLED"}
        request = {k: v for k, v in stored.items() if k in st.REQUEST_KEYS}
        if self.new_seed:
            request["seed"] = st.random_seed()
        # Frame for frame under the source, even when its start was trimmed off.
        plan = st.Plan(request, {}, strip.channel + 1, sc.content_start(strip))
        stored_loras = stored.get("motion_loras")
        stored_loras = stored_loras if isinstance(stored_loras, list) else []
        plan.request["motion_loras"] = [x for x in stored_loras if isinstance(x, dict) and "id" in x]
        moves = data.get("camera_motions")
        plan.noted_camera_motions = dict(moves) if isinstance(moves, dict) else {}
        refusal = st.network_refusal(jobs.client_config()["address"])
        if refusal:
            self.report({"ERROR"}, refusal)
            return {"CANCELLED"}
        patience, not_started = maybe_autostart()
        jobs.submit(scene, plan, patient_s=patience)
        if not_started:
            self.report({"WARNING"}, f"AnimateDiff: submitted, but {not_started}")
        return {"FINISHED"}


class ADB_OT_start_backend(Operator):
    """Start the configured local backend command (loopback addresses only)"""

    bl_idname = "animatediff.start_backend"
    bl_label = "Start local backend"

    def execute(self, context):
        try:
            start_backend()
        except (ValueError, OSError) as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        return {"FINISHED"}


class ADB_OT_stop_backend(Operator):
    """Stop the local backend this Blender started"""

    bl_idname = "animatediff.stop_backend"
    bl_label = "Stop local backend"

    def execute(self, context):
        stop_backend()
        return {"FINISHED"}


def start_backend() -> None:
    prefs = jobs.preferences()
    if prefs is None or not prefs.backend_command.strip():
        raise ValueError("set a local backend command in the add-on preferences first")
    if not st.is_loopback(prefs.address):
        raise ValueError(f"{prefs.address} is not a loopback address: only a local backend is started")
    proc = STATE.backend_process
    if proc is not None and proc.poll() is None:
        return
    STATE.backend_process = subprocess.Popen(backend_argv(prefs.backend_command), stdin=subprocess.DEVNULL)


def backend_argv(command: str, windows: bool = os.name == "nt") -> str | list[str]:
    """What Popen runs for the preference's command line.  POSIX shell splitting eats the
    backslashes of a Windows path (C:\\Users\\... -> C:Users...): on Windows the command line
    goes to CreateProcess as it is, which splits it the Windows way."""
    command = command.strip()
    return command if windows else shlex.split(command)


def stop_backend() -> None:
    proc = STATE.backend_process
    STATE.backend_process = None
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()


# How long a submit waits for a local backend the add-on started: it imports torch and
# diffusers and scans (the first time: hashes) the models before it listens.
BACKEND_START_PATIENCE_S = 600.0


def maybe_autostart() -> tuple[float, str]:
    """Start the local backend if the preferences say so.  Returns how long a submit should
    wait for it to listen (0 unless a backend this Blender started is running), and why it
    could not be started ("" if it was, or need not be): the caller tells the artist, or the
    job would fail later with a bare "cannot connect"."""
    prefs = jobs.preferences()
    problem = ""
    if prefs is not None and prefs.auto_start and prefs.backend_command.strip():
        try:
            start_backend()
        except (ValueError, OSError) as exc:
            problem = (f"the local backend could not be started ({exc}): check the extension preferences' "
                       "local backend command (a full path to animatediff-blender)")
            print(f"AnimateDiff: {problem}")
    proc = STATE.backend_process
    return (BACKEND_START_PATIENCE_S if proc is not None and proc.poll() is None else 0.0), problem


def job_request_summary(job) -> str:
    try:
        data = json.loads(job.request_json)
    except ValueError:
        return ""
    req = data.get("request", {})
    return f"{req.get('frames')} frames {req.get('width')}x{req.get('height')} seed {req.get('seed')}"


CLASSES = (
    ADB_OT_generate, ADB_OT_cancel, ADB_OT_clear_jobs, ADB_OT_randomize_seed, ADB_OT_match_camera,
    ADB_OT_refresh_models, ADB_OT_sync_loras, ADB_OT_test_connection, ADB_OT_regenerate,
    ADB_OT_start_backend, ADB_OT_stop_backend,
)


register, unregister = bpy.utils.register_classes_factory(CLASSES)
