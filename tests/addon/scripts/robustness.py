"""An artist's and a pipeline TD's bad days: wrong values from scripts, a damaged strip, a
scene deleted (and brought back by undo) while its job runs, an undo back to before the
backend answered, a cancel while the backend is away, the add-on disabled mid-submit.
Every case ends in words or a finished row; none in a traceback, a hang or a row that waits
for ever."""

import importlib
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
import _common as c  # noqa: E402
import bpy  # noqa: E402

a = c.args()
c.install(a["zip"])
c.configure(a["address"], a["key_file"], timeout_s=2.0)
PENDING = ("submitting", "queued", "running", "lost")
out = {}

bpy.ops.wm.save_as_mainfile(filepath=os.path.join(a["workdir"], "robust.blend"))
bpy.context.preferences.edit.use_global_undo = True


def setup(scene, prompt, steps):
    scene.frame_start, scene.frame_end = 1, 4
    scene.animatediff.frames = 4  # Frames, not Scene length (off by default)
    scene.render.resolution_x = scene.render.resolution_y = 64
    scene.render.resolution_percentage = 100
    s = scene.animatediff
    s.prompt, s.steps = prompt, steps
    s.use_current_frame, s.start_frame = False, 1
    return s


def mods():
    return c.sub("api"), c.sub("jobs"), c.sub("state").STATE, c.sub("sequencer_compat")


def row(local):
    return mods()[1].find_job(local, "local_id")[1]


def rows(local):
    return [j for sc_ in bpy.data.scenes for j in sc_.animatediff.jobs if j.local_id == local]


def last_local(scene):
    jobs = scene.animatediff.jobs
    return jobs[len(jobs) - 1].local_id


def pause_backend():
    os.kill(a["backend_pid"], signal.SIGSTOP)


def resume_backend():
    os.kill(a["backend_pid"], signal.SIGCONT)


def backend_cancels() -> int:
    """How many jobs the backend has cancelled (its log, as an operator reads it)."""
    return Path(a["backend_log"]).read_text().count("event=cancelled")


def generate_while_paused(steps: int, channel: int) -> str:
    """Generate in the current scene with the backend paused (its submit unanswered): the row's local id."""
    scene = bpy.context.scene
    scene.animatediff.steps, scene.animatediff.channel = steps, channel
    pause_backend()
    assert bpy.ops.animatediff.generate() == {"FINISHED"}
    return last_local(scene)


def cancel_while_submitting(channel: int) -> tuple[str, int]:
    """Generate with the backend paused, then ✕ on its row: (local id, backend cancels before)."""
    local = generate_while_paused(100, channel)
    time.sleep(0.3)
    before = backend_cancels()
    assert bpy.ops.animatediff.cancel(local_id=local) == {"FINISHED"}
    return local, before


api, jobs, state, sc = mods()
scene = bpy.context.scene
s = setup(scene, "a pier", 2)
conn = {"address": a["address"], "key_file": a["key_file"]}

# 1. The scripting API with wrong keywords: AnimateDiffError in words, before any job exists
#    (a number as the address used to hang the client for ever).
bad_calls = {
    "channel None": {"channel": None}, "start None": {"start_frame": None},
    "loras str": {"motion_loras": "ZoomIn"}, "loras without id": {"motion_loras": [{"weight": 1}]},
    "lora weight None": {"motion_loras": {"ZoomIn": None}}, "key_file int": {"key_file": 5},
    "timeout str": {"timeout": "600"}, "address int": {"address": 5557}, "start beyond": {"start_frame": 2_000_000},
}
out["api"] = {}
rows_before = len(s.jobs)
for label, kw in bad_calls.items():
    t0 = time.monotonic()
    try:
        api.generate(scene, **{"prompt": "x", "frames": 2, "steps": 2, "timeout": 30, **conn, **kw})
        result = "no error"
    except api.AnimateDiffError as exc:
        result = f"AnimateDiffError: {exc}"
    except Exception as exc:  # noqa: BLE001 - what the test is about
        result = f"{type(exc).__name__}: {exc}"
    out["api"][label] = {"result": result, "seconds": time.monotonic() - t0}
out["api_strips"] = len(sc.all_strips(scene))

# 2. Regenerate of a strip whose stored settings were damaged (edited by hand): an error
#    in words, no traceback, no row; a stored value the protocol refuses: the row fails.
source = api.generate(scene, prompt="source", frames=2, steps=2, channel=5, start_frame=1, timeout=60, **conn)
for strip in sc.all_strips(scene):
    strip.select = False
source.select = True
scene.sequence_editor.active_strip = source
out["regen"] = {}
for label, raw in (("request str", '{"request": "x"}'), ("request list", '{"request": [1, 2]}')):
    source["animatediff"] = raw
    n = len(s.jobs)
    try:
        result = str(bpy.ops.animatediff.regenerate())
    except RuntimeError as exc:
        result = str(exc)
    out["regen"][label] = {"result": result, "new_rows": len(s.jobs) - n}
source["animatediff"] = '{"request": {"prompt": "x", "frames": "abc"}}'
assert bpy.ops.animatediff.regenerate() == {"FINISHED"}
local = last_local(scene)
try:
    c.drain_until(lambda: row(local).state not in PENDING, 30)
except AssertionError:
    pass
out["regen"]["frames abc"] = {"state": row(local).state, "message": row(local).message}

# 3. A start frame past Blender's last frame: refused in words, not placed elsewhere.
s.start_frame = 2_000_000
n = len(s.jobs)
try:
    result = str(bpy.ops.animatediff.generate())
except RuntimeError as exc:
    result = str(exc)
out["start_beyond"] = {"result": result, "new_rows": len(s.jobs) - n}
s.start_frame = 1

# 4. The scene a job belongs to is deleted while it runs, then brought back by Ctrl+Z: the
#    job's row ends and its take lands (the row used to stay "running" for ever).
shot2 = bpy.data.scenes.new("Shot2")
setup(shot2, "a gull", 30)
with bpy.context.temp_override(scene=shot2):
    assert bpy.ops.animatediff.generate() == {"FINISHED"}
local = last_local(shot2)
c.drain_until(lambda: row(local).state == "running", 30)
job_id = row(local).job_id
bpy.ops.ed.undo_push(message="before deleting Shot2")
bpy.data.scenes.remove(shot2)
bpy.ops.ed.undo_push(message="deleted Shot2")
c.drain_until(lambda: job_id not in state.worker.jobs, 30)  # it ended meanwhile
c.drain_until(lambda: True, 1)
assert bpy.ops.ed.undo() == {"FINISHED"}
try:
    c.drain_until(lambda: row(local) is not None and row(local).state not in PENDING, 20)
except AssertionError:
    pass
shot2 = bpy.data.scenes.get("Shot2")
j = row(local)
placed = sc.strips_named(shot2, [j.strip_name]) if shot2 is not None and j is not None and j.strip_name else []
out["deleted_scene"] = {"scene_back": shot2 is not None, "state": j.state if j else None,
                        "message": j.message if j else None,
                        "strip_frames_exist": bool(placed) and all(
                            os.path.isfile(p) for p in c.sub("strips").strip_frame_paths(placed[0]))}

# 5. Ctrl+Z back to a step where the row was still "submitting" (the artist kept working
#    while a slow backend took its time to accept): one row, and it ends (there used to be
#    two rows, one "submitting" for ever).
local = generate_while_paused(20, 8)
scene = bpy.context.scene
scene.frame_current = 3
bpy.ops.ed.undo_push(message="artist edit while submitting")
resume_backend()
c.drain_until(lambda: row(local).job_id != "", 30)
scene.frame_current = 4
bpy.ops.ed.undo_push(message="artist edit after accept")
assert bpy.ops.ed.undo() == {"FINISHED"}
try:
    c.drain_until(lambda: all(x.state not in PENDING for x in rows(local)), 30)
except AssertionError:
    pass
out["undo_to_submitting"] = [(x.state, x.message) for x in rows(local)]

# 6. ✕ on a row still "submitting" while the backend is away: it ends at once; once the
#    backend is back, the job it made of that submit is cancelled there.  100 steps (5 s with
#    the fake 0.05 s a step): the job must still be running when the owed cancel arrives, after
#    the worker's reconnect back-off (20 steps finished first on a loaded CI machine).
local, cancels_before = cancel_while_submitting(10)
t0 = time.monotonic()
try:
    c.drain_until(lambda: row(local).state not in PENDING, 10)
except AssertionError:
    pass
out["cancel_submitting"] = {"state": row(local).state, "message": row(local).message,
                            "seconds": time.monotonic() - t0}
resume_backend()
# Waits for what the backend logs, not for the worker's lists: they are empty for a moment
# while it sends what it owed (the test went on early and paused the backend again).
try:
    c.drain_until(lambda: backend_cancels() > cancels_before, 30)
except AssertionError:
    pass
c.drain_until(lambda: True, 1)
out["cancel_submitting_after"] = {"state": row(local).state, "owed": len(state.worker.waiting),
                                  "backend_cancels": backend_cancels() - cancels_before}

# 6b. The same, but the add-on is disabled while that cancel is owed, and enabled again: the
#     stopped worker hands the cancel on, and the backend still hears of it.
local, cancels_before = cancel_while_submitting(11)
c.drain_until(lambda: True, 0.3)
old_worker = state.worker
bpy.ops.preferences.addon_disable(module=c.MODULE)
old_worker.join(10)  # its submit times out (2 s): it stops, the cancel still owed
bpy.ops.preferences.addon_enable(module=c.MODULE)
c.configure(a["address"], a["key_file"], timeout_s=2.0)
api, jobs, state, sc = mods()
resume_backend()
try:
    c.drain_until(lambda: backend_cancels() > cancels_before, 30)
except AssertionError:
    pass
out["cancel_owed_over_disable"] = {"state": row(local).state, "backend_cancels": backend_cancels() - cancels_before}

# 7. The add-on is disabled while a submit waits for a backend that does not answer, and
#    enabled again: disabling does not hold Blender (it waited 2 s for the worker), and the
#    submit the stopped worker still owed is sent again: the row ends, with its take.
local = generate_while_paused(2, 12)
time.sleep(0.3)
old_worker = state.worker
t0 = time.perf_counter()
bpy.ops.preferences.addon_disable(module=c.MODULE)
out["disable_ms"] = (time.perf_counter() - t0) * 1000
old_worker.join(10)  # its submit times out (2 s): it stops without an answer
bpy.ops.preferences.addon_enable(module=c.MODULE)
c.configure(a["address"], a["key_file"], timeout_s=2.0)  # Blender drops a disabled add-on's preferences
importlib.import_module(c.MODULE)._first_resume()  # what the add-on's start-up timer runs
api, jobs, state, sc = mods()
jobs.resume_pending()  # ...and, with a window (not under -b), its `_resume`: the owed submit stays owed
resume_backend()
try:
    c.drain_until(lambda: row(local).state not in PENDING, 30)
except AssertionError:
    pass
j = row(local)
out["reenabled"] = {"state": j.state, "message": j.message, "rows": len(rows(local)),
                    "strips": len(sc.strips_named(bpy.context.scene, [j.strip_name])) if j.strip_name else 0}

# 8. Late messages for rows that ended.  A cancelled row stays cancelled: a late acceptance
#    cancels its job, and progress or a take from a worker that watched the job before the
#    cancel reached it is ignored.  A row that ended otherwise ("Blender closed before the
#    backend answered") takes a late acceptance, as before.
msgs = c.sub("messages")
scene = bpy.context.scene
sent = []
real_worker = jobs.worker
jobs.worker = lambda: type("W", (), {"send": staticmethod(sent.append)})()
try:
    ended = {}
    for name in ("cancelled", "failed"):
        j = scene.animatediff.jobs.add()
        j.local_id, j.state, j.message = name * 4 + "0" * (32 - 4 * len(name)), name, "ended"
        ended[name] = j.local_id
    jobs.apply(msgs.JobAccepted(ended["cancelled"], "c" * 32, 0))
    jobs.apply(msgs.JobAccepted(ended["failed"], "f" * 32, 0))
    row(ended["cancelled"]).job_id = "d" * 32  # as if accepted before the cancel
    # A finished row (its take placed, or placed and undone) takes no second take, and late
    # progress does not make it "running" again.
    j = scene.animatediff.jobs.add()
    j.local_id, j.job_id, j.state, j.message = "e" * 32, "9" * 32, "finished", "on channel 3"
    ended["finished"] = j.local_id
    strips_before = len(sc.all_strips(scene))
    for job_id in ("d" * 32, "9" * 32):
        jobs.apply(msgs.JobProgress(job_id, "running", 1, 2))
        jobs.apply(msgs.JobDone(job_id, str(Path(a["workdir"])), ["frame_0001.png"], 1, {}))
    out["late_messages"] = {
        "cancelled": [row(ended["cancelled"]).state, row(ended["cancelled"]).job_id],
        "failed": [row(ended["failed"]).state, row(ended["failed"]).job_id],
        "finished": [row(ended["finished"]).state, row(ended["finished"]).message],
        "sent": [[type(x).__name__, x.job_id] for x in sent],
        "new_strips": len(sc.all_strips(scene)) - strips_before,
    }
finally:
    jobs.worker = real_worker

state.worker.stop()
bpy.ops.preferences.addon_disable(module=c.MODULE)
c.result(**out)
