"""File > Save As to another folder while a job is owed: the take lands beside the .blend the
job's row now lives in, with a `//animatediff/...` strip, and nothing stays behind in the old
folder.  Three moments: an unsaved file saved for the first time mid-job, a Save As while the
backend still renders, and a Save As after the worker already wrote the frames (its result
not yet applied by the timer)."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import _common as c  # noqa: E402
import bpy  # noqa: E402

a = c.args()
c.install(a["zip"])
c.configure(a["address"], a["key_file"], timeout_s=10.0)
jobs = c.sub("jobs")
files = c.sub("files")
settings = c.sub("settings")
state = c.sub("state").STATE
sc = c.sub("sequencer_compat")
strips = c.sub("strips")
out = {}

scene = bpy.context.scene
scene.frame_start, scene.frame_end = 1, 4
scene.animatediff.frames = 4  # Frames, not Scene length (off by default)
scene.render.resolution_x = scene.render.resolution_y = 64
scene.render.resolution_percentage = 100
s = scene.animatediff
s.prompt = "a harbour"
s.steps = 40  # the test backend takes 0.05 s a step: still running when the file is saved
s.use_current_frame = False
s.start_frame = 1


def submit(channel):
    s = bpy.context.scene.animatediff
    s.channel = channel
    assert bpy.ops.animatediff.generate() == {"FINISHED"}
    local = s.jobs[len(s.jobs) - 1].local_id
    c.drain_until(lambda: bool(jobs.find_job(local, "local_id")[1].job_id), 30)
    return jobs.find_job(local, "local_id")[1].job_id


def save_as(name):
    path = os.path.join(a["workdir"], name, "shot.blend")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    bpy.ops.wm.save_as_mainfile(filepath=path)
    return os.path.dirname(path)


def takes_in(root):
    """Names in an output root: the takes' short ids (and any half-written leftovers)."""
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def collect(job_id, old_root, new_folder):
    c.drain_until(lambda: jobs.find_job(job_id)[1].state in ("finished", "failed"), 60)
    scene, job = jobs.find_job(job_id)
    found = sc.strips_named(scene, [job.strip_name]) if job.strip_name else []
    paths = strips.strip_frame_paths(found[0]) if found else []
    return {"state": job.state, "message": job.message,
            "directory": found[0].directory if found else None,
            "files_exist": bool(paths) and all(os.path.isfile(p) for p in paths),
            "resolves_beside": bool(paths) and all(
                os.path.dirname(p) == os.path.join(new_folder, "animatediff", files.short_id(job_id)) for p in paths),
            "beside": takes_in(os.path.join(new_folder, "animatediff")),
            "old": [x for x in takes_in(old_root) if files.short_id(job_id) in x], "short_id": files.short_id(job_id)}


# 1. Never saved: the job's root is the add-on's user folder; the first save moves the take
# beside the new .blend.
unsaved_root = settings.output_root(scene)
job_id = submit(2)
out["unsaved_state_at_save"] = jobs.find_job(job_id)[1].state
out["unsaved_owed_at_save"] = job_id in state.worker.jobs
first = save_as("first")
out["unsaved"] = collect(job_id, unsaved_root, first)

# 2. Save As to another folder while the backend still renders.
job_id = submit(3)
out["running_state_at_save"] = jobs.find_job(job_id)[1].state
out["running_owed_at_save"] = job_id in state.worker.jobs
second = save_as("second")
out["running"] = collect(job_id, os.path.join(first, "animatediff"), second)

# 3. The backend sent everything and the worker wrote the frames, but the timer has not yet
# applied the result when the artist saves elsewhere.
job_id = submit(4)
deadline = time.monotonic() + 60
while job_id in state.worker.jobs and time.monotonic() < deadline:
    time.sleep(0.05)  # no drain: the result waits on the outbox
out["written_owed_at_save"] = job_id in state.worker.jobs
out["written_pending_at_save"] = jobs.find_job(job_id)[1].state in ("queued", "running")
third = save_as("third")
out["written"] = collect(job_id, os.path.join(second, "animatediff"), third)

# The new file, saved and reopened, still finds every frame of its three takes.
bpy.ops.wm.save_mainfile()
state.worker.stop()
state.worker = None
bpy.ops.wm.open_mainfile(filepath=os.path.join(third, "shot.blend"))
out["reopened_missing"] = [p for x in sc.all_strips(bpy.context.scene) for p in strips.strip_frame_paths(x)
                           if not os.path.isfile(p)]
bpy.ops.preferences.addon_disable(module=c.MODULE)
c.result(**out)
