"""The backend's network loop: one ROUTER socket, one thread, never waiting on the GPU.

Threads:

* the **loop** (`Server.serve_forever`) owns the ROUTER socket and the fair queue; it
  answers hello/ping/status/cancel/watch at once, checks requests against the
  limits, and forwards engine events to the connections watching each job;
* the **GPU worker** (`worker.Worker`) runs one job at a time;
* a small **I/O pool** reads stored frames for `fetch`, rescans models and prunes
  old jobs, so that disk work never stalls the loop either.

Other threads hand results to the loop through a `queue.Queue` and wake it with a
byte on an inproc PAIR socket; only the loop touches the ROUTER.

Jobs belong to the `client_id` of the request's envelope header (stable per
installation).  Only that client id can see (status/watch), cancel or fetch a job;
any other gets "not_found", so job ids leak nothing.  The shared HMAC key is the
authentication: a key holder can claim any client id, so without CurveZMQ ownership
separates artists' work, it is not a security boundary between key holders.  With
CurveZMQ a job belongs to the client id *and* the certificate that sent it (libzmq
tells each message's sender key), which no other certificate's holder can claim; the
queue listing then names a job's client by its certificate's file name.

Delivery: events go to the connections that watch a job (the submitting one
automatically).  A vanished connection is dropped from the watchers
(ROUTER_MANDATORY makes that visible instead of silent); after reconnecting, a
client sends `watch` to resume and `fetch` to get finished frames again.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from animatediff_blender import __version__
from animatediff_blender.backend.engine.interface import Engine, EngineError
from animatediff_blender.protocol import auth, messages
from animatediff_blender.protocol.version import PROTOCOL_VERSION
from animatediff_blender.protocol.wire import (
    ENVELOPE_FRAMES,
    MAX_REQUEST_BYTES,
    Header,
    Message,
    Session,
    WireError,
    split_routing,
)

from .config import (
    FRAME_MESSAGE_OVERHEAD,
    MAX_REQUEST_BUFFERS,
    ServerConfig,
    check_bind_policy,
    check_limits,
    lock_data_dir,
)
from .jobqueue import ClientOverLimit, FairQueue, QueueFull
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
    Reply,
    new_job_id,
)
from .limits import check_request
from .pool import DaemonPool
from .store import JobRecord, JobStore
from .worker import Worker

log = logging.getLogger("animatediff_blender.server")
joblog = logging.getLogger("animatediff_blender.server.jobs")

_CLIENT_ID = re.compile(messages.CLIENT_ID_PATTERN)
MAX_RECV_PER_TURN = 200  # then look at engine events again: neither side starves
# What a peer that stops reading can make the server hold: libzmq bounds a peer's queue in
# messages (SNDHWM), not bytes, so frames travel in messages of at most
# FRAMES_MESSAGE_BYTES (one frame at least) and the queue holds SEND_QUEUE_MESSAGES of them:
# ~1 GiB, not 1000 messages of up to --max-message-mb each.  A whole 256-frame 1024x1024
# clip (~100 such messages) still fits, and a client that misses frames fetches them again.
FRAMES_MESSAGE_BYTES = 8 * 2**20
SEND_QUEUE_MESSAGES = 128
# A reply of more messages than the peer's queue holds (a fetch of a clip over ~1 GiB) is
# sent as the peer reads it, not cut off at the full queue; a peer that takes none of it for
# this long is given up on, as one that does not read.
REPLY_STALL_S = 30.0
# Jobs a restart found interrupted get a log line each up to this many; the rest one line
# together, with their clients (at most RESTART_LOG_CLIENTS of them by name).
RESTART_LOG_JOBS = 20
RESTART_LOG_CLIENTS = 10
# A shutdown waits `shutdown_timeout_s` for the engine and the job finisher; its own store
# writes (jobs marked interrupted, the store closed) then get at most this much more, for a
# disk that hangs.  What is still stuck after that is left behind on daemon threads.
SHUTDOWN_GRACE_S = 2.0
STUCK_LOG_JOBS = 20  # jobs named in the line that says what a shutdown left behind
MAX_CLIENT_NAME = 100  # characters of a hello's client name the queue listing shows
MAX_CLIENT_NAMES = 4096  # client names kept for the queue listing (the longest unseen go first)


@dataclasses.dataclass
class _PendingReply:
    """What is left of replies to one peer, sent as its queue drains (in order)."""

    items: collections.deque[tuple[messages.Base, Header | None, list[bytes]]]
    progress_at: float


class _RateLimitedLog:
    """Log refused messages, but at most `per_s` lines a second: a flood of garbage must
    not turn into a flood of log lines.  The skipped count is reported on the next line."""

    def __init__(self, per_s: int = 20) -> None:
        self.per_s = per_s
        self._window = 0.0
        self._count = 0
        self._skipped = 0

    def warning(self, fmt: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._window >= 1.0:
            if self._skipped:
                log.warning("refused %d more messages in the last second (log rate-limited)", self._skipped)
            self._window, self._count, self._skipped = now, 0, 0
        if self._count < self.per_s:
            self._count += 1
            log.warning(fmt, *args)
        else:
            self._skipped += 1


class Server:
    def __init__(self, config: ServerConfig, engine: Engine) -> None:
        check_bind_policy(config)
        check_limits(config.limits)
        self.config = config
        self.engine = engine
        self.limits = config.limits
        # One server per data folder: start-up recovery treats every running job as a crash's.
        self._data_lock = lock_data_dir(config.data_dir)
        try:
            self.store = JobStore(config.data_dir)
        except BaseException:
            self._data_lock.close()
            raise
        self.queue: FairQueue[Job] = FairQueue(self.limits.max_queue, self.limits.max_jobs_per_client)
        self.live: dict[str, Job] = {}  # queued and running jobs
        self.running: Job | None = None
        # owner id (`_client_id`) -> the name its last hello gave, for the queue listing
        # (newest last, bounded)
        self._client_names: collections.OrderedDict[str, str] = collections.OrderedDict()
        # CurveZMQ: the certificates admitted (reloaded every `curve_rescan_s`), and the key
        # fingerprint of the message being handled (None without CurveZMQ, "" if libzmq did
        # not say).  The loop handles one message at a time, so one attribute is enough.
        self._allowed: auth.AllowedClients | None = None
        self._sender_key: str | None = None
        self._last_allowed_check = 0.0
        self.warming_up = True
        self.endpoint = ""  # the bound address (with the real port when bound to :0 or *)
        self.refusals = 0  # messages refused (tests and metrics)
        self.dropped = 0  # messages dropped because their peer did not read (tests and metrics)
        self._pending: dict[bytes, _PendingReply] = {}  # peer -> the rest of its replies
        self._not_reading: dict[bytes, int] = {}  # peer -> messages dropped since it stopped reading
        self._events: queue.Queue[Event] = queue.Queue()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        # Daemon threads: a read or a prune stuck on a hung disk must not hold the exit.
        self._pool = DaemonPool(2, thread_name_prefix="server-io")
        # Rescans apart: one hashing a new multi-GB checkpoint takes minutes, and the rescans
        # asked meanwhile wait for it (one at a time); fetches and pruning must not wait too.
        # Daemon too: a shutdown does not wait minutes for a hash (the next start hashes again).
        self._scan_pool = DaemonPool(1, thread_name_prefix="server-scan")
        self._wake_lock = threading.Lock()
        self._wake_tx: zmq.Socket[bytes] | None = None
        self._refused = _RateLimitedLog()
        self._last_prune = 0.0
        # What a shutdown gave up waiting for, and the jobs that may be left incomplete
        # (job id -> "client=... (what became of it)"), said in one line at the end.
        self._stuck: list[str] = []
        self._incomplete: dict[str, str] = {}
        self._grace_deadline = 0.0
        self.rx = Session(
            config.key,
            max_frames=ENVELOPE_FRAMES + MAX_REQUEST_BUFFERS,
            # Not --max-message-mb, which bounds what the server sends: clients size their
            # requests by the protocol's cap, and a larger one is dropped without an answer.
            max_bytes=MAX_REQUEST_BYTES,
            replay_window_s=config.replay_window_s,
            role="server",
        )
        self.tx = Session(
            config.key,
            client_id="server",
            max_frames=ENVELOPE_FRAMES + self.limits.max_frames_per_message,
            max_bytes=self.limits.max_message_bytes,
            role="server",
        )
        self.tx.session = self.rx.session
        self.worker = Worker(
            engine,
            self.store,
            self._post,
            job_timeout_s=self.limits.job_timeout_s,
            preview_max_px=config.preview_max_px,
            png_compress_level=config.png_compress_level,
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 30.0) -> str:
        """Run the loop in a background thread; returns the bound endpoint once listening."""
        self._thread = threading.Thread(target=self.serve_forever, name="server-loop", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the server did not start listening in time")
        if self._start_error is not None:
            raise self._start_error
        return self.endpoint

    def stop(self, timeout: float | None = None) -> None:
        """Ask the loop to shut down (thread-safe, also from a signal handler) and wait
        for it when it runs in a thread started by `start`."""
        self._stop.set()
        # Wake the loop now rather than at its next poll timeout.  Non-blocking: this may
        # run in a signal handler, interrupting a thread that holds the lock.
        if self._wake_lock.acquire(blocking=False):
            try:
                if self._wake_tx is not None:
                    self._wake_tx.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            finally:
                self._wake_lock.release()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout if timeout is not None else self.config.shutdown_timeout_s + 5)

    def serve_forever(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        authenticator = None
        sock = ctx.socket(zmq.ROUTER)
        wake_rx = ctx.socket(zmq.PAIR)
        try:
            try:
                self._sock = sock
                self._configure(sock)
                if self.config.curve:
                    assert self.config.curve_secret is not None and self.config.curve_allowed_dir is not None
                    self._allowed = auth.AllowedClients(self.config.curve_allowed_dir)
                    authenticator = auth.configure_server_curve(sock, ctx, self.config.curve_secret, self._allowed)
                    self._report_unreadable_certificates()
                    self._last_allowed_check = time.monotonic()
                sock.bind(self.config.bind)
                self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
                wake_addr = f"inproc://wake-{id(self)}"
                wake_rx.bind(wake_addr)
                tx = ctx.socket(zmq.PAIR)
                tx.connect(wake_addr)
                self._wake_tx = tx
                self._recover_and_prune()
                self.worker.start()
            except BaseException as exc:
                self._start_error = exc
                self._ready.set()
                raise
            log.info(
                "listening on %s (engine device: %s, curve: %s, data: %s)",
                self.endpoint,
                self.engine.device_name(),
                "on" if self.config.curve else "off",
                self.config.data_dir,
            )
            self._ready.set()
            self._loop(sock, wake_rx)
        finally:
            self._shutdown(sock)
            with self._wake_lock:
                if self._wake_tx is not None:
                    self._wake_tx.close(linger=0)
                    self._wake_tx = None
            wake_rx.close(linger=0)
            sock.close(linger=self.config.linger_ms)
            if authenticator is not None:
                authenticator.stop()
            ctx.term()
            self._pool.shutdown(wait=False, cancel_futures=True)
            # (the floor: idle threads take a moment to see the end, even after a long wait)
            if not self._pool.join(self._grace_left(floor=0.25)):  # its tasks use the store
                self._stuck.append("the I/O pool (a fetch or a retention pass)")
            # Queued rescans are dropped; one hashing now is left (its hashes are cached
            # only once complete, with one rename, so the next start hashes those files again).
            self._scan_pool.shutdown(wait=False, cancel_futures=True)
            if not self._scan_pool.join(0.25):
                log.info("a model rescan was still reading the models folder; left unfinished")
            if not self.store.close(timeout=self._grace_left(floor=0.25)):
                self._stuck.append("the job store (a write holds it; left open)")
            self._data_lock.close()  # releases the lock
            self._report_stuck()
            log.info("stopped")

    def _configure(self, sock: zmq.Socket[bytes]) -> None:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable -> EHOSTUNREACH, not silence
        # libzmq drops a connection that sends a larger frame; requests are small.
        sock.setsockopt(zmq.MAXMSGSIZE, self.rx.max_bytes)
        sock.setsockopt(zmq.HEARTBEAT_IVL, self.config.heartbeat_ivl_ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, self.config.heartbeat_timeout_ms)
        sock.setsockopt(zmq.HEARTBEAT_TTL, self.config.heartbeat_ttl_ms)
        sock.setsockopt(zmq.LINGER, self.config.linger_ms)
        # Per peer, in messages (see FRAMES_MESSAGE_BYTES).
        sock.setsockopt(zmq.SNDHWM, SEND_QUEUE_MESSAGES)
        sock.setsockopt(zmq.RCVHWM, 1000)

    def _recover_and_prune(self) -> None:
        interrupted = self.store.recover()
        for job_id, client_id in interrupted[:RESTART_LOG_JOBS]:
            joblog.info("job=%s client=%s event=interrupted reason=restart", job_id, client_id)
        rest = collections.Counter(client_id for _job_id, client_id in interrupted[RESTART_LOG_JOBS:])
        if rest:  # thousands after a long queue: one line, not one each
            clients = ",".join(f"{c}({n})" for c, n in rest.most_common(RESTART_LOG_CLIENTS))
            more = len(rest) - RESTART_LOG_CLIENTS
            joblog.info(
                "event=interrupted reason=restart jobs=%d clients=%s%s (jobs beyond the first %d, per client)",
                rest.total(), clients, f" more_clients={more}" if more > 0 else "", RESTART_LOG_JOBS,
            )  # fmt: skip
        # Off the loop: after a long downtime it may delete thousands of frame folders, and
        # clients would wait for answers meanwhile (and blame their key).
        self._last_prune = time.monotonic()
        self._pool.submit(self._prune_safely)

    def _prune(self) -> None:
        self._last_prune = time.monotonic()
        removed = self.store.prune(self.config.retention_hours * 3600.0, self.config.retention_max_bytes)
        if removed:
            log.info("retention: deleted %d old jobs", len(removed))
        # Folders whose delete failed (now or on an earlier pass) go once they can.  Nothing
        # goes once the server stops: the shutdown winds the live jobs up, and empties `live`.
        swept = self.store.sweep(lambda job_id: self._stop.is_set() or job_id in self.live)
        if swept:
            log.info("retention: deleted %d frames folders left behind", swept)

    # ------------------------------------------------------------------ loop

    def _post(self, event: Event) -> None:
        """Called from any thread: queue the event and wake the loop."""
        self._events.put(event)
        with self._wake_lock:
            if self._wake_tx is not None:
                try:
                    self._wake_tx.send(b"", zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # the loop is already awake with a backlog of wake-ups

    def _loop(self, sock: zmq.Socket[bytes], wake_rx: zmq.Socket[bytes]) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(wake_rx, zmq.POLLIN)
        self._sock = sock
        while not self._stop.is_set():
            ready = dict(poller.poll(10 if self._pending else 200))
            self._send_pending()
            if wake_rx in ready:
                try:
                    while True:
                        wake_rx.recv(zmq.NOBLOCK)
                except zmq.Again:
                    pass
            self._drain_events()
            if sock in ready:
                for _ in range(MAX_RECV_PER_TURN):
                    try:
                        if self.config.curve:  # (frames, not bytes: they carry the sender's key)
                            parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        else:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if self.config.curve:
                        self._sender_key = _sender_key(parts[0])
                        frames = [part.bytes for part in parts]
                    self._handle_frames(frames)
            self._dispatch()
            if time.monotonic() - self._last_prune > self.config.retention_interval_s:
                self._last_prune = time.monotonic()
                self._pool.submit(self._prune_safely)
            if self.config.curve and time.monotonic() - self._last_allowed_check > self.config.curve_rescan_s:
                self._last_allowed_check = time.monotonic()
                self._pool.submit(self._reload_allowed_clients)  # (reads a folder: off the loop)

    def _reload_allowed_clients(self) -> None:
        """Admit the client certificates now in the allowed folder, and refuse messages from
        those taken out of it, without a restart (which would interrupt the running job)."""
        assert self._allowed is not None
        before = self._allowed.names
        try:
            if not self._allowed.reload():
                return
        except Exception:
            log.exception("reloading the allowed client certificates failed; keeping those read before")
            return
        names = self._allowed.names
        added = sorted(set(names.values()) - set(before.values()))
        removed = sorted(set(before.values()) - set(names.values()))
        log.info(
            "allowed client certificates: %d (added: %s; removed: %s)",
            len(names), ", ".join(added) or "none", ", ".join(removed) or "none",
        )  # fmt: skip
        self._report_unreadable_certificates()
        if not names:
            log.warning("no client certificates left in %s: every client is refused", self._allowed.folder)

    def _report_unreadable_certificates(self) -> None:
        assert self._allowed is not None
        if self._allowed.unreadable:
            log.warning(
                "not client certificates, left out: %s (in %s)",
                ", ".join(self._allowed.unreadable[:20]), self._allowed.folder,
            )  # fmt: skip

    def _prune_safely(self) -> None:
        try:
            self._prune()
        except Exception:
            log.exception("retention pass failed")

    def _dispatch(self) -> None:
        """Hand the next queued job to the worker if it is idle."""
        if self.running is not None or self._stop.is_set():
            return
        nxt = self.queue.pop()
        if nxt is None:
            return
        job = nxt[1]
        job.state = "running"
        self.running = job
        self.worker.submit(job)

    # ------------------------------------------------------------------ sending

    def _send(
        self,
        identity: bytes,
        content: messages.Base,
        parent: Header | None = None,
        buffers: list[bytes] | None = None,
    ) -> bool:
        outcome = self._try_send(identity, content, parent, buffers)
        if outcome == "again":
            self._drop(identity, content)
        return outcome == "sent"

    def _try_send(
        self, identity: bytes, content: messages.Base, parent: Header | None, buffers: list[bytes] | None
    ) -> str:
        """"sent", "again" (the peer's queue is full) or "failed" (logged; the peer is gone or
        the message cannot be made)."""
        try:
            frames = self.tx.serialize(content, parent=parent, buffers=buffers or ())
        except WireError as exc:
            log.error("cannot send %s: %s", type(content).__name__, exc)
            return "failed"
        try:
            self._sock.send_multipart([identity, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return "again"
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self._forget(identity)
                return "failed"
            raise
        if identity in self._not_reading:
            log.warning(
                "peer=%s reads again; %d messages to it were dropped", identity.hex(), self._not_reading.pop(identity)
            )
        return "sent"

    def _drop(self, identity: bytes, content: messages.Base) -> None:
        self.dropped += 1
        if identity not in self._not_reading:
            self._not_reading[identity] = 0
            log.warning(
                "peer=%s is not reading: dropping messages to it (first: %s) until it reads again",
                identity.hex(), type(content).__name__,
            )  # fmt: skip
        self._not_reading[identity] += 1

    def _reply_all(self, identity: bytes, parent: Header | None, items: list[tuple[messages.Base, list[bytes]]]) -> None:
        """Send a reply of several messages; what the peer's queue cannot take now waits (in
        order, behind what already waits for that peer) and goes as the peer reads."""
        pending = self._pending.get(identity)
        if pending is None:
            pending = self._pending[identity] = _PendingReply(collections.deque(), time.monotonic())
        elif any(buffers for _c, buffers in items) and any(buffers for _c, _p, buffers in pending.items):
            # Frames wait for this peer already: it is not keeping up.  One clip at most is held
            # for it beyond its queue (a peer that fetches and never reads must not pile them up).
            for content, _buffers in items:
                self._drop(identity, content)
            return
        pending.items.extend((content, parent, buffers) for content, buffers in items)
        self._send_pending_to(identity)

    def _send_pending(self) -> None:
        for identity in list(self._pending):
            self._send_pending_to(identity)

    def _send_pending_to(self, identity: bytes) -> None:
        pending = self._pending.get(identity)
        while pending is not None and pending.items:
            content, parent, buffers = pending.items[0]
            outcome = self._try_send(identity, content, parent, buffers)
            if outcome == "again":
                if time.monotonic() - pending.progress_at < REPLY_STALL_S:
                    return  # the next loop turn tries again
                for content, _parent, _buffers in pending.items:
                    self._drop(identity, content)
                break
            if outcome == "failed" and identity not in self._pending:
                return  # the peer is gone (`_forget`)
            pending.items.popleft()
            pending.progress_at = time.monotonic()
        self._pending.pop(identity, None)

    def _forget(self, identity: bytes) -> None:
        """The connection is gone: stop sending it events."""
        self._not_reading.pop(identity, None)
        self._pending.pop(identity, None)
        for job in self.live.values():
            job.watchers.discard(identity)

    def _broadcast(self, job: Job, content: messages.Base, buffers: list[bytes] | None = None) -> None:
        for identity in list(job.watchers):
            self._send(identity, content, buffers=buffers)

    def _stream(
        self, job: Job, first: int, pngs: list[bytes], digests: list[str], total: int, width: int, height: int
    ) -> None:
        """Broadcast frames first..first+len-1 of `total` (once each)."""
        for content, buffers in self._frames_messages(job.job_id, pngs, digests, width, height, first, total):
            self._broadcast(job, content, buffers)
        job.streamed.update(range(first, first + len(pngs)))

    def _frames_messages(
        self, job_id: str, pngs: list[bytes], digests: list[str], width: int, height: int,
        first: int = 0, total: int | None = None,
    ) -> list[tuple[messages.Base, list[bytes]]]:  # fmt: skip
        """Split frames first..first+len-1 of a clip of `total` (default: these frames) into
        Frames messages within the frame-count and byte caps."""
        out: list[tuple[messages.Base, list[bytes]]] = []
        budget = min(self.limits.max_message_bytes - FRAME_MESSAGE_OVERHEAD, FRAMES_MESSAGE_BYTES)
        total = len(pngs) if total is None else total
        start = 0
        while start < len(pngs):
            end, size = start, 0
            while (
                end < len(pngs)
                and end - start < self.limits.max_frames_per_message
                and (end == start or size + len(pngs[end]) <= budget)
            ):
                size += len(pngs[end])
                end += 1
            out.append(
                (
                    messages.Frames(
                        job_id=job_id,
                        start=first + start,
                        count=end - start,
                        total=total,
                        width=width,
                        height=height,
                        sha256=digests[start:end],
                    ),
                    pngs[start:end],
                )
            )
            start = end
        return out

    # ------------------------------------------------------------------ engine events

    def _drain_events(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            try:
                self._on_event(event)
            except Exception:
                log.exception("error while handling %s", type(event).__name__)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Reply):
            self._reply_all(event.identity, event.parent, event.items)
            return
        if isinstance(event, EngineReady):
            self.warming_up = False
            return
        job = self.live.get(event.job_id)
        if job is None:
            return
        if isinstance(event, DeviceFree):
            # Its frames are still being encoded and stored (the job stays live and
            # "running"); the device can start the next job meanwhile.
            if self.running is job:
                self.running = None
            return
        if isinstance(event, JobStarted):
            self._log(job, "started", steps=job.settings.steps)
        elif isinstance(event, JobProgress):
            progress = messages.Progress(
                job_id=job.job_id,
                step=event.step,
                total_steps=event.total_steps,
                elapsed_s=round(event.elapsed_s, 3),
                remaining_s=round(event.remaining_s, 3),
                has_preview=event.preview_png is not None,
                phase=event.phase,
            )
            self._broadcast(job, progress, [event.preview_png] if event.preview_png is not None else None)
        elif isinstance(event, FramesStored):
            # Stored while the device decodes the rest: sent now, not after the last frame.
            s = job.settings
            self._stream(job, event.start, event.pngs, event.sha256, s.frames, s.width, s.height)
        elif isinstance(event, JobDone):
            self._finish(job)
            f = event.finished
            # Whatever was not streamed yet (the batch stored last, frames the engine
            # returned without handing them over); late watchers fetch the rest.
            left = [i for i in range(len(event.pngs)) if i not in job.streamed]
            for start, end in _runs(left):
                self._stream(job, start, event.pngs[start:end], event.sha256[start:end], len(event.pngs),
                             f.width, f.height)  # fmt: skip
            self._broadcast(job, f)
            self._log(job, "finished", frames=f.frames, elapsed_s=f"{f.elapsed_s:.2f}")
        elif isinstance(event, JobEnded):
            self._finish(job)
            if event.state == "cancelled":
                self._broadcast(job, messages.Cancelled(job_id=job.job_id, by=job.cancelled_by))
            else:
                self._broadcast(
                    job, messages.Failed(job_id=job.job_id, code=event.code, message=event.message)
                )
            self._log(job, event.state, code=event.code, error=event.message)

    def _finish(self, job: Job) -> None:
        self.live.pop(job.job_id, None)
        if self.running is job:
            self.running = None

    def _log(self, job: Job, event: str, **fields: object) -> None:
        extra = "".join(f" {k}={_logval(v)}" for k, v in fields.items() if v is not None)
        joblog.info("job=%s client=%s event=%s%s", job.job_id, job.client_id, event, extra)

    # ------------------------------------------------------------------ requests

    def _refuse(self, identity: bytes | None, exc: WireError) -> None:
        self.refusals += 1
        peer = identity.hex() if identity else "?"
        client = exc.header.client_id if exc.header is not None else "?"
        self._refused.warning(
            "refused message peer=%s client=%s code=%s: %s", peer, client, exc.code, exc.message
        )
        if identity:
            self._send(identity, exc.to_error(), parent=exc.header)

    def _handle_frames(self, frames: list[bytes]) -> None:
        # A ROUTER always prepends exactly one identity frame for a directly connected
        # peer; do not search for it (a peer may choose an identity that looks like
        # the delimiter).
        if len(frames) < 2:
            return
        identity, rest = frames[0], frames[1:]
        try:
            extra, body = split_routing(rest)
            if extra:
                raise WireError("bad_message", "unexpected frames before the delimiter")
            msg = self.rx.deserialize(body)
        except WireError as exc:
            self._refuse(identity, exc)
            return
        except Exception:  # never let one message take the server down
            log.exception("unexpected error while decoding a message from peer=%s", identity.hex())
            self._send(
                identity, messages.Error(code="bad_message", message="the message could not be decoded")
            )
            return
        try:
            self._handle(identity, msg)
        except WireError as exc:
            self._refuse(identity, exc)
        except (sqlite3.Error, OSError) as exc:  # the job store (a submit's record): disk full?
            log.error("could not store %s from peer=%s: %s: %s", msg.msg_type, identity.hex(), type(exc).__name__, exc)
            self._send(
                identity,
                messages.Error(code="storage", message=f"the backend could not store this request (is its disk full?): {exc}"),
                msg.header,
            )
        except Exception:
            log.exception("error while handling %s from peer=%s", msg.msg_type, identity.hex())
            self._send(
                identity,
                messages.Error(code="internal", message="the backend failed to handle this request"),
                msg.header,
            )

    def _handle(self, identity: bytes, msg: Message) -> None:
        if self._allowed is not None and self._sender_key not in self._allowed.names:
            # Its certificate was taken out of the allowed folder after it connected (libzmq
            # checks certificates only when a connection is made), or libzmq did not say.
            raise WireError(
                "unauthorized",
                "this client's CurveZMQ certificate is no longer allowed on the backend: ask whoever "
                "runs it for a new one (`animatediff-blender keys --curve --client NAME`)",
                header=msg.header,
            )
        handler = self._handlers.get(type(msg.content))
        if handler is None:
            raise WireError(
                "bad_message", f"{msg.msg_type!r} is not a request a client can send", header=msg.header
            )
        handler(self, identity, msg, msg.content)

    def _client_id(self, msg: Message) -> str:
        """Who owns what this message asks about: its header's client id, and with
        CurveZMQ also the certificate that sent it (`<client id>#<key fingerprint>`), so
        that a holder of another certificate cannot see, cancel or fetch the job by
        claiming the same client id."""
        client_id = msg.header.client_id
        if not _CLIENT_ID.match(client_id):
            raise WireError(
                "bad_message",
                "the header's client_id must be 1-64 characters of A-Z a-z 0-9 . _ : @ -",
                [messages.FieldError(field="$header.client_id", message="invalid client id")],
                header=msg.header,
            )
        return self._owner(client_id)

    def _owner(self, client_id: str) -> str:
        # (`_handle` refused messages without a known certificate)
        return client_id if self._sender_key is None else f"{client_id}#{self._sender_key}"

    def _admin_name(self) -> str:
        """The sender's certificate name if it is one of `--admin-client`'s, else ""."""
        if self._allowed is None or not self._sender_key:
            return ""
        name = self._allowed.names.get(self._sender_key, "")
        return name if name in self.config.admin_clients else ""

    def _shown_name(self, owner: str) -> str:
        """The queue listing's name for an owner id: with CurveZMQ its certificate's name
        first (the part no client can claim), then what its hello said."""
        claimed = self._client_names.get(owner, "")
        client_id, _, key = owner.partition("#")
        if not key:
            return claimed or f"client {client_id[:8]}"
        names = self._allowed.names if self._allowed is not None else {}
        certificate = names.get(key, f"key {key[:8]}")
        return f"{certificate}: {claimed}" if claimed else certificate

    def _reply(
        self, identity: bytes, msg: Message, content: messages.Base, buffers: list[bytes] | None = None
    ) -> None:
        self._send(identity, content, msg.header, buffers)

    def _on_hello(self, identity: bytes, msg: Message, hello: messages.Hello) -> None:
        # The name is free text of any length: a megabyte of it must not become a log line.
        certificate = ""
        if self._allowed is not None and self._sender_key:
            certificate = f" certificate={self._allowed.names.get(self._sender_key, self._sender_key)}"
        log.info("hello peer=%s client=%s%s name=%r", identity.hex(), hello.client_id, certificate,
                 hello.client_name[:200])  # fmt: skip
        if _CLIENT_ID.match(hello.client_id):
            self._remember_name(self._owner(hello.client_id), hello.client_name)
        self._reply(
            identity,
            msg,
            messages.Welcome(
                protocol_version=PROTOCOL_VERSION,
                server_version=__version__,
                capabilities=list(self.engine.capabilities()),
                limits=self.limits,
                models=list(self.engine.list_models()),
                device=self.engine.device_name(),
                warming_up=self.warming_up,
                defaults=dict(self.engine.default_models()),
                admin=self._admin_name() != "",
            ),
        )

    def _on_ping(self, identity: bytes, msg: Message, ping: messages.Ping) -> None:
        self._reply(
            identity,
            msg,
            messages.Pong(
                nonce=ping.nonce,
                server_time=time.time(),
                running_job=self.running.job_id if self.running else "",
                queued=len(self.queue),
            ),
        )

    def _remember_name(self, client_id: str, name: str) -> None:
        # Shown to other clients: printable characters only, one line, not a megabyte.
        shown = " ".join("".join(c if c.isprintable() else " " for c in name[:MAX_CLIENT_NAME]).split())
        self._client_names.pop(client_id, None)
        self._client_names[client_id] = shown
        while len(self._client_names) > MAX_CLIENT_NAMES:
            self._client_names.popitem(last=False)

    def _on_list_jobs(self, identity: bytes, msg: Message, req: messages.ListJobs) -> None:
        asking = self._client_id(msg)
        running = sorted((j for j in self.live.values() if j.state == "running"),
                         key=lambda j: j is not self.running)  # the one on the device first
        queued = [self.live[job_id] for job_id in self.queue.order() if job_id in self.live]
        listed = []
        admin = self._admin_name() != ""
        for position, job in [(0, j) for j in running] + list(enumerate(queued, start=1)):
            mine = job.client_id == asking
            shown = mine or admin
            listed.append(
                messages.QueuedJob(
                    position=position,
                    state="running" if position == 0 else "queued",
                    client=job.client_name,
                    mine=mine,
                    job_id=job.job_id if shown else "",
                    client_tag=job.client_tag if shown else "",
                    frames=job.settings.frames,
                    width=job.settings.width,
                    height=job.settings.height,
                    step=job.step,
                    total_steps=job.total_steps or job.settings.steps or 0,
                    created_at=job.created_at,
                    started_at=job.started_at,
                )
            )
        clients = len({j.client_id for j in running + queued})
        self._reply(identity, msg, messages.JobList(jobs=listed, clients=clients))

    def _on_list_models(self, identity: bytes, msg: Message, req: messages.ListModels) -> None:
        if not req.rescan:
            self._reply(identity, msg, messages.Models(models=list(self.engine.list_models())))
            return

        def rescan() -> None:  # reads the models folder: off the loop
            try:
                items: list[tuple[messages.Base, list[bytes]]] = [
                    (messages.Models(models=list(self.engine.list_models(rescan=True))), [])
                ]
            except Exception as exc:
                log.exception("model rescan failed")
                items = [(messages.Error(code="internal", message=f"model rescan failed: {exc}"), [])]
            self._post(Reply(identity, msg.header, items))

        self._scan_pool.submit(rescan)

    def _on_submit(self, identity: bytes, msg: Message, submit: messages.Submit) -> None:
        client_id = self._client_id(msg)
        if submit.submit_id:
            existing = self.store.find_submit(client_id, submit.submit_id)
            if existing is not None:
                self._repeat_submit(identity, msg, existing)
                return
        errors = check_request(submit.request, self.limits)
        if errors:
            self._reply_limit(identity, msg, errors)
            return
        try:
            settings = self.engine.resolve(submit.request)
        except EngineError as exc:
            fields = [messages.FieldError(field=exc.field, message=exc.message)] if exc.field else []
            joblog.info("client=%s event=refused code=%s reason=%s", client_id, exc.code, _logval(exc.message[:300]))
            self._reply(identity, msg, messages.Error(code=exc.code, message=exc.message, fields=fields))
            return
        errors = check_request(settings, self.limits)  # preset defaults must obey the limits too
        if errors:
            self._reply_limit(identity, msg, errors)
            return
        job = Job(
            job_id=new_job_id(),
            client_id=client_id,
            settings=settings,
            client_tag=submit.client_tag,
            created_at=time.time(),
            client_name=self._shown_name(client_id),
            total_steps=settings.steps or 0,
        )
        # Its running jobs: the one on the device and one whose frames are still being
        # stored (live and "running" for its client, though the device runs the next job).
        running_own = sum(1 for j in self.live.values() if j.client_id == client_id and j.state == "running")
        try:
            self.queue.push(client_id, job.job_id, job, already_running=running_own)
        except (QueueFull, ClientOverLimit) as exc:
            self._reply(identity, msg, messages.Error(code="busy", message=str(exc)))
            joblog.info("client=%s event=refused code=busy reason=%s", client_id, _logval(str(exc)))
            return
        try:
            self.store.create(
                JobRecord(
                    job_id=job.job_id,
                    client_id=client_id,
                    state="queued",
                    request=msgspec.json.encode(submit.request).decode(),
                    client_tag=submit.client_tag,
                    created_at=job.created_at,
                    total_steps=job.total_steps,
                    submit_id=submit.submit_id or None,
                )
            )
        except Exception:
            self.queue.remove(job.job_id)
            raise
        job.watchers.add(identity)
        self.live[job.job_id] = job
        self._dispatch()
        position = self._queue_position(job)
        self._reply(identity, msg, messages.Accepted(job_id=job.job_id, queue_position=position))
        self._log(
            job,
            "queued",
            position=position,
            frames=settings.frames,
            size=f"{settings.width}x{settings.height}",
            steps=settings.steps,
            **({"submit_id": submit.submit_id} if submit.submit_id else {}),
        )

    def _queue_position(self, job: Job) -> int:
        """0 while it runs, its place in line while queued (1: next), -1 when neither (ending)."""
        return 0 if job.state == "running" else self.queue.position(job.job_id)

    def _repeat_submit(self, identity: bytes, msg: Message, job_id: str) -> None:
        """A submit this client made before (its Accepted was lost): the same job, nothing new,
        and no limits apply (it is not a new job).  This connection watches it from now on."""
        job = self.live.get(job_id)
        if job is not None:
            job.watchers.add(identity)
            # (-1, neither queued nor running: ending now; like a job already over, 0)
            position = max(0, self._queue_position(job))
        else:
            position = 0  # already over: the client learns how by watching it
        self._reply(identity, msg, messages.Accepted(job_id=job_id, queue_position=position))
        joblog.info(
            "job=%s client=%s event=submit_repeated state=%s",
            job_id, self._client_id(msg), job.state if job is not None else "ended",
        )  # fmt: skip

    def _reply_limit(self, identity: bytes, msg: Message, errors: list[messages.FieldError]) -> None:
        text = "; ".join(f"{e.field} {e.message}" for e in errors)
        # Like a busy refusal: the operator sees why an artist's submit made no job.
        joblog.info("client=%s event=refused code=limit reason=%s", msg.header.client_id, _logval(text[:300]))
        self._reply(
            identity,
            msg,
            messages.Error(code="limit", message=f"request exceeds limits: {text}", fields=errors),
        )

    def _owned(self, msg: Message, job_id: str, admin: bool = False) -> tuple[Job | None, JobRecord | None]:
        """The live job or stored record of `job_id` if it belongs to the sender (or, with
        `admin`, to anyone, if the sender's certificate is an admin's)."""
        client_id = self._client_id(msg)
        anyone = admin and self._admin_name() != ""
        job = self.live.get(job_id)
        if job is not None:
            return (job, None) if anyone or job.client_id == client_id else (None, None)
        record = self.store.get(job_id)
        if record is None or not (anyone or record.client_id == client_id):
            return None, None
        if record.state in ("queued", "running"):
            # Every queued or running job is live; this one ended but its end could not be
            # stored (disk full?).  Said so, rather than "running" until the next restart.
            record = dataclasses.replace(
                record,
                state="failed",
                error_code="storage",
                error="the backend could not record how this job ended (is its disk full?); submit it again",
            )
        return None, record

    def _not_found(self, identity: bytes, msg: Message, job_id: str) -> None:
        self._reply(
            identity,
            msg,
            messages.Error(
                code="not_found",
                message=f"no job {job_id} for this client (unknown, someone else's, or expired)",
            ),
        )

    def _status(self, job: Job | None, record: JobRecord | None) -> messages.JobStatus:
        if job is not None:
            return messages.JobStatus(
                job_id=job.job_id,
                state=job.state,  # type: ignore[arg-type]
                queue_position=self._queue_position(job),
                step=job.step,
                total_steps=job.total_steps,
                frames=job.settings.frames,
                client_tag=job.client_tag,
                created_at=job.created_at,
            )
        assert record is not None
        return messages.JobStatus(
            job_id=record.job_id,
            state=record.state,  # type: ignore[arg-type]
            step=record.total_steps if record.state == "finished" else 0,
            total_steps=record.total_steps,
            frames=record.frames,
            error_code=record.error_code,
            error=record.error,
            client_tag=record.client_tag,
            created_at=record.created_at,
            finished_at=record.finished_at,
        )

    def _on_status(self, identity: bytes, msg: Message, req: messages.Status) -> None:
        job, record = self._owned(msg, req.job_id, admin=True)
        if job is None and record is None:
            self._not_found(identity, msg, req.job_id)
            return
        self._reply(identity, msg, self._status(job, record))

    def _on_watch(self, identity: bytes, msg: Message, req: messages.Watch) -> None:
        statuses = []
        for job_id in dict.fromkeys(req.job_ids):
            job, record = self._owned(msg, job_id, admin=True)
            if job is not None:
                job.watchers.add(identity)
            if job is None and record is None:
                statuses.append(
                    messages.JobStatus(
                        job_id=job_id, state="failed", error_code="not_found", error="no such job"
                    )
                )
            else:
                statuses.append(self._status(job, record))
        self._reply(identity, msg, messages.Statuses(statuses=statuses))

    def _on_cancel(self, identity: bytes, msg: Message, req: messages.Cancel) -> None:
        job, record = self._owned(msg, req.job_id, admin=True)
        if job is None and record is None:
            self._not_found(identity, msg, req.job_id)
            return
        if record is not None:  # already final: nothing to do
            self._reply(identity, msg, messages.CancelReply(job_id=req.job_id, state=record.state))  # type: ignore[arg-type]
            return
        assert job is not None
        job.watchers.add(identity)
        if job.client_id != self._client_id(msg):  # an admin's cancel: the artist is told who
            job.cancelled_by = self._admin_name()
        if job.state == "queued":
            # Stored first: a cancel that cannot be stored (disk full) fails and the job stays
            # queued, rather than out of the queue yet "queued" for ever.
            self.store.update(
                job.job_id,
                state="cancelled",
                error_code="cancelled",
                error=f"cancelled by {job.cancelled_by} (admin)" if job.cancelled_by else "cancelled by the client",
                finished_at=time.time(),
            )
            self.queue.remove(job.job_id)
            self.live.pop(job.job_id, None)
            self._reply(identity, msg, messages.CancelReply(job_id=job.job_id, state="cancelled"))
            self._broadcast(job, messages.Cancelled(job_id=job.job_id, by=job.cancelled_by))
            self._log(job, "cancelled", was="queued", by=job.cancelled_by or None)
        else:
            # The engine stops at its next step check; the Cancelled event follows.
            job.cancel.set()
            self._reply(identity, msg, messages.CancelReply(job_id=job.job_id, state="running"))
            self._log(job, "cancel_requested", by=job.cancelled_by or None)

    def _on_fetch(self, identity: bytes, msg: Message, req: messages.Fetch) -> None:
        job, record = self._owned(msg, req.job_id)
        if job is None and record is None:
            self._not_found(identity, msg, req.job_id)
            return
        if job is not None:
            self._reply(
                identity,
                msg,
                messages.Error(
                    code="not_ready", message=f"job {req.job_id} is still {job.state}; watch it for events"
                ),
            )
            return
        assert record is not None
        if record.state != "finished":
            self._reply(
                identity,
                msg,
                messages.Error(
                    code=record.error_code or record.state, message=record.error or f"job {record.state}"
                ),
            )
            return

        def read() -> None:  # disk reads and hashing: off the loop
            import hashlib

            try:
                pngs = self.store.load_frames(record.job_id, record.frames)
                settings = msgspec.json.decode(record.settings, type=messages.GenerateRequest)
            except (OSError, msgspec.MsgspecError) as exc:
                log.error("job=%s event=fetch_failed error=%r", record.job_id, exc)
                self._post(
                    Reply(
                        identity,
                        msg.header,
                        [
                            (
                                messages.Error(
                                    code="not_found", message="the job's frames are no longer stored"
                                ),
                                [],
                            )
                        ],
                    )
                )
                return
            digests = [hashlib.sha256(p).hexdigest() for p in pngs]
            items = self._frames_messages(record.job_id, pngs, digests, record.width, record.height)
            items.append(
                (
                    messages.Finished(
                        job_id=record.job_id,
                        frames=record.frames,
                        width=record.width,
                        height=record.height,
                        seed=record.seed,
                        elapsed_s=record.elapsed_s,
                        settings=settings,
                    ),
                    [],
                )
            )
            self._post(Reply(identity, msg.header, items))

        self._pool.submit(read)

    _handlers: dict[type[messages.Base], Callable[..., None]] = {
        messages.Hello: _on_hello,
        messages.Ping: _on_ping,
        messages.ListModels: _on_list_models,
        messages.Submit: _on_submit,
        messages.Status: _on_status,
        messages.Watch: _on_watch,
        messages.Cancel: _on_cancel,
        messages.Fetch: _on_fetch,
        messages.ListJobs: _on_list_jobs,
    }

    # ------------------------------------------------------------------ shutdown

    def _shutdown(self, sock: zmq.Socket[bytes]) -> None:
        """Cancel the running job (reported as interrupted), mark queued jobs interrupted.
        Waits `shutdown_timeout_s` for the worker, then SHUTDOWN_GRACE_S at most for its own
        store writes; what is stuck then (an engine, an encoder, a disk that hangs) is left
        to itself on daemon threads and named in one line (`_report_stuck`)."""
        running = self.running
        if running is not None:
            running.interrupt = True
            running.cancel.set()
        busy = self.worker.stop(self.config.shutdown_timeout_s) if self.worker._thread.is_alive() else ""
        if busy:
            self._stuck.append(busy)
        self._grace_deadline = time.monotonic() + SHUTDOWN_GRACE_S
        self._drain_events()  # the worker's last words (finished or interrupted)
        claimed: list[Job] = []
        for job in list(self.live.values()):
            if job.state != "queued" and not busy:
                continue
            # A job the worker still holds (a stuck engine, frames still being stored) is
            # claimed here: once claimed the worker leaves the job alone, and one the worker
            # ended first is reported as it ended (its event is drained below).
            if not job.end_lock.acquire(timeout=self._grace_left()):
                # The worker holds it while it stores the job's end, on a disk that hangs.
                self._stuck.append(f"the job store (writing job={job.job_id}'s end)")
                self._incomplete[job.job_id] = f"client={job.client_id} (its end was being stored)"
                continue
            try:
                if job.ended:
                    continue
                job.ended = True
            finally:
                job.end_lock.release()
            claimed.append(job)
            if busy and job.state != "queued":  # what the stuck work holds
                self._incomplete[job.job_id] = f"client={job.client_id} (interrupted, left to the stuck work)"
        stored: set[str] = set()

        def mark_interrupted() -> None:
            now = time.time()
            for job in claimed:
                try:
                    self.store.update(
                        job.job_id,
                        state="interrupted",
                        error_code="interrupted",
                        error="the backend shut down before this job finished; submit it again",
                        finished_at=now,
                    )
                    stored.add(job.job_id)
                except Exception as exc:
                    log.error("job=%s event=store_error error=%r", job.job_id, exc)

        if claimed:  # on a thread of its own: a disk that hangs must not hold the shutdown
            marker = threading.Thread(target=mark_interrupted, name="shutdown-store", daemon=True)
            marker.start()
            marker.join(self._grace_left())
            if marker.is_alive():
                self._stuck.append("the job store (marking jobs interrupted)")
        for job in claimed:
            if job.job_id not in stored:  # (recovery marks it interrupted at the next start)
                self._incomplete[job.job_id] = f"client={job.client_id} (its interruption not stored)"
            self._broadcast(
                job,
                messages.Failed(job_id=job.job_id, code="interrupted", message="the backend shut down"),
            )
            self._log(job, "interrupted", reason="shutdown")
        self._drain_events()  # ends the worker stored while the jobs above were marked
        self.live.clear()

    def _grace_left(self, floor: float = 0.0) -> float:
        return max(floor, self._grace_deadline - time.monotonic())

    def _report_stuck(self) -> None:
        """One line for what the shutdown left running, and the jobs that may be incomplete."""
        if not self._stuck:
            return
        jobs = [f"job={job_id} {what}" for job_id, what in self._incomplete.items()]
        if len(jobs) > STUCK_LOG_JOBS:
            jobs[STUCK_LOG_JOBS:] = [f"and {len(jobs) - STUCK_LOG_JOBS} more"]
        log.warning(
            "shutdown: gave up after the %g s shutdown timeout on: %s; exiting without waiting for it. Jobs "
            "that may be left incomplete (the next start marks any whose end is not stored as interrupted): %s",
            self.config.shutdown_timeout_s, "; ".join(dict.fromkeys(self._stuck)), ", ".join(jobs) or "none",
        )  # fmt: skip


def _sender_key(frame: zmq.Frame) -> str:
    """The fingerprint of the CurveZMQ certificate that sent `frame` ("" if libzmq does not
    say: the message is refused rather than owned by nobody in particular)."""
    try:
        user_id = frame.get("User-Id")
    except zmq.ZMQError:
        return ""
    return auth.key_fingerprint(user_id) if isinstance(user_id, str) and user_id else ""


def _logval(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n'):
        return msgspec.json.encode(text).decode()
    return text


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted indices as [start, end) runs of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs
