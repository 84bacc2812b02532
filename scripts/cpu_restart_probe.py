"""Warm-up after a server restart, probed on the CPU with the real SD1.5 + v2 module structure.

What a restart costs with the fast path is mostly host work that does not depend on the
device: loading the weights, dynamo tracing every compiled block for each warm shape, and
fetching the compiled kernels from `<data-dir>/compile-cache`.  This runs the engine's real
`warm_up` with real-size models (random weights) and real inductor on the CPU, at a small
warm shape (2 frames, 64x64: the same graphs per block as 512x512, cheap kernels), in two
fresh processes: the first compiles, the second finds the first one's cache.

    python scripts/cpu_restart_probe.py /tmp/adb-restart-probe [real|tiny]   # prints both warm-ups
    python scripts/cpu_restart_probe.py /tmp/adb-restart-probe real --load-only  # model loading alone

Each process then runs one job at the warm shape; the frames' digest must be the same in
both (the restarted process runs what it loaded from the cache).  Timings are this
machine's; the GPU's `restart` phase (scripts/gpu_bench.sh) is the real one.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def child(workdir: Path, size: str) -> dict[str, Any]:
    from animatediff_blender.backend.bench.models import build_bench_models
    from animatediff_blender.backend.engine.animatediff import AnimateDiffEngine, FastPath
    from animatediff_blender.protocol.messages import GenerateRequest

    models = build_bench_models(workdir / f"models-{size}", size)  # type: ignore[arg-type]
    base, motion = "base:bench-sd15", "motion:bench-motion-adapter-v2"
    shape = ((2, 64, 64, True),)
    t0 = time.perf_counter()
    plain = AnimateDiffEngine(models, "cpu", "fp32", fast=False)
    plain.warm_up(base, motion)
    load_s = time.perf_counter() - t0
    plain.unload()
    del plain
    fast = FastPath(compile="regional", batch_windows=True, warm_shapes=shape)
    engine = AnimateDiffEngine(models, "cpu", "fp32", fast=fast, compile_cache_dir=workdir / "compile-cache")
    t0 = time.perf_counter()
    engine.warm_up(base, motion)
    warm_up_s = time.perf_counter() - t0
    job = GenerateRequest(prompt="probe", base_model=base, motion_module=motion, frames=2, width=64, height=64,
                          steps=2, seed=3, preview_every=0)  # fmt: skip
    t0 = time.perf_counter()
    frames = engine.generate(job, lambda _p: None, lambda: False).frames
    job_s = time.perf_counter() - t0
    digest = hashlib.sha256(b"".join(f.tobytes() for f in frames)).hexdigest()[:16]
    return {"load_s": load_s, "warm_up_s": warm_up_s, "job_s": job_s, "digest": digest}


def load_only(workdir: Path, size: str) -> None:
    """What every (re)start pays before anything compiles: the engine's load of the base
    model and motion module and its build of the motion UNet, in this (fresh) process."""
    from animatediff_blender.backend.bench.models import build_bench_models
    from animatediff_blender.backend.engine.animatediff import AnimateDiffEngine

    models = build_bench_models(workdir / f"models-{size}", size)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    AnimateDiffEngine(models, "cpu", "fp32", fast=False).warm_up(
        "base:bench-sd15", "motion:bench-motion-adapter-v2"
    )
    print(
        f"loading the models (base, motion module, motion UNet): {time.perf_counter() - t0:.1f} s", flush=True
    )


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(child(Path(sys.argv[2]), sys.argv[3])))
        return 0
    workdir = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/adb-restart-probe")
    size = sys.argv[2] if len(sys.argv) > 2 else "real"
    if "--load-only" in sys.argv[3:]:
        load_only(workdir, size)
        return 0
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # the engine's data-dir cache, as `serve` has it
    for label in ("first start (cold)", "restart (cache on disk)"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(workdir), size], env=env, check=True, capture_output=True,
            text=True,
        ).stdout.strip().splitlines()[-1]  # fmt: skip
        r = json.loads(out)
        print(f"{label}: load {r['load_s']:.1f} s, warm-up with compile {r['warm_up_s']:.1f} s "
              f"(of which ~{r['load_s']:.1f} s loading), then a job {r['job_s']:.2f} s, frames {r['digest']}",
              flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
