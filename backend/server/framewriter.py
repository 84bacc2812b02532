"""One job's frames, encoded (PNG), stored (fsync'd, one file each) and digested on a
thread pool as the engine hands them over -- while the device still decodes the next
ones -- then committed in one atomic rename.

Each stored batch is reported (`on_stored`) so that the server can stream it to the client
before the job ends; the worker reports the job finished only after `finish()` returned
and the frames are committed.  The frames themselves are checked by the worker
(`check_frame`) as they are handed over and again before `finish()`; a bad one fails the job.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .store import JobStore


@dataclass(frozen=True)
class StoredFrames:
    pngs: list[bytes]
    sha256: list[str]
    bytes: int


class FrameWriter:
    def __init__(
        self,
        store: JobStore,
        job_id: str,
        pool: concurrent.futures.Executor,
        encode: Callable[[np.ndarray, int], bytes],
        compress_level: int,
        on_stored: Callable[[int, list[bytes], list[str]], None] | None = None,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.pool = pool
        self.encode = encode
        self.compress_level = compress_level
        # Called (on an encoder thread) with (start, pngs, digests) once every frame of a
        # handed-over batch is stored, so that the frames can be sent before the job ends.
        self.on_stored = on_stored
        self._partial: Path | None = None
        self._futures: dict[int, concurrent.futures.Future[tuple[bytes, str, int]]] = {}
        # A storage error while the engine runs is kept for finish(): raised inside the
        # engine's call it would look like an engine failure.
        self._storage_error: OSError | None = None

    def add(self, start: int, frames: list[np.ndarray]) -> None:
        """The engine's frame sink: queue frames start..start+len-1 (called on the worker
        thread)."""
        for index, frame in enumerate(frames, start):
            if index in self._futures:
                raise ValueError(f"engine handed over frame {index} twice")
            if self._storage_error is not None:
                return  # finish() reports it
            try:
                self._submit(index, frame)
            except OSError as exc:
                self._storage_error = exc
                return
        if self.on_stored is not None and frames:
            self._report_when_stored(start, [self._futures[i] for i in range(start, start + len(frames))])

    def _report_when_stored(
        self, start: int, futures: list[concurrent.futures.Future[tuple[bytes, str, int]]]
    ) -> None:
        """on_stored(start, pngs, digests) once the last of `futures` is done, unless one
        failed (finish() reports that)."""
        left = [len(futures)]
        lock = threading.Lock()
        report = self.on_stored
        assert report is not None

        def done(_future: concurrent.futures.Future[tuple[bytes, str, int]]) -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            if any(f.cancelled() or f.exception() is not None for f in futures):
                return
            stored = [f.result() for f in futures]
            report(start, [s[0] for s in stored], [s[1] for s in stored])

        for future in futures:
            future.add_done_callback(done)

    def finish(self, frames: list[np.ndarray]) -> StoredFrames:
        """Encode and store whatever was not handed over yet, wait for all of it and
        commit.  Raises OSError when storing failed (the partial folder is removed)."""
        try:
            if self._storage_error is not None:
                raise self._storage_error
            for index, frame in enumerate(frames):
                if index not in self._futures:
                    self._submit(index, frame)
            if sorted(self._futures) != list(range(len(frames))):
                raise ValueError(f"engine handed over frames {sorted(self._futures)[:8]}... for {len(frames)} frames")
            done = [self._futures[i].result() for i in range(len(frames))]
            self.store.commit_frames(self.job_id, self._folder())
        except BaseException:
            self.abort()
            raise
        return StoredFrames([d[0] for d in done], [d[1] for d in done], sum(d[2] for d in done))

    def abort(self) -> None:
        """Wait for queued work (it writes into the partial folder), then remove it."""
        concurrent.futures.wait(list(self._futures.values()))
        if self._partial is not None:
            self.store.discard_frames(self._partial)
            self._partial = None

    def _submit(self, index: int, frame: np.ndarray) -> None:
        self._futures[index] = self.pool.submit(self._one, self._folder(), index, frame)

    def _folder(self) -> Path:
        if self._partial is None:
            self._partial = self.store.begin_frames(self.job_id)
        return self._partial

    def _one(self, folder: Path, index: int, frame: np.ndarray) -> tuple[bytes, str, int]:
        png = self.encode(frame, self.compress_level)
        size = self.store.write_frame(folder, index, png)
        return png, hashlib.sha256(png).hexdigest(), size
