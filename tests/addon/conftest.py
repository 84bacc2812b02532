"""Add-on tests: real Blender (the PyPI `bpy` wheels) in subprocesses, each with a timeout.

Interpreters: ANIMATEDIFF_BLENDER_BPY_PYTHONS="4.2=/path/to/python,5.3=/path/to/python"
(comma- or os.pathsep-separated `label=python` pairs, oldest first), else those of
scripts/setup.sh in the repository root: `.venv-bpy42` (4.2 LTS), `.venv-bpy45` (4.5 LTS),
`.venv-bpy50` (5.0) and `.venv-bpy5` (the newest 5.x).  Tests of one Blender take the
oldest or the newest; the others run on each.  A missing interpreter fails the test under CI
(CI set), and skips it locally.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "scripts"
SERVE = [str(Path(sys.executable).with_name("animatediff-blender")), "serve"]
RESULT_PREFIX = "ADB-RESULT: "


@dataclass(frozen=True)
class BpyPython:
    label: str  # "4.2"
    python: Path

    @property
    def py_tag(self) -> str:
        """Which zip this Blender takes: py311 before 5.1, py313 from 5.1 on."""
        major, minor = (int(x) for x in self.label.split(".")[:2])
        return "py313" if (major, minor) >= (5, 1) else "py311"


def _configured() -> list[tuple[str, Path]]:
    raw = os.environ.get("ANIMATEDIFF_BLENDER_BPY_PYTHONS", "").strip()
    if raw:
        out = []
        for item in raw.replace(os.pathsep, ",").split(","):
            if "=" in item:
                label, path = item.split("=", 1)
                out.append((label.strip(), Path(path.strip())))
        return out
    return [(label, ROOT / venv / "bin" / "python")
            for label, venv in (("4.2", ".venv-bpy42"), ("4.5", ".venv-bpy45"), ("5.0", ".venv-bpy50"), ("5.3", ".venv-bpy5"))]


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def addon_modules(*names: str) -> tuple[Any, ...]:
    """Modules of blender_addon imported as the package `_adb_pkg` without its bpy-only
    __init__ (the worker thread's modules, for plain-Python tests); `protocol/` is found beside
    them, as build.py bundles it."""
    import importlib
    import types

    package = "_adb_pkg"
    if package not in sys.modules:
        pkg = types.ModuleType(package)
        pkg.__path__ = [str(ROOT / "blender_addon"), str(ROOT)]
        sys.modules[package] = pkg
    importlib.import_module(f"{package}.protocol.client")
    return tuple(importlib.import_module(f"{package}.{name}") for name in names)


def bpy_pythons() -> list[BpyPython]:
    return [BpyPython(label, path) for label, path in _configured()]


def require(bpy_python: BpyPython) -> BpyPython:
    if not bpy_python.python.exists():
        msg = f"bpy interpreter for Blender {bpy_python.label} not found at {bpy_python.python}"
        if _in_ci():
            pytest.fail(msg + " (CI must provide it)")
        pytest.skip(msg)
    return bpy_python


def newest() -> BpyPython:
    return bpy_pythons()[-1]


def oldest() -> BpyPython:
    return bpy_pythons()[0]


@pytest.fixture(scope="session")
def addon_zips() -> dict[str, Path]:
    """The extension zips for this platform, built once per session: {"py311": zip, "py313": zip}."""
    if not any(b.python.exists() for b in bpy_pythons()):
        require(bpy_pythons()[0])  # build.py needs Blender's tooling from a bpy wheel
    out = ROOT / "build" / "test-dist"
    proc = subprocess.run([sys.executable, str(ROOT / "build.py"), "--platform", "current", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    zips: dict[str, Path] = {}
    for line in proc.stdout.splitlines():
        path = Path(line.split()[-1])
        for tag in ("py311", "py313"):
            if f"-{tag}-" in path.name:
                zips[tag] = path
    assert set(zips) == {"py311", "py313"}, proc.stdout
    return zips


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Backend:
    address: str
    key_file: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


def start_backend(tmp: Path, *extra: str, engine: str = "fake", models_dir: Path | None = None) -> Backend:
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    key = tmp / "hmac.key"
    log = tmp / f"serve-{port}.log"
    args = [*SERVE, "--bind", address, "--data-dir", str(tmp / "data"), "--key-file", str(key),
            "--models-dir", str(models_dir or tmp / "models"), "--engine", engine, *extra]
    if engine == "animatediff":
        args += ["--device", "cpu", "--dtype", "float32"]
    env = dict(os.environ)
    env["ANIMATEDIFF_BLENDER_CONFIG"] = str(tmp / "config")
    proc = subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"backend exited: {log.read_text()}")
        if "listening on" in log.read_text(errors="replace"):
            return Backend(address, key, proc, log)
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"backend did not start: {log.read_text()}")


@pytest.fixture
def backend_factory(tmp_path: Path) -> Iterator[object]:
    started: list[Backend] = []

    def make(*extra: str, **kw: object) -> Backend:
        b = start_backend(tmp_path, *extra, **kw)  # type: ignore[arg-type]
        started.append(b)
        return b

    yield make
    for b in started:
        if b.proc.poll() is None:
            b.proc.terminate()
            try:
                b.proc.wait(10)
            except subprocess.TimeoutExpired:
                b.proc.kill()


def run_bpy(bpy_python: BpyPython, script: str, args: dict[str, object], tmp: Path, timeout: float = 180,
            extra_env: dict[str, str] | None = None) -> dict[str, object]:
    """Run `scripts/<script>` in a bpy interpreter with a throw-away Blender profile; return
    the JSON it printed after RESULT_PREFIX.  The script's own asserts fail the test."""
    require(bpy_python)
    profile = tmp / f"profile-{bpy_python.label}-{script.removesuffix('.py')}"
    profile.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({
        "BLENDER_USER_RESOURCES": str(profile),
        "ANIMATEDIFF_BLENDER_CONFIG": str(tmp / "config"),
        "PYTHONFAULTHANDLER": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    env.update(extra_env or {})
    args_file = tmp / f"args-{bpy_python.label}-{script}.json"
    args_file.write_text(json.dumps(args, default=str))
    cmd = [str(bpy_python.python), str(SCRIPTS / script), str(args_file)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout
        raise AssertionError(f"{script} on bpy {bpy_python.label} hung past {timeout} s:\n{out}") from None
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} on bpy {bpy_python.label} exited {proc.returncode}:\n{out[-6000:]}"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
            result["_output"] = out
            return result
    raise AssertionError(f"{script} printed no result:\n{out[-6000:]}")
