"""An artist's everyday session, as the panel's buttons do it: operators called with an undo
step where a button press makes one (bpy.ops' third argument), the timer driven as Blender would."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _common as c  # noqa: E402
import bpy  # noqa: E402

a = c.args()
c.install(a["zip"])
c.configure(a["address"], a["key_file"], timeout_s=10.0)
jobs = c.sub("jobs")
panels = c.sub("panels")
sc = c.sub("sequencer_compat")
state = c.sub("state").STATE
out = {}


class Layout:
    """Records what a panel draws: the labels and the cancel buttons (their job rows)."""

    def __init__(self, log):
        object.__setattr__(self, "log", log)

    def __getattr__(self, name):
        def call(*args, **kw):
            self.log.append((name, kw.get("text")))
            return Layout(self.log)
        return call

    def __setattr__(self, key, value):
        self.log.append((key, value))


def button(op):
    """The operator as a button press runs it: with its undo step."""
    return op("EXEC_DEFAULT", True)


bpy.ops.wm.save_as_mainfile(filepath=os.path.join(a["workdir"], "workflows.blend"))
bpy.context.preferences.edit.use_global_undo = True
scene = bpy.context.scene
s = scene.animatediff
s.frames, s.steps = 2, 2

# Generate, wait, Ctrl+Z of the take: the strip goes, and the row says so (it vanished with
# it: the step before the take was from before the row existed).
s.prompt = "a fox"
bpy.ops.ed.undo_push(message="artist edit")
assert button(bpy.ops.animatediff.generate) == {"FINISHED"}
local = s.jobs[len(s.jobs) - 1].local_id
c.drain_until(lambda: jobs.find_job(local, "local_id")[1].state == "finished", 60)
bpy.ops.ed.undo()
c.drain_until(lambda: True, 1)
scene = bpy.context.scene
job = jobs.find_job(local, "local_id")[1]
out["undone_take"] = {"row": None if job is None else [job.state, job.message],
                      "strips": [x.name for x in sc.all_strips(scene)]}

# Clear finished, Ctrl+Z: the rows come back and the artist's edit before it stays.
scene.frame_current = 9
bpy.ops.ed.undo_push(message="frame 9")
assert button(bpy.ops.animatediff.clear_jobs) == {"FINISHED"}
cleared = len(bpy.context.scene.animatediff.jobs)
bpy.ops.ed.undo()
scene = bpy.context.scene
out["undone_clear"] = {"cleared": cleared, "rows": len(scene.animatediff.jobs), "frame": scene.frame_current}

# Ten takes queued one after another: the running one (the oldest) is still listed, with
# its cancel button; the panel showed the newest 8 rows only.
s = scene.animatediff
s.steps = 50
for i in range(10):
    s.prompt = f"take {i} !delay=1"
    assert bpy.ops.animatediff.generate() == {"FINISHED"}
queued = [j.local_id for j in s.jobs][-10:]
c.drain_until(lambda: all(jobs.find_job(x, "local_id")[1].job_id for x in queued), 60)
# The backend's queue, above the rows: why they wait (the worker asks every 5 s).
c.drain_until(lambda: state.queue_view is not None and "9 waiting" in state.queue_view.summary, 30)
log = []
panels.draw_jobs(Layout(log), scene)
out["listed"] = {"cancel_buttons": [v for k, v in log if k == "local_id"], "queued": queued,
                 "labels": [v for k, v in log if k == "label"]}
for x in queued:
    jobs.cancel(jobs.find_job(x, "local_id")[1])
c.drain_until(lambda: all(jobs.find_job(x, "local_id")[1].state == "cancelled" for x in queued), 60)

# Step previews: a running take shows its newest one; a take that ended can show none, and its
# preview is released (they piled up until the add-on was disabled).  The take still running
# keeps its own.  (Registration makes the collection only when Blender has a window.)
import bpy.utils.previews  # noqa: E402

timer = c.sub("timer")
state.previews = bpy.utils.previews.new()
s.steps, s.frames = 20, 2
locals_ = []
for name in ("owl", "crow"):
    s.prompt = f"an {name} !delay=0.1"
    assert bpy.ops.animatediff.generate() == {"FINISHED"}
    locals_.append(s.jobs[len(s.jobs) - 1].local_id)


def row(local):
    return jobs.find_job(local, "local_id")[1]


def loaded(job_id):
    """Whether the job's preview is in the collection (its icon: 0 without a window)."""
    return state.preview_keys.get(job_id, "") in state.previews


c.drain_until(lambda: row(locals_[0]).job_id in state.preview_keys, 60)
first = row(locals_[0]).job_id
first_key = state.preview_keys[first]
out["previews"] = {"first_running": loaded(first)}
c.drain_until(lambda: row(locals_[0]).state == "finished" and row(locals_[1]).job_id in state.preview_keys, 60)
second = row(locals_[1]).job_id
out["previews"]["second_running"] = {
    "first_kept": first in state.preview_keys or first_key in state.previews,
    "second_loaded": loaded(second), "collection": len(state.previews)}
c.drain_until(lambda: row(locals_[1]).state == "finished", 60)
c.drain_until(lambda: True, 0.3)
out["previews"]["both_ended"] = {"keys": dict(state.preview_keys), "collection": len(state.previews)}
# Released twice (a job ended, then its row cleared), or after the collection went: no error.
timer.release_preview(first)
timer.release_preview(first)
bpy.utils.previews.remove(state.previews)
state.previews = None
timer.release_preview(second)
assert button(bpy.ops.animatediff.clear_jobs) == {"FINISHED"}
c.drain_until(lambda: True, 0.3)

# A new scene without a camera: the panel says to press Match scene camera to list the camera
# moves; it has no camera to read, but the moves are listed to be picked by hand.
edit = bpy.data.scenes.new("Edit")
with bpy.context.temp_override(scene=edit):
    try:
        result = sorted(bpy.ops.animatediff.match_camera())
    except RuntimeError as exc:  # the operator's error report, as bpy.ops raises it
        result = str(exc)
    rows = len(sc.edit_scene(bpy.context).animatediff.camera_loras)
out["match_no_camera"] = {"result": result, "rows": rows}

# The address changed in the preferences: the panel's first line says what the new address
# answers, without a Generate or a refresh first.
c.drain_until(lambda: state.connected, 30)
dead = f"tcp://127.0.0.1:{a['dead_port']}"
c.configure(dead, a["key_file"], timeout_s=1.0)
try:
    c.drain_until(lambda: not state.connected and dead in state.connection_message, 15)
except AssertionError:
    pass
out["address_changed"] = {"connected": state.connected, "message": state.connection_message}
state.worker.stop()
c.result(**out)
