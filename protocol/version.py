"""The protocol version, "MAJOR.MINOR".

A different MAJOR is refused (the frames or the meaning of a field changed); a
different MINOR is accepted and unknown fields are ignored (fields were only added).
"""

from __future__ import annotations

# 1.1: `Submit.submit_id` (idempotent submits); a 1.0 server ignores it.
# 1.2: `list_jobs` / `job_list` (the server's queue); a 1.1 server refuses it as unknown_type.
# 1.3: admin certificates (`Welcome.admin`, `Cancelled.by`); CurveZMQ servers only.
PROTOCOL_VERSION = "1.3"


def parse_version(version: str) -> tuple[int, int]:
    """`"1.2"` -> `(1, 2)`; ValueError for anything else."""
    major, _, minor = version.partition(".")
    if not (major.isdigit() and minor.isdigit()):
        raise ValueError(f"not a MAJOR.MINOR version: {version!r}")
    return int(major), int(minor)


PROTOCOL_MAJOR, PROTOCOL_MINOR = parse_version(PROTOCOL_VERSION)
