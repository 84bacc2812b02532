"""`animatediff-blender keys` and `animatediff-blender generate` (the latter end to end
against an in-process server with the fake engine)."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import pytest

from animatediff_blender.backend.cli import build_parser, main
from animatediff_blender.backend.commands import generate
from animatediff_blender.protocol import auth
from animatediff_blender.protocol.messages import FieldError

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- keys


@posix_only
def test_keys_creates_a_private_key_in_the_config_dir(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys"]) == 0
    key = auth.default_key_path()
    assert mode(key) == 0o600 and len(auth.load_key(key)) == 64
    out = capsys.readouterr().out
    assert str(key) in out and "serve" in out


def test_keys_keeps_an_existing_key_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "--dir", str(tmp_path)]) == 0
    first = auth.load_key(tmp_path / "hmac.key")
    assert main(["keys", "--dir", str(tmp_path)]) == 0
    assert auth.load_key(tmp_path / "hmac.key") == first
    assert "kept" in capsys.readouterr().out
    assert main(["keys", "--dir", str(tmp_path), "--force"]) == 0
    assert auth.load_key(tmp_path / "hmac.key") != first


@posix_only
def test_keys_refuses_a_loose_existing_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["keys", "--dir", str(tmp_path)])
    (tmp_path / "hmac.key").chmod(0o644)
    assert main(["keys", "--dir", str(tmp_path)]) == 1
    assert "chmod 600" in capsys.readouterr().err


@posix_only
def test_keys_curve_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "--dir", str(tmp_path), "--curve"]) == 0
    curve = tmp_path / "curve"
    for name in ("server", "client"):
        assert (curve / f"{name}.key").is_file()
        assert mode(curve / f"{name}.key_secret") == 0o600
    allowed = curve / "allowed_clients"
    assert (allowed / "client.key").read_bytes() == (curve / "client.key").read_bytes()
    out = capsys.readouterr().out
    assert "--curve-allowed-dir" in out and "client.key_secret" in out and "server.key" in out

    server_secret = (curve / "server.key_secret").read_bytes()
    assert main(["keys", "--dir", str(tmp_path), "--curve", "--client", "alice"]) == 0
    assert (allowed / "alice.key").is_file() and (allowed / "client.key").is_file()
    assert (curve / "server.key_secret").read_bytes() == server_secret  # kept
    assert main(["keys", "--dir", str(tmp_path), "--curve", "--client", "../evil"]) == 2


def test_keys_prints_commands_that_paste_and_refuses_a_client_named_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shlex

    folder = tmp_path / "k sp ü"
    assert main(["keys", "--dir", str(folder), "--curve"]) == 0
    serve = next(line for line in capsys.readouterr().out.splitlines() if "--curve-allowed-dir" in line)
    words = shlex.split(serve)
    assert words[words.index("--curve-allowed-dir") + 1] == str(folder / "curve" / "allowed_clients")
    # "server" is the server's own certificate: the artist would have been given its secret.
    assert main(["keys", "--dir", str(folder), "--curve", "--client", "server"]) == 2
    assert "server's certificate" in capsys.readouterr().err
    assert not (folder / "curve" / "allowed_clients" / "server.key").exists()
    with pytest.raises(SystemExit) as info:
        main(["keys", "--dir", ""])
    assert info.value.code == 2 and "must not be empty" in capsys.readouterr().err


def test_serve_checks_curve_files_and_the_models_folder_before_the_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A typo in a CurveZMQ path surfaced as "server failed" (exit 1) after the engine had
    loaded and hashed the models (minutes); a --models-dir that is a file started a server
    that failed every job."""
    from animatediff_blender.backend.engine import animatediff

    built: list[object] = []
    monkeypatch.setattr(animatediff, "AnimateDiffEngine", lambda *a, **kw: built.append(a))
    key = tmp_path / "hmac.key"
    auth.create_key(key)
    base = ["serve", "--key-file", str(key), "--data-dir", str(tmp_path / "data"), "--bind", "tcp://127.0.0.1:*"]
    assert main([*base, "--curve-secret", str(tmp_path / "none.key_secret"),
                 "--curve-allowed-dir", str(tmp_path / "nodir")]) == 2  # fmt: skip
    assert "no client public keys in" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main([*base, "--models-dir", str(tmp_path / "afile")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert built == []


def test_serve_and_models_use_one_data_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`models list` took ANIMATEDIFF_BLENDER_DATA='~/adb' literally while `serve` expanded
    it, and on Windows they used different AppData folders."""
    from animatediff_blender.backend.commands import serve
    from animatediff_blender.backend.models import fetch

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("ANIMATEDIFF_BLENDER_DATA", "~/adb")
    assert fetch.default_models_dir() == serve._data_dir() / "models" == tmp_path / "adb" / "models"


@pytest.mark.parametrize("below", ["", "sub"])
def test_keys_into_a_file_is_one_line_naming_it(
    below: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It used to end in `Not a directory: '<dir>/.hmac-xxxx'`, a temporary file's name."""
    file = tmp_path / "file"
    file.write_text("x")
    given = file / below if below else file
    assert main(["keys", "--dir", str(given), "--curve"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --dir ") and str(given) in err[0], err
    assert "not a directory" in err[0] and ".hmac-" not in err[0]
    assert file.read_text() == "x"


# --------------------------------------------------------------------------- generate: pieces


def test_lora_and_model_id_parsing() -> None:
    assert generate._lora("lora:v2_lora_ZoomIn.ckpt:0.8") == ("lora:v2_lora_ZoomIn.ckpt", 0.8)
    assert generate._lora("ZoomIn:-0.5") == ("lora:ZoomIn", -0.5)
    assert generate._lora("lora:ZoomIn") == ("lora:ZoomIn", 1.0)
    assert generate._lora("ZoomIn") == ("lora:ZoomIn", 1.0)
    assert generate._model_id("tiny-sd15", "base") == "base:tiny-sd15"
    assert generate._model_id("base:tiny-sd15", "base") == "base:tiny-sd15"
    # a file name as the artist wrote it: the id the registry lists it under
    assert generate._model_id("Realistic Vision V5.1.safetensors", "base") == "base:Realistic_Vision_V5.1.safetensors"
    assert generate._model_id("lora:My Zoom (v2).ckpt", "lora") == "lora:My_Zoom_v2.ckpt"
    assert generate._lora("My Zoom.ckpt:0.5") == ("lora:My_Zoom.ckpt", 0.5)


def test_field_errors_are_named_by_flag() -> None:
    text = generate.describe_fields(
        [
            FieldError(field="$.request.width", message="must be <= 1024"),
            FieldError(field="$.request.motion_loras[1].weight", message="too big"),
            FieldError(field="$.steps", message="Expected `int` >= 1"),
        ]
    )
    assert text == "--width: must be <= 1024; --lora #2: too big; --steps: Expected `int` >= 1"


def test_local_validation_rejects_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No server listens on port 1: a validation error must come first, instantly.
    code = main(
        ["generate", "--address", "tcp://127.0.0.1:1", "--prompt", "x", "--width", "100", "--base-model",
         "../../etc/passwd", "--out", str(tmp_path / "never")]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "--width" in err and "--base-model" in err
    assert not (tmp_path / "never").exists()


def test_missing_prompt_or_out(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--out", "x"]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x"]) == 2
    assert "--out" in capsys.readouterr().err


def test_server_down_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    auth.create_key()
    code = main(["generate", "--address", "tcp://127.0.0.1:1", "--timeout", "0.3", "--prompt", "x", "--out", str(tmp_path)])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: No answer from backend at tcp://127.0.0.1:1")


@pytest.mark.parametrize(
    "flags",
    [
        ["--fps", "nan"],  # used to crash writing the GIF, after the whole job
        ["--fps", "inf"],
        ["--timeout", "inf"],  # used to crash in the handshake
        ["--timeout", "0"],
        ["--job-timeout", "-5"],  # used to submit the job, then cancel it at once
        ["--give-up-after", "0"],
        ["--guidance", "nan"],  # used to reach the backend as null: the preset's guidance
        ["--adapter-scale", "inf"],
        ["--lora", "ZoomIn:nan"],
        ["--list-models", "--timeout", "inf"],
    ],
)
def test_bad_numbers_are_usage_errors(flags: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    auth.create_key()
    args = ["generate", "--address", "tcp://127.0.0.1:1", "--timeout", "0.3", "--prompt", "x", "--out", str(tmp_path)]
    assert main([*args, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and flags[-2] in err[0], err


def test_unusable_out_fails_before_the_job_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # No backend listens: the output folder is checked first, not after the GPU did the work.
    auth.create_key()
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    code = main(["generate", "--address", "tcp://127.0.0.1:1", "--timeout", "0.3", "--prompt", "x",
                 "--out", str(not_a_folder / "clip")])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot write output"), err


def test_models_zoo_into_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "file"
    dest.write_text("x")
    assert main(["models", "zoo", str(dest)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(dest) in err[0]


@pytest.mark.parametrize(
    "flags",
    [
        ["--data-dir", "{file}"],  # used to end in a FileExistsError traceback
        ["--key-file", "{file}/hmac.key"],
        ["--max-message-mb", "inf"],  # used to end in an OverflowError traceback
        ["--retention-max-gb", "inf"],
        ["--shutdown-timeout", "nan"],
        ["--shutdown-timeout", "-1"],
        ["--max-frames", "0"],  # these used to start a server that refused every job
        ["--max-width", "-8"],
        ["--max-queue", "0"],
        ["--max-motion-loras", "-1"],
        ["--job-timeout", "0"],  # ... or ended every job at once
    ],
)
def test_serve_bad_paths_and_numbers_are_one_line(
    flags: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    flags = [f.format(file=file) for f in flags]
    args = ["serve", "--engine", "fake", "--bind", "tcp://127.0.0.1:*", "--data-dir", str(tmp_path / "data")]
    assert main([*args, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("animatediff-blender serve: "), err


@pytest.mark.skipif(os.name != "posix", reason="sends itself SIGINT")
def test_ctrl_c_while_connecting_quits_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing is submitted yet, so there is nothing to cancel: the first Ctrl-C quits (it
    used to wait out the handshake's --timeout)."""
    import signal
    import threading
    import time

    auth.create_key()
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    t0 = time.monotonic()
    try:
        code = main(["generate", "--address", "tcp://127.0.0.1:1", "--timeout", "20", "--prompt", "x",
                     "--out", str(tmp_path)])  # fmt: skip
    finally:
        timer.cancel()
    assert code == 130 and time.monotonic() - t0 < 10
    assert "interrupted" in capsys.readouterr().err


# --------------------------------------------------------------------------- generate: end to end


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[str]:
    from animatediff_blender.backend.engine.fake import FakeEngine
    from animatediff_blender.backend.server.config import ServerConfig
    from animatediff_blender.backend.server.server import Server

    key = auth.create_key()  # the default key file, which the CLI reads by default
    server = Server(
        ServerConfig(
            key=key, data_dir=tmp_path / "data", bind="tcp://127.0.0.1:*", linger_ms=0, shutdown_timeout_s=5
        ),
        FakeEngine(),
    )
    endpoint = server.start()
    yield endpoint
    server.stop()


def test_generate_writes_frames_gif_and_mp4(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "clip"
    code = main(
        ["generate", "--address", backend, "--prompt", "a red fox", "--frames", "5", "--width", "64",
         "--height", "48", "--steps", "2", "--seed", "7", "--lora", "fake_ZoomIn:0.7", "--out", str(out)]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    pngs = sorted(out.glob("frame_*.png"))
    assert [p.name for p in pngs] == [f"frame_{i:04d}.png" for i in range(5)]
    assert iio.imread(pngs[0]).shape[:2] == (48, 64)
    gif = iio.imread(out / "clip.gif", index=None)
    assert gif.shape[0] == 5
    assert (out / "clip.mp4").stat().st_size > 0
    assert "5 frames 64x48" in captured.out and str(out / "clip.gif") in captured.out
    # clip.json says which job made the frames and how: what remakes the clip.
    info = json.loads((out / "clip.json").read_text())
    job_id = re.search(r"job ([0-9a-f]{32}):", captured.out)
    assert job_id and info["job_id"] == job_id.group(1) and info["complete"] is True
    assert (info["frames"], info["width"], info["height"], info["seed"]) == (5, 64, 48, 7)
    assert info["settings"]["prompt"] == "a red fox" and info["settings"]["steps"] == 2
    assert info["settings"]["motion_loras"] == [{"id": "lora:fake_ZoomIn", "weight": 0.7}]
    # Again into the same folder: refused before the job runs, the first clip untouched.
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    again = ["generate", "--address", backend, "--prompt", "a fox", "--frames", "3", "--width", "64",
             "--height", "48", "--steps", "1", "--out", str(out)]  # fmt: skip
    assert main(again) == 2
    err = capsys.readouterr().err
    assert "already holds a clip (5 frame(s) of job " in err and "--overwrite" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    # --overwrite, shorter: the first clip's last frames do not stay behind; other files do.
    (out / "notes.txt").write_text("mine")
    code = main([*again, "--overwrite"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.glob("frame_*.png")) == [f"frame_{i:04d}.png" for i in range(3)]
    assert (out / "notes.txt").read_text() == "mine"
    info = json.loads((out / "clip.json").read_text())
    assert (info["frames"], info["seed"], info["settings"]["prompt"]) == (3, 0, "a fox")
    assert iio.imread(out / "clip.gif", index=None).shape[0] == 3


def test_out_with_a_clip_is_refused_but_resume_adds_to_its_own_kept_frames(tmp_path: Path) -> None:
    """A GIF alone, or frames written by an earlier version (no clip.json), count as a clip;
    the frames kept of a job that did not finish may be collected into the same folder."""
    gif_only = tmp_path / "gif"
    gif_only.mkdir()
    (gif_only / "clip.gif").write_bytes(b"GIF89a")
    with pytest.raises(generate.UsageError, match="a GIF/MP4"):
        generate.prepare_out(gif_only)
    generate.prepare_out(gif_only, overwrite=True)
    generate.prepare_out(tmp_path / "new" / "deeper")  # created
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "frame_7.png").write_bytes(b"not ours: 4 digits or more")
    generate.prepare_out(tmp_path / "other")

    out = tmp_path / "kept"
    out.mkdir()
    job, other = "a" * 32, "b" * 32
    assert "2 frame(s)" in generate.save_partial({0: b"0", 1: b"1"}, out, job)
    info = json.loads((out / "clip.json").read_text())
    assert info == {"job_id": job, "complete": False, "frames_received": [0, 1]}
    generate.prepare_out(out, resume=job)
    for refused in ({"resume": other}, {}):
        with pytest.raises(generate.UsageError, match=f"2 frame\\(s\\) of job {job}"):
            generate.prepare_out(out, **refused)
    # A later part of the same job joins the frames kept before.
    generate.save_partial({2: b"2"}, out, job)
    assert sorted(generate.clip_in(out)[0]) == [0, 1, 2]
    assert json.loads((out / "clip.json").read_text())["frames_received"] == [0, 1, 2]
    # Another job's (only with --overwrite): what the first left goes, no two clips mixed.
    (out / "clip.gif").write_bytes(b"GIF89a")
    generate.save_partial({1: b"x"}, out, other)
    assert {i: p.read_bytes() for i, p in generate.clip_in(out)[0].items()} == {1: b"x"}
    assert not (out / "clip.gif").exists()
    assert generate.clip_in(out)[1] == other
    # Nothing received: nothing touched.
    generate.save_partial({}, out, job)
    assert generate.clip_in(out)[1] == other
    # A clip.json that is no JSON object names no job.
    (out / "clip.json").write_text("[1, 2]")
    assert generate.clip_in(out)[1] == ""
    (out / "clip.json").write_bytes(b"\xff\xfe")
    assert generate.clip_in(out)[1] == ""


def test_generate_resume_collects_a_job_submitted_earlier(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from animatediff_blender.protocol.client import BackendClient, ClientConfig
    from animatediff_blender.protocol.messages import GenerateRequest

    with BackendClient(ClientConfig(address=backend)) as client:  # the CLI's own client id
        client.connect()
        job_id = client.submit(GenerateRequest(prompt="x", frames=3, width=64, height=64, steps=1)).job_id
    out = tmp_path / "clip"
    code = main(["generate", "--address", backend, "--resume", job_id, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert sorted(p.name for p in out.glob("frame_*.png")) == [f"frame_{i:04d}.png" for i in range(3)]
    assert f"job {job_id}: 3 frames 64x64" in captured.out
    assert main(["generate", "--address", backend, "--resume", "../etc", "--out", str(out)]) == 2
    assert main(["generate", "--address", backend, "--resume", "0" * 32, "--out", str(tmp_path / "b")]) == 1
    assert "no such job" in capsys.readouterr().err
    # Collected again into its own folder: allowed; another job's folder is not.
    assert main(["generate", "--address", backend, "--resume", job_id, "--out", str(out)]) == 0
    assert main(["generate", "--address", backend, "--resume", "0" * 32, "--out", str(out)]) == 2
    assert f"of job {job_id}" in capsys.readouterr().err
    # --resume cannot change the job's settings: flags that would be ignored are refused.
    code = main(["generate", "--address", backend, "--resume", job_id, "--prompt", "other", "--frames", "9",
                 "--out", str(out)])  # fmt: skip
    assert code == 2 and "drop --prompt, --frames" in capsys.readouterr().err


def test_resume_of_a_job_cancelled_earlier_exits_1_not_130(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """130 is the exit code of this run's own Ctrl-C; a job someone cancelled before is a failure."""
    from animatediff_blender.backend.engine.fake import FakeEngine
    from animatediff_blender.backend.server.config import ServerConfig
    from animatediff_blender.backend.server.server import Server
    from animatediff_blender.protocol.client import BackendClient, ClientConfig
    from animatediff_blender.protocol.messages import GenerateRequest

    server = Server(ServerConfig(key=auth.create_key(), data_dir=tmp_path / "data", bind="tcp://127.0.0.1:*",
                                 linger_ms=0, shutdown_timeout_s=5), FakeEngine(step_delay_s=0.05))  # fmt: skip
    backend = server.start()
    try:
        with BackendClient(ClientConfig(address=backend)) as client:
            client.connect()
            gone = client.submit(GenerateRequest(prompt="x", frames=3, width=64, height=64, steps=100)).job_id
            assert client.cancel(gone).state in ("cancelled", "running")
        assert main(["generate", "--address", backend, "--resume", gone, "--out", str(tmp_path / "c")]) == 1
        assert "cancelled" in capsys.readouterr().err
    finally:
        server.stop()


def test_the_resume_hint_pastes_into_a_shell(tmp_path: Path) -> None:
    """After a lost backend the CLI prints how to collect the job; a folder with a space, or
    a backend elsewhere, made that command unusable as printed."""
    import shlex

    from animatediff_blender.backend.commands.generate import resume_command

    parser = build_parser()
    args = parser.parse_args(["generate", "--address", "tcp://gpu box:5557", "--key-file", str(tmp_path / "my key"),
                              "--prompt", "x", "--out", "my out ü"])  # fmt: skip
    words = shlex.split(resume_command(args, "a" * 32))
    again = parser.parse_args(words[1:])
    assert (again.resume, str(again.out), again.address, again.key_file) == (
        "a" * 32, "my out ü", "tcp://gpu box:5557", tmp_path / "my key")
    plain = parser.parse_args(["generate", "--prompt", "x", "--out", "clip"])
    assert resume_command(plain, "b" * 32) == f"animatediff-blender generate --resume {'b' * 32} --out clip"
    # The clip --overwrite was to replace may still be there: the hint keeps the flag.
    replacing = parser.parse_args(["generate", "--prompt", "x", "--out", "clip", "--overwrite"])
    assert resume_command(replacing, "b" * 32).endswith("--out clip --overwrite")


def test_generate_refuses_an_empty_out_and_a_weight_that_is_no_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--out "$OUT"` with OUT unset wrote the clip into the current folder and deleted its
    frame files; `--lora ZoomIn:abc` was called a path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "frame_0005.png").write_bytes(b"mine")
    with pytest.raises(SystemExit) as info:
        main(["generate", "--prompt", "x", "--out", ""])
    assert info.value.code == 2 and "must not be empty" in capsys.readouterr().err
    assert (tmp_path / "frame_0005.png").read_bytes() == b"mine"
    assert main(["generate", "--prompt", "x", "--lora", "ZoomIn:abc", "--out", "clip"]) == 2
    assert "the weight 'abc' is not a number" in capsys.readouterr().err


def test_generate_says_where_a_queued_job_waits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A job behind another sends no events until it starts: `generate` prints its id and
    place in line at once, and again when it runs; `--resume` of a queued job does too."""
    from animatediff_blender.backend.engine.fake import FakeEngine
    from animatediff_blender.backend.server.config import ServerConfig
    from animatediff_blender.backend.server.server import Server
    from animatediff_blender.protocol.client import BackendClient, ClientConfig
    from animatediff_blender.protocol.messages import GenerateRequest

    server = Server(
        ServerConfig(key=auth.create_key(), data_dir=tmp_path / "data", bind="tcp://127.0.0.1:*", linger_ms=0,
                     shutdown_timeout_s=5),
        FakeEngine(step_delay_s=0.4),
    )  # fmt: skip
    endpoint = server.start()
    try:
        # Another client's job holds the engine for ~8 steps of 0.4 s.
        with BackendClient(ClientConfig(address=endpoint, client_id="f" * 32)) as other:
            other.connect()
            other.submit(GenerateRequest(prompt="first", frames=2, width=64, height=64, steps=8))
            args = ["generate", "--address", endpoint, "--frames", "2", "--width", "64", "--height", "64",
                    "--steps", "1"]  # fmt: skip
            assert main([*args, "--prompt", "second", "--out", str(tmp_path / "a")]) == 0
            lines = capsys.readouterr().err.splitlines()
            queued = [line for line in lines if ": queued, place 1 in line" in line]
            assert len(queued) == 1 and re.fullmatch(r"job [0-9a-f]{32}: queued, place 1 in line", queued[0]), lines
            running = [line for line in lines if line.endswith(": running")]
            assert len(running) <= 1 and lines.index(queued[0]) < (lines.index(running[0]) if running else len(lines))

            other.submit(GenerateRequest(prompt="third", frames=2, width=64, height=64, steps=8))
            with BackendClient(ClientConfig(address=endpoint)) as mine:  # the CLI's own client id
                mine.connect()
                job_id = mine.submit(GenerateRequest(prompt="fourth", frames=2, width=64, height=64, steps=1)).job_id
            assert main(["generate", "--address", endpoint, "--resume", job_id, "--out", str(tmp_path / "b")]) == 0
            assert f"job {job_id}: queued, place 1 in line" in capsys.readouterr().err
    finally:
        server.stop()


def test_generate_list_models(backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--address", backend, "--list-models"]) == 0
    out = capsys.readouterr().out
    assert "base:fake-sd15" in out and "lora:fake_ZoomIn" in out and "(* default)" in out


def test_generate_reports_server_refusals_and_failures(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["generate", "--address", backend, "--width", "64", "--height", "64", "--out", str(tmp_path)]
    assert main([*args, "--prompt", "x", "--lora", "NoSuchLora"]) == 1
    assert "lora:NoSuchLora" in capsys.readouterr().err
    assert main([*args, "--prompt", "x", "--frames", "300"]) == 1  # over the server's limit
    assert "--frames" in capsys.readouterr().err
    assert main([*args, "--prompt", "!oom", "--frames", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: job ") and "memory" in err[-1]


def _generate_8_frames_against(
    engine: Any, data: Path, out: Path, before_stop: Callable[[], object] | None = None
) -> int:
    """`generate` of 8 frames (two chunks of 4) against `engine` behind a real server storing
    in `data`; the exit code."""
    from animatediff_blender.backend.server.config import ServerConfig
    from animatediff_blender.backend.server.server import Server

    server = Server(
        ServerConfig(
            key=auth.create_key(), data_dir=data, bind="tcp://127.0.0.1:*", linger_ms=0, shutdown_timeout_s=5
        ),
        engine,
    )  # fmt: skip
    endpoint = server.start()
    try:
        return main(["generate", "--address", endpoint, "--prompt", "x", "--frames", "8", "--width", "64",
                     "--height", "64", "--steps", "1", "--out", str(out)])  # fmt: skip
    finally:
        if before_stop is not None:
            before_stop()
        server.stop()


def _engine_that_after_the_first_chunk(data: Path, then: Callable[[Callable[[], bool]], None]) -> Any:
    """A FakeEngine whose second chunk of frames waits until the first is stored under `data`
    (so on its way to the client), then calls `then(should_cancel)`, which must raise."""
    import time

    from animatediff_blender.backend.engine.fake import FakeEngine
    from animatediff_blender.backend.engine.interface import FrameSink

    class AfterFirstChunk(FakeEngine):
        def generate(self, request, progress, should_cancel, on_frames: FrameSink | None = None):  # type: ignore[no-untyped-def]
            def sink(start: int, frames: list) -> None:  # type: ignore[type-arg]
                if start > 0:
                    deadline = time.monotonic() + 10
                    while not list(data.glob("jobs/*/frame_0003.png")) and time.monotonic() < deadline:
                        time.sleep(0.02)
                    time.sleep(0.3)
                    then(should_cancel)
                assert on_frames is not None
                on_frames(start, frames)

            return super().generate(request, progress, should_cancel, sink)

    return AfterFirstChunk()


def test_frames_received_before_a_failure_are_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The engine fails after its first chunk of frames reached the client (a VAE decode out of
    memory): the backend deletes the job's frames, so the client's copy must be saved."""
    from animatediff_blender.backend.engine.interface import EngineError

    def decode_runs_out_of_memory(_should_cancel: Callable[[], bool]) -> None:
        raise EngineError("out_of_memory", "VAE decode ran out of memory")

    data = tmp_path / "data"
    out = tmp_path / "clip"
    engine = _engine_that_after_the_first_chunk(data, decode_runs_out_of_memory)
    assert _generate_8_frames_against(engine, data, out) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "memory" in err[-1] and "4 frame(s)" in err[-1] and str(out) in err[-1]
    assert sorted(p.name for p in out.glob("frame_*.png")) == [f"frame_{i:04d}.png" for i in range(4)]
    assert iio.imread(out / "frame_0000.png").shape[:2] == (64, 64)
    info = json.loads((out / "clip.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{32}", info["job_id"]) and info["frames_received"] == [0, 1, 2, 3]


@pytest.mark.skipif(os.name != "posix", reason="sends itself SIGINT")
def test_second_ctrl_c_keeps_the_frames_received(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The first Ctrl-C asks the backend to cancel; the engine is slow to stop, so a second
    one quits at once.  The backend deletes the cancelled job's frames: the client's copy of
    those that arrived must still reach --out (they used to be dropped)."""
    import signal
    import threading
    import time

    from animatediff_blender.backend.engine.interface import JobCancelled

    quit_done = threading.Event()

    def ctrl_c_twice(should_cancel: Callable[[], bool]) -> None:
        # Ctrl-C once, and once more after the backend took the cancel (the engine does not
        # stop in time).
        deadline = time.monotonic() + 10
        os.kill(os.getpid(), signal.SIGINT)
        while not should_cancel() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)
        quit_done.wait(10)
        raise JobCancelled()

    data = tmp_path / "data"
    out = tmp_path / "clip"
    engine = _engine_that_after_the_first_chunk(data, ctrl_c_twice)
    assert _generate_8_frames_against(engine, data, out, before_stop=quit_done.set) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert "cancelling" in "\n".join(err)
    assert err[-1].startswith("interrupted") and "4 frame(s)" in err[-1] and str(out) in err[-1], err
    assert sorted(p.name for p in out.glob("frame_*.png")) == [f"frame_{i:04d}.png" for i in range(4)]
    assert iio.imread(out / "frame_0000.png").shape[:2] == (64, 64)
    # The job's id came from its acceptance (a Ctrl-C carries none): --resume may add to them.
    assert json.loads((out / "clip.json").read_text())["frames_received"] == [0, 1, 2, 3]
    generate.prepare_out(out, resume=json.loads((out / "clip.json").read_text())["job_id"])


def test_generate_with_a_wrong_key(backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other.key"
    auth.create_key(other)
    code = main(["generate", "--address", backend, "--key-file", str(other), "--prompt", "x", "--out", str(tmp_path)])  # fmt: skip
    assert code == 1
    assert "different key" in capsys.readouterr().err


def test_model_aliases_resolve_to_registry_ids() -> None:
    from animatediff_blender.backend.commands.generate import UsageError, resolve_alias, resolve_aliases
    from animatediff_blender.protocol.messages import GenerateRequest, ModelInfo, MotionLora

    models = [
        ModelInfo(id="lora:v2_lora_ZoomIn.ckpt", kind="lora", format="original", label="Zoom in", camera_motion="ZoomIn"),
        ModelInfo(id="lora:motion-lora-zoom-in", kind="lora", format="diffusers", label="Zoom in (diffusers)"),
        ModelInfo(id="lora:v2_lora_PanLeft.ckpt", kind="lora", format="original", label="Pan left", camera_motion="PanLeft"),
        ModelInfo(id="motion:mm_sd_v15_v2.safetensors", kind="motion", format="original", label="mm_sd_v15_v2 (v2)"),
    ]
    assert resolve_alias("lora:ZoomIn", models) == "lora:v2_lora_ZoomIn.ckpt"
    assert resolve_alias("lora:pan-left", models) == "lora:v2_lora_PanLeft.ckpt"
    assert resolve_alias("lora:Pan left", models) == "lora:v2_lora_PanLeft.ckpt"
    assert resolve_alias("motion:mm_sd_v15_v2", models) == "motion:mm_sd_v15_v2.safetensors"
    # exact ids pass unchanged; an unknown alias is left for the backend to refuse
    assert resolve_alias("lora:motion-lora-zoom-in", models) == "lora:motion-lora-zoom-in"
    assert resolve_alias("lora:TiltUp", models) == "lora:TiltUp"
    # a kind mismatch never resolves
    assert resolve_alias("motion:ZoomIn", models) == "motion:ZoomIn"
    req = resolve_aliases(
        GenerateRequest(prompt="x", motion_module="motion:mm_sd_v15_v2", motion_loras=[MotionLora(id="lora:ZoomIn", weight=-0.5)]),
        models,
    )
    assert req.motion_module == "motion:mm_sd_v15_v2.safetensors"
    assert [(m.id, m.weight) for m in req.motion_loras] == [("lora:v2_lora_ZoomIn.ckpt", -0.5)]
    # the same move in two formats (the .ckpt and the fetched hub folder): the first in the
    # backend's order, as the add-on picks it; it used to be refused as ambiguous
    twin = ModelInfo(id="lora:animatediff-motion-lora-zoom-in", kind="lora", format="diffusers", label="Zoom in",
                     camera_motion="ZoomIn")
    assert resolve_alias("lora:ZoomIn", [twin, *models]) == "lora:animatediff-motion-lora-zoom-in"
    assert resolve_alias("lora:zoom in", [*models, twin]) == "lora:v2_lora_ZoomIn.ckpt"
    # other aliases matching several entries are refused, naming them
    stems = [ModelInfo(id=f"motion:mm_v2.{ext}", kind="motion", format="original", label=f"mm_v2 {ext}")
             for ext in ("ckpt", "safetensors")]
    with pytest.raises(UsageError, match="could mean any of motion:mm_v2.ckpt, motion:mm_v2.safetensors"):
        resolve_alias("motion:mm_v2", stems)


def test_list_models_rescan_shows_a_checkpoint_dropped_in_later(
    tiny_zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README says dropped-in checkpoints "appear after a rescan", and no command asked
    for one: only a restart showed them."""
    import shutil

    from animatediff_blender.backend.engine.animatediff import AnimateDiffEngine
    from animatediff_blender.backend.server.config import ServerConfig
    from animatediff_blender.backend.server.server import Server

    models = tmp_path / "models"
    shutil.copytree(tiny_zoo / "motion" / "tiny-motion-adapter-v2", models / "motion" / "tiny-motion-adapter-v2")
    engine = AnimateDiffEngine(models, device="cpu")
    server = Server(ServerConfig(key=auth.create_key(), data_dir=tmp_path / "data", bind="tcp://127.0.0.1:*",
                                 linger_ms=0, shutdown_timeout_s=5), engine)  # fmt: skip
    endpoint = server.start()
    try:
        (models / "lora").mkdir()
        shutil.copy2(tiny_zoo / "lora" / "v2_lora_ZoomIn.ckpt", models / "lora")
        assert main(["generate", "--address", endpoint, "--list-models"]) == 0
        assert "lora:v2_lora_ZoomIn.ckpt" not in capsys.readouterr().out  # the list read at the start
        assert main(["generate", "--address", endpoint, "--list-models", "--rescan"]) == 0
        assert "lora:v2_lora_ZoomIn.ckpt" in capsys.readouterr().out
    finally:
        server.stop()
