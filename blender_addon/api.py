"""Python API for scripts and batch jobs (synchronous: works under `blender -b`).

    from bl_ext.user_default.animatediff_blender import api
    strip = api.generate(bpy.context.scene, prompt="a red fox in the snow", frames=16, seed=7)

    job = api.submit(scene, prompt="...", motion_loras={"ZoomIn": 0.8})
    result = api.wait(job, timeout=600)
    strip = api.insert(scene, result)

Settings not given come from the scene's AnimateDiff panel settings.  Keywords:
prompt, negative_prompt, prompt_travel, base_model, motion_module, motion_loras
({camera motion or model id: weight}), domain_adapter, domain_adapter_scale, frames,
width, height, steps, guidance, seed, preset ("quality", "fast"/"lightning", "lcm"),
context_length, context_stride, preview_every, channel, start_frame.  Connection:
address, key_file, server_public_key_file, client_secret_key_file, timeout_s (default:
the add-on preferences).

`api.check(scene, **settings)` validates the same keywords without a backend (the batch
checks every shot with it before rendering any).

These calls block the calling thread on the socket (with timeouts): in the UI use the
panel's Generate operator instead, which never blocks Blender.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import files
from . import settings as st

CONNECTION_KEYS = ("address", "key_file", "server_public_key_file", "client_secret_key_file", "timeout_s")


class AnimateDiffError(RuntimeError):
    """A job that did not produce a strip; the message says why in words."""


@dataclass
class Job:
    job_id: str
    client: Any
    plan: st.Plan
    out_root: str
    scene_name: str
    request: Any = None


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
    file raised a TypeError."""
    import os

    for key, value in connection.items():
        if value is None:
            continue
        if key == "address":
            ok = isinstance(value, str) and bool(value.strip())
            want = "a ZeroMQ address such as tcp://gpu-box:5557"
        elif key == "timeout_s":
            ok = _positive_number(value)
            want = "a number of seconds above 0"
        else:
            ok = isinstance(value, str | os.PathLike)
            want = "a file path"
        if not ok:
            raise AnimateDiffError(f"{key} must be {want}, not {value!r}")


def _positive_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


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
    cfg.update({k: v for k, v in connection.items() if v is not None})
    client = make_client(cfg)
    try:
        welcome = client.connect()
    except Exception as exc:  # noqa: BLE001
        client.close()
        raise AnimateDiffError(f"cannot connect to the backend at {cfg['address']}: {error_text(exc)}") from exc
    return client, welcome


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
        raise AnimateDiffError(f"{what}: {exc}") from exc
    _warn_preset(job_plan, welcome)
    return Job(accepted.job_id, client, job_plan, st.output_root(scene), scene.name, request)


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
    """Block until the job's frames are on disk (written atomically).  Closes the connection."""
    from .protocol.client import ClientError

    _check_timeout(timeout)  # before the try: the job's connection stays open for another wait
    on_event = on_event or _progress_printer(f"[{files.short_id(job.job_id)}] ")
    deadline = None if timeout is None else time.monotonic() + timeout
    client = job.client
    frames: dict[int, bytes] = {}
    last_heard = time.monotonic()
    try:
        while True:
            if deadline is not None and time.monotonic() > deadline:
                try:
                    client.cancel(job.job_id)
                except Exception:  # noqa: BLE001
                    pass
                raise AnimateDiffError(f"job {job.job_id} did not finish within {timeout:g} s (cancelled)")
            try:
                event = client.poll(0.2)
                if event is None:
                    if time.monotonic() - last_heard > 5.0:
                        last_heard = time.monotonic()
                        (status,) = client.watch([job.job_id])
                        if status.state == "finished":
                            return _store(job, client.fetch(job.job_id))
                        if status.state in ("failed", "interrupted", "cancelled"):
                            raise AnimateDiffError(f"job {job.job_id} {status.state}: {status.error or ''}".strip())
                    continue
            except ClientError as exc:
                raise AnimateDiffError(f"job {job.job_id}: {exc}") from exc
            if event.job_id != job.job_id:
                continue
            last_heard = time.monotonic()
            on_event(event)
            c = event.content
            if event.msg_type == "frames":
                for i, data in enumerate(event.buffers):
                    frames[c.start + i] = bytes(data)
            elif event.msg_type == "finished":
                if all(i in frames for i in range(c.frames)):
                    from .protocol.client import JobResult

                    return _store(job, JobResult(job.job_id, c, [frames[i] for i in range(c.frames)]))
                try:
                    fetched = client.fetch(job.job_id)
                except ClientError as exc:
                    raise AnimateDiffError(f"job {job.job_id}: could not fetch its frames: {exc}") from exc
                return _store(job, fetched)
            elif event.msg_type == "failed":
                raise AnimateDiffError(f"job {job.job_id} failed ({c.code}): {c.message}")
            elif event.msg_type == "cancelled":
                raise AnimateDiffError(f"job {job.job_id} was cancelled")
    finally:
        client.close()


def _store(job: Job, result: Any) -> Result:
    import msgspec

    try:
        directory, names = files.write_frames(job.out_root, job.job_id, list(result.frames))
    except (OSError, ValueError) as exc:  # a batch goes on with its next shot
        raise AnimateDiffError(f"job {job.job_id}: could not store the frames in {job.out_root}: {exc}") from exc
    fin = result.finished
    return Result(job.job_id, str(directory), names, int(fin.seed), msgspec.to_builtins(fin.settings), job.plan,
                  float(fin.elapsed_s))


def insert(scene: Any, result: Result) -> Any:
    """Put a finished job's frames on the sequencer at the place fixed at submit time."""
    from .strips import insert_strip

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
