"""Where a profiled job's GPU waits for the host, read from a Chrome trace.

`profile_call` says what share of a whole job the GPU is busy (85 % for the H200's
lightning job in run 3: ~77 ms of 500 idle); this module says *when* it is idle and
what the host was doing then.  The benchmark labels the parts of a job with
`torch.profiler.record_function` (`labelled_job`: prompt encoding, latents, UNet calls,
VAE decode, frame conversion; in `profile.py`), exports the profiler's trace and
reads it back here:

* the device's busy time is the union of its kernels, copies and memsets;
* every idle gap inside a job ends with some device event, whose launch (the runtime or
  driver call with the same correlation id) happened on the host at a known time: the
  innermost label around that launch is what made the device wait.  A gap whose next
  kernel was launched *before* the gap began is "queued": the device waited for
  something else (a synchronising copy, an event), not for the launch.
* host synchronisations (stream/device/event synchronize, blocking copies) are summed
  by label too: each one empties the device's queue.

The trace is plain JSON (`torch.profiler.profile.export_chrome_trace`), so a trace
brought back from a GPU machine can be read again here without one:
`python -m animatediff_blender.backend.bench.timeline TRACE.json[.gz]`.
"""

from __future__ import annotations

import bisect
import gzip
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEVICE_CATEGORIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
LAUNCH_CATEGORIES = frozenset({"cuda_runtime", "cuda_driver"})
LABEL_CATEGORY = "user_annotation"
LABEL_PREFIX = "adb:"
JOB_LABEL = LABEL_PREFIX + "job"
NO_LABEL = "(engine/pipeline code between the labelled parts)"
SYNC_NAMES = ("Synchronize", "cudaMemcpy", "cuMemcpy")  # sync calls and possibly blocking copies


@dataclass(frozen=True)
class _Span:
    start: float  # microseconds, the trace's clock
    end: float
    name: str
    tid: Any = None
    correlation: Any = None


def load_trace(path: Path) -> list[dict[str, Any]]:
    """The events of a Chrome trace file (`.json` or `.json.gz`)."""
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    events = data.get("traceEvents", []) if isinstance(data, dict) else data
    return [e for e in events if isinstance(e, dict)]


def _spans(events: list[dict[str, Any]], keep: Callable[[dict[str, Any]], bool]) -> list[_Span]:
    out = []
    for e in events:
        if e.get("ph") == "X" and keep(e):
            try:
                start, dur = float(e["ts"]), float(e.get("dur", 0.0))
            except (KeyError, TypeError, ValueError):
                continue
            out.append(_Span(start, start + dur, str(e.get("name", "")), e.get("tid"), _correlation(e)))
    return sorted(out, key=lambda s: (s.start, -s.end))


def _correlation(e: dict[str, Any]) -> Any:
    args = e.get("args")
    return args.get("correlation") if isinstance(args, dict) else None


def _merge(spans: list[_Span]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for s in spans:
        if merged and s.start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], s.end)
        else:
            merged.append([s.start, s.end])
    return [(a, b) for a, b in merged]


def _innermost(labels: list[_Span], t: float, tid: Any = None) -> str:
    """The shortest label around time `t` (on thread `tid` when given), else NO_LABEL."""
    best: _Span | None = None
    for s in labels:
        if s.start > t:
            break
        if (
            s.end >= t
            and (tid is None or s.tid == tid)
            and (best is None or s.end - s.start < best.end - best.start)
        ):
            best = s
    return best.name[len(LABEL_PREFIX) :] if best is not None else NO_LABEL


def analyse(events: list[dict[str, Any]], min_gap_us: float = 0.0) -> dict[str, Any]:
    """Per job (each `adb:job` label; the whole trace when there is none): wall, device
    busy and idle time, and the idle time by what the host was doing (see the module
    docstring).  Gaps shorter than `min_gap_us` count in the idle total, not in the
    attribution (a launch's own latency is a few microseconds)."""
    device = _spans(events, lambda e: e.get("cat") in DEVICE_CATEGORIES)
    launches = {
        _correlation(e): e
        for e in events
        if e.get("ph") == "X" and e.get("cat") in LAUNCH_CATEGORIES and _correlation(e) is not None
    }
    labels = _spans(
        events, lambda e: e.get("cat") == LABEL_CATEGORY and str(e.get("name", "")).startswith(LABEL_PREFIX)
    )
    syncs = _spans(
        events,
        lambda e: e.get("cat") in LAUNCH_CATEGORIES and any(n in str(e.get("name", "")) for n in SYNC_NAMES),
    )
    jobs = [s for s in labels if s.name == JOB_LABEL]
    if not jobs:
        everything = device + labels
        if not everything:
            return {"jobs": 0, "device_events": 0}
        jobs = [_Span(min(s.start for s in everything), max(s.end for s in everything), JOB_LABEL)]
    inner = [s for s in labels if s.name != JOB_LABEL]
    # The device event that ends each gap, by start time, and where it was launched.
    device_by_start = [s.start for s in device]  # `device` is sorted by start
    launch_at = {c: float(e["ts"]) for c, e in launches.items() if "ts" in e}
    launch_tid = {c: e.get("tid") for c, e in launches.items()}
    busy_all = _merge(device)

    totals: dict[str, dict[str, float]] = {}
    wall = busy = 0.0
    for job in jobs:
        wall += job.end - job.start
        clipped = [(max(a, job.start), min(b, job.end)) for a, b in busy_all if b > job.start and a < job.end]
        busy += sum(b - a for a, b in clipped)
        edges = [job.start] + [x for ab in clipped for x in ab] + [job.end]
        for gap_start, gap_end in zip(edges[0::2], edges[1::2], strict=True):
            length = gap_end - gap_start
            if length <= 0:
                continue
            if length < min_gap_us:
                where = f"(gaps under {min_gap_us:g} us)"
            elif gap_end >= job.end:
                where = "after the last device work: " + _innermost(inner, gap_start)
            else:
                i = bisect.bisect_left(device_by_start, gap_end)
                corr = device[i].correlation if i < len(device) else None
                t_launch = launch_at.get(corr)
                if t_launch is None:
                    where = "(launch not in the trace)"
                elif t_launch <= gap_start:
                    where = "queued, waiting (sync or copy): " + _innermost(inner, gap_start)
                else:
                    where = _innermost(inner, t_launch, launch_tid.get(corr))
            entry = totals.setdefault(where, {"ms": 0.0, "gaps": 0, "max_ms": 0.0})
            entry["ms"] += length / 1000
            entry["gaps"] += 1
            entry["max_ms"] = max(entry["max_ms"], length / 1000)
    sync_by_label: dict[str, float] = {}
    for s in syncs:
        if any(j.start <= s.start <= j.end for j in jobs):
            where = f"{s.name} in {_innermost(inner, s.start, s.tid)}"
            sync_by_label[where] = sync_by_label.get(where, 0.0) + (s.end - s.start) / 1000
    host_by_label: dict[str, float] = {}
    for s in inner:
        if any(j.start <= s.start <= j.end for j in jobs):
            name = s.name[len(LABEL_PREFIX) :]
            host_by_label[name] = host_by_label.get(name, 0.0) + (s.end - s.start) / 1000
    n = len(jobs)
    return {
        "jobs": n,
        "device_events": len(device),
        "wall_ms": wall / 1000 / n,
        "device_busy_ms": busy / 1000 / n,
        "device_idle_ms": (wall - busy) / 1000 / n,
        # Idle time per job by what the host was doing when the work after the gap was launched.
        "idle_by_host_label": {
            k: {"ms": v["ms"] / n, "gaps": v["gaps"] / n, "max_ms": v["max_ms"]}
            for k, v in sorted(totals.items(), key=lambda kv: kv[1]["ms"], reverse=True)
        },
        "sync_ms_by_label": {
            k: v / n for k, v in sorted(sync_by_label.items(), key=lambda kv: kv[1], reverse=True)
        },
        "host_ms_by_label": {
            k: v / n for k, v in sorted(host_by_label.items(), key=lambda kv: kv[1], reverse=True)
        },
    }


def format_timeline(t: dict[str, Any]) -> str:
    if not t.get("device_events"):
        return "timeline: no device events in the trace (CPU run): nothing to attribute"
    lines = [
        f"timeline (per job, {t['jobs']} job(s)): {t['wall_ms']:.1f} ms wall, device busy {t['device_busy_ms']:.1f} ms, "
        f"idle {t['device_idle_ms']:.1f} ms; idle by what the host was doing:"
    ]
    for where, v in t["idle_by_host_label"].items():
        lines.append(f"    {v['ms']:8.2f} ms in {v['gaps']:6.1f} gaps (max {v['max_ms']:.2f})  {where}")
    if t["sync_ms_by_label"]:
        lines.append("  host waiting in synchronising calls:")
        lines.extend(f"    {ms:8.2f} ms  {where}" for where, ms in t["sync_ms_by_label"].items())
    lines.append("  host time inside each label:")
    lines.extend(f"    {ms:8.2f} ms  {name}" for name, ms in t["host_ms_by_label"].items())
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m animatediff_blender.backend.bench.timeline TRACE.json[.gz]", file=sys.stderr)
        return 2
    print(format_timeline(analyse(load_trace(Path(argv[0])), min_gap_us=20.0)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
