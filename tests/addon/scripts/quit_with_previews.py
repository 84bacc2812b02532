"""Blender quits with the add-on enabled, its worker running and a step preview on disk:
Blender does not unregister add-ons when it quits, so only an exit handler can remove the
preview folder.  Prints the folder; the test checks it is gone once the process ended."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _common as c  # noqa: E402

a = c.args()
c.install(a["zip"])
c.configure(a["address"], timeout_s=0.5)  # nobody listens there
worker = c.sub("jobs").worker()
assert worker.is_alive()
folder = worker.preview_dir
os.makedirs(folder, exist_ok=True)
with open(os.path.join(folder, "0123abcd_0003.png"), "wb") as fh:
    fh.write(b"\x89PNG\r\n\x1a\n")
c.result(folder=folder, exists=os.path.isdir(folder))
# No disable, no unregister: the interpreter simply ends, as at a quit.
