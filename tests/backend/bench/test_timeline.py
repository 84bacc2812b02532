"""The job timeline (`backend/bench/timeline.py`): when the device is idle inside a job
and what the host was doing then, read from a Chrome trace."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from animatediff_blender.backend.bench.profile import labelled_job
from animatediff_blender.backend.bench.timeline import (
    NO_LABEL,
    analyse,
    format_timeline,
    load_trace,
    main,
)


def _x(cat: str, name: str, ts: float, dur: float, tid: int = 1, corr: int | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur}
    if corr is not None:
        event["args"] = {"correlation": corr}
    return event


def _kernel(ts: float, dur: float, corr: int) -> dict[str, Any]:
    return _x("kernel", f"k{corr}", ts, dur, tid=7, corr=corr)


def _launch(ts: float, corr: int, cat: str = "cuda_runtime") -> dict[str, Any]:
    return _x(cat, "cudaLaunchKernel" if cat == "cuda_runtime" else "cuLaunchKernelEx", ts, 5, corr=corr)


def a_job() -> list[dict[str, Any]]:
    """One job of 1000 us: the prompt (0-100), the UNet (100-600), the VAE (600-950)."""
    return [
        _x("user_annotation", "adb:job", 0, 1000),
        _x("user_annotation", "adb:encode_prompt", 0, 100),
        _x("user_annotation", "adb:unet", 100, 500),
        _x("user_annotation", "adb:vae.decode", 600, 350),
        _x("cpu_op", "aten::mm", 120, 10),  # host ops are not device work
        _launch(120, 1),
        _kernel(150, 250, 1),  # 0-150 idle: the first kernel was launched at 120, in the UNet
        _launch(300, 2, cat="cuda_driver"),  # a triton kernel: the driver API
        _kernel(400, 50, 2),  # back to back with the first: no gap
        _launch(520, 3),
        _kernel(530, 20, 3),  # 450-530 idle: launched at 520, in the UNet
        _launch(540, 4),
        _kernel(620, 200, 4),  # 550-620 idle, but launched at 540, before the gap: it waited
        _x("cuda_runtime", "cudaStreamSynchronize", 560, 50),  # ... on this sync, in the UNet
        _launch(880, 5),
        _x("gpu_memcpy", "Memcpy DtoH", 900, 10, tid=7, corr=5),  # 820-900 idle: launched at 880, in the VAE
        # 910-1000 idle: after the last device work, the VAE label still open
    ]


def test_idle_gaps_are_attributed_to_the_host_label_that_launched_the_work_after_them() -> None:
    t = analyse(a_job())
    assert t["jobs"] == 1 and t["device_events"] == 5
    assert t["wall_ms"] == pytest.approx(1.0)
    busy_us = 250 + 50 + 20 + 200 + 10
    assert t["device_busy_ms"] == pytest.approx(busy_us / 1000)
    assert t["device_idle_ms"] == pytest.approx((1000 - busy_us) / 1000)
    idle = {k: round(v["ms"] * 1000) for k, v in t["idle_by_host_label"].items()}
    assert idle == {
        "unet": 150 + 80,
        "queued, waiting (sync or copy): unet": 70,
        "vae.decode": 80,
        "after the last device work: vae.decode": 90,
    }
    assert sum(v["ms"] for v in t["idle_by_host_label"].values()) == pytest.approx(t["device_idle_ms"])
    assert t["idle_by_host_label"]["unet"]["gaps"] == 2
    assert t["idle_by_host_label"]["unet"]["max_ms"] == pytest.approx(0.15)
    assert t["sync_ms_by_label"] == {"cudaStreamSynchronize in unet": pytest.approx(0.05)}
    assert t["host_ms_by_label"] == pytest.approx({"encode_prompt": 0.1, "unet": 0.5, "vae.decode": 0.35})
    printed = format_timeline(t)
    assert "idle 0.5 ms" in printed and "queued, waiting (sync or copy): unet" in printed


def test_short_gaps_are_counted_but_not_attributed_and_jobs_are_averaged() -> None:
    job = a_job()
    second = [dict(e, ts=e["ts"] + 5000) for e in job]
    for e in second:
        if "args" in e:
            e["args"] = {"correlation": e["args"]["correlation"] + 100}
    t = analyse(job + second, min_gap_us=75)
    assert t["jobs"] == 2 and t["wall_ms"] == pytest.approx(1.0)  # per job
    idle = {k: round(v["ms"] * 1000) for k, v in t["idle_by_host_label"].items()}
    assert idle["(gaps under 75 us)"] == 70  # the queued gap
    assert idle["unet"] == 150 + 80 and t["idle_by_host_label"]["unet"]["gaps"] == 2  # per job


def test_work_outside_any_label_and_a_trace_without_job_labels() -> None:
    events = [_launch(10, 1), _kernel(20, 10, 1), _launch(60, 2), _kernel(70, 10, 2)]
    t = analyse(events)  # no adb:job: the whole trace is one job
    assert t["jobs"] == 1 and t["wall_ms"] == pytest.approx(0.06)  # from the first kernel to the last
    assert {k: round(v["ms"] * 1000) for k, v in t["idle_by_host_label"].items()} == {NO_LABEL: 40}
    assert analyse([]) == {"jobs": 0, "device_events": 0}


def test_a_real_profiler_trace_is_read_back_gzipped_and_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("adb:job"):
            with record_function("adb:unet"):
                torch.randn(64, 64) @ torch.randn(64, 64)
    raw = tmp_path / "trace.json"
    prof.export_chrome_trace(str(raw))
    packed = tmp_path / "trace.json.gz"
    packed.write_bytes(gzip.compress(raw.read_bytes()))
    for path in (raw, packed):
        t = analyse(load_trace(path))
        assert t["jobs"] == 1 and t["device_events"] == 0
        assert 0 < t["host_ms_by_label"]["unet"] <= t["wall_ms"]
    assert main([str(packed)]) == 0
    assert "no device events" in capsys.readouterr().out
    assert main([]) == 2
    (tmp_path / "list.json").write_text(json.dumps([_launch(0, 1), _kernel(5, 5, 1)]))
    assert load_trace(tmp_path / "list.json")[1]["cat"] == "kernel"  # a bare event list is a trace too


class _Pipe:
    def encode_prompt(self, x: int) -> int:
        return x + 1

    def prepare_latents(self) -> str:
        return "latents"


class _Unet(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_labelled_job_labels_the_pipeline_parts_and_restores_them() -> None:
    from torch.profiler import ProfilerActivity, profile

    import animatediff_blender.backend.engine.animatediff as animatediff

    pipe = _Pipe()
    unet = _Unet()
    sdpa_forward = unet.forward  # an instance-level wrapper already there (the sdpa lever) stays
    unet.forward = sdpa_forward  # type: ignore[method-assign]
    vae = SimpleNamespace(decode=lambda z: z)
    processor = SimpleNamespace(postprocess_video=lambda video, output_type: video)
    pipe.unet, pipe.vae, pipe.video_processor = unet, vae, processor  # type: ignore[attr-defined]
    engine = SimpleNamespace(pipeline=pipe)
    to_uint8 = animatediff._to_uint8_frames
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with labelled_job(engine):
            assert pipe.encode_prompt(1) == 2 and pipe.prepare_latents() == "latents"
            assert unet(torch.ones(1)).item() == 2.0
            assert vae.decode(3) == 3 and processor.postprocess_video(4, output_type="pt") == 4
            assert animatediff._to_uint8_frames is not to_uint8
    names = {e.key for e in prof.key_averages()}
    assert {"adb:encode_prompt", "adb:prepare_latents", "adb:unet", "adb:vae.decode", "adb:postprocess_video"} <= names
    assert "encode_prompt" not in vars(pipe) and "prepare_latents" not in vars(pipe)
    assert unet.forward is sdpa_forward and vars(vae)["decode"](5) == 5
    assert animatediff._to_uint8_frames is to_uint8
    with labelled_job(SimpleNamespace(pipeline=None)):  # before the first job: only the frames label
        assert animatediff._to_uint8_frames is not to_uint8
    assert animatediff._to_uint8_frames is to_uint8
