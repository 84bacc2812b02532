"""The offline end-to-end demo: the main job, on the embedded tiny model, on the CPU.

1. build the tiny model zoo (deterministic, no network);
2. build the Blender extension zip for this platform;
3. create an HMAC key and start a local backend on loopback;
4. in headless Blender (the PyPI `bpy` module), install the extension into a throwaway
   profile and run its batch entry point: one 16-frame shot, placed on the Video
   Sequencer as an image strip, `.blend` saved;
5. reopen the saved `.blend` in a fresh Blender and read the strip back;
6. write an animated preview (GIF, and MP4 when ffmpeg is available) and a contact sheet.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from animatediff_blender.backend import media

REPO_ROOT = Path(__file__).resolve().parent.parent
ADDON_ID = "animatediff_blender"


class DemoError(RuntimeError):
    pass


@dataclass
class DemoResult:
    blend: Path
    frames_dir: Path
    frames: int
    gif: Path
    mp4: Path | None
    contact_sheet: Path
    strip: dict


def default_blender_python() -> Path:
    env = os.environ.get("ANIMATEDIFF_BLENDER_DEMO_PYTHON")
    if env:
        return Path(env)
    return REPO_ROOT / ".venv-bpy42" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str], *, env: dict[str, str], timeout: float, what: str) -> subprocess.CompletedProcess[str]:
    print(f"demo: {what}", flush=True)
    proc = subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=timeout)
    if proc.returncode != 0:
        raise DemoError(
            f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def _wait_for_backend(address: str, key_file: Path, server: subprocess.Popen[bytes], timeout: float) -> str:
    from animatediff_blender.protocol.client import BackendClient, ClientConfig, ClientError

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise DemoError(f"the backend exited early with code {server.returncode}; see its log")
        client = BackendClient(ClientConfig(address=address, key_file=key_file, timeout_s=2.0, client_name="demo"))
        try:
            welcome = client.connect()
            return f"backend {welcome.server_version} on {welcome.device}, {len(welcome.models)} models"
        except ClientError as exc:
            last = str(exc)
        finally:
            client.close()
        time.sleep(0.3)
    raise DemoError(f"the backend did not answer within {timeout:.0f} s: {last}")


def run_demo(
    out: Path,
    *,
    blender_python: Path,
    frames: int = 16,
    size: int = 128,
    steps: int = 12,
    timeout: float = 900.0,
) -> DemoResult:
    from animatediff_blender.backend.models.zoo import build_zoo
    from animatediff_blender.protocol import auth

    if not (REPO_ROOT / "build.py").is_file() or not (REPO_ROOT / "blender_addon").is_dir():
        # An installed package (pip install ...[backend]) has neither: the demo builds the extension.
        raise DemoError(
            "the demo builds the Blender extension from a source checkout, and this is an installed "
            "package: in a clone of the repository run `make demo`"
        )
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not blender_python.exists():
        raise DemoError(
            f"no Blender Python at {blender_python}: run ./scripts/setup.sh (or pass --blender-python)"
        )

    # 1. models
    print("demo: building the tiny model zoo", flush=True)
    zoo = build_zoo(out / "models")

    # 2. extension zip
    addon_dir = out / "addon"
    addon_dir.mkdir(exist_ok=True)
    env = dict(os.environ)
    env["ANIMATEDIFF_BLENDER_CONFIG"] = str(out / "config")
    env["HF_HUB_OFFLINE"] = "1"
    _run(
        [sys.executable, str(REPO_ROOT / "build.py"), "--platform", "current", "--out", str(addon_dir)],
        env=env,
        timeout=600,
        what="building the Blender extension",
    )
    zips = sorted(addon_dir.glob("*.zip"), key=lambda p: p.stat().st_mtime)
    zip_for_python = _pick_zip(zips, blender_python)

    # 3. key + backend
    key_file = out / "config" / "hmac.key"
    if not key_file.exists():
        auth.create_key(key_file)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    log_path = out / "backend.log"
    print(f"demo: starting the backend on {address} (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [
                sys.executable, "-m", "animatediff_blender.backend.cli", "serve",
                "--bind", address, "--models-dir", str(zoo), "--data-dir", str(out / "backend-data"),
                "--key-file", str(key_file), "--device", "cpu",
            ],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        print("demo: " + _wait_for_backend(address, key_file, server, timeout=120), flush=True)

        # 4. headless Blender: install the extension, render one shot through the batch entry point
        shots = out / "shots.json"
        shots.write_text(
            json.dumps(
                {
                    "shots": [
                        {
                            "name": "demo",
                            "prompt": "a lighthouse on a cliff at sunset, waves crashing",
                            "negative_prompt": "blurry",
                            "motion_loras": {"ZoomIn": 0.8},
                            "frames": frames,
                            "width": size,
                            "height": size,
                            "steps": steps,
                            "seed": 42,
                            "channel": 2,
                            "start_frame": 1,
                        }
                    ]
                },
                indent=2,
            )
        )
        blend = out / "demo.blend"
        benv = dict(env)
        benv["BLENDER_USER_RESOURCES"] = str(out / "blender-profile")
        proc = _run(
            [
                str(blender_python), str(REPO_ROOT / "blender_addon" / "batch.py"), str(shots),
                "--addon-zip", str(zip_for_python), "--address", address, "--key-file", str(key_file),
                "--out-blend", str(blend), "--overwrite",  # (a rerun replaces the last demo's .blend)
            ],
            env=benv, timeout=timeout, what="rendering in headless Blender (batch entry point)",
        )  # fmt: skip
        sys.stdout.write(textwrap.indent(proc.stdout[-3000:], "  blender| "))

        # 5. reopen the saved file and read the strip back
        strip = _inspect_blend(blender_python, blend, benv)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()

    frames_dir = Path(strip["directory"])
    files = [frames_dir / name for name in strip["files"]]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise DemoError(f"the saved .blend names frames that are not on disk: {missing[:3]}")
    if len(files) != frames:
        raise DemoError(f"expected a {frames}-frame strip, the .blend has {len(files)}")

    # 6. previews
    images = [media.decode_png(f.read_bytes()) for f in files]
    gif = media.write_gif(images, out / "preview.gif", fps=float(strip.get("fps", 8)))
    mp4 = media.write_mp4(images, out / "preview.mp4", fps=float(strip.get("fps", 8)))
    sheet = media.contact_sheet(images, out / "contact_sheet.png")
    return DemoResult(blend, frames_dir, len(files), gif, mp4, sheet, strip)


def _pick_zip(zips: list[Path], blender_python: Path) -> Path:
    if not zips:
        raise DemoError("build.py produced no extension zip")
    ver = subprocess.run(
        [str(blender_python), "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    # Builds for Blender 5.1+ (Python 3.13) and for 4.2-5.0 (Python 3.11) are separate zips.
    tag = "py313" if ver == "3.13" else "py311"
    tagged = [z for z in zips if tag in z.name]
    return (tagged or zips)[-1]


_INSPECT = r"""
import bpy, json, os, sys
scene = bpy.context.scene
se = scene.sequence_editor
strips = list(se.strips_all if hasattr(se, "strips_all") else se.sequences_all)
img = [s for s in strips if s.type == "IMAGE"]
if len(img) != 1:
    sys.exit(f"expected one image strip, found {len(img)}")
s = img[0]
directory = bpy.path.abspath(s.directory)
print("STRIP=" + json.dumps({
    "name": s.name, "channel": s.channel, "frame_start": int(s.frame_start),
    "frame_final_duration": int(s.frame_final_duration), "directory": os.path.normpath(directory),
    "relative_directory": s.directory, "files": [e.filename for e in s.elements],
    "fps": scene.render.fps / scene.render.fps_base,
    "settings": s.get("animatediff", ""),
}))
"""


def _inspect_blend(blender_python: Path, blend: Path, env: dict[str, str]) -> dict:
    proc = _run(
        [str(blender_python), "-c", f"import bpy; bpy.ops.wm.open_mainfile(filepath={str(blend)!r})\n" + _INSPECT],
        env=env, timeout=120, what="reopening the saved .blend",
    )  # fmt: skip
    for line in proc.stdout.splitlines():
        if line.startswith("STRIP="):
            return dict(json.loads(line[len("STRIP="):]))
    raise DemoError(f"could not read the strip back from {blend}:\n{proc.stdout[-2000:]}")
