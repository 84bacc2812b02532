"""Scene settings and the job list (stored in the .blend, so pending jobs survive a restart)."""

from typing import Any

import bpy
from bpy.props import (
    BoolProperty,
    CollectionProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)
from bpy.types import PropertyGroup

from .state import STATE

# The 8 official MotionLoRAs (AnimateDiff v2), named by the camera move they teach.
CAMERA_MOTIONS = (
    ("ZoomIn", "Zoom in"),
    ("ZoomOut", "Zoom out"),
    ("PanLeft", "Pan left"),
    ("PanRight", "Pan right"),
    ("TiltUp", "Tilt up"),
    ("TiltDown", "Tilt down"),
    ("RollingClockwise", "Roll clockwise"),
    ("RollingAnticlockwise", "Roll anticlockwise"),
)
PENDING_STATES = {"submitting", "queued", "running", "lost"}



class ADB_ModelItem(PropertyGroup):
    """One model of the backend's list (`name` is its id)."""

    label: StringProperty()  # type: ignore[valid-type]


class ADB_ModelLists(PropertyGroup):
    """The backend's models, per kind, for the panel's search fields.  Lives on the window
    manager (not saved).  Plain collections rather than dynamic enum items: a Python
    items/search callback makes the bpy module crash at exit."""

    base: CollectionProperty(type=ADB_ModelItem)  # type: ignore[valid-type]
    motion: CollectionProperty(type=ADB_ModelItem)  # type: ignore[valid-type]
    adapter: CollectionProperty(type=ADB_ModelItem)  # type: ignore[valid-type]


class ADB_CameraLora(PropertyGroup):
    motion: StringProperty(name="Camera motion")  # type: ignore[valid-type]
    enabled: BoolProperty(name="Use", default=False)  # type: ignore[valid-type]
    weight: FloatProperty(name="Weight", default=0.8, min=0.0, max=2.0, soft_max=1.0)  # type: ignore[valid-type]


class ADB_ExtraLora(PropertyGroup):
    model_id: StringProperty(name="Model id")  # type: ignore[valid-type]
    enabled: BoolProperty(name="Use", default=False)  # type: ignore[valid-type]
    weight: FloatProperty(name="Weight", default=0.8, min=-2.0, max=2.0)  # type: ignore[valid-type]


class ADB_Job(PropertyGroup):
    local_id: StringProperty()  # type: ignore[valid-type]
    job_id: StringProperty()  # type: ignore[valid-type]
    state: StringProperty(default="submitting")  # type: ignore[valid-type]
    step: IntProperty()  # type: ignore[valid-type]
    total_steps: IntProperty()  # type: ignore[valid-type]
    remaining_s: FloatProperty(default=-1.0)  # type: ignore[valid-type]
    queue_position: IntProperty(default=-1)  # type: ignore[valid-type]
    message: StringProperty()  # type: ignore[valid-type]
    prompt: StringProperty()  # type: ignore[valid-type]
    channel: IntProperty(default=1)  # type: ignore[valid-type]
    frame_start: IntProperty(default=1)  # type: ignore[valid-type]
    frames: IntProperty(default=16)  # type: ignore[valid-type]
    # No DIR_PATH subtype: Blender 5.x prints a RuntimeWarning for "//animatediff" stored in a
    # path property that does not declare PATH_SUPPORTS_BLEND_RELATIVE, an option 4.2 lacks.
    out_root: StringProperty()  # type: ignore[valid-type]
    request_json: StringProperty()  # type: ignore[valid-type]
    strip_name: StringProperty()  # type: ignore[valid-type]
    preview_path: StringProperty()  # type: ignore[valid-type]


class ADB_Settings(PropertyGroup):
    prompt: StringProperty(name="Prompt", default="")  # type: ignore[valid-type]
    negative_prompt: StringProperty(name="Negative", default="")  # type: ignore[valid-type]
    base_model: StringProperty(
        name="Base model", description="Model id; empty: the backend's default")  # type: ignore[valid-type]
    motion_module: StringProperty(
        name="Motion module", description="Model id; empty: the backend's default")  # type: ignore[valid-type]
    domain_adapter: StringProperty(
        name="Spatial LoRA",
        description="Model id of a LoRA on the image layers, from the backend's adapter folder: AnimateDiff "
                    "v3's domain adapter, or a style LoRA (kohya / civitai, with its text-encoder layers); "
                    "empty: none (LCM adds AnimateLCM's own)")  # type: ignore[valid-type]
    domain_adapter_scale: FloatProperty(
        name="Strength", default=1.0, min=0.0, max=2.0, soft_max=1.0,
        description="Weight of the spatial LoRA (0: off)")  # type: ignore[valid-type]
    camera_loras: CollectionProperty(type=ADB_CameraLora)  # type: ignore[valid-type]
    extra_loras: CollectionProperty(type=ADB_ExtraLora)  # type: ignore[valid-type]
    # Off by default: AnimateDiff's motion modules are trained on 16 frames, and a new scene's
    # 250 are beyond a default backend's limits (and minutes of work for a first try).
    use_scene_length: BoolProperty(
        name="Scene length", default=False,
        description="Generate as many frames as the scene frame range")  # type: ignore[valid-type]
    frames: IntProperty(name="Frames", default=16, min=1, max=4096,
                        description="Frames to generate (AnimateDiff's own length is 16; longer clips "
                                    "use context windows)")  # type: ignore[valid-type]
    use_render_size: BoolProperty(
        name="Render aspect", default=True,
        description="The render resolution's aspect ratio at Stable Diffusion 1.5's scale: the resolution x "
                    "percentage, scaled down to about 512x512 pixels when larger, in multiples of 8 "
                    "(the strip is scaled to fit the frame)")  # type: ignore[valid-type]
    width: IntProperty(name="Width", default=512, min=8, max=8192, step=8)  # type: ignore[valid-type]
    height: IntProperty(name="Height", default=512, min=8, max=8192, step=8)  # type: ignore[valid-type]
    steps: IntProperty(name="Steps", default=0, min=0, max=1000,
                       description="Denoising steps (0: the preset's default)")  # type: ignore[valid-type]
    guidance: FloatProperty(name="Guidance", default=0.0, min=0.0, max=100.0,
                            description="CFG scale (0: the preset's default)")  # type: ignore[valid-type]
    seed: IntProperty(name="Seed", default=42, min=0)  # type: ignore[valid-type]
    preset: EnumProperty(name="Preset", items=(
        ("quality", "Quality", "Full AnimateDiff schedule (25 steps)"),
        ("lightning", "Fast", "AnimateDiff-Lightning: a few steps"),
        ("lcm", "LCM", "AnimateLCM: a few steps"),
    ), default="quality")  # type: ignore[valid-type]
    channel: IntProperty(name="Channel", default=2, min=1, max=128)  # type: ignore[valid-type]
    use_current_frame: BoolProperty(name="At current frame", default=True)  # type: ignore[valid-type]
    start_frame: IntProperty(name="Start frame", default=1)  # type: ignore[valid-type]
    jobs: CollectionProperty(type=ADB_Job)  # type: ignore[valid-type]
    active_job: IntProperty()  # type: ignore[valid-type]


CLASSES = (ADB_ModelItem, ADB_ModelLists, ADB_CameraLora, ADB_ExtraLora, ADB_Job, ADB_Settings)


def ensure_camera_loras(settings: Any) -> None:
    """The 8 camera-motion rows exist (a new scene starts without them)."""
    have = {x.motion for x in settings.camera_loras}
    for name, _label in CAMERA_MOTIONS:
        if name not in have:
            row = settings.camera_loras.add()
            row.motion = name


def sync_extra_loras(settings: Any) -> None:
    """Add a row for each non-camera LoRA the backend lists (kept settings stay)."""
    have = {x.model_id for x in settings.extra_loras}
    for info in STATE.models:
        if info.get("kind") == "lora" and not info.get("camera_motion") and info["id"] not in have:
            row = settings.extra_loras.add()
            row.model_id = info["id"]


def fill_model_lists(wm: Any) -> None:
    """Copy the cached model list into the window manager's collections."""
    lists = wm.animatediff_models
    for kind in ("base", "motion", "adapter"):
        coll = getattr(lists, kind)
        coll.clear()
        for info in STATE.models:
            if info.get("kind") == kind and info.get("ok", True):
                item = coll.add()
                item.name = str(info["id"])
                item.label = str(info.get("label") or "")


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.animatediff = PointerProperty(type=ADB_Settings)
    bpy.types.WindowManager.animatediff_models = PointerProperty(type=ADB_ModelLists)


def unregister() -> None:
    del bpy.types.WindowManager.animatediff_models
    del bpy.types.Scene.animatediff
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
