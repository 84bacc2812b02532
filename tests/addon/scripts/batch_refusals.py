"""batch.py's refusals, many shot lists in one Blender: the add-on is installed once, then
each case runs batch.run() as `blender -b -P batch.py -- <shots> <args>` would, and its exit
code and stderr are recorded (a traceback too: as the exception, not a crash of the script)."""

import contextlib
import importlib.util
import io
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _common as c  # noqa: E402
import bpy  # noqa: E402, F401 - batch.run() tells `blender -P` by bpy being imported

a = c.args()
c.install(a["zip"])
spec = importlib.util.spec_from_file_location("adb_batch_script", a["batch"])
batch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(batch)
out = {}
for name, text in a["cases"].items():
    path = os.path.join(a["workdir"], f"{name}.toml")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    sys.argv = ["blender", "-P", a["batch"], "--", path, *a["args"]]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            batch.run()
            code = None
        except SystemExit as exc:
            code = exc.code
        except Exception as exc:  # noqa: BLE001 - what the test must see, not a dead script
            code = f"traceback: {exc!r}"[:300]
    out[name] = {"code": code, "stderr": err.getvalue()}
c.result(cases=out)
