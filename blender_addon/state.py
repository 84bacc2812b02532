"""Process-wide state of the add-on that is not Blender data (lives until unregister)."""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from typing import Any


@dataclass
class AddonState:
    outbox: queue.Queue[Any] = field(default_factory=queue.Queue)  # worker -> main thread
    worker: Any = None  # worker.Worker, started lazily
    models: list[dict[str, Any]] = field(default_factory=list)  # the backend's model list (cached)
    defaults: dict[str, str] = field(default_factory=dict)
    connected: bool = False
    connection_message: str = "not connected yet"
    server_version: str = ""
    device: str = ""
    test_message: str = ""  # "Test connection" result shown in the preferences
    test_running: bool = False
    previews: Any = None  # bpy.utils.previews collection
    preview_keys: dict[str, str] = field(default_factory=dict)  # job id -> key in previews
    # local id -> the job row's fields, kept outside Blender data: an undo can remove the
    # row while the backend still works; the row is then re-created from here.
    job_shadow: dict[str, dict[str, Any]] = field(default_factory=dict)
    # local id -> the job row's fields once the job ended: an undo back to before that brings
    # the row back as it was (running...), and the worker, done with the job, never updates it.
    job_final: dict[str, dict[str, Any]] = field(default_factory=dict)
    # job id -> its last message (JobDone / JobFailed) when the scene of its row was gone (deleted
    # while the job ran): an undo that brings the scene back gets it applied then.
    job_orphans: dict[str, Any] = field(default_factory=dict)
    queue_view: Any = None  # messages.QueueView: the backend's queue while our jobs are on it
    backend_process: Any = None  # auto-started local backend (subprocess.Popen)
    owed_folder: str = ""  # the extension's user folder: cancels owed at a quit (owed.py)
    # Workers stopped by a disable whose owed cancels no new worker has taken over yet: an
    # exit handler keeps what they owe (the add-on may still be disabled at the quit).
    stopped_workers: list[Any] = field(default_factory=list)
    # Timing of the main-thread timer (tests and the responsiveness check read it).
    drain_max_s: float = 0.0
    drain_calls: int = 0
    apply_max_s: dict[str, float] = field(default_factory=dict)  # per worker message type


STATE = AddonState()


def reset() -> None:
    global STATE
    STATE.__init__()  # type: ignore[misc]
