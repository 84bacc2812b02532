"""`BackendClient`: the one client of the backend, used by the CLI (`generate`), the
Blender add-on's worker thread and batch scripts.

One thread owns a client (ZeroMQ sockets are not thread-safe).  Requests and
asynchronous job events share one DEALER socket: a request waits for the message
whose parent header names it, and every event that arrives meanwhile is queued for
`poll`.  `run_job` is the blocking path for batch use: it survives a backend that
stops answering by reconnecting with back-off and re-subscribing to its job.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import zmq

from . import auth, messages
from .endpoints import connect_problem
from .messages import (
    Accepted,
    Cancel,
    Cancelled,
    CancelReply,
    Failed,
    Fetch,
    FieldError,
    Finished,
    Frames,
    GenerateRequest,
    Hello,
    JobStatus,
    ListModels,
    ModelInfo,
    Models,
    Ping,
    Pong,
    Status,
    Statuses,
    Submit,
    Watch,
    Welcome,
)
from .version import PROTOCOL_VERSION, parse_version
from .wire import ENVELOPE_FRAMES, MAX_REQUEST_BYTES, Header, Message, Session, WireError, split_routing

__all__ = ["BackendClient", "ClientConfig", "ClientError", "Event", "JobResult", "EVENT_TYPES"]

log = logging.getLogger(__name__)

EVENT_TYPES = frozenset({"progress", "frames", "finished", "failed", "cancelled"})
DEFAULT_ADDRESS = "tcp://127.0.0.1:5557"
_MAX_QUEUED_EVENTS = 4096

T = TypeVar("T", bound=messages.Base)
R = TypeVar("R")


def client_name(program: str) -> str:
    """`program` and who runs it where ("blender 4.5.15 anna@ws-12"): the name a hello
    gives, which the server's queue listing shows to everyone sharing the backend."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # no USER/LOGNAME and no password entry (a container)
        user = ""
    host = socket.gethostname().split(".")[0]
    who = f"{user}@{host}" if user else host
    return f"{program} {who}".strip()


@dataclass
class ClientConfig:
    address: str = DEFAULT_ADDRESS
    key_file: Path | None = None  # None: auth.default_key_path()
    server_public_key_file: Path | None = None  # CurveZMQ: the server's `.key`
    client_secret_key_file: Path | None = None  # CurveZMQ: this client's `.key_secret`
    timeout_s: float = 10.0  # per request
    client_id: str = ""  # "": the stable id kept in the config dir
    client_name: str = ""
    key: bytes | None = None  # the key itself, instead of key_file (the add-on's preferences)
    heartbeat_s: float = 5.0  # run_job checks on its job after this much silence
    reconnect_give_up_s: float = 120.0  # run_job gives up after the backend is gone this long


class ClientError(Exception):
    """A request that did not succeed.  `code` is the server's `Error.code`, a wire error
    code, or one of "timeout", "connection", "auth", "protocol", "corrupt", "cancelled",
    "unsupported"."""

    def __init__(self, code: str, message: str, fields: Sequence[FieldError] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields: list[FieldError] = list(fields)
        # run_job: the job's verified frames (index -> PNG) that arrived before the error.
        # The backend deletes a failed or interrupted job's frames, so these may be the only copy.
        self.frames: dict[int, bytes] = {}
        self.job_id = ""  # run_job / wait_job: the job it was about

    def __str__(self) -> str:
        if not self.fields:
            return self.message
        if all(f.field in self.message and f.message in self.message for f in self.fields):
            return self.message  # (the server's "request exceeds limits: $.request.width must be...")
        details = "; ".join(f"{f.field}: {f.message}" for f in self.fields)
        return f"{self.message} ({details})"


@dataclass
class Event:
    """An asynchronous message from the server: progress, frames, finished, failed, cancelled."""

    msg_type: str
    content: messages.Base
    buffers: list[bytes] = field(default_factory=list)

    @property
    def job_id(self) -> str:
        return str(getattr(self.content, "job_id", ""))


@dataclass
class JobResult:
    job_id: str
    finished: Finished
    frames: list[bytes]  # encoded images (PNG), in order


class _FrameCollector:
    """Frames of one job from `Frames` messages, checked against their sha256."""

    def __init__(self, job_id: str, frames: dict[int, bytes] | None = None) -> None:
        self.job_id = job_id
        self.frames: dict[int, bytes] = {} if frames is None else frames
        self.total = -1

    def add(self, content: Frames, buffers: list[bytes]) -> None:
        if content.count != len(buffers):
            raise ClientError(
                "corrupt",
                f"frames message of job {self.job_id} announces {content.count} images, holds {len(buffers)}",
            )
        if content.sha256 and len(content.sha256) != len(buffers):
            raise ClientError(
                "corrupt", f"frames message of job {self.job_id} has {len(content.sha256)} digests"
            )
        for i, data in enumerate(buffers):
            if content.sha256 and hashlib.sha256(data).hexdigest() != content.sha256[i]:
                raise ClientError(
                    "corrupt", f"frame {content.start + i} of job {self.job_id} fails its sha256 check"
                )
            self.frames[content.start + i] = data
        self.total = content.total

    def complete(self, count: int) -> bool:
        return all(i in self.frames for i in range(count))

    def ordered(self, count: int) -> list[bytes]:
        return [self.frames[i] for i in range(count)]


class BackendClient:
    def __init__(self, config: ClientConfig | None = None, context: zmq.Context | None = None) -> None:  # type: ignore[type-arg]
        self.config = config or ClientConfig()
        self._own_context = context is None
        self._context: zmq.Context = context or zmq.Context()  # type: ignore[type-arg]
        self._socket: zmq.Socket | None = None  # type: ignore[type-arg]
        self._poller = zmq.Poller()
        self._session: Session | None = None
        self._events: collections.deque[Event] = collections.deque(maxlen=_MAX_QUEUED_EVENTS)
        self.welcome: Welcome | None = None
        self.client_id = self.config.client_id or auth.default_client_id()

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> BackendClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._socket is not None and self.welcome is not None

    def _load_key(self) -> bytes:
        if self.config.key:
            return self.config.key
        try:
            return auth.load_key(self.config.key_file)
        except auth.AuthError as exc:
            raise ClientError("auth", str(exc)) from None

    def _configure(self, sock: zmq.Socket[Any]) -> None:
        """Options, CurveZMQ and the connect of a new socket; ClientError when it cannot be used."""
        assert self._session is not None
        sock.setsockopt(zmq.LINGER, 200)  # never block close() on unsent requests
        sock.setsockopt(zmq.MAXMSGSIZE, self._session.max_bytes)  # per frame, enforced by libzmq
        sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
        sock.setsockopt(zmq.HEARTBEAT_TTL, 10000)
        sock.setsockopt(zmq.RECONNECT_IVL, 250)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        cfg = self.config
        if not isinstance(cfg.address, str):
            raise ClientError(
                "connection", f"the backend address must be text such as tcp://gpu-box:5557, not {cfg.address!r}"
            )
        if cfg.server_public_key_file or cfg.client_secret_key_file:
            if not (cfg.server_public_key_file and cfg.client_secret_key_file):
                raise ClientError(
                    "auth",
                    "CurveZMQ needs both the server's public key (--server-key) and this client's "
                    "secret key (--client-secret)",
                )
            try:
                auth.configure_client_curve(sock, cfg.client_secret_key_file, cfg.server_public_key_file)
            except auth.AuthError as exc:
                raise ClientError("auth", str(exc)) from None
        problem = connect_problem(cfg.address)
        if problem is not None:
            raise ClientError("connection", f"cannot connect to {cfg.address!r}: {problem}")
        try:
            sock.connect(cfg.address)
        except zmq.ZMQError as exc:
            raise ClientError("connection", f"cannot connect to {cfg.address!r}: {exc}") from None

    def _open_socket(self) -> None:
        self._close_socket()
        if self._context.closed:
            raise ClientError("connection", "this client was closed; create a new BackendClient")
        if self._session is None:
            self._session = Session(self._load_key(), client_id=self.client_id, role="client")
        sock = self._context.socket(zmq.DEALER)
        try:
            self._configure(sock)
        except BaseException:
            sock.close(0)  # a socket left open would hang the context's term() in close() for ever
            raise
        self._socket = sock
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)

    def _close_socket(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        self.welcome = None

    def connect(self) -> Welcome:
        """Open the connection and shake hands.  Safe to call again to reconnect."""
        self._open_socket()
        hello = Hello(
            client_id=self.client_id, client_name=self.config.client_name, protocol_version=PROTOCOL_VERSION
        )
        try:
            welcome = self._call(hello, Welcome)
        except ClientError:
            self._close_socket()  # drop the queued hello
            raise
        assert self._session is not None and self._socket is not None
        # Accept what the server announces it sends in one message.
        self._session.max_bytes = max(self._session.max_bytes, welcome.limits.max_message_bytes)
        self._session.max_frames = max(
            self._session.max_frames, welcome.limits.max_frames_per_message + ENVELOPE_FRAMES
        )
        if int(self._socket.getsockopt(zmq.MAXMSGSIZE)) < self._session.max_bytes:
            # libzmq applies MAXMSGSIZE to a connection as it is made: this one would be dropped
            # at the first frame larger than it.  Once more, with the size announced (once:
            # the session keeps it).
            return self.connect()
        self.welcome = welcome
        return welcome

    def close(self) -> None:
        self._close_socket()
        if self._own_context:
            self._context.term()
            self._own_context = False

    # ------------------------------------------------------------------ plumbing

    def _send(self, content: messages.Base) -> Header:
        if self._socket is None or self._session is None:
            raise ClientError("connection", "not connected: call connect() first")
        header, frames = self._session.serialize_message(content)
        size = sum(len(f) for f in frames)
        if size > MAX_REQUEST_BYTES:
            # The backend would drop the connection without a word: say why here.
            raise ClientError(
                "too_large",
                f"this {header.msg_type} request is {size / 2**20:.1f} MiB, over the backend's limit of "
                f"{MAX_REQUEST_BYTES / 2**20:g} MiB: is a prompt, tag or list far longer than allowed?",
            )
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            raise ClientError(
                "connection", f"cannot send to {self.config.address}: send queue full"
            ) from None
        return header

    def _receive(self, timeout_s: float) -> Message | None:
        """One validated message, or None if nothing arrived in time.  Messages that fail
        validation are dropped (a newer server's unknown event types, say), except those
        that mean the two sides cannot talk: a wrong key or a different major version."""
        assert self._socket is not None and self._session is not None
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not self._poller.poll(remaining_ms):
                return None
            frames = self._socket.recv_multipart()
            try:
                _, body = split_routing(frames)
                return self._session.deserialize(body)
            except WireError as exc:
                if exc.code == "bad_signature":
                    raise ClientError(
                        "bad_signature",
                        f"the backend at {self.config.address} signs with a different key: copy its "
                        "hmac.key to this machine (or point --key-file / the add-on preferences at it)",
                    ) from None
                if exc.code == "version":
                    raise ClientError("version", exc.message) from None
                if exc.code == "replay" and "clock" in exc.message:
                    # Every message would fail the same way: say so instead of timing out.
                    raise ClientError(
                        "replay",
                        f"the backend's clock is off: {exc.message}".replace("message is", "its message is"),
                    ) from None
                log.warning("dropped a message from the backend: %s", exc)
            if time.monotonic() >= deadline:
                return None

    def _queue_event(self, msg: Message) -> None:
        if msg.msg_type in EVENT_TYPES:
            self._events.append(Event(msg.msg_type, msg.content, msg.buffers))
        else:
            log.debug("dropped an unexpected %s message (late reply?)", msg.msg_type)

    def _replies(self, request: Header, timeout_s: float) -> Message:
        """The next message answering `request`; events arriving meanwhile are queued.
        The timeout restarts with each answer (multi-part replies such as fetch)."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            msg = self._receive(remaining) if remaining > 0 else None
            if msg is None:
                raise ClientError(
                    "timeout",
                    f"No answer from backend at {self.config.address} within {timeout_s:g} s: is it running "
                    "(`animatediff-blender serve`) and is the address right? If it is, check that both "
                    "sides use the same key file"
                    + (" and CurveZMQ certificates" if self._curve
                       else ", and whether the backend needs CurveZMQ (then give this client its server.key "
                       "and a client .key_secret)")
                    + ".",
                )
            if msg.parent is not None and msg.parent.msg_id == request.msg_id:
                if isinstance(msg.content, messages.Error):
                    raise ClientError(msg.content.code, msg.content.message, msg.content.fields)
                return msg
            self._queue_event(msg)

    @property
    def _curve(self) -> bool:
        return bool(self.config.server_public_key_file)

    def _call(self, content: messages.Base, expect: type[T], timeout_s: float | None = None) -> T:
        header = self._send(content)
        msg = self._replies(header, self.config.timeout_s if timeout_s is None else timeout_s)
        return _expect(msg, expect)

    def _ensure_connected(self) -> None:
        if not self.connected:
            self.connect()

    # ------------------------------------------------------------------ requests

    def list_models(self, rescan: bool = False, timeout_s: float | None = None) -> list[ModelInfo]:
        """The server's models; `rescan` reads its models folder again first (files added or
        replaced: a new checkpoint is hashed, so give a longer `timeout_s`)."""
        self._ensure_connected()
        return self._call(ListModels(rescan=rescan), Models, timeout_s).models

    def submit(
        self,
        request: GenerateRequest,
        client_tag: str = "",
        submit_id: str | None = None,
        *,
        retry: bool = False,
        cancel: threading.Event | None = None,
        deadline: float | None = None,
    ) -> Accepted:
        """Queue a job.  `submit_id` (32 lowercase hex; None: a fresh one) makes the submit
        idempotent: sent again with the same id after its Accepted was lost (a timeout), it
        gets the job the first one made, not a second job (a server older than submit ids
        ignores it and makes a second job).  `retry`: do that here -- reconnect with back-off
        and send it again until the backend answers, `reconnect_give_up_s` passes or the
        `deadline` (monotonic) -- instead of raising "timeout"/"connection" at once."""
        submit = Submit(request=request, client_tag=client_tag,
                        submit_id=uuid.uuid4().hex if submit_id is None else submit_id)  # fmt: skip

        def send() -> Accepted:
            self._ensure_connected()
            return self._call(submit, Accepted)

        # A resend is a new message (new header and message id): the wire's replay check passes it.
        return self._guarded(send, "", cancel, deadline=deadline) if retry else send()

    def cancel(self, job_id: str) -> CancelReply:
        self._ensure_connected()
        return self._call(Cancel(job_id=job_id), CancelReply)

    def status(self, job_id: str) -> JobStatus:
        self._ensure_connected()
        return self._call(Status(job_id=job_id), JobStatus)

    def watch(self, job_ids: Sequence[str]) -> list[JobStatus]:
        """(Re)subscribe this connection to the events of these jobs."""
        self._ensure_connected()
        return self._call(Watch(job_ids=list(job_ids)), Statuses).statuses

    def list_jobs(self) -> messages.JobList:
        """The server's queue: the running job(s) first, then the waiting ones in the order it
        will run them; other clients' jobs without their ids (protocol 1.2)."""
        self._ensure_connected()
        assert self.welcome is not None
        try:
            too_old = parse_version(self.welcome.protocol_version) < (1, 2)
        except ValueError:
            too_old = True
        if too_old:
            raise ClientError(
                "unsupported",
                f"this backend (server {self.welcome.server_version or '?'}, protocol "
                f"{self.welcome.protocol_version or '?'}) cannot list its queue: update it (protocol 1.2)",
            )
        return self._call(messages.ListJobs(), messages.JobList)

    def ping(self) -> Pong:
        self._ensure_connected()
        return self._call(Ping(nonce=str(time.monotonic())), Pong)

    def fetch(self, job_id: str) -> JobResult:
        """The stored frames of a finished job: `Frames` messages, then `Finished`."""
        self._ensure_connected()
        header = self._send(Fetch(job_id=job_id))
        collector = _FrameCollector(job_id)
        while True:
            msg = self._replies(header, self.config.timeout_s)
            if isinstance(msg.content, Frames):
                collector.add(msg.content, msg.buffers)
            elif isinstance(msg.content, Finished):
                return _result(collector, msg.content)
            else:
                raise ClientError("protocol", f"unexpected {msg.msg_type} in answer to fetch")

    def poll(self, timeout_s: float) -> Event | None:
        """The next asynchronous event, waiting up to `timeout_s`; None if none came."""
        if self._events:
            return self._events.popleft()
        if self._socket is None:
            raise ClientError("connection", "not connected: call connect() first")
        deadline = time.monotonic() + timeout_s
        while True:
            msg = self._receive(max(0.0, deadline - time.monotonic()))
            if msg is None:
                return None
            self._queue_event(msg)
            if self._events:
                return self._events.popleft()

    # ------------------------------------------------------------------ blocking job

    def run_job(
        self,
        request: GenerateRequest,
        *,
        client_tag: str = "",
        on_event: Callable[[Event], None] | None = None,
        cancel: threading.Event | None = None,
        timeout_s: float | None = None,
        received: dict[int, bytes] | None = None,
        on_status: Callable[[JobStatus], None] | None = None,
    ) -> JobResult:
        """Submit a job and block until its frames are here.  Raises ClientError on failure
        (the job's own `code`), on cancellation ("cancelled"), or when the backend stays
        unreachable for `reconnect_give_up_s` ("connection") — the job id is in the message
        so that it can be fetched later.  With `timeout_s`, a job still running after that
        long is cancelled and "timeout" raised.  The error's `frames` hold the frames that
        arrived before it; `received`, when given, is filled with them as they arrive (checked):
        what a caller keeps when it is interrupted (KeyboardInterrupt carries no frames).
        `on_status` hears the job's state and place in the queue: once accepted, then each
        time the client checks on a quiet job (a queued one sends no events).

        A submit that gets no answer is sent again (reconnecting with back-off, as for a lost
        backend) with the same submit id: if the first one did reach the backend, its job is
        the one collected, never a second job."""
        self._ensure_connected()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        accepted = self.submit(request, client_tag=client_tag, retry=True, cancel=cancel, deadline=deadline)
        if on_status is not None:
            position = accepted.queue_position  # 0: running, else its place in line (1: next)
            on_status(JobStatus(job_id=accepted.job_id, state="running" if position == 0 else "queued",
                                queue_position=position))  # fmt: skip
        return self.wait_job(accepted.job_id, on_event=on_event, cancel=cancel, timeout_s=timeout_s,
                             received=received, on_status=on_status, _watched=True)  # fmt: skip

    def wait_job(
        self,
        job_id: str,
        *,
        on_event: Callable[[Event], None] | None = None,
        cancel: threading.Event | None = None,
        timeout_s: float | None = None,
        received: dict[int, bytes] | None = None,
        on_status: Callable[[JobStatus], None] | None = None,
        _watched: bool = False,
    ) -> JobResult:
        """Block until a job submitted earlier by this client id (another process, a lost
        connection) has its frames here: what `run_job` does after submitting, with the same
        errors ("not_found" for a job this client id does not own)."""
        self._ensure_connected()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        collector = _FrameCollector(job_id, received)
        cancel_sent = False
        # Not yet watching (a job of an earlier connection): ask for its state at once.
        last_heard = time.monotonic() if _watched else -math.inf
        other_events: list[Event] = []

        def give_up_cancelled() -> ClientError:
            return ClientError("cancelled", f"job {job_id} was cancelled")

        try:
            while True:
                if cancel is not None and cancel.is_set() and not cancel_sent:
                    cancel_sent = True
                    reply = self._guarded(lambda: self.cancel(job_id), job_id, cancel)
                    if reply is not None and reply.state == "cancelled":
                        raise give_up_cancelled()
                if deadline is not None and time.monotonic() > deadline:
                    outcome = (
                        "it was cancelled"
                        if self._try_cancel(job_id)
                        # The cancel may still reach it later (it sits in a socket buffer).
                        else f"the backend at {self.config.address} did not confirm the cancel, so it may still run there"
                    )
                    raise ClientError("timeout", f"job {job_id} did not finish within {timeout_s:g} s; {outcome}")
                event = self._next_event(0.1)
                if event is None:
                    if time.monotonic() - last_heard > self.config.heartbeat_s:
                        # Silence: ask for the job (re-subscribing this connection, which
                        # also covers a reconnect that gave us a new identity).
                        try:
                            statuses = self._guarded(
                                lambda: self.watch([job_id]), job_id, cancel, deadline=deadline
                            )
                        except ClientError as exc:
                            if exc.code != "cancelled" or cancel_sent:
                                raise
                            continue  # cancelled while the backend was quiet: send the cancel first
                        last_heard = time.monotonic()
                        if statuses:
                            if on_status is not None:
                                on_status(statuses[0])
                            done = self._settle(statuses[0], collector, cancel)
                            if done is not None:
                                return done
                    continue
                if event.job_id != job_id:
                    other_events.append(event)
                    continue
                last_heard = time.monotonic()
                if on_event is not None:
                    on_event(event)
                content = event.content
                if isinstance(content, Frames):
                    collector.add(content, event.buffers)
                elif isinstance(content, Finished):
                    if collector.complete(content.frames):
                        return _result(collector, content)
                    # Frames went missing (a reconnect in between): get them all again.
                    return self._guarded_fetch(job_id, cancel)
                elif isinstance(content, Failed):
                    raise ClientError(content.code, f"job {job_id} failed: {content.message}")
                elif isinstance(content, Cancelled):
                    raise give_up_cancelled()
        except ClientError as exc:
            if not exc.frames:
                exc.frames = dict(collector.frames)
            exc.job_id = exc.job_id or job_id
            raise
        finally:
            # Events of other jobs stay available to poll().
            self._events.extend(other_events)

    def _next_event(self, timeout_s: float) -> Event | None:
        try:
            return self.poll(timeout_s)
        except ClientError as exc:
            if exc.code == "connection":
                return None
            raise

    def _settle(
        self, status: JobStatus, collector: _FrameCollector, cancel: threading.Event | None
    ) -> JobResult | None:
        """React to a polled status: finished -> fetch, failed/cancelled -> raise."""
        if status.state == "finished":
            return self._guarded_fetch(status.job_id, cancel)
        if status.state in ("failed", "interrupted"):
            code = status.error_code or status.state
            raise ClientError(code, f"job {status.job_id} {status.state}: {status.error or 'no details'}")
        if status.state == "cancelled":
            raise ClientError("cancelled", f"job {status.job_id} was cancelled")
        return None

    def _guarded_fetch(self, job_id: str, cancel: threading.Event | None = None) -> JobResult:
        result = self._guarded(lambda: self.fetch(job_id), job_id, cancel)
        assert result is not None
        return result

    def _guarded(
        self,
        call: Callable[[], R],
        job_id: str,
        cancel: threading.Event | None = None,
        deadline: float | None = None,
    ) -> R:
        """Run a request; if the backend does not answer, reconnect with back-off and retry
        until it does or `reconnect_give_up_s` passes (or the job's `deadline`, a monotonic
        time: run_job's `timeout_s` holds while the backend is gone too).  Once `cancel` is
        set, a backend that does not answer ends the wait at once: the user asked to stop.
        `job_id` "": the request is the job's submit (its id not known yet)."""
        give_up = time.monotonic() + self.config.reconnect_give_up_s
        if job_id:
            job, later = f"job {job_id}", "(cancel or fetch it later by its id)"
        else:  # a submit that may have reached the backend without its answer coming back
            job, later = "the job", "(its id did not reach this client)"
        delay = 0.5
        while True:
            try:
                if not self.connected:
                    self.connect()
                return call()
            except ClientError as exc:
                if exc.code not in ("timeout", "connection"):
                    raise
                self._close_socket()
                if cancel is not None and cancel.is_set():
                    raise ClientError(
                        "cancelled",
                        f"cancelled {job}, but the backend at {self.config.address} did not answer; "
                        f"the job may still run there {later}",
                    ) from None
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise ClientError(
                        "timeout",
                        f"{job} ran out of time while the backend at {self.config.address} did not "
                        f"answer; it may still run there {later}",
                    ) from None
                log.warning("backend not answering (%s); reconnecting", exc.message)
                if time.monotonic() + delay > give_up:
                    raise ClientError(
                        "connection",
                        f"lost the backend at {self.config.address} for over "
                        f"{self.config.reconnect_give_up_s:g} s; {job} may still finish there"
                        + (": fetch it later by its id" if job_id else f" {later}"),
                    ) from None
                if cancel is not None:
                    cancel.wait(delay)  # a cancel during the back-off ends it
                else:
                    time.sleep(delay)
                delay = min(delay * 2, 8.0)

    def _try_cancel(self, job_id: str) -> bool:
        """Cancel without raising; False when the backend did not take the cancel."""
        try:
            self.cancel(job_id)
        except ClientError as exc:
            log.warning("could not cancel job %s: %s", job_id, exc)
            return False
        return True


def _expect(msg: Message, expect: type[T]) -> T:
    if not isinstance(msg.content, expect):
        raise ClientError("protocol", f"expected {expect.__name__} from the backend, got {msg.msg_type}")
    return msg.content


def _result(collector: _FrameCollector, finished: Finished) -> JobResult:
    if not collector.complete(finished.frames):
        missing = [i for i in range(finished.frames) if i not in collector.frames]
        raise ClientError(
            "corrupt",
            f"job {finished.job_id} finished with {finished.frames} frames but frames {missing[:8]} are missing",
        )
    return JobResult(job_id=finished.job_id, finished=finished, frames=collector.ordered(finished.frames))
