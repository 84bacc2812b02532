"""`animatediff-blender demo`: the offline end-to-end run on the embedded tiny model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="offline end-to-end demo: tiny model, local backend, headless Blender, strip on the timeline",
        description=(
            "Runs the whole chain on this machine with no GPU and no downloads: builds the tiny "
            "model zoo, builds the Blender extension, starts a local backend, drives the installed "
            "add-on in headless Blender (the PyPI bpy module) to generate a clip and place it on the "
            "Video Sequencer, saves the .blend, and writes an animated preview and a contact sheet."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default: %(default)s)")
    p.add_argument(
        "--blender-python",
        type=Path,
        default=None,
        help="a Python that can `import bpy` (default: .venv-bpy42/bin/python from scripts/setup.sh)",
    )
    p.add_argument("--frames", type=int, default=16, help="clip length (default: %(default)s)")
    p.add_argument("--size", type=int, default=128, help="width and height in pixels (default: %(default)s)")
    p.add_argument("--steps", type=int, default=12, help="denoising steps (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from animatediff_blender.backend.demo import DemoError, default_blender_python, run_demo

    try:
        result = run_demo(
            args.out,
            blender_python=args.blender_python or default_blender_python(),
            frames=args.frames,
            size=args.size,
            steps=args.steps,
        )
    except DemoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    s = result.strip
    print()
    print("demo: done")
    print(f"  .blend file      {result.blend}")
    print(
        f"  strip            '{s['name']}' on channel {s['channel']}, frames {s['frame_start']}"
        f"-{s['frame_start'] + s['frame_final_duration'] - 1} ({result.frames} frames)"
    )
    print(f"  frames on disk   {result.frames_dir}  (in the .blend as {s['relative_directory']})")
    print(f"  preview          {result.gif}" + (f"  and {result.mp4}" if result.mp4 else ""))
    print(f"  contact sheet    {result.contact_sheet}")
    return 0
