"""Takes of a shot: a regenerated take lines up frame for frame with a trimmed source; a
take that cannot be placed says where its frames are."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _common as c  # noqa: E402
import bpy  # noqa: E402

a = c.args()
c.install(a["zip"])
c.configure(a["address"], a["key_file"], timeout_s=10.0)
api = c.sub("api")
jobs = c.sub("jobs")
sc = c.sub("sequencer_compat")
state = c.sub("state").STATE
out = {}

bpy.ops.wm.save_as_mainfile(filepath=os.path.join(a["workdir"], "takes.blend"))
scene = bpy.context.scene
scene.render.resolution_x = scene.render.resolution_y = 64
scene.render.resolution_percentage = 100
conn = {"address": a["address"], "key_file": a["key_file"]}

# The artist trims the first 3 frames of a take, then asks for another take of it.
source = api.generate(scene, prompt="a fox", frames=8, steps=2, seed=3, channel=2, start_frame=1, timeout=60,
                      motion_loras={"ZoomIn": 0.7}, **conn)
if hasattr(source, "left_handle"):
    source.left_handle = 4
else:
    source.frame_final_start = 4
for s in sc.all_strips(scene):
    s.select = False
source.select = True
scene.sequence_editor.active_strip = source
out["source"] = {"content_start": sc.content_start(source), "start": sc.strip_start(source)}
assert bpy.ops.animatediff.regenerate() == {"FINISHED"}
local = scene.animatediff.jobs[len(scene.animatediff.jobs) - 1].local_id
c.drain_until(lambda: jobs.find_job(local, "local_id")[1].state in ("finished", "failed"), 60)
job = jobs.find_job(local, "local_id")[1]
take = sc.strips_named(scene, [job.strip_name])[0]
out["take"] = {"state": job.state, "channel": take.channel, "content_start": sc.content_start(take)}
strips = c.sub("strips")
out["moves"] = {name: (strips.stored_settings(s) or {}).get("camera_motions") for name, s in
                (("source", source), ("take", take))}
out["loras"] = {name: [x["id"] for x in (strips.stored_settings(s) or {}).get("request", {}).get("motion_loras", [])]
                for name, s in (("source", source), ("take", take))}

# Channel 128 is taken at those frames: the take cannot be placed, its frames are kept on
# disk, and the job's message says where.
scene.animatediff.prompt = "a crow"
scene.animatediff.use_scene_length = False
scene.animatediff.frames = 2
scene.animatediff.steps = 2
scene.animatediff.use_current_frame = False
scene.animatediff.start_frame = 30
blocker = api.generate(scene, prompt="blocker", frames=2, steps=2, channel=2, start_frame=30, timeout=60, **conn)
blocker.channel = 128
scene.animatediff.channel = 128
assert bpy.ops.animatediff.generate() == {"FINISHED"}
local = scene.animatediff.jobs[len(scene.animatediff.jobs) - 1].local_id
c.drain_until(lambda: jobs.find_job(local, "local_id")[1].state in ("finished", "failed"), 60)
job = jobs.find_job(local, "local_id")[1]
folder = os.path.join(a["workdir"], "animatediff", job.job_id[:8])
out["unplaced"] = {"state": job.state, "message": job.message, "folder": folder,
                   "files": sorted(os.listdir(folder)) if os.path.isdir(folder) else []}

# Ctrl+Z right after a take landed undoes the take; its job row comes back as it was before
# (queued...), but the job has ended: the row must say so, not wait for ever.
bpy.context.preferences.edit.use_global_undo = True
scene.animatediff.channel = 10
scene.animatediff.prompt = "an owl"
bpy.ops.ed.undo_push(message="before generate")
assert bpy.ops.animatediff.generate() == {"FINISHED"}
local = scene.animatediff.jobs[len(scene.animatediff.jobs) - 1].local_id
scene.frame_current = 7  # the artist keeps working meanwhile: an undo step with the row pending
bpy.ops.ed.undo_push(message="artist edit")
c.drain_until(lambda: jobs.find_job(local, "local_id")[1].state in ("finished", "failed"), 60)
undone = jobs.find_job(local, "local_id")[1].strip_name
assert bpy.ops.ed.undo() == {"FINISHED"}
c.drain_until(lambda: True, 1)  # the timer runs on, with nothing to say about that job
scene = bpy.context.scene  # reloaded by the undo
job = jobs.find_job(local, "local_id")[1]
out["undone_take"] = {"strip_left": bool(sc.strips_named(scene, [undone])),
                      "state": job.state, "message": job.message}
# "Start the local backend automatically" with a command that cannot run (Blender started
# from a desktop launcher, without the venv on PATH): the artist is told, not only the console.
prefs = jobs.preferences()
prefs.auto_start, prefs.backend_command = True, "/nonexistent/animatediff-blender serve"
patience, problem = c.sub("operators").maybe_autostart()
out["autostart"] = {"patience": patience, "problem": problem}
prefs.auto_start, prefs.backend_command = False, ""
state.worker.stop()
c.result(**out)
