"""Ctrl+C during `api.wait`: the job is cancelled on the backend (not left on the GPU), one
line says so, and KeyboardInterrupt reaches the caller."""

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
c.configure(a["address"], a["key_file"], timeout_s=5.0)
api = c.sub("api")
out = {}

bpy.ops.wm.save_as_mainfile(filepath=os.path.join(a["workdir"], "interrupt.blend"))
scene = bpy.context.scene
scene.render.resolution_x = scene.render.resolution_y = 64
scene.render.resolution_percentage = 100
# 100 steps of 0.05 s: still running when Ctrl+C comes, done well within the test otherwise.
job = api.submit(scene, prompt="a harbour", frames=4, steps=100)
out["job_id"] = job.job_id
signal.signal(signal.SIGINT, signal.default_int_handler)


def ctrl_c():
    time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGINT)


threading.Thread(target=ctrl_c, daemon=True).start()
t0 = time.monotonic()
try:
    api.wait(job, timeout=60, on_event=lambda e: None)
    out["raised"] = "nothing"
except KeyboardInterrupt:
    out["raised"] = "KeyboardInterrupt"
except Exception as exc:  # noqa: BLE001 - what the test is about
    out["raised"] = f"{type(exc).__name__}: {exc}"
out["seconds"] = round(time.monotonic() - t0, 1)

# What the backend did with the job: cancelled within a step or two, not run to the end.
client, _welcome = api.connect()
try:
    deadline = time.monotonic() + 10
    while True:
        state = client.status(job.job_id).state
        if state not in ("queued", "running") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
finally:
    client.close()
out["state"] = state

# Past `timeout`, the same: cancelled on the backend, and the error says so.
job = api.submit(scene, prompt="a harbour", frames=4, steps=100)
try:
    api.wait(job, timeout=1, on_event=lambda e: None)
    out["timeout"] = "no error"
except api.AnimateDiffError as exc:
    out["timeout"] = str(exc)
client, _welcome = api.connect()
try:
    deadline = time.monotonic() + 10
    while client.status(job.job_id).state in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.1)
    out["timeout_state"] = client.status(job.job_id).state
finally:
    client.close()
out["timeout_job_id"] = job.job_id
c.result(**out)
