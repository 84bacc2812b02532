"""The signed envelope around every message (docs/PROTOCOL.md has the full spec).

Frames of one message, after any ROUTER identities::

    b"<ADB|MSG>"  signature  header  parent_header  content  buffer_0 ... buffer_n

The signature is a hex HMAC-SHA256 over the frame count and every frame after it,
each prefixed by its 8-byte big-endian length, so frame boundaries and binary
buffers are authenticated too.  `Session.deserialize` checks sizes and the
signature *before* parsing any JSON: unauthenticated bytes never reach a parser.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import struct
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec

from . import messages
from .messages import FieldError
from .version import PROTOCOL_MAJOR, PROTOCOL_VERSION, parse_version

__all__ = [
    "DELIMITER",
    "PROTOCOL_VERSION",
    "FieldError",
    "Header",
    "Message",
    "ReplayGuard",
    "Session",
    "Signer",
    "WireError",
    "split_routing",
]

DELIMITER = b"<ADB|MSG>"
# signature, header, parent header, content: the frames after the delimiter before the buffers.
ENVELOPE_FRAMES = 4
DEFAULT_MAX_FRAMES = ENVELOPE_FRAMES + 256  # counted after the delimiter
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# The most a server takes in one request (client -> server message).  Requests carry no
# binary buffers and at most a few MiB of prompts (4000 characters x 256 prompt-travel
# entries, JSON-escaped); libzmq drops a connection that sends a larger frame (MAXMSGSIZE).
MAX_REQUEST_BYTES = 8 * 1024 * 1024

# Wire error codes (also used as `Error.code` in replies).
BAD_SIGNATURE = "bad_signature"
REPLAY = "replay"
BAD_MESSAGE = "bad_message"
VERSION = "version"
TOO_LARGE = "too_large"
UNKNOWN_TYPE = "unknown_type"


class WireError(Exception):
    """A message that must be refused.  `code` is one of the constants above, `message`
    is for a person, `fields` names offending fields of the content for "bad_message".
    `header` is the (authenticated) header when it could be parsed, so that a server can
    still address its `Error` reply to the request."""

    def __init__(
        self,
        code: str,
        message: str,
        fields: Sequence[FieldError] = (),
        header: Header | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.fields: list[FieldError] = list(fields)
        self.header = header

    def to_error(self) -> messages.Error:
        """The `Error` content to send back for this refusal."""
        return messages.Error(code=self.code, message=self.message, fields=list(self.fields))


_MsgId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}\Z")]
_Short = Annotated[str, msgspec.Meta(max_length=64)]
_Version = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,4}\.[0-9]{1,4}\Z")]


@dataclass
class Header:
    """Routing and bookkeeping of one message.  `date` is seconds since the epoch."""

    msg_id: _MsgId
    msg_type: _Short
    version: _Version
    date: float
    session: _Short = ""
    client_id: _Short = ""


@dataclass
class Message:
    header: Header
    parent: Header | None
    content: messages.Base
    buffers: list[bytes] = field(default_factory=list)

    @property
    def msg_type(self) -> str:
        return self.header.msg_type


class Signer:
    """HMAC-SHA256 over the frame count and length-prefixed frames."""

    def __init__(self, key: bytes) -> None:
        if not key:
            raise ValueError("the signing key is empty")
        self._key = bytes(key)

    def sign(self, frames: Sequence[bytes]) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        mac.update(struct.pack(">Q", len(frames)))
        for frame in frames:
            mac.update(struct.pack(">Q", len(frame)))
            mac.update(frame)
        return mac.hexdigest().encode("ascii")

    def verify(self, signature: bytes, frames: Sequence[bytes]) -> bool:
        return hmac.compare_digest(self.sign(frames), bytes(signature))


class ReplayGuard:
    """Rejects a message whose `date` is more than `window_s` away from this clock, or
    whose `msg_id` was already seen.  Ids are remembered until their date leaves the
    window; if more than `max_ids` are live, the oldest are dropped and every message
    dated at or before a dropped one is refused too, so a replay can never slip through."""

    def __init__(
        self,
        window_s: float = 300.0,
        max_ids: int = 200_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.window_s = float(window_s)
        self.max_ids = int(max_ids)
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()  # msg_id -> date
        self._floor = -math.inf

    def check(self, header: Header) -> None:
        now = self._clock()
        delta = header.date - now
        if not math.isfinite(header.date) or abs(delta) > self.window_s:
            raise WireError(
                REPLAY,
                f"message is dated {delta:+.0f} s from this machine's clock (allowed: "
                f"±{self.window_s:.0f} s); if it is not a replay, check both clocks (NTP)",
                header=header,
            )
        # Forget ids whose date can no longer pass the check above.
        while self._seen:
            oldest_id, oldest_date = next(iter(self._seen.items()))
            if oldest_date + self.window_s >= now:
                break
            del self._seen[oldest_id]
        if header.msg_id in self._seen:
            raise WireError(REPLAY, f"message id {header.msg_id} was already received", header=header)
        if header.date <= self._floor:
            raise WireError(
                REPLAY, "message is older than the replay memory holds (too many messages)", header=header
            )
        self._seen[header.msg_id] = header.date
        while len(self._seen) > self.max_ids:
            _, dropped_date = self._seen.popitem(last=False)
            self._floor = max(self._floor, dropped_date)

    def __len__(self) -> int:
        return len(self._seen)


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `(?P<key>key` in `)?(?P<path>\$[^`]*)`)?$", re.S)
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]+)`$")
_SEGMENT = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


def field_error(exc: msgspec.ValidationError) -> FieldError:
    """msgspec's "Expected `int` >= 8, got `4` - at `$.width`" -> FieldError("$.width", ...).
    A missing field is reported at its own path, not its parent's."""
    match = _AT.match(str(exc))
    assert match is not None  # the pattern matches any string
    text = match.group("msg")
    path = match.group("path") or "$"
    missing = _MISSING.match(text)
    if missing:
        path = f"{path}.{missing.group('name')}"
        text = "missing required field"
    elif messages.MODEL_ID_PATTERN.replace("\\", "\\\\") in text:  # msgspec doubles its backslashes
        text = "must be a model id such as `lora:name` from the server's model list (never a path)"
    if match.group("key"):
        text += " (in a key)"
    return FieldError(field=path, message=text)


def _remove_field(doc: Any, path: str) -> bool:
    """Delete the object key at `path` ("$.request.width") in a decoded JSON document.
    Only object keys are removed (removing a list item would shift later indices)."""
    if not path.startswith("$"):
        return False
    rest = path[1:]
    segments: list[str | int] = []
    pos = 0
    while pos < len(rest):
        m = _SEGMENT.match(rest, pos)
        if m is None:
            return False
        segments.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        pos = m.end()
    if not segments or not isinstance(segments[-1], str):
        return False
    node = doc
    for seg in segments[:-1]:
        if isinstance(seg, str) and isinstance(node, dict) and seg in node:
            node = node[seg]
        elif isinstance(seg, int) and isinstance(node, list) and seg < len(node):
            node = node[seg]
        else:
            return False
    if isinstance(node, dict) and segments[-1] in node:
        del node[segments[-1]]
        return True
    return False


def _parent_path(path: str) -> str | None:
    """ "$.a[0].b" -> "$.a[0]" -> "$.a" -> "$" -> None."""
    cut = max(path.rfind("."), path.rfind("["))
    return path[:cut] if cut > 0 else None


# Each further error costs a validation of the whole document: at most this many bytes are
# validated again in all, or one request of 100,000 LoRA entries, the last 64 of them wrong,
# holds the receiver (the server's loop) for seconds.  A form's request gets all 64 passes.
ERROR_PASSES_BYTES = 1024 * 1024


def content_errors(raw: bytes, cls: type[Any], first: msgspec.ValidationError) -> list[FieldError]:
    """Every field error of `raw`, not just msgspec's first: drop the offending field
    and validate again (bounded), so a form can highlight all its bad fields at once."""
    errors = [field_error(first)]
    passes = min(64, ERROR_PASSES_BYTES // max(1, len(raw)))
    if not passes:
        return errors
    try:
        doc = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return errors
    target = errors[-1].field
    removed: set[str] = set()
    for _ in range(passes):
        # Drop the offending key; when that leaves a required field missing, drop its
        # nearest removable ancestor instead (a whole LoRA entry, say).
        while not _remove_field(doc, target):
            parent = _parent_path(target)
            if parent is None:
                return errors
            target = parent
        removed.add(target)
        try:
            # Decoded from JSON as the first pass was: `convert` would not turn the string keys
            # of `prompt_travel` into ints, and flagged a valid travel as bad.
            msgspec.json.decode(msgspec.json.encode(doc), type=cls)
        except msgspec.ValidationError as exc:
            nxt = field_error(exc)
            if nxt.field in removed or any(e.field == nxt.field for e in errors):
                target = _parent_path(nxt.field) or "$"
                continue
            errors.append(nxt)
            target = nxt.field
        else:
            break
    return errors


# msgspec raises RecursionError, not DecodeError, for JSON nested past its depth limit.
_TOO_DEEP = "JSON is nested too deeply"


def _describe(errors: Sequence[FieldError]) -> str:
    return "; ".join(f"{e.field}: {e.message}" for e in errors)


class Session:
    """One endpoint's view of the wire: signing key, session id, client id, replay
    guard and size caps.  `max_frames` counts the frames after the delimiter
    (signature, header, parent, content and buffers); `max_bytes` all of them.
    Not thread-safe, like the socket it serves."""

    def __init__(
        self,
        key: bytes,
        *,
        client_id: str = "",
        max_frames: int = DEFAULT_MAX_FRAMES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        replay_window_s: float = 300.0,
        role: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.signer = Signer(key)
        self.session = uuid.uuid4().hex
        self.client_id = client_id
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.role = role  # "server" or "client": only words in error messages
        self.replay = ReplayGuard(replay_window_s, clock=clock)
        self._clock = clock
        self._encoder = msgspec.json.Encoder()
        self._header_decoder = msgspec.json.Decoder(Header)
        self._decoders = {name: msgspec.json.Decoder(cls) for name, cls in messages.MESSAGE_TYPES.items()}

    # ------------------------------------------------------------------ sending

    def new_header(self, msg_type: str) -> Header:
        return Header(
            msg_id=uuid.uuid4().hex,
            msg_type=msg_type,
            version=PROTOCOL_VERSION,
            date=self._clock(),
            session=self.session,
            client_id=self.client_id,
        )

    def serialize_message(
        self,
        content: messages.Base,
        *,
        parent: Header | None = None,
        buffers: Sequence[bytes] = (),
    ) -> tuple[Header, list[bytes]]:
        """Like `serialize`, also returning the header (its msg_id matches replies)."""
        try:
            msg_type = messages.TYPE_OF[type(content)]
        except KeyError:
            raise TypeError(f"{type(content).__name__} is not a protocol message") from None
        if ENVELOPE_FRAMES + len(buffers) > self.max_frames:
            raise WireError(
                TOO_LARGE,
                f"{len(buffers)} buffers exceed the limit of {self.max_frames - ENVELOPE_FRAMES} per message",
            )
        header = self.new_header(msg_type)
        body = [
            self._encoder.encode(header),
            self._encoder.encode(parent) if parent is not None else b"{}",
            self._encoder.encode(content),
            *(bytes(b) for b in buffers),
        ]
        total = len(DELIMITER) + 64 + sum(len(f) for f in body)
        if total > self.max_bytes:
            raise WireError(TOO_LARGE, f"message of {total} bytes exceeds the limit of {self.max_bytes}")
        return header, [DELIMITER, self.signer.sign(body), *body]

    def serialize(
        self,
        content: messages.Base,
        *,
        parent: Header | None = None,
        buffers: Sequence[bytes] = (),
    ) -> list[bytes]:
        """Frames from the delimiter on; a ROUTER prepends the peer's identities."""
        return self.serialize_message(content, parent=parent, buffers=buffers)[1]

    # ------------------------------------------------------------------ receiving

    def deserialize(self, frames: Sequence[bytes]) -> Message:
        """Validate and decode frames that start at the delimiter.  Raises WireError."""
        if not frames or frames[0] != DELIMITER:
            raise WireError(BAD_MESSAGE, "not a protocol message (no delimiter frame)")
        after = len(frames) - 1
        if after > self.max_frames:
            raise WireError(TOO_LARGE, f"{after} frames exceed the limit of {self.max_frames}")
        if after < ENVELOPE_FRAMES:
            raise WireError(
                BAD_MESSAGE, f"{after} frames after the delimiter, at least {ENVELOPE_FRAMES} needed"
            )
        total = sum(len(f) for f in frames)
        if total > self.max_bytes:
            raise WireError(TOO_LARGE, f"message of {total} bytes exceeds the limit of {self.max_bytes}")
        # Authenticate before parsing anything.
        signature, body = frames[1], frames[2:]
        if not self.signer.verify(signature, body):
            raise WireError(BAD_SIGNATURE, "signature does not match: the two sides use different keys")
        raw_header, raw_parent, raw_content = body[0], body[1], body[2]

        try:
            header = self._header_decoder.decode(raw_header)
        except msgspec.ValidationError as exc:
            fe = field_error(exc)
            fe = FieldError(field="$header" + fe.field[1:], message=fe.message)
            raise WireError(BAD_MESSAGE, f"bad header: {_describe([fe])}", [fe]) from None
        except msgspec.DecodeError as exc:
            raise WireError(BAD_MESSAGE, f"header is not valid JSON: {exc}") from None
        except RecursionError:
            raise WireError(BAD_MESSAGE, f"header: {_TOO_DEEP}") from None

        major, minor = parse_version(header.version)  # the pattern guarantees the form
        if major != PROTOCOL_MAJOR:
            me, peer = {"server": ("server", "client"), "client": ("client", "server")}.get(
                self.role, ("this side", "the other side")
            )
            raise WireError(
                VERSION,
                f"protocol version mismatch: {me} speaks {PROTOCOL_MAJOR}.x, {peer} {header.version}; "
                "update the older of backend and add-on",
                header=header,
            )
        self.replay.check(header)

        decoder = self._decoders.get(header.msg_type)
        if decoder is None:
            raise WireError(UNKNOWN_TYPE, f"unknown message type {header.msg_type!r}", header=header)

        parent: Header | None = None
        if raw_parent.strip() not in (b"{}", b""):
            try:
                parent = self._header_decoder.decode(raw_parent)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise WireError(BAD_MESSAGE, f"bad parent header: {exc}", header=header) from None
            except RecursionError:
                raise WireError(BAD_MESSAGE, f"parent header: {_TOO_DEEP}", header=header) from None

        try:
            content = decoder.decode(raw_content)
        except msgspec.ValidationError as exc:
            errors = content_errors(bytes(raw_content), messages.MESSAGE_TYPES[header.msg_type], exc)
            raise WireError(
                BAD_MESSAGE, f"invalid {header.msg_type}: {_describe(errors)}", errors, header=header
            ) from None
        except msgspec.DecodeError as exc:
            raise WireError(BAD_MESSAGE, f"content is not valid JSON: {exc}", header=header) from None
        except RecursionError:
            raise WireError(BAD_MESSAGE, f"content: {_TOO_DEEP}", header=header) from None

        return Message(header=header, parent=parent, content=content, buffers=[bytes(b) for b in body[3:]])


def split_routing(frames: Sequence[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Split a ROUTER's frames into (identities, message from the delimiter on)."""
    for i, frame in enumerate(frames):
        if frame == DELIMITER:
            return list(frames[:i]), list(frames[i:])
    raise WireError(BAD_MESSAGE, "not a protocol message (no delimiter frame)")
