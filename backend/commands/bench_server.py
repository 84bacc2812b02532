"""`animatediff-blender bench-server`: what the server and client add to a clip's end-to-end
time on the CPU side (PNG encoding, storage, signing, transfer), with an engine stand-in
that takes a real device's time (`backend/bench/overhead.py`).  Needs no GPU and no model."""

from __future__ import annotations

import argparse
import json
import math
import sys

from animatediff_blender.backend.commands import nonempty_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-server",
        help="measure the server's CPU-side cost per clip (no GPU needed)",
        description=(
            "Runs a real server and client on this machine around an engine stand-in that holds the "
            "device for the given denoise and decode times and hands over real-size frames in decode "
            "chunks.  Prints the end-to-end time, the stand-in's own time and what the server and "
            "client added (issue #6's target: at most 5% of end to end).  Defaults: the engine's "
            "lightning clip on an H200 (16 frames 512x512, denoise 0.303 s, decode 0.265 s)."
        ),
    )
    p.add_argument("--frames", type=int, default=16, help="default: %(default)s")
    p.add_argument("--size", type=int, default=512, help="frame width and height (default: %(default)s)")
    p.add_argument("--denoise-s", type=float, default=None, help="default: the H200's 0.303")
    p.add_argument("--decode-s", type=float, default=None, help="default: the H200's 0.265")
    p.add_argument(
        "--png-compress-level",
        type=int,
        action="append",
        choices=range(10),
        metavar="0-9",
        help="repeatable: one measurement per level (default: the server's default)",
    )
    p.add_argument(
        "--repeats", type=int, default=5, help="timed jobs after one untimed (default: %(default)s)"
    )
    p.add_argument("--json", type=nonempty_path, default=None, help="also write the results here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from animatediff_blender.backend.bench import overhead
    from animatediff_blender.backend.commands.bench import json_problem

    denoise_s = overhead.H200_LIGHTNING_DENOISE_S if args.denoise_s is None else args.denoise_s
    decode_s = overhead.H200_LIGHTNING_DECODE_S if args.decode_s is None else args.decode_s
    times_ok = all(math.isfinite(t) and t >= 0 for t in (denoise_s, decode_s))  # NaN compares False
    if args.frames < 1 or args.size < 8 or args.size % 8 or args.repeats < 1 or not times_ok:
        print("animatediff-blender bench-server: need --frames >= 1, --size a multiple of 8, --repeats >= 1, "
              "times finite and >= 0", file=sys.stderr)  # fmt: skip
        return 2
    problem = json_problem(args.json) if args.json is not None else None
    if problem:
        print(f"animatediff-blender bench-server: {problem}", file=sys.stderr)
        return 2
    results = []
    from animatediff_blender.backend.png import deflate_backend

    print(
        f"bench-server: {os.cpu_count()} CPUs; PNG deflate: {deflate_backend()}; "
        f"engine stand-in: denoise {denoise_s} s, decode {decode_s} s"
    )
    for level in args.png_compress_level or [None]:
        result = overhead.measure_server_overhead(
            frames=args.frames, width=args.size, height=args.size, denoise_s=denoise_s,
            decode_s=decode_s, repeats=args.repeats, png_compress_level=level,
        )  # fmt: skip
        print(f"bench-server: {result.describe()}", flush=True)
        results.append(
            {
                "frames": result.frames, "width": result.width, "height": result.height,
                "png_compress_level": result.png_compress_level, "engine_s": result.engine_s,
                "end_to_end_s": result.end_to_end_s, "overhead_s": result.overhead_s,
                "overhead_share": result.overhead_share, "runs_s": result.runs, "cpus": os.cpu_count(),
                "before_engine_s": result.before_engine_s, "after_engine_s": result.after_engine_s,
                "payload_bytes": result.payload_bytes, "png_deflate": deflate_backend(),
            }
        )  # fmt: skip
    if args.json:
        try:
            args.json.write_text(json.dumps(results, indent=2))
        except OSError as exc:  # e.g. the disk filled up while measuring
            print(f"animatediff-blender bench-server: cannot write {args.json}: {exc}", file=sys.stderr)
            return 1
    return 0
