"""Sidebar panels: the full one in the Video Sequencer, a compact one in the 3D viewport."""

import textwrap

import bpy
from bpy.types import Panel

from . import sequencer_compat as sc
from . import settings as st
from .preset_check import preset_mismatch
from .properties import CAMERA_MOTIONS, PENDING_STATES
from .state import STATE

LABELS = dict(CAMERA_MOTIONS)
STATE_ICONS = {"submitting": "EXPORT", "queued": "SORTTIME", "running": "PLAY", "lost": "ERROR",
               "finished": "CHECKMARK", "failed": "CANCEL", "cancelled": "X", "interrupted": "ERROR"}


def _eta(seconds: float) -> str:
    if seconds < 0:
        return ""
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d} left"


def draw_connection(layout, compact=False):
    row = layout.row(align=True)
    icon = "LINKED" if STATE.connected else "UNLINKED"
    row.label(text=STATE.connection_message if not compact else ("connected" if STATE.connected else
                                                                 "not connected"), icon=icon)
    row.operator("animatediff.refresh_models", text="", icon="FILE_REFRESH")


def draw_jobs(layout, scene, compact=False):
    from .timer import preview_icon

    s = scene.animatediff
    if not len(s.jobs):
        return
    box = layout.box()
    header = box.row()
    header.label(text="Jobs")
    header.operator("animatediff.clear_jobs", text="", icon="TRASH")
    view = STATE.queue_view
    if view is not None and not compact and any(job.state == "queued" for job in s.jobs):
        # Why a job waits: what the shared backend runs, and who is ahead.
        queue_box = box.box().column(align=True)
        queue_box.label(text=f"Backend queue: {view.summary}", icon="SORTTIME")
        for line in view.lines:
            queue_box.label(text=line)
    for job in shown_jobs(s.jobs, 3 if compact else 8):
        col = box.column(align=True)
        row = col.row(align=True)
        text = job.prompt[:40] or "(prompt travel)"
        row.label(text=text, icon=STATE_ICONS.get(job.state, "QUESTION"))
        if job.state in PENDING_STATES:
            op = row.operator("animatediff.cancel", text="", icon="X")
            op.local_id = job.local_id
        if job.state == "running" and job.total_steps:
            pct = job.step / max(1, job.total_steps)
            label = f"step {job.step}/{job.total_steps} {_eta(job.remaining_s)}"
            if hasattr(col, "progress"):  # 4.0+
                col.progress(factor=pct, type="BAR", text=label)
            else:
                col.label(text=label)
        else:
            col.label(text=job.state + (f" (position {job.queue_position})" if job.state == "queued"
                                        and job.queue_position > 0 else ""))
        if job.message:
            for line in _wrap(job.message, 48):
                col.label(text=line, icon="INFO" if job.state != "failed" else "ERROR")
        icon = preview_icon(job.job_id) if job.state == "running" and not compact else 0
        if icon:
            col.template_icon(icon_value=icon, scale=6.0)


def shown_jobs(rows, limit):
    """The newest `limit` rows, and every older job still pending: a running job behind
    `limit` newer ones (takes queued one after another) kept its progress and its cancel
    button out of sight."""
    rows = list(rows)
    return [job for i, job in enumerate(rows) if job.state in PENDING_STATES or i >= len(rows) - limit]


def draw_preset_mismatch(layout, s):
    """Fast/LCM on a motion module not made for them: what is wrong and how to fix it."""
    mismatch = preset_mismatch(s.preset, s.motion_module.strip(), STATE.models, STATE.defaults)
    for i, line in enumerate(textwrap.wrap(mismatch, 44)):  # all of it: it says how to fix it
        layout.label(text=line, icon="ERROR" if i == 0 else "BLANK1")


def _wrap(text, width):
    return textwrap.wrap(text, width)[:4] or [""]


class ADB_PT_sequencer(Panel):
    bl_label = "AnimateDiff"
    bl_idname = "ADB_PT_sequencer"
    bl_space_type = "SEQUENCE_EDITOR"
    bl_region_type = "UI"
    bl_category = "AnimateDiff"

    def draw(self, context):
        layout = self.layout
        scene = sc.edit_scene(context)
        s = scene.animatediff
        draw_connection(layout)
        col = layout.column()
        col.prop(s, "prompt")
        col.prop(s, "negative_prompt")
        lists = context.window_manager.animatediff_models
        col.prop_search(s, "base_model", lists, "base", text="Base model")
        col.prop_search(s, "motion_module", lists, "motion", text="Motion")
        if not s.base_model or not s.motion_module:
            col.label(text="Empty: the backend's default", icon="INFO")
        if s.domain_adapter or len(lists.adapter):
            row = col.row(align=True)
            row.prop_search(s, "domain_adapter", lists, "adapter", text="Spatial LoRA")
            sub = row.row(align=True)
            sub.active = bool(s.domain_adapter.strip())
            sub.prop(s, "domain_adapter_scale", text="")
        col.prop(s, "preset")
        draw_preset_mismatch(col, s)

        box = layout.box()
        row = box.row()
        row.label(text="Camera motion (MotionLoRA)")
        row.operator("animatediff.match_camera", text="", icon="CAMERA_DATA")
        if not len(s.camera_loras):
            box.label(text="Press Match scene camera or Generate to list them")
        for item in s.camera_loras:
            r = box.row(align=True)
            r.prop(item, "enabled", text=LABELS.get(item.motion, item.motion))
            sub = r.row(align=True)
            sub.active = item.enabled
            sub.prop(item, "weight", text="")
        if any(x.get("kind") == "lora" and not x.get("camera_motion") for x in STATE.models):
            r = box.row()
            r.label(text="Other LoRAs")
            r.operator("animatediff.sync_loras", text="", icon="ADD")
            for item in s.extra_loras:
                r = box.row(align=True)
                r.prop(item, "enabled", text=item.model_id)
                r.prop(item, "weight", text="")

        col = layout.column(align=True)
        row = col.row(align=True)
        row.prop(s, "use_scene_length")
        sub = row.row(align=True)
        if s.use_scene_length:
            sub.label(text=f"{st.scene_length(scene)} frames")
        else:
            sub.prop(s, "frames")
        row = col.row(align=True)
        row.prop(s, "use_render_size")
        if s.use_render_size:
            w, h = st.render_size(scene)
            row.label(text=f"{w} x {h}")
        else:
            row.prop(s, "width", text="W")
            row.prop(s, "height", text="H")
        col.prop(s, "steps")
        col.prop(s, "guidance")
        row = col.row(align=True)
        row.prop(s, "seed")
        row.operator("animatediff.randomize_seed", text="", icon="FILE_REFRESH")

        col = layout.column(align=True)
        col.prop(s, "channel")
        row = col.row(align=True)
        row.prop(s, "use_current_frame")
        if not s.use_current_frame:
            row.prop(s, "start_frame", text="")
        layout.operator("animatediff.generate", icon="RENDER_ANIMATION")
        layout.operator("animatediff.regenerate", icon="FILE_REFRESH")
        draw_jobs(layout, scene)


class ADB_PT_view3d(Panel):
    bl_label = "AnimateDiff"
    bl_idname = "ADB_PT_view3d"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "AnimateDiff"

    def draw(self, context):
        layout = self.layout
        scene = sc.edit_scene(context)  # the settings and takes of the edit the Sequencer shows
        s = scene.animatediff
        draw_connection(layout, compact=True)
        layout.prop(s, "prompt")
        layout.prop(s, "preset")
        draw_preset_mismatch(layout, s)
        layout.operator("animatediff.match_camera", icon="CAMERA_DATA")
        layout.operator("animatediff.generate", icon="RENDER_ANIMATION")
        if scene != context.scene:
            layout.label(text=f"Takes go to the Sequencer's scene: {scene.name}", icon="SEQUENCE")
        draw_jobs(layout, scene, compact=True)


CLASSES = (ADB_PT_sequencer, ADB_PT_view3d)


register, unregister = bpy.utils.register_classes_factory(CLASSES)
