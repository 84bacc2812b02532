"""Command inputs that used to end in a traceback, in silent nonsense, or in minutes of work
before the error: each now gets one `error` line and the command's usage (2) or runtime (1)
exit code, before any work.  Whatever would measure, build or download is replaced by a stub
that fails the test if it is reached."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, NoReturn

import pytest

from animatediff_blender.backend.cli import main


def _never(*args: Any, **kwargs: Any) -> NoReturn:
    raise AssertionError("reached the work the input should have been refused before")


def _one_error_line(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    """An argparse usage error: exit 2 and `animatediff-blender ...: error: ...`."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: argument" in err, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "afile"
    path.write_text("x")
    return path


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("below", ["", "sub"])
def test_models_fetch_into_a_file_is_refused(
    below: str, a_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from animatediff_blender.backend.models import fetch

    monkeypatch.setattr(fetch, "fetch", _never)
    target = a_file / below if below else a_file
    assert main(["models", "fetch", "--only", "loras", "--models-dir", str(target)]) == 2
    line = _one_error_line(capsys, "error: ", str(target), "is not a directory")
    assert below == "" or f"{a_file} is a file" in line


def test_models_fetch_creates_a_missing_folder_and_reports_os_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from animatediff_blender.backend.models import fetch

    def unwritable(models_dir: Path, *args: Any, **kwargs: Any) -> NoReturn:
        raise PermissionError(13, "Permission denied", str(models_dir))

    monkeypatch.setattr(fetch, "fetch", unwritable)
    target = tmp_path / "new" / "models"  # missing: fetch may create it
    assert main(["models", "fetch", "--only", "loras", "--models-dir", str(target)]) == 1
    _one_error_line(capsys, "error: cannot fetch into", "Permission denied")


@pytest.mark.parametrize("action", ["list", "verify"])
@pytest.mark.parametrize("kind", ["missing", "file", "below-a-file"])
def test_models_list_and_verify_refuse_a_folder_that_is_not_one(
    action: str, kind: str, tmp_path: Path, a_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = {"missing": tmp_path / "nonexist", "file": a_file, "below-a-file": a_file / "sub"}[kind]
    assert main(["models", action, "--models-dir", str(target)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing that looks like a listing or a verification
    wanted = "does not exist" if kind == "missing" else "is not a directory"
    assert captured.err.startswith("error: ") and "Traceback" not in captured.err
    assert f"--models-dir {target} " in captured.err and wanted in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_models_list_json_refuses_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list", "--models-dir", str(tmp_path / "nonexist"), "--json"]) == 2
    assert capsys.readouterr().out == ""


def test_models_list_of_the_default_folder_on_a_fresh_install_says_what_to_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The default folder (<data>/models, the conftest's tmp data dir) does not exist yet:
    # not a typo, a fresh install.  A file there is an error, though.
    assert main(["models", "list"]) == 0
    assert "models fetch" in capsys.readouterr().out
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "models").write_text("x")
    assert main(["models", "list"]) == 2
    _one_error_line(capsys, "error: the models directory", "is not a directory")
    assert main(["models", "verify"]) == 2
    _one_error_line(capsys, "is not a directory")


@pytest.mark.parametrize(
    "argv",
    [
        ["models", "zoo", ""],
        ["models", "zoo", " "],
        ["models", "list", "--models-dir", ""],
        ["models", "verify", "--models-dir", ""],
        ["models", "fetch", "--dry-run", "--models-dir", ""],
    ],
    ids=["zoo", "zoo-blank", "list", "verify", "fetch"],
)
def test_models_refuse_an_empty_path(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from animatediff_blender.backend.models import zoo

    monkeypatch.setattr(zoo, "build_zoo", _never)
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    _usage_error(argv, capsys, "must not be empty")
    assert list(here.iterdir()) == []


# --------------------------------------------------------------------------- demo


@pytest.fixture
def no_demo_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from animatediff_blender.backend import demo

    monkeypatch.setattr(demo, "run_demo", _never)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--frames", "0"], "--frames 0"),
        (["--frames", "-3"], "--frames -3"),
        (["--frames", "100000"], "--frames 100000"),
        (["--steps", "0"], "--steps 0"),
        (["--steps", "100000"], "--steps 100000"),
        (["--size", "100"], "multiple of 8"),
        (["--size", "0"], "multiple of 8"),
        (["--size", "4"], "multiple of 8"),
        (["--size", "4096"], "multiple of 8 between 8 and"),
        (["--size", "1024", "--frames", "200"], "pixels"),
    ],
)
def test_demo_refuses_clip_settings_before_building_anything(
    flags: list[str], needle: str, tmp_path: Path, no_demo_run: None, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo2"
    assert main(["demo", "--out", str(out), *flags]) == 2
    _one_error_line(capsys, "animatediff-blender demo: error: ", needle)
    assert not out.exists()


@pytest.mark.parametrize("below", ["", "sub"])
def test_demo_refuses_an_out_that_is_a_file(
    below: str, a_file: Path, no_demo_run: None, capsys: pytest.CaptureFixture[str]
) -> None:
    out = a_file / below if below else a_file
    assert main(["demo", "--out", str(out)]) == 2
    _one_error_line(capsys, "animatediff-blender demo: error: ", f"--out {out} is not a directory")


def test_demo_refuses_an_empty_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_demo_run: None, capsys: pytest.CaptureFixture[str]
) -> None:
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    _usage_error(["demo", "--out", ""], capsys, "--out", "must not be empty")
    assert list(here.iterdir()) == []


def test_demo_reports_an_unwritable_out_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from animatediff_blender.backend import demo

    def unwritable(out: Path, **kwargs: Any) -> NoReturn:
        raise PermissionError(13, "Permission denied", str(out))

    monkeypatch.setattr(demo, "run_demo", unwritable)
    assert main(["demo", "--out", str(tmp_path / "out")]) == 1
    _one_error_line(capsys, "demo failed: ", "Permission denied")


# --------------------------------------------------------------------------- bench-server

SERVER_FAST = ["bench-server", "--frames", "1", "--size", "8", "--repeats", "1"]


@pytest.fixture
def no_server_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    from animatediff_blender.backend.bench import overhead

    monkeypatch.setattr(overhead, "measure_server_overhead", _never)


@pytest.mark.parametrize("kind", ["no-folder", "below-a-file", "a-directory"])
def test_bench_server_checks_json_before_measuring(
    kind: str, tmp_path: Path, a_file: Path, no_server_measuring: None, capsys: pytest.CaptureFixture[str]
) -> None:
    target = {"no-folder": tmp_path / "nodir" / "x.json", "below-a-file": a_file / "x.json", "a-directory": tmp_path}[kind]
    started = time.monotonic()
    code = main([*SERVER_FAST, "--denoise-s", "0", "--decode-s", "0", "--json", str(target)])
    assert code == 2 and time.monotonic() - started < 10
    _one_error_line(capsys, "animatediff-blender bench-server: ", f"--json {target}")
    assert not (tmp_path / "nodir").exists()


@pytest.mark.parametrize("flag", ["--denoise-s", "--decode-s"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1"])
def test_bench_server_refuses_times_that_are_not_finite(
    flag: str, value: str, no_server_measuring: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*SERVER_FAST, "--denoise-s", "0", "--decode-s", "0", f"{flag}={value}"]) == 2
    _one_error_line(capsys, "animatediff-blender bench-server: ", "finite")


# --------------------------------------------------------------------------- bench-attention

ATTENTION_FAST = ["bench-attention", "--size", "tiny", "--iters", "1", "--backend", "math", "--case", "quality"]


@pytest.fixture
def no_attention_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    from animatediff_blender.backend.bench import attention

    monkeypatch.setattr(attention, "bench_case", _never)


@pytest.mark.parametrize("kind", ["no-folder", "below-a-file", "a-directory"])
def test_bench_attention_checks_json_before_the_first_case(
    kind: str, tmp_path: Path, a_file: Path, no_attention_timing: None, capsys: pytest.CaptureFixture[str]
) -> None:
    target = {"no-folder": tmp_path / "nodir" / "x.json", "below-a-file": a_file / "x.json", "a-directory": tmp_path}[kind]
    assert main([*ATTENTION_FAST, "--device", "cpu", "--json", str(target)]) == 2
    _one_error_line(capsys, "animatediff-blender bench-attention: ", f"--json {target}")


@pytest.mark.parametrize("device", ["bogus", "cpu:x", "cpu:-1"])
def test_bench_attention_refuses_an_unknown_device(
    device: str, no_attention_timing: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*ATTENTION_FAST, "--device", device]) == 2
    _one_error_line(capsys, "animatediff-blender bench-attention: ", "--device")


def test_bench_attention_refuses_a_cuda_device_there_is_none_of(
    monkeypatch: pytest.MonkeyPatch, no_attention_timing: None, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main([*ATTENTION_FAST, "--device", "cuda:3"]) == 2
    _one_error_line(capsys, "--device cuda:3", "1 CUDA device")


# --------------------------------------------------------------------------- bench


@pytest.fixture
def no_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    from animatediff_blender.backend.bench import run

    monkeypatch.setattr(run, "run_benchmark", _never)


BENCH_FAST = ["bench", "--case", "quality", "--repeats", "0", "--engine-only"]


@pytest.mark.parametrize("device", ["bogus", "cuda:x"])
def test_bench_refuses_an_unknown_device(
    device: str, tmp_path: Path, no_benchmark: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*BENCH_FAST, "--device", device, "--json", str(tmp_path / "r.json")]) == 2
    _one_error_line(capsys, "animatediff-blender bench: ", f"--device {device!r}", "not a torch device")


@pytest.mark.parametrize("kind", ["a-directory", "below-a-file"])
def test_bench_checks_json_before_measuring(
    kind: str, tmp_path: Path, a_file: Path, no_benchmark: None, capsys: pytest.CaptureFixture[str]
) -> None:
    jdir = tmp_path / "jdir"
    jdir.mkdir()
    target = {"a-directory": jdir, "below-a-file": a_file / "x.json"}[kind]
    argv = [*BENCH_FAST, "--device", "cpu", "--workdir", str(tmp_path / "bw"), "--json", str(target)]
    assert main(argv) == 2
    _one_error_line(capsys, "animatediff-blender bench: ", f"--json {target}")
    assert not (tmp_path / "bw").exists()


def test_bench_refuses_a_workdir_below_a_file(
    tmp_path: Path, a_file: Path, no_benchmark: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*BENCH_FAST, "--device", "cpu", "--workdir", str(a_file / "bw"), "--json", str(tmp_path / "r.json")]
    assert main(argv) == 2
    _one_error_line(capsys, "animatediff-blender bench: ", "--workdir", "is not a directory")


def test_bench_creates_a_missing_json_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Unlike bench-server's, bench's result file gets its folders (scripts rely on it): a
    missing one is no error; what the benchmark raises for files is one line, exit 1."""
    from animatediff_blender.backend.bench import run

    seen: dict[str, Any] = {}

    def unwritable(**kwargs: Any) -> NoReturn:
        seen.update(kwargs)
        raise PermissionError(13, "Permission denied", str(kwargs["out_json"]))

    monkeypatch.setattr(run, "run_benchmark", unwritable)
    target = tmp_path / "new" / "r.json"
    assert main([*BENCH_FAST, "--device", "cpu", "--workdir", str(tmp_path / "bw"), "--json", str(target)]) == 1
    assert seen["out_json"] == target
    _one_error_line(capsys, "animatediff-blender bench: ", "Permission denied")


def test_run_benchmark_refuses_a_directory_as_its_result_file(tmp_path: Path) -> None:
    from animatediff_blender.backend.bench.run import run_benchmark

    with pytest.raises(ValueError, match="is a directory"):
        run_benchmark(size="tiny", device="cpu", dtype="fp32", workdir=tmp_path / "bw", only=["quality"],
                      repeats=0, engine_only=True, out_json=tmp_path)  # fmt: skip
    assert not (tmp_path / "bw").exists()


# --------------------------------------------------------------------------- bench-report


def _rows_file(path: Path, rows: list[dict[str, Any]], key: str = "results") -> Path:
    path.write_text(json.dumps({"device": "cpu", key: rows}))
    return path


def test_bench_report_names_the_file_it_cannot_parse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    assert main(["bench-report", str(bad)]) == 2
    _one_error_line(capsys, "animatediff-blender bench-report: ", str(bad), "not JSON")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert main(["bench-report", str(binary)]) == 2
    _one_error_line(capsys, str(binary))


@pytest.mark.parametrize(
    "content",
    ['{}', '{"device": "cpu"}', '{"results": []}', '{"results": "abc"}', '{"partial": [1, 2]}'],
    ids=["empty", "no-rows-key", "no-rows", "rows-not-a-list", "rows-not-objects"],
)
def test_bench_report_refuses_a_file_without_result_rows(
    content: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.json"
    empty.write_text(content)
    for fastest in ([], ["--fastest", "quality"]):
        assert main(["bench-report", *fastest, str(empty)]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and "Traceback" not in captured.err
        assert len(captured.err.strip().splitlines()) == 1
        assert captured.err.startswith("animatediff-blender bench-report: ")
        assert str(empty) in captured.err and "bench --json" in captured.err


def test_bench_report_warns_of_a_stopped_phase_beside_real_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """gpu_bench.sh passes every phase's file: one a phase left before its first row is
    noted, not fatal, when another file has rows."""
    stopped = _rows_file(tmp_path / "stopped.json", [], key="partial")
    real = _rows_file(tmp_path / "real.json", [{"case": "quality", "runner": "stock", "denoise_s": 1.0, "error": ""}])
    assert main(["bench-report", str(stopped), str(real)]) == 0
    captured = capsys.readouterr()
    assert "1 rows from 2 file(s)" in captured.out
    assert f"{stopped}: no result rows" in captured.err


def test_bench_report_fastest_refuses_an_unknown_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    real = _rows_file(tmp_path / "real.json", [{"case": "quality", "runner": "stock", "denoise_s": 1.0, "error": ""}])
    _usage_error(["bench-report", "--fastest", "nocase", str(real)], capsys, "--fastest", "quality")
    assert capsys.readouterr().out == ""


def test_demo_from_an_installed_package_says_it_needs_a_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Installed with pip, the package has no build.py: the demo said "run ./scripts/setup.sh"
    and then "can't open file .../site-packages/animatediff_blender/build.py"."""
    from animatediff_blender.backend import demo

    monkeypatch.setattr(demo, "REPO_ROOT", tmp_path / "site-packages" / "animatediff_blender")
    with pytest.raises(demo.DemoError, match="source checkout.*make demo"):
        demo.run_demo(tmp_path / "out", blender_python=tmp_path / "python")
    assert not (tmp_path / "out").exists()
