"""Install the zip, check registration, bundled wheels, the panel's request, camera analysis,
then disable cleanly."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _common as c  # noqa: E402
import bpy  # noqa: E402

a = c.args()
pkg = c.install(a["zip"])
assert pkg.__name__ == c.MODULE, pkg.__name__
out = {"module": pkg.__name__, "blender": bpy.app.version_string}

# Registration: operators, panels, preferences keyed by __package__, scene settings.
for op in ("generate", "cancel", "match_camera", "regenerate", "test_connection", "randomize_seed"):
    assert hasattr(bpy.ops.animatediff, op), op
    assert getattr(bpy.ops.animatediff, op).get_rna_type() is not None
assert hasattr(bpy.types, "ADB_PT_sequencer") and hasattr(bpy.types, "ADB_PT_view3d")
assert c.MODULE in bpy.context.preferences.addons
prefs = bpy.context.preferences.addons[c.MODULE].preferences
assert prefs.address == "tcp://127.0.0.1:5557", prefs.address
assert hasattr(bpy.types.Scene, "animatediff")

# Registration started nothing: no worker thread, the wheels not imported yet.
state = c.sub("state").STATE
assert state.worker is None
import threading  # noqa: E402

assert not [t for t in threading.enumerate() if t.name.startswith("animatediff")]

# The bundled wheels import (from the extension's site-packages).
import msgspec  # noqa: E402
import zmq  # noqa: E402

out["zmq"] = zmq.__version__
out["zmq_file"] = zmq.__file__
out["msgspec"] = msgspec.__version__
out["zmq_has_curve"] = bool(zmq.has("curve"))
proto = c.sub("protocol.client")
assert proto.BackendClient

# The panel's settings -> request: defaults from the scene.
scene = bpy.context.scene
scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 1920, 1080, 25
scene.frame_start, scene.frame_end = 1, 24
scene.frame_current = 7
s = scene.animatediff
s.prompt = "a fox"
st = c.sub("settings")
plan = st.plan_from_scene(scene)
out["plan"] = {"request": plan.request, "channel": plan.channel, "start_frame": plan.start_frame}
# A new scene's own 1920x1080 at 100%, and the scene's length instead of Frames.
scene.render.resolution_percentage = 100
s.use_scene_length = True
plan = st.plan_from_scene(scene)
out["full_hd_scene_length"] = [plan.request["width"], plan.request["height"], plan.request["frames"]]
s.use_scene_length = False
try:
    s.prompt = ""
    st.plan_from_scene(scene)
    raise AssertionError("an empty prompt must be refused")
except ValueError as exc:
    out["empty_prompt_error"] = str(exc)
s.prompt = "a fox"
plan = st.plan_from_scene(scene, motion_loras={"ZoomIn": 0.5, "lora:custom.safetensors": 0.3}, preset="fast")
out["override"] = {"camera": plan.camera_motions, "loras": plan.request["motion_loras"],
                   "preset": plan.request["preset"]}

# Camera analysis on synthetic animations.
from mathutils import Euler, Vector  # noqa: E402

cm = c.sub("camera_match")


def camera_case(name, start_loc, end_loc, start_rot_deg, end_rot_deg, frames=(1, 17)):
    import math

    cam_data = bpy.data.cameras.new(name)
    cam = bpy.data.objects.new(name, cam_data)
    scene.collection.objects.link(cam)
    base = Euler((math.radians(90), 0, 0), "XYZ")  # looking along +Y, up +Z
    for frame, loc, rot in ((frames[0], start_loc, start_rot_deg), (frames[1], end_loc, end_rot_deg)):
        cam.location = Vector(loc)
        # Extra rotation applied in the camera's local axes (yaw about local Y, pitch X, roll Z).
        local = Euler(tuple(math.radians(v) for v in rot), "ZXY").to_matrix()
        cam.rotation_euler = (base.to_matrix() @ local).to_euler("XYZ")
        cam.keyframe_insert("location", frame=frame)
        cam.keyframe_insert("rotation_euler", frame=frame)
    for fc in (cam.animation_data.action.fcurves if hasattr(cam.animation_data.action, "fcurves") else []):
        for kp in fc.keyframe_points:
            kp.interpolation = "LINEAR"
    scene.camera = cam
    scene.frame_start, scene.frame_end = frames
    motion = cm.analyse(scene)
    return {"weights": motion.weights, "dolly": motion.dolly, "truck": motion.truck, "yaw": motion.yaw_deg,
            "pitch": motion.pitch_deg, "roll": motion.roll_deg}


cases = {
    # camera looks along +Y: forward is +Y, left is -X, up is +Z
    "pan_left_15deg": camera_case("pan", (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 15, 0)),
    "pan_right_truck": camera_case("truck", (0, 0, 0), (3, 0, 0), (0, 0, 0), (0, 0, 0)),
    "dolly_in_1m": camera_case("dolly", (0, 0, 0), (0, 1, 0), (0, 0, 0), (0, 0, 0)),
    "dolly_out_5m": camera_case("dolly_out", (0, 0, 0), (0, -5, 0), (0, 0, 0), (0, 0, 0)),
    "roll_cw_30": camera_case("roll", (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, -30)),
    "tilt_up_9": camera_case("tilt", (0, 0, 0), (0, 0, 0), (0, 0, 0), (9, 0, 0)),
    "combined": camera_case("combo", (0, 0, 0), (0, 1.6, 0), (0, 0, 0), (0, -12, 0)),
    "still": camera_case("still", (0, 0, 0), (0, 0.1, 0), (0, 0, 0), (0, 1, 0)),
}
out["camera"] = cases
# Applying the weights switches the right rows on.
cm.apply_to_settings(s, cases["combined"]["weights"])
out["applied"] = {r.motion: [r.enabled, round(r.weight, 3)] for r in s.camera_loras}
# The operator runs too (the last case's camera is active).
scene.camera = bpy.data.objects["combo"]
scene.frame_start, scene.frame_end = 1, 17
scene.frame_current = 1


def matched():
    assert bpy.ops.animatediff.match_camera() == {"FINISHED"}
    return {r.motion: round(r.weight, 3) for r in s.camera_loras if r.enabled}


# Over the frames the clip covers: its Frames from the current frame, or the scene's length.
s.use_scene_length, s.frames = True, 16
out["match_scene_length"] = [matched(), {k: round(v, 3) for k, v in cm.analyse(scene, None, 1, 17).weights.items() if v > 0}]
s.use_scene_length, s.frames = False, 9
out["match_frames"] = [matched(), {k: round(v, 3) for k, v in cm.analyse(scene, None, 1, 9).weights.items() if v > 0}]

# The panels and the preferences draw without error (a recording stand-in for the layout:
# the bpy module has no window), with jobs in every state and a model list.
class Layout:
    calls = []

    def __getattr__(self, name):
        def call(*args, **kw):
            Layout.calls.append((name, args[0] if name == "operator" else kw.get("text", "") if name == "label"
                                 else args[1] if len(args) > 1 else ""))
            return Layout()
        return call

    def __setattr__(self, name, value):
        pass


state.models = [{"id": "base:a", "kind": "base", "label": "A", "ok": True},
                {"id": "motion:v2", "kind": "motion", "label": "v2", "version": "v2", "ok": True},
                {"id": "lora:style.safetensors", "kind": "lora", "label": "Style", "ok": True},
                {"id": "adapter:watercolor.safetensors", "kind": "adapter", "label": "Watercolor", "ok": True}]
state.defaults = {"base": "base:a", "motion": "motion:v2"}
s.preset = "lightning"  # with no Lightning module on the backend: the panel warns
c.sub("properties").fill_model_lists(bpy.context.window_manager)
for st_name in ("submitting", "queued", "running", "lost", "finished", "failed", "cancelled"):
    j = s.jobs.add()
    j.state, j.prompt, j.message, j.step, j.total_steps = st_name, "p", "a message " * 8, 3, 8
state.test_message = "Failed: nobody listens"
panels = c.sub("panels")
for cls in (panels.ADB_PT_sequencer, panels.ADB_PT_view3d, c.sub("preferences").ADB_Preferences):
    holder = type("Holder", (), {})()
    holder.layout = Layout()
    target = prefs if cls.__name__ == "ADB_Preferences" else holder
    if target is prefs:
        cls.draw(type("P", (), {"layout": Layout(), **{k: getattr(prefs, k) for k in (
            "address", "key_file", "server_public_key_file", "client_secret_key_file", "timeout_s",
            "backend_command", "auto_start")}})(), bpy.context)
    else:
        cls.draw(holder, bpy.context)
out["drawn_props"] = sorted({str(x[1]) for x in Layout.calls if x[0] in ("prop", "prop_search")})
out["drawn_ops"] = sorted({str(x[1]) for x in Layout.calls if x[0] == "operator"})
out["drawn_labels"] = [str(x[1]) for x in Layout.calls if x[0] == "label"]
out["adapter_list"] = [x.name for x in bpy.context.window_manager.animatediff_models.adapter]
# The panel's spatial LoRA and its strength go into the request.
s.domain_adapter, s.domain_adapter_scale = "adapter:watercolor.safetensors", 0.7
plan = st.plan_from_scene(scene)
out["adapter_plan"] = [plan.request["domain_adapter"], plan.request["domain_adapter_scale"]]
s.domain_adapter = ""
s.preset = "quality"
s.jobs.clear()

# The local backend command line, as Popen gets it on each OS.
ops_mod = c.sub("operators")
win_cmd = r'C:\Users\me\venv\Scripts\animatediff-blender.exe serve --bind tcp://127.0.0.1:5557'
out["backend_argv_windows"] = ops_mod.backend_argv(win_cmd, windows=True)
out["backend_argv_posix"] = ops_mod.backend_argv("'/opt/my tools/animatediff-blender' serve", windows=False)

# A key file picked with the file browser's "Relative Path" (`//`, relative to the .blend open
# then) is kept absolute: relative, it would resolve against every other project opened later.
import tempfile  # noqa: E402

blend_dir = tempfile.mkdtemp()
bpy.ops.wm.save_as_mainfile(filepath=os.path.join(blend_dir, "project.blend"))
prefs.key_file = "//keys/hmac.key"
out["key_file_from_relative"] = [prefs.key_file, os.path.join(blend_dir, "keys", "hmac.key")]
prefs.key_file = ""

# Disable: unregistration is clean.
bpy.ops.preferences.addon_disable(module=c.MODULE)
assert c.MODULE not in bpy.context.preferences.addons
assert not hasattr(bpy.types.Scene, "animatediff")
assert not hasattr(bpy.types, "ADB_PT_sequencer")
try:
    bpy.ops.animatediff.generate.get_rna_type()
    raise AssertionError("the generate operator is still registered")
except KeyError:
    pass
out["disabled"] = True
c.result(**out)
