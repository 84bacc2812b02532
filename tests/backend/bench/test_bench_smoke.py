"""CPU smoke run of the benchmark (`animatediff-blender bench --size tiny --device cpu`):
every case, including the one through the server, with the engine's default (eager on
the CPU).  Not timed: it proves the benchmark runs and reports every number."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from animatediff_blender.backend.bench.run import CASE_NAMES, RESULT_FIELDS, psnr
from animatediff_blender.backend.cli import main

pytestmark = pytest.mark.timeout(300)


def test_every_case_runs_and_reports_every_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    code = main(
        ["bench", "--size", "tiny", "--device", "cpu", "--repeats", "0", "--workdir", str(tmp_path / "work"),
         "--json", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads(out.read_text())
    for key in (
        "device",
        "torch",
        "diffusers",
        "python",
        "dtype",
        "size",
        "peak_tflops",
        "levers",
        "total_s",
    ):
        assert key in report
    assert report["size"] == "tiny" and report["levers"] == ["default"]
    assert set(report["cases"]) == set(CASE_NAMES)
    rows = {(r["case"], r["runner"]): r for r in report["results"]}
    expected = {(c, "stock") for c in CASE_NAMES} | {
        (c, "engine[default]") for c in CASE_NAMES if c != "server"
    }
    expected.add(("server", "server[default]"))
    assert set(rows) == expected
    for (case, runner), r in rows.items():
        assert set(RESULT_FIELDS) <= set(r), (case, runner)
        assert not r["error"], (case, runner, r["error"])
        assert r["denoise_s"] > 0 and r["decode_s"] > 0 and r["end_to_end_s"] >= r["denoise_s"]
        assert r["flops_per_step"] > 0 and r["tflops"] > 0 and r["ratio_to_anchor"] > 0
        value = r["psnr_vs_anchor_db"]
        db = math.inf if value == "inf" else float(value)
        if case.startswith("long"):
            # FreeNoise: the engine's split inference sums in another order (<= 1 level of 255).
            assert db >= 40, (case, runner, db)
        else:
            # CPU fp32 eager engine == stock diffusers, bit for bit.
            assert db == math.inf, (case, runner, db)
    # The long cases count FLOPs over all frames (FreeNoise runs the spatial layers on the
    # whole clip), so more frames -> more FLOPs per step.
    assert rows[("long128", "stock")]["flops_per_step"] > rows[("long64", "stock")]["flops_per_step"]
    # CFG doubles the UNet batch: quality (CFG 7.5) counts ~2x the FLOPs of lightning (CFG 1).
    ratio = rows[("quality", "stock")]["flops_per_step"] / rows[("lightning", "stock")]["flops_per_step"]
    assert 1.9 < ratio < 2.1
    server = rows[("server", "server[default]")]
    assert {"engine_total_s", "server_overhead_s", "handshake_warming_up"} <= set(server["extra"])
    # A job submitted as the server started: its wait is reported against a warm job's.
    assert server["extra"]["first_job_after_start_s"] >= server["extra"]["first_job_s"] > 0
    assert server["extra"]["first_job_extra_s"] == pytest.approx(
        server["extra"]["first_job_after_start_s"] - server["end_to_end_s"]
    )
    assert server["warm_up_s"] is not None and server["warm_up_s"] > 0
    # Every row was printed in the closing table; the engine's and the server's rows also
    # as soon as they could be compared (a run stopped early keeps them in its log).
    closing = printed.split("bench: results", 1)[1]
    assert closing.count("PSNR") == len(rows)
    assert printed.count("PSNR") == len(rows) + sum(1 for _, runner in rows if runner != "stock")


def test_psnr() -> None:
    import numpy as np

    a = [np.zeros((4, 4, 3), np.uint8)]
    assert psnr(a, a) == math.inf
    b = [np.full((4, 4, 3), 255, np.uint8)]
    assert psnr(a, b) == 0.0
    with pytest.raises(ValueError):
        psnr(a, a + a)


class _RecordingClock:
    """What `_timed_runs` does to the device's allocator between runs."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def reset_peak(self) -> None:
        self.calls.append("empty the cache")

    def reset_peak_stats(self) -> None:
        self.calls.append("reset the peak")


@pytest.mark.parametrize("repeats", [0, 1, 3])
def test_timed_runs_keep_the_allocators_cache(repeats: int) -> None:
    """A server never empties the allocator's cache between jobs: the timed runs must not
    start from an empty one either (each would allocate every block from the driver)."""
    from animatediff_blender.backend.bench.run import _timed_runs

    clock = _RecordingClock()
    times = iter([(1.0, 0.5, 2.0), (0.9, 0.4, 1.5), (0.8, 0.3, 1.2), (0.7, 0.2, 1.4)])

    def once() -> tuple[float, float, float, list[Any]]:
        clock.calls.append("run")
        return (*next(times), [])

    first, denoise, decode, e2e, _ = _timed_runs(once, repeats, clock)  # type: ignore[arg-type]
    assert "empty the cache" not in clock.calls
    if repeats == 0:
        assert clock.calls == ["reset the peak", "run"] and (first, denoise, e2e) == (2.0, 1.0, 2.0)
    else:
        assert clock.calls == ["run", "reset the peak"] + ["run"] * repeats
        assert first == 2.0 and denoise == (0.9 if repeats == 1 else 0.8) and e2e == (1.5 if repeats == 1 else 1.4)


def test_bad_arguments_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["bench", "--size", "tiny", "--device", "cpu", "--lever", "warp-drive", "--workdir", str(tmp_path),
         "--json", str(tmp_path / "x.json")]
    )  # fmt: skip
    assert code == 2
    assert "unknown lever" in capsys.readouterr().err


def test_anchor_subset_and_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--anchor: stock runs only for the named cases (the others report raw engine rows);
    --profile: one UNet step of stock and of the engine, its time split into categories, and
    the engine's whole lightning job."""
    out = tmp_path / "bench.json"
    code = main(
        ["bench", "--size", "tiny", "--device", "cpu", "--repeats", "0", "--case", "quality", "--case", "long64",
         "--case", "lightning", "--anchor", "quality", "--profile", "--workdir", str(tmp_path / "work"), "--json", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads(out.read_text())
    rows = {(r["case"], r["runner"]): r for r in report["results"]}
    assert set(rows) == {
        ("quality", "stock"), ("quality", "engine[default]"), ("long64", "engine[default]"), ("lightning", "engine[default]")
    }  # fmt: skip
    assert rows[("quality", "engine[default]")]["ratio_to_anchor"] > 0
    assert rows[("quality", "engine[default]")]["psnr_vs_anchor_db"] == "inf"
    long = rows[("long64", "engine[default]")]
    assert long["denoise_s"] > 0 and long["ratio_to_anchor"] == 0 and long["psnr_vs_anchor_db"] is None
    profiles = {(p["runner"], p["what"]): p for p in report["profiles"]}
    assert set(profiles) == {
        ("stock", "one UNet step"), ("engine[default]", "one UNet step"), ("engine[default]", "one lightning job")
    }  # fmt: skip
    for p in profiles.values():
        assert "error" not in p, p
        assert p["wall_ms"] > 0 and p["kernel_ms"] > 0 and p["kernel_count"] > 0
        assert sum(p["categories"].values()) == pytest.approx(p["kernel_ms"], rel=1e-6)
        assert {"convolution", "matmul", "attention"} <= set(p["categories"])
        assert p["top"] and all(k["ms"] > 0 for k in p["top"])
    job, step = profiles[("engine[default]", "one lightning job")], profiles[("engine[default]", "one UNet step")]
    # A step's attention by shape: the calls the structure makes (bench-attention's record).
    from animatediff_blender.backend.bench.attention import record_step_attention
    from animatediff_blender.backend.bench.run import cases_for

    recorded = record_step_attention(cases_for("tiny")["quality"], "tiny")
    for p in (profiles[("stock", "one UNet step")], step):
        assert sum(a["calls"] for a in p["attention"]) == sum(c.calls for c in recorded) == 74
        assert {(*a["q"], a["kv_len"]) for a in p["attention"]} == {
            (c.batch, c.heads, c.q_len, c.head_dim, c.kv_len) for c in recorded
        }
        assert all(a["ms"] > 0 and a["op"] == "flash_attention_for_cpu" for a in p["attention"])
    assert "attention" not in job  # recording shapes would distort the job's timeline
    assert "attention by shape" in printed
    assert job["kernel_count"] > step["kernel_count"]  # a job holds its steps, the text encoder and the VAE
    # The job's timeline: its labelled parts as the host ran them, the trace kept beside the JSON.
    timeline = job["timeline"]
    assert timeline["jobs"] == 2 and timeline["device_events"] == 0  # a CPU run: no device to be idle
    assert {"encode_prompt", "prepare_latents", "unet", "vae.decode", "to_uint8_frames"} <= set(timeline["host_ms_by_label"])
    assert sum(timeline["host_ms_by_label"].values()) < timeline["wall_ms"] * 1.01
    trace = tmp_path / "bench.engine-default-lightning-trace.json.gz"
    assert timeline["trace"] == str(trace) and trace.stat().st_size > 0
    assert "timeline: no device events" in printed
    assert "profile stock: one UNet step" in printed and "one lightning job" in printed


@pytest.mark.parametrize(
    ("name", "category"),
    [
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7", "attention"),
        ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc", "convolution"),
        ("nvjet_sm90_hsh_256x128_64x4_1x2_h_bz_coopA_bias_TNT", "matmul"),
        ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half>", "norm"),
        ("triton_poi_fused_convolution_native_group_norm_silu_1", "compiled: norm"),
        ("triton_poi_fused_gelu_mul_split_view_3", "compiled: fused"),
        ("void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda>", "copy/layout"),
        ("aten::addmm", "matmul"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
        ("some_unknown_kernel", "other"),
    ],
)
def test_kernel_categories(name: str, category: str) -> None:
    from animatediff_blender.backend.bench.profile import categorize

    assert categorize(name) == category


def test_profile_case_long64_profiles_the_windowed_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--profile-case long64: the UNet step is profiled inside the run, where FreeNoise's
    window blocks exist (a replay after the run would profile the plain blocks).
    --profile-every-lever: the second lever's step too (by default only the first's)."""
    out = tmp_path / "bench.json"
    code = main(
        ["bench", "--size", "tiny", "--device", "cpu", "--repeats", "0", "--case", "long64", "--lever", "batch-windows",
         "--lever", "eager", "--profile", "--profile-case", "long64", "--profile-every-lever",
         "--workdir", str(tmp_path / "work"), "--json", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    profiles = {p["runner"]: p for p in json.loads(out.read_text())["profiles"]}
    assert set(profiles) == {"stock", "engine[batch-windows]", "engine[eager]"}
    for p in profiles.values():
        assert "error" not in p, p
        assert p["kernel_ms"] > 0 and {"matmul", "attention"} <= set(p["categories"])

    assert main(["bench", "--size", "tiny", "--device", "cpu", "--profile", "--profile-case", "long512"]) == 2
    assert "unknown case(s) ['long512']" in capsys.readouterr().err


def test_the_first_unet_call_is_profiled_in_place() -> None:
    """The state a pipeline sets up for its run (here: a scale) is what the profile sees."""
    import torch

    from animatediff_blender.backend.bench.profile import profile_first_unet_call

    class Scaled(torch.nn.Module):
        scale = 1.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale

    unet = Scaled()
    profiled: list[torch.Tensor] = []

    def run() -> list[torch.Tensor]:
        unet.scale = 2.0  # the run's state
        try:
            return [unet(torch.ones(1)), unet(torch.ones(1))]
        finally:
            unet.scale = 1.0

    with profile_first_unet_call(unet, lambda call: profiled.append(call())) as seen:
        results = run()
    assert [r.item() for r in results] == [2.0, 2.0] and len(seen) == 2
    assert [p.item() for p in profiled] == [2.0]  # the first call only, with the run's state
    assert "forward" not in unet.__dict__  # the class's forward is back
