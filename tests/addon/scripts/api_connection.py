"""Connection overrides as used: an address with surrounding spaces works (it passed the check
and then failed every shot); an endless or absurd `timeout_s` is refused by the check, naming
the setting, instead of failing every shot at connect."""

import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import _common as c  # noqa: E402
import bpy  # noqa: E402

a = c.args()
c.install(a["zip"])
c.configure(a["address"], a["key_file"], timeout_s=5.0)
api = c.sub("api")
out = {}

bpy.ops.wm.save_as_mainfile(filepath=os.path.join(a["workdir"], "conn.blend"))
scene = bpy.context.scene
scene.render.resolution_x = scene.render.resolution_y = 64
scene.render.resolution_percentage = 100
shot = {"prompt": "x", "frames": 2, "steps": 2}


def outcome(call):
    t0 = time.monotonic()
    try:
        value = call()
        text = "ok" if value is None or not hasattr(value, "name") else f"ok: {value.name}"
    except api.AnimateDiffError as exc:
        text = f"AnimateDiffError: {exc}"
    except Exception as exc:  # noqa: BLE001 - what the test is about
        text = f"{type(exc).__name__}: {exc}"
    return {"result": text, "seconds": round(time.monotonic() - t0, 1)}


out["address"] = {}
for label, address in {"leading": " " + a["address"], "trailing": a["address"] + " ",
                       "newline": a["address"] + "\n"}.items():
    out["address"][label] = outcome(lambda address=address: api.generate(
        scene, timeout=60, on_event=lambda e: None, address=address, **shot))

out["timeout_s"] = {}
for label, value in {"inf": math.inf, "1e300": 1e300, "nan": math.nan, "601": 601.0}.items():
    out["timeout_s"][label] = {
        "check": outcome(lambda value=value: api.check(scene, timeout_s=value, **shot) and None),
        "submit": outcome(lambda value=value: api.submit(scene, timeout_s=value, **shot) and None),
        "connect": outcome(lambda value=value: api.connect(timeout_s=value) and None),
    }
# The backend's queue, for a script deciding when to send its shots: a job of ours waits there.
job = api.submit(scene, prompt="queued !delay=0.5", frames=2, steps=4)
listing = api.backend_queue()
out["queue"] = {"jobs": [[j["position"], j["state"], j["mine"], j["job_id"] == job.job_id, j["frames"]]
                         for j in listing["jobs"]], "clients": listing["clients"],
                "bad_timeout": outcome(lambda: api.backend_queue(timeout_s=math.inf))}
api.wait(job, timeout=60, on_event=lambda e: None)
# Still accepted: a plain number of seconds.
out["timeout_s_ok"] = outcome(lambda: api.generate(scene, timeout=60, on_event=lambda e: None, timeout_s=30, **shot))
c.result(**out)
