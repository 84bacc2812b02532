"""A take of `api.submit` whose .blend is saved elsewhere (File > Save As into another folder)
before `wait` / `insert`: it lands beside the file as it is saved now, with a relative strip,
and nothing stays in the old folder."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _common as c  # noqa: E402
import bpy  # noqa: E402

a = c.args()
c.install(a["zip"])
c.configure(a["address"], a["key_file"], timeout_s=5.0)
api = c.sub("api")
files = c.sub("files")
strips = c.sub("strips")
out = {}


def save_as(name):
    path = os.path.join(a["workdir"], name, "film.blend")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    bpy.ops.wm.save_as_mainfile(filepath=path)
    return os.path.dirname(path)


def listing(folder):
    root = os.path.join(folder, "animatediff")
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def describe(strip, result, folder):
    paths = strips.strip_frame_paths(strip)
    return {"directory": strip.directory, "result_directory": result.directory,
            "files_exist": bool(paths) and all(os.path.isfile(p) for p in paths),
            "beside": bool(paths) and all(
                os.path.dirname(p) == os.path.join(folder, "animatediff", files.short_id(result.job_id))
                for p in paths)}


scene = bpy.context.scene
scene.render.resolution_x = scene.render.resolution_y = 64
scene.render.resolution_percentage = 100
shot = {"prompt": "a harbour", "frames": 2, "steps": 2, "start_frame": 1}

# 1. Save As between submit and wait.
first = save_as("A")
job = api.submit(scene, channel=2, **shot)
second = save_as("B")
result = api.wait(job, timeout=60, on_event=lambda e: None)
strip = api.insert(scene, result)
out["before_wait"] = {**describe(strip, result, second), "old": listing(first), "new": listing(second)}

# 2. Save As between wait and insert: the written take moves.
job = api.submit(scene, channel=3, **shot)
result = api.wait(job, timeout=60, on_event=lambda e: None)
out["written_in"] = os.path.dirname(result.directory)
third = save_as("C")
strip = api.insert(scene, result)
out["before_insert"] = {**describe(strip, result, third), "old": listing(second), "new": listing(third),
                        "short_id": files.short_id(job.job_id)}
c.result(**out)
