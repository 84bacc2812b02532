"""How long an artist waits when alternating the Quality and Fast presets: the engine's in-place
motion-module weight swap ("swap", `swap_motion_weights=True`, the default) against the baseline
that rebuilds the motion UNet for each other module ("rebuild", `swap_motion_weights=False`),
side by side in one run, on the same models and fast path.

    python scripts/switch_probe.py --device cuda --size real --out switch.json   # the GPU run
    python scripts/switch_probe.py --device cpu --size tiny --fast regional --compile-backend eager  # smoke

Models: the benchmark's random-weight set (`backend/bench/models.py`) plus a second motion
module of the same architecture with other random weights, `motion/bench-motion-adapter-lightning/`,
which the registry takes for AnimateDiff-Lightning (the name says "lightning") and so makes the
default module of the Fast preset ("motion_lightning").  `--models DIR` keeps them for re-runs.

Per engine: `warm_up()` (loads the default models, reads the lightning module ahead, compiles
the warm shapes = the Quality and the Fast job's shape, with and without CFG), then timed, each
its wall clock with the device synchronised: Quality, Fast, Fast, Quality, Fast (Fast = preset
"lightning", no motion module given).  The switch cost is "fast-1" (first Fast after Quality)
minus "fast-2" (the same job again, no switch); likewise "fast-3" - "fast-2" and "quality-2" -
"quality-1" for the switches back.  With `defer_compile` (the engine's and the server's
default), a job whose shape is not compiled for the UNet it runs on runs eagerly and its shape
waits for `warm_pending()`: the swap engine's UNet keeps its compiled blocks, the rebuild
engine's new UNet has none, so its jobs after a switch run eagerly ("ran" in the table, read from
the engine's pending shapes) and it pays the compile later, while idle: `warm_pending_s`.

Compile cost: compiling 2 shapes cold takes ~90 s on an H200, too long to pay twice in a
~4-minute run.  So the swap engine runs first and compiles cold, and the rebuild engine, in the
same process, reuses what it can: dynamo's in-process traces (regionally compiled blocks of a
new UNet of the same classes and shapes reuse them; `--reset-dynamo` makes it trace again, as a
restarted server would) and inductor's kernels on disk (one `compile_cache_dir` for both,
`--compile-cache`, default a fresh temporary folder).  Only the rebuild engine's `warm_up_s` is
shortened by this, not its jobs: a job's shape is compiled for its UNet or not (`defer_compile`)
whatever the caches hold; and its `warm_pending_s` is what a server that compiled the first UNet
pays in production too (same process, same cache).

CPU smoke (tests/backend/bench/test_switch_probe.py): dynamo traces each shape for ~14 s on a
small CPU even with the "eager" backend, so the test passes `--fast-guidance 1.5` (the Fast job
with CFG, one warm shape shared by both jobs instead of two); the swap/rebuild behaviour is the
same.

Between engines: `unload()`, del, gc, `torch.cuda.empty_cache()` and a fresh peak, so each
engine's peak memory (CUDA only) is its own.  The JSON is rewritten after each engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from animatediff_blender.backend.bench.models import MOTION_NAME, Size, build_bench_models, unet_configs
from animatediff_blender.backend.engine.animatediff import AnimateDiffEngine, FastPath
from animatediff_blender.protocol.messages import GenerateRequest

LIGHTNING_NAME = "bench-motion-adapter-lightning"
PROMPT = "a lighthouse on a cliff at sunset, waves crashing"
NEGATIVE = "blurry, low quality"
ORDER = ("quality-1", "fast-1", "fast-2", "quality-2", "fast-3")
ENGINES = {"swap": True, "rebuild": False}  # name -> swap_motion_weights
GiB = 1024**3


def build_switch_models(dest: Path, size: Size, init_device: str = "cpu", seed: int = 0) -> Path:
    """The bench models under `dest` (kept when present) and a second motion module of the
    same architecture, other random weights, named for the registry to see "lightning"."""
    from diffusers import MotionAdapter

    build_bench_models(dest, size, seed=seed, init_device=init_device)
    target = dest / "motion" / LIGHTNING_NAME
    if not (target / "config.json").is_file():
        assert (dest / "motion" / MOTION_NAME).is_dir()
        torch.manual_seed(seed + 1)
        store = torch.float16 if size == "real" else torch.float32  # as build_bench_models stores
        tmp = dest / "motion" / f".tmp-{LIGHTNING_NAME}"  # dot names are not scanned
        shutil.rmtree(tmp, ignore_errors=True)
        with torch.device(init_device):
            MotionAdapter(**unet_configs(size)[1]).to(store).save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return dest


def job_requests(size: Size, seed: int, fast_guidance: float | None = None) -> dict[str, GenerateRequest]:
    """The artist's two jobs: models left to the server (Fast picks the lightning module)."""
    if size == "real":
        shape: dict[str, Any] = dict(frames=16, width=512, height=512)
        quality_steps = fast_steps = None  # the presets' 25 and 4
    else:
        shape = dict(frames=4, width=64, height=64)
        quality_steps = fast_steps = 2
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, seed=seed, preview_every=0, **shape)
    return {
        "quality": GenerateRequest(preset="quality", steps=quality_steps, **common),
        "fast": GenerateRequest(preset="lightning", steps=fast_steps, guidance=fast_guidance, **common),
    }


def fast_path(kind: str, device: str, compile_backend: str | None, warm_shapes: Any) -> FastPath:
    if kind == "default":
        fast = FastPath.auto_for(device)  # what AnimateDiffEngine(fast=None) picks
    elif kind == "off":
        fast = FastPath.off()
    else:  # "regional"
        fast = FastPath(compile="regional")
    if compile_backend:
        fast = dataclasses.replace(fast, compile_backend=compile_backend)
    return dataclasses.replace(fast, warm_shapes=warm_shapes)


class Device:
    def __init__(self, device: str) -> None:
        self.cuda = torch.device(device).type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def new_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / GiB if self.cuda else None

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def ran_how(engine: AnimateDiffEngine, request: GenerateRequest) -> str:
    """Whether the job just run went through compiled blocks: a deferred shape waits in the
    engine's pending shapes (private state, read for this probe only)."""
    if not engine.fast.compiles:
        return "eager (fast path off)"
    if engine.compile_error is not None:
        return "eager (compile failed)"
    key = engine._shape_key(engine.resolve(request))
    if key in engine._to_warm:
        return "eager (deferred)"
    return "compiled" if key in engine._warm_keys else "?"


def run_engine(
    name: str, models: Path, device: str, dtype: str | None, fast: FastPath, cache: Path,
    jobs: dict[str, GenerateRequest], clock: Device, warm_pending: bool, reset_dynamo: bool = False,
) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {"swap_motion_weights": ENGINES[name], "jobs": [], "error": None}
    engine = AnimateDiffEngine(
        models, device, dtype, fast=fast, compile_cache_dir=cache, swap_motion_weights=ENGINES[name]
    )
    out["dtype"] = str(engine.dtype).replace("torch.", "")
    peaks: list[float] = []

    def peak() -> float | None:
        value = clock.peak_gib()
        if value is not None:
            peaks.append(value)
        return value

    try:
        clock.new_peak()
        t0 = clock.now()
        engine.warm_up()
        out["warm_up_s"] = clock.now() - t0
        out["warm_up_peak_gib"] = peak()
        out["warm_up_pending"] = engine.pending_warm_ups
        out["defaults"] = engine.default_models()
        for label in ORDER:
            request = jobs[label.split("-")[0]]
            clock.new_peak()
            t0 = clock.now()
            result = engine.generate(request, lambda _p: None, lambda: False)
            seconds = clock.now() - t0
            row = {
                "job": label,
                "preset": result.settings.preset,
                "motion_module": result.settings.motion_module,
                "frames": result.settings.frames,
                "width": result.settings.width,
                "height": result.settings.height,
                "steps": result.settings.steps,
                "guidance": result.settings.guidance,
                "seconds": seconds,
                "frames_out": len(result.frames),
                "timings": dict(result.timings),
                "ran": ran_how(engine, request),
                "pending_warm_ups": engine.pending_warm_ups,
                "load_counts": dict(engine.load_counts),
                "peak_mem_gib": peak(),
            }
            out["jobs"].append(row)
        out["warm_pending_s"] = None
        if warm_pending:
            clock.new_peak()
            t0 = clock.now()
            out["warm_pending_done"] = engine.warm_pending()
            out["warm_pending_s"] = clock.now() - t0
            out["warm_pending_peak_gib"] = peak()
        out["pending_after"] = engine.pending_warm_ups
    except Exception as exc:  # noqa: BLE001 - the other engine still runs; the error is reported
        import traceback

        traceback.print_exc()
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        out["load_counts"] = dict(engine.load_counts)
        out["compile_error"] = engine.compile_error
        out["peak_mem_gib"] = max(peaks) if peaks else None
        engine.unload()
        del engine
        clock.free()
        if reset_dynamo:
            import torch._dynamo

            torch._dynamo.reset()  # the next engine traces its own modules (inductor's disk cache stays)
    return out


def switch_costs(engine: dict[str, Any]) -> dict[str, float | None]:
    s = {row["job"]: row["seconds"] for row in engine.get("jobs", [])}

    def minus(a: str, b: str) -> float | None:
        return s[a] - s[b] if a in s and b in s else None

    return {
        "to_fast_s": minus("fast-1", "fast-2"),  # first Fast after Quality - the repeated Fast
        "to_fast_again_s": minus("fast-3", "fast-2"),
        "to_quality_s": minus("quality-2", "quality-1"),
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'engine':8s} {'job':10s} {'seconds':>8s} {'load_s':>7s} {'pending':>7s}  ran"]
    for name, engine in report["engines"].items():
        lines.append(f"{name:8s} {'warm_up':10s} {engine.get('warm_up_s') or 0:8.2f}")
        for row in engine["jobs"]:
            lines.append(
                f"{name:8s} {row['job']:10s} {row['seconds']:8.2f} {row['timings'].get('load', 0.0):7.2f} "
                f"{row['pending_warm_ups']:7d}  {row['ran']}"
            )
        if engine.get("warm_pending_s") is not None:
            lines.append(f"{name:8s} {'warm_pend.':10s} {engine['warm_pending_s']:8.2f}  (compile paid later, idle)")
        mem = engine.get("peak_mem_gib")
        lines.append(
            f"{name:8s} load_counts {engine['load_counts']}" + (f"  peak {mem:.2f} GiB" if mem is not None else "")
            + (f"  ERROR {engine['error']}" if engine.get("error") else "")
        )  # fmt: skip
    for name, cost in report["switch_cost_s"].items():
        parts = [f"{k} {v:+.2f}" if v is not None else f"{k} -" for k, v in cost.items()]
        lines.append(f"switch cost {name:8s} " + "  ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="fp16, bf16, fp32 (default: the engine's for the device)")
    parser.add_argument("--size", choices=("real", "tiny"), default="real")
    parser.add_argument("--models", type=Path, default=None, help="models folder, kept and reused (default: temporary)")
    parser.add_argument("--compile-cache", type=Path, default=None, help="shared compile cache (default: temporary)")
    parser.add_argument(
        "--fast", choices=("default", "off", "regional"), default="default",
        help="default: the engine's default for the device; regional: a regional compile wherever it runs",
    )  # fmt: skip
    parser.add_argument("--compile-backend", default=None, help="override the fast path's (CPU smoke: eager)")
    parser.add_argument("--engine", action="append", choices=tuple(ENGINES), help="run only these (default: both)")
    parser.add_argument("--no-warm-pending", action="store_true", help="skip timing the rebuild engine's warm_pending()")
    parser.add_argument(
        "--reset-dynamo", action="store_true",
        help="reset dynamo between engines: the rebuild engine traces again (a restarted server's warm-up)",
    )  # fmt: skip
    parser.add_argument(
        "--fast-guidance", type=float, default=None,
        help="the Fast job's guidance (default: the lightning preset's 1.0, no CFG); > 1 shares the Quality job's shape",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON report")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    clock = Device(args.device)
    threads = torch.get_num_threads()
    if args.size == "tiny" and not clock.cuda:
        torch.set_num_threads(1)  # tiny work: OpenMP threads on a shared CPU only spin (as bench/run.py)
    temp = Path(tempfile.mkdtemp(prefix="adb-switch-")) if args.models is None or args.compile_cache is None else None
    try:
        models = args.models or (temp / "models")  # type: ignore[operator]
        cache = args.compile_cache or (temp / "compile-cache")  # type: ignore[operator]
        t0 = time.perf_counter()
        init = args.device if clock.cuda and args.size == "real" else "cpu"
        build_switch_models(models, args.size, init_device=init, seed=args.seed)
        models_s = time.perf_counter() - t0
        jobs = job_requests(args.size, args.seed, args.fast_guidance)
        cfgs = {"quality": True, "fast": (args.fast_guidance or 1.0) > 1.0}  # the presets' guidance: 7.5, 1.0
        shapes = tuple(dict.fromkeys((r.frames, r.width, r.height, cfgs[k]) for k, r in jobs.items()))
        fast = fast_path(args.fast, args.device, args.compile_backend, shapes)
        import diffusers

        report: dict[str, Any] = {
            "command": [sys.executable, *sys.argv] if argv is None else ["switch_probe.py", *argv],
            "device": torch.cuda.get_device_name(torch.device(args.device)) if clock.cuda else (platform.processor() or "cpu"),
            "device_kind": args.device,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "cuda": getattr(torch.version, "cuda", None),
            "size": args.size,
            "dtype": args.dtype,
            "fast": fast.describe(),
            "warm_shapes": [list(x) for x in fast.warm_shapes],
            "compile_backend": fast.compile_backend,
            "models": str(models),
            "compile_cache": str(cache),
            "models_build_s": models_s,
            "order": list(ORDER),
            "engines": {},
            "switch_cost_s": {},
        }

        def save() -> None:
            report["total_s"] = time.perf_counter() - started
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                tmp = args.out.with_suffix(".tmp")
                tmp.write_text(json.dumps(report, indent=2, default=str))
                os.replace(tmp, args.out)

        print(f"switch: models ready in {models_s:.1f} s ({models}); fast path {fast.describe()}", flush=True)
        for name in [n for n in ENGINES if not args.engine or n in args.engine]:
            print(f"switch: engine {name} ...", flush=True)
            result = run_engine(
                name, models, args.device, args.dtype, fast, cache, jobs, clock,
                warm_pending=name == "rebuild" and not args.no_warm_pending, reset_dynamo=args.reset_dynamo,
            )  # fmt: skip
            report["engines"][name] = result
            report["switch_cost_s"][name] = switch_costs(result)
            save()
        print(format_table(report))
        save()
        return report
    finally:
        torch.set_num_threads(threads)
        if temp is not None:  # holds only what was not given
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    report = main()
    sys.exit(1 if any(e.get("error") for e in report["engines"].values()) else 0)
