"""`protocol/` is copied unchanged into the Blender extension: it may import only the
standard library, zmq and msgspec, only relatively among itself, and never pickle."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PROTOCOL = Path(__file__).resolve().parents[2] / "protocol"
ALLOWED = {"zmq", "msgspec", "__future__"}
FORBIDDEN = {"pickle", "cPickle", "dill", "marshal", "shelve"}


@pytest.mark.parametrize("path", sorted(PROTOCOL.glob("*.py")), ids=lambda p: p.name)
def test_imports_are_stdlib_zmq_msgspec_or_relative(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            assert top not in FORBIDDEN, f"{path.name}:{node.lineno} imports {name}"
            assert top in ALLOWED or top in sys.stdlib_module_names, (
                f"{path.name}:{node.lineno} imports {name}: protocol/ may use only the standard "
                "library, zmq, msgspec and relative imports"
            )
