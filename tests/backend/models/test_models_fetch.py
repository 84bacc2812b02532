"""`models fetch` / `verify` / `list` offline: a fake downloader serves zoo files under the
real hub repo and file names, so the planning, layout, manifest and checks are the real ones."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from animatediff_blender.backend.cli import main
from animatediff_blender.backend.models import fetch, loading
from animatediff_blender.backend.models.registry import ModelRegistry


class FakeHub:
    """Serves the tiny zoo's files as if they were the hub's."""

    def __init__(self, zoo: Path, wrong_sha_for: str = "") -> None:
        self.zoo = zoo
        self.wrong_sha_for = wrong_sha_for
        self.calls: list[tuple[str, str]] = []

    def _source(self, repo_id: str, filename: str) -> Path:
        z = self.zoo
        if repo_id == "stable-diffusion-v1-5/stable-diffusion-v1-5":
            return z / "base/tiny-sd15" / filename.replace(".fp16.", ".")
        if repo_id.startswith("guoyww/animatediff-motion-adapter-"):
            return z / "motion/tiny-motion-adapter-v2" / filename
        if repo_id.startswith("guoyww/animatediff-motion-lora-"):
            return z / "lora/motion-lora-zoom-in" / filename
        if (repo_id, filename) == ("guoyww/animatediff", "v3_sd15_adapter.ckpt"):
            return z / "adapter/v3_sd15_adapter.ckpt"
        if repo_id == "ByteDance/AnimateDiff-Lightning":
            return z / "motion/tiny-motion-adapter-v2/diffusion_pytorch_model.safetensors"
        if (repo_id, filename) == ("wangfuyun/AnimateLCM", "AnimateLCM_sd15_t2v_lora.safetensors"):
            return z / "adapter/AnimateLCM_sd15_t2v_lora.safetensors"
        if repo_id == "wangfuyun/AnimateLCM":
            return z / "motion/tiny-motion-adapter-v2" / filename
        raise FileNotFoundError(f"{repo_id}/{filename}")

    def download(self, repo_id: str, filename: str, local_dir: Path) -> Path:
        self.calls.append((repo_id, filename))
        src = self._source(repo_id, filename)
        dst = local_dir / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        if ".fp16." in filename:  # the real repo's fp16 variant files hold half tensors
            save_file({k: v.half() for k, v in load_file(str(src)).items()}, str(dst))
        else:
            shutil.copyfile(src, dst)
        return dst

    def expected_sha256(self, repo_id: str, filenames: Iterable[str]) -> dict[str, str]:
        return {f: "0" * 64 for f in filenames if f == self.wrong_sha_for}


def test_plan_groups() -> None:
    items = fetch.plan()
    repos = {i.repo_id for i in items}
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in repos
    assert {f"guoyww/animatediff-motion-lora-{m}" for m in fetch.LORA_MOVES} <= repos
    sd15 = next(i for i in items if i.group == "sd15")
    assert all(".fp16." in f for f in sd15.files if f.endswith(".safetensors"))
    assert not any("safety_checker" in f for f in sd15.files)
    assert [i.group for i in fetch.plan(["adapter-v3"])] == ["adapter-v3"]
    with pytest.raises(fetch.FetchError, match="unknown group"):
        fetch.plan(["everything"])


def test_fetch_verify_and_load(tiny_zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = tmp_path / "models"
    hub = FakeHub(tiny_zoo)
    report = fetch.fetch(models, downloader=hub)
    assert report.failed == []
    assert len(report.fetched) == len(fetch.plan())

    index = json.loads((models / "base/stable-diffusion-v1-5/model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False

    reg = ModelRegistry(models)
    by_id = {i.id: i for i in reg.scan()}
    assert all(i.ok for i in by_id.values()), [(i.id, i.error) for i in by_id.values() if not i.ok]
    assert by_id["motion:animatediff-motion-adapter-v1-5-2"].version == "v2"
    assert by_id["motion:animatediff_lightning_4step_diffusers.safetensors"].version == "lightning"
    assert by_id["adapter:v3_sd15_adapter.ckpt"].version == "v3"
    moves = {i.camera_motion for i in by_id.values() if i.kind == "lora"}
    assert moves == {
        "ZoomIn",
        "ZoomOut",
        "PanLeft",
        "PanRight",
        "TiltUp",
        "TiltDown",
        "RollingClockwise",
        "RollingAnticlockwise",
    }
    defaults = reg.default_ids()
    assert defaults["base"] == "base:stable-diffusion-v1-5"
    assert defaults["motion_lightning"] == "motion:animatediff_lightning_4step_diffusers.safetensors"
    assert by_id["motion:AnimateLCM"].version == "lcm"
    assert (defaults["motion_lcm"], defaults["adapter_lcm"]) == (
        "motion:AnimateLCM", "adapter:AnimateLCM_sd15_t2v_lora.safetensors"
    )  # fmt: skip
    assert defaults["adapter"] == "adapter:v3_sd15_adapter.ckpt"

    # The fetched fp16-variant SD1.5 folder loads through the same loader.
    comps = loading.load_base(reg.get("base:stable-diffusion-v1-5"))
    assert comps.unet.dtype == torch.float32  # asked for float32, files hold float16
    loading.load_motion_adapter(reg.get("motion:animatediff_lightning_4step_diffusers.safetensors"))

    manifest = json.loads((models / fetch.MANIFEST).read_text())
    paths = {f["path"] for f in manifest["files"]}
    assert "base/stable-diffusion-v1-5/unet/diffusion_pytorch_model.fp16.safetensors" in paths
    assert "adapter/v3_sd15_adapter.ckpt" in paths

    assert fetch.verify(models).problems == []
    assert main(["models", "verify", "--models-dir", str(models)]) == 0
    target = models / "lora/animatediff-motion-lora-pan-left/diffusion_pytorch_model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    (models / "adapter/v3_sd15_adapter.ckpt").unlink()
    capsys.readouterr()
    assert main(["models", "verify", "--models-dir", str(models)]) == 1
    out = capsys.readouterr().out
    assert "pan-left/diffusion_pytorch_model.safetensors: sha256 mismatch" in out
    assert "adapter/v3_sd15_adapter.ckpt: missing" in out

    # Fetching again resumes/overwrites and the manifest keeps one record per file.
    fetch.fetch(models, ["adapter-v3"], downloader=hub)
    manifest = json.loads((models / fetch.MANIFEST).read_text())
    assert [f["path"] for f in manifest["files"]].count("adapter/v3_sd15_adapter.ckpt") == 1


def test_fetch_rejects_checksum_mismatch(tiny_zoo: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    hub = FakeHub(tiny_zoo, wrong_sha_for="v3_sd15_adapter.ckpt")
    report = fetch.fetch(models, ["adapter-v3", "motion-v3"], downloader=hub)
    assert len(report.failed) == 1 and "differs from the hub" in report.failed[0]
    assert not (models / "adapter/v3_sd15_adapter.ckpt").exists()
    assert report.fetched == ["motion/animatediff-motion-adapter-v1-5-3"]


def test_verify_zoo_and_empty_dir(tiny_zoo: Path, tmp_path: Path) -> None:
    assert main(["models", "verify", "--models-dir", str(tiny_zoo)]) == 0
    assert main(["models", "verify", "--models-dir", str(tmp_path)]) == 1


def test_list_cli(tiny_zoo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list", "--models-dir", str(tiny_zoo), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    ids = {m["id"] for m in payload["models"]}
    assert (
        "lora:v2_lora_ZoomIn.ckpt" in ids and payload["defaults"]["motion"] == "motion:tiny-motion-adapter-v2"
    )
    assert main(["models", "list", "--models-dir", str(tiny_zoo)]) == 0
    text = capsys.readouterr().out
    assert "Rolling anticlockwise" in text and "motion:v3_sd15_mm.ckpt" in text


def test_fetch_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "fetch", "--models-dir", str(tmp_path), "--only", "lightning", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "ByteDance/AnimateDiff-Lightning/animatediff_lightning_4step_diffusers.safetensors" in out
    assert not any(tmp_path.iterdir())


def test_default_models_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ANIMATEDIFF_BLENDER_DATA", str(tmp_path / "data"))
    assert fetch.default_models_dir() == tmp_path / "data" / "models"


def test_hub_retry_warnings_are_printed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """huggingface_hub logs through a handler of its own and also propagates to the root
    logger, which the CLI gives a handler (`logging.basicConfig`): each retry warning of a
    failing download was printed twice."""
    import logging

    import huggingface_hub
    import huggingface_hub.utils.logging  # noqa: F401  (adds huggingface_hub's own handler)

    def failing_download(repo_id: str, filename: str, local_dir: str) -> str:
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        raise OSError("no connection")

    class NoApi:
        def model_info(self, *args: object, **kwargs: object) -> object:
            raise OSError("no connection")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", NoApi)
    hub_logger, root = logging.getLogger("huggingface_hub"), logging.getLogger()
    saved_hub, saved_root = hub_logger.handlers[:], root.handlers[:]
    # As huggingface_hub configures its logger at import; and no handler on the root logger
    # (pytest's own), so that the CLI's basicConfig adds its handler as outside the tests.
    hub_logger.handlers[:] = [logging.StreamHandler()]
    root.handlers[:] = []
    try:
        code = main(["models", "fetch", "--models-dir", str(tmp_path / "models"), "--only", "adapter-v3"])
    finally:
        hub_logger.handlers[:], root.handlers[:] = saved_hub, saved_root
    err = capsys.readouterr().err
    assert code == 1 and "failed: guoyww/animatediff: no connection" in err
    assert err.count("Retrying in 1s [Retry 1/5].") == 1, err
    assert "WARNING huggingface_hub.utils._http: Retrying in 1s" in err  # in the CLI's log format


def test_verify_follows_links_as_the_registry_does(tiny_zoo: Path, tmp_path: Path) -> None:
    """Studios keep the large models on shared storage, linked into the models directory:
    the registry uses them, but `verify` called each fetched file under a link "outside the
    models directory" and failed.  A manifest path that climbs out (`..`) still is refused."""
    models = tmp_path / "models"
    fetch.fetch(models, ["motion-v2", "adapter-v3"], downloader=FakeHub(tiny_zoo))
    shutil.move(models / "motion", tmp_path / "shared")
    (models / "motion").symlink_to(tmp_path / "shared", target_is_directory=True)
    result = fetch.verify(models)
    assert result.problems == [] and result.checked == 3
    assert all(i.ok for i in ModelRegistry(models).scan())

    manifest = json.loads((models / fetch.MANIFEST).read_text())
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"x")
    manifest["files"].append({"path": "../secret.bin", "size": 1, "sha256": fetch.sha256_file(outside)})
    manifest["files"].append({"path": str(outside), "size": 1, "sha256": fetch.sha256_file(outside)})
    manifest["files"].append("junk")  # a hand-edited manifest: a problem, not a traceback
    (models / fetch.MANIFEST).write_text(json.dumps(manifest))
    assert fetch.verify(models).problems == [
        "../secret.bin: outside the models directory",
        f"{outside}: outside the models directory",
        "'junk': not a file record of the manifest",
    ]
