"""How long a job that arrives while a shape compiles waits for the device (issue #6).

Tiny models, the real inductor, fresh (cold) caches, on the CPU: the engine's warm-up
compiles one 4-frame 64x64 shape, and `ARRIVE_AFTER` seconds into compiling a job "arrives"
(should_yield starts saying so).  Prints how long after its arrival the warm-up gave the
device back.  Usage: python scripts/midcompile_probe.py [ARRIVE_AFTER=10] [WORKDIR]
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="adb-inductor-")
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="adb-triton-")

import torch  # noqa: E402

from animatediff_blender.backend.bench.models import BASE_NAME, MOTION_NAME, build_bench_models  # noqa: E402
from animatediff_blender.backend.engine.animatediff import AnimateDiffEngine, FastPath  # noqa: E402


def main() -> None:
    arrive_after = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    workdir = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.gettempdir()) / "adb-midcompile"
    torch.set_num_threads(1)
    models = build_bench_models(workdir / "models-tiny", "tiny")
    engine = AnimateDiffEngine(
        models, "cpu", "fp32", fast=FastPath(compile="regional", warm_shapes=((4, 64, 64, True),))
    )
    arrived = threading.Event()
    compiling_since: list[float] = []

    def should_yield() -> bool:
        if not compiling_since:  # the first question: models loaded, the shape starts compiling
            compiling_since.append(time.perf_counter())
            threading.Timer(arrive_after, arrived.set).start()
        return arrived.is_set()

    done = engine.warm_up(f"base:{BASE_NAME}", f"motion:{MOTION_NAME}", should_yield=should_yield)
    elapsed = time.perf_counter() - compiling_since[0]
    print(
        f"shape compiled: {done}; gave the device back {elapsed:.1f} s after compiling started; "
        f"a job arriving {arrive_after:.0f} s in waited {max(0.0, elapsed - arrive_after):.1f} s"
    )


if __name__ == "__main__":
    main()
