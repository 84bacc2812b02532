"""Typed message bodies ("content") of the AnimateDiff for Blender wire protocol.

Every message travels in the signed envelope of `wire.py`; this module only says
what each message type carries.  Schemas are msgspec Structs: decoding validates
types and static ranges and reports the failing field (``at `$.width```).
Limits that a server configures (maximum frames, pixels x frames budget, ...)
are checked by the server on top of these static bounds and reported with the
same field-path shape.

Unknown fields are ignored (``forbid_unknown_fields`` is left off) so that a
newer minor version of the protocol can add fields without breaking older peers.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Annotated, Literal

import msgspec

# Registry ids name models; never paths.  `kind:name`, the name being a file or
# folder name inside the server's models directory (no separators, no leading dot).
MODEL_ID_PATTERN = r"^[a-z_]{1,16}:[A-Za-z0-9][A-Za-z0-9._+-]{0,159}\Z"
ModelId = Annotated[str, msgspec.Meta(pattern=MODEL_ID_PATTERN, max_length=180)]
_MAX_ID_NAME = 160  # characters of an id's name part (MODEL_ID_PATTERN)
_ID_NAME_RX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,159}\Z")
_ID_NAME_OTHER = re.compile(r"[^A-Za-z0-9._+-]+")
# Latin letters that Unicode does not decompose into a base letter and an accent.
_LATIN_LETTERS = str.maketrans({
    "ß": "ss", "ẞ": "SS", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ø": "o", "Ø": "O",
    "đ": "d", "Đ": "D", "ł": "l", "Ł": "L", "þ": "th", "Þ": "TH", "ð": "d", "Ð": "D", "ı": "i",
})


def model_id_name(file_name: str) -> str | None:
    """The name part of the model id of a file or folder named `file_name`: the name itself
    where it fits `MODEL_ID_PATTERN`, else the name with its accents dropped and each run of
    other characters (spaces, brackets, other scripts) as one "_": artists' files are named
    "Realistic Vision V5.1.safetensors" and "Modèle (final).ckpt".  None where nothing
    usable is left (no letter or digit before the suffix).  Where letters of other scripts
    were dropped, or the name is cut to 160 characters, "-" and 12 hex digits of the name's
    digest follow what is left, or "name" where nothing is ("模型 v2.safetensors" ->
    "v2-….safetensors", "Модель.ckpt" -> "name-….ckpt"): an id of its own, the same on
    every system (the panel shows the registry's label, the name itself)."""
    if _ID_NAME_RX.match(file_name) and ".." not in file_name:
        return file_name
    folded = "".join(c for c in unicodedata.normalize("NFKD", file_name.translate(_LATIN_LETTERS))
                     if not unicodedata.combining(c))
    dot = folded.rfind(".")
    stem, suffix = (folded[:dot], folded[dot:]) if dot > 0 else (folded, "")
    other_script = any(c.isalnum() and not c.isascii() for c in stem)
    stem = re.sub(r"\.{2,}", ".", _ID_NAME_OTHER.sub("_", stem)).strip("._+-")
    suffix = _ID_NAME_OTHER.sub("_", suffix)
    if other_script or (stem and len(stem) + len(suffix) > _MAX_ID_NAME):
        # Letters an id cannot hold were dropped, or the name was cut to fit: the digest
        # keeps "国风 v2" and "动漫 v2" (and two long names alike at the start) apart.
        # NFC: macOS hands out decomposed names, Linux and Windows composed ones.
        raw_dot = file_name.rfind(".")
        raw_stem = unicodedata.normalize("NFC", file_name[:raw_dot] if raw_dot > 0 else file_name)
        kept = stem[: max(0, _MAX_ID_NAME - len(suffix) - 13)].rstrip("._+-")
        stem = f"{kept or 'name'}-{hashlib.sha256(raw_stem.encode()).hexdigest()[:12]}"
    name = stem + suffix
    if not stem or not _ID_NAME_RX.match(name):
        return None
    return name


def model_id(name: str, kind: str) -> str:
    """A model as a person names it -> its id: "Realistic Vision V5.1.safetensors" ->
    "base:Realistic_Vision_V5.1.safetensors" for `kind` "base" (`model_id_name`; a name
    without a kind takes `kind`, one with a kind keeps it).  An id maps to itself; what
    cannot become one is left for `MODEL_ID_PATTERN` to refuse."""
    given, sep, rest = name.partition(":")
    if not sep:
        given, rest = kind, name
    return f"{given}:{model_id_name(rest) or rest}"


_HEX32 = r"[0-9a-f]{32}"  # a uuid4 hex
# Patterns end in \Z, not $: `$` also matches before a final newline ("1.1\n", "artist\n").
# The id patterns are also what the server, its job store and the key files check with `re`.
JOB_ID_PATTERN = rf"^{_HEX32}\Z"
CLIENT_ID_PATTERN = r"^[A-Za-z0-9._:@-]{1,64}\Z"
JobId = Annotated[str, msgspec.Meta(pattern=JOB_ID_PATTERN)]
# A client-made idempotency key, shaped like a job id; "" for none.
SubmitId = Annotated[str, msgspec.Meta(pattern=rf"^(?:{_HEX32})?\Z")]
ClientId = Annotated[str, msgspec.Meta(pattern=CLIENT_ID_PATTERN)]
Prompt = Annotated[str, msgspec.Meta(max_length=4000)]

Preset = Literal["quality", "lightning", "lcm"]
JobState = Literal["queued", "running", "finished", "failed", "cancelled", "interrupted"]


class Base(msgspec.Struct, kw_only=True, omit_defaults=False):
    """Common base: keyword-only fields, unknown fields ignored on decode."""


# --------------------------------------------------------------------------- models


class ModelInfo(Base):
    """One entry of the server's model registry."""

    id: str
    kind: Literal["base", "motion", "lora", "adapter"]
    format: str  # "diffusers", "single_file", "original", ...
    label: str  # human-readable ("Zoom in", "mm_sd_v15_v2 (v2)")
    version: str = ""  # detected version: "v1", "v2", "v3", "lightning", "lcm", ...
    size_bytes: int = 0
    sha256: str = ""
    ok: bool = True
    error: str = ""  # why a broken file cannot be used
    camera_motion: str = ""  # for the 8 official MotionLoRAs: "ZoomIn", "PanLeft", ...


class Limits(Base):
    """Limits the server enforces before any GPU work; sent in the handshake."""

    max_message_bytes: int = 64 * 1024 * 1024
    max_frames_per_message: int = 256
    max_width: int = 1024
    max_height: int = 1024
    max_frames: int = 256
    max_pixel_frames: int = 512 * 512 * 128  # width * height * frames
    max_steps: int = 100
    min_guidance: float = 0.0
    max_guidance: float = 30.0
    max_prompt_chars: int = 4000
    max_motion_loras: int = 8
    min_lora_weight: float = -2.0
    max_lora_weight: float = 2.0
    max_queue: int = 64
    max_jobs_per_client: int = 32
    job_timeout_s: float = 1800.0


# --------------------------------------------------------------------------- requests


class Hello(Base):
    """client -> server, first message on a connection.  Reply: `Welcome`."""

    client_id: ClientId  # stable per installation (fairness and job ownership)
    client_name: str = ""  # "blender 4.2.3 / add-on 0.1.0", "cli"
    protocol_version: str = ""


class Welcome(Base):
    """server -> client: the handshake."""

    protocol_version: str
    server_version: str
    capabilities: list[str]  # "motion_lora", "domain_adapter", "context_windows", "prompt_travel", "preview", ...
    limits: Limits
    models: list[ModelInfo]
    device: str = ""  # "cuda:0 NVIDIA H200", "cpu"
    warming_up: bool = False
    defaults: dict[str, str] = {}  # default model ids per kind: {"base": ..., "motion": ...}
    admin: bool = False  # (1.3) this client's certificate may see and cancel every job


class ListModels(Base):
    """client -> server.  Reply: `Models`.  `rescan` re-reads the models directory."""

    rescan: bool = False


class Models(Base):
    models: list[ModelInfo]


class MotionLora(Base):
    id: ModelId
    weight: Annotated[float, msgspec.Meta(ge=-10.0, le=10.0)] = 1.0


class GenerateRequest(Base):
    """The generation settings of one job.  `None` fields take the preset's default."""

    prompt: Prompt
    negative_prompt: Prompt = ""
    # Prompt travel: frame index -> prompt.  When given, `prompt` is used for frame 0
    # unless the map has its own entry for 0.
    prompt_travel: dict[int, Prompt] | None = None
    base_model: ModelId | None = None  # None: server default
    motion_module: ModelId | None = None  # None: server default
    motion_loras: list[MotionLora] = []
    domain_adapter: ModelId | None = None
    domain_adapter_scale: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] = 1.0
    frames: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 16
    width: Annotated[int, msgspec.Meta(ge=8, le=8192, multiple_of=8)] = 512
    height: Annotated[int, msgspec.Meta(ge=8, le=8192, multiple_of=8)] = 512
    steps: Annotated[int, msgspec.Meta(ge=1, le=1000)] | None = None
    guidance: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] | None = None
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0
    preset: Preset = "quality"
    context_length: Annotated[int, msgspec.Meta(ge=4, le=64)] | None = None
    context_stride: Annotated[int, msgspec.Meta(ge=1, le=64)] | None = None
    preview_every: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 5  # 0: no previews


class Submit(Base):
    """client -> server.  Reply: `Accepted`, or `Error` (code "busy" when the queue is full).

    `submit_id` makes the submit idempotent: a submit whose `Accepted` was lost (timeout,
    reconnect) is sent again with the same id, and the server answers with the job the
    first one made (`Accepted` with its id, this connection now watching it) instead of
    making a second one; no queue limits apply to such a repeat.  The key is per client
    id and lives as long as its job is stored.  "" (what older clients send): every
    submit is a new job."""

    request: GenerateRequest
    client_tag: Annotated[str, msgspec.Meta(max_length=2000)] = ""  # opaque, echoed back in status
    submit_id: SubmitId = ""


class Accepted(Base):
    job_id: str
    queue_position: int  # 0: running now (or, for a repeated submit_id, already over: watch it)


class Cancel(Base):
    """client -> server.  Reply: `CancelReply`; a `Cancelled` event follows for the job."""

    job_id: JobId


class CancelReply(Base):
    job_id: str
    state: JobState  # the state after the request


class Status(Base):
    """client -> server.  Reply: `JobStatus`."""

    job_id: JobId


class JobStatus(Base):
    job_id: str
    state: JobState
    queue_position: int = -1
    step: int = 0
    total_steps: int = 0
    frames: int = 0
    error_code: str = ""
    error: str = ""
    client_tag: str = ""
    created_at: float = 0.0
    finished_at: float = 0.0


class Watch(Base):
    """client -> server: (re)subscribe this connection to events of these jobs.
    Reply: one `JobStatus` per job, as a `Statuses` message."""

    job_ids: Annotated[list[JobId], msgspec.Meta(max_length=256)]


class Statuses(Base):
    statuses: list[JobStatus]


class ListJobs(Base):
    """client -> server (protocol 1.2): the jobs the server has now, the running one first,
    then the waiting ones in the order the fair queue will run them.  Reply: `JobList`."""


class QueuedJob(Base):
    """One job of a `JobList`.  Of other clients' jobs only the shape is told (no id, tag or
    prompt): who, how big, how far."""

    position: int  # 0: running; 1, 2, ...: its turn, as things stand now
    state: JobState  # "running" or "queued"
    client: str  # who: the client's name from its hello ("blender 4.5.15 anna@ws-12"), else its id
    mine: bool = False  # the asking client's own job
    job_id: str = ""  # own jobs only (every job's for an admin, 1.3)
    client_tag: str = ""  # own jobs only (every job's for an admin, 1.3)
    frames: int = 0
    width: int = 0
    height: int = 0
    step: int = 0
    total_steps: int = 0
    created_at: float = 0.0
    started_at: float = 0.0


class JobList(Base):
    jobs: list[QueuedJob]
    clients: int = 0  # how many clients have jobs in it


class Fetch(Base):
    """client -> server: send the stored frames of a finished job.
    Reply: one or more `Frames` messages followed by `Finished`, or `Error`."""

    job_id: JobId


class Ping(Base):
    nonce: str = ""


class Pong(Base):
    nonce: str = ""
    server_time: float = 0.0
    running_job: str = ""
    queued: int = 0


# --------------------------------------------------------------------------- events


class Progress(Base):
    """server -> client, after every denoising step.  A small preview PNG may ride
    along as the message's single binary buffer (`has_preview`)."""

    job_id: str
    step: int
    total_steps: int
    elapsed_s: float
    remaining_s: float  # estimate, -1 when unknown
    has_preview: bool = False
    phase: str = "denoise"  # "loading", "denoise", "decode"


class Frames(Base):
    """server -> client: frames `start`..`start+count-1` of a job, one encoded image
    per binary buffer, in order.  `sha256` lists each buffer's hex digest."""

    job_id: str
    start: int
    count: int
    total: int
    format: Literal["png"] = "png"
    width: int = 0
    height: int = 0
    sha256: list[str] = []


class Finished(Base):
    job_id: str
    frames: int
    width: int
    height: int
    seed: int
    elapsed_s: float
    settings: GenerateRequest  # with preset defaults resolved


class Failed(Base):
    job_id: str
    code: str  # "out_of_memory", "timeout", "model_error", "internal", "interrupted", ...
    message: str


class Cancelled(Base):
    job_id: str
    by: str = ""  # (1.3) who cancelled it, when not its own client: an admin's certificate name


class FieldError(Base):
    field: str  # "$.request.width"
    message: str


class Error(Base):
    """Reply to a request the server refused.  `code` is machine-readable, `message`
    is for a person."""

    code: str  # "bad_signature", "replay", "bad_message", "version", "busy", "limit", "unknown_model", ...
    message: str
    fields: list[FieldError] = []


# msg_type on the wire -> content schema.
MESSAGE_TYPES: dict[str, type[Base]] = {
    "hello": Hello,
    "welcome": Welcome,
    "list_models": ListModels,
    "models": Models,
    "submit": Submit,
    "accepted": Accepted,
    "cancel": Cancel,
    "cancel_reply": CancelReply,
    "status": Status,
    "job_status": JobStatus,
    "watch": Watch,
    "statuses": Statuses,
    "fetch": Fetch,
    "list_jobs": ListJobs,
    "job_list": JobList,
    "ping": Ping,
    "pong": Pong,
    "progress": Progress,
    "frames": Frames,
    "finished": Finished,
    "failed": Failed,
    "cancelled": Cancelled,
    "error": Error,
}
TYPE_OF: dict[type[Base], str] = {cls: name for name, cls in MESSAGE_TYPES.items()}
