"""`bench-attention` (`backend/bench/attention.py`): one step's attention calls recorded on
the meta device and timed shape by shape.  The recorded calls are checked against what the
SD1.5 + v2 structure must produce (counted by hand from its configuration), and against the
calls a real tiny UNet makes on the CPU; the timings on the CPU with the tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from animatediff_blender.backend.bench import attention
from animatediff_blender.backend.bench.attention import AttentionCall, record_step_attention
from animatediff_blender.backend.bench.run import cases_for
from animatediff_blender.backend.cli import main


def _by_kind(calls: list[AttentionCall]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in calls:
        out[c.kind] = out.get(c.kind, 0) + c.calls
    return out


def test_sd15_quality_step_has_the_structures_attention_calls() -> None:
    calls = record_step_attention(cases_for("real")["quality"], "real")
    # 16 spatial transformers (down 3x2, mid 1, up 3x3), each one self- and one cross-attention;
    # 21 motion modules (down 4x2, mid 1, up 4x3), each two temporal self-attentions.
    assert _by_kind(calls) == {"spatial": 16, "cross": 16, "temporal": 42}
    top = [c for c in calls if c.kind == "spatial" and c.q_len == 4096]
    # CFG batch of 16 frames, 8 heads of 40 channels at 64x64 latents: 5 of them.
    assert top == [AttentionCall("spatial", 32, 8, 4096, 4096, 40, 5)]
    temporal_top = [c for c in calls if c.kind == "temporal" and c.head_dim == 40]
    assert temporal_top == [AttentionCall("temporal", 2 * 64 * 64, 8, 16, 16, 40, 10)]
    assert all(c.kv_len == 77 for c in calls if c.kind == "cross")
    # The README's figure: ~3.4 of the step's attention TFLOP in the 4096-token self-attentions.
    assert top[0].flops * top[0].calls / 1e12 == pytest.approx(3.44, abs=0.01)


def test_freenoise_windows_multiply_only_the_temporal_sequences() -> None:
    case = cases_for("real")["long64"]  # 64 frames, windows of 16 at stride 4: 13 windows
    calls = record_step_attention(case, "real")
    kinds = _by_kind(calls)
    assert (kinds["spatial"], kinds["cross"]) == (16, 16)  # the spatial layers see all 64 frames once
    assert all(c.batch == 2 * 64 for c in calls if c.kind in ("spatial", "cross"))
    # Each temporal attention of a motion module at 64x64 latents covers the 13 windows of
    # every position of the CFG batch, in batches of windows bounded by the engine's budget.
    top = [c for c in calls if c.kind == "temporal" and c.head_dim == 40]
    sequences = sum(c.batch * c.calls for c in top)
    assert sequences == 13 * 2 * 64 * 64 * 10  # 10 attentions at that resolution
    assert all(c.q_len == c.kv_len == 16 for c in top)


def test_recorded_calls_match_a_real_tiny_unets(tmp_path: Path) -> None:
    """The meta recording against the real tiny UNet's own SDPA calls on the CPU."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    from animatediff_blender.backend.models import tiny

    case = cases_for("tiny")["quality"]
    recorded = record_step_attention(case, "tiny")
    unet = UNetMotionModel.from_unet2d(
        UNet2DConditionModel(**tiny.UNET_CONFIG), MotionAdapter(**tiny.motion_adapter_config("v2"))
    )
    seen: list[tuple[int, ...]] = []
    original = F.scaled_dot_product_attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *a: object, **kw: object) -> torch.Tensor:
        seen.append((*q.shape, k.shape[-2]))
        return original(q, k, v, *a, **kw)

    sample = torch.randn(2, 4, case.frames, case.height // 8, case.width // 8)
    context = torch.randn(2 * case.frames, 77, tiny.UNET_CONFIG["cross_attention_dim"])
    F.scaled_dot_product_attention = spy  # type: ignore[assignment]
    try:
        with torch.no_grad():
            unet(sample, torch.tensor(10), encoder_hidden_states=context)
    finally:
        F.scaled_dot_product_attention = original
    expected: dict[tuple[int, ...], int] = {}
    for shape in seen:
        expected[shape] = expected.get(shape, 0) + 1
    got: dict[tuple[int, ...], int] = {}
    for c in recorded:  # tiny sizes: a spatial and a temporal shape may coincide
        key = (c.batch, c.heads, c.q_len, c.head_dim, c.kv_len)
        got[key] = got.get(key, 0) + c.calls
    assert got == expected
    assert F.scaled_dot_product_attention is original


def test_each_shape_timed_with_each_backend_on_the_cpu() -> None:
    case = cases_for("tiny")["quality"]
    lines: list[str] = []
    result = attention.bench_case(
        case, "tiny", device="cpu", dtype="fp32", backends=["auto", "math", "cudnn"], iters=1,
        compiled_kinds=(), print_fn=lines.append,
    )  # fmt: skip
    assert len(result.shapes) == len(lines) == len(record_step_attention(case, "tiny"))
    for shape in result.shapes:
        by = {t.backend: t for t in shape.timings}
        assert set(by) == {"auto", "math", "cudnn", attention.REDUCED}
        for name in ("auto", "math"):  # both run on the CPU, and agree with float32 maths
            assert by[name].us is not None and by[name].us > 0 and by[name].error is None
            assert by[name].max_abs_err is not None and by[name].max_abs_err < 1e-5
        assert by["auto"].chosen  # which backend torch picked is named
        assert by["cudnn"].us is None and by["cudnn"].error  # no cuDNN on the CPU: reported, not raised
    auto = result.per_unet_call_ms(None, "auto")
    assert auto == pytest.approx(sum(
        next(t.us for t in s.timings if t.backend == "auto") * s.call.calls / 1000 for s in result.shapes
    ))  # fmt: skip
    assert result.per_unet_call_ms("temporal", "cudnn") is None
    best = result.per_unet_call_ms(None, "best")
    assert best is not None and best <= auto
    data = result.to_json()
    assert data["per_unet_call_ms"]["all"]["auto"] == pytest.approx(auto)


def test_reduced_attention_is_the_same_maths_and_stays_apart_from_sdpa() -> None:
    """The "reduced" variant: equal to SDPA within float32 rounding, and compiled by inductor
    it is kernels of inductor's own (written as matmuls, its pattern matcher would turn it
    back into SDPA and the comparison would be moot)."""
    from torch.profiler import ProfilerActivity, profile

    call = AttentionCall("temporal", 6, 2, 16, 16, 8)
    q, k, v = attention._inputs(call, "cpu", torch.float32, seed=1)
    ref = attention._reference(q, k, v)
    assert torch.allclose(attention.reduced_attention(q, k, v), ref, atol=1e-6)
    assert torch.allclose(F.scaled_dot_product_attention(q, k, v), ref, atol=1e-6)
    assert not q.is_contiguous()  # laid out as diffusers' processors lay them out
    timing = attention.time_call(call, attention.REDUCED, device="cpu", dtype=torch.float32, iters=1,
                                 reference=ref, inputs=(q, k, v))  # fmt: skip
    assert timing.error is None and timing.max_abs_err is not None and timing.max_abs_err < 1e-5
    compiled = attention._compiled(q, k, v)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        compiled()
    assert not [e.key for e in prof.key_averages() if "scaled_dot_product" in e.key or "bmm" in e.key]


def test_the_projects_kernel_is_timed_at_short_shapes_only() -> None:
    """`triton` / `triton:ROWS` time engine/short_attention.py's kernel (here in Triton's CPU
    interpreter), checked against float32 maths; a spatial shape is reported as not run,
    never quietly handed to SDPA."""
    pytest.importorskip("triton")
    short = AttentionCall("temporal", 6, 2, 16, 16, 40)
    q, k, v = attention._inputs(short, "cpu", torch.float32, seed=2)
    ref = attention._reference(q, k, v)
    for name in ("triton", "triton:32"):
        timing = attention.time_call(short, name, device="cpu", dtype=torch.float32, iters=1,
                                     reference=ref, inputs=(q, k, v))  # fmt: skip
        assert timing.error is None and timing.us is not None and timing.max_abs_err is not None
        assert timing.max_abs_err < 1e-5
    long = AttentionCall("spatial", 2, 2, 256, 256, 8)
    timing = attention.time_call(long, "triton", device="cpu", dtype=torch.float32, iters=1)
    assert timing.us is None and timing.error and "not run: over 64 tokens" in timing.error


def test_cli_writes_json_and_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "attention.json"
    assert main(["bench-attention", "--size", "tiny", "--device", "cpu", "--case", "lightning", "--iters", "1",
                 "--backend", "auto", "--json", str(out)]) == 0  # fmt: skip
    data = json.loads(out.read_text())
    (case,) = data["cases"]
    assert case["case"] == "lightning" and case["cfg_batch"] == 1
    assert case["per_unet_call_ms"]["all"]["auto"] > 0
    assert {s["kind"] for s in case["shapes"]} == {"spatial", "cross", "temporal"}
    printed = capsys.readouterr().out
    assert "per UNet call (ms)" in printed and "temporal" in printed
    assert main(["bench-attention", "--size", "tiny", "--device", "cpu", "--backend", "fastest"]) == 2
    assert main(["bench-attention", "--size", "tiny", "--device", "cpu", "--backend", "triton:48"]) == 2
    assert main(["bench-attention", "--size", "tiny", "--device", "cpu", "--iters", "0"]) == 2
    assert "unknown backend" in capsys.readouterr().err


def _result(*cases: tuple[float, dict[str, float | None]]) -> dict[str, object]:
    """bench-attention JSON: per case, all attention with torch's choice and the temporal ms."""
    return {"cases": [{"per_unet_call_ms": {"all": {"auto": everything}, "temporal": temporal}}
                      for everything, temporal in cases]}  # fmt: skip


def test_the_temporal_phase_picks_a_backend_only_when_it_pays() -> None:
    pick = attention.best_temporal_backend
    # 30 ms of attention per step, 12 of them temporal: efficient saves 7 ms (> 5 %).
    assert pick(_result((30.0, {"auto": 12.0, "flash": 12.5, "efficient": 5.0, "math": 6.0, "best": 1.0}))) == "efficient"
    assert pick(_result((30.0, {"auto": 12.0, "efficient": 5.0, "reduced": 2.0}))) == "reduced"
    assert pick(_result((30.0, {"auto": 12.0, "efficient": 5.0, "triton": 1.0, "triton:32": 0.5}))) == "triton"
    # Summed over cases: math wins overall although efficient wins the first.
    both = _result((30.0, {"auto": 12.0, "efficient": 5.0, "math": 6.0}),
                   (90.0, {"auto": 40.0, "efficient": 30.0, "math": 20.0}))  # fmt: skip
    assert pick(both) == "math"
    # A backend that cannot run one case's shapes is out.
    assert pick(_result((30.0, {"auto": 12.0, "cudnn": 2.0}), (90.0, {"auto": 40.0, "cudnn": None}))) is None
    # Saving 1 ms of 30 (3 %) is not worth a whole-job measurement; nor is anything without auto.
    assert pick(_result((30.0, {"auto": 12.0, "efficient": 11.0}))) is None
    assert pick(_result((30.0, {"efficient": 1.0}))) is None
    assert pick({"cases": []}) is None
