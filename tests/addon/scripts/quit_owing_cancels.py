"""Run twice on one profile.  "quit": the artist cancels a job while the backend is away,
and Blender quits (no disable, no unregister); "disable": the same, but the add-on is
disabled before the quit.  "next": a new session's worker for the same
backend owes that cancel again, from the file the first session's exit handler wrote."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import _common as c  # noqa: E402

a = c.args()
c.install(a["zip"])
c.configure(a["address"], timeout_s=0.5)  # nobody listens there
state = c.sub("state").STATE
m = c.sub("messages")
w = c.sub("jobs").worker()
out = {"folder": state.owed_folder}
if a["phase"] in ("quit", "disable"):
    w.send(m.WatchJobs({a["job_id"]: a["out_root"]}))
    w.send(m.CancelJob(a["job_id"]))
    if a["phase"] == "disable":
        # The add-on is disabled before the quit: its stopped worker hands the cancel to an
        # outbox that no timer drains any more, so only the exit handler can keep it.
        import bpy

        bpy.ops.preferences.addon_disable(module=c.MODULE)
        w.join(10)
        out["worker_ended"] = not w.is_alive()
    c.result(**out)  # and quit, owing the cancel
else:
    deadline = time.monotonic() + 20
    while a["job_id"] not in w.waiting_cancels and time.monotonic() < deadline:
        time.sleep(0.05)
    out["owed"] = sorted(w.waiting_cancels)
    out["files_left"] = sorted(os.listdir(state.owed_folder))
    c.result(**out)
