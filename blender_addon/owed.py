"""Cancels still owed to a backend when Blender quits, kept on disk for the next session
(no bpy: plain files in the extension's user folder).

Blender quits without unregistering add-ons, so the worker cannot hand its owed cancels on
as it does when the add-on is disabled (`messages.CancelsOwed`).  An exit handler writes
them to a file of this process instead; the next worker for the same backend address
claims every such file and tells the backend.  Before, such a job ran on after the quit,
holding a shared GPU, although the artist had cancelled it."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from typing import Any

from . import messages as m

PATTERN = "owed_cancels_*.json"


def _file(folder: str, address: str) -> str:
    # One file per process and backend: workers stopped by a disable may have had other addresses.
    digest = hashlib.sha256(address.encode("utf-8", "replace")).hexdigest()[:12]
    return os.path.join(folder, f"owed_cancels_{os.getpid()}_{digest}.json")


def save(folder: str, address: str, owed: m.CancelsOwed) -> str | None:
    """Write `owed` for the next session (nothing when nothing is owed).  Returns the file."""
    if owed.is_empty():
        return None
    path = _file(folder, address)
    job_ids, submits = set(owed.job_ids), [dataclasses.asdict(sub) for sub in owed.submits]
    # An earlier save of this process (another stopped worker for the same backend), or of an
    # earlier process with this pid (pids are reused) never claimed: kept, once each.
    earlier = _read(path)
    if earlier is not None and earlier.get("address") == address:
        job_ids.update(j for j in earlier.get("job_ids", []) if isinstance(j, str))
        submits += [sub for sub in earlier.get("submits", []) if isinstance(sub, dict)]
    unique = {str(sub.get("local_id")): sub for sub in reversed(submits)}  # the newest of each
    data = {"address": address, "job_ids": sorted(job_ids), "submits": list(reversed(unique.values()))}
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)
    return path


def claim(folder: str, address: str) -> m.CancelsOwed | None:
    """Take every file owed to `address` (another address's stay for its own worker).  A file
    is renamed before it is read, so two Blenders starting together never both take it."""
    job_ids: set[str] = set()
    submits: list[m.SubmitJob] = []
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), PATTERN))):
        data = _read(path)
        if data is None or data.get("address") != address:
            continue
        mine = f"{path}.claimed-{os.getpid()}"
        try:
            os.replace(path, mine)
        except OSError:
            continue  # claimed by another Blender meanwhile
        data = _read(mine) or {}
        try:
            os.remove(mine)
        except OSError:
            pass
        job_ids.update(str(j) for j in data.get("job_ids", []) if isinstance(j, str))
        for sub in data.get("submits", []):
            try:
                submits.append(m.SubmitJob(**sub))
            except TypeError:
                pass  # written by another version of the add-on: nothing to resend it from
    if not job_ids and not submits:
        return None
    return m.CancelsOwed(sorted(job_ids), submits)


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
