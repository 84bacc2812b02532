"""Takes that finished while another .blend was open are on disk beside their file; the
backend then forgot the jobs (here: a new data folder).  Phase "make" submits two jobs in
film.blend, opens other.blend and waits until the worker wrote both takes beside film.blend.
Phase "reopen" (a later Blender, against the forgetful backend) reopens film.blend and
reports what became of the rows."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _common as c  # noqa: E402
import bpy  # noqa: E402

a = c.args()
c.install(a["zip"])
c.configure(a["address"], a["key_file"], timeout_s=10.0)
jobs = c.sub("jobs")
state = c.sub("state").STATE
sc = c.sub("sequencer_compat")
film = os.path.join(a["workdir"], "film", "film.blend")
other = os.path.join(a["workdir"], "other", "other.blend")
out = {}

if a["phase"] == "make":
    os.makedirs(os.path.dirname(film))
    os.makedirs(os.path.dirname(other))
    bpy.ops.wm.save_as_mainfile(filepath=other)
    bpy.ops.wm.save_as_mainfile(filepath=film)
    scene = bpy.context.scene
    scene.frame_start, scene.frame_end = 1, 4
    scene.animatediff.frames = 4  # Frames, not Scene length (off by default)
    scene.render.resolution_x = scene.render.resolution_y = 64
    scene.render.resolution_percentage = 100
    s = scene.animatediff
    s.steps = 40  # the test backend takes 0.05 s a step: still running when the file changes
    s.use_current_frame = False
    s.start_frame = 1
    c.sub("properties").ensure_camera_loras(s)
    zoom = next(x for x in s.camera_loras if x.motion == "ZoomIn")
    zoom.enabled, zoom.weight = True, 0.7  # a camera MotionLoRA: Regenerate must keep it
    local_ids = []
    for channel, seed in ((2, 11), (3, 12)):
        s.prompt, s.channel, s.seed = f"take on {channel}", channel, seed
        assert bpy.ops.animatediff.generate() == {"FINISHED"}
        local_ids.append(s.jobs[len(s.jobs) - 1].local_id)
    c.drain_until(lambda: all(jobs.find_job(x, "local_id")[1].job_id for x in local_ids), 30)
    job_ids = [jobs.find_job(x, "local_id")[1].job_id for x in local_ids]
    bpy.ops.wm.save_mainfile()  # saved with both jobs pending

    bpy.ops.wm.open_mainfile(filepath=other)
    # The worker collects the takes meanwhile, beside film.blend; other.blend gets nothing.
    c.drain_until(lambda: not set(job_ids) & set(state.worker.jobs) and state.outbox.empty(), 60)
    c.drain_until(lambda: True)
    out["job_ids"] = job_ids
    out["zoom_in_ids"] = [x["id"] for x in state.models if x.get("camera_motion") == "ZoomIn"]
    out["takes"] = {j: sorted(n for n in os.listdir(os.path.join(os.path.dirname(film), "animatediff", j[:8]))
                              if not n.startswith("."))  # (the folder's job marker)
                    for j in job_ids}
    out["other_strips"] = [x.name for sc_ in bpy.data.scenes for x in sc.all_strips(sc_)]
else:
    bpy.ops.wm.open_mainfile(filepath=film)
    scene = bpy.context.scene
    jobs.resume_pending()
    ended = ("finished", "failed", "cancelled", "interrupted")
    c.drain_until(lambda: all(jobs.find_job(j)[1].state in ended for j in a["job_ids"]), 60)
    rows = {}
    for job_id in a["job_ids"]:
        job = jobs.find_job(job_id)[1]
        row = {"state": job.state, "message": job.message, "channel": job.channel}
        strips = sc.strips_named(scene, [job.strip_name]) if job.strip_name else []
        if strips:
            strip = strips[0]
            row["strip"] = {"directory": strip.directory, "channel": strip.channel,
                            "start": sc.strip_start(strip), "frames": len(strip.elements),
                            "files_exist": all(os.path.isfile(os.path.join(bpy.path.abspath(strip.directory), e.filename))
                                               for e in strip.elements)}
        rows[job_id] = row
    out["rows"] = rows
    out["strips"] = sorted(x.name for x in sc.all_strips(scene))
    # Regenerate of the take placed from disk: the same MotionLoRAs as the job that made it.
    strips = c.sub("strips")
    placed = sc.strips_named(scene, [jobs.find_job(a["job_ids"][0])[1].strip_name])
    if placed:
        for x in sc.all_strips(scene):
            x.select = False
        placed[0].select = True
        scene.sequence_editor.active_strip = placed[0]
        stored = strips.stored_settings(placed[0]) or {}
        out["placed_loras"] = stored.get("request", {}).get("motion_loras")
        out["placed_moves"] = stored.get("camera_motions")
        assert bpy.ops.animatediff.regenerate() == {"FINISHED"}
        job = scene.animatediff.jobs[len(scene.animatediff.jobs) - 1]
        out["regenerate_loras"] = json.loads(job.request_json)["request"]["motion_loras"]
        local = job.local_id
        c.drain_until(lambda: jobs.find_job(local, "local_id")[1].state in ended, 60)
        job = jobs.find_job(local, "local_id")[1]
        took = sc.strips_named(scene, [job.strip_name]) if job.strip_name else []
        out["regenerated"] = {"state": job.state, "message": job.message,
                              "loras": (strips.stored_settings(took[0]) or {}).get("request", {}).get("motion_loras")
                              if took else None}

if state.worker is not None:
    state.worker.stop()
c.result(**out)
