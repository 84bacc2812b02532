"""The true end to end: a dolly-in camera -> Match scene camera -> Generate on the real
AnimateDiff engine with the tiny model zoo -> the strip, its files and settings; reopen."""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _common as c  # noqa: E402
import bpy  # noqa: E402

a = c.args()
c.install(a["zip"])
c.configure(a["address"], a["key_file"], timeout_s=30.0)
jobs = c.sub("jobs")
sc = c.sub("sequencer_compat")
strips = c.sub("strips")
state = c.sub("state").STATE

blend = os.path.join(a["workdir"], "real.blend")
scene = bpy.context.scene
scene.frame_start, scene.frame_end = 1, 4
scene.animatediff.frames = 4  # Frames, not Scene length (off by default)
scene.frame_current = 10
scene.render.resolution_x = scene.render.resolution_y = 64
scene.render.resolution_percentage = 100
cam = bpy.data.objects.new("Cam", bpy.data.cameras.new("Cam"))
scene.collection.objects.link(cam)
scene.camera = cam
cam.rotation_euler = (math.radians(90), 0, 0)  # looking along +Y
for frame, y in ((1, 0.0), (4, 1.2)):
    cam.location = (0, y, 0)
    cam.keyframe_insert("location", frame=frame)
bpy.ops.wm.save_as_mainfile(filepath=blend)

s = scene.animatediff
s.prompt = "a paper boat on a pond"
s.steps = 2
s.seed = 11
s.channel = 1
scene.frame_current = 1  # Match reads the frames the clip would cover from here: the dolly's
assert bpy.ops.animatediff.match_camera() == {"FINISHED"}
enabled = {r.motion: round(r.weight, 3) for r in s.camera_loras if r.enabled}
scene.frame_current = 10  # the take goes here
assert bpy.ops.animatediff.generate() == {"FINISHED"}
local = s.jobs[0].local_id
progress_seen = set()


def done():
    job = jobs.find_job(local, "local_id")[1]
    if job.state == "running" and job.total_steps:
        progress_seen.add((job.step, job.total_steps))
    return job.state in ("finished", "failed")


times = c.drain_until(done, timeout=a.get("timeout", 200))
job = jobs.find_job(local, "local_id")[1]
assert job.state == "finished", job.message
strip = sc.strips_named(scene, [job.strip_name])[0]
paths = strips.strip_frame_paths(strip)
out = {"enabled": enabled, "channel": strip.channel, "start": sc.strip_start(strip),
       "duration": sc.strip_duration(strip), "files_exist": all(os.path.isfile(p) for p in paths),
       "sizes": [os.path.getsize(p) for p in paths], "settings": strips.stored_settings(strip),
       "progress_seen": sorted(progress_seen), "drain_max_ms": max(times) * 1000}
bpy.ops.wm.save_mainfile()
state.worker.stop()
bpy.ops.wm.open_mainfile(filepath=blend)
strip = sc.all_strips(bpy.context.scene)[0]
out["reopened_files_exist"] = all(os.path.isfile(p) for p in strips.strip_frame_paths(strip))
# The PNGs are real images Blender can read.
img = bpy.data.images.load(strips.strip_frame_paths(strip)[0])
out["image_size"] = list(img.size)
out["image_path"] = strips.strip_frame_paths(strip)[0]
# Blender's own decoding of the backend's PNG writer: top row first, RGB as 0-255.
rgba = [round(v * 255) for v in img.pixels[:]]
w, h = img.size
rows = [rgba[y * w * 4 : (y + 1) * w * 4] for y in range(h)][::-1]
out["image_rgb"] = [row[i] for row in rows for i in range(len(row)) if i % 4 != 3]
bpy.ops.preferences.addon_disable(module=c.MODULE)
c.result(**out)
