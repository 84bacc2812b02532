"""Fuzzing the network loop: over 10,000 mutated, random and half-valid messages, after
which the server still answers a ping and runs a valid job.  No message may cause an
internal error (logged at ERROR) or kill the loop."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from server_helpers import RawPeer, small_request

from animatediff_blender.backend.engine.fake import FakeEngine
from animatediff_blender.backend.server.server import Server
from animatediff_blender.protocol import messages
from animatediff_blender.protocol.client import BackendClient
from animatediff_blender.protocol.messages import Limits
from animatediff_blender.protocol.wire import DELIMITER

pytestmark = pytest.mark.timeout(120)

FUZZ_LIMITS = Limits(
    max_width=128,
    max_height=128,
    max_frames=8,
    max_steps=5,
    max_queue=16,
    max_jobs_per_client=16,
    max_prompt_chars=200,
)
N_MESSAGES = 10_500
BATCH = 250

STRINGS = [
    "",
    "a cat",
    "../../etc/passwd",
    "/etc/passwd",
    "C:\\Windows\\system32",
    "base:fake-sd15",
    "motion:fake-mm-v2",
    "lora:fake_ZoomIn",
    "base:../x",
    "\x00\x01",
    "é" * 50,
    "!oom",
    "x" * 5000,
    "0" * 32,
    "f" * 32,
    "{}",
    "null",
    "quality",
    "lightning",
]


def rand_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([0, -1, 1, 7, 8, 64, 2**31, 2**63, -(2**63), 2**64, 10**30])
    if kind == 1:
        return rng.choice([0.0, -0.5, 1e308, -1e308, 3.14, 1e-300])
    if kind == 2:
        return rng.choice(STRINGS)
    if kind == 3:
        return rng.choice([True, False])
    if kind == 4:
        return None
    if kind == 5:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(20)))
    if kind == 6:
        return [rand_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {
        rng.choice(STRINGS + ["request", "job_id", "prompt", "width"]): rand_value(rng, depth + 1)
        for _ in range(rng.randrange(5))
    }


def plausible(t: mi.Type, rng: random.Random, depth: int = 0) -> Any:
    """A value shaped like `t` most of the time, near and beyond its bounds."""
    if rng.random() < 0.12 or depth > 4:
        return rand_value(rng, depth)
    if isinstance(t, mi.StructType):
        return {f.encode_name: plausible(f.type, rng, depth + 1) for f in t.fields if rng.random() < 0.85}
    if isinstance(t, mi.IntType):
        lo, hi = t.ge if t.ge is not None else -5, t.le if t.le is not None else 10_000
        return rng.choice([lo, hi, lo - 1, hi + 1, rng.randint(lo, min(hi, lo + 200)), 64, 3])
    if isinstance(t, mi.FloatType):
        lo, hi = t.ge if t.ge is not None else -5.0, t.le if t.le is not None else 100.0
        return rng.choice([lo, hi, lo - 0.1, hi + 0.1, rng.uniform(lo, hi)])
    if isinstance(t, mi.StrType):
        return rng.choice(STRINGS)
    if isinstance(t, mi.BoolType):
        return rng.random() < 0.5
    if isinstance(t, mi.ListType):
        return [plausible(t.item_type, rng, depth + 1) for _ in range(rng.randrange(4))]
    if isinstance(t, mi.DictType):
        return {
            str(rng.randrange(-2, 20)): plausible(t.value_type, rng, depth + 1)
            for _ in range(rng.randrange(4))
        }
    if isinstance(t, mi.UnionType):
        return plausible(rng.choice(t.types), rng, depth)
    if isinstance(t, mi.LiteralType):
        return rng.choice([*t.values, "bogus"])
    if isinstance(t, mi.NoneType):
        return None
    return rand_value(rng, depth)


TYPES = {name: mi.type_info(cls) for name, cls in messages.MESSAGE_TYPES.items()}
VALID = [
    lambda: messages.Ping(nonce="n"),
    lambda: messages.Hello(client_id="fuzzer"),
    lambda: messages.Status(job_id="0" * 32),
    lambda: messages.Cancel(job_id="a" * 32),
    lambda: messages.Watch(job_ids=["b" * 32]),
    lambda: messages.Fetch(job_id="c" * 32),
    lambda: messages.ListModels(),
    lambda: messages.Submit(request=small_request(steps=2, frames=2)),
]


def mutate(frames: list[bytes], rng: random.Random) -> list[bytes]:
    frames = list(frames)
    op = rng.randrange(8)
    i = rng.randrange(len(frames))
    if op == 0 and frames[i]:  # flip a byte
        b = bytearray(frames[i])
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        frames[i] = bytes(b)
    elif op == 1:  # truncate a frame
        frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
    elif op == 2 and len(frames) > 1:  # drop a frame
        del frames[i]
    elif op == 3:  # duplicate a frame
        frames.insert(i, frames[i])
    elif op == 4:  # insert a random frame
        frames.insert(i, rng.randbytes(rng.randrange(40)))
    elif op == 5 and len(frames) > 2:  # swap two frames
        j = rng.randrange(len(frames))
        frames[i], frames[j] = frames[j], frames[i]
    elif op == 6:  # random signature
        frames[1 if len(frames) > 1 else 0] = rng.randbytes(64).hex().encode()
    else:  # append junk to a frame
        frames[i] = frames[i] + rng.randbytes(rng.randrange(1, 9))
    return frames or [b""]


def fuzz_message(peer: RawPeer, rng: random.Random) -> list[bytes]:
    kind = rng.randrange(6)
    if kind == 0:  # mutated valid message
        return mutate(peer.signed(rng.choice(VALID)()), rng)
    if kind == 1:  # random frames
        return [rng.randbytes(rng.randrange(64)) for _ in range(rng.randrange(1, 8))]
    msg_type = rng.choice(list(TYPES)) if rng.random() < 0.9 else rng.choice(STRINGS)
    content = plausible(TYPES.get(msg_type, mi.AnyType()), rng)
    try:
        raw = msgspec.json.encode(content)
    except (OverflowError, msgspec.EncodeError):
        raw = b"{"
    if kind == 2:  # random header fields, valid signature
        header = msgspec.json.encode(
            {
                k: rand_value(rng)
                for k in ("msg_id", "msg_type", "version", "date", "client_id")
                if rng.random() < 0.8
            }
        )
        return peer.sign_raw(header, b"{}", raw)
    if kind == 3:  # random JSON, no valid signature
        return [DELIMITER, rng.randbytes(32).hex().encode(), peer.header_bytes(msg_type), b"{}", raw]
    # Well-formed, validly signed, content random but shaped like the schema.
    client_id = "fuzzer" if rng.random() < 0.8 else rng.choice(STRINGS)
    return peer.sign_raw(peer.header_bytes(msg_type, client_id=client_id), b"{}", raw)


def test_fuzz_then_still_healthy(
    make_server: Callable[..., Server],
    make_client: Callable[..., BackendClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = make_server(engine=FakeEngine(), limits=FUZZ_LIMITS)
    rng = random.Random(20260126)
    replies = 0
    started = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger="animatediff_blender"),
        RawPeer(server.endpoint, client_id="fuzzer") as peer,
    ):
        for sent in range(N_MESSAGES):
            peer.send(fuzz_message(peer, rng))
            if sent % BATCH == BATCH - 1:
                # Drain replies so that neither side's queue fills up.
                while peer.sock.poll(50):
                    peer.sock.recv_multipart()
                    replies += 1
        while peer.sock.poll(300):
            peer.sock.recv_multipart()
            replies += 1
    elapsed = time.monotonic() - started
    print(f"fuzz: {N_MESSAGES} messages in {elapsed:.1f} s, {replies} replies, {server.refusals} refused")

    internal = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not internal, [r.getMessage() for r in internal[:5]]
    assert server.refusals > N_MESSAGES // 2  # most inputs were refused, each answered
    assert replies >= server.refusals * 0.9
    assert server._thread is not None and server._thread.is_alive()

    client = make_client(server, client_id="after-fuzz")
    assert client.ping()
    result = client.run_job(small_request(prompt="survivor"))
    assert len(result.frames) == 4
