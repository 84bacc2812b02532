"""`animatediff-blender queue`: what a shared backend is doing now: the running job, the
waiting ones in the order it will run them, whose each one is and how big; `--cancel` takes
jobs out (one's own, or any job for an admin certificate's holder)."""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from typing import TYPE_CHECKING

from animatediff_blender.backend.commands import add_connection_args, connection_config

if TYPE_CHECKING:
    from animatediff_blender.protocol.messages import JobList, QueuedJob


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "queue",
        help="show a backend's queue: the running job and the waiting ones, whose and how big",
        description=(
            "Show what a running backend (`animatediff-blender serve`) is doing: the job on the GPU "
            "and the jobs waiting, in the order its fair queue will run them, with the client that "
            "sent each one (the artist's user@host), its size and progress.  Your own jobs are "
            "marked and show their ids; other clients' jobs show no id, tag or prompt (to a client "
            "whose certificate the server names with --admin-client, they show their ids too)."
        ),
    )
    p.add_argument("--json", action="store_true", help="print the backend's answer as JSON (for scripts)")
    p.add_argument(
        "--cancel", action="append", default=[], metavar="JOB_ID",
        help="cancel this job first (one of yours, or any job with an admin certificate); repeatable",
    )  # fmt: skip
    add_connection_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import msgspec

    from animatediff_blender.protocol.client import BackendClient, ClientError
    from animatediff_blender.protocol.messages import JOB_ID_PATTERN

    if not (math.isfinite(args.timeout) and args.timeout > 0):
        print(f"error: --timeout must be a positive number of seconds, not {args.timeout:g}", file=sys.stderr)
        return 2
    bad = [job_id for job_id in args.cancel if not re.match(JOB_ID_PATTERN, job_id)]
    if bad:
        print(f"error: --cancel takes a job id as `queue` prints it (32 hex characters), not {bad[0]!r}",
              file=sys.stderr)  # fmt: skip
        return 2
    failed = 0
    try:
        with BackendClient(connection_config(args, "animatediff-blender queue")) as client:
            for job_id in args.cancel:
                try:
                    state = client.cancel(job_id).state
                except ClientError as exc:
                    if exc.code != "not_found":
                        raise
                    print(f"{job_id}: {exc.message}", file=sys.stderr)
                    failed += 1
                    continue
                done = {"running": "cancelling (it stops at its next step)", "cancelled": "cancelled"}
                print(f"{job_id}: {done.get(state, f'already {state}')}", file=sys.stderr)
            listing = client.list_jobs()
    except ClientError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    if args.json:
        print(msgspec.json.encode(listing).decode())
    else:
        print(format_listing(listing, args.address, now=time.time()))
    return 1 if failed else 0


def format_listing(listing: JobList, address: str, now: float) -> str:
    jobs = listing.jobs
    running = sum(1 for j in jobs if j.state == "running")
    head = (f"{address}: {running} running, {len(jobs) - running} waiting"
            + (f", from {listing.clients} client{'s' if listing.clients != 1 else ''}" if jobs else ""))  # fmt: skip
    if not jobs:
        return head + ": the queue is empty"
    rows = [("#", "state", "clip", "progress", "for", "client")]
    for job in jobs:
        rows.append((
            str(job.position) if job.position else "now",
            job.state,
            f"{job.frames} frames {job.width}x{job.height}",
            _progress(job),
            _duration(now - (job.started_at if job.state == "running" and job.started_at else job.created_at)),
            _who(job),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1] for row in rows]
    return "\n".join([head, *(line.rstrip() for line in lines)])


def _progress(job: QueuedJob) -> str:
    if job.state != "running":
        return "-"
    if not job.total_steps:
        return "starting"
    if job.step >= job.total_steps:
        return "saving frames"
    return f"step {job.step}/{job.total_steps}"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _who(job: QueuedJob) -> str:
    if not job.job_id:  # another client's job
        return job.client
    tag = f", tag {job.client_tag[:40]!r}" if job.client_tag else ""
    return f"{'you' if job.mine else job.client}: job {job.job_id}{tag}"
