"""`animatediff-blender models`: list, fetch and verify the models directory; build the tiny zoo.

models list   [--models-dir D] [--json]       what the server would offer, with broken files and why
models fetch  [--models-dir D] [--only G ...] download the standard set from the Hugging Face hub
models verify [--models-dir D]                re-hash files against manifest.json / zoo.json (exit 1 on mismatch)
models zoo DEST [--force]                     build the offline tiny model zoo
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from animatediff_blender.backend.commands import file_in_the_way, nonempty_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list, fetch or verify models; build the tiny offline zoo")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    def models_dir_arg(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--models-dir", type=nonempty_path, default=None, help="models directory (default: <data>/models)"
        )

    q = msub.add_parser("list", help="list the models directory as the registry sees it")
    models_dir_arg(q)
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=run_list)

    from animatediff_blender.backend.models.fetch import GROUPS  # light: no torch

    q = msub.add_parser("fetch", help="download the standard model set from the Hugging Face hub")
    models_dir_arg(q)
    q.add_argument(
        "--only", nargs="+", choices=GROUPS, metavar="GROUP", help=f"only these groups: {', '.join(GROUPS)}"
    )
    q.add_argument("--dry-run", action="store_true", help="print what would be downloaded")
    q.set_defaults(func=run_fetch)

    q = msub.add_parser("verify", help="re-hash files listed in manifest.json / zoo.json")
    models_dir_arg(q)
    q.set_defaults(func=run_verify)

    q = msub.add_parser("zoo", help="build the tiny offline model zoo (tests, demo)")
    q.add_argument("dest", type=nonempty_path)
    q.add_argument("--force", action="store_true", help="rebuild even if up to date")
    q.set_defaults(func=run_zoo)


def _models_dir(args: argparse.Namespace) -> Path:
    from animatediff_blender.backend.models.fetch import default_models_dir

    return Path(args.models_dir) if args.models_dir else default_models_dir()


def _dir_problem(args: argparse.Namespace, models_dir: Path, *, may_be_missing: bool = False) -> str | None:
    """Why `models_dir` cannot be listed, verified (an existing folder) or fetched into
    (`may_be_missing`: a folder, or one that can be created); None if it can."""
    where = f"--models-dir {models_dir}" if args.models_dir is not None else f"the models directory {models_dir}"
    blocker = file_in_the_way(models_dir)
    if blocker is not None:
        inside = "" if blocker == models_dir else f" ({blocker} is a file)"
        return f"{where} is not a directory{inside}"
    if not may_be_missing and not models_dir.is_dir():
        return f"{where} does not exist"
    return None


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def run_list(args: argparse.Namespace) -> int:
    import msgspec

    from animatediff_blender.backend.models.registry import ModelRegistry

    models_dir = _models_dir(args)
    # The default folder missing is a fresh install (said below); a given one, a typo.
    problem = _dir_problem(args, models_dir, may_be_missing=args.models_dir is None)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    registry = ModelRegistry(models_dir)
    infos = registry.scan()
    if args.json:
        payload = {
            "models_dir": str(models_dir),
            "models": msgspec.to_builtins(infos),
            "defaults": registry.default_ids(),
        }
        print(json.dumps(payload, indent=2))
        return 0
    if not infos:
        print(f"no models in {models_dir} (run `animatediff-blender models fetch`)")
        return 0
    print(f"models in {models_dir}:")
    for info in infos:
        state = "ok " if info.ok else "BROKEN"
        extra = f"  [{info.error}]" if not info.ok else ""
        print(
            f"  {state} {info.id:<60} {info.version:<9} {info.format:<11} {_size(info.size_bytes):>9}  {info.label}{extra}"
        )
    defaults = registry.default_ids()
    if defaults:
        print("defaults: " + ", ".join(f"{k}={v}" for k, v in defaults.items()))
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from animatediff_blender.backend.models.fetch import FetchError, fetch, plan

    models_dir = _models_dir(args)
    problem = _dir_problem(args, models_dir, may_be_missing=True)  # fetch creates it
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        items = plan(args.only)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        for item in items:
            for f in item.files:
                print(f"{item.repo_id}/{f} -> {item.dest}{'/' + f if item.is_folder else ''}")
        return 0
    try:
        report = fetch(models_dir, args.only)
    except OSError as exc:  # the folder or its manifest cannot be created or written
        print(f"error: cannot fetch into {models_dir}: {exc}", file=sys.stderr)
        return 1
    print(f"fetched {len(report.fetched)} item(s) into {models_dir}")
    for failure in report.failed:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if report.failed else 0


def run_verify(args: argparse.Namespace) -> int:
    from animatediff_blender.backend.models.fetch import verify

    models_dir = _models_dir(args)
    problem = _dir_problem(args, models_dir)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        result = verify(models_dir)
    except OSError as exc:  # a listed file that cannot be read
        print(f"error: cannot verify {models_dir}: {exc}", file=sys.stderr)
        return 1
    for problem in result.problems:
        print(f"MISMATCH {problem}")
    print(f"checked {result.checked} file(s) in {models_dir}: {len(result.problems)} problem(s)")
    return 1 if result.problems else 0


def run_zoo(args: argparse.Namespace) -> int:
    from animatediff_blender.backend.models.zoo import build_zoo

    try:
        print(build_zoo(args.dest, force=args.force))
    except OSError as exc:  # DEST is a file, or not writable
        print(f"error: cannot build the zoo in {args.dest}: {exc}", file=sys.stderr)
        return 1
    return 0
