"""Server configuration, the bind-address policy and the HMAC key bootstrap."""

from __future__ import annotations

import errno
import logging
import os
import shlex
import socket
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from animatediff_blender.protocol import auth
from animatediff_blender.protocol.endpoints import bind_problem
from animatediff_blender.protocol.messages import GenerateRequest, Limits, MotionLora

log = logging.getLogger("animatediff_blender.server")

# Requests (client -> server) carry no binary buffers; their size cap is the protocol's
# `wire.MAX_REQUEST_BYTES` (clients check it before sending), whatever --max-message-mb says
# (that bounds what the server sends).
MAX_REQUEST_BUFFERS = 4


class ConfigError(Exception):
    """A configuration the server refuses to run with; the message says how to fix it."""


# Deflate level of stored frames on zlib's 0-9 scale (backend/png.py).  1: the fastest that
# compresses; with ISA-L, higher levels cost more time for frames no smaller, and encoding is
# what a clip waits for last (`animatediff-blender bench-server`).
PNG_COMPRESS_LEVEL = 1


@dataclass
class ServerConfig:
    key: bytes
    data_dir: Path
    bind: str = "tcp://127.0.0.1:5557"
    limits: Limits = field(default_factory=Limits)
    curve_secret: Path | None = None
    curve_allowed_dir: Path | None = None
    # How often the allowed folder is looked at: client certificates added or removed there
    # take effect without a restart (which would interrupt the running job).
    curve_rescan_s: float = 5.0
    # Certificate names (files in the allowed folder, without `.key`) whose clients may see
    # and cancel every job: the pipeline TD's, to clear a runaway job without a restart.
    admin_clients: tuple[str, ...] = ()
    insecure: bool = False
    retention_hours: float = 72.0
    retention_max_bytes: int = 50 * 1024**3
    retention_interval_s: float = 3600.0
    # ZeroMQ heartbeats: a peer silent for `heartbeat_timeout_ms` is dropped, so its
    # identity stops receiving events (it resumes with `watch` after reconnecting).
    heartbeat_ivl_ms: int = 2000
    heartbeat_timeout_ms: int = 10000
    heartbeat_ttl_ms: int = 10000
    replay_window_s: float = 300.0
    preview_max_px: int = 256
    png_compress_level: int = PNG_COMPRESS_LEVEL
    linger_ms: int = 1000
    shutdown_timeout_s: float = 10.0

    @property
    def curve(self) -> bool:
        return self.curve_secret is not None and self.curve_allowed_dir is not None


def ipc_in_use(bind: str) -> bool:
    """Whether an `ipc://` address's socket file has a live listener (a stale file left by a
    killed server has none)."""
    if not bind.startswith("ipc://") or not hasattr(socket, "AF_UNIX"):
        return False
    path = bind.removeprefix("ipc://")
    if not path or path.startswith("@") or not stat.S_ISSOCK(_mode(path)):  # (@: Linux's abstract names)
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _mode(path: str) -> int:
    try:
        return os.stat(path).st_mode
    except OSError:
        return 0


def check_bind_policy(config: ServerConfig, warn: bool = True) -> None:
    """Refuse a malformed address, and a network-reachable one without CurveZMQ unless
    `insecure`."""
    problem = bind_problem(config.bind)
    if problem is not None:
        raise ConfigError(f"cannot listen on {config.bind}: {problem}")
    if ipc_in_use(config.bind):
        # libzmq replaces the socket file: the running backend would go on, unreachable.
        raise ConfigError(f"another backend already listens on {config.bind}: stop it first, or bind elsewhere")
    if (config.curve_secret is None) != (config.curve_allowed_dir is None):
        raise ConfigError("CurveZMQ needs both --curve-secret and --curve-allowed-dir")
    if config.admin_clients and not config.curve:
        # Without CurveZMQ a client's name is what it claims: anyone with the key could be one.
        raise ConfigError("--admin-client names a CurveZMQ client certificate: it needs --curve-secret and "
                          "--curve-allowed-dir")  # fmt: skip
    if auth.is_loopback(config.bind) or config.curve:
        return
    if not config.insecure:
        raise ConfigError(
            f"refusing to listen on {config.bind} without encryption: anyone on the network could "
            "read prompts and frames. Create certificates with `animatediff-blender keys --curve` and "
            "pass --curve-secret and --curve-allowed-dir, or bind tcp://127.0.0.1 and tunnel over SSH, "
            "or pass --insecure on a network you trust."
        )
    if warn:
        log.warning(
            "INSECURE: listening on %s without CurveZMQ (--insecure). Messages are signed but NOT "
            "encrypted: anyone on this network can read prompts and frames.",
            config.bind,
        )


FRAME_MESSAGE_OVERHEAD = 64 * 1024  # header/content JSON of a Frames message, generously


def largest_frame_message(limits: Limits) -> int:
    """Bytes of a frames message holding one incompressible RGB frame of the largest size
    the limits allow: the PNG's rows (a filter byte each), deflate's stored blocks (5 bytes
    per 64 KiB), the PNG and zlib framing, and the message's own overhead."""
    raw = limits.max_height * (limits.max_width * 3 + 1)
    return raw + 5 * (raw // 65535 + 1) + 4096 + FRAME_MESSAGE_OVERHEAD


# Limits a server cannot work with at zero or below: every job would be refused (or, for the
# timeout, ended at once).  `serve`'s flags are these names with dashes (`_s` dropped).
POSITIVE_LIMITS = (
    "max_frames", "max_width", "max_height", "max_pixel_frames", "max_steps", "max_prompt_chars",
    "max_queue", "max_jobs_per_client", "job_timeout_s",
    "max_frames_per_message",  # (0 made the frame splitter loop for ever; no flag sets it)
)  # fmt: skip


# Limits field -> (request struct, field, the msgspec.Meta bound that caps it).
_SCHEMA_BOUNDS: dict[str, tuple[type, str, str]] = {
    "max_width": (GenerateRequest, "width", "le"),
    "max_height": (GenerateRequest, "height", "le"),
    "max_frames": (GenerateRequest, "frames", "le"),
    "max_steps": (GenerateRequest, "steps", "le"),
    "min_guidance": (GenerateRequest, "guidance", "ge"),
    "max_guidance": (GenerateRequest, "guidance", "le"),
    "max_prompt_chars": (GenerateRequest, "prompt", "max_length"),
    "min_lora_weight": (MotionLora, "weight", "ge"),
    "max_lora_weight": (MotionLora, "weight", "le"),
}


def _schema_bound(struct: type, field_name: str, bound_name: str) -> float | None:
    """A bound of a request field's schema (`le`, `ge`, `max_length`), read from its type."""
    import msgspec

    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    kind = next(f.type for f in info.fields if f.name == field_name)
    options = kind.types if isinstance(kind, msgspec.inspect.UnionType) else (kind,)
    for option in options:
        bound = getattr(option, bound_name, None)
        if bound is not None:
            return float(bound)
    return None


def check_limits(limits: Limits) -> None:
    """Refuse limits no job could pass, and a message limit too small for one frame: every
    frames message of a large clip would be dropped, and clients would wait for frames
    that never come."""
    for name in POSITIVE_LIMITS:
        value = getattr(limits, name)
        if not value > 0:
            flag = "--" + name.removesuffix("_s").replace("_", "-")
            raise ConfigError(f"{flag} must be > 0, not {value:g}")
    if limits.max_motion_loras < 0:
        raise ConfigError(f"--max-motion-loras must be >= 0, not {limits.max_motion_loras}")
    for name, (struct, field_name, bound_name) in _SCHEMA_BOUNDS.items():
        # The request schema refuses more whatever the server allows: a limit beyond it would
        # be announced to clients, and then refused by the schema in other words.
        bound = _schema_bound(struct, field_name, bound_name)
        value = getattr(limits, name)
        if bound is not None and (value < bound if bound_name == "ge" else value > bound):
            side = "below" if bound_name == "ge" else "above"
            raise ConfigError(
                f"--{name.replace('_', '-')} {value:g} is {side} what the protocol carries ({bound:g})"
            )
    needed = largest_frame_message(limits)
    if limits.max_message_bytes < needed:
        raise ConfigError(
            f"--max-message-mb {limits.max_message_bytes / 2**20:g} cannot carry one "
            f"{limits.max_width}x{limits.max_height} frame: it needs at least "
            f"{needed / 2**20:.1f} MiB (or lower --max-width/--max-height)"
        )


LOCK_FILE_NAME = "server.lock"


def lock_data_dir(data_dir: Path) -> IO[bytes]:
    """Hold `<data_dir>/server.lock` for as long as the returned file stays open.  A second
    server on the same folder (two GPUs, two `serve`, one default data dir) would take the
    first one's running jobs for leftovers of a crash: mark them interrupted and delete
    their frames.  The OS releases the lock when the process dies, however it dies."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_FILE_NAME
    fh = open(path, "a+b")  # noqa: SIM115 - held open on purpose
    fh.seek(0)  # msvcrt locks from the current position
    try:
        if sys.platform == "win32":
            import msvcrt

            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EDEADLK):
            # A file system without locks (some network mounts): run, as before there was one.
            log.warning("cannot lock %s (%s); make sure no other backend uses this data folder", path, exc)
            return fh
        fh.close()
        raise ConfigError(
            f"another backend already uses the data folder {data_dir} (it holds {path}); give each "
            "server its own --data-dir, or stop the other one first"
        ) from None
    return fh


def load_or_create_key(path: Path | None, bind: str) -> bytes:
    """The HMAC key from `path` (default: the config dir's hmac.key).  A missing key is
    created (mode 0600) only for a loopback address: a network server must be given the
    key its clients already hold."""
    key_path = Path(path) if path is not None else auth.default_key_path()
    if not key_path.exists() and auth.is_loopback(bind):
        key = auth.create_key(key_path)
        if key_path == auth.default_key_path():
            log.info("created a new HMAC key at %s (mode 0600); clients on this machine use it automatically",
                     key_path)
        else:  # clients look in the default place: this file must be named to them
            log.info("created a new HMAC key at %s (mode 0600); give clients the same file (--key-file %s, or "
                     "the add-on's key file preference)", key_path, shlex.quote(str(key_path)))
        return key
    try:
        return auth.load_key(key_path)
    except auth.AuthError as exc:
        raise ConfigError(str(exc)) from None
