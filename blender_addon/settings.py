"""Scene settings -> a GenerateRequest (as a dict) and where the result goes.  Main thread."""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from .properties import CAMERA_MOTIONS
from .sequencer_compat import MAX_CHANNEL, MAX_FRAME

CAMERA_NAMES = {name for name, _ in CAMERA_MOTIONS}
REQUEST_KEYS = (
    "prompt", "negative_prompt", "prompt_travel", "base_model", "motion_module", "domain_adapter",
    "domain_adapter_scale", "frames", "width", "height", "steps", "guidance", "seed", "preset",
    "context_length", "context_stride", "preview_every",
)
PLACEMENT_KEYS = ("channel", "start_frame")
PRESET_ALIASES = {"fast": "lightning"}


@dataclass
class Plan:
    request: dict[str, Any]
    camera_motions: dict[str, float]  # resolved to the backend's MotionLoRAs at submit
    channel: int
    start_frame: int
    # Recorded on the take instead of camera_motions when the moves are already in
    # request["motion_loras"] as ids (Regenerate renders with the source take's own files).
    noted_camera_motions: dict[str, float] | None = None
    # Request field -> what to change in the panel when the backend refuses its value
    # (beyond its limits); only for the fields the panel set (not a script's keywords).
    panel_hints: dict[str, str] = field(default_factory=dict)


def round8(value: float) -> int:
    """The nearest multiple of 8 (at least 8); ValueError for a value that is not a finite
    number (inf, nan: an OverflowError used to end a batch with a traceback).  Exact for any
    int (10**400 is not converted to a float), the same as round(value / 8) otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not is_finite(value):
        raise ValueError(f"a size must be a finite number of pixels, not {shown(value)}")
    return max(8, round(Fraction(value) / 8) * 8)


def is_finite(value: int | float) -> bool:
    """math.isfinite, also for an int too large for a float (it raises OverflowError there)."""
    return isinstance(value, int) or math.isfinite(value)


# Stable Diffusion 1.5 (and so AnimateDiff) is trained at 512x512: a larger frame costs more
# and repeats the subject, and a new scene's 1920x1080 is beyond a default backend's limits.
SD_PIXELS = 512 * 512


def render_size(scene: Any) -> tuple[int, int]:
    """The render resolution x percentage at Stable Diffusion 1.5's scale: scaled down, keeping
    its aspect ratio, to about 512x512 pixels when it is larger; multiples of 8 (1920x1080 ->
    680x384; 512x288 stays)."""
    r = scene.render
    pct = r.resolution_percentage / 100.0
    width, height = r.resolution_x * pct, r.resolution_y * pct
    scale = min(1.0, math.sqrt(SD_PIXELS / (width * height)))
    return round8(width * scale), round8(height * scale)


def scene_length(scene: Any) -> int:
    return max(1, scene.frame_end - scene.frame_start + 1)


def panel_span(scene: Any) -> tuple[int, int]:
    """The clip's start frame and frame count as the panel sets them (At current frame or its
    start frame; Scene length or Frames)."""
    s = scene.animatediff
    start = scene.frame_current if s.use_current_frame else s.start_frame
    return start, scene_length(scene) if s.use_scene_length else s.frames


def random_seed() -> int:
    return random.randint(0, 2**31 - 1)


def plan_from_scene(scene: Any, **overrides: Any) -> Plan:
    """The request the panel describes, with keyword overrides (the API's and batch's)."""
    s = scene.animatediff
    unknown = set(overrides) - set(REQUEST_KEYS) - set(PLACEMENT_KEYS) - {"motion_loras"}
    if unknown:
        raise ValueError(f"unknown setting(s): {', '.join(short_name(k) for k in sorted(unknown, key=str))}")
    width, height = render_size(scene) if s.use_render_size else (s.width, s.height)
    start, frames = panel_span(scene)
    req: dict[str, Any] = {
        "prompt": s.prompt,
        "negative_prompt": s.negative_prompt,
        "base_model": s.base_model.strip() or None,
        "motion_module": s.motion_module.strip() or None,
        "domain_adapter": s.domain_adapter.strip() or None,
        "domain_adapter_scale": round(float(s.domain_adapter_scale), 4),
        "frames": frames,
        "width": width,
        "height": height,
        "steps": s.steps or None,
        "guidance": s.guidance or None,
        "seed": s.seed,
        "preset": s.preset,
    }
    camera = {x.motion: round(float(x.weight), 4) for x in s.camera_loras if x.enabled and x.weight > 0}
    loras = [{"id": x.model_id, "weight": float(x.weight)} for x in s.extra_loras if x.enabled]
    channel = s.channel
    if "motion_loras" in overrides:
        camera, loras = split_loras(overrides.pop("motion_loras"))
    for key, value in overrides.items():
        if key == "channel":
            channel = whole_number(key, value)
        elif key == "start_frame":
            start = whole_number(key, value)
        elif key == "frames":  # 2.7 frames is refused, not cut to 2 (the protocol checks the range)
            req[key] = whole_number(key, value)
        else:
            req[key] = value
    if req.get("preset") in PRESET_ALIASES:
        req["preset"] = PRESET_ALIASES[req["preset"]]
    for key in ("width", "height"):
        value = req.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):  # else the protocol refuses its type
            # Refused, not clamped to 8: -512 is a mistake, not a wish for the smallest size.
            if not is_finite(value):
                raise ValueError(f"{key} must be a finite number of pixels, not {shown(value)}")
            if value < 8:
                raise ValueError(f"{key} {shown(value)} is below the smallest size (8 pixels)")
            req[key] = round8(value)  # the protocol refuses one above its limit, in words
    req["motion_loras"] = loras
    if not str(req.get("prompt") or "").strip() and not req.get("prompt_travel"):
        raise ValueError("the prompt is empty")
    if channel < 1:  # refused, not moved to channel 1
        raise ValueError(f"channel {shown(channel)} is below the sequencer's first channel (1)")
    if channel > MAX_CHANNEL:  # else refused only after the render, when the strip is added
        raise ValueError(f"channel {shown(channel)} is above the sequencer's last channel ({MAX_CHANNEL})")
    if not -MAX_FRAME <= start <= MAX_FRAME:  # Blender would put the strip at the limit instead
        raise ValueError(f"start frame {shown(start)} is outside Blender's frame range "
                         f"({-MAX_FRAME} to {MAX_FRAME})")
    return Plan(req, camera, channel, start, panel_hints={k: v for k, v in panel_hints(s).items() if k not in overrides})


def panel_hints(settings: Any) -> dict[str, str]:
    """What to change in the panel when the backend refuses the size or the length."""
    size = ("Render aspect: turn it off and set Width and Height" if settings.use_render_size
            else "set a smaller Width or Height")
    length = ("Scene length: turn it off and set Frames (or a smaller size)" if settings.use_scene_length
              else "set fewer Frames (or a smaller size)")
    return {"width": size, "height": size, "frames": length}


def whole_number(key: str, value: Any) -> int:
    """An int setting given by a script or a shot list; ValueError (not TypeError) in words.
    A float must be a whole number (4.0, not 12.9: it used to be cut to 12 silently)."""
    problem = ValueError(f"{key} must be a whole number, not {shown(value)}")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise problem
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not value.is_integer():  # also inf and nan
            raise problem
        return int(value)
    try:
        return int(value.strip())
    except ValueError:  # "12.9", "twelve", more digits than Python converts
        raise problem from None


def shown(value: Any, limit: int = 40) -> str:
    """`value` for a message, cut short: a 400-digit number is not printed in full."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            text = str(value)
        except ValueError:  # more digits than Python converts to text
            return f"a number of about {value.bit_length() * 30103 // 100000} digits"
        if len(text) > limit:
            return f"{text[:12]}...({len(text.lstrip('-'))} digits)"
        return text
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_name(name: Any, limit: int = 40) -> str:
    """A key for a message, as written (no quotes), cut short."""
    text = str(name)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def split_loras(spec: Any) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """{name-or-id: weight} (or a list of {id, weight}) -> camera motions and LoRA ids."""
    camera: dict[str, float] = {}
    loras: list[dict[str, Any]] = []
    if isinstance(spec, dict):
        items = list(spec.items())
    elif isinstance(spec, list | tuple) and all(isinstance(x, dict) and "id" in x for x in spec):
        items = [(x["id"], x.get("weight", 1.0)) for x in spec]
    elif not spec:
        items = []
    else:
        raise ValueError(f"motion_loras must be {{name: weight}} or a list of {{id, weight}}, not {spec!r}"[:300])
    for name, weight in items:
        try:
            weight = float(weight)
        except (TypeError, ValueError, OverflowError):  # OverflowError: 10**400
            raise ValueError(f"the weight of MotionLoRA {shown(name)} must be a number, "
                             f"not {shown(weight)}") from None
        if not isinstance(name, str):
            raise ValueError(f"a MotionLoRA is named by a string, not {shown(name)}")
        if name in CAMERA_NAMES:
            camera[name] = weight
        elif ":" in name:
            loras.append({"id": name, "weight": weight})
        else:
            raise ValueError(f"unknown MotionLoRA {shown(name)}: use a camera motion "
                             f"({', '.join(sorted(CAMERA_NAMES))}) or a model id like lora:name.safetensors")
    return camera, loras


def output_root(scene: Any) -> str:
    """Absolute folder for results: next to the saved .blend, else the add-on's user folder."""
    import bpy

    if bpy.data.filepath:
        return bpy.path.abspath("//animatediff")
    return unsaved_root()


def unsaved_root() -> str:
    """Where takes of a file never saved land: the add-on's user folder.  They move beside the
    .blend when it is first saved (`strips.adopt_unsaved_takes`): that folder goes when the
    extension is uninstalled."""
    import bpy

    try:
        return bpy.utils.extension_path_user(__package__, path="renders", create=True)
    except (ValueError, AttributeError):  # not installed as an extension (development)
        import tempfile

        return os.path.join(tempfile.gettempdir(), "animatediff_blender_renders")


def request_json(plan: Plan) -> str:
    noted = plan.camera_motions if plan.noted_camera_motions is None else plan.noted_camera_motions
    return json.dumps({"request": plan.request, "camera_motions": noted,
                       "channel": plan.channel, "start_frame": plan.start_frame}, sort_keys=True)


def is_loopback(address: str) -> bool:
    """The protocol's rule (ipc://, inproc://, tcp:// on 127.0.0.0/8, ::1 or localhost), from
    its stdlib-only module so that zmq is not imported on the main thread."""
    from .protocol.endpoints import is_loopback as protocol_rule

    return protocol_rule(address.strip())


def network_refusal(address: str) -> str | None:
    """Why the UI may not contact `address`, or None.  Blender's "Allow Online Access" is
    respected for remote backends (scripts and batch runs name their address explicitly)."""
    import bpy

    if bpy.app.background or is_loopback(address) or getattr(bpy.app, "online_access", True):
        return None
    return (f"{address} is a remote backend and Blender's online access is off: enable "
            "Preferences > System > Network > Allow Online Access")

