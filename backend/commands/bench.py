"""`animatediff-blender bench`: our engine against stock diffusers, side by side."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


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
    )
    p.add_argument("--size", choices=["real", "tiny"], default=None, help="model size (default: real on CUDA, tiny on CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--case", action="append", dest="cases", help="run only these cases (repeatable)")
    p.add_argument("--compile-anchor", action="store_true", help="also time stock diffusers with torch.compile(unet)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense fp16/bf16 peak, for the share")
    p.add_argument("--workdir", type=Path, default=None, help="where random-weight models are written (cached)")
    p.add_argument("--json", type=Path, default=Path("bench-result.json"), help="result file (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from animatediff_blender.backend.bench.models import Size
    from animatediff_blender.backend.bench.run import run_benchmark

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    size: Size = args.size or ("real" if device.startswith("cuda") else "tiny")
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    workdir = args.workdir or Path(tempfile.gettempdir()) / "animatediff-blender-bench"
    report = run_benchmark(
        size=size, device=device, dtype=dtype, workdir=workdir, only=args.cases,
        compile_anchor=args.compile_anchor, peak_tflops=args.peak_tflops, out_json=args.json,
    )  # fmt: skip
    print(f"bench: {report['device']}, torch {report['torch']}, diffusers {report['diffusers']}; wrote {args.json}")
    return 0
