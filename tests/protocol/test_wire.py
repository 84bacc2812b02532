"""The signed envelope: signing, tampering, replays, versions, limits, schema errors."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable

import pytest

from animatediff_blender.protocol import PROTOCOL_VERSION, messages
from animatediff_blender.protocol.wire import (
    DELIMITER,
    Header,
    ReplayGuard,
    Session,
    Signer,
    WireError,
    split_routing,
)

KEY = b"0123456789abcdef" * 4


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def pair(clock: Clock | None = None) -> tuple[Session, Session]:
    clock = clock or Clock()
    return (
        Session(KEY, client_id="artist-1", role="client", clock=clock),
        Session(KEY, role="server", clock=clock),
    )


def submit(**request: object) -> messages.Submit:
    return messages.Submit(request=messages.GenerateRequest(prompt="a cat", **request))  # type: ignore[arg-type]


def resign(frames: list[bytes], signer: Signer, **edits: Callable[[bytes], bytes]) -> list[bytes]:
    """Rebuild a message after editing frames by name, signed with `signer` (a peer that
    holds the key but sends something the schema or version rules must refuse)."""
    names = ["header", "parent", "content"]
    body = list(frames[2:])
    for name, edit in edits.items():
        body[names.index(name)] = edit(body[names.index(name)])
    return [DELIMITER, signer.sign(body), *body]


def edit_json(**changes: object) -> Callable[[bytes], bytes]:
    def edit(raw: bytes) -> bytes:
        doc = json.loads(raw)
        doc.update(changes)
        return json.dumps(doc).encode()

    return edit


def refused(session: Session, frames: list[bytes]) -> WireError:
    with pytest.raises(WireError) as info:
        session.deserialize(frames)
    return info.value


# --------------------------------------------------------------------------- round trips


def test_round_trip_with_buffers_and_parent() -> None:
    client, server = pair()
    frames = client.serialize(submit(width=64, height=64), buffers=[b"\x89PNG\x00\x01", b""])
    assert frames[0] == DELIMITER
    msg = server.deserialize(frames)
    assert msg.msg_type == "submit"
    assert isinstance(msg.content, messages.Submit)
    assert msg.content.request.width == 64
    assert msg.buffers == [b"\x89PNG\x00\x01", b""]
    assert msg.parent is None
    assert msg.header.client_id == "artist-1"
    assert msg.header.version == PROTOCOL_VERSION

    reply = server.serialize(messages.Accepted(job_id="a" * 32, queue_position=0), parent=msg.header)
    back = client.deserialize(reply)
    assert back.parent == msg.header
    assert isinstance(back.content, messages.Accepted)


def test_signature_covers_frame_count_and_lengths() -> None:
    signer = Signer(b"k" * 32)
    assert signer.verify(signer.sign([b"ab", b"c"]), [b"ab", b"c"])
    assert not signer.verify(signer.sign([b"ab", b"c"]), [b"a", b"bc"])  # boundary shift
    assert not signer.verify(signer.sign([b"ab", b"c"]), [b"ab", b"c", b""])  # extra empty frame
    assert not signer.verify(signer.sign([b"abc"]), [b"ab", b"c"])
    assert not Signer(b"j" * 32).verify(signer.sign([b"abc"]), [b"abc"])


def test_documented_signature_example() -> None:
    """The worked example in docs/PROTOCOL.md ("Signing"): keep the two in step."""
    signer = Signer(b"0123456789abcdef0123456789abcdef")
    header = (
        b'{"msg_id":"9f1c2d3e4a5b6c7d8e9f0a1b2c3d4e5f","msg_type":"ping","version":"1.0",'
        b'"date":1767225600.0,"session":"s1","client_id":"artist-1"}'
    )
    frames = [header, b"{}", b'{"nonce":"n1"}', b"\x89PNG"]
    assert len(header) == 137
    assert signer.sign(frames) == b"ce10851bd4997611c41d884bcf4247bdd20ff14a3b3b7e589e1be42a4ff36aa7"
    # And a receiver with that clock accepts the whole message.
    server = Session(b"0123456789abcdef0123456789abcdef", clock=Clock(1767225600.0))
    msg = server.deserialize([DELIMITER, signer.sign(frames), *frames])
    assert msg.msg_type == "ping" and msg.buffers == [b"\x89PNG"] and msg.header.client_id == "artist-1"


@pytest.mark.parametrize("index", [2, 3, 4, 5])  # header, parent, content, buffer
def test_tampering_with_any_frame_is_refused(index: int) -> None:
    client, server = pair()
    frames = client.serialize(submit(), buffers=[b"frame-bytes"])
    frames[index] = frames[index][:-1] + bytes([frames[index][-1] ^ 1])
    assert refused(server, frames).code == "bad_signature"


def test_shifting_a_boundary_between_frames_is_refused() -> None:
    client, server = pair()
    frames = client.serialize(messages.Ping(), buffers=[b"abcd", b"efgh"])
    frames[5], frames[6] = b"abcde", b"fgh"
    assert refused(server, frames).code == "bad_signature"


def test_dropping_or_adding_a_buffer_is_refused() -> None:
    client, server = pair()
    frames = client.serialize(messages.Ping(), buffers=[b"abcd"])
    assert refused(server, frames[:-1]).code == "bad_signature"
    assert refused(server, [*frames, b""]).code == "bad_signature"


def test_wrong_key_is_refused() -> None:
    client = Session(b"another key, 32 bytes long......")
    _, server = pair()
    assert refused(server, client.serialize(messages.Ping())).code == "bad_signature"


def test_signature_is_checked_before_json_parsing() -> None:
    _, server = pair()

    class Trap:
        def decode(self, raw: bytes) -> object:
            raise AssertionError("parsed JSON of an unauthenticated message")

    server._header_decoder = Trap()  # type: ignore[assignment]
    server._decoders = {name: Trap() for name in server._decoders}  # type: ignore[misc]
    frames = [DELIMITER, b"0" * 64, b"not json", b"{}", b"{"]
    assert refused(server, frames).code == "bad_signature"


# --------------------------------------------------------------------------- replays


def test_replayed_message_is_refused() -> None:
    client, server = pair()
    frames = client.serialize(messages.Ping())
    server.deserialize(frames)
    err = refused(server, frames)
    assert err.code == "replay"
    assert "already received" in err.message


@pytest.mark.parametrize("offset", [-301.0, 301.0])
def test_stale_or_future_date_is_refused(offset: float) -> None:
    clock = Clock()
    client, server = pair(clock)
    frames = client.serialize(messages.Ping())
    clock.now += offset
    err = refused(server, frames)
    assert err.code == "replay"
    assert "clock" in err.message


def test_date_within_window_is_accepted() -> None:
    clock = Clock()
    client, server = pair(clock)
    frames = client.serialize(messages.Ping())
    clock.now += 299.0
    server.deserialize(frames)


def test_replay_guard_forgets_expired_ids_and_stays_safe_when_full() -> None:
    clock = Clock()
    guard = ReplayGuard(window_s=10.0, max_ids=3, clock=clock)

    def header(i: int, date: float) -> Header:
        return Header(msg_id=f"{i:032x}", msg_type="ping", version="1.0", date=date)

    for i in range(3):
        guard.check(header(i, clock.now))
    clock.now += 11.0  # all three expired: their dates no longer pass the window check
    guard.check(header(10, clock.now))
    assert len(guard) == 1
    # Overflow: ids 11..13 evict 10 and 11; a replay of 10 or 11 is still refused (by date).
    for i in range(11, 14):
        guard.check(header(i, clock.now + i / 100))
    with pytest.raises(WireError) as info:
        guard.check(header(10, clock.now))
    assert info.value.code == "replay"


# --------------------------------------------------------------------------- versions and types


def test_major_version_mismatch_is_refused_with_both_versions() -> None:
    client, server = pair()
    frames = resign(client.serialize(messages.Ping()), client.signer, header=edit_json(version="2.0"))
    err = refused(server, frames)
    assert err.code == "version"
    assert "server speaks 1.x" in err.message and "client 2.0" in err.message
    assert err.header is not None  # the server can still address its Error reply
    assert err.to_error().code == "version"


def test_minor_version_mismatch_and_unknown_fields_are_accepted() -> None:
    client, server = pair()
    frames = resign(
        client.serialize(submit()),
        client.signer,
        header=edit_json(version="1.7", trace_id="abc"),
        content=edit_json(future_option=True),
    )
    msg = server.deserialize(frames)
    assert msg.header.version == "1.7"
    assert isinstance(msg.content, messages.Submit)


def test_unknown_message_type() -> None:
    client, server = pair()
    frames = resign(client.serialize(messages.Ping()), client.signer, header=edit_json(msg_type="teleport"))
    assert refused(server, frames).code == "unknown_type"


def test_serializing_a_non_message_is_a_type_error() -> None:
    client, _ = pair()
    with pytest.raises(TypeError):
        client.serialize(messages.MotionLora(id="lora:x"))


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"garbage"],
        [b"\x00\xff\xfe", b"\x01"],
        [DELIMITER],
        [DELIMITER, b"sig", b"{}"],
    ],
)
def test_garbage_is_refused(frames: list[bytes]) -> None:
    _, server = pair()
    assert refused(server, frames).code in ("bad_message", "bad_signature")


def test_signed_invalid_json_is_refused() -> None:
    client, server = pair()
    frames = resign(client.serialize(messages.Ping()), client.signer, content=lambda _: b"{not json")
    err = refused(server, frames)
    assert err.code == "bad_message" and "JSON" in err.message
    frames = resign(client.serialize(messages.Ping()), client.signer, header=lambda _: b"\xff\xfe")
    assert refused(server, frames).code == "bad_message"


def test_deeply_nested_json_is_a_wire_error_not_a_crash() -> None:
    # msgspec raises RecursionError (not a DecodeError) past its nesting depth: a signed but
    # pathological message must be refused like any other bad one, on either side.
    client, server = pair()
    deep = b"[" * 100_000 + b"]" * 100_000
    cases = [
        {"content": lambda _: b'{"nonce":"x","extra":' + deep + b"}"},  # an unknown field, skipped
        {"content": lambda _: b'{"request":{"prompt":1},"extra":' + deep + b"}"},  # field errors
        {"header": lambda _: b'{"x":' + deep + b"}"},
        {"parent": lambda _: b'{"x":' + deep + b"}"},
    ]
    for i, edits in enumerate(cases):
        msg = submit() if i == 1 else messages.Ping()
        frames = resign(client.serialize(msg), client.signer, **edits)  # type: ignore[arg-type]
        err = refused(server, frames)
        assert err.code == "bad_message", (i, err)
        if i == 1:  # the field error found before the nesting still names the field
            assert [f.field for f in err.fields] == ["$.request.prompt"]
        else:
            assert "nest" in err.message, (i, err)


def test_header_fields_are_validated() -> None:
    client, server = pair()
    frames = resign(client.serialize(messages.Ping()), client.signer, header=edit_json(msg_id="../../etc"))
    err = refused(server, frames)
    assert err.code == "bad_message"
    assert err.fields[0].field == "$header.msg_id"


@pytest.mark.parametrize(("field", "value"), [("version", f"{PROTOCOL_VERSION}\n"), ("msg_id", "0" * 32 + "\n")])
def test_a_header_value_with_a_final_newline_is_refused_as_such(field: str, value: str) -> None:
    """`$` in a pattern also matches before a final newline: "1.1\n" passed the schema and
    then raised a ValueError, not a protocol error."""
    client, server = pair()
    frames = resign(client.serialize(messages.Ping()), client.signer, header=edit_json(**{field: value}))
    err = refused(server, frames)
    assert err.code == "bad_message"
    assert [f.field for f in err.fields] == [f"$header.{field}"]


def test_too_many_frames_is_refused_before_verifying() -> None:
    client, _ = pair()
    server = Session(KEY, max_frames=6)
    frames = client.serialize(messages.Ping(), buffers=[b"a", b"b", b"c"])  # 7 after the delimiter
    assert refused(server, frames).code == "too_large"
    with pytest.raises(WireError) as info:
        Session(KEY, max_frames=6).serialize(messages.Ping(), buffers=[b"a", b"b", b"c"])
    assert info.value.code == "too_large"


def test_oversize_message_is_refused() -> None:
    client, _ = pair()
    server = Session(KEY, max_bytes=10_000)
    assert refused(server, client.serialize(messages.Ping(), buffers=[b"x" * 10_000])).code == "too_large"
    with pytest.raises(WireError):
        Session(KEY, max_bytes=10_000).serialize(messages.Ping(), buffers=[b"x" * 10_000])


def test_default_caps_allow_a_full_frames_message() -> None:
    client, server = pair()
    buffers = [b"png"] * messages.Limits().max_frames_per_message
    msg = server.deserialize(client.serialize(messages.Ping(), buffers=buffers))
    assert len(msg.buffers) == len(buffers)


def test_split_routing() -> None:
    client, _ = pair()
    frames = client.serialize(messages.Ping())
    ids, rest = split_routing([b"\x00id1", b"id2", *frames])
    assert ids == [b"\x00id1", b"id2"] and rest == frames
    with pytest.raises(WireError) as info:
        split_routing([b"id", b"no delimiter"])
    assert info.value.code == "bad_message"


# --------------------------------------------------------------------------- field errors


def refused_request(request: dict[str, object]) -> WireError:
    client, server = pair()
    content = json.dumps({"request": {"prompt": "a cat", **request}}).encode()
    frames = resign(client.serialize(submit()), client.signer, content=lambda _: content)
    err = refused(server, frames)
    assert err.code == "bad_message"
    return err


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("width", 4),
        ("width", 100),  # not a multiple of 8
        ("height", 9000),
        ("frames", 0),
        ("frames", 5000),
        ("steps", 0),
        ("guidance", -1.0),
        ("guidance", 101.0),
        ("seed", -1),
        ("context_length", 2),
        ("context_stride", 0),
        ("domain_adapter_scale", 3.0),
        ("preview_every", -1),
        ("preset", "turbo"),
        ("prompt", "x" * 4001),
        ("negative_prompt", 7),
    ],
)
def test_field_error_names_the_field(field: str, value: object) -> None:
    err = refused_request({field: value})
    assert [f.field for f in err.fields] == [f"$.request.{field}"]
    assert f"$.request.{field}" in err.message


def test_lora_weight_out_of_range() -> None:
    err = refused_request({"motion_loras": [{"id": "lora:zoom", "weight": 11}]})
    assert err.fields[0].field == "$.request.motion_loras[0].weight"


def test_all_bad_fields_are_reported_at_once() -> None:
    err = refused_request(
        {"width": 4, "steps": 0, "seed": -5, "motion_loras": [{"id": "lora:ok", "weight": 50}]}
    )
    assert {f.field for f in err.fields} == {
        "$.request.width",
        "$.request.steps",
        "$.request.seed",
        "$.request.motion_loras[0].weight",
    }


def test_a_valid_prompt_travel_is_not_listed_among_the_bad_fields() -> None:
    """The passes after the first re-validated the document with `msgspec.convert`, which
    does not turn JSON's string keys into the travel's frame numbers."""
    err = refused_request({"width": 4, "frames": 16, "prompt_travel": {"0": "a cat", "8": "a dog"}})
    assert [f.field for f in err.fields] == ["$.request.width"]


@pytest.mark.parametrize("field", ["base_model", "motion_module"])
def test_a_model_id_with_a_final_newline_is_refused(field: str) -> None:
    err = refused_request({field: "base:sd15\n"})
    assert err.fields[0].field == f"$.request.{field}" and "model id" in err.fields[0].message


def test_missing_required_field() -> None:
    client, server = pair()
    frames = resign(
        client.serialize(submit()), client.signer, content=lambda _: b'{"request": {"width": 64}}'
    )
    err = refused(server, frames)
    assert [f.field for f in err.fields] == ["$.request.prompt"]


@pytest.mark.parametrize(
    "bad_id", ["../x", "/etc/passwd", "base:../../x", "base:/etc/passwd", "base:.hidden", "C:\\x"]
)
@pytest.mark.parametrize("field", ["base_model", "motion_module", "domain_adapter"])
def test_path_like_model_ids_are_rejected(field: str, bad_id: str) -> None:
    err = refused_request({field: bad_id})
    assert err.fields[0].field == f"$.request.{field}"
    assert "model id" in err.fields[0].message


@pytest.mark.parametrize("bad_id", ["../x", "lora:../../x", "lora:a/b"])
def test_path_like_lora_ids_are_rejected(bad_id: str) -> None:
    err = refused_request({"motion_loras": [{"id": bad_id}]})
    assert err.fields[0].field == "$.request.motion_loras[0].id"


def test_good_model_ids_pass() -> None:
    client, server = pair()
    request = messages.GenerateRequest(
        prompt="x",
        base_model="base:tiny-sd15",
        motion_module="motion:mm_sd_v15_v2.safetensors",
        motion_loras=[messages.MotionLora(id="lora:v2_lora_ZoomIn.ckpt", weight=0.8)],
        domain_adapter="adapter:v3_sd15_adapter.ckpt",
    )
    msg = server.deserialize(client.serialize(messages.Submit(request=request)))
    assert isinstance(msg.content, messages.Submit)
    assert msg.content.request == request


@pytest.mark.parametrize(
    ("file_name", "name"),
    [
        ("mm_sd_v15_v2.ckpt", "mm_sd_v15_v2.ckpt"),  # an id already: as it is
        ("Realistic Vision V5.1.safetensors", "Realistic_Vision_V5.1.safetensors"),
        ("Modèle (final).ckpt", "Modele_final.ckpt"),
        ("Straße Ærø Łódź.safetensors", "Strasse_AEro_Lodz.safetensors"),  # letters NFKD keeps
        ("模型 v2.safetensors", "v2-7f68f0799e48.safetensors"),  # other scripts: + digest
        ("模型.safetensors", "name-c98e118e0a43.safetensors"),  # nothing Latin left
        ("Модель.ckpt", "name-f3bdf7cce355.ckpt"),
        ("(~).ckpt", None),  # nothing an id can hold: the registry says to rename it
        ("...ckpt", None),
        ("a" * 161, "a" * 147 + "-1668eb4fad53"),  # cut to 160 with its digest
        ("x" * 170 + ".ckpt", "x" * 142 + "-b150200a3a04.ckpt"),
        ("a." + "b" * 200, None),  # an absurd suffix: nothing fits
    ],
)
def test_model_id_name_maps_file_names_artists_use(file_name: str, name: str | None) -> None:
    # The digests are pinned on purpose: ids are saved in .blend files and shot lists.
    got = messages.model_id_name(file_name)
    assert got == name
    if got is not None:
        assert messages.model_id_name(got) == got  # an id maps to itself


def test_a_name_in_another_script_has_one_id_on_every_system() -> None:
    """macOS hands out file names decomposed (NFD), Linux and Windows composed (NFC)."""
    for name in ("모델.safetensors", "Ελληνικά.ckpt", "モデル.safetensors"):
        composed = messages.model_id_name(unicodedata.normalize("NFC", name))
        assert composed is not None and composed.startswith("name-")
        assert messages.model_id_name(unicodedata.normalize("NFD", name)) == composed
    assert messages.model_id_name("模型.ckpt") != messages.model_id_name("模特.ckpt")
    assert messages.model_id_name("国风 v2.ckpt") != messages.model_id_name("动漫 v2.ckpt")


@pytest.mark.parametrize(
    ("name", "kind", "expected"),
    [
        ("Realistic Vision V5.1.safetensors", "base", "base:Realistic_Vision_V5.1.safetensors"),
        ("v2_lora_ZoomIn.ckpt", "lora", "lora:v2_lora_ZoomIn.ckpt"),  # a bare name takes `kind`
        ("motion:Mein Modul.ckpt", "base", "motion:Mein_Modul.ckpt"),  # a given kind is kept
        ("base:tiny-sd15", "base", "base:tiny-sd15"),  # an id maps to itself
        ("模型.safetensors", "lora", "lora:name-c98e118e0a43.safetensors"),
        ("(~).ckpt", "base", "base:(~).ckpt"),  # left for the pattern to refuse
    ],
)
def test_model_id_maps_names_to_ids(name: str, kind: str, expected: str) -> None:
    got = messages.model_id(name, kind)
    assert got == expected
    # what the protocol then accepts: every id but the one nothing could be made of
    assert bool(re.match(messages.MODEL_ID_PATTERN, got)) == ("(~)" not in got)
