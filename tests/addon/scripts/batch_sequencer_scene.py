"""A .blend whose window scene is not the scene its Sequencer edits (Blender 5's workspace
`sequencer_scene`), for the batch (`make`); `look` lists each scene's AnimateDiff strips.
No add-on needed: the strips' settings are read from their custom property."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _common as c  # noqa: E402
import bpy  # noqa: E402

a = c.args()
if a["mode"] == "make":
    shot = bpy.context.scene  # the window's: a 3D shot, 12 frames at 128 x 96
    shot.name = "Shot3D"
    shot.frame_start, shot.frame_end, shot.frame_current = 1, 12, 1
    shot.render.resolution_x, shot.render.resolution_y, shot.render.resolution_percentage = 128, 96, 100
    edit = bpy.data.scenes.new("Edit")  # the Sequencer's: 6 frames at 64 x 48, at frame 30
    edit.frame_start, edit.frame_end, edit.frame_current = 1, 6, 30
    edit.render.resolution_x, edit.render.resolution_y, edit.render.resolution_percentage = 64, 48, 100
    # Each scene's AnimateDiff Frames, stored where the add-on's registered settings will
    # read them (Blender 5 keeps them apart from the custom properties): the batch must take
    # the Edit scene's.
    for scn, frames in ((shot, 12), (edit, 6)):
        store = scn.bl_system_properties_get(do_create=True) if hasattr(scn, "bl_system_properties_get") else scn
        store["animatediff"] = {"frames": frames}
    edit.sequence_editor_create()
    bpy.context.workspace.sequencer_scene = edit
    bpy.ops.wm.save_as_mainfile(filepath=a["blend"])
else:
    bpy.ops.wm.open_mainfile(filepath=a["blend"])
strips: dict = {}
for scn in bpy.data.scenes:
    se = scn.sequence_editor
    found = []
    for s in (list(se.strips_all if hasattr(se, "strips_all") else se.sequences_all) if se else []):
        if s.get("animatediff"):
            start = s.left_handle if hasattr(s, "left_handle") else s.frame_final_start
            duration = s.duration if hasattr(s, "duration") else s.frame_final_duration
            request = json.loads(s["animatediff"]).get("request", {})
            found.append({"channel": s.channel, "start": int(start), "duration": int(duration),
                          "size": [request.get("width"), request.get("height")], "prompt": request.get("prompt")})
    strips[scn.name] = found
c.result(window=bpy.context.scene.name, sequencer=(getattr(bpy.context, "sequencer_scene", None) or bpy.context.scene).name,
         strips=strips)
