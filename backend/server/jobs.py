"""A live job and the events the GPU worker sends to the network loop."""

from __future__ import annotations

import math
import threading
import uuid
from dataclasses import dataclass, field

from animatediff_blender.protocol import messages
from animatediff_blender.protocol.wire import Header


def new_job_id() -> str:
    return uuid.uuid4().hex


@dataclass(eq=False)
class Job:
    """A queued or running job.  Fields below `cancel` are written by the worker thread
    and read by the loop (plain int/float assignments: safe under the GIL)."""

    job_id: str
    client_id: str
    settings: messages.GenerateRequest  # resolved by the engine at submit time
    client_tag: str
    created_at: float
    # The queue listing's name for its client as it was when it submitted: clients of one
    # user@host share an id, and a later `queue` must not rename a `generate`'s job.
    client_name: str = ""
    state: str = "queued"  # loop-owned: queued -> running -> (removed when final)
    watchers: set[bytes] = field(default_factory=set)  # loop-owned: ROUTER identities
    cancel: threading.Event = field(default_factory=threading.Event)
    interrupt: bool = False  # set with `cancel` at shutdown: report "interrupted", not "cancelled"
    cancelled_by: str = ""  # set with `cancel` by an admin certificate's client: its name
    step: int = 0
    total_steps: int = 0
    started_at: float = 0.0
    deadline: float = math.inf  # time.monotonic() after which the job fails with "timeout"
    timed_out: bool = False
    streamed: set[int] = field(default_factory=set)  # loop-owned: frames already broadcast
    # The job's final state is stored (and its event posted) once, by whoever takes this lock
    # first with `ended` still False: the worker (finished, failed...) or, at a shutdown that
    # could not wait for the worker, the loop (interrupted).  The other one then leaves the
    # job alone, so a client is never told "interrupted" about a job stored as finished.
    end_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    ended: bool = False


# --------------------------------------------------------------------------- worker -> loop


@dataclass
class JobStarted:
    job_id: str


@dataclass
class JobProgress:
    job_id: str
    step: int
    total_steps: int
    elapsed_s: float
    remaining_s: float
    phase: str
    preview_png: bytes | None


@dataclass
class FramesStored:
    """Frames of a running job, persisted (each file fsync'd) before the job finishes: the
    loop streams them to the job's watchers while the device still decodes the rest.
    `pngs` are the very bytes written to disk; the clip's size is the job's settings'."""

    job_id: str
    start: int
    pngs: list[bytes]
    sha256: list[str]


@dataclass
class JobDone:
    """Frames already persisted; `pngs` are the very bytes written to disk."""

    job_id: str
    pngs: list[bytes]
    sha256: list[str]
    finished: messages.Finished


@dataclass
class JobEnded:
    """Failed, cancelled or interrupted (state says which); already persisted."""

    job_id: str
    state: str
    code: str
    message: str


@dataclass
class Reply:
    """Messages produced off the loop (fetch, model rescan) for the loop to send."""

    identity: bytes
    parent: Header | None
    items: list[tuple[messages.Base, list[bytes]]]


@dataclass
class EngineReady:
    """The engine finished warming up."""


@dataclass
class DeviceFree:
    """The engine is done with this job (frames computed); the job itself finishes later,
    once its frames are encoded and persisted.  The loop may hand the worker the next job."""

    job_id: str


Event = JobStarted | JobProgress | FramesStored | JobDone | JobEnded | Reply | EngineReady | DeviceFree
