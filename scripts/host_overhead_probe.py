"""The engine's host-side time per job outside the models, at real SD1.5 + v2 sizes, on
the CPU: while the host does it, a GPU has nothing queued (before the first UNet call,
between the denoise and the decode) or it delays the next launch.

The UNet, VAE decoder and text encoder are replaced by stubs that return zeros of the
right shape (their compute is not the question; the tokenizer, scheduler, pipeline and
engine code around them run for real), so what is timed is Python and small tensor work.

    python scripts/host_overhead_probe.py [WORKDIR] [--jobs N]

Prints per job: before the first UNet call, between UNet calls (per step), between the
last UNet call and the first decode, and the job's total, each in ms (median of N)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from animatediff_blender.backend.bench.models import BASE_NAME, MOTION_NAME, build_bench_models
from animatediff_blender.backend.engine.animatediff import AnimateDiffEngine
from animatediff_blender.protocol.messages import GenerateRequest


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", nargs="?", type=Path, default=Path("/tmp/adb-host-probe"))
    parser.add_argument("--jobs", type=int, default=7)
    args = parser.parse_args(argv)
    models = build_bench_models(args.workdir / "real", "real")
    engine = AnimateDiffEngine(models, device="cpu", dtype="fp16")
    request = GenerateRequest(
        prompt="a red fox running through deep snow, cinematic lighting, highly detailed",
        base_model=f"base:{BASE_NAME}", motion_module=f"motion:{MOTION_NAME}", frames=16, width=512,
        height=512, steps=4, guidance=1.0, seed=0, preset="lightning", preview_every=0,
    )  # fmt: skip
    engine.warm_up()
    pipe = engine.pipeline
    marks: dict[str, Any] = {}

    def unet(sample: torch.Tensor, *_a: Any, **_k: Any) -> Any:
        now = time.perf_counter()
        marks.setdefault("first_unet", now)
        if "last_unet" in marks:
            marks["between"].append(now - marks["last_unet"])
        out = SimpleNamespace(sample=torch.zeros_like(sample))
        marks["last_unet"] = time.perf_counter()
        return out

    def text_encoder(ids: torch.Tensor, *_a: Any, **_k: Any) -> Any:
        return (torch.zeros(ids.shape[0], ids.shape[1], 768, dtype=torch.float16),)

    def decode(z: torch.Tensor, *_a: Any, **_k: Any) -> Any:
        marks.setdefault("first_decode", time.perf_counter())
        return SimpleNamespace(sample=torch.zeros(z.shape[0], 3, z.shape[2] * 8, z.shape[3] * 8, dtype=z.dtype))

    pipe.unet.forward, pipe.vae.decode, pipe.text_encoder.forward = unet, decode, text_encoder
    rows = []
    for _ in range(args.jobs + 1):
        marks.clear()
        marks["between"] = []
        t0 = time.perf_counter()
        engine.generate(request, lambda _p: None, lambda: False)
        total = time.perf_counter() - t0
        rows.append({
            "before the first UNet call": marks["first_unet"] - t0,
            "between UNet calls (per step)": statistics.mean(marks["between"]) if marks["between"] else 0.0,
            "last UNet call to first decode": marks["first_decode"] - marks["last_unet"],
            "job total (stubs included)": total,
        })  # fmt: skip
    rows = rows[1:]  # the first job builds what later ones reuse
    for key in rows[0]:
        values = [1000 * r[key] for r in rows]
        print(f"{key:34s} {statistics.median(values):8.1f} ms  (min {min(values):.1f}, max {max(values):.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
