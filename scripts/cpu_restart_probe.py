"""Warm-up after a server restart, probed on the CPU with the real SD1.5 + v2 module structure.

What a restart costs with the fast path is mostly host work that does not depend on the
device: loading the weights, dynamo tracing every compiled block for each warm shape, and
fetching the compiled kernels from `<data-dir>/compile-cache`.  This runs the engine's real
`warm_up` with real-size models (random weights) and real inductor on the CPU, at a small
warm shape (2 frames, 64x64: the same graphs per block as 512x512, cheap kernels), in two
fresh processes: the first compiles, the second finds the first one's cache.

    python scripts/cpu_restart_probe.py /tmp/adb-restart-probe   # prints both warm-ups

Timings are this machine's; the GPU's `restart` phase (scripts/gpu_bench.sh) is the real one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def child(workdir: Path) -> dict[str, float]:
    from animatediff_blender.backend.bench.models import build_bench_models
    from animatediff_blender.backend.engine.animatediff import AnimateDiffEngine, FastPath

    models = build_bench_models(workdir / "models-real", "real")
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
    return {"load_s": load_s, "warm_up_s": time.perf_counter() - t0}


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(Path(sys.argv[2]))))
        return 0
    workdir = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/adb-restart-probe")
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # the engine's data-dir cache, as `serve` has it
    for label in ("first start (cold)", "restart (cache on disk)"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(workdir)], env=env, check=True, capture_output=True, text=True
        ).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"{label}: load {r['load_s']:.1f} s, warm-up with compile {r['warm_up_s']:.1f} s "
              f"(of which ~{r['load_s']:.1f} s loading)", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
