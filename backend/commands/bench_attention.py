"""`animatediff-blender bench-attention`: every attention call of one UNet step of a
benchmark case, each shape timed alone with each SDPA backend (`backend/bench/attention.py`):
where a step's attention time goes (spatial, cross, temporal) and which backend serves
each kind best.  Seconds on a GPU: no model weights, no compile unless `--compiled`."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

from animatediff_blender.backend.commands import nonempty_path

CASES = ("quality", "lightning", "long64", "long128")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-attention",
        help="time one step's attention calls, shape by shape, with each SDPA backend",
        description=(
            "Records every scaled-dot-product attention of one UNet call of a benchmark case (SD1.5 + "
            "AnimateDiff v2 structure on the meta device; FreeNoise windows batched as the engine does) "
            "and times each shape alone with each of torch's SDPA backends on random inputs.  Prints "
            "microseconds and TFLOP/s per shape and backend, and the milliseconds per UNet call by kind "
            "(spatial self-attention, cross-attention on the text, temporal attention in the motion "
            "modules)."
        ),
    )
    p.add_argument("--case", action="append", choices=CASES, help="repeatable (default: quality and long64)")
    p.add_argument("--size", choices=("real", "tiny"), default="real", help="default: %(default)s")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None,
                   help="default: fp16 on cuda, fp32 on the cpu")  # fmt: skip
    p.add_argument("--backend", action="append", default=None,
                   help="repeatable: auto, flash, efficient, cudnn, math, triton (the project's kernel for "
                        "short sequences; triton:ROWS with 16-256 tile rows) (default: all; triton where "
                        "Triton is installed)")  # fmt: skip
    p.add_argument("--compiled", action="store_true",
                   help="also time the attention written out as multiply-sums and compiled by inductor "
                        "('reduced'), for the temporal calls")  # fmt: skip
    p.add_argument("--iters", type=int, default=20, help="timed calls per shape and backend (default: %(default)s)")
    p.add_argument("--json", type=nonempty_path, default=None, help="also write the results here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from animatediff_blender.backend.bench import attention
    from animatediff_blender.backend.bench.run import cases_for
    from animatediff_blender.backend.commands.bench import device_problem, json_problem

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    known = [*attention.BACKENDS, attention.TRITON, *(f"{attention.TRITON}:{r}" for r in (16, 32, 64, 128, 256))]
    backends = args.backend or [*attention.BACKENDS, *([attention.TRITON] if importlib.util.find_spec("triton") else [])]
    unknown = sorted(set(backends) - set(known))
    problem = None
    if unknown:
        problem = f"unknown backend(s) {', '.join(unknown)}: choose from {', '.join(known)}"
    elif args.iters < 1:
        problem = "--iters must be at least 1"
    else:
        problem = device_problem(device) or (json_problem(args.json) if args.json is not None else None)
    if problem:
        print(f"animatediff-blender bench-attention: {problem}", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    print(f"bench-attention: {gpu}, torch {torch.__version__}, {dtype}, {args.size} sizes, {args.iters} calls per cell")
    cases = cases_for(args.size)
    results = []
    for name in args.case or ["quality", "long64"]:
        case = cases[name]
        print(f"bench-attention: {name} ({case.frames} frames {case.width}x{case.height}, "
              f"{'CFG batch' if case.guidance > 1 else 'no CFG'}"
              f"{f', windows of {case.context_length} stride {case.context_stride}' if case.free_noise else ''})",
              flush=True)  # fmt: skip
        print(attention.format_header(case, backends))
        result = attention.bench_case(
            case, args.size, device=device, dtype=dtype, backends=backends, iters=args.iters,
            compiled_kinds=("temporal",) if args.compiled else (),
            print_fn=lambda line: print(line, flush=True),
        )  # fmt: skip
        print(f"  {sum(s.call.calls for s in result.shapes)} attention calls per UNet call, "
              f"{result.total_flops() / 1e12:.2f} TFLOP")  # fmt: skip
        print(attention.format_summary(result), flush=True)
        results.append(result.to_json())
        if args.json:  # after each case: a run stopped by a time limit keeps what it measured
            meta = {"device": gpu, "torch": torch.__version__, "dtype": dtype, "size": args.size, "iters": args.iters}
            try:
                args.json.write_text(json.dumps({"meta": meta, "cases": results}, indent=2))
            except OSError as exc:  # e.g. the disk filled up while measuring
                print(f"animatediff-blender bench-attention: cannot write {args.json}: {exc}", file=sys.stderr)
                return 1
    return 0
