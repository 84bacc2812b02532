"""Open a .blend (with the add-on installed) and describe its sequencer strips."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _common as c  # noqa: E402
import bpy  # noqa: E402

a = c.args()
c.install(a["zip"])
bpy.ops.wm.open_mainfile(filepath=a["blend"])
sc = c.sub("sequencer_compat")
strips = c.sub("strips")
out = []
for s in sorted(sc.all_strips(bpy.context.scene), key=lambda s: s.channel):
    paths = strips.strip_frame_paths(s)
    out.append({"name": s.name, "channel": s.channel, "start": sc.strip_start(s), "duration": sc.strip_duration(s),
                "files_exist": all(os.path.isfile(p) for p in paths), "directory": s.directory,
                "settings": strips.stored_settings(s)})
bpy.ops.preferences.addon_disable(module=c.MODULE)
c.result(strips=out)
