"""Helpers shared by the server tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import msgspec
import zmq

from animatediff_blender.protocol import messages
from animatediff_blender.protocol.messages import GenerateRequest
from animatediff_blender.protocol.wire import DELIMITER, Message, Session

if TYPE_CHECKING:
    from animatediff_blender.backend.server.server import Server
    from animatediff_blender.protocol.client import BackendClient, Event

KEY = secrets.token_hex(32).encode()


def small_request(prompt: str = "a cat", **kw: Any) -> GenerateRequest:
    """Tiny and quick: 64x64, 4 frames, 3 steps."""
    fields: dict[str, Any] = {"width": 64, "height": 64, "frames": 4, "steps": 3, "seed": 1}
    fields.update(kw)
    return GenerateRequest(prompt=prompt, **fields)


def wait_for(client: BackendClient, job_id: str, kinds: tuple[type, ...], timeout_s: float = 10) -> Event:
    """The next event of `job_id` whose content is one of `kinds`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        event = client.poll(0.1)
        if event is not None and event.job_id == job_id and isinstance(event.content, kinds):
            return event
    raise AssertionError(f"no {kinds} event for job {job_id} within {timeout_s} s")


def wait_state(server: Server, job_id: str, state: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = server.store.get(job_id)
        if record is not None and record.state == state:
            return
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not reach {state}")


class RawPeer:
    """A bare DEALER for malformed-input tests: sends any frames, decodes replies."""

    def __init__(
        self, address: str, key: bytes = KEY, client_id: str = "raw-peer", sockopts: dict[int, int] | None = None
    ) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        for option, value in (sockopts or {}).items():  # before connecting: they shape the pipe
            self.sock.setsockopt(option, value)
        self.sock.connect(address)
        self.session = Session(key, client_id=client_id, role="client")
        self.session.max_frames = 4 + 256
        self.session.max_bytes = 64 * 1024 * 1024

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def signed(self, content: messages.Base, buffers: list[bytes] | None = None) -> list[bytes]:
        return self.session.serialize(content, buffers=buffers or [])

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout_s: float = 5.0) -> Message:
        if not self.sock.poll(int(timeout_s * 1000)):
            raise TimeoutError("no reply from the server")
        return self.session.deserialize(self.sock.recv_multipart())

    def recv_error(self, timeout_s: float = 5.0) -> messages.Error:
        msg = self.recv(timeout_s)
        assert isinstance(msg.content, messages.Error), msg
        return msg.content

    def request(self, content: messages.Base, timeout_s: float = 5.0) -> Message:
        self.send(self.signed(content))
        return self.recv(timeout_s)

    def ping(self, timeout_s: float = 5.0) -> messages.Pong:
        reply = self.request(messages.Ping(nonce="check"), timeout_s)
        assert isinstance(reply.content, messages.Pong), reply
        return reply.content

    def sign_raw(
        self, header: bytes, parent: bytes, content: bytes, buffers: list[bytes] | None = None
    ) -> list[bytes]:
        """Frames with a valid signature over arbitrary header/parent/content bytes."""
        body = [header, parent, content, *(buffers or [])]
        return [DELIMITER, self.session.signer.sign(body), *body]

    def header_bytes(self, msg_type: str, **override: Any) -> bytes:
        header = self.session.new_header(msg_type)
        doc = msgspec.to_builtins(header)
        doc.update(override)
        return msgspec.json.encode(doc)


@contextlib.contextmanager
def job_log_records() -> Iterator[list[logging.LogRecord]]:
    """The records written to the job log meanwhile (a handler on the job log itself: the
    server's thread writes them, whatever the root logger holds)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    joblog = logging.getLogger("animatediff_blender.server.jobs")
    level = joblog.level
    joblog.addHandler(handler)
    joblog.setLevel(logging.INFO)
    try:
        yield records
    finally:
        joblog.removeHandler(handler)
        joblog.setLevel(level)
