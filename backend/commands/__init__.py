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
