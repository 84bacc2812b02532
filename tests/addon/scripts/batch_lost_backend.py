"""batch.py through a backend that goes quiet during its first shot for longer than the
client keeps trying (SIGSTOP, as a network outage would): that shot's job keeps running,
so the batch renders the other shots and then asks for it again, instead of dropping it."""

import contextlib
import importlib.util
import io
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
api = c.sub("api")
spec = importlib.util.spec_from_file_location("adb_batch_script", a["batch"])
batch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(batch)
pid = int(a["backend_pid"])
bpy.ops.wm.save_as_mainfile(filepath=os.path.join(a["workdir"], "lost.blend"))
scene = bpy.context.scene
scene.render.resolution_x = scene.render.resolution_y = 64
scene.render.resolution_percentage = 100
bpy.ops.wm.save_mainfile()

submit, paused = api.submit, []


def submit_then_go_quiet(*args, **kw):
    """The first shot's job is on the backend; then the backend stops answering for 14 s, and
    its wait gives up (after 2 s of reconnecting: the client's 120 s, shortened for the
    test).  The next shot's submit waits up to 30 s for an answer: it lands."""
    job = submit(*args, **kw)
    if not paused:
        job.client.config.reconnect_give_up_s = 2.0

        def pause():
            time.sleep(0.3)
            os.kill(pid, signal.SIGSTOP)
            time.sleep(14.0)
            os.kill(pid, signal.SIGCONT)

        paused.append(threading.Thread(target=pause, daemon=True))
        paused[0].start()
    return job


api.submit = submit_then_go_quiet
shots = os.path.join(a["workdir"], "shots.toml")
with open(shots, "w", encoding="utf-8") as fh:
    fh.write('[defaults]\nframes = 4\nsteps = 30\n\n'
             '[[shot]]\nname = "lost"\nprompt = "a harbour"\nchannel = 2\ntimeout_s = 2\n\n'
             '[[shot]]\nname = "next"\nprompt = "a lighthouse"\nchannel = 4\ntimeout_s = 30\n')
sys.argv = ["blender", "-P", a["batch"], "--", shots, "--address", a["address"], "--key-file", a["key_file"]]
stdout = io.StringIO()
code = None
try:
    with contextlib.redirect_stdout(stdout):
        batch.run()
except SystemExit as exc:
    code = exc.code
finally:
    if paused:
        paused[0].join()
strips = sorted([s.channel, len(s.elements)] for s in c.sub("sequencer_compat").all_strips(scene))
c.result(code=code, stdout=stdout.getvalue(), strips=strips)
