"""A job submitted in one .blend finishes while another .blend is open: its take must not
land in the other file (it used to, in the scene of the same name); the first file
collects it when reopened.  Regenerate of a strip on the last channel is refused up front."""

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _common as c  # noqa: E402
import bpy  # noqa: E402

a = c.args()
c.install(a["zip"])
c.configure(a["address"], a["key_file"], timeout_s=10.0)
jobs = c.sub("jobs")
state = c.sub("state").STATE
sc = c.sub("sequencer_compat")
out = {}

other = os.path.join(a["workdir"], "other", "other.blend")
film = os.path.join(a["workdir"], "film", "film.blend")
os.makedirs(os.path.dirname(other))
os.makedirs(os.path.dirname(film))
bpy.ops.wm.save_as_mainfile(filepath=other)  # an unrelated shot file, scene "Scene" as well
bpy.ops.wm.save_as_mainfile(filepath=film)
scene = bpy.context.scene
scene.frame_start, scene.frame_end = 1, 4
scene.animatediff.frames = 4  # Frames, not Scene length (off by default)
scene.render.resolution_x = scene.render.resolution_y = 64
scene.render.resolution_percentage = 100
s = scene.animatediff
s.prompt = "a harbour"
s.steps = 40  # the test backend takes 0.05 s a step: still running when the file changes
s.channel = 2
s.use_current_frame = False
s.start_frame = 1
assert bpy.ops.animatediff.generate() == {"FINISHED"}
local = s.jobs[len(s.jobs) - 1].local_id
c.drain_until(lambda: bool(jobs.find_job(local, "local_id")[1].job_id), 30)
job_id = jobs.find_job(local, "local_id")[1].job_id
bpy.ops.wm.save_mainfile()

bpy.ops.wm.open_mainfile(filepath=other)
assert bpy.context.scene.name == "Scene"
# The worker collects the frames meanwhile; the timer applies what it reports.
c.drain_until(lambda: job_id not in state.worker.jobs and state.outbox.empty(), 60)
c.drain_until(lambda: True)
out["other_strips"] = [x.name for sc_ in bpy.data.scenes for x in sc.all_strips(sc_)]
out["other_jobs"] = [j.job_id for sc_ in bpy.data.scenes for j in sc_.animatediff.jobs]

bpy.ops.wm.open_mainfile(filepath=film)
scene = bpy.context.scene
jobs.resume_pending()
c.drain_until(lambda: jobs.find_job(job_id)[1].state in ("finished", "failed"), 60)
job = jobs.find_job(job_id)[1]
out["film_state"] = job.state
strip = sc.strips_named(scene, [job.strip_name])[0]
out["film_strip_directory"] = strip.directory

# Regenerate a take on the last channel: refused now, not after the render.
strip.channel = sc.MAX_CHANNEL
for x in sc.all_strips(scene):
    x.select = False
strip.select = True
scene.sequence_editor.active_strip = strip
n_jobs = len(scene.animatediff.jobs)
try:
    out["regen_top"] = sorted(bpy.ops.animatediff.regenerate(new_seed=True))
except RuntimeError as exc:  # an ERROR report raises when called from Python
    out["regen_top"] = str(exc)
out["regen_new_jobs"] = len(scene.animatediff.jobs) - n_jobs

# The project moves (another machine, another mount) while a job is still owed: reopened
# there, the take lands beside the moved file, not in the old folder.
strip.channel = 2
s = scene.animatediff
s.channel = 5
assert bpy.ops.animatediff.generate() == {"FINISHED"}
local = s.jobs[len(s.jobs) - 1].local_id
c.drain_until(lambda: bool(jobs.find_job(local, "local_id")[1].job_id), 30)
moved_id = jobs.find_job(local, "local_id")[1].job_id
bpy.ops.wm.save_mainfile()
state.worker.stop()  # Blender quits before the job is done
state.worker = None
moved = os.path.join(a["workdir"], "moved", "film.blend")
os.makedirs(os.path.dirname(moved))
shutil.copy(film, moved)
shutil.rmtree(os.path.join(a["workdir"], "film"))
bpy.ops.wm.open_mainfile(filepath=moved)
jobs.resume_pending()
c.drain_until(lambda: jobs.find_job(moved_id)[1].state in ("finished", "failed"), 60)
job = jobs.find_job(moved_id)[1]
out["moved_state"], out["moved_message"] = job.state, job.message
moved_strip = sc.strips_named(bpy.context.scene, [job.strip_name])
out["moved_strip_directory"] = moved_strip[0].directory if moved_strip else None
out["moved_frames_beside"] = sorted(os.listdir(os.path.join(a["workdir"], "moved", "animatediff")))
out["moved_expected"] = [c.sub("files").short_id(moved_id)]

# A take lands, then the artist edits something and presses Ctrl+Z: their edit is undone,
# not the take (the timer's insert used to leave no undo step of its own).
bpy.context.preferences.edit.use_global_undo = True
bpy.ops.ed.undo_push(message="before the take")
s = bpy.context.scene.animatediff
s.channel = 7
assert bpy.ops.animatediff.generate() == {"FINISHED"}
local = s.jobs[len(s.jobs) - 1].local_id
c.drain_until(lambda: jobs.find_job(local, "local_id")[1].state in ("finished", "failed"), 60)
take = jobs.find_job(local, "local_id")[1].strip_name
bpy.context.scene.frame_current = 3  # the artist's edit, then its operator's undo step
bpy.ops.ed.undo_push(message="artist edit")
assert bpy.ops.ed.undo() == {"FINISHED"}
job = jobs.find_job(local, "local_id")[1]  # data reloaded by the undo: look everything up again
out["undo_take_kept"] = bool(sc.strips_named(bpy.context.scene, [take]))
out["undo_job_state"] = job.state if job is not None else None
out["undo_edit_undone"] = bpy.context.scene.frame_current != 3
state.worker.stop()
bpy.ops.preferences.addon_disable(module=c.MODULE)
c.result(**out)
