"""`animatediff-blender demo`: the offline end-to-end run on the embedded tiny model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from animatediff_blender.backend.commands import nonempty_path


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
    p.add_argument("--out", type=nonempty_path, default=Path("demo-output"), help="output folder (default: %(default)s)")
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


def _problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, checked before the demo builds anything (the zoo,
    the extension and a backend take a while): the clip within what the demo's backend (the
    server's default limits) accepts, the output folder a folder."""
    from animatediff_blender.backend.commands import file_in_the_way
    from animatediff_blender.protocol.messages import Limits

    limits = Limits()
    if not 1 <= args.frames <= limits.max_frames:
        return f"--frames {args.frames}: must be between 1 and {limits.max_frames}"
    if not 1 <= args.steps <= limits.max_steps:
        return f"--steps {args.steps}: must be between 1 and {limits.max_steps}"
    top = min(limits.max_width, limits.max_height)
    if not 8 <= args.size <= top or args.size % 8:
        return f"--size {args.size}: must be a multiple of 8 between 8 and {top}"
    if args.size * args.size * args.frames > limits.max_pixel_frames:
        return (
            f"--size {args.size} with --frames {args.frames}: {args.size}x{args.size}x{args.frames} pixels "
            f"exceeds the backend's {limits.max_pixel_frames}: fewer frames or a smaller size"
        )
    blocker = file_in_the_way(args.out)
    if blocker is not None:
        inside = "" if blocker == args.out else f" ({blocker} is a file)"
        return f"--out {args.out} is not a directory{inside}"
    return None


def run(args: argparse.Namespace) -> int:
    from animatediff_blender.backend.demo import DemoError, default_blender_python, run_demo

    problem = _problem(args)
    if problem:
        print(f"animatediff-blender demo: error: {problem}", file=sys.stderr)
        return 2
    try:
        result = run_demo(
            args.out,
            blender_python=args.blender_python or default_blender_python(),
            frames=args.frames,
            size=args.size,
            steps=args.steps,
        )
    except (DemoError, OSError) as exc:  # OSError: the output folder cannot be written
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
