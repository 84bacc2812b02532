"""`api.wait` through a backend that goes quiet (SIGSTOP, as a short network outage would):
it reconnects and collects the take; when it does give up, it says the job may still be
running, and `wait(job)` again collects it."""

import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
import _common as c  # noqa: E402
import bpy  # noqa: E402

a = c.args()
c.install(a["zip"])
c.configure(a["address"], a["key_file"], timeout_s=2.0)
api = c.sub("api")
files = c.sub("files")
pid = int(a["backend_pid"])
out = {}

bpy.ops.wm.save_as_mainfile(filepath=os.path.join(a["workdir"], "outage.blend"))
scene = bpy.context.scene
scene.render.resolution_x = scene.render.resolution_y = 64
scene.render.resolution_percentage = 100
shot = {"prompt": "a lighthouse", "frames": 4, "steps": 40, "channel": 2, "start_frame": 1}


def pause(after, seconds):
    """The backend stops answering `after` s from now, for `seconds`."""
    def run():
        time.sleep(after)
        os.kill(pid, signal.SIGSTOP)
        time.sleep(seconds)
        os.kill(pid, signal.SIGCONT)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def attempt(job, **kw):
    t0 = time.monotonic()
    try:
        r = api.wait(job, on_event=lambda e: None, **kw)
        got = {"ok": True, "directory": r.directory,
               "frames_exist": all(os.path.isfile(os.path.join(r.directory, n)) for n in r.files),
               "count": len(r.files)}
    except api.AnimateDiffError as exc:
        got = {"ok": False, "error": str(exc), "reason": exc.reason, "error_job_is_the_job": exc.job is job}
    got["seconds"] = round(time.monotonic() - t0, 1)
    return got


def backend_state(job_id):
    client, _welcome = api.connect()
    try:
        return client.status(job_id).state
    finally:
        client.close()


# 1. Paused for 9 s while the job runs (the old wait gave up after ~7 s of silence with a 2 s
#    request timeout): the wait rides it out and the take lands.
job = api.submit(scene, **shot)
t = pause(0.5, 9.0)
out["ride_out"] = attempt(job, timeout=120)
t.join()
out["ride_out"]["state"] = backend_state(job.job_id)
out["ride_out"]["short_id"] = files.short_id(job.job_id)
# Waiting again for a collected job gives the same take (a fresh connection).
out["again_after_success"] = attempt(job, timeout=30)

# 2. Paused for longer than the client keeps trying: the wait gives up, saying the job may
#    still be running; once the backend is back, wait(job) again collects it.
job = api.submit(scene, **{**shot, "channel": 3})
job.client.config.reconnect_give_up_s = 2.0
t = pause(0.3, 14.0)
out["give_up"] = attempt(job, timeout=120)
out["give_up"]["paused_still"] = t.is_alive()
t.join()
out["second_wait"] = attempt(job, timeout=60)
out["second_wait"]["state"] = backend_state(job.job_id)
out["second_wait"]["job_id"] = job.job_id
c.result(**out)
