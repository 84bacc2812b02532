"""A take that landed while the file had never been saved is in the add-on's user folder;
saving the file moves it beside the .blend (the extension's folder goes at an uninstall)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _common as c  # noqa: E402
import bpy  # noqa: E402

a = c.args()
c.install(a["zip"])
c.configure(a["address"], a["key_file"])
jobs = c.sub("jobs")
sc = c.sub("sequencer_compat")
strips = c.sub("strips")
scene = bpy.context.scene
scene.frame_start, scene.frame_end = 1, 4
scene.animatediff.frames = 4  # Frames, not Scene length (off by default)
scene.render.resolution_x = scene.render.resolution_y = 64
s = scene.animatediff
s.prompt = "a fox"
assert bpy.ops.animatediff.generate() == {"FINISHED"}  # in a file never saved
local = s.jobs[-1].local_id
c.drain_until(lambda: jobs.find_job(local, "local_id")[1].state in ("finished", "failed"), 60)
job = jobs.find_job(local, "local_id")[1]
out = {"job": [job.state, job.message]}
strip = sc.strips_named(scene, [job.strip_name])[0]
before = strips.strip_frame_paths(strip)
out["before"] = {"in_user_folder": before[0].startswith(c.sub("settings").unsaved_root()),
                 "exist": all(map(os.path.isfile, before))}
# A duplicate of the strip shares its take.
copy = sc.top_strips(scene).new_image(name="copy", filepath=before[0], channel=9, frame_start=1)
copy[strips.SETTINGS_KEY] = strip[strips.SETTINGS_KEY]
blend = os.path.join(a["workdir"], "project", "film.blend")
os.makedirs(os.path.dirname(blend))
bpy.ops.wm.save_as_mainfile(filepath=blend)
out["directories"] = sorted({strip.directory, copy.directory})
after = strips.strip_frame_paths(strip)
out["after"] = {"beside": all(p.startswith(os.path.dirname(blend)) for p in after),
                "exist": all(map(os.path.isfile, after)), "old_gone": not any(map(os.path.exists, before))}
c.sub("state").STATE.worker.stop()
name = strip.name
bpy.ops.wm.open_mainfile(filepath=blend)
reopened = [x for x in sc.all_strips(bpy.context.scene) if x.name == name]
out["reopened"] = [x.directory for x in reopened]
out["reopened_exist"] = all(os.path.isfile(p) for x in reopened for p in strips.strip_frame_paths(x))
c.result(**out)
