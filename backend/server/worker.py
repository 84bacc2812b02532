"""The single GPU worker thread: runs one job at a time through the engine; a
finisher thread then waits for the frames to be encoded and stored, persists the job's
final state, and tells the network loop.

CPU work overlaps GPU work twice over: frames are PNG-encoded and stored on a pool
(`FrameWriter`) as the engine hands them over, while it still decodes the next ones;
and as soon as the engine returns job N, the worker posts `DeviceFree` and the loop
hands it job N+1 while the finisher still completes job N.  The loop hands a job over only when the device is free, so the inbox
never holds more than one job.  Every outcome is stored before the loop hears of it: a
client is never told "finished" about frames that a crash could still lose.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable

import msgspec
import numpy as np

from animatediff_blender.backend.engine.interface import (
    Engine,
    EngineError,
    GenerationResult,
    JobCancelled,
    StepProgress,
)
from animatediff_blender.protocol import messages

from .config import PNG_COMPRESS_LEVEL
from .framewriter import FrameWriter
from .images import check_frame, encode_png, encode_preview
from .jobs import (
    DeviceFree,
    EngineReady,
    Event,
    FramesStored,
    Job,
    JobDone,
    JobEnded,
    JobProgress,
    JobStarted,
)
from .pool import DaemonPool
from .store import JobStore

log = logging.getLogger("animatediff_blender.server.worker")
MAX_ERROR_CHARS = 1000  # of a failure message sent to clients and stored with the job


class Worker:
    def __init__(
        self,
        engine: Engine,
        store: JobStore,
        post: Callable[[Event], None],
        job_timeout_s: float,
        preview_max_px: int = 256,
        png_compress_level: int = PNG_COMPRESS_LEVEL,
    ) -> None:
        self.engine = engine
        self.store = store
        self.post = post  # thread-safe: queue + wake the loop
        self.job_timeout_s = job_timeout_s
        self.preview_max_px = preview_max_px
        self.png_compress_level = png_compress_level
        # Replaceable in tests (a slow encoder shows the overlap).
        self.encode: Callable[[np.ndarray, int], bytes] = encode_png
        self._inbox: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="gpu-worker", daemon=True)
        # One finisher keeps jobs finishing in order; the pool encodes one job's frames in
        # parallel (Pillow's zlib releases the GIL).  Frames arrive while the device decodes,
        # when the engine's thread mostly waits on it: a core is left to it only where there
        # are cores to spare (on 2 cores, 2 encoders cut a 16-frame clip's tail by half).
        # Daemon threads: one stuck for good (an encoder, a disk that hangs) must not keep the
        # process from exiting once the shutdown gave up on it.
        self._finisher = DaemonPool(1, thread_name_prefix="job-finisher")
        self._encoders = DaemonPool(max(2, min(8, (os.cpu_count() or 2) - 1)), thread_name_prefix="png-encoder")
        # What the finisher waits on now, for a shutdown that gives up on it to name.
        self.finishing = ""

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._inbox.put(job)

    def stop(self, timeout: float) -> str:
        """Ask the thread to exit after the current job and the finisher to store what it
        holds; "" if both did within `timeout`, else what is still busy (left to itself, on
        daemon threads)."""
        deadline = time.monotonic() + timeout
        self._inbox.put(None)
        if self._thread.is_alive() or self._thread.ident is not None:
            self._thread.join(timeout)
        if self._thread.is_alive():
            return "the engine"
        done = threading.Event()
        self._finisher.submit(done.set)  # runs after every job queued before it
        ok = done.wait(max(0.0, deadline - time.monotonic()))
        self._finisher.shutdown(wait=ok)
        self._encoders.shutdown(wait=ok)
        return "" if ok else self.finishing or "the job finisher"

    # ------------------------------------------------------------------ thread

    def _run(self) -> None:
        warm_up = getattr(self.engine, "warm_up", None)
        # An engine that defers compiling (AnimateDiffEngine with the fast path) compiles
        # only while no job waits: a job arriving during warm-up runs at once (eagerly), the
        # shapes left compile once the device is idle again.
        warm_pending = getattr(self.engine, "warm_pending", None)

        def job_waiting() -> bool:
            return not self._inbox.empty()

        ready = True
        if callable(warm_up):
            try:
                if callable(warm_pending):
                    ready = warm_up(should_yield=job_waiting) is not False
                else:
                    warm_up()
            except EngineError as exc:  # no models yet, a broken default: said in words, no traceback
                log.warning("engine warm-up skipped (%s): %s; jobs will load models on demand", exc.code, exc.message)
            except Exception:
                log.exception("engine warm-up failed; jobs will load models on demand")
        if ready:
            self.post(EngineReady())
        while True:
            if callable(warm_pending) and not job_waiting() and getattr(self.engine, "pending_warm_ups", 0) > 0:
                try:
                    done = warm_pending(job_waiting)
                except Exception:
                    log.exception("compiling while idle failed; jobs run eagerly")
                    warm_pending, done = None, True
                if done and not ready:
                    ready = True
                    self.post(EngineReady())
                continue
            job = self._inbox.get()
            if job is None:
                return
            try:
                self._run_job(job)
            except Exception:  # pragma: no cover - _run_job reports its own failures
                log.exception("job=%s event=worker_error", job.job_id)
                self._end(job, "failed", "internal", "the backend hit an unexpected error")

    def _run_job(self, job: Job) -> None:
        job.started_at = time.time()
        start = time.monotonic()
        job.deadline = start + self.job_timeout_s
        try:
            self.store.update(job.job_id, state="running", started_at=job.started_at)
        except (sqlite3.Error, OSError) as exc:  # disk full: an expected trouble, said in words
            log.error("job=%s event=store_error at=start error=%s", job.job_id, exc)
            self._end(job, "failed", "storage", f"could not record the job's start (is the disk full?): {exc}")
            return
        self.post(JobStarted(job.job_id))

        def should_cancel() -> bool:
            if job.cancel.is_set():
                return True
            if time.monotonic() > job.deadline:
                job.timed_out = True
                return True
            return False

        def progress(p: StepProgress) -> None:
            if p.total_steps > 0:  # "loading" reports 0/0: keep the known total
                job.step, job.total_steps = p.step, p.total_steps
            elapsed = time.monotonic() - start
            remaining = (
                elapsed / p.step * (p.total_steps - p.step) if p.step > 0 and p.phase == "denoise" else -1.0
            )
            preview: bytes | None = None
            if p.preview is not None:
                try:
                    preview = encode_preview(p.preview, self.preview_max_px)
                except Exception as exc:  # a bad preview must not fail the job
                    log.warning("job=%s event=bad_preview error=%r", job.job_id, exc)
            self.post(JobProgress(job.job_id, p.step, p.total_steps, elapsed, remaining, p.phase, preview))

        def stored(start: int, pngs: list[bytes], digests: list[str]) -> None:
            self.post(FramesStored(job.job_id, start, pngs, digests))

        def sink(start: int, frames: list[np.ndarray]) -> None:
            for frame in frames:  # checked before anything of it is stored or sent
                check_frame(frame, job.settings.width, job.settings.height)
            writer.add(start, frames)

        writer = FrameWriter(
            self.store, job.job_id, self._encoders, self.encode, self.png_compress_level, on_stored=stored
        )
        try:
            try:
                result = self.engine.generate(job.settings, progress, should_cancel, on_frames=sink)
                settings = result.settings
                for frame in result.frames:
                    check_frame(frame, settings.width, settings.height)
                if not result.frames:
                    raise ValueError("engine returned no frames")
            except BaseException:
                writer.abort()  # frames already handed over are not kept
                raise
        except JobCancelled:
            if job.interrupt:
                self._end(
                    job, "interrupted", "interrupted", "the backend shut down while the job was running"
                )
            elif job.timed_out:
                self._timeout(job)
            else:
                self._end(job, "cancelled", "cancelled", _cancelled_text(job))
            return
        except EngineError as exc:
            self._end(job, "failed", exc.code, exc.message)
            return
        except Exception as exc:
            if job.ended:  # reported interrupted by a shutdown that could not wait for the engine
                log.info("job=%s event=ended_after_shutdown error=%r", job.job_id, exc)
                return
            log.exception("job=%s client=%s event=engine_exception", job.job_id, job.client_id)
            self._end(job, "failed", "internal", f"the engine failed: {type(exc).__name__}: {exc}")
            return
        if job.timed_out or time.monotonic() > job.deadline:
            writer.abort()
            self._timeout(job)
            return
        if job.ended:  # reported interrupted by a shutdown that could not wait for the engine
            writer.abort()
            return
        # The device is free: the rest of encoding and storing happens on the finisher
        # thread while the loop hands this worker the next job.
        self._finisher.submit(self._finish_safely, job, result, start, writer)
        self.post(DeviceFree(job.job_id))

    def _finish_safely(self, job: Job, result: GenerationResult, start: float, writer: FrameWriter) -> None:
        try:
            self._finish_or_fail(job, result, start, writer)
        finally:
            self.finishing = ""

    def _finish_or_fail(self, job: Job, result: GenerationResult, start: float, writer: FrameWriter) -> None:
        try:
            try:
                self._finish(job, result, start, writer)
            except Exception:
                if not job.ended:
                    raise
                # Reported interrupted by a shutdown that gave up waiting for it, and that may
                # have closed the store meanwhile: expected, no traceback.
                writer.abort()
                log.info("job=%s event=frames_discarded reason=reported_interrupted_at_shutdown", job.job_id)
        except (sqlite3.Error, OSError) as exc:  # the job store: its frames are stored, its end is not
            # Disk full, say: one line, no traceback.  The committed frames belong to a job no
            # one can fetch (its row never says finished): freed now, on a disk that is full.
            log.error("job=%s event=store_error at=finish error=%s", job.job_id, exc)
            self.store.delete_frames(job.job_id)
            self._end(job, "failed", "storage", f"could not record the finished job (is the disk full?): {exc}")
        except Exception as exc:
            log.exception("job=%s event=finish_error", job.job_id)
            self._end(job, "failed", "internal", f"could not encode the frames: {type(exc).__name__}: {exc}")

    def _finish(self, job: Job, result: GenerationResult, start: float, writer: FrameWriter) -> None:
        settings = result.settings
        if job.ended:  # the shutdown reported it interrupted meanwhile: nothing left to store
            writer.abort()
            return
        self.finishing = f"the frame encoders (encoding and writing job={job.job_id}'s frames)"
        try:
            stored = writer.finish(result.frames)
        except OSError as exc:
            self._end(job, "failed", "storage", f"could not store the frames: {exc}")
            return
        pngs, size = stored.pngs, stored.bytes
        elapsed = time.monotonic() - start
        finished = messages.Finished(
            job_id=job.job_id,
            frames=len(pngs),
            width=settings.width,
            height=settings.height,
            seed=settings.seed,
            elapsed_s=elapsed,
            settings=settings,
        )
        with job.end_lock:
            if job.ended:
                # The shutdown gave up waiting and reported the job interrupted (stored so): the
                # frames committed since then belong to no job a client will fetch.
                self.store.delete_frames(job.job_id)
                log.info("job=%s event=frames_discarded reason=reported_interrupted_at_shutdown", job.job_id)
                return
            self.finishing = f"the job store (writing job={job.job_id}'s end)"
            self.store.update(
                job.job_id,
                state="finished",
                settings=msgspec.json.encode(settings).decode(),
                finished_at=time.time(),
                frames=len(pngs),
                width=settings.width,
                height=settings.height,
                seed=settings.seed,
                elapsed_s=elapsed,
                total_steps=job.total_steps,
                bytes=size,
            )
            job.ended = True
            self.post(JobDone(job.job_id, pngs, stored.sha256, finished))

    def _timeout(self, job: Job) -> None:
        self._end(
            job,
            "failed",
            "timeout",
            f"the job ran longer than the server's limit of {self.job_timeout_s:g} s",
        )

    def _end(self, job: Job, state: str, code: str, message: str) -> None:
        if len(message) > MAX_ERROR_CHARS:
            # e.g. torch's size mismatch per tensor of a LoRA made for another model: the
            # artist gets the start of it, the log all of it.
            log.warning("job=%s event=failed code=%s message=%s", job.job_id, code, message)
            cut = len(message) - MAX_ERROR_CHARS
            message = f"{message[:MAX_ERROR_CHARS]}... ({cut} more characters in the server log)"
        with job.end_lock:
            if job.ended:  # reported (and stored) interrupted by a shutdown that could not wait
                log.info("job=%s event=ended_after_shutdown state=%s code=%s (reported interrupted)",
                         job.job_id, state, code)
                return
            try:
                self.store.update(
                    job.job_id, state=state, error_code=code, error=message, finished_at=time.time()
                )
            except (sqlite3.Error, OSError) as exc:  # disk full: said in words, no traceback
                log.error("job=%s event=store_error at=end state=%s error=%s", job.job_id, state, exc)
            except Exception:
                log.exception("job=%s event=store_error", job.job_id)
            job.ended = True
            self.post(JobEnded(job.job_id, state, code, message))


def _cancelled_text(job: Job) -> str:
    return f"cancelled by {job.cancelled_by} (admin)" if job.cancelled_by else "cancelled by the client"
