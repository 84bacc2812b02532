"""The `animatediff-blender` subcommands, one module each; shared argument types here."""

from __future__ import annotations

import argparse
from pathlib import Path


def nonempty_path(value: str) -> Path:
    """An argparse type for a folder or file: "" (an unset shell variable, `--out "$OUT"`)
    would silently be the current folder."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return Path(value)


def file_in_the_way(path: Path) -> Path | None:
    """The nearest existing part of `path` (itself or a parent) when that is not a folder,
    else None: where creating `path` as a folder, or a file in it, must fail."""
    for part in (path, *path.parents):
        if part.exists():
            return None if part.is_dir() else part
    return None
