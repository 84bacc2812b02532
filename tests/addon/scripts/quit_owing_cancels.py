"""Run twice on one profile.  "quit": the artist cancels a job while the backend is away,
and Blender quits (no disable, no unregister).  "next": a new session's worker for the same
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
if a["phase"] == "quit":
    w.send(m.WatchJobs({a["job_id"]: a["out_root"]}))
    w.send(m.CancelJob(a["job_id"]))
    c.result(**out)  # and quit, owing the cancel
else:
    deadline = time.monotonic() + 20
    while a["job_id"] not in w.waiting_cancels and time.monotonic() < deadline:
        time.sleep(0.05)
    out["owed"] = sorted(w.waiting_cancels)
    out["files_left"] = sorted(os.listdir(state.owed_folder))
    c.result(**out)
