"""The registry: ids, kinds, versions, labels, broken files, caching and id safety."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import msgspec
import pytest
import torch
from safetensors.torch import save_file

from animatediff_blender.backend.models import registry as registry_mod
from animatediff_blender.backend.models.convert import ConversionError
from animatediff_blender.backend.models.registry import ModelRegistry, UnknownModel, camera_motion_of
from animatediff_blender.protocol.messages import MODEL_ID_PATTERN, ModelInfo


@pytest.fixture(scope="module")
def zoo_registry(tiny_zoo: Path) -> ModelRegistry:
    reg = ModelRegistry(tiny_zoo)
    reg.scan()
    return reg


def test_scan_lists_the_zoo(zoo_registry: ModelRegistry) -> None:
    by_id = {e.id: e for e in zoo_registry.entries()}
    assert all(e.ok for e in by_id.values()), [(e.id, e.error) for e in by_id.values() if not e.ok]
    expected = {
        "base:tiny-sd15": ("base", "diffusers", "tiny"),
        "base:tiny-sd15-ldm.safetensors": ("base", "single_file", "tiny"),
        "motion:tiny-motion-adapter-v2": ("motion", "diffusers", "v2"),
        "motion:mm_sd_v15_v2.ckpt": ("motion", "original", "v2"),
        "motion:mm_sd_v15_v2.safetensors": ("motion", "original", "v2"),
        "motion:v3_sd15_mm.ckpt": ("motion", "original", "v3"),
        "motion:v3_sd15_mm.safetensors": ("motion", "original", "v3"),
        "motion:mm_sd_v15.ckpt": ("motion", "original", "v1"),
        "lora:v2_lora_ZoomIn.ckpt": ("lora", "original", "v2"),
        "lora:motion-lora-zoom-in": ("lora", "diffusers", "v2"),
        "lora:zoom-in-peft": ("lora", "peft", "v2"),
        "adapter:v3_sd15_adapter.ckpt": ("adapter", "original", "v3"),
        "adapter:watercolor_style_lora.safetensors": ("adapter", "kohya", "v3"),  # with text-encoder layers
    }
    for model_id, (kind, fmt, version) in expected.items():
        e = by_id[model_id]
        assert (e.kind, e.format, e.version) == (kind, fmt, version), model_id
        assert re.fullmatch(MODEL_ID_PATTERN, model_id)
        assert len(e.sha256) == 64 and e.size > 0
    # the sidecar config of the single file is not a model of its own
    assert not any("tiny-sd15-ldm.config" in i for i in by_id)
    assert len([i for i in by_id if i.startswith("lora:")]) == 10
    assert by_id["motion:mm_sd_v15.ckpt"].label == "mm_sd_v15 (v1)"
    assert by_id["motion:mm_sd_v15_v2.ckpt"].label == "mm_sd_v15_v2 (v2, .ckpt)"
    assert by_id["motion:mm_sd_v15_v2.safetensors"].label == "mm_sd_v15_v2 (v2, .safetensors)"


def test_labels_are_distinct_within_a_kind(zoo_registry: ModelRegistry) -> None:
    labels = [(e.kind, e.label) for e in zoo_registry.entries()]
    assert len(set(labels)) == len(labels), sorted(labels)


def test_camera_move_labels(zoo_registry: ModelRegistry) -> None:
    labels = {e.id: (e.label, e.camera_motion) for e in zoo_registry.entries() if e.kind == "lora"}
    assert labels["lora:v2_lora_ZoomIn.ckpt"] == ("Zoom in (v2_lora_ZoomIn.ckpt)", "ZoomIn")
    assert labels["lora:v2_lora_PanLeft.ckpt"] == ("Pan left", "PanLeft")
    assert labels["lora:v2_lora_RollingClockwise.ckpt"] == ("Rolling clockwise", "RollingClockwise")
    assert labels["lora:v2_lora_RollingAnticlockwise.ckpt"] == (
        "Rolling anticlockwise",
        "RollingAnticlockwise",
    )
    assert labels["lora:motion-lora-zoom-in"] == ("Zoom in (motion-lora-zoom-in)", "ZoomIn")
    assert labels["lora:zoom-in-peft"] == ("zoom-in-peft", "")  # a LoRA of its own
    assert camera_motion_of("animatediff-motion-lora-rolling-anticlockwise") == "RollingAnticlockwise"
    assert camera_motion_of("animatediff-motion-lora-rolling-clockwise") == "RollingClockwise"
    assert camera_motion_of("animatediff-motion-lora-tilt-down") == "TiltDown"
    assert camera_motion_of("v2_lora_RollingClockwise.ckpt") == "RollingClockwise"
    assert camera_motion_of("mm_sd15_v2_lora_PanLeft.safetensors") == "PanLeft"
    assert camera_motion_of("my_dance_lora.safetensors") == ""
    # Only the official names: a camera word in a user's own file name is no camera motion.
    for name in (
        "crazy_zoomin_tiltup_mix.ckpt",
        "zoomin_v3_finetune.safetensors",
        "my_v2_lora_ZoomIn.ckpt",
        "v2_lora_ZoomIn_finetuned.ckpt",
        "animatediff-motion-lora-zoom-in-v2",
        "v2_lora_Zoom.ckpt",
    ):
        assert camera_motion_of(name) == "", name


def test_user_loras_never_take_over_a_camera_move(models_copy) -> None:  # type: ignore[no-untyped-def]
    """A user's LoRA named after a camera move keeps its own name and tag-free entry; among
    several official entries of one move, the published name comes first in the list, which is
    the entry the add-on takes for that move (the first with that camera_motion)."""
    models = models_copy(
        "lora/v2_lora_ZoomIn.ckpt", "lora/v2_lora_TiltUp.ckpt", "lora/motion-lora-zoom-in", "motion/mm_sd_v15_v2.ckpt"
    )
    lora = models / "lora"
    shutil.copy(lora / "v2_lora_TiltUp.ckpt", lora / "crazy_zoomin_tiltup_mix.ckpt")
    shutil.copy(lora / "v2_lora_TiltUp.ckpt", lora / "aaa_ZoomIn.ckpt")
    shutil.copytree(lora / "motion-lora-zoom-in", lora / "animatediff-motion-lora-zoom-in")
    save_file(
        {k: v.contiguous() for k, v in torch.load(lora / "v2_lora_ZoomIn.ckpt", weights_only=True).items()},
        str(lora / "mm_sd15_v2_lora_ZoomIn.safetensors"),
    )
    # An official name on a LoRA that is no v2 MotionLoRA (no mid block): not tagged.
    sd = torch.load(lora / "v2_lora_TiltUp.ckpt", weights_only=True)
    torch.save({k: v for k, v in sd.items() if not k.startswith("mid_block.")}, lora / "v2_lora_PanLeft.ckpt")
    # A motion module under an official LoRA name is listed broken, untagged.
    shutil.copy(models / "motion/mm_sd_v15_v2.ckpt", lora / "v2_lora_PanRight.ckpt")

    infos = ModelRegistry(models).scan()
    by_id = {i.id: i for i in infos}
    for user in ("lora:crazy_zoomin_tiltup_mix.ckpt", "lora:aaa_ZoomIn.ckpt"):
        assert by_id[user].ok and by_id[user].camera_motion == "", user
    assert by_id["lora:crazy_zoomin_tiltup_mix.ckpt"].label == "crazy_zoomin_tiltup_mix"
    assert by_id["lora:v2_lora_PanLeft.ckpt"].ok and by_id["lora:v2_lora_PanLeft.ckpt"].camera_motion == ""
    assert not by_id["lora:v2_lora_PanRight.ckpt"].ok and by_id["lora:v2_lora_PanRight.ckpt"].camera_motion == ""

    zoom = [i.id for i in infos if i.camera_motion == "ZoomIn"]
    assert zoom == [
        "lora:animatediff-motion-lora-zoom-in",  # as `models fetch` names it
        "lora:v2_lora_ZoomIn.ckpt",  # as guoyww/animatediff publishes it
        "lora:mm_sd15_v2_lora_ZoomIn.safetensors",
        "lora:motion-lora-zoom-in",
    ]
    # the add-on's rule (blender_addon/worker.py resolve_request): the first ok entry of the move
    first = next(i for i in infos if i.kind == "lora" and i.camera_motion == "ZoomIn" and i.ok)
    assert first.id == "lora:animatediff-motion-lora-zoom-in"
    # kinds stay grouped in the list; camera LoRAs by move, before the other LoRAs
    kinds = [i.kind for i in infos]
    assert kinds == sorted(kinds, key=["base", "motion", "lora", "adapter"].index)
    loras = [i for i in infos if i.kind == "lora"]
    assert [i.camera_motion for i in loras] == ["ZoomIn"] * 4 + ["TiltUp"] + [""] * 4
    labels = [i.label for i in loras]
    assert len(set(labels)) == len(labels), labels
    assert by_id["lora:v2_lora_ZoomIn.ckpt"].label == "Zoom in (v2_lora_ZoomIn.ckpt)"
    assert by_id["lora:v2_lora_TiltUp.ckpt"].label == "Tilt up"
    assert [i.id for i in ModelRegistry(models).scan()] == [i.id for i in infos]  # the cache gives the same


def test_infos_are_valid_protocol_messages(zoo_registry: ModelRegistry) -> None:
    infos = zoo_registry.infos()
    decoded = msgspec.json.decode(msgspec.json.encode(infos), type=list[ModelInfo])
    assert decoded == infos


def test_defaults(zoo_registry: ModelRegistry) -> None:
    defaults = zoo_registry.default_ids()
    assert defaults["base"] == "base:tiny-sd15"
    assert defaults["motion"] == "motion:tiny-motion-adapter-v2"
    # The domain adapter default stays AnimateDiff's own; the LCM LoRA is the lcm preset's.
    assert defaults["adapter"] == "adapter:v3_sd15_adapter.ckpt"
    assert defaults["adapter_lcm"] == "adapter:AnimateLCM_sd15_t2v_lora.safetensors"
    lcm = zoo_registry.get(defaults["adapter_lcm"])
    assert (lcm.format, lcm.version, lcm.label) == ("kohya", "lcm", "AnimateLCM_sd15_t2v_lora (LCM LoRA)")
    for model_id in defaults.values():
        assert zoo_registry.get(model_id).ok


def test_get(zoo_registry: ModelRegistry, tiny_zoo: Path) -> None:
    entry = zoo_registry.get("motion:v3_sd15_mm.ckpt")
    assert entry.path == tiny_zoo / "motion" / "v3_sd15_mm.ckpt"
    assert zoo_registry.get("lora:v2_lora_TiltUp.ckpt", kind="lora").camera_motion == "TiltUp"
    with pytest.raises(UnknownModel, match="not a base model"):
        zoo_registry.get("lora:v2_lora_TiltUp.ckpt", kind="base")
    with pytest.raises(UnknownModel, match="no such model"):
        zoo_registry.get("motion:nope.ckpt")
    with pytest.raises(KeyError):  # UnknownModel is a KeyError for callers that expect one
        zoo_registry.get("base:missing")


@pytest.mark.parametrize(
    "bad_id",
    [
        "../base/tiny-sd15",
        "base:../tiny-sd15",
        "base:..",
        "base:tiny-sd15/../../etc",
        "base:tiny-sd15/unet",
        "/etc/passwd",
        "base:/etc/passwd",
        "base:C:\\Windows",
        "base:tiny..sd15",
        "base:.hidden",
        "tiny-sd15",
        "",
        "base:" + "a" * 200,
        None,
        42,
        ["base:tiny-sd15"],
    ],
)
def test_path_like_ids_rejected(zoo_registry: ModelRegistry, bad_id: object) -> None:
    with pytest.raises(UnknownModel, match="not a model id"):
        zoo_registry.get(bad_id)


def test_broken_files_are_listed_with_reasons(models_copy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    models = models_copy("motion/mm_sd_v15_v2.safetensors", "lora/v2_lora_PanLeft.ckpt")
    data = (models / "motion/mm_sd_v15_v2.safetensors").read_bytes()
    (models / "motion/truncated.safetensors").write_bytes(data[: len(data) // 3])
    (models / "lora/garbage.ckpt").write_bytes(os.urandom(1000))
    save_file({"foo.weight": torch.zeros(2)}, str(models / "motion/not_a_motion_module.safetensors"))
    shutil.copy(models / "lora/v2_lora_PanLeft.ckpt", models / "lora/(copy).ckpt")
    (models / "adapter").mkdir()
    shutil.copy(models / "lora/v2_lora_PanLeft.ckpt", models / "adapter/wrong_kind.ckpt")
    (models / "motion/notes.txt").write_text("ignored: not a weights file")

    reg = ModelRegistry(models)
    infos = {i.id: i for i in reg.scan()}
    assert infos["motion:mm_sd_v15_v2.safetensors"].ok
    assert infos["lora:v2_lora_PanLeft.ckpt"].ok
    broken = {i.id: i.error for i in infos.values() if not i.ok}
    assert "truncated" in broken["motion:truncated.safetensors"]
    assert "garbage.ckpt" in broken["lora:garbage.ckpt"] or "cannot read" in broken["lora:garbage.ckpt"]
    assert "not understood" in broken["motion:not_a_motion_module.safetensors"]
    assert infos["lora:copy.ckpt"].ok  # "(copy).ckpt": a name that is no id gets one
    assert broken["adapter:wrong_kind.ckpt"] == (
        "not a domain adapter: it looks like a MotionLoRA (v2): move it to lora/"
    )
    assert not any("notes" in i for i in infos)
    entry = reg.get("motion:truncated.safetensors")  # listed, so callers can say why
    assert not entry.ok and "truncated" in entry.error
    with pytest.raises(UnknownModel, match="cannot be used: .*truncated"):
        reg.get("motion:truncated.safetensors", require_ok=True)


def test_top_level_files_classified_by_keys(models_copy) -> None:  # type: ignore[no-untyped-def]
    models = models_copy()
    src = models_copy("motion/v3_sd15_mm.safetensors", "lora/motion-lora-zoom-in")
    shutil.copy(src / "motion/v3_sd15_mm.safetensors", models / "dropped_here.safetensors")
    shutil.copy(
        src / "lora/motion-lora-zoom-in/diffusion_pytorch_model.safetensors",
        models / "a_motion_lora.safetensors",
    )
    reg = ModelRegistry(models)
    by_id = {i.id: i for i in reg.scan()}
    assert by_id["motion:dropped_here.safetensors"].version == "v3"
    assert by_id["lora:a_motion_lora.safetensors"].ok
    assert reg.get("motion:dropped_here.safetensors").path == models / "dropped_here.safetensors"


def test_hash_cache(models_copy, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    models = models_copy("motion/mm_sd_v15_v2.safetensors", "base/tiny-sd15")
    first = {i.id: i.sha256 for i in ModelRegistry(models).scan()}
    assert (models / registry_mod.CACHE_FILE).is_file()
    assert first["motion:mm_sd_v15_v2.safetensors"] == registry_mod.content_sha256(
        models / "motion/mm_sd_v15_v2.safetensors"
    )

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"re-hashed {path}")

    monkeypatch.setattr(registry_mod, "content_sha256", no_hashing)
    assert {i.id: i.sha256 for i in ModelRegistry(models).scan()} == first  # served from the cache

    monkeypatch.undo()
    with open(models / "base/tiny-sd15/scheduler/scheduler_config.json", "a") as f:
        f.write("\n")
    again = {i.id: i.sha256 for i in ModelRegistry(models).scan()}
    assert again["base:tiny-sd15"] != first["base:tiny-sd15"]
    assert again["motion:mm_sd_v15_v2.safetensors"] == first["motion:mm_sd_v15_v2.safetensors"]


def test_is_current_notices_files_replaced_since_the_scan(models_copy) -> None:  # type: ignore[no-untyped-def]
    """What the engine asks before reusing a loaded model: a stat of the entry's files
    against the scan's, nothing read.  A rescan then gives the new content's hash."""
    models = models_copy("lora/v2_lora_ZoomIn.ckpt", "lora/v2_lora_PanLeft.ckpt", "base/tiny-sd15")
    reg = ModelRegistry(models)
    reg.scan()
    lora, base = reg.get("lora:v2_lora_ZoomIn.ckpt"), reg.get("base:tiny-sd15")
    assert reg.is_current(lora) and reg.is_current(base)

    path = models / "lora/v2_lora_ZoomIn.ckpt"
    old = path.stat()
    tmp = path.with_name("replacement.partial")
    shutil.copyfile(models / "lora/v2_lora_PanLeft.ckpt", tmp)
    os.replace(tmp, path)  # same size, other weights
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 1_000_000_000))
    assert not reg.is_current(lora) and reg.is_current(base)
    assert reg.get("lora:v2_lora_ZoomIn.ckpt") is lora  # nothing changes before a rescan
    reg.scan()
    replaced = reg.get("lora:v2_lora_ZoomIn.ckpt")
    assert reg.is_current(replaced) and replaced.sha256 == registry_mod.content_sha256(path) != lora.sha256

    # A folder entry: any of its files.
    with open(models / "base/tiny-sd15/unet/config.json", "a") as f:
        f.write("\n")
    assert not reg.is_current(base)
    path.unlink()
    assert not reg.is_current(replaced)  # gone


def test_empty_or_missing_dir(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "does-not-exist")
    assert reg.scan() == []
    assert reg.default_ids() == {}
    with pytest.raises(UnknownModel):
        reg.get("base:anything")


def test_odd_files_never_stop_the_scan(models_copy) -> None:  # type: ignore[no-untyped-def]
    """Foreign configs, a pipe and a headless tensor are listed with a reason; none stops
    (or, the pipe, hangs) the scan."""
    models = models_copy("base/tiny-sd15", "motion/tiny-motion-adapter-v2", "motion/v3_sd15_mm.safetensors")
    shutil.copytree(models / "base/tiny-sd15", models / "base/array-config")
    (models / "base/array-config/unet/config.json").write_text("[1]")
    shutil.copytree(models / "base/tiny-sd15", models / "base/list-width")
    cfg = json.loads((models / "base/tiny-sd15/unet/config.json").read_text())
    (models / "base/list-width/unet/config.json").write_text(json.dumps({**cfg, "cross_attention_dim": [32, 32]}))
    shutil.copytree(models / "motion/tiny-motion-adapter-v2", models / "motion/array-config")
    (models / "motion/array-config/config.json").write_text("[1]")
    header = json.dumps({"w": {"dtype": "F32", "data_offsets": [0, 4]}}).encode()  # no shape
    (models / "motion/no_shape.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    if hasattr(os, "mkfifo"):
        os.mkfifo(models / "motion/pipe.safetensors")
    os.symlink(models / "gone.safetensors", models / "motion/dangling.safetensors")

    infos = {i.id: i for i in ModelRegistry(models).scan()}
    assert infos["base:tiny-sd15"].ok and infos["motion:v3_sd15_mm.safetensors"].ok
    broken = {i.id: i.error for i in infos.values() if not i.ok}
    assert "not a JSON object" in broken["base:array-config"]
    assert "not an SD1.x model" in broken["base:list-width"]
    assert "not a JSON object" in broken["motion:array-config"]
    assert "no valid shape" in broken["motion:no_shape.safetensors"]
    assert "not a regular file" in broken["motion:dangling.safetensors"]
    if hasattr(os, "mkfifo"):
        assert "not a regular file" in broken["motion:pipe.safetensors"]


def test_unreadable_kind_folder_is_listed(models_copy, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    models = models_copy("motion/v3_sd15_mm.safetensors", "lora/v2_lora_PanLeft.ckpt")
    iterdir = Path.iterdir

    def no_permission(self: Path):  # type: ignore[no-untyped-def]
        if self == models / "lora":  # chmod 000 does not stop root, who runs CI containers
            raise PermissionError(13, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", no_permission)
    infos = {i.id: i for i in ModelRegistry(models).scan()}
    assert infos["motion:v3_sd15_mm.safetensors"].ok
    assert not infos["lora:lora"].ok and "Permission denied" in infos["lora:lora"].error


def test_sdxl_motion_module_is_not_listed_as_sd15(models_copy) -> None:  # type: ignore[no-untyped-def]
    """mm_sdxl_v10_beta's keys are the original layout with 3 blocks: not a "v3" module."""
    from diffusers import MotionAdapter

    from animatediff_blender.backend.models.zoo import _save_ckpt, motion_diffusers_to_original

    models = models_copy("motion/v3_sd15_mm.safetensors")
    xl = MotionAdapter(block_out_channels=[32, 64, 64], motion_norm_num_groups=32, use_motion_mid_block=False)
    _save_ckpt(motion_diffusers_to_original(xl.state_dict()), models / "motion/mm_sdxl_v10_beta.ckpt")
    xl.save_pretrained(models / "motion/animatediff-motion-adapter-sdxl-beta")
    infos = {i.id: i for i in ModelRegistry(models).scan()}
    for model_id in ("motion:mm_sdxl_v10_beta.ckpt", "motion:animatediff-motion-adapter-sdxl-beta"):
        assert not infos[model_id].ok and "SDXL" in infos[model_id].error, infos[model_id]
    assert infos["motion:v3_sd15_mm.safetensors"].ok


def test_inpainting_base_models_are_not_listed_as_usable(models_copy) -> None:  # type: ignore[no-untyped-def]
    """An SD1.5 inpainting UNet (9 input channels) was listed as OK and failed only at its
    first step; both layouts now say why at the scan."""
    from safetensors.torch import load_file, save_file

    models = models_copy("base/tiny-sd15", "base/tiny-sd15-ldm.safetensors", "base/tiny-sd15-ldm.config")
    folder = models / "base/tiny-sd15-inpainting"
    shutil.copytree(models / "base/tiny-sd15", folder)
    config = json.loads((folder / "unet/config.json").read_text())
    config["in_channels"] = 9
    (folder / "unet/config.json").write_text(json.dumps(config))
    tensors = load_file(models / "base/tiny-sd15-ldm.safetensors")
    key = "model.diffusion_model.input_blocks.0.0.weight"
    out_ch, _, kh, kw = tensors[key].shape
    tensors[key] = torch.zeros(out_ch, 9, kh, kw)
    save_file(tensors, models / "base/tiny-sd15-inpainting.safetensors")
    infos = {i.id: i for i in ModelRegistry(models).scan()}
    for model_id in ("base:tiny-sd15-inpainting", "base:tiny-sd15-inpainting.safetensors"):
        assert not infos[model_id].ok and "9 input channels" in infos[model_id].error, infos[model_id]
    assert infos["base:tiny-sd15"].ok and infos["base:tiny-sd15-ldm.safetensors"].ok


def test_pickle_only_diffusers_folders_are_checked_at_scan(  # type: ignore[no-untyped-def]
    pickle_folders: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Diffusers folders with `.bin` weights only get the single pickle files' scan checks:
    restricted unpickling (zip structure only above PICKLE_SCAN_LIMIT) and, below torch 2.10,
    a refusal -- not an `ok` entry that fails at its first load."""
    from animatediff_blender.backend.models import convert

    base, motion = "base:tiny-sd15-bin", "motion:tiny-motion-adapter-v2-bin"
    infos = {i.id: i for i in ModelRegistry(pickle_folders).scan()}
    assert infos[base].ok and infos[base].version == "tiny", infos[base].error
    assert infos[motion].ok and infos[motion].version == "v2", infos[motion].error

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    shutil.copytree(pickle_folders / "base/tiny-sd15-bin", pickle_folders / "base/evil")
    torch.save({"x": Evil()}, str(pickle_folders / "base/evil/vae/diffusion_pytorch_model.bin"))
    shutil.copytree(pickle_folders / "motion/tiny-motion-adapter-v2-bin", pickle_folders / "motion/garbage")
    (pickle_folders / "motion/garbage/diffusion_pytorch_model.bin").write_bytes(os.urandom(4096))
    reg = ModelRegistry(pickle_folders)
    infos = {i.id: i for i in reg.scan()}
    assert not infos["base:evil"].ok and "vae" in infos["base:evil"].error
    assert "refused" in infos["base:evil"].error
    assert not (tmp_path / "pwned").exists()
    assert not infos["motion:garbage"].ok and "diffusion_pytorch_model.bin" in infos["motion:garbage"].error
    assert infos[base].ok and infos[motion].ok

    # Above the unpickling limit, the zip structure is still checked.
    monkeypatch.setattr(registry_mod, "PICKLE_SCAN_LIMIT", 0)
    (pickle_folders / registry_mod.CACHE_FILE).unlink()
    infos = {i.id: i for i in reg.scan()}
    assert infos["base:evil"].ok and infos[base].ok  # not unpickled: the loader refuses it
    assert not infos["motion:garbage"].ok and "not a torch checkpoint" in infos["motion:garbage"].error
    monkeypatch.undo()

    # torch < 2.10: listed with the reason (whatever the cache of the scans above says).
    monkeypatch.setattr(convert, "_torch_version", lambda: (2, 5))
    infos = {i.id: i for i in reg.scan()}
    for model_id, name in ((base, "tiny-sd15-bin"), (motion, "tiny-motion-adapter-v2-bin")):
        assert not infos[model_id].ok
        assert name in infos[model_id].error and "2.10" in infos[model_id].error
        assert "safetensors" in infos[model_id].error
    assert infos["base:tiny-sd15-bin"].error.count("unet/diffusion_pytorch_model.bin") == 1
    with pytest.raises(UnknownModel, match="2.10"):
        reg.get(base, require_ok=True)
    monkeypatch.undo()
    assert reg.get(base).ok is False  # until the next scan
    assert {i.id: i.ok for i in reg.scan()}[base]


def _replace_keeping_size_and_mtime(path: Path, content: bytes, how: str) -> None:
    """Put `content` (as long as the file) under `path` with the old mtime, as
    `cp --preserve=timestamps` (in place) or `rsync -t` (renamed over) do."""
    import time

    old = path.stat()
    assert len(content) == old.st_size
    if how == "in_place":
        with open(path, "r+b") as f:
            f.write(content)
    else:
        tmp = path.with_name(path.name + ".partial")
        tmp.write_bytes(content)
        os.utime(tmp, ns=(old.st_atime_ns, old.st_mtime_ns))
        os.replace(tmp, path)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    for _ in range(100):  # a coarse clock: the change time must still move
        new = path.stat()
        if (new.st_ino, new.st_ctime_ns) != (old.st_ino, old.st_ctime_ns):
            break
        time.sleep(0.01)
        os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    new = path.stat()
    assert (new.st_size, new.st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    assert path.read_bytes() == content


@pytest.mark.parametrize("how", ["in_place", "renamed_over"])
def test_replacement_with_same_size_and_mtime_is_noticed(models_copy, how: str) -> None:  # type: ignore[no-untyped-def]
    """A file replaced by another of the same size and mtime: `is_current` says so, the rescan
    (also a new registry, through the cache file) re-reads it, and the load gets the new weights."""
    from animatediff_blender.backend.models import convert, loading
    from animatediff_blender.backend.models.zoo import (
        _make_adapter,
        _save_safetensors,
        motion_diffusers_to_original,
    )

    models = models_copy("motion/mm_sd_v15_v2.safetensors", "motion/v3_sd15_mm.safetensors")
    mm = "motion:mm_sd_v15_v2.safetensors"
    path = models / "motion/mm_sd_v15_v2.safetensors"
    reg = ModelRegistry(models)
    reg.scan()
    entry = reg.get(mm)
    assert reg.is_current(entry) and entry.ok

    retrained = models.parent / "retrained.safetensors"
    _save_safetensors(motion_diffusers_to_original(_make_adapter("v2", 11).state_dict()), retrained)
    _replace_keeping_size_and_mtime(path, retrained.read_bytes(), how)
    new_sha = registry_mod.content_sha256(path)
    assert new_sha != entry.sha256

    assert not reg.is_current(entry)
    assert reg.is_current(reg.get("motion:v3_sd15_mm.safetensors"))
    reg.scan()
    assert reg.get(mm).sha256 == new_sha and reg.is_current(reg.get(mm))
    fresh = ModelRegistry(models)  # the cache file of the last scan
    fresh.scan()
    assert fresh.get(mm).sha256 == new_sha
    loaded = loading.load_motion_adapter(fresh.get(mm)).state_dict()
    expected = convert.motion_to_diffusers(convert.read_state_dict(retrained))
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())

    # Replaced by a file that is no motion module: the entry turns broken, not stale.
    _replace_keeping_size_and_mtime(path, os.urandom(path.stat().st_size), how)
    reg.scan()
    assert not reg.get(mm).ok


def test_cache_of_an_older_signature_format_counts_as_changed(  # type: ignore[no-untyped-def]
    models_copy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache file whose signatures lack fields (written by an older version) is read
    without error; its entries are inspected and hashed again."""
    models = models_copy("motion/mm_sd_v15_v2.safetensors", "base/tiny-sd15")
    first = {i.id: (i.sha256, i.ok) for i in ModelRegistry(models).scan()}
    cache_file = models / registry_mod.CACHE_FILE
    data = json.loads(cache_file.read_text())
    for cached in data["entries"].values():
        cached["signature"] = [row[:3] for row in cached["signature"]]  # (name, size, mtime) only
    cache_file.write_text(json.dumps(data))
    hashed: list[Path] = []
    real = registry_mod.content_sha256
    monkeypatch.setattr(registry_mod, "content_sha256", lambda p: hashed.append(p) or real(p))
    assert {i.id: (i.sha256, i.ok) for i in ModelRegistry(models).scan()} == first
    assert len(hashed) == 2
    hashed.clear()
    assert {i.id: (i.sha256, i.ok) for i in ModelRegistry(models).scan()} == first
    assert hashed == []  # the rewritten cache serves the next scan
    data = json.loads(cache_file.read_text())
    data["entries"]["base/tiny-sd15"]["detected"] = {"from": "another version"}
    cache_file.write_text(json.dumps(data))
    assert {i.id: (i.sha256, i.ok) for i in ModelRegistry(models).scan()} == first
    assert hashed == [models / "base/tiny-sd15"]


def test_readers_get_the_last_scan_and_rescans_run_one_at_a_time(  # type: ignore[no-untyped-def]
    models_copy, held_first_hash: Callable[[], tuple[threading.Event, threading.Event]]
) -> None:
    """While a rescan hashes a new file (held here: a multi-GB checkpoint on a slow disk),
    readers get the previous scan's entries at once.  A second rescan asked meanwhile waits
    for the first: run side by side, the older one, finishing last, would swap in entries
    without the file added since it listed the folder, and both would write the cache."""
    models = models_copy("motion/mm_sd_v15_v2.safetensors", "lora/v2_lora_ZoomIn.ckpt")
    reg = ModelRegistry(models)
    before = reg.scan()
    models_copy("lora/v2_lora_PanLeft.ckpt")
    hashing, release = held_first_hash()

    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(reg.scan)
        assert hashing.wait(30)
        try:
            assert pool.submit(reg.infos).result(timeout=1) == before
            assert pool.submit(reg.get, "lora:v2_lora_ZoomIn.ckpt").result(timeout=1).ok
            with pytest.raises(UnknownModel):
                reg.get("lora:v2_lora_PanLeft.ckpt")  # not listed before the scan completes
            models_copy("lora/v2_lora_TiltUp.ckpt")  # dropped in after the first listed the folder
            second = pool.submit(reg.scan)
            wait([second], timeout=0.5)  # side by side, it would finish now
        finally:
            release.set()
        assert "lora:v2_lora_TiltUp.ckpt" not in {i.id for i in first.result(timeout=30)}
        latest = second.result(timeout=30)
    ids = {i.id for i in reg.infos()}
    assert ids == {i.id for i in latest}
    assert {"lora:v2_lora_PanLeft.ckpt", "lora:v2_lora_TiltUp.ckpt"} <= ids
    cached = json.loads((models / registry_mod.CACHE_FILE).read_text())["entries"]
    assert {"lora/v2_lora_PanLeft.ckpt", "lora/v2_lora_TiltUp.ckpt"} <= set(cached)


def test_a_style_lora_with_text_encoder_layers_is_a_spatial_lora(models_copy) -> None:  # type: ignore[no-untyped-def]
    """A kohya style LoRA that also trains the text encoder is usable from adapter/ (and
    dropped at the top level); in lora/ it is a spatial LoRA in the wrong folder."""
    models = models_copy("adapter/watercolor_style_lora.safetensors")
    style = models / "adapter/watercolor_style_lora.safetensors"
    (models / "lora").mkdir()
    shutil.copy(style, models / "lora/watercolor_style_lora.safetensors")
    shutil.copy(style, models / "style_top.safetensors")
    infos = {i.id: i for i in ModelRegistry(models).scan()}
    adapter = infos["adapter:watercolor_style_lora.safetensors"]
    assert adapter.ok and (adapter.format, adapter.version) == ("kohya", "v3"), adapter.error
    assert adapter.label == "watercolor_style_lora (domain adapter)"
    assert infos["lora:watercolor_style_lora.safetensors"].error == (
        "not a MotionLoRA: it looks like a domain adapter (v3): move it to adapter/"
    )
    top = infos["adapter:style_top.safetensors"]
    assert top.ok and top.format == "kohya", top.error


def test_models_in_the_wrong_kind_folder_say_where_they_go(models_copy) -> None:  # type: ignore[no-untyped-def]
    """Not a dump of keys that were not understood: the kind the file is and its folder."""
    models = models_copy(
        "motion/v3_sd15_mm.safetensors",
        "motion/mm_sd_v15_v2.safetensors",
        "motion/tiny-motion-adapter-v2",
        "lora/v2_lora_ZoomIn.ckpt",
        "lora/motion-lora-zoom-in",
        "adapter/v3_sd15_adapter.ckpt",
        "adapter/AnimateLCM_sd15_t2v_lora.safetensors",
        "base/tiny-sd15-ldm.safetensors",
        "base/tiny-sd15",
    )
    wrong = {
        "lora/AnimateLCM_sd15_t2v_lora.safetensors": "adapter/AnimateLCM_sd15_t2v_lora.safetensors",
        "adapter/v3_sd15_mm.safetensors": "motion/v3_sd15_mm.safetensors",
        "lora/mm_sd_v15_v2.safetensors": "motion/mm_sd_v15_v2.safetensors",
        "lora/tiny-motion-adapter-v2": "motion/tiny-motion-adapter-v2",
        "motion/v2_lora_ZoomIn.ckpt": "lora/v2_lora_ZoomIn.ckpt",
        "motion/motion-lora-zoom-in": "lora/motion-lora-zoom-in",
        "motion/v3_sd15_adapter.ckpt": "adapter/v3_sd15_adapter.ckpt",
        "lora/v3_sd15_adapter.ckpt": "adapter/v3_sd15_adapter.ckpt",
        "base/mm_sd_v15_v2.safetensors": "motion/mm_sd_v15_v2.safetensors",
        "motion/tiny-sd15-ldm.safetensors": "base/tiny-sd15-ldm.safetensors",
        "lora/tiny-sd15": "base/tiny-sd15",
    }
    for dest, src in wrong.items():
        if (models / src).is_dir():
            shutil.copytree(models / src, models / dest)
        else:
            (models / dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(models / src, models / dest)
    infos = {i.id: i for i in ModelRegistry(models).scan()}
    expected = {
        "adapter:v3_sd15_mm.safetensors": "not a domain adapter: it looks like a motion module (v3): move it to motion/",
        "lora:mm_sd_v15_v2.safetensors": "not a MotionLoRA: it looks like a motion module (v2): move it to motion/",
        "lora:tiny-motion-adapter-v2": "not a MotionLoRA: it looks like a motion module (v2): move it to motion/",
        "motion:v2_lora_ZoomIn.ckpt": "not a motion module: it looks like a MotionLoRA (v2): move it to lora/",
        "motion:motion-lora-zoom-in": "not a motion module: it looks like a MotionLoRA (v2): move it to lora/",
        "motion:v3_sd15_adapter.ckpt": "not a motion module: it looks like a domain adapter (v3): move it to adapter/",
        "lora:v3_sd15_adapter.ckpt": "not a MotionLoRA: it looks like a domain adapter (v3): move it to adapter/",
        "lora:AnimateLCM_sd15_t2v_lora.safetensors": (
            "not a MotionLoRA: it looks like a domain adapter (lcm): move it to adapter/"
        ),
        "base:mm_sd_v15_v2.safetensors": "not a base model: it looks like a motion module (v2): move it to motion/",
        "motion:tiny-sd15-ldm.safetensors": "not a motion module: it looks like a base model (tiny): move it to base/",
        "lora:tiny-sd15": "not a MotionLoRA: it looks like a base model (tiny): move it to base/",
    }
    for model_id, error in expected.items():
        assert not infos[model_id].ok and infos[model_id].error == error, (model_id, infos[model_id].error)
        assert infos[model_id].camera_motion == ""
    # the same files in their own folders are fine
    assert all(i.ok for model_id, i in infos.items() if model_id not in expected), [
        (i.id, i.error) for i in infos.values() if not i.ok and i.id not in expected
    ]


def test_large_wrong_folder_pickle_is_classified_without_loading(  # type: ignore[no-untyped-def]
    models_copy, monkeypatch: pytest.MonkeyPatch
) -> None:
    from animatediff_blender.backend.models import convert

    models = models_copy("motion/mm_sd_v15_v2.ckpt")
    (models / "base").mkdir()
    shutil.move(models / "motion/mm_sd_v15_v2.ckpt", models / "base/mm_sd_v15_v2.ckpt")
    monkeypatch.setattr(registry_mod, "PICKLE_SCAN_LIMIT", 1000)

    def no_loading(path: Path) -> dict[str, torch.Tensor]:
        raise AssertionError(f"loaded {path}")

    monkeypatch.setattr(registry_mod, "read_state_dict", no_loading)
    monkeypatch.setattr(convert, "read_state_dict", no_loading)
    info = {i.id: i for i in ModelRegistry(models).scan()}["base:mm_sd_v15_v2.ckpt"]
    assert info.error == "not a base model: it looks like a motion module (v2): move it to motion/"


def _big_base_pickles(models: Path) -> None:
    """`base/sd-v1-5-inpainting.ckpt` (9 input channels) and `base/v1-5-pruned-emaonly.ckpt`,
    as .ckpt pickles of the zoo's single-file base, each with its sidecar config."""
    from safetensors.torch import load_file

    sd = load_file(models / "base/tiny-sd15-ldm.safetensors")
    torch.save(sd, models / "base/v1-5-pruned-emaonly.ckpt")
    key = "model.diffusion_model.input_blocks.0.0.weight"
    w = sd[key]
    torch.save({**sd, key: torch.cat([w, torch.zeros(w.shape[0], 5, *w.shape[2:])], 1)},
               models / "base/sd-v1-5-inpainting.ckpt")
    for stem in ("v1-5-pruned-emaonly", "sd-v1-5-inpainting"):
        shutil.copytree(models / "base/tiny-sd15-ldm.config", models / f"base/{stem}.config")
    (models / "base/tiny-sd15-ldm.safetensors").unlink()
    shutil.rmtree(models / "base/tiny-sd15-ldm.config")


def test_large_base_pickles_get_the_key_and_shape_checks(  # type: ignore[no-untyped-def]
    models_copy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real SD1.5 .ckpt (2-7 GB) is over PICKLE_SCAN_LIMIT (lowered here to stand for one):
    its keys and shapes are read without its tensors, so an inpainting checkpoint is refused
    at the scan instead of becoming the default base whose jobs all fail."""
    from animatediff_blender.backend.models import convert

    models = models_copy("base/tiny-sd15-ldm.safetensors", "base/tiny-sd15-ldm.config")
    _big_base_pickles(models)
    monkeypatch.setattr(registry_mod, "PICKLE_SCAN_LIMIT", 1000)

    def no_loading(path: Path) -> dict[str, torch.Tensor]:
        raise AssertionError(f"loaded {path}")

    monkeypatch.setattr(registry_mod, "read_state_dict", no_loading)
    monkeypatch.setattr(convert, "read_state_dict", no_loading)
    reg = ModelRegistry(models)
    infos = {i.id: i for i in reg.scan()}
    inpainting = infos["base:sd-v1-5-inpainting.ckpt"]
    assert not inpainting.ok and "9 input channels" in inpainting.error
    assert infos["base:v1-5-pruned-emaonly.ckpt"].ok and infos["base:v1-5-pruned-emaonly.ckpt"].version == "tiny"
    assert reg.default_ids()["base"] == "base:v1-5-pruned-emaonly.ckpt"


def test_large_base_pickle_that_cannot_be_read_lazily_is_unchecked(  # type: ignore[no-untyped-def]
    models_copy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where torch cannot read a big pickle's shapes without loading it, the entry is listed
    with version "" (unchecked), and default_ids prefers a checked base."""
    models = models_copy("base/tiny-sd15-ldm.safetensors", "base/tiny-sd15-ldm.config")
    _big_base_pickles(models)
    (models / "base/sd-v1-5-inpainting.ckpt").rename(models / "base/a-big-one.ckpt")
    (models / "base/sd-v1-5-inpainting.config").rename(models / "base/a-big-one.config")
    monkeypatch.setattr(registry_mod, "PICKLE_SCAN_LIMIT", 1000)
    real = registry_mod.read_pickle_shapes

    def unmappable(path: Path) -> dict[str, tuple[int, ...]]:
        if path.name == "a-big-one.ckpt":
            raise RuntimeError("mmap can only be used with files saved with the zipfile serialization")
        return real(path)

    monkeypatch.setattr(registry_mod, "read_pickle_shapes", unmappable)
    reg = ModelRegistry(models)
    infos = {i.id: i for i in reg.scan()}
    assert infos["base:a-big-one.ckpt"].ok and infos["base:a-big-one.ckpt"].version == ""
    assert reg.default_ids()["base"] == "base:v1-5-pruned-emaonly.ckpt"


def test_lora_folder_with_a_pickle_copy_is_usable(models_copy) -> None:  # type: ignore[no-untyped-def]
    """A hub LoRA folder that also holds a .bin copy (or an fp16 variant) is listed as the
    loader loads it: the registry and the loaders pick the weights file by one rule."""
    from safetensors.torch import load_file

    from animatediff_blender.backend.models import loading

    models = models_copy("lora/motion-lora-zoom-in")
    folder = models / "lora/motion-lora-zoom-in"
    sd = load_file(folder / "diffusion_pytorch_model.safetensors")
    torch.save(sd, folder / "diffusion_pytorch_model.bin")
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", folder / "diffusion_pytorch_model.fp16.safetensors")
    shutil.copytree(folder, models / "lora/two-safetensors")
    (models / "lora/two-safetensors/diffusion_pytorch_model.safetensors").rename(
        models / "lora/two-safetensors/zoom.safetensors"
    )
    reg = ModelRegistry(models)
    infos = {i.id: i for i in reg.scan()}
    hub = infos["lora:motion-lora-zoom-in"]
    assert hub.ok and (hub.format, hub.version, hub.camera_motion) == ("diffusers", "v2", "ZoomIn"), hub.error
    assert loading.load_motion_lora(reg.get(hub.id)).source_format == "diffusers"
    # no diffusers name and two safetensors: neither knows which to take, and both say so
    two = infos["lora:two-safetensors"]
    assert not two.ok and two.error == "expected one weights file in the folder, found 2"
    with pytest.raises(ConversionError, match="found 2"):
        loading.load_motion_lora(models / "lora/two-safetensors")


def test_lora_header_alpha_is_checked_at_scan(tiny_zoo: Path, models_copy) -> None:  # type: ignore[no-untyped-def]
    """A peft header that the loader refuses (per-module alphas) lists the entry as broken."""
    from safetensors import safe_open

    models = models_copy("lora/zoom-in-peft")
    src = models / "lora/zoom-in-peft/pytorch_lora_weights.safetensors"
    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata() or {})
    config = json.loads(metadata["lora_adapter_metadata"])
    config["unet.alpha_pattern"] = {"mid_block.motion_modules.0.transformer_blocks.0.attn1.to_q": 8}
    metadata["lora_adapter_metadata"] = json.dumps(config)
    save_file(tensors, str(models / "lora/per-module.safetensors"), metadata=metadata)
    infos = {i.id: i for i in ModelRegistry(models).scan()}
    assert infos["lora:zoom-in-peft"].ok and infos["lora:zoom-in-peft"].format == "peft"
    assert not infos["lora:per-module.safetensors"].ok
    assert "per-module" in infos["lora:per-module.safetensors"].error


def test_a_download_that_never_got_a_file_is_no_broken_model(tmp_path: Path) -> None:
    """`models fetch` without network leaves `motion/AnimateLCM/.cache/...lock`: it was listed
    as a broken model ("motion adapter folder lacks config.json").  An empty folder too."""
    lock = tmp_path / "motion" / "AnimateLCM" / ".cache" / "huggingface" / "download" / "x.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    (tmp_path / "lora" / "empty").mkdir(parents=True)
    (tmp_path / "lora" / "half" / ".cache").mkdir(parents=True)
    (tmp_path / "lora" / "half" / "notes.txt").write_text("x")  # something there: inspected, broken
    ids = {i.id: i for i in ModelRegistry(tmp_path).scan()}
    assert set(ids) == {"lora:half"} and not ids["lora:half"].ok


def test_large_pickles_of_every_kind_are_identified_without_loading(  # type: ignore[no-untyped-def]
    models_copy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mm_sd_v15_v2.ckpt and AnimateLCM_sd15_t2v.ckpt are 1.8 GB pickles: the scan unpickled
    them whole (1.9 GB of memory for one new file), as it did a 2-7 GB SD1.5 .ckpt dropped
    into lora/ or adapter/ before finding it is no LoRA.  Over PICKLE_SCAN_LIMIT (lowered here
    to stand for them) their keys and shapes are read without their tensors, as a base's."""
    from safetensors.torch import load_file

    from animatediff_blender.backend.models import convert

    models = models_copy(
        "motion/mm_sd_v15_v2.ckpt",
        "motion/mm_sd_v15.ckpt",
        "motion/v3_sd15_mm.ckpt",
        "lora/v2_lora_ZoomIn.ckpt",
        "adapter/v3_sd15_adapter.ckpt",
        "base/tiny-sd15-ldm.safetensors",
    )
    shutil.copy(models / "motion/mm_sd_v15_v2.ckpt", models / "motion/AnimateLCM_sd15_t2v.ckpt")
    shutil.copy(models / "motion/mm_sd_v15_v2.ckpt", models / "adapter/mm_sd_v15_v2.ckpt")
    ldm = models / "base/tiny-sd15-ldm.safetensors"
    torch.save(load_file(ldm), models / "lora/v1-5-pruned-emaonly.ckpt")
    ldm.unlink()
    data = (models / "motion/mm_sd_v15_v2.ckpt").read_bytes()
    (models / "motion/half-downloaded.ckpt").write_bytes(data[: len(data) // 2])
    limit = 1_000_000  # the zoo's motion modules and base are over it, its LoRAs under it
    monkeypatch.setattr(registry_mod, "PICKLE_SCAN_LIMIT", limit)
    real = convert.read_state_dict

    def small_ones_only(path: Path) -> dict[str, torch.Tensor]:
        assert Path(path).stat().st_size <= limit, f"loaded {path}"
        return real(path)

    monkeypatch.setattr(registry_mod, "read_state_dict", small_ones_only)
    monkeypatch.setattr(convert, "read_state_dict", small_ones_only)
    infos = {i.id: i for i in ModelRegistry(models).scan()}
    versions = {i.id: (i.ok, i.version) for i in infos.values() if i.kind == "motion" and i.ok}
    assert versions == {
        "motion:mm_sd_v15_v2.ckpt": (True, "v2"),
        "motion:mm_sd_v15.ckpt": (True, "v1"),
        "motion:v3_sd15_mm.ckpt": (True, "v3"),
        "motion:AnimateLCM_sd15_t2v.ckpt": (True, "lcm"),
    }, {i.id: i.error for i in infos.values()}
    assert "truncated checkpoint" in infos["motion:half-downloaded.ckpt"].error
    assert infos["lora:v1-5-pruned-emaonly.ckpt"].error == (
        "not a MotionLoRA: it looks like a base model (tiny): move it to base/"
    )
    assert infos["adapter:mm_sd_v15_v2.ckpt"].error == (
        "not a domain adapter: it looks like a motion module (v2): move it to motion/"
    )
    assert infos["lora:v2_lora_ZoomIn.ckpt"].ok and infos["adapter:v3_sd15_adapter.ckpt"].ok


def test_single_files_that_are_no_usable_sd15_checkpoint_say_what_they_are(  # type: ignore[no-untyped-def]
    models_copy,
) -> None:
    """What artists drop into base/ (or the top level) by mistake, in the real key layouts:
    SD2.x and SDXL checkpoints, one without a VAE or text encoder (a UNet-only or "no-VAE"
    file), a VAE on its own, textual-inversion embeddings.  Each was either listed as a usable
    SD1.5 base (which then failed every job) or as a broken one ("no model.diffusion_model.*
    keys", "LoRA layout not understood: emb_params"); each now says what it is."""
    from safetensors.torch import load_file

    models = models_copy("base/tiny-sd15-ldm.safetensors", "base/tiny-sd15-ldm.config", "base/tiny-sd15")
    base = models / "base"
    sd = load_file(base / "tiny-sd15-ldm.safetensors")

    def drop(*prefixes: str) -> dict[str, torch.Tensor]:
        return {k: v for k, v in sd.items() if not k.startswith(prefixes)}

    to_k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    save_file({**drop("cond_stage_model."), to_k: torch.zeros(32, 1024),
               "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(96, 32)},
              str(base / "v2-1_768-ema-pruned.safetensors"))  # fmt: skip
    # SDXL: no attention in its first level, its class embedding (label_emb), its two text
    # encoders under conditioner.*; some UNet-only exports keep only model.diffusion_model.*.
    xl = {k: v for k, v in drop("cond_stage_model.").items() if ".input_blocks.1.1." not in k}
    xl["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(32, 2816)
    save_file({**xl, "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(32)},
              str(base / "sd_xl_base_1.0.safetensors"))  # fmt: skip
    save_file(drop("first_stage_model.", "cond_stage_model."), str(base / "unet-only.safetensors"))
    save_file({k: v for k, v in xl.items() if k.startswith("model.")}, str(base / "sdxl-unet.safetensors"))
    save_file(drop("first_stage_model."), str(base / "model-novae.safetensors"))
    save_file(drop("cond_stage_model."), str(base / "model-no-text-encoder.safetensors"))
    vae = {k.removeprefix("first_stage_model."): v for k, v in sd.items() if k.startswith("first_stage_model.")}
    save_file(vae, str(base / "vae-ft-mse-840000-ema-pruned.safetensors"))
    torch.save({"state_dict": vae}, str(base / "vae-ft-mse-840000-ema-pruned.ckpt"))
    shutil.copy(base / "tiny-sd15/vae/diffusion_pytorch_model.safetensors", base / "diffusers-vae.safetensors")
    shutil.copy(base / "tiny-sd15/unet/diffusion_pytorch_model.safetensors", base / "diffusers-unet.safetensors")
    shutil.copy(base / "vae-ft-mse-840000-ema-pruned.safetensors", models / "dropped-vae.safetensors")
    save_file({"emb_params": torch.zeros(8, 32)}, str(base / "easynegative.safetensors"))
    (models / "lora").mkdir()
    save_file({"emb_params": torch.zeros(8, 32)}, str(models / "lora/badhandv4.safetensors"))
    save_file({"emb_params": torch.zeros(8, 32)}, str(models / "dropped-embedding.safetensors"))
    torch.save(
        {"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": torch.zeros(4, 32)},
         "name": "ng_deepnegative", "step": 1000},
        str(base / "ng_deepnegative_v1_75t.pt"),
    )  # fmt: skip
    shutil.copy(base / "ng_deepnegative_v1_75t.pt", models / "lora/ng_deepnegative_v1_75t.pt")

    infos = {i.id: i for i in ModelRegistry(models).scan()}
    expected = {
        "base:v2-1_768-ema-pruned.safetensors": "cross-attention width 1024",
        "base:sd_xl_base_1.0.safetensors": "SDXL",
        "base:sdxl-unet.safetensors": "SDXL",
        "base:unet-only.safetensors": "no VAE",
        "base:model-novae.safetensors": "no VAE",
        "base:model-no-text-encoder.safetensors": "no text encoder",
        "base:vae-ft-mse-840000-ema-pruned.safetensors": "not a base model: it is a VAE on its own",
        "base:vae-ft-mse-840000-ema-pruned.ckpt": "not a base model: it is a VAE on its own",
        "base:diffusers-vae.safetensors": "not a base model: it is a VAE on its own",
        "base:diffusers-unet.safetensors": "the UNet of a diffusers folder on its own",
        "base:dropped-vae.safetensors": "it is a VAE on its own",
        "base:easynegative.safetensors": "not a base model: it is a textual-inversion embedding",
        "lora:badhandv4.safetensors": "not a MotionLoRA: it is a textual-inversion embedding",
        "base:dropped-embedding.safetensors": "it is a textual-inversion embedding",
        "base:ng_deepnegative_v1_75t.pt": "textual-inversion embedding",
        "lora:ng_deepnegative_v1_75t.pt": "textual-inversion embedding",
    }
    for model_id, reason in expected.items():
        assert not infos[model_id].ok and reason in infos[model_id].error, (model_id, infos[model_id].error)
    assert infos["base:tiny-sd15-ldm.safetensors"].ok and infos["base:tiny-sd15"].ok
    assert {i.id for i in infos.values() if i.ok} == {"base:tiny-sd15-ldm.safetensors", "base:tiny-sd15"}


def test_hidden_files_in_a_model_folder_are_not_part_of_it(tiny_zoo: Path, models_copy) -> None:  # type: ignore[no-untyped-def]
    """huggingface_hub keeps `.cache/huggingface/download/<file>.metadata` in every folder that
    `models fetch` fills, and rewrites it (with the time) at every rerun of `models fetch`,
    which the README advises after a failed one; Finder adds `.DS_Store`.  They counted as
    the model's files: each rerun changed every fetched model's hash, so its entry was no
    longer current, the folder was hashed again and a loaded model was loaded again."""
    from huggingface_hub._local_folder import write_download_metadata

    models = models_copy("lora/motion-lora-zoom-in", "motion/tiny-motion-adapter-v2")
    folder = models / "lora/motion-lora-zoom-in"
    write_download_metadata(folder, "diffusion_pytorch_model.safetensors", "c0ffee", "etag")
    reg = ModelRegistry(models)
    before = {i.id: i for i in reg.scan()}
    entry = reg.get("lora:motion-lora-zoom-in")
    assert entry.ok and entry.size == (folder / "diffusion_pytorch_model.safetensors").stat().st_size
    assert entry.sha256 == registry_mod.content_sha256(folder)
    assert entry.sha256 == registry_mod.content_sha256(tiny_zoo / "lora/motion-lora-zoom-in")

    write_download_metadata(folder, "diffusion_pytorch_model.safetensors", "c0ffee", "etag")  # a rerun
    (models / "motion/tiny-motion-adapter-v2/.DS_Store").write_bytes(b"\0\0\0\1Bud1")
    assert reg.is_current(entry)
    assert reg.is_current(reg.get("motion:tiny-motion-adapter-v2"))
    assert {i.id: i.sha256 for i in reg.scan()} == {i.id: i.sha256 for i in before.values()}


def test_files_that_cannot_be_used_are_not_hashed(models_copy, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Hashing reads the whole file: a 6.9 GB SDXL checkpoint dropped into base/ by mistake
    held up the scan (and the panel's rescan) for seconds to minutes for a hash nobody uses.
    Files listed as broken, or under a name that is no model id, are not hashed."""
    from safetensors.torch import load_file

    models = models_copy("base/tiny-sd15-ldm.safetensors", "base/tiny-sd15-ldm.config")
    sd = load_file(models / "base/tiny-sd15-ldm.safetensors")
    save_file({**sd, "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(32)},
              str(models / "base/sd_xl_base_1.0.safetensors"))  # fmt: skip
    shutil.copy(models / "base/tiny-sd15-ldm.safetensors", models / "base/(~).safetensors")
    hashed: list[str] = []
    real = registry_mod.content_sha256

    def recording(path: Path) -> str:
        hashed.append(path.name)
        return real(path)

    monkeypatch.setattr(registry_mod, "content_sha256", recording)
    infos = {i.id: i for i in ModelRegistry(models).scan()}
    assert hashed == ["tiny-sd15-ldm.safetensors"]
    assert infos["base:tiny-sd15-ldm.safetensors"].ok and len(infos["base:tiny-sd15-ldm.safetensors"].sha256) == 64
    for model_id in ("base:sd_xl_base_1.0.safetensors", "base:(~).safetensors"):
        assert not infos[model_id].ok and infos[model_id].sha256 == "" and infos[model_id].size_bytes > 0


def test_half_downloaded_pickles_say_so(models_copy, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A .ckpt cut short (a browser download stopped, a full disk) was reported with torch's
    internal zip-reader error ("PytorchStreamReader failed reading zip archive: failed finding
    central directory. This is an internal miniz error..."), or above PICKLE_SCAN_LIMIT as
    "not a torch checkpoint"; both now say that it is truncated."""
    models = models_copy("lora/v2_lora_ZoomIn.ckpt", "motion/mm_sd_v15_v2.ckpt")
    for rel in ("lora/v2_lora_ZoomIn.ckpt", "motion/mm_sd_v15_v2.ckpt"):
        data = (models / rel).read_bytes()
        (models / rel).write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(registry_mod, "PICKLE_SCAN_LIMIT", 1_000_000)  # the motion module is over it
    infos = {i.id: i for i in ModelRegistry(models).scan()}
    for model_id, name in (("lora:v2_lora_ZoomIn.ckpt", "v2_lora_ZoomIn.ckpt"), ("motion:mm_sd_v15_v2.ckpt", "mm_sd_v15_v2.ckpt")):
        assert not infos[model_id].ok
        assert infos[model_id].error.startswith(f"{name}: truncated checkpoint"), infos[model_id].error
        assert "download it again" in infos[model_id].error and "miniz" not in infos[model_id].error


def test_folders_of_other_layouts_are_listed_with_where_their_files_go(tmp_path: Path) -> None:
    """A models directory laid out for another tool (AUTOMATIC1111's Stable-diffusion/ and
    Lora/, AnimateDiff's motion_module/) or with a capitalised Base/ was scanned as empty,
    without a word: each such folder is a broken entry saying where its files go.  Folders
    holding no models (notes, a tokenizer) stay unlisted."""
    for rel in ("Stable-diffusion/dreamshaper_8.safetensors", "Lora/styles/ink.safetensors",
                "motion_module/mm_sd_v15_v2.ckpt", "Base/mine/model_index.json", "Elsewhere/x.ckpt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("x")
    (tmp_path / "Deep" / "a" / "b").mkdir(parents=True)
    (tmp_path / "Deep" / "a" / "b" / "x.safetensors").write_bytes(b"")  # three levels down: not looked for
    infos = {i.id: i for i in ModelRegistry(tmp_path).scan()}
    assert set(infos) == {"base:Stable-diffusion", "base:Lora", "base:motion_module", "base:Base", "base:Elsewhere"}
    assert not any(i.ok for i in infos.values())
    assert "move its files into base/" in infos["base:Stable-diffusion"].error
    assert "move its files into motion/" in infos["base:motion_module"].error
    assert "rename it to base/" in infos["base:Base"].error
    assert "a spatial LoRA (AnimateLCM's, a domain adapter) into adapter/" in infos["base:Lora"].error
    assert "scans only base/" in infos["base:Elsewhere"].error and infos["base:Elsewhere"].sha256 == ""


def test_files_named_as_artists_name_them_get_ids(models_copy) -> None:  # type: ignore[no-untyped-def]
    """Spaces, brackets and accents are common in the names artists give their files
    ("Realistic Vision V5.1.safetensors", "Modèle (final).ckpt"); such files were listed as
    broken ("rename it").  They get an id with "_" for what an id cannot hold, their own
    name as the label, and load from their own path."""
    from animatediff_blender.backend.models import loading

    models = models_copy("lora/v2_lora_ZoomIn.ckpt", "base/tiny-sd15")
    (models / "lora/v2_lora_ZoomIn.ckpt").rename(models / "lora/My Zoom (v2).ckpt")
    (models / "base/tiny-sd15").rename(models / "base/Modèle Réaliste V5.1")
    reg = ModelRegistry(models)
    infos = {i.id: i for i in reg.scan()}
    assert set(infos) == {"lora:My_Zoom_v2.ckpt", "base:Modele_Realiste_V5.1"}
    for info in infos.values():
        assert re.fullmatch(MODEL_ID_PATTERN, info.id) and info.ok, info.error
        assert len(info.sha256) == 64
    assert "My Zoom (v2)" in infos["lora:My_Zoom_v2.ckpt"].label
    assert "Modèle Réaliste V5.1" in infos["base:Modele_Realiste_V5.1"].label
    entry = reg.get("lora:My_Zoom_v2.ckpt", kind="lora", require_ok=True)
    assert entry.path == models / "lora/My Zoom (v2).ckpt"
    assert loading.load_motion_lora(entry).target_modules
    assert reg.get("base:Modele_Realiste_V5.1").path == models / "base/Modèle Réaliste V5.1"


def test_files_named_in_other_scripts_get_ids_of_their_own(models_copy) -> None:  # type: ignore[no-untyped-def]
    """A name with no Latin letter ("推近 镜头.ckpt", "Модель") was listed as broken: "rename
    it".  It gets an id from its digest, its own name as the label, and loads; a script that
    names the file finds the same id (`model_id`)."""
    from animatediff_blender.backend.models import loading
    from animatediff_blender.protocol.messages import model_id

    models = models_copy("lora/v2_lora_ZoomIn.ckpt", "base/tiny-sd15")
    (models / "lora/v2_lora_ZoomIn.ckpt").rename(models / "lora/推近 镜头.ckpt")
    (models / "base/tiny-sd15").rename(models / "base/Модель")
    reg = ModelRegistry(models)
    infos = {i.id: i for i in reg.scan()}
    lora_id, base_id = model_id("推近 镜头.ckpt", "lora"), model_id("Модель", "base")
    assert set(infos) == {lora_id, base_id}
    assert lora_id.startswith("lora:name-") and base_id.startswith("base:name-")
    for info in infos.values():
        assert re.fullmatch(MODEL_ID_PATTERN, info.id) and info.ok, info.error
    assert infos[lora_id].label == "推近 镜头" and infos[base_id].label == "Модель"
    assert loading.load_motion_lora(reg.get(lora_id, kind="lora", require_ok=True)).target_modules
    assert reg.get(base_id).path == models / "base/Модель"


def test_two_files_with_one_id_keep_both_listed(models_copy) -> None:  # type: ignore[no-untyped-def]
    """"my zoom.ckpt" beside "my_zoom.ckpt" would share an id: the file named as the id keeps
    it (whichever the scan meets first), the others are listed as broken under their own
    names.  A name at top level that its kind folder also has is listed as "#top"."""
    models = models_copy("lora/v2_lora_ZoomIn.ckpt", "motion/v3_sd15_mm.safetensors")
    for name in ("my zoom.ckpt", "my_zoom.ckpt", "my  zoom.ckpt"):
        shutil.copy(models / "lora/v2_lora_ZoomIn.ckpt", models / "lora" / name)
    shutil.copy(models / "motion/v3_sd15_mm.safetensors", models / "v3_sd15_mm.safetensors")
    infos = {i.id: i for i in ModelRegistry(models).scan()}
    assert len(infos) == 6
    assert infos["lora:my_zoom.ckpt"].ok and infos["lora:v2_lora_ZoomIn.ckpt"].ok
    assert ModelRegistry(models).get("lora:my_zoom.ckpt").path.name == "my_zoom.ckpt"
    for model_id in ("lora:my zoom.ckpt", "lora:my  zoom.ckpt"):
        assert not infos[model_id].ok
        assert infos[model_id].error.startswith("duplicate id lora:my_zoom.ckpt (also "), infos[model_id].error
        assert infos[model_id].error.endswith("lora/my_zoom.ckpt): rename one of them")
    assert infos["motion:v3_sd15_mm.safetensors"].ok
    assert str(ModelRegistry(models).get("motion:v3_sd15_mm.safetensors").path).endswith("motion/v3_sd15_mm.safetensors")
    assert not infos["motion:v3_sd15_mm.safetensors#top"].ok


def test_names_with_nothing_an_id_can_hold_say_rename_it(models_copy) -> None:  # type: ignore[no-untyped-def]
    """Only a name with no letter or digit before its suffix; a name too long for an id is
    cut to fit, with its digest (it said "rename it" too)."""
    from animatediff_blender.protocol.messages import model_id

    models = models_copy("lora/v2_lora_ZoomIn.ckpt")
    long_name = "Cinematic Dolly Zoom " * 9 + "(v2).ckpt"
    for name in ("—.ckpt", "(~).ckpt", "・・.ckpt", long_name):
        shutil.copy(models / "lora/v2_lora_ZoomIn.ckpt", models / "lora" / name)
    infos = ModelRegistry(models).scan()
    broken = [i for i in infos if not i.ok]
    assert len(broken) == 3
    assert all("rename it" in i.error and i.sha256 == "" for i in broken)
    [long_info] = [i for i in infos if i.id == model_id(long_name, "lora")]
    assert long_info.ok and 150 < len(long_info.id) - len("lora:") <= 160 and long_info.id.endswith(".ckpt")
    assert long_info.label == long_name.removesuffix(".ckpt")


def test_a_cache_write_left_half_done_is_swept_later(models_copy) -> None:  # type: ignore[no-untyped-def]
    """A shutdown does not wait for a rescan stuck on a hung disk: its temporary cache file
    (`.registry-cache.tmp<pid>`) stayed in the models folder for good.  A later save removes
    one that is an hour old; one that may still be written is left alone."""
    models = models_copy("lora/v2_lora_ZoomIn.ckpt")
    abandoned, recent = models / ".registry-cache.tmp4242", models / ".registry-cache.tmp4343"
    for path in (abandoned, recent):
        path.write_text('{"half": ')
    old = time.time() - registry_mod.STALE_CACHE_TMP_S - 60
    os.utime(abandoned, (old, old))
    assert [i.id for i in ModelRegistry(models).scan()] == ["lora:v2_lora_ZoomIn.ckpt"]
    assert not abandoned.exists() and recent.exists()
    assert (models / registry_mod.CACHE_FILE).exists()
