"""`animatediff-blender bench-report`: issue #6's targets judged from `bench` result files
(`backend/bench/report.py`): every row as a markdown table, then each target met, missed
by how much, or not measured."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from animatediff_blender.backend.commands.bench import CASES

# The cases whose engine rows --fastest compares (the server case's rows are the server's).
ENGINE_CASES = tuple(c for c in CASES if c != "server")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench-report",
        help="judge the performance targets from benchmark result files",
        description=(
            "Reads `bench` result files (e.g. one per gpu_bench.sh phase, all from one card) and prints "
            "their rows as a markdown table and each of issue #6's targets as met, missed (by how much) "
            "or not measured, on the shipped configuration (the `default` lever) against stock in the "
            "same file."
        ),
    )
    p.add_argument("results", type=Path, nargs="+", metavar="RESULT.json")
    p.add_argument(
        "--fastest", metavar="CASE", choices=ENGINE_CASES,
        help="print only the `default+...` lever that denoised CASE fastest, more than 3%% faster than the "
        "default with frames within 40 dB of stock (nothing if none did): a later phase measures it; CASE is "
        f"one of {', '.join(ENGINE_CASES)}",
    )  # fmt: skip
    p.add_argument(
        "--lever", default="default", metavar="LEVER",
        help="judge this lever's rows (e.g. default+temporal-sdpa:triton, a candidate default) instead of "
        "the shipped default's (default: %(default)s)",
    )  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from animatediff_blender.backend.bench import report

    def warn(text: str) -> None:
        print(f"animatediff-blender bench-report: {text}", file=sys.stderr)

    try:
        rows = report.load_rows(args.results, warn=warn)
        if args.fastest:
            print(report.fastest_lever(rows, args.fastest) or "")
            return 0
        verdicts = report.judge(rows, args.lever)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        print(f"animatediff-blender bench-report: {exc}", file=sys.stderr)
        return 2
    devices = sorted({r.device for r in rows})
    print(f"bench-report: {len(rows)} rows from {len(args.results)} file(s); device: {', '.join(devices) or '?'}")
    if any(r.size != "real" for r in rows):
        print("bench-report: tiny models (a CPU smoke run): the verdicts below only show that the report works")
    print()
    print(report.format_rows(rows))
    print()
    if args.lever != report.PRODUCT:
        print(f"bench-report: the targets below judge engine[{args.lever}], not the shipped default")
    print(report.format_verdicts(verdicts))
    return 0
