"""Persistent job store: one SQLite table (`<data>/jobs.sqlite`, WAL mode) and the
frames as PNG files (`<data>/jobs/<job_id>/frame_0000.png`).

Nothing is lost:

* a job's request is stored when it is accepted, its state on every change;
* frames are written to `<job_id>.partial/`, fsynced, and the folder renamed to
  `<job_id>/` *before* the row says "finished", and before any client hears so;
* on start, `recover()` marks jobs that were queued or running when the previous
  server stopped as `interrupted` (their partial frames are deleted).  Clients see
  state "interrupted", error_code "interrupted" and can resubmit; we do not re-run
  them automatically, because an artist may have moved on and a crash-looping job
  must not take the server down again on every restart.

Retention (`prune`): jobs in a final state (finished, failed, cancelled,
interrupted) older than `max_age_s` are deleted, rows and frames; then, while the
frame files together exceed `max_bytes`, the oldest finished jobs are deleted.
The server runs it at start and periodically, then `sweep`: a frames folder whose delete
failed (a permission error, a busy file on a network share) stays on disk, its row gone or
final; every pass tries it again, until it goes.  Only folders no one needs: never a live
job's, never a finished job's.

Idempotent submits: a job keeps the `submit_id` its client gave it (NULL for none), unique
per client id; `find_submit` maps (client id, submit id) back to the job.  The key lives
and dies with its row.

Schema changes are applied in place when a database of an earlier version is opened
(`_migrate`: columns added, never removed), so that an upgrade keeps the job list;
an older server ignores the columns it does not know.

Thread safety: the network loop and the GPU worker both use the store; one lock
serialises the (short) SQLite calls.  File writes happen outside the lock.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from animatediff_blender.protocol.messages import JOB_ID_PATTERN

from .config import ConfigError

log = logging.getLogger("animatediff_blender.server.store")

FINAL_STATES = ("finished", "failed", "cancelled", "interrupted")
_JOB_ID = re.compile(JOB_ID_PATTERN)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id      TEXT PRIMARY KEY,
    client_id   TEXT NOT NULL,
    state       TEXT NOT NULL,
    request     TEXT NOT NULL,
    settings    TEXT NOT NULL DEFAULT '',
    client_tag  TEXT NOT NULL DEFAULT '',
    created_at  REAL NOT NULL,
    started_at  REAL NOT NULL DEFAULT 0,
    finished_at REAL NOT NULL DEFAULT 0,
    error_code  TEXT NOT NULL DEFAULT '',
    error       TEXT NOT NULL DEFAULT '',
    frames      INTEGER NOT NULL DEFAULT 0,
    width       INTEGER NOT NULL DEFAULT 0,
    height      INTEGER NOT NULL DEFAULT 0,
    seed        INTEGER NOT NULL DEFAULT 0,
    elapsed_s   REAL NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    bytes       INTEGER NOT NULL DEFAULT 0,
    submit_id   TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state_finished ON jobs (state, finished_at);
"""
# Columns added after the first version: (name, definition), added to older databases on open.
_ADDED_COLUMNS = (("submit_id", "TEXT"),)
# Indexes on added columns: created once the columns exist.  NULLs (no submit id) never clash.
_ADDED_INDEXES = "CREATE UNIQUE INDEX IF NOT EXISTS jobs_client_submit ON jobs (client_id, submit_id);"


@dataclass
class JobRecord:
    job_id: str
    client_id: str
    state: str
    request: str  # the Submit's GenerateRequest, JSON
    settings: str = ""  # the resolved settings, JSON ("" until finished)
    client_tag: str = ""
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    error_code: str = ""
    error: str = ""
    frames: int = 0
    width: int = 0
    height: int = 0
    seed: int = 0
    elapsed_s: float = 0.0
    total_steps: int = 0
    bytes: int = 0
    submit_id: str | None = None  # the client's idempotency key, None without one


_COLUMNS = [f.name for f in fields(JobRecord)]


def frame_name(index: int) -> str:
    return f"frame_{index:04d}.png"


class JobStore:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.jobs_dir = self.data_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Frames folders whose delete failed, by name: logged once each, tried again by `sweep`.
        self._undeletable: set[str] = set()
        path = self.data_dir / "jobs.sqlite"
        try:
            # (a folder in its place, or a file it may not open: "unable to open database file")
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        except sqlite3.Error as exc:
            raise ConfigError(
                f"cannot open the job database {path} ({exc}): it must be a file this user can read and "
                "write, or absent (a new one is made)"
            ) from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit survives power loss too; there are only a few commits per job.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._migrate()
        except sqlite3.DatabaseError as exc:  # not a database, or a damaged one
            self._db.close()
            raise ConfigError(
                f"cannot use the job database {path} ({exc}): move it aside to start with an empty job "
                "list, or give --data-dir the backend's own data folder"
            ) from None

    def _migrate(self) -> None:
        """Bring a database of an earlier version up to this schema, in place."""
        present = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name, definition in _ADDED_COLUMNS:
            if name not in present:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")
        self._db.executescript(_ADDED_INDEXES)

    def close(self, timeout: float | None = None) -> bool:
        """Close the database; False (left open) if a write holds it past `timeout` s (a
        disk that hangs: a shutdown does not wait for it for ever)."""
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            return False
        try:
            self._db.close()
        finally:
            self._lock.release()
        return True

    # ------------------------------------------------------------------ rows

    def create(self, record: JobRecord) -> None:
        values = [getattr(record, c) for c in _COLUMNS]
        with self._lock:
            self._db.execute(
                f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})", values
            )

    def update(self, job_id: str, **changes: object) -> None:
        unknown = set(changes) - set(_COLUMNS)
        if unknown:
            raise KeyError(f"unknown job columns: {sorted(unknown)}")
        assignments = ", ".join(f"{k} = ?" for k in changes)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {assignments} WHERE job_id = ?", [*changes.values(), job_id])

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
        return JobRecord(*row) if row else None

    def find_submit(self, client_id: str, submit_id: str) -> str | None:
        """The id of the job this client made with this submit id, if it is still stored."""
        with self._lock:
            row = self._db.execute(
                "SELECT job_id FROM jobs WHERE client_id = ? AND submit_id = ?", (client_id, submit_id)
            ).fetchone()
        return str(row[0]) if row else None

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])

    # ------------------------------------------------------------------ frames

    def job_dir(self, job_id: str) -> Path:
        if not _JOB_ID.match(job_id):  # ids are server-made; never let one become a path trick
            raise ValueError(f"not a job id: {job_id!r}")
        return self.jobs_dir / job_id

    def save_frames(self, job_id: str, pngs: list[bytes]) -> int:
        """Write the frames durably; returns the bytes written."""
        partial = self.begin_frames(job_id)
        total = sum(self.write_frame(partial, i, data) for i, data in enumerate(pngs))
        self.commit_frames(job_id, partial)
        return total

    # The three steps of save_frames, for a writer that stores frames as they come (in
    # any order, from several threads: each frame is its own file).

    def begin_frames(self, job_id: str) -> Path:
        """A fresh `<job_id>.partial/` folder to write frames into."""
        partial = self.job_dir(job_id).with_name(job_id + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        return partial

    @staticmethod
    def write_frame(partial: Path, index: int, data: bytes) -> int:
        with open(partial / frame_name(index), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return len(data)

    def commit_frames(self, job_id: str, partial: Path) -> None:
        """Make the written frames the job's frames (atomically, durably)."""
        final = self.job_dir(job_id)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        _fsync_dir(self.jobs_dir)

    def discard_frames(self, partial: Path) -> None:
        self._remove(partial)

    def load_frames(self, job_id: str, count: int) -> list[bytes]:
        folder = self.job_dir(job_id)
        return [(folder / frame_name(i)).read_bytes() for i in range(count)]

    def delete_frames(self, job_id: str) -> bool:
        """True once the job's frames are gone; a folder that cannot be deleted now is left
        to `sweep`."""
        return self._remove(self.job_dir(job_id))

    def _remove(self, folder: Path) -> bool:
        """Delete a frames folder; True once it is gone.  A failure is logged once per folder
        (every retention pass tries it again: a line per pass would flood the log)."""
        try:
            shutil.rmtree(folder)
        except OSError as exc:
            if os.path.lexists(folder):  # (not a file someone else deleted meanwhile)
                if folder.name not in self._undeletable:
                    self._undeletable.add(folder.name)
                    log.warning("cannot delete %s (%s); trying again at every retention pass", folder, exc)
                return False
        if folder.name in self._undeletable:
            self._undeletable.discard(folder.name)
            log.info("deleted %s at last", folder)
        return True

    def sweep(self, is_live: Callable[[str], bool]) -> int:
        """Delete the frames folders no job needs (a delete that failed before, a job whose row
        is gone): `<job_id>.partial` unless the job is live, `<job_id>` unless it is live or
        finished.  Returns how many went.  `is_live` is asked before the rows are read: a job
        that is no longer live has its final state stored already, so a job that finishes
        meanwhile is seen finished."""
        candidates: list[tuple[str, Path]] = []
        for path in self.jobs_dir.iterdir():
            job_id = path.name.removesuffix(".partial")
            if _JOB_ID.match(job_id) and not is_live(job_id):
                candidates.append((job_id, path))
        if not candidates:
            return 0
        with self._lock:
            finished = {r[0] for r in self._db.execute("SELECT job_id FROM jobs WHERE state = 'finished'")}
        return sum(
            self._remove(path) for job_id, path in candidates if path.name != job_id or job_id not in finished
        )

    # ------------------------------------------------------------------ lifecycle

    def recover(self, now: float | None = None) -> list[tuple[str, str]]:
        """Mark jobs left queued/running by a previous run as interrupted; returns their
        (job id, client id), oldest first."""
        now = time.time() if now is None else now
        for leftover in self.jobs_dir.glob("*.partial"):
            self._remove(leftover)
        with self._lock:
            ids = [
                (str(r[0]), str(r[1]))
                for r in self._db.execute(
                    "SELECT job_id, client_id FROM jobs WHERE state IN ('queued', 'running') ORDER BY created_at"
                )
            ]
            self._db.execute(
                "UPDATE jobs SET state = 'interrupted', error_code = 'interrupted', "
                "error = 'the backend stopped before this job finished (restart or crash); submit it again', "
                "finished_at = ? WHERE state IN ('queued', 'running')",
                (now,),
            )
        return ids

    def prune(self, max_age_s: float, max_bytes: int, now: float | None = None) -> list[str]:
        """Apply the retention policy (module docstring); returns the deleted job ids."""
        now = time.time() if now is None else now
        final = "('finished', 'failed', 'cancelled', 'interrupted')"
        with self._lock:
            old = [
                r[0]
                for r in self._db.execute(
                    f"SELECT job_id FROM jobs WHERE state IN {final} AND finished_at < ?", (now - max_age_s,)
                )
            ]
            rows = self._db.execute(
                "SELECT job_id, bytes FROM jobs WHERE state = 'finished' AND finished_at >= ? "
                "ORDER BY finished_at ASC",
                (now - max_age_s,),
            ).fetchall()
        total = sum(b for _, b in rows)
        over: list[str] = []
        for job_id, size in rows:
            if total <= max_bytes:
                break
            over.append(job_id)
            total -= size
        removed = old + over
        for job_id in removed:
            self.delete_frames(job_id)  # (one that fails: its folder is left to `sweep`)
        if removed:
            with self._lock:
                self._db.executemany("DELETE FROM jobs WHERE job_id = ?", [(j,) for j in removed])
        return removed


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable on POSIX; directories cannot be opened on Windows.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
