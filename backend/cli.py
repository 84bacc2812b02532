"""`animatediff-blender`: the one console command.  Each subcommand lives in its own
module under `commands/` and registers itself here; heavy imports (torch, diffusers)
happen inside the handlers so that `--help` stays instant."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from animatediff_blender import __version__

SUBCOMMANDS = ("serve", "generate", "queue", "models", "keys", "demo", "bench", "bench_server", "bench_report", "bench_attention")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="animatediff-blender",
        description=(
            "AnimateDiff for Blender. Run the GPU backend (serve), generate clips from the command "
            "line (generate), manage the model directory (models), create authentication material "
            "(keys), or run the offline end-to-end demo (demo)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"animatediff_blender.backend.commands.{name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
