"""Small messages between the main thread and the worker thread (plain dataclasses, no bpy)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# ----------------------------------------------------------------- main thread -> worker


@dataclass
class Configure:
    """Connection settings (from the preferences); the worker reconnects when they change."""

    config: dict[str, Any]


@dataclass
class SubmitJob:
    local_id: str  # the job list entry, before the backend gives a job id
    request: dict[str, Any]  # GenerateRequest fields
    camera_motions: dict[str, float]  # "ZoomIn" -> weight, resolved to ids by the worker
    out_root: str  # absolute folder the frames go under
    client_tag: str = ""
    # Sent before without an answer (a timeout): the backend may have made the job, so the
    # worker sends it again, with `local_id` as its submit id, until the backend answers.
    resend: bool = False
    # Cancelled by the artist while owed (`resend`): its row has ended; the job the backend
    # answers with is cancelled at once and never reported.
    cancelled: bool = False
    # time.monotonic() until which a backend that cannot be reached is waited for rather than
    # the submit refused: the add-on has just started the local backend, which loads its
    # models before it listens (minutes, the first time, for new checkpoints).
    patient_until: float = 0.0
    # Request field -> the panel setting to change when the backend refuses it (its limits).
    panel_hints: dict[str, str] = field(default_factory=dict)


@dataclass
class CancelSubmit:
    """Cancel a job whose submit has no answer yet (its row is still "submitting")."""

    local_id: str


@dataclass
class CancelJob:
    job_id: str


@dataclass
class CancelsOwed:
    """Cancels a stopped worker still owed the backend (the add-on was disabled while the
    backend was away): a job id to cancel, or a cancelled submit (`SubmitJob.cancelled`) whose
    job, if the backend made one, is cancelled.  Sent by that worker as it ends, handed on to
    the next worker by the main thread: without it the job ran on, holding a shared GPU."""

    job_ids: list[str]
    submits: list[SubmitJob]
    # The stopped worker that handed these on: once they are taken over, it owes nothing at a quit.
    sender: Any = field(default=None, compare=False, repr=False)

    def is_empty(self) -> bool:
        return not self.job_ids and not self.submits


@dataclass
class WatchJobs:
    jobs: dict[str, Any]  # job id -> out_root, or `worker.watch_entry` (out_root and what the row knows)


@dataclass
class MoveTake:
    """A finished take written under a root its job no longer belongs to (the .blend was saved
    elsewhere meanwhile): move it under `out_root`, then report `done` again from there."""

    done: JobDone
    out_root: str  # absolute


@dataclass
class RefreshModels:
    pass


@dataclass
class Shutdown:
    pass


# ----------------------------------------------------------------- worker -> main thread


@dataclass
class ConnectionState:
    connected: bool
    message: str  # "connected to 0.1.0 on cuda:0 ..." or why not
    models: list[dict[str, Any]] | None = None
    defaults: dict[str, str] = field(default_factory=dict)
    server_version: str = ""
    device: str = ""


@dataclass
class TestResult:
    ok: bool
    message: str


@dataclass
class JobAccepted:
    local_id: str
    job_id: str
    queue_position: int


@dataclass
class JobRejected:
    local_id: str
    message: str
    state: str = "failed"  # or "cancelled": the artist cancelled it before the backend answered


@dataclass
class SubmitNote:
    """A submit that is still owed an answer (sent again once the backend is back)."""

    local_id: str
    message: str


@dataclass
class JobProgress:
    job_id: str
    state: str  # "queued" | "running"
    step: int = 0
    total_steps: int = 0
    remaining_s: float = -1.0
    phase: str = ""
    preview_path: str = ""  # a PNG the worker wrote, or ""
    queue_position: int = -1


@dataclass
class JobDone:
    job_id: str
    directory: str  # absolute; every frame is in it
    files: list[str]
    seed: int
    settings: dict[str, Any]
    settled: bool = False  # the worker already tried to move it (MoveTake): insert it where it is
    note: str = ""  # why it is not where the job's row wanted it, or ""


@dataclass
class JobFailed:
    job_id: str
    message: str
    state: str = "failed"  # "failed" | "cancelled" | "interrupted" | "lost"


@dataclass
class JobNote:
    """A transient problem shown on a job without ending it (backend unreachable...)."""

    job_id: str
    message: str


@dataclass
class QueueView:
    """The backend's queue, while this add-on has jobs on it: a line per job, newest
    state first ("now  anna@ws-12  16 frames 512x512  step 12/25"); empty when it has none."""

    summary: str  # "1 running, 3 waiting, from 2 clients"
    lines: list[str]
