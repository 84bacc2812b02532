"""Main-thread bookkeeping of jobs: submit through the worker, apply what it reports.

Everything here is quick: it only touches Blender data and queues; the network and
disk work happens on the worker thread.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

from . import files, owed
from . import messages as m
from . import settings as st
from .properties import PENDING_STATES
from .state import STATE
from .worker import Worker, watch_entry  # light: the protocol and zmq are imported by the thread itself


def preferences() -> Any:
    import bpy

    addon = bpy.context.preferences.addons.get(__package__)
    return addon.preferences if addon else None


def client_config() -> dict[str, Any]:
    """ClientConfig fields from the preferences (defaults when not installed)."""
    import bpy

    prefs = preferences()
    cfg: dict[str, Any] = {
        "address": "tcp://127.0.0.1:5557", "timeout_s": 10.0,
        "client_name": f"blender {bpy.app.version_string}",  # + user@host (worker.client_config)
    }
    if prefs is not None:
        cfg["address"] = prefs.address.strip() or cfg["address"]
        cfg["timeout_s"] = float(prefs.timeout_s)
        for key in ("key_file", "server_public_key_file", "client_secret_key_file"):
            value = getattr(prefs, key).strip()
            cfg[key] = bpy.path.abspath(value) if value else None
    return cfg


def worker() -> Any:
    """The running worker; started on first use (never at registration).  A new worker is
    told at once of every job still owed a result: one the file's resume could not hand
    over (online access off) is collected by the first worker the artist allows."""
    w = STATE.worker
    cfg = client_config()
    if w is None or not w.is_alive():
        w = STATE.worker = Worker(STATE.outbox, cfg)
        w.start()
        pending = pending_jobs(opened=False)  # a job being submitted now is not lost
        if pending:
            w.send(m.WatchJobs(pending))
        # Submits the previous worker still owed an answer (the add-on was disabled and enabled
        # again meanwhile): sent again with the same submit id, the backend answers with the job
        # it made, if it made one.  Without this their rows stayed "submitting" -- or "running",
        # accepted by a worker that was stopping -- for ever.
        for shadow in list(STATE.job_shadow.values()):
            sub = shadow.get("submit")
            if sub is not None and not shadow.get("job_id"):
                w.send(dataclasses.replace(sub, resend=True))
        # Cancels a Blender that quit still owed this backend (its exit handler kept them).
        if STATE.owed_folder:
            claimed = owed.claim(STATE.owed_folder, str(cfg.get("address", "")))
            if claimed is not None:
                w.send(claimed)
    else:
        w.send(m.Configure(cfg))
    return w


def submit(scene: Any, plan: st.Plan, patient_s: float = 0.0) -> Any:
    """Add a job row and hand the request to the worker.  Returns the row.  `patient_s`: how
    long a backend that cannot be reached is waited for (one the add-on has just started)."""
    import bpy

    s = scene.animatediff
    # Everything that can fail is worked out before the row exists: a row added and then
    # never sent would stay "submitting" for ever.  (A value the protocol refuses, such as a
    # damaged strip's frames for Regenerate, is the worker's to refuse, in words.)
    frames = plan.request.get("frames", 16)
    frames = frames if isinstance(frames, int) and not isinstance(frames, bool) and 0 < frames < 2**31 else 0
    root = st.output_root(scene)
    request_json = st.request_json(plan)
    w = worker()  # a new worker resends the submits owed before this one
    job = s.jobs.add()
    job.local_id = uuid.uuid4().hex
    job.state = "submitting"
    job.prompt = str(plan.request.get("prompt", ""))[:200]
    job.channel = plan.channel
    job.frame_start = plan.start_frame
    job.frames = frames
    # Stored relative to the saved .blend ("//animatediff"): a project moved before the job is
    # collected gets the take beside its new location.
    job.out_root = bpy.path.relpath(root) if bpy.data.filepath else root
    job.request_json = request_json
    s.active_job = len(s.jobs) - 1
    sub = m.SubmitJob(job.local_id, plan.request, plan.camera_motions, root, client_tag=f"{scene.name}"[:200],
                      patient_until=time.monotonic() + patient_s if patient_s > 0 else 0.0,
                      panel_hints=plan.panel_hints)
    STATE.job_shadow[job.local_id] = {"scene": scene.name, "blend": bpy.data.filepath, "submit": sub,
                                      **{k: getattr(job, k) for k in SHADOW_FIELDS}}
    w.send(sub)
    return job


SHADOW_FIELDS = ("local_id", "job_id", "state", "prompt", "channel", "frame_start", "frames", "out_root",
                 "request_json")
FINAL_FIELDS = ("job_id", "state", "message", "step", "total_steps", "strip_name")


def find_job(key: str, by: str = "job_id") -> tuple[Any, Any] | tuple[None, None]:
    import bpy

    if not key:
        return None, None
    for scene in bpy.data.scenes:
        for job in scene.animatediff.jobs:
            if getattr(job, by) == key:
                return scene, job
    return None, None


def find_or_restore_job(key: str, by: str = "job_id") -> tuple[Any, Any] | tuple[None, None]:
    """The job row; if an undo removed it, re-created from the shadow copy."""
    import bpy

    scene, job = find_job(key, by)
    if job is not None:
        return scene, job
    shadow = next((v for v in STATE.job_shadow.values() if v.get(by) == key), None)
    if shadow is None:
        return None, None
    scene = bpy.data.scenes.get(shadow["scene"])
    if scene is None:
        return None, None
    # An undo can also bring the row back as it was before the backend answered (no job id):
    # that row is the job's, not a second one beside it.
    job = next((x for x in scene.animatediff.jobs if x.local_id == shadow["local_id"]), None)
    if job is None:
        job = scene.animatediff.jobs.add()
    for k in SHADOW_FIELDS:
        setattr(job, k, shadow[k])
    return scene, job


def forget_other_files() -> None:
    """After a file was loaded: the shadow copies of jobs submitted from another file (or an
    unsaved one) must not re-create their rows here, or a take of one project lands in
    whichever file is open, in a scene of the same name.  A file that saved the job collects
    it when reopened; a reload of the same file keeps them."""
    import bpy

    current = bpy.data.filepath
    for local_id, shadow in list(STATE.job_shadow.items()):
        if not current or shadow.get("blend") != current:
            del STATE.job_shadow[local_id]


def pending_jobs(opened: bool = True) -> dict[str, Any]:
    """job id -> output folder of every job still owed a result, in every scene.  `opened`:
    the file was just opened, so a job still submitting there never reached the backend."""
    import bpy

    out: dict[str, str] = {}
    for scene in bpy.data.scenes:
        for job in scene.animatediff.jobs:
            if job.job_id and job.state in PENDING_STATES:
                # With what the row knows: a take found on disk once the backend has forgotten
                # the job is checked against its frame count and placed with its settings.
                out[job.job_id] = watch_entry(take_root(scene, job), job.frames, job.request_json)
            elif opened and not job.job_id and job.state == "submitting" and job.local_id not in STATE.job_shadow:
                # Blender quit before the backend answered: the job id is unknown.  (With a
                # shadow, this session still owes the submit: the add-on was disabled and
                # enabled again, or the file reloaded; a worker sends it again.)
                job.state = "failed"
                job.message = "submission was interrupted (Blender closed before the backend answered)"
                STATE.job_shadow.pop(job.local_id, None)  # no later worker sends it again
    return out


def take_root(scene: Any, job: Any) -> str:
    """Absolute folder the job's take belongs under, decided when it lands, not at submit: the
    .blend may have been saved elsewhere since (Save As, a moved project).  A job submitted
    before the file was ever saved has an absolute root in the add-on's user folder; once the
    file is saved, its take goes beside it as well, relative like every other take."""
    import bpy

    if job.out_root.startswith("//") or not bpy.data.filepath:
        return bpy.path.abspath(job.out_root)
    return st.output_root(scene)


def resume_pending() -> int:
    """Hand the opened file's unfinished jobs to the worker; none while Blender's online
    access forbids contacting the (remote) backend: the panel says why."""
    jobs = pending_jobs()
    if not jobs:
        return 0
    refusal = st.network_refusal(client_config()["address"])
    if refusal is not None:
        STATE.connection_message = refusal
        return 0
    w = STATE.worker
    if w is not None and w.is_alive():
        w.send(m.WatchJobs(jobs))
    else:
        worker()  # a new worker watches every pending job
    return len(jobs)


def cancel(job: Any) -> None:
    if job.job_id and job.state in PENDING_STATES:
        worker().send(m.CancelJob(job.job_id))
        job.message = "cancelling..."
    elif job.state == "submitting":
        job.message = "will cancel once the backend accepted it"
        job["cancel_when_accepted"] = True
        # A submit still waiting in the worker (the backend is away) ends now, as the docs
        # promise for a cancel the backend cannot hear; one answered meanwhile is cancelled
        # when its acceptance arrives (the flag above).
        worker().send(m.CancelSubmit(job.local_id))


def apply(msg: Any) -> None:
    """Apply one worker message to Blender data.  Main thread only."""
    if isinstance(msg, m.ConnectionState):
        STATE.connected = msg.connected
        STATE.connection_message = msg.message
        if msg.models is not None:
            STATE.models = msg.models
            STATE.defaults = msg.defaults
            STATE.server_version = msg.server_version
            STATE.device = msg.device
            import bpy

            from .properties import fill_model_lists

            wm = getattr(bpy.context, "window_manager", None)
            if wm is not None and hasattr(wm, "animatediff_models"):
                fill_model_lists(wm)
        return
    if isinstance(msg, m.QueueView):
        STATE.queue_view = msg if msg.lines else None
        return
    if isinstance(msg, m.TestResult):
        STATE.test_running = False
        STATE.test_message = ("OK: " if msg.ok else "Failed: ") + msg.message
        return
    if isinstance(msg, m.CancelsOwed):
        worker().send(msg)  # from a worker that stopped: the current one tells the backend
        # Taken over: its sender owes nothing more at a quit (owed_now would still list them).
        STATE.stopped_workers[:] = [w for w in STATE.stopped_workers if w is not msg.sender]
        return
    if isinstance(msg, m.SubmitNote):
        _scene, job = find_job(msg.local_id, by="local_id")
        if job is not None and job.state == "submitting":
            job.message = msg.message
        return
    if isinstance(msg, (m.JobAccepted, m.JobRejected)):
        _scene, job = find_or_restore_job(msg.local_id, by="local_id")
        if job is None:
            return
        if isinstance(msg, m.JobRejected):
            job.state, job.message = msg.state, msg.message
            STATE.job_shadow.pop(msg.local_id, None)
            _ended(job)
            return
        if job.state == "cancelled":
            # Cancelled before this answer came (while a stopping worker still sent it): the
            # row stays cancelled, and the job is not left holding the GPU.  A row that ended
            # otherwise (failed: "Blender closed before the backend answered") takes its job.
            worker().send(m.CancelJob(msg.job_id))
            return
        job.job_id, job.queue_position = msg.job_id, msg.queue_position
        job.state = "queued" if msg.queue_position > 0 else "running"
        if msg.local_id in STATE.job_shadow:
            STATE.job_shadow[msg.local_id].update(job_id=msg.job_id, state=job.state)
        job.message = ""  # a queued job's position is on its state line (panels.draw_jobs)
        if job.get("cancel_when_accepted"):
            worker().send(m.CancelJob(msg.job_id))
        return
    scene, job = find_or_restore_job(getattr(msg, "job_id", ""))
    if job is None:
        if isinstance(msg, m.JobDone | m.JobFailed) and any(
                v.get("job_id") == msg.job_id for v in STATE.job_shadow.values()):
            # Its scene was deleted while the job ran; an undo may bring the scene back, with
            # the row "running": the row gets this then (restore_ended) instead of never.
            STATE.job_orphans[msg.job_id] = msg
        return
    if job.state == "cancelled":
        # The artist cancelled it: nothing a worker still says of the job (one that started
        # watching it before the cancel reached it) brings the row back or lands its take.
        return
    if job.state == "finished":
        # Its take is placed (or placed and undone): a worker that watched the job again (a
        # reconnect, the file reopened) lands no second take, nor makes the row "running".
        return
    if isinstance(msg, m.JobDone) and not msg.settled and _move_take(scene, job, msg):
        return  # the worker moves the frames, then reports the job done again
    if isinstance(msg, (m.JobFailed, m.JobDone)):
        STATE.job_shadow.pop(job.local_id, None)
    if isinstance(msg, m.JobProgress):
        job.state = msg.state
        job.step, job.total_steps, job.remaining_s = msg.step, msg.total_steps, msg.remaining_s
        job.queue_position = msg.queue_position
        # Not the queue position: the panel's state line shows it ("queued (position 2)").
        job.message = msg.phase if msg.phase not in ("", "denoise") else ""
        if msg.preview_path:
            job.preview_path = msg.preview_path
    elif isinstance(msg, m.JobNote):
        job.message = msg.message
        if job.state in ("queued", "running"):
            job.state = "lost"
    elif isinstance(msg, m.JobFailed):
        job.state, job.message = msg.state, msg.message
        _ended(job)
    elif isinstance(msg, m.JobDone):
        _insert(scene, job, msg)


def _move_take(scene: Any, job: Any, msg: m.JobDone) -> bool:
    """Frames written under a root the job no longer belongs to (its .blend was saved elsewhere,
    or saved for the first time, while the job ran): ask the worker to move them.  The worker
    writes a take in one step when it ends, so the whole take is always there to move; that is
    simpler and surer than redirecting the worker on save, which would still miss a result
    already written and waiting on the queue."""
    root = take_root(scene, job)
    if files.in_place(msg.directory, root, msg.job_id):
        return False
    job.message = "moving the take beside the saved file"
    worker().send(m.MoveTake(msg, root))
    return True


def _ended(job: Any) -> None:
    STATE.job_final[job.local_id] = {k: getattr(job, k) for k in FINAL_FIELDS}


def restore_ended() -> None:
    """After an undo or redo: a row brought back as pending although its job has ended (the
    undo went back to before the take landed) gets its end state again; it would otherwise
    stay "running" for ever, with no way to cancel or clear it."""
    import bpy

    from .sequencer_compat import strips_named

    # The end of a job whose scene was gone: applied by the timer (not inside the undo
    # handler: placing a take pushes an undo step), where the scene is back by now.
    orphans, STATE.job_orphans = STATE.job_orphans, {}
    for msg in orphans.values():
        STATE.outbox.put(msg)
    for scene in bpy.data.scenes:
        for job in scene.animatediff.jobs:
            # Brought back as it was before the backend answered: the job id is known here.
            shadow = STATE.job_shadow.get(job.local_id)
            if job.state == "submitting" and not job.job_id and shadow and shadow.get("job_id"):
                job.job_id, job.state = shadow["job_id"], shadow.get("state", "queued")
    if not STATE.job_final:
        return
    for scene in bpy.data.scenes:
        for job in scene.animatediff.jobs:
            final = STATE.job_final.get(job.local_id)
            if final is None or job.state not in PENDING_STATES:
                continue
            for k, v in final.items():
                setattr(job, k, v)
            if job.state == "finished" and not strips_named(scene, [job.strip_name]):
                job.message = "finished; its strip was undone"


def _insert(scene: Any, job: Any, msg: m.JobDone) -> None:
    import json

    from .strips import insert_strip

    try:
        placed = json.loads(job.request_json) if job.request_json else {}
    except ValueError:
        placed = {}
    info = {"seed": msg.seed, "request": msg.settings or placed.get("request", {}),
            "camera_motions": placed.get("camera_motions", {}), "frames": len(msg.files),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        strip = insert_strip(scene, msg.job_id, msg.directory, msg.files, job.channel, job.frame_start, info)
    except (OSError, RuntimeError, ValueError) as exc:
        # The frames are kept: say where, so that they can be added by hand.
        job.state, job.message = "failed", f"could not add the strip ({msg.directory}): {exc}"
        _ended(job)
        return
    job.state, job.message, job.strip_name = "finished", f"on channel {strip.channel}", strip.name
    if msg.note:
        job.message += f"; left in {msg.directory}: {msg.note}"
    job.step = job.total_steps
    _ended(job)
    _undo_push(f"AnimateDiff take {strip.name}")


def _undo_push(message: str) -> None:
    """A take added from the timer gets an undo step of its own.  Blender records undo
    steps after operators only: without one, the artist's next Ctrl+Z (of an unrelated
    edit) would go back to before the take -- its strip gone, its job row running again."""
    import bpy

    try:
        bpy.ops.ed.undo_push(message=message)
    except RuntimeError as exc:  # no undo stack (the poll failed): nothing to undo into
        print(f"AnimateDiff: no undo step for the new take: {exc}")
