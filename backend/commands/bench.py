"""`animatediff-blender bench`: our engine against stock diffusers, side by side."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from animatediff_blender.backend.commands import nonempty_path

CASES = ("quality", "lightning", "long64", "long128", "server")

EPILOG = """\
cases (real size / tiny size):
  quality    16 frames 512x512, 25 DDIM steps, CFG 7.5      (tiny: 4 frames 64x64, 2 steps)
  lightning  16 frames 512x512, 4 Euler-trailing steps, CFG 1 (tiny: 4 frames, 1 step)
  long64     64 frames, FreeNoise context 16 stride 4, 25 steps (tiny: 8 frames, context 4 stride 2)
  long128    128 frames, same                                (tiny: 12 frames, context 4 stride 2)
  server     the lightning settings through an in-process server and a real client:
             submit -> all frames persisted and received

levers (--lever, repeatable; each one is a separate engine run on every case):
  default          the engine's default for the device (regional compile + VAE compiled on CUDA, eager on CPU)
  eager            no fast path: stock diffusers maths, our engine's plumbing
  compile[:MODE]   regional torch.compile (dynamic=False), MODE e.g. max-autotune-no-cudagraphs
  compile-full[:MODE]  the whole UNet compiled
  compile-dynamic  regional, a dimension made symbolic once it changes (fewer compiles per clip length)
  channels-last    fuse-qkv    sdpa:flash|efficient|cudnn|math    bf16
  batch-windows    long clips: FreeNoise's context windows batched, traced whole when compiled
  share-projections  batch-windows, each frame's window-independent projections run once (-9 % FLOPs at 64 frames)
  vae-compile      the VAE decoder compiled (fixed decode chunks)    vae-channels-last
  cudnn-benchmark  cuDNN times its convolution algorithms per shape and keeps the fastest
  join with +, e.g. compile+channels-last
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark the engine against stock diffusers AnimateDiffPipeline",
        description=(
            "Builds SD1.5 + AnimateDiff v2 models with random weights (real sizes on a GPU, tiny on the "
            "CPU smoke run) and runs stock diffusers and our engine on the same inputs in one process. "
            "Prints denoise/decode/end-to-end seconds, peak memory, counted TFLOP/s, share of the card's "
            "peak, the speed-up over stock and the PSNR of our frames against stock's; writes JSON."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--size",
        choices=["real", "tiny"],
        default=None,
        help="model size (default: real on CUDA, tiny on CPU)",
    )
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument(
        "--dtype", choices=["fp16", "bf16", "fp32"], default=None, help="default: fp16 on CUDA, fp32 on CPU"
    )
    p.add_argument(
        "--case", action="append", dest="cases", choices=CASES, help="run only these cases (repeatable)"
    )
    p.add_argument(
        "--lever",
        action="append",
        dest="levers",
        help="engine configuration to measure (repeatable; default: default)",
    )
    p.add_argument(
        "--compile-anchor",
        action="store_true",
        help="also time stock diffusers with the UNet under torch.compile",
    )
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend (default: %(default)s; tests: aot_eager)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per runner after one warm run (default: per case)",
    )
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="the card's dense fp16/bf16 peak, for the share"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile one UNet step of the quality case (or --profile-case; stock and the first lever) and "
        "the first lever's whole lightning job: kernel time by category, GPU busy share",
    )
    p.add_argument(
        "--profile-every-lever",
        action="store_true",
        help="with --profile: profile every lever, not only the first (e.g. to see each attention backend's kernels)",
    )
    p.add_argument(
        "--profile-case",
        default="quality",
        metavar="CASE",
        help="the case whose UNet step --profile profiles, e.g. long64 (FreeNoise windows in place) "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--anchor",
        action="append",
        dest="anchors",
        choices=CASES,
        help="run stock diffusers only for these cases (repeatable; default: every case)",
    )
    p.add_argument(
        "--engine-only",
        action="store_true",
        help="skip stock diffusers (no ratios or PSNR): e.g. 128 vs 64 frames, warm-up after a restart",
    )
    p.add_argument(
        "--workdir",
        type=nonempty_path,
        default=None,
        help="where random-weight models and the compile cache live (reused)",
    )
    p.add_argument(
        "--json", type=nonempty_path, default=Path("bench-result.json"),
        help="result file; missing folders are created (default: %(default)s)",
    )
    p.set_defaults(func=run)  # fmt: skip


def json_problem(path: Path, *, create_parents: bool = False) -> str | None:
    """Why a result file cannot be written at `path` (checked before measuring, which takes
    a while): a folder there, or no folder to hold it (`create_parents`: none that can be
    created); None if it can."""
    from animatediff_blender.backend.commands import file_in_the_way

    if path.is_dir():
        return f"--json {path} is a directory: name a file, e.g. {path / 'result.json'}"
    blocker = file_in_the_way(path.parent)
    if blocker is not None:
        return f"--json {path}: {blocker} is not a directory"
    if not create_parents and not path.parent.is_dir():
        return f"--json {path}: no folder {path.parent}"
    return None


def device_problem(device: str) -> str | None:
    """Why `device` cannot run a benchmark here (not a torch device, no CUDA, no such
    card), checked before any work; None if it can.  Imports torch."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):  # "Expected one of cpu, cuda, ipu, xpu, ... device type"
        return f"--device {device!r} is not a torch device: use cpu, cuda or cuda:N"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {device}: CUDA is not available here; use --device cpu"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from animatediff_blender.backend.bench.models import Size
    from animatediff_blender.backend.bench.run import run_benchmark
    from animatediff_blender.backend.commands import file_in_the_way

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    problem = device_problem(device) or json_problem(args.json, create_parents=True)
    if problem is None and args.workdir is not None:
        blocker = file_in_the_way(args.workdir)
        problem = f"--workdir {args.workdir}: {blocker} is not a directory" if blocker is not None else None
    if problem:
        print(f"animatediff-blender bench: {problem}", file=sys.stderr)
        return 2
    size: Size = args.size or ("real" if device.startswith("cuda") else "tiny")
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    workdir = args.workdir or Path(tempfile.gettempdir()) / "animatediff-blender-bench"
    try:
        report = run_benchmark(
            size=size, device=device, dtype=dtype, workdir=workdir, only=args.cases, levers=args.levers,
            compile_anchor=args.compile_anchor, compile_backend=args.compile_backend, repeats=args.repeats,
            peak_tflops=args.peak_tflops, out_json=args.json, profile=args.profile, profile_case=args.profile_case,
            engine_only=args.engine_only, anchors=args.anchors, profile_every_lever=args.profile_every_lever,
        )  # fmt: skip
    except ValueError as exc:
        print(f"animatediff-blender bench: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the result file or the work folder cannot be written
        print(f"animatediff-blender bench: error: {exc}", file=sys.stderr)
        return 1
    failed = [r for r in report["results"] if r.get("error")]
    print(
        f"bench: {report['device']}, torch {report['torch']}, diffusers {report['diffusers']}; "
        f"{len(report['results'])} results, {len(failed)} failed; wrote {args.json}"
    )
    return 1 if failed else 0
