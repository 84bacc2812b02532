"""`animatediff-blender serve`: run the GPU backend."""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

from animatediff_blender.protocol.messages import Limits

_DEFAULTS = Limits()

EPILOG = """\
security:
  Every message is signed with the shared HMAC key (--key-file; created with mode 0600 on
  the first start when missing and the address is local).  A non-loopback --bind needs
  CurveZMQ (--curve-secret and --curve-allowed-dir, see `animatediff-blender keys --curve`);
  the server refuses to start without it unless --insecure is given.

jobs and storage:
  Jobs, their settings and their frames are kept in --data-dir (jobs.sqlite and
  jobs/<job_id>/frame_0000.png) and stay fetchable by their owner after a restart.  Jobs
  that were queued or running when the server stopped are reported as "interrupted" and
  are not re-run.  Retention: finished, failed, cancelled and interrupted jobs older
  than --retention-hours are deleted, then the oldest finished jobs until the frames take
  at most --retention-max-gb; checked at start and every hour.  One server per
  --data-dir: a second one on the same folder refuses to start.
"""


def _data_dir() -> Path:
    from animatediff_blender.backend.models.fetch import default_data_dir

    return default_data_dir()


def _check_models_dir(models_dir: Path) -> None:
    """Refuse a models folder that is a file; warn once, in words, when it holds no model
    (the engine would otherwise log a warm-up traceback and refuse every job)."""
    from animatediff_blender.backend.server.config import ConfigError

    if models_dir.exists() and not models_dir.is_dir():
        raise ConfigError(f"--models-dir {models_dir} is not a folder")
    if not models_dir.is_dir() or not any(models_dir.iterdir()):
        logging.getLogger("animatediff_blender.server").warning(
            "no models in %s: jobs will fail until some are there (animatediff-blender models fetch "
            "--models-dir %s)", models_dir, shlex.quote(str(models_dir)))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the GPU backend server",
        description="Run the backend: a ZeroMQ server that queues generation jobs and runs them on the GPU.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--bind", default="tcp://127.0.0.1:5557", help="ZeroMQ address to listen on (default: %(default)s)"
    )
    p.add_argument("--models-dir", type=Path, help="model directory (default: <data-dir>/models)")
    p.add_argument(
        "--data-dir",
        type=Path,
        help="job database and frames (default: $ANIMATEDIFF_BLENDER_DATA or XDG data dir)",
    )
    p.add_argument("--key-file", type=Path, help="HMAC key file (default: <config dir>/hmac.key)")
    p.add_argument("--curve-secret", type=Path, help="CurveZMQ: this server's .key_secret certificate")
    p.add_argument(
        "--curve-allowed-dir", type=Path, help="CurveZMQ: folder of allowed clients' public .key files"
    )
    p.add_argument(
        "--admin-client", action="append", default=[], metavar="NAME",
        help="CurveZMQ: the client certificate NAME (NAME.key in --curve-allowed-dir) may see and cancel "
             "every job, e.g. to clear a runaway one (`animatediff-blender queue --cancel JOB`); repeatable",
    )  # fmt: skip
    p.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback --bind without CurveZMQ (NOT encrypted)"
    )
    p.add_argument(
        "--engine",
        choices=("animatediff", "fake"),
        default="animatediff",
        help="generation engine; 'fake' makes test patterns without a GPU (default: %(default)s)",
    )
    p.add_argument(
        "--device", default=None, help="torch device, e.g. cuda:1 (default: cuda if available, else cpu)"
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=("fp16", "bf16", "fp32", "float16", "bfloat16", "float32"),
        help="weights dtype (default: fp16 on CUDA, fp32 on CPU)",
    )
    p.add_argument(
        "--fast",
        choices=("auto", "on", "off"),
        default="auto",
        help="GPU fast path: regional torch.compile of the UNet and the VAE decoder, compiled in the "
        "background and cached in <data-dir>/compile-cache, and a long clip's context windows run as one "
        "batch.  auto: on for CUDA where triton is installed, off on the CPU; off: stock diffusers.  Measured "
        "on an H200 against stock diffusers in one run: 16 frames x 25 steps 2.78 s instead of 4.14 s, 64 "
        "frames 16.9 s instead of 25.5 s, 16 frames x 4 steps on the artist's machine 0.40 s after submit "
        "(stock diffusers alone: 0.63 s), frames within 57 dB PSNR of stock; the price is ~75 s of compiling "
        "per clip shape at the first start (~20 s after a restart).  No job waits for more than the UNet block "
        "compiling when it arrives: a job whose shape is not compiled yet runs at stock speed, and the shape compiles while the GPU is "
        "idle (backend/bench/README.md) (default: %(default)s)",
    )
    p.add_argument(
        "--png-compress-level",
        type=int,
        choices=range(10),
        default=None,
        metavar="0-9",
        help="deflate level of the stored frames' PNGs, on zlib's scale (default: the server's, 1: the "
        "fastest that compresses; a finished clip waits for its last frames' encoding). 0 stores them "
        "uncompressed (~30%% more bytes); with ISA-L (the isal package) levels above 1 take up to 1.7x "
        "the time for frames no smaller",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on Ctrl+C or SIGTERM, how long to wait for the running job to stop and its frames to be "
        "stored; what is still stuck then (a hung GPU call, a disk that does not answer) is left behind, "
        "named in the log, and the process exits; the next start reports its job interrupted "
        "(default: %(default)s)",
    )
    p.add_argument("--fake-step-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # tests and demos

    lim = p.add_argument_group("limits (checked before any GPU work)")
    lim.add_argument("--max-frames", type=int, default=_DEFAULTS.max_frames, help="default: %(default)s")
    lim.add_argument("--max-width", type=int, default=_DEFAULTS.max_width, help="default: %(default)s")
    lim.add_argument("--max-height", type=int, default=_DEFAULTS.max_height, help="default: %(default)s")
    lim.add_argument(
        "--max-pixel-frames",
        type=int,
        default=_DEFAULTS.max_pixel_frames,
        help="width x height x frames budget (default: %(default)s)",
    )
    lim.add_argument("--max-steps", type=int, default=_DEFAULTS.max_steps, help="default: %(default)s")
    lim.add_argument(
        "--max-guidance", type=float, default=_DEFAULTS.max_guidance, help="default: %(default)s"
    )
    lim.add_argument(
        "--max-prompt-chars", type=int, default=_DEFAULTS.max_prompt_chars, help="default: %(default)s"
    )
    lim.add_argument(
        "--max-motion-loras", type=int, default=_DEFAULTS.max_motion_loras, help="default: %(default)s"
    )
    lim.add_argument("--max-queue", type=int, default=_DEFAULTS.max_queue, help="default: %(default)s")
    lim.add_argument(
        "--max-jobs-per-client",
        type=int,
        default=_DEFAULTS.max_jobs_per_client,
        help="queued + running jobs per client id (default: %(default)s)",
    )
    lim.add_argument(
        "--job-timeout",
        type=float,
        default=_DEFAULTS.job_timeout_s,
        help="seconds a job may run before it fails with 'timeout' (default: %(default)s)",
    )
    lim.add_argument(
        "--max-message-mb",
        type=float,
        default=_DEFAULTS.max_message_bytes / 2**20,
        help="largest message the server sends, MiB (default: %(default)s)",
    )

    ret = p.add_argument_group("retention")
    ret.add_argument(
        "--retention-hours",
        type=float,
        default=72.0,
        help="delete finished/failed/cancelled jobs older than this (default: %(default)s)",
    )
    ret.add_argument(
        "--retention-max-gb",
        type=float,
        default=50.0,
        help="keep stored frames under this size, oldest deleted first (default: %(default)s)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import math
    import os
    import signal
    import sys
    import threading

    # The server reads local files only; this stops any library from reaching a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from animatediff_blender.backend.engine.interface import Engine, EngineError
    from animatediff_blender.backend.server.config import (
        ConfigError,
        ServerConfig,
        check_bind_policy,
        check_limits,
        load_or_create_key,
        lock_data_dir,
    )
    from animatediff_blender.backend.server.server import Server
    from animatediff_blender.protocol import auth

    log = logging.getLogger("animatediff_blender.server")
    # argparse takes "inf" and "nan" for a float: inf overflows int() below, nan disables a limit.
    for dest in (
        "max_guidance", "job_timeout", "max_message_mb", "retention_hours", "retention_max_gb", "shutdown_timeout"
    ):  # fmt: skip
        value = getattr(args, dest)
        if not (math.isfinite(value) and value >= 0):
            flag = "--" + dest.replace("_", "-")
            print(f"animatediff-blender serve: {flag} must be a finite number >= 0, not {value:g}", file=sys.stderr)
            return 2
    data_dir = args.data_dir or _data_dir()
    models_dir = args.models_dir or data_dir / "models"
    limits = Limits(
        max_frames=args.max_frames,
        max_width=args.max_width,
        max_height=args.max_height,
        max_pixel_frames=args.max_pixel_frames,
        max_steps=args.max_steps,
        max_guidance=args.max_guidance,
        max_prompt_chars=args.max_prompt_chars,
        max_motion_loras=args.max_motion_loras,
        max_queue=args.max_queue,
        max_jobs_per_client=args.max_jobs_per_client,
        job_timeout_s=args.job_timeout,
        max_message_bytes=int(args.max_message_mb * 2**20),
    )
    try:
        check_limits(limits)  # before a key file is created or an engine loaded
        config = ServerConfig(
            key=b"",  # (read or created below, once the rest is known to be right)
            data_dir=data_dir,
            bind=args.bind,
            limits=limits,
            curve_secret=args.curve_secret,
            curve_allowed_dir=args.curve_allowed_dir,
            admin_clients=tuple(args.admin_client),
            insecure=args.insecure,
            retention_hours=args.retention_hours,
            retention_max_bytes=int(args.retention_max_gb * 1024**3),
            shutdown_timeout_s=args.shutdown_timeout,
        )
        if args.png_compress_level is not None:
            config.png_compress_level = args.png_compress_level
        # Refused before a key file is created, and before the engine scans and hashes the
        # models (minutes for new checkpoints): an address that cannot work, or a data folder
        # another backend uses (the server takes the lock for good).
        check_bind_policy(config, warn=False)  # (the server warns, once)
        config.key = load_or_create_key(args.key_file, args.bind)
        if config.curve:
            assert config.curve_secret is not None and config.curve_allowed_dir is not None
            auth.check_server_curve(config.curve_secret, config.curve_allowed_dir)
            missing = [n for n in config.admin_clients if not (config.curve_allowed_dir / f"{n}.key").is_file()]
            if missing:  # (may be copied there later: the server reads the folder again)
                log.warning("--admin-client: no %s in %s yet", ", ".join(f"{n}.key" for n in missing),
                            config.curve_allowed_dir)  # fmt: skip
        lock_data_dir(data_dir).close()
        if args.engine != "fake":
            _check_models_dir(models_dir)
        engine: Engine
        if args.engine == "fake":
            from animatediff_blender.backend.engine.fake import FakeEngine

            engine = FakeEngine(step_delay_s=args.fake_step_delay)
        else:
            from animatediff_blender.backend.engine.animatediff import AnimateDiffEngine

            log.info("loading the AnimateDiff engine (models: %s)", models_dir)
            fast = {"auto": None, "on": True, "off": False}[args.fast]
            engine = AnimateDiffEngine(
                models_dir, args.device, args.dtype, fast=fast, compile_cache_dir=data_dir / "compile-cache"
            )
            log.info("fast path (--fast %s): %s", args.fast, engine.fast.describe())
        server = Server(config, engine)
    except (ConfigError, EngineError, auth.AuthError) as exc:
        print(f"animatediff-blender serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a --data-dir or --key-file path that cannot be created
        print(f"animatediff-blender serve: {exc}", file=sys.stderr)
        return 2

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        server.stop()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
    try:
        server.serve_forever()
    except Exception as exc:
        log.error("server failed: %s", exc)
        return 1
    return 0
