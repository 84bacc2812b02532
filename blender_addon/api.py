"""Python API for scripts and batch jobs (synchronous: works under `blender -b`).

    from bl_ext.user_default.animatediff_blender import api
    strip = api.generate(bpy.context.scene, prompt="a red fox in the snow", frames=16, seed=7)

    job = api.submit(scene, prompt="...", motion_loras={"ZoomIn": 0.8})
    result = api.wait(job, timeout=600)
    strip = api.insert(scene, result)

Settings not given come from the scene's AnimateDiff panel settings.  Keywords:
prompt, negative_prompt, prompt_travel, base_model, motion_module, motion_loras
({camera motion or model id: weight}; a model by its id or its file name), domain_adapter, domain_adapter_scale, frames,
width, height, steps, guidance, seed, preset ("quality", "fast"/"lightning", "lcm"),
context_length, context_stride, preview_every, channel, start_frame.  Connection:
address, key_file, server_public_key_file, client_secret_key_file, timeout_s (default:
the add-on preferences).

`api.check(scene, **settings)` validates the same keywords without a backend (the batch
checks every shot with it before rendering any).

`wait` rides out a backend that goes quiet for a while (it reconnects), cancels the job on
Ctrl+C (then re-raises KeyboardInterrupt), and stores the take beside the .blend as it is
saved then; `wait(job)` again after an error that left the job running collects it.

These calls block the calling thread on the socket (with timeouts): in the UI use the
panel's Generate operator instead, which never blocks Blender.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import files
from . import settings as st

CONNECTION_KEYS = ("address", "key_file", "server_public_key_file", "client_secret_key_file", "timeout_s")
MAX_REQUEST_TIMEOUT_S = 600.0  # `timeout_s`: the add-on preferences' range
CANCEL_TIMEOUT_S = 3.0  # a best-effort cancel on the way out (Ctrl+C, a timeout) waits this long at most


class AnimateDiffError(RuntimeError):
    """A job that did not produce a strip; the message says why in words.  `job` is set when
    the job may still be running on a backend that could not be reached: `wait(error.job)`
    again collects it (`reason` is the message without that advice)."""

    def __init__(self, message: str, job: Job | None = None, hint: str = "") -> None:
        super().__init__(f"{message} ({hint})" if hint else message)
        self.reason = message
        self.job = job


@dataclass
class Job:
    job_id: str
    client: Any
    plan: st.Plan
    out_root: str  # the output root when submitted; `wait` stores under the root of the file as saved then
    scene_name: str
    request: Any = None
    connection: dict[str, Any] = field(default_factory=dict)  # the overrides: a second `wait` reconnects with them


@dataclass
class Result:
    job_id: str
    directory: str
    files: list[str]
    seed: int
    settings: dict[str, Any]
    plan: st.Plan
    elapsed_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _split(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    conn = {k: kwargs.pop(k) for k in CONNECTION_KEYS if k in kwargs}
    return conn, kwargs


def check_connection(connection: dict[str, Any]) -> None:
    """Connection overrides of the right types, or AnimateDiffError: a number as the address
    (`address = 5557` in a shot list) used to hang the client for ever, a number as a key
    file raised a TypeError, an endless `timeout_s` failed every shot at connect.  An address
    is used stripped of surrounding spaces (`_normal_connection`)."""
    for key, value in connection.items():
        if value is None:
            continue
        if key == "address":
            ok = isinstance(value, str) and bool(value.strip())
            want = "a ZeroMQ address such as tcp://gpu-box:5557"
        elif key == "timeout_s":
            # Per request: the socket's poll takes whole milliseconds, so inf or 1e300 would
            # pass here and then fail every shot at connect.
            ok = _positive_number(value) and value <= MAX_REQUEST_TIMEOUT_S
            want = f"a number of seconds above 0 and at most {MAX_REQUEST_TIMEOUT_S:g} (one request to the backend)"
        else:
            ok = isinstance(value, str | os.PathLike)
            want = "a file path"
        if not ok:
            raise AnimateDiffError(f"{key} must be {want}, not {value!r}")


def _positive_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _normal_connection(connection: dict[str, Any]) -> dict[str, Any]:
    """The overrides as used: checked, None dropped, the address without surrounding spaces
    (" tcp://gpu:5557" passes the check and would fail every shot with "Protocol not supported")."""
    check_connection(connection)
    conn = {k: v for k, v in connection.items() if v is not None}
    if isinstance(conn.get("address"), str):
        conn["address"] = conn["address"].strip()
    return conn


def _check_timeout(timeout: Any) -> None:
    if timeout is not None and not _positive_number(timeout):
        raise AnimateDiffError(f"timeout must be a number of seconds above 0 (or None), not {timeout!r}")


def check(scene: Any, **settings: Any) -> st.Plan:
    """The job `submit` would send, checked as far as possible without the backend (keywords,
    types, the protocol's ranges, connection overrides); AnimateDiffError says what is wrong."""
    from .worker import check_request

    conn, rest = _split(dict(settings))
    check_connection(conn)
    try:
        job_plan = st.plan_from_scene(scene, **rest)
        check_request(job_plan.request, job_plan.camera_motions)
    except ValueError as exc:
        raise AnimateDiffError(str(exc)) from exc
    return job_plan


def connect(**connection: Any) -> tuple[Any, Any]:
    """A connected BackendClient and its Welcome (raises AnimateDiffError)."""
    from .jobs import client_config
    from .worker import error_text, make_client

    cfg = client_config()
    cfg.update(_normal_connection(connection))
    client = None
    try:
        client = make_client(cfg)  # (can fail too: a pyzmq of another add-on's in the way)
        welcome = client.connect()
    except Exception as exc:  # noqa: BLE001
        if client is not None:
            client.close()
        raise AnimateDiffError(f"cannot connect to the backend at {cfg['address']}: {error_text(exc)}") from exc
    return client, welcome


def backend_queue(**connection: Any) -> dict[str, Any]:
    """What the backend runs now and what waits, in the order it will run them:
    {"clients": n, "jobs": [{"position": 0, "state": "running", "client": "blender 4.5.15
    anna@ws-12", "mine": False, "job_id": "", "frames": 16, "width": 512, "height": 512,
    "step": 12, "total_steps": 25, ...}, ...]} (other clients' jobs without id or tag), for a
    batch script deciding when to send its shots.  AnimateDiffError when it cannot say."""
    import msgspec

    from .worker import error_text

    client, _welcome = connect(**connection)
    try:
        listing = client.list_jobs()
    except Exception as exc:  # noqa: BLE001
        raise AnimateDiffError(f"the backend could not list its queue: {error_text(exc)}") from exc
    finally:
        client.close()
    return msgspec.to_builtins(listing)


def _request(plan: st.Plan, welcome: Any) -> Any:
    from .worker import resolve_request

    try:
        return resolve_request(plan.request, plan.camera_motions, welcome.models)
    except ValueError as exc:
        raise AnimateDiffError(str(exc)) from exc


def submit(scene: Any, **settings: Any) -> Job:
    """Send one job; returns a handle for `wait`.  Placement is fixed now."""
    job_plan = check(scene, **settings)  # a bad setting is told before any connection
    conn, _rest = _split(dict(settings))
    conn = _normal_connection(conn)
    client, welcome = connect(**conn)
    try:
        request = _request(job_plan, welcome)
    except AnimateDiffError:
        client.close()
        raise
    try:
        # retry: a submit whose answer was lost is sent again with the same submit id, so a
        # network blip neither fails the shot nor leaves a second job running on the GPU.
        accepted = client.submit(request, client_tag=scene.name[:200], retry=True)
    except Exception as exc:  # noqa: BLE001
        client.close()
        code = getattr(exc, "code", "")
        what = "no answer from the backend" if code in ("timeout", "connection") else "the backend refused the job"
        from .worker import size_hint

        raise AnimateDiffError(f"{what}: {exc}{size_hint(getattr(exc, 'fields', ()), settings, api=True)}") from exc
    _warn_preset(job_plan, welcome)
    return Job(accepted.job_id, client, job_plan, st.output_root(scene), scene.name, request, conn)


def _warn_preset(job_plan: st.Plan, welcome: Any) -> None:
    from .preset_check import preset_mismatch
    from .worker import _to_builtins

    try:
        mismatch = preset_mismatch(str(job_plan.request.get("preset")), job_plan.request.get("motion_module") or "",
                                   [_to_builtins(x) for x in welcome.models], dict(welcome.defaults or {}),
                                   job_plan.request.get("domain_adapter") or "")
    except Exception:  # noqa: BLE001 - a warning never fails a job
        return
    if mismatch:
        print(f"AnimateDiff: warning: {mismatch}", flush=True)


def _progress_printer(prefix: str) -> Callable[[Any], None]:
    last = [0.0]

    def on_event(event: Any) -> None:
        if event.msg_type != "progress":
            return
        c = event.content
        now = time.monotonic()
        if now - last[0] < 1.0 and c.step != c.total_steps:
            return
        last[0] = now
        eta = f", {c.remaining_s:.0f} s left" if c.remaining_s >= 0 else ""
        print(f"{prefix}step {c.step}/{c.total_steps} ({c.phase}{eta})", flush=True)

    return on_event


def wait(job: Job, timeout: float | None = None, on_event: Callable[[Any], None] | None = None) -> Result:
    """Block until the job's frames are on disk (written atomically, beside the .blend as it
    is saved now).  A backend that goes quiet (paused, a network outage) is waited out: the
    client reconnects and asks for the job again, for up to the client's `reconnect_give_up_s`
    (120 s).  With `timeout`, a job still running after that long is cancelled.  Ctrl+C cancels
    the job on the backend (best effort) and raises KeyboardInterrupt.  Closes the connection;
    `wait(job)` again (after an error that left the job running) reconnects and collects it."""
    from .protocol.client import ClientError

    _check_timeout(timeout)  # before anything: the job's connection stays open for another wait
    on_event = on_event or _progress_printer(f"[{files.short_id(job.job_id)}] ")
    if job.client is None:  # closed by an earlier wait
        job.client, _welcome = connect(**job.connection)
    client = job.client
    try:
        try:
            # Reconnects and re-watches through a quiet backend; checks each frame's sha256.
            result = client.wait_job(job.job_id, on_event=on_event, timeout_s=timeout)
        except ClientError as exc:
            raise _wait_error(job, client, exc, timeout) from exc
        except KeyboardInterrupt:
            # The job must not go on using a shared GPU for nobody: cancel it, then stop.
            cancelled, why = _cancel_quietly(client, job.job_id)
            where = client.config.address
            print(f"AnimateDiff: interrupted; job {job.job_id} "
                  + ("cancelled on the backend" if cancelled else
                     f"may still be running on the backend at {where} (the cancel failed: {why})"),
                  file=sys.stderr, flush=True)
            raise
        return _store(job, result)
    finally:
        job.client = None
        client.close()


def _wait_error(job: Job, client: Any, exc: Any, timeout: float | None) -> AnimateDiffError:
    """A ClientError of `wait_job` in words; a job that may still run says so (or is cancelled)."""
    where = client.config.address
    again = "api.wait(job) again collects it once the backend is back"
    if exc.code == "timeout" and timeout is not None:
        # wait_job cancels a job past its time; the backend may not have answered that cancel
        # (it was away): once more, briefly, so that its outcome can be told for sure.
        cancelled, _why = _cancel_quietly(client, job.job_id)
        if cancelled:
            return AnimateDiffError(f"job {job.job_id} did not finish within {timeout:g} s (cancelled)")
        # (Not to be collected: it ran past the caller's own time limit.)
        return AnimateDiffError(
            f"job {job.job_id} did not finish within {timeout:g} s and the backend at {where} did not answer "
            "its cancel: the job may still be running there")
    if exc.code == "connection":  # reconnected with back-off until reconnect_give_up_s passed
        return AnimateDiffError(
            f"job {job.job_id}: lost the backend at {where} for over {client.config.reconnect_give_up_s:g} s; "
            "the job may still be running there", job, again)
    if exc.code == "timeout":
        return AnimateDiffError(f"job {job.job_id}: {exc}; the job may still be running there", job, again)
    text = str(exc)
    failed = f"job {job.job_id} failed: "
    if text.startswith(failed):  # the job's own error, with its code
        return AnimateDiffError(f"job {job.job_id} failed ({exc.code}): {text[len(failed):]}")
    return AnimateDiffError(text if text.startswith(f"job {job.job_id}") else f"job {job.job_id}: {text}")


def _cancel_quietly(client: Any, job_id: str) -> tuple[bool, str]:
    """Cancel with a short timeout, never raising (but a second Ctrl+C); (taken, why not)."""
    saved = client.config.timeout_s
    client.config.timeout_s = min(float(saved), CANCEL_TIMEOUT_S)
    try:
        client.cancel(job_id)
    except Exception as exc:  # noqa: BLE001 - best effort: the caller says what it means
        return False, str(exc).strip() or type(exc).__name__
    finally:
        client.config.timeout_s = saved
    return True, ""


def _current_root(job: Job) -> str:
    """The output root of the .blend as it is saved now (a Save As since submit moves it)."""
    import bpy

    try:
        return st.output_root(bpy.data.scenes.get(job.scene_name))
    except Exception:  # noqa: BLE001 - e.g. called where bpy.data is not available
        return job.out_root


def _store(job: Job, result: Any) -> Result:
    import msgspec

    root = _current_root(job)
    fin = result.finished
    settings = msgspec.to_builtins(fin.settings)
    try:  # with its settings beside the frames, as the panel's takes (`files.TAKE_SETTINGS`)
        directory, names = files.write_frames(root, job.job_id, list(result.frames),
                                              {"seed": int(fin.seed), "settings": settings})
    except (OSError, ValueError) as exc:  # a batch goes on with its next shot
        raise AnimateDiffError(f"job {job.job_id}: could not store the frames in {root}: {exc}") from exc
    return Result(job.job_id, str(directory), names, int(fin.seed), settings, job.plan, float(fin.elapsed_s))


def _settle_take(scene: Any, result: Result) -> None:
    """A take written before the .blend was saved elsewhere moves beside it (as the panel's
    jobs do); if it cannot, it is placed from where it is, with a warning."""
    root = st.output_root(scene)
    if files.in_place(result.directory, root, result.job_id):
        return
    src = os.path.realpath(result.directory)
    if files.folder_owner(Path(src)) != result.job_id:
        return  # not a take folder this add-on wrote for the job: placed where it is
    try:
        if _referenced(src):  # a strip uses it already (inserted before): copy, keep the old one
            moved, _names = files.write_frames(root, result.job_id,
                                               [(Path(src) / n).read_bytes() for n in result.files],
                                               files.take_settings(src))
        else:
            moved = files.move_frames(src, result.files, root, result.job_id)
    except (OSError, ValueError) as exc:
        print(f"AnimateDiff: warning: job {result.job_id}: could not move its frames to {root} ({exc}); "
              f"placed from {result.directory}", flush=True)
        return
    result.directory = str(moved)


def _referenced(folder: str) -> bool:
    import bpy

    from .sequencer_compat import all_strips

    for scene in bpy.data.scenes:
        for strip in all_strips(scene):
            directory = getattr(strip, "directory", None)
            if directory and os.path.realpath(bpy.path.abspath(directory)) == folder:
                return True
    return False


def insert(scene: Any, result: Result) -> Any:
    """Put a finished job's frames on the sequencer at the place fixed at submit time.  Frames
    written beside a .blend that was since saved elsewhere move beside it first."""
    from .strips import insert_strip

    _settle_take(scene, result)

    info = {"seed": result.seed, "request": result.settings, "camera_motions": result.plan.camera_motions,
            "frames": len(result.files), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        return insert_strip(scene, result.job_id, result.directory, result.files, result.plan.channel,
                            result.plan.start_frame, info)
    except (OSError, RuntimeError, ValueError) as exc:
        raise AnimateDiffError(f"job {result.job_id}: could not add the strip ({result.directory}): {exc}") from exc


def generate(scene: Any, timeout: float | None = None, on_event: Callable[[Any], None] | None = None,
             **settings: Any) -> Any:
    """Submit, wait, insert: returns the new strip.  Raises AnimateDiffError on failure."""
    _check_timeout(timeout)  # not after the job is on the GPU
    job = submit(scene, **settings)
    print(f"AnimateDiff: job {job.job_id} submitted ({job.plan.request.get('frames')} frames, "
          f"channel {job.plan.channel}, frame {job.plan.start_frame})", flush=True)
    result = wait(job, timeout=timeout, on_event=on_event)
    return insert(scene, result)
