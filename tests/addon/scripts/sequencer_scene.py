"""Where a take lands: Blender 5.x's Sequencer shows a scene of its own (the workspace's
`sequencer_scene`), often not the window's; and a strip inside a meta strip does not take
the timeline channel of the same number."""

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
out: dict = {}
bpy.ops.wm.save_as_mainfile(filepath=os.path.join(a["workdir"], "film.blend"))
shot = bpy.context.scene
shot.name = "Shot3D"
edit = shot
if hasattr(bpy.context.workspace, "sequencer_scene"):  # 5.0+
    edit = bpy.data.scenes.new("Edit")
    bpy.context.workspace.sequencer_scene = edit
out["edit_scene"] = (getattr(bpy.context, "sequencer_scene", None) or bpy.context.scene).name
for scn in {shot, edit}:
    scn.frame_start, scn.frame_end = 1, 4
    scn.animatediff.frames = 4  # Frames, not Scene length (off by default)
    scn.render.resolution_x = scn.render.resolution_y = 64
shot.frame_current, edit.frame_current = 1, 30

# A meta strip on channel 5 holding a strip on its own channel 2, over the take's frames.
se = edit.sequence_editor_create()
top = se.strips if hasattr(se, "strips") else se.sequences
meta = top.new_meta(name="Meta", channel=5, frame_start=30)
inner = meta.strips if hasattr(meta, "strips") else meta.sequences
try:  # 5.x: a length; 4.2: an end frame
    inner.new_effect(name="inner", type="COLOR", channel=2, frame_start=30, length=30)
except TypeError:
    inner.new_effect(name="inner", type="COLOR", channel=2, frame_start=30, frame_end=60)

s = (getattr(bpy.context, "sequencer_scene", None) or bpy.context.scene).animatediff  # what the Sequencer's panel shows
s.prompt = "a fox"
s.channel = 2
s.use_current_frame = True
assert bpy.ops.animatediff.generate() == {"FINISHED"}
local = s.jobs[-1].local_id
c.drain_until(lambda: jobs.find_job(local, "local_id")[1].state in ("finished", "failed"), 60)
job = jobs.find_job(local, "local_id")[1]
out["job"] = [job.state, job.message]
out["strips"] = {scn.name: [(x.name, x.channel, sc.strip_start(x)) for x in sc.all_strips(scn)
                            if x.name.startswith("AD ")] for scn in bpy.data.scenes}
# Regenerate finds the take selected in the Sequencer's scene.
for x in sc.all_strips(edit):
    x.select = x.name.startswith("AD ")
out["regenerate"] = list(bpy.ops.animatediff.regenerate())
out["jobs_after_regenerate"] = len(s.jobs)
c.sub("state").STATE.worker.stop()
c.result(**out)
