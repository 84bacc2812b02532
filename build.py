#!/usr/bin/env python3
"""Build the Blender extension zips of AnimateDiff for Blender.

    python build.py                      # every platform, both Python lines -> dist/
    python build.py --platform current   # this machine's platform only (tests)
    python build.py --offline            # wheels from build/wheels-cache/ only

What goes in a zip: `blender_addon/*`, a copy of `protocol/` as `<zip>/protocol/`
(the add-on imports it relatively), a generated `blender_manifest.toml`, and the
unmodified PyPI wheels that the protocol needs at run time (pyzmq, msgspec).

Blender 5.1+ runs Python 3.13, earlier releases 3.11, and Blender refuses a zip whose
wheels name both (it derives the supported Pythons from the wheel names).  So there
are two builds, each split per platform by Blender's own tooling:

    animatediff_blender-<ver>-py311-<platform>.zip   blender_version_max = "5.1.0"
    animatediff_blender-<ver>-py313-<platform>.zip   blender_version_min = "5.1.0"

Blender's `blender_ext.py` (shipped inside the PyPI `bpy` wheel, runs under plain
Python) validates the manifest and builds the split packages; this script then
re-packs each zip with sorted entries and fixed timestamps so that two builds of
the same tree have the same sha256.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import platform as _platform
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ADDON_ID = "animatediff_blender"
# Pinned so that a build is reproducible; bump together with pyproject's floor.
WHEELS = {"pyzmq": "27.3.0", "msgspec": "0.22.0"}
# Blender platform -> the pip platform tag asked for (pip expands older manylinux /
# macOS versions and universal2 from it).
PLATFORMS = {
    "windows-x64": "win_amd64",
    "windows-arm64": "win_arm64",  # (Blender's Windows on ARM builds)
    "macos-arm64": "macosx_11_0_arm64",
    "macos-x64": "macosx_11_0_x86_64",
    "linux-x64": "manylinux_2_28_x86_64",
}
FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip can hold


@dataclass(frozen=True)
class PythonLine:
    tag: str  # "311"
    python_version: str  # pip --python-version
    blender_min: str
    blender_max: str | None
    no_blender_on: frozenset[str] = frozenset()  # platforms no Blender of this line runs on


PYTHON_LINES = {
    "311": PythonLine("311", "3.11", "4.2.0", "5.1.0"),
    # Blender 5.0 dropped Intel Macs (4.5 LTS was the last): a py313 zip for them would be unusable.
    "313": PythonLine("313", "3.13", "5.1.0", None, frozenset({"macos-x64"})),
}


class BuildError(Exception):
    pass


def project_version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return str(tomllib.load(fh)["project"]["version"])


def current_platform() -> str:
    system = {"linux": "linux", "darwin": "macos", "win32": "windows"}.get(sys.platform, sys.platform)
    machine = _platform.machine().lower()
    machine = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64"}.get(machine, machine)
    name = f"{system}-{machine}"
    if name not in PLATFORMS:
        raise BuildError(f"no wheels are configured for this platform ({name})")
    return name


def find_blender_ext() -> list[Path]:
    """`blender_ext.py` from every bpy wheel we can find, newest Blender first."""
    candidates: list[str] = []
    explicit = os.environ.get("ANIMATEDIFF_BLENDER_EXT")
    if explicit:
        candidates.append(explicit)
    roots = [ROOT / ".venv-bpy5", ROOT / ".venv-bpy42"]
    for spec in _bpy_pythons_env():
        roots.append(Path(spec).absolute().parent.parent)  # the venv, not the base interpreter
    for root in roots:
        candidates += glob.glob(
            str(root / "lib" / "python3*" / "site-packages" / "bpy" / "*" / "scripts" / "addons_core"
                / "bl_pkg" / "cli" / "blender_ext.py")
        )
        candidates += glob.glob(
            str(root / "Lib" / "site-packages" / "bpy" / "*" / "scripts" / "addons_core" / "bl_pkg" / "cli"
                / "blender_ext.py")
        )
    found: dict[str, Path] = {}
    for c in candidates:
        p = Path(c)
        if p.is_file():
            found.setdefault(str(p.resolve()), p)

    def blender_version(p: Path) -> tuple[int, ...]:
        try:
            return tuple(int(x) for x in p.parents[4].name.split("."))
        except ValueError:
            return (0,)

    return sorted(found.values(), key=blender_version, reverse=True)


def _bpy_pythons_env() -> list[str]:
    """Interpreter paths from ANIMATEDIFF_BLENDER_BPY_PYTHONS ("4.2=/p/python,5.3=/q/python")."""
    raw = os.environ.get("ANIMATEDIFF_BLENDER_BPY_PYTHONS", "")
    out = []
    for item in raw.replace(os.pathsep, ",").split(","):
        if "=" in item:
            out.append(item.split("=", 1)[1].strip())
    return [p for p in out if p]


def fetch_wheels(platform: str, line: PythonLine, cache: Path, offline: bool) -> list[Path]:
    """The wheels for one platform and Python line: from the cache, else from PyPI."""
    cache.mkdir(parents=True, exist_ok=True)
    result: list[Path] = []
    for name, version in sorted(WHEELS.items()):
        with tempfile.TemporaryDirectory(prefix="adb-wheel-") as tmp:
            base = [
                sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                "--only-binary=:all:", "--no-deps", "--implementation", "cp",
                "--platform", PLATFORMS[platform], "--python-version", line.python_version,
                "--dest", tmp, "--find-links", str(cache), f"{name}=={version}",
            ]
            # Cache first: no network needed when the wheel is already there.
            proc = subprocess.run([*base, "--no-index"], capture_output=True, text=True)
            if proc.returncode != 0:
                if offline:
                    raise BuildError(
                        f"--offline: no cached wheel for {name}=={version} ({platform}, Python "
                        f"{line.python_version}) in {cache}"
                    )
                proc = subprocess.run(base, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise BuildError(
                        f"pip download {name}=={version} for {platform} / Python {line.python_version} "
                        f"failed:\n{proc.stderr.strip()}"
                    )
            files = sorted(Path(tmp).glob("*.whl"))
            if len(files) != 1:
                raise BuildError(f"expected one wheel for {name} ({platform}), got {files}")
            dest = cache / files[0].name
            if not dest.exists():
                shutil.copyfile(files[0], dest)
            result.append(dest)
    return result


def manifest_text(version: str, line: PythonLine, platforms: list[str], wheels: list[str]) -> str:
    def toml_list(items: list[str]) -> str:
        return "[" + ", ".join(f'"{i}"' for i in items) + "]"

    lines = [
        'schema_version = "1.0.0"',
        "",
        f'id = "{ADDON_ID}"',
        f'version = "{version}"',
        'name = "AnimateDiff for Blender"',
        'tagline = "Generate video clips from a prompt on the Video Sequencer"',
        'maintainer = "AnimateDiff for Blender developers"',
        'type = "add-on"',
        'tags = ["Sequencer", "Render"]',
        f'blender_version_min = "{line.blender_min}"',
    ]
    if line.blender_max:
        lines.append(f'blender_version_max = "{line.blender_max}"')
    lines += [
        'license = ["SPDX:GPL-3.0-or-later"]',
        f"platforms = {toml_list(platforms)}",
        "wheels = [",
        *[f'  "./wheels/{w}",' for w in wheels],
        "]",
        "",
        "[permissions]",
        'network = "Sends prompts to your AnimateDiff backend and gets frames"',
        'files = "Writes generated frames next to the .blend file"',
        "",
        "[build]",
        'paths_exclude_pattern = ["__pycache__/", "*.pyc", ".*"]',
        "",
    ]
    return "\n".join(lines)


def stage(staging: Path, version: str, line: PythonLine, platforms: list[str], wheels: list[Path]) -> None:
    src = ROOT / "blender_addon"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".*", "blender_manifest.toml")
    shutil.copytree(src, staging, ignore=ignore)
    shutil.copytree(ROOT / "protocol", staging / "protocol", ignore=ignore)
    (staging / "wheels").mkdir()
    for w in wheels:
        shutil.copyfile(w, staging / "wheels" / w.name)
    names = sorted({w.name for w in wheels})
    (staging / "blender_manifest.toml").write_text(manifest_text(version, line, platforms, names),
                                                   encoding="utf-8")


def repack(src: Path, dest: Path) -> None:
    """Same content, sorted entries, fixed dates and modes: byte-for-byte reproducible."""
    tmp = dest.with_name("." + dest.name + ".tmp")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w") as zout:
        for name in sorted(zin.namelist()):
            info = zipfile.ZipInfo(name, date_time=FIXED_DATE)
            info.external_attr = 0o644 << 16
            info.create_system = 3  # unix, whatever the build host is
            stored = name.endswith(".whl")  # wheels are zips already
            info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
            zout.writestr(info, zin.read(name), compresslevel=None if stored else 9)
    os.replace(tmp, dest)


def run_blender_ext(tool: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(tool), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{tool.name} {args[0]} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def build(platforms: list[str], lines: list[PythonLine], out: Path, cache: Path, offline: bool,
          tools: list[Path]) -> list[Path]:
    version = project_version()
    out.mkdir(parents=True, exist_ok=True)
    built: list[Path] = []
    for line in lines:
        line_platforms = [p for p in platforms if p not in line.no_blender_on]
        if not line_platforms:
            raise BuildError(f"no Blender of the py{line.tag} line runs on {', '.join(platforms)}")
        wheels: list[Path] = []
        for plat in line_platforms:
            wheels += fetch_wheels(plat, line, cache, offline)
        wheels = sorted(set(wheels))
        with tempfile.TemporaryDirectory(prefix="adb-build-") as tmp:
            staging = Path(tmp) / ADDON_ID
            raw = Path(tmp) / "raw"
            raw.mkdir()
            stage(staging, version, line, line_platforms, wheels)
            # The newest tooling builds; every tooling found validates the source.
            for tool in tools:
                run_blender_ext(tool, "validate", str(staging))
            base = f"{ADDON_ID}-{version}-py{line.tag}.zip"
            run_blender_ext(tools[0], "build", "--source-dir", str(staging), "--output-filepath",
                            str(raw / base), "--split-platforms")
            for plat in line_platforms:
                name = f"{ADDON_ID}-{version}-py{line.tag}-{plat.replace('-', '_')}.zip"
                produced = raw / name
                if not produced.is_file():
                    raise BuildError(f"blender_ext did not produce {name}: {sorted(os.listdir(raw))}")
                check_contents(produced)
                dest = out / name
                repack(produced, dest)
                for tool in tools:
                    run_blender_ext(tool, "validate", str(dest))
                built.append(dest)
    return built


def check_contents(zip_path: Path) -> None:
    """No heavy backend dependencies may ride along."""
    with zipfile.ZipFile(zip_path) as z:
        for name in z.namelist():
            low = name.lower()
            for banned in ("torch", "diffusers", "numpy", "transformers"):
                if f"/{banned}" in "/" + low:
                    raise BuildError(f"{zip_path.name} contains {name}: the add-on must stay light")


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--platform", default="all",
                    help="all (default), current, or comma-separated: " + ", ".join(PLATFORMS))
    ap.add_argument("--python", default="all", help="all (default), 311 or 313")
    ap.add_argument("--out", type=Path, default=ROOT / "dist")
    ap.add_argument("--cache", type=Path, default=ROOT / "build" / "wheels-cache")
    ap.add_argument("--offline", action="store_true", help="use cached wheels only")
    args = ap.parse_args(argv)
    try:
        if args.platform == "all":
            platforms = list(PLATFORMS)
        elif args.platform == "current":
            platforms = [current_platform()]
        else:
            platforms = [p.strip() for p in args.platform.split(",") if p.strip()]
            unknown = [p for p in platforms if p not in PLATFORMS]
            if unknown:
                raise BuildError(f"unknown platform(s) {unknown}; choose from {list(PLATFORMS)}")
        if args.python == "all":
            lines = list(PYTHON_LINES.values())
        elif args.python in PYTHON_LINES:
            lines = [PYTHON_LINES[args.python]]
        else:
            raise BuildError(f"--python must be all, 311 or 313, not {args.python!r}")
        tools = find_blender_ext()
        if not tools:
            raise BuildError(
                "Blender's blender_ext.py was not found: install a bpy wheel into .venv-bpy5 or "
                ".venv-bpy42, set ANIMATEDIFF_BLENDER_BPY_PYTHONS, or ANIMATEDIFF_BLENDER_EXT=<path>"
            )
        built = build(platforms, lines, args.out.resolve(), args.cache.resolve(), args.offline, tools)
    except BuildError as exc:
        print(f"build.py: error: {exc}", file=sys.stderr)
        return 1
    for p in built:
        print(f"{sha256(p)}  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
