"""`animatediff-blender generate`: submit one job from the command line and save its frames,
an animated GIF (and an MP4 when imageio-ffmpeg is installed)."""

from __future__ import annotations

import argparse
import re
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from animatediff_blender.backend.commands import (
    DEFAULT_ADDRESS,
    add_connection_args,
    connection_config,
    nonempty_path,
)

if TYPE_CHECKING:
    from animatediff_blender.protocol.client import ClientConfig, JobResult
    from animatediff_blender.protocol.messages import FieldError, GenerateRequest, ModelInfo

# Request field -> the flag that sets it, so field errors name what the user typed.
FLAGS = {
    "prompt": "--prompt",
    "negative_prompt": "--negative-prompt",
    "frames": "--frames",
    "width": "--width",
    "height": "--height",
    "steps": "--steps",
    "guidance": "--guidance",
    "seed": "--seed",
    "preset": "--preset",
    "base_model": "--base-model",
    "motion_module": "--motion-module",
    "motion_loras": "--lora",
    "domain_adapter": "--domain-adapter",
    "domain_adapter_scale": "--adapter-scale",
    "context_length": "--context-length",
    "context_stride": "--context-stride",
    "preview_every": "--preview-every",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate a clip on a running backend and save it",
        description=(
            "Submit a generation job to a running backend (`animatediff-blender serve`), show its "
            "progress and write frame_0000.png..., clip.gif (and clip.mp4 with imageio-ffmpeg) to --out."
        ),
    )
    p.add_argument("--prompt", help="what to generate (required unless --list-models)")
    p.add_argument("--negative-prompt", default="", help="what to avoid")
    p.add_argument("--frames", type=int, default=16, help="number of frames (default: %(default)s)")
    p.add_argument("--width", type=int, default=512, help="multiple of 8 (default: %(default)s)")
    p.add_argument("--height", type=int, default=512, help="multiple of 8 (default: %(default)s)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the preset's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument(
        "--preset", choices=("quality", "lightning", "lcm"), default="quality", help="default: %(default)s"
    )
    p.add_argument(
        "--base-model", metavar="ID", help="base model id, e.g. base:tiny-sd15 (default: server's)"
    )
    p.add_argument("--motion-module", metavar="ID", help="motion module id (default: server's)")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="ID[:WEIGHT]",
        help="motion LoRA id or camera move and weight, e.g. lora:v2_lora_ZoomIn.ckpt:0.8 or ZoomIn:0.8 (repeatable)",
    )
    p.add_argument("--domain-adapter", metavar="ID", help="domain adapter id (AnimateDiff v3)")
    p.add_argument(
        "--adapter-scale", type=float, default=1.0, help="domain adapter scale (default: %(default)s)"
    )
    p.add_argument("--context-length", type=int, help="frames per context window for long clips")
    p.add_argument("--context-stride", type=int, help="stride between context windows")
    p.add_argument("--preview-every", type=int, default=0, help="preview image every N steps (0: none)")
    p.add_argument("--fps", type=float, default=8.0, help="frame rate of the GIF/MP4 (default: %(default)s)")
    p.add_argument("--out", type=nonempty_path, help="output folder (required unless --list-models)")
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace a clip already in --out (without it, a folder holding one is refused before the job runs)",
    )  # fmt: skip
    p.add_argument("--list-models", action="store_true", help="print the backend's model registry and exit")
    p.add_argument(
        "--rescan", action="store_true",
        help="with --list-models: the backend reads its models folder again first (files added since it started)",
    )  # fmt: skip
    p.add_argument(
        "--resume",
        metavar="JOB_ID",
        help="instead of submitting: wait for a job submitted earlier from this machine (e.g. "
        "when the connection was lost) and save its frames to --out",
    )
    conn = add_connection_args(p)
    conn.add_argument("--job-timeout", type=float, help="give up (and cancel) after this many seconds")
    conn.add_argument(
        "--give-up-after", type=float, default=120.0, metavar="SECONDS",
        help="stop waiting for a backend that stopped answering mid-job after this long (the job may still "
        "finish there: the message says how to collect it) (default: %(default)s)",
    )  # fmt: skip
    # What --resume cannot change (the job was submitted with its own): their defaults, to
    # tell a flag given from one left out.
    p.set_defaults(func=run, job_flag_defaults={dest: p.get_default(dest) for dest in _JOB_FLAGS})


# argparse dest -> flag, of the settings a submitted job has already (--lora -> "lora").
_JOB_FLAGS = {flag[2:].replace("-", "_"): flag for flag in FLAGS.values()}


class UsageError(Exception):
    pass


def _model_id(value: str | None, kind: str) -> str | None:
    """`ZoomIn.ckpt` -> `lora:ZoomIn.ckpt`; ids that already name a kind keep it.  A file
    name that is no id ("My Model.ckpt") becomes the id the registry lists it under."""
    from animatediff_blender.protocol.messages import model_id

    return None if value is None else model_id(value, kind)


_KINDS = ("base", "motion", "lora", "adapter")


def _lora(value: str) -> tuple[str, float]:
    """`lora:name:0.8`, `name:0.8`, `lora:name` or `name` -> (id, weight)."""
    head, sep, tail = value.rpartition(":")
    if sep:
        try:
            return str(_model_id(head, "lora")), float(tail)
        except ValueError:
            if head not in _KINDS:  # `ZoomIn:abc`, `lora:x:abc`: the part after ':' is a weight
                raise UsageError(f"--lora {value!r}: the weight {tail!r} is not a number") from None
    return str(_model_id(value, "lora")), 1.0


def _simplify(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def resolve_alias(model_id: str, models: list[ModelInfo]) -> str:
    """Let people type what they see: `lora:ZoomIn`, `lora:zoom-in` or `lora:Zoom in` name the
    registry entry whose camera motion, label or file stem matches; exact ids pass unchanged,
    and so does an alias that matches nothing (the backend refuses it by name).  A camera move
    (`lora:ZoomIn`) names the first MotionLoRA with that move in the backend's list order, as
    the add-on picks it (official copies in two formats are the same move).  Another alias
    matching several entries is a UsageError listing them."""
    if any(m.id == model_id for m in models):
        return model_id
    kind, _, name = model_id.partition(":")
    wanted = _simplify(name)
    moves = [m.id for m in models if m.kind == kind and m.ok and m.camera_motion and _simplify(m.camera_motion) == wanted]
    if moves:
        return moves[0]
    matches = {
        m.id
        for m in models
        if m.kind == kind
        and m.ok
        and wanted
        in (_simplify(m.camera_motion), _simplify(m.label), _simplify(m.id.partition(":")[2].rsplit(".", 1)[0]))
    }
    if len(matches) > 1:
        raise UsageError(f"{model_id!r} could mean any of {', '.join(sorted(matches))}: give the full id")
    return matches.pop() if matches else model_id


def resolve_aliases(request: GenerateRequest, models: list[ModelInfo]) -> GenerateRequest:
    import msgspec

    from animatediff_blender.protocol.messages import MotionLora

    def one(value: str | None) -> str | None:
        return None if value is None else resolve_alias(value, models)

    return msgspec.structs.replace(
        request,
        base_model=one(request.base_model),
        motion_module=one(request.motion_module),
        domain_adapter=one(request.domain_adapter),
        motion_loras=[MotionLora(id=resolve_alias(m.id, models), weight=m.weight) for m in request.motion_loras],
    )


def build_request(args: argparse.Namespace) -> GenerateRequest:
    from animatediff_blender.protocol.messages import GenerateRequest, MotionLora

    loras = [MotionLora(id=i, weight=w) for i, w in map(_lora, args.lora)]
    return GenerateRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        base_model=_model_id(args.base_model, "base"),
        motion_module=_model_id(args.motion_module, "motion"),
        motion_loras=loras,
        domain_adapter=_model_id(args.domain_adapter, "adapter"),
        domain_adapter_scale=args.adapter_scale,
        frames=args.frames,
        width=args.width,
        height=args.height,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        preset=args.preset,
        context_length=args.context_length,
        context_stride=args.context_stride,
        preview_every=args.preview_every,
    )


def describe_fields(fields: list[FieldError]) -> str:
    """FieldError("$.request.motion_loras[1].weight") -> "--lora #2: ..."."""
    import re

    parts = []
    for f in fields:
        path = re.sub(r"^\$(\.request)?\.?", "", f.field)
        m = re.match(r"([a-z_]+)(?:\[(\d+)\])?", path)
        name = FLAGS.get(m.group(1), path) if m else path
        if m and m.group(2) is not None:
            name += f" #{int(m.group(2)) + 1}"
        parts.append(f"{name or f.field}: {f.message}")
    return "; ".join(parts)


def validate_locally(request: GenerateRequest) -> None:
    """The schema's static checks before any network: a typo fails instantly, by flag."""
    import msgspec

    from animatediff_blender.protocol.messages import GenerateRequest
    from animatediff_blender.protocol.wire import content_errors

    raw = msgspec.json.encode(request)
    try:
        msgspec.json.decode(raw, type=GenerateRequest)
    except msgspec.ValidationError as exc:
        raise UsageError(describe_fields(content_errors(raw, GenerateRequest, exc))) from None


def check_numbers(args: argparse.Namespace) -> None:
    """Float flags argparse lets through: `nan` and `inf` parse, but JSON sends them as null
    (so `--guidance nan` would silently become the preset's default) and the timeouts and
    the frame rate need a positive, finite number."""
    import math

    for flag, value in (
        ("--fps", args.fps), ("--timeout", args.timeout), ("--job-timeout", args.job_timeout),
        ("--give-up-after", args.give_up_after),
    ):  # fmt: skip
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"{flag} must be a positive number, not {value:g}")
    for flag, value in (("--guidance", args.guidance), ("--adapter-scale", args.adapter_scale)):
        if value is not None and not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, not {value:g}")
    for i, (_, weight) in enumerate(map(_lora, args.lora)):
        if not math.isfinite(weight):
            raise UsageError(f"--lora #{i + 1}: the weight must be a finite number, not {weight:g}")


def is_job_id(text: str) -> bool:
    """Whether `text` passes the protocol's own JobId schema."""
    import msgspec

    from animatediff_blender.protocol.messages import JobId

    try:
        msgspec.convert(text, JobId)
    except msgspec.ValidationError:
        return False
    return True


# Beside a clip's frames: the job that made them, its seed and settings (what remakes it).
CLIP_INFO = "clip.json"
_FRAME_FILE = re.compile(r"frame_(\d{4,})\.png")
_CLIP_FILES = ("clip.gif", "clip.mp4")


def clip_in(out: Path) -> tuple[dict[int, Path], str]:
    """What clip a folder holds already: its frame files by index and, from its clip.json,
    the job id ("" where there is none: no clip.json, or written by an earlier version)."""
    import json

    frames = {}
    for path in out.glob("frame_*.png"):
        match = _FRAME_FILE.fullmatch(path.name)
        if match:
            frames[int(match.group(1))] = path
    try:
        info = json.loads((out / CLIP_INFO).read_text(encoding="utf-8"))
        job_id = str(info.get("job_id", "")) if isinstance(info, dict) else ""
    except (OSError, ValueError):
        job_id = ""
    return frames, job_id


def prepare_out(out: Path, *, overwrite: bool = False, resume: str | None = None) -> None:
    """Create the output folder and prove it takes files (raises OSError).  A folder that
    holds a clip already is refused (UsageError) unless `overwrite`, or unless it holds the
    frames kept of the very job `resume` collects: a clip made before is never replaced
    by a mistyped --out, and the refusal comes before any GPU time is spent."""
    import tempfile

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=out):
        pass
    if overwrite:
        return
    frames, job_id = clip_in(out)
    if not frames and not any((out / name).exists() for name in _CLIP_FILES):
        return
    if resume is not None and job_id == resume:
        return
    what = f"{len(frames)} frame(s)" if frames else "a GIF/MP4"
    if job_id:
        what += f" of job {job_id}"
    raise UsageError(f"--out {out} already holds a clip ({what}): give another folder, or add --overwrite "
                     f"to replace it")  # fmt: skip


def write_clip_info(out: Path, job_id: str, *, result: JobResult | None = None,
                    received: Sequence[int] = ()) -> None:  # fmt: skip
    """clip.json: the job id (so that `--resume` may add to its own kept frames) and, for a
    finished clip, its seed and settings as the backend resolved them."""
    import json

    import msgspec

    info: dict[str, Any] = {"job_id": job_id}
    if result is not None:
        f = result.finished
        info.update(complete=True, frames=f.frames, width=f.width, height=f.height, seed=f.seed,
                    elapsed_s=round(f.elapsed_s, 3), settings=msgspec.to_builtins(f.settings))  # fmt: skip
    else:
        info.update(complete=False, frames_received=sorted(set(received)))
    (out / CLIP_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def client_config(args: argparse.Namespace) -> ClientConfig:
    return connection_config(args, "animatediff-blender generate", reconnect_give_up_s=args.give_up_after)


def run(args: argparse.Namespace) -> int:
    from animatediff_blender.protocol.client import ClientError

    received: dict[int, bytes] = {}  # the job's frames as they arrive: what a second Ctrl-C keeps
    cancel = threading.Event()  # set by Ctrl-C: the cancel that follows is the user's own
    job_ids: list[str] = []  # the job's id once the backend accepted it (clip.json of kept frames)
    try:
        check_numbers(args)
        if args.list_models:
            return _list_models(args)
        if args.out is None:
            raise UsageError("--out is required")
        if args.resume:
            if not is_job_id(args.resume):
                raise UsageError(f"--resume: {args.resume!r} is not a job id")
            given = [flag for dest, flag in _JOB_FLAGS.items()
                     if getattr(args, dest, None) != getattr(args, "job_flag_defaults", {}).get(dest)]
            if given:
                raise UsageError(f"--resume collects a job submitted earlier, with its own settings: "
                                 f"drop {', '.join(given)}")
            prepare_out(args.out, overwrite=args.overwrite, resume=args.resume)
            job_ids.append(args.resume)
            result = _generate(args, None, received, cancel, job_ids)
        else:
            if not args.prompt:
                raise UsageError("--prompt is required")
            request = build_request(args)
            validate_locally(request)
            # Before any GPU time is spent: a clip that cannot be saved is a clip lost.
            prepare_out(args.out, overwrite=args.overwrite)
            result = _generate(args, request, received, cancel, job_ids)
        written = save(result, args.out, fps=args.fps)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ClientError as exc:
        # Field errors are shown by flag (what the user typed) rather than by JSON path.
        text = (
            f"the backend refused the request: {describe_fields(exc.fields)}" if exc.fields else exc.message
        )
        if exc.frames:
            text += f"; {save_partial(exc.frames, args.out, exc.job_id or _last(job_ids))}"
        if exc.job_id and exc.code == "connection" and "may still" in exc.message:
            # Lost, not cancelled: the backend may go on making it, so say how to collect it.
            text += f"; to collect it: {resume_command(args, exc.job_id)}"
        print(f"error: {text}", file=sys.stderr)
        return 130 if exc.code == "cancelled" and cancel.is_set() else 1
    except OSError as exc:
        print(f"error: cannot write output: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if not received:
            raise  # nothing to keep: the CLI's own "interrupted"
        # Quit at once, but the backend deletes a cancelled job's frames: ours may be the only copy.
        print(f"interrupted; {save_partial(received, args.out, _last(job_ids))}", file=sys.stderr)
        return 130
    f = result.finished
    print(
        f"job {result.job_id}: {f.frames} frames {f.width}x{f.height}, seed {f.seed}, "
        f"{f.elapsed_s:.1f} s on the backend"
    )
    for label, path in written:
        print(f"  {label:<7} {path}")
    return 0


def resume_command(args: argparse.Namespace, job_id: str) -> str:
    """The command that collects `job_id` later, as typed into a shell: with this run's
    connection flags (every one that differs from its default) and each value quoted."""
    import shlex

    words = ["animatediff-blender", "generate", "--resume", job_id, "--out", str(args.out)]
    if args.overwrite:  # the clip it was to replace may still be there
        words.append("--overwrite")
    if args.address != DEFAULT_ADDRESS:
        words += ["--address", args.address]
    for flag, value in (("--key-file", args.key_file), ("--server-key", args.server_key),
                        ("--client-secret", args.client_secret)):  # fmt: skip
        if value is not None:
            words += [flag, str(value)]
    return shlex.join(words)


def _list_models(args: argparse.Namespace) -> int:
    from animatediff_blender.protocol.client import BackendClient

    with BackendClient(client_config(args)) as client:
        welcome = client.connect()
        # A rescan hashes new checkpoints first: minutes for a large one.
        models = client.list_models(rescan=args.rescan, timeout_s=max(args.timeout, 600.0) if args.rescan else None)
    defaults = set(welcome.defaults.values())
    if not models:
        print("the backend has no models; see `animatediff-blender models --help`")
    for info in sorted(models, key=lambda i: (i.kind, i.id)):
        flag = "*" if info.id in defaults else " "
        status = "" if info.ok else f"  BROKEN: {info.error}"
        version = f" [{info.version}]" if info.version else ""
        print(f"{flag} {info.id:<48} {info.label}{version}{status}")
    if defaults:
        print("(* default)")
    return 0


def _last(items: list[str]) -> str:
    return items[-1] if items else ""


def _generate(
    args: argparse.Namespace, request: GenerateRequest | None, received: dict[int, bytes], cancel: threading.Event,
    job_ids: list[str],
) -> JobResult:  # fmt: skip
    """Run `request`, or with None wait for the job `--resume` names.  The client fills
    `received` with the checked frames as they arrive: a KeyboardInterrupt carries none.
    Ctrl-C sets `cancel` (the job is then cancelled on the backend).  The job's id goes
    into `job_ids` once the backend has accepted it."""
    import signal

    from tqdm import tqdm

    from animatediff_blender.protocol.client import BackendClient, Event
    from animatediff_blender.protocol.messages import Frames, JobStatus, Progress

    bar: Any = None

    def on_event(event: Event) -> None:
        nonlocal bar
        content = event.content
        if isinstance(content, Progress):
            if bar is None:
                bar = tqdm(total=content.total_steps, unit="step", desc="generating", file=sys.stderr)
            bar.total = content.total_steps
            bar.set_postfix_str(content.phase, refresh=False)
            bar.update(max(0, content.step - bar.n))
        elif isinstance(content, Frames) and bar is not None:
            bar.set_postfix_str(f"frames {content.start + content.count}/{content.total}")

    shown: list[tuple[str, int]] = []

    def on_status(status: JobStatus) -> None:
        if not job_ids:
            job_ids.append(status.job_id)
        # A queued job sends nothing until it starts: say where it waits (its id first, for
        # --resume), and again when its place changes.
        if status.state not in ("queued", "running") or bar is not None:
            return
        seen = (status.state, status.queue_position if status.state == "queued" else 0)
        if shown and shown[-1] == seen:
            return
        where = f"queued, place {status.queue_position} in line" if status.state == "queued" else "running"
        prefix = f"job {status.job_id}" if not shown else f"job {status.job_id[:8]}"
        print(f"{prefix}: {where}", file=sys.stderr)
        shown.append(seen)

    running = threading.Event()  # the job may exist on the backend: cancel it, do not just quit

    def on_sigint(signum: int, frame: object) -> None:
        if cancel.is_set() or not running.is_set():
            raise KeyboardInterrupt  # nothing submitted yet (connecting): quit at once
        print("\ncancelling (Ctrl-C again to quit at once)...", file=sys.stderr)
        cancel.set()

    previous = (
        signal.signal(signal.SIGINT, on_sigint)
        if threading.current_thread() is threading.main_thread()
        else None
    )
    try:
        with BackendClient(client_config(args)) as client:
            welcome = client.connect()
            if request is None:
                running.set()
                return client.wait_job(args.resume, on_event=on_event, cancel=cancel, timeout_s=args.job_timeout,
                                       received=received, on_status=on_status)  # fmt: skip
            request = resolve_aliases(request, welcome.models)
            validate_locally(request)
            running.set()
            return client.run_job(request, on_event=on_event, cancel=cancel, timeout_s=args.job_timeout,
                                  received=received, on_status=on_status)  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def save_partial(frames: dict[int, bytes], out: Path, job_id: str = "") -> str:
    """Keep the frames of a job that did not finish (the backend deletes them): what we did.
    What another clip left here (only with --overwrite) goes, so that no image sequence
    mixes two clips; frames kept earlier of this same job (a --resume) stay."""
    try:
        old_frames, old_job = clip_in(out)
        same_job = bool(job_id) and old_job == job_id
        if frames and not same_job:
            for index, old in old_frames.items():
                if index not in frames:
                    old.unlink(missing_ok=True)
            for name in _CLIP_FILES:
                (out / name).unlink(missing_ok=True)
        for i, data in sorted(frames.items()):
            (out / f"frame_{i:04d}.png").write_bytes(data)
        if frames and job_id:
            write_clip_info(out, job_id, received=[*frames, *(old_frames if same_job else ())])
    except OSError as exc:
        return f"could not keep the {len(frames)} frame(s) received before that: {exc}"
    return f"the {len(frames)} frame(s) received before that are in {out}"


def save(result: JobResult, out: Path, *, fps: float) -> list[tuple[str, Path]]:
    """Write the PNG frames as they came (no re-encoding), then a GIF and maybe an MP4."""
    from animatediff_blender.backend import media

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(result.frames):
        path = out / f"frame_{i:04d}.png"
        path.write_bytes(data)
        paths.append(path)
    if not paths:
        return []
    # A longer clip written here before (--overwrite) left its last frames: one image
    # sequence of two clips.
    for index, old in clip_in(out)[0].items():
        if index >= len(paths):
            old.unlink(missing_ok=True)
    write_clip_info(out, result.job_id, result=result)
    written: list[tuple[str, Path]] = [("frames", out / "frame_0000.png ...")]
    images = [media.decode_png(data) for data in result.frames]
    written.append(("gif", media.write_gif(images, out / "clip.gif", fps=fps)))
    (out / "clip.mp4").unlink(missing_ok=True)  # never an earlier clip's beside these frames
    try:
        mp4 = media.write_mp4(images, out / "clip.mp4", fps=fps)
    except Exception as exc:  # an MP4 is a bonus: never lose the frames over it
        print(f"warning: no MP4 written: {exc}", file=sys.stderr)
    else:
        if mp4 is not None:
            written.append(("mp4", mp4))
    return written
