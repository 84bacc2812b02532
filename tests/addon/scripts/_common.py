"""Shared helpers of the scripts that run inside a bpy interpreter (not a test module)."""

from __future__ import annotations

import faulthandler
import importlib
import json
import sys
import time
from typing import Any

faulthandler.enable()
# A hung Blender must not hang the test run: dump the stacks, then exit.
faulthandler.dump_traceback_later(170, exit=True)

ADDON_ID = "animatediff_blender"
MODULE = f"bl_ext.user_default.{ADDON_ID}"
RESULT_PREFIX = "ADB-RESULT: "


def args() -> dict[str, Any]:
    with open(sys.argv[1], encoding="utf-8") as fh:
        return json.load(fh)


def install(zip_path: str) -> Any:
    """Install the built zip into the throw-away profile, enabled; return the add-on package."""
    import bpy

    if MODULE not in sys.modules:
        result = bpy.ops.extensions.package_install_files(
            filepath=zip_path, repo="user_default", enable_on_install=True)
        assert result == {"FINISHED"}, result
    return importlib.import_module(MODULE)


def sub(name: str) -> Any:
    return importlib.import_module(f"{MODULE}.{name}")


def drain_until(predicate: Any, timeout: float = 60.0) -> list[float]:
    """Call the add-on's timer function the way Blender would (timers never run in the bpy
    module), until `predicate()` holds; returns each call's duration in seconds."""
    timer = sub("timer")
    times = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        timer.drain()
        times.append(time.perf_counter() - t0)
        if predicate():
            return times
        time.sleep(0.02)
    raise AssertionError(f"condition not reached within {timeout} s")


def configure(address: str, key_file: str | None = None, timeout_s: float = 5.0) -> None:
    import bpy

    prefs = bpy.context.preferences.addons[MODULE].preferences
    prefs.address = address
    prefs.key_file = key_file or ""
    prefs.timeout_s = timeout_s


def result(**data: Any) -> None:
    print(RESULT_PREFIX + json.dumps(data, default=str), flush=True)
