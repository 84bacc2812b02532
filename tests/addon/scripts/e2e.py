"""Submit from the add-on's operator against a real local backend, collect through the worker
thread and the timer function, check the strip, the files and the stored settings; occupied
channel; regenerate; save and reopen; a job that outlives the Blender session."""

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
state = c.sub("state").STATE
sc = c.sub("sequencer_compat")
strips = c.sub("strips")
out = {}
op_times = []

blend = os.path.join(a["workdir"], "shot.blend")
bpy.ops.wm.save_as_mainfile(filepath=blend)
scene = bpy.context.scene
scene.frame_start, scene.frame_end = 1, a["frames"]
scene.animatediff.frames = a["frames"]  # Frames, not Scene length (off by default)
scene.render.resolution_x = scene.render.resolution_y = 64
scene.render.resolution_percentage = 100
s = scene.animatediff
s.prompt = "a lighthouse at dusk"
s.preset = a.get("preset", "quality")
s.steps = a.get("steps", 0)
s.channel = 3
s.use_current_frame = False
s.start_frame = 5


def run_op(name, **kw):
    t0 = time.perf_counter()
    r = getattr(bpy.ops.animatediff, name)(**kw)
    op_times.append(time.perf_counter() - t0)
    return r


# The UI's preview collection (registration only makes one when Blender has a window).
import bpy.utils.previews  # noqa: E402

state.previews = bpy.utils.previews.new()
seen_previews = set()
timer = c.sub("timer")
_orig_load = timer.load_preview


def _spy(job_id, path):
    _orig_load(job_id, path)
    if job_id in state.preview_keys and state.preview_keys[job_id] in state.previews:
        seen_previews.add(job_id)


timer.load_preview = _spy

# Test connection (a background thread; the answer arrives through the timer).
run_op("test_connection")
drain = c.drain_until(lambda: bool(state.test_message), timeout=30)
out["test_message"] = state.test_message
out["models_in_wm"] = [x.name for x in bpy.context.window_manager.animatediff_models.base]


def last_job():
    return s.jobs[len(s.jobs) - 1]


def generate_and_collect(timeout=120):
    assert run_op("generate") == {"FINISHED"}
    job = last_job()
    local = job.local_id
    drain.extend(c.drain_until(lambda: jobs.find_job(local, "local_id")[1].state in ("finished", "failed"),
                               timeout=timeout))
    job = jobs.find_job(local, "local_id")[1]
    assert job.state == "finished", (job.state, job.message)
    return job


def describe(strip):
    paths = strips.strip_frame_paths(strip)
    return {"name": strip.name, "channel": strip.channel, "start": sc.strip_start(strip),
            "duration": sc.strip_duration(strip), "directory": strip.directory,
            "files_exist": all(os.path.isfile(p) for p in paths), "n_files": len(paths),
            "settings": strips.stored_settings(strip), "type": strip.type}


job1 = generate_and_collect()
# Blender initialises its image machinery on the first image strip of a session (~50-150 ms
# inside new_image on 5.x, whatever the add-on does): measured apart, the steady state after.
out["first_session_drain_max_ms"] = max(drain) * 1000
drain.clear()
strip1 = sc.strips_named(scene, [job1.strip_name])[0]
out["first"] = describe(strip1)
out["first_job_id"] = job1.job_id
out["first_folder"] = sorted(os.listdir(os.path.join(a["workdir"], "animatediff", job1.job_id[:8])))
with open(os.path.join(a["workdir"], "animatediff", job1.job_id[:8], ".animatediff-job")) as fh:
    out["first_marker"] = fh.read()

# Same channel and start again: the clip goes to the next free channel.
job2 = generate_and_collect()
out["second"] = describe(sc.strips_named(scene, [job2.strip_name])[0])

# An undo right after Generate removes the job row while the backend works: the result
# still lands (the row comes back from the add-on's shadow copy).
s.start_frame = 20
assert run_op("generate") == {"FINISHED"}
local = last_job().local_id
s.jobs.remove(len(s.jobs) - 1)
drain.extend(c.drain_until(lambda: (jobs.find_job(local, "local_id")[1] is not None
                                    and jobs.find_job(local, "local_id")[1].state == "finished"), 60))
out["after_undo"] = describe(sc.strips_named(scene, [jobs.find_job(local, "local_id")[1].strip_name])[0])
s.start_frame = 5

# Regenerate the first strip with a new seed: a new take on the channel above it (4 is
# taken by the second clip, so 5).
for st in sc.all_strips(scene):
    st.select = False
strip1.select = True
scene.sequence_editor.active_strip = strip1
n_before = len(s.jobs)
assert run_op("regenerate", new_seed=True) == {"FINISHED"}
local = last_job().local_id
assert len(s.jobs) == n_before + 1
drain.extend(c.drain_until(lambda: jobs.find_job(local, "local_id")[1].state in ("finished", "failed"), 120))
job3 = jobs.find_job(local, "local_id")[1]
assert job3.state == "finished", job3.message
out["regenerated"] = describe(sc.strips_named(scene, [job3.strip_name])[0])

# A job that is still running when Blender "quits": its id is saved in the .blend and
# the reopened file collects it.
s.start_frame = 40
s.steps = 100  # 2 s on the test backend: still running when the file is saved
assert run_op("generate") == {"FINISHED"}
local = last_job().local_id
drain.extend(c.drain_until(lambda: bool(jobs.find_job(local, "local_id")[1].job_id), 30))
pending_id = jobs.find_job(local, "local_id")[1].job_id
out["jobs_with_preview"] = len(seen_previews)
out["pending_state_at_save"] = jobs.find_job(local, "local_id")[1].state
bpy.ops.wm.save_mainfile()
state.worker.stop()  # Blender quits: the worker thread and its socket go away
state.worker = None
while not state.outbox.empty():
    state.outbox.get_nowait()
time.sleep(a.get("quit_for_s", 1.0))

bpy.ops.wm.open_mainfile(filepath=blend)
scene = bpy.context.scene
s = scene.animatediff
# Reopen: the saved strips resolve their files.
out["reopened"] = [describe(x) for x in sorted(sc.all_strips(scene), key=lambda x: x.channel)]
out["resumed"] = jobs.resume_pending()
drain.extend(c.drain_until(lambda: jobs.find_job(pending_id)[1].state in ("finished", "failed"), 120))
job4 = jobs.find_job(pending_id)[1]
assert job4.state == "finished", job4.message
out["after_restart"] = describe(sc.strips_named(scene, [job4.strip_name])[0])

out["drain_max_ms"] = max(drain) * 1000
out["drain_calls"] = len(drain)
out["apply_max_ms"] = {k: v * 1000 for k, v in state.apply_max_s.items()}
out["op_max_ms"] = max(op_times) * 1000
state.worker.stop()
bpy.ops.preferences.addon_disable(module=c.MODULE)
c.result(**out)
