"""CPU smoke run of `scripts/switch_probe.py` (tiny models, the compiled path with dynamo's
"eager" backend): both engines run every job; the swap engine copies motion weights into
the one UNet it built and its jobs stay compiled, the rebuild engine builds a UNet per switch
and runs the switched jobs eagerly until warm_pending().  Timings mean nothing here."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "switch_probe.py"
ORDER = ["quality-1", "fast-1", "fast-2", "quality-2", "fast-3"]


def test_switch_probe_tiny_cpu_compiled(tmp_path: Path) -> None:
    out = tmp_path / "switch.json"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--size", "tiny", "--fast", "regional",
         "--compile-backend", "eager", "--fast-guidance", "1.5", "--models", str(tmp_path / "models"),
         "--compile-cache", str(tmp_path / "cache"), "--out", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert wall < 60, wall  # the smoke run stays cheap (imports, model build and both engines)
    report = json.loads(out.read_text())
    for key in ("command", "device", "device_kind", "torch", "diffusers", "size", "fast", "warm_shapes",
                "models_build_s", "order", "engines", "switch_cost_s", "total_s"):  # fmt: skip
        assert key in report, key
    assert report["size"] == "tiny" and report["device_kind"] == "cpu" and report["order"] == ORDER
    assert report["compile_backend"] == "eager" and "compile=regional" in report["fast"]
    assert report["warm_shapes"] == [[4, 64, 64, True]]  # --fast-guidance 1.5: one shape for both jobs
    assert set(report["engines"]) == {"swap", "rebuild"}

    lightning, v2 = "motion:bench-motion-adapter-lightning", "motion:bench-motion-adapter-v2"
    for name, engine in report["engines"].items():
        assert engine["error"] is None and engine["compile_error"] is None, (name, engine["error"])
        assert engine["defaults"]["motion_lightning"] == lightning and engine["defaults"]["motion"] == v2
        assert engine["warm_up_s"] > 0 and engine["warm_up_pending"] == 0
        assert [row["job"] for row in engine["jobs"]] == ORDER
        for row in engine["jobs"]:
            assert row["frames_out"] == 4 and row["seconds"] > 0, (name, row)
            fast = row["job"].startswith("fast")
            assert row["preset"] == ("lightning" if fast else "quality")
            assert row["motion_module"] == (lightning if fast else v2)
        assert engine["peak_mem_gib"] is None  # CPU: no device memory to report
        costs = report["switch_cost_s"][name]
        seconds = {row["job"]: row["seconds"] for row in engine["jobs"]}
        assert costs["to_fast_s"] == pytest.approx(seconds["fast-1"] - seconds["fast-2"])
        assert costs["to_fast_again_s"] == pytest.approx(seconds["fast-3"] - seconds["fast-2"])
        assert costs["to_quality_s"] == pytest.approx(seconds["quality-2"] - seconds["quality-1"])

    swap, rebuild = report["engines"]["swap"], report["engines"]["rebuild"]
    # Swap: one UNet, built at warm-up; every switch is a weight copy, every job compiled.
    assert swap["swap_motion_weights"] is True
    assert swap["load_counts"].get("motion_swap", 0) >= 3 and swap["load_counts"]["pipeline"] == 1
    assert swap["load_counts"]["motion"] == 2  # each module read from disk once
    assert [row["ran"] for row in swap["jobs"]] == ["compiled"] * 5
    assert [row["pending_warm_ups"] for row in swap["jobs"]] == [0] * 5
    assert swap["warm_pending_s"] is None
    # Rebuild: a UNet per switch, nothing compiled for it: the switched jobs run eagerly and
    # their shapes wait for warm_pending(), timed once at the end.
    assert rebuild["swap_motion_weights"] is False
    assert rebuild["load_counts"]["pipeline"] >= 4 and rebuild["load_counts"].get("motion_swap", 0) == 0
    assert [row["ran"] for row in rebuild["jobs"]] == ["compiled"] + ["eager (deferred)"] * 4
    assert [row["pending_warm_ups"] for row in rebuild["jobs"]] == [0, 1, 1, 2, 2]
    assert rebuild["warm_pending_s"] > 0 and rebuild["warm_pending_done"] is True and rebuild["pending_after"] == 0
    # The rebuild's switch jobs carry the UNet build in their load time; the swap's do not.
    assert rebuild["jobs"][1]["timings"]["load"] > swap["jobs"][1]["timings"]["load"]

    assert "switch cost rebuild" in proc.stdout and "eager (deferred)" in proc.stdout
