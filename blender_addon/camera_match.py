"""Read the active camera's animation and suggest the matching camera MotionLoRAs.

The camera is sampled over the frame range (its evaluated world matrix per frame, so
parents and constraints count).  Between two samples the move is expressed in the
camera's own axes (Blender cameras look down -Z, +Y is up, +X is right) and summed:

* dolly: translation along the view axis.  Forward -> ZoomIn, backward -> ZoomOut.
* pan: yaw (rotation about the camera's up axis) plus sideways translation.
  Turning / moving left -> PanLeft, right -> PanRight.
* tilt: pitch (rotation about the camera's right axis) plus vertical translation.
  Up -> TiltUp, down -> TiltDown.
* roll: rotation about the view axis, as the camera operator sees it.
  Anticlockwise -> RollingAnticlockwise, clockwise -> RollingClockwise.

Weights: the total move over the range divided by a full-scale move, clamped to [0, 1]:
FULL_TRANSLATION scene units (2 m) for dolly / truck / pedestal, FULL_ROTATION_DEG
(30 degrees) for pan / tilt / roll.  Moves below THRESHOLD (0.1, i.e. 0.2 m or 3
degrees over the clip) are ignored and their LoRA is switched off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

FULL_TRANSLATION = 2.0
FULL_ROTATION_DEG = 30.0
THRESHOLD = 0.1
MAX_SAMPLES = 96  # sampling bound: frame_set on a heavy scene is the slow part

PAIRS = {
    "dolly": ("ZoomIn", "ZoomOut"),
    "pan": ("PanLeft", "PanRight"),
    "tilt": ("TiltUp", "TiltDown"),
    "roll": ("RollingAnticlockwise", "RollingClockwise"),
}


@dataclass
class CameraMotion:
    dolly: float = 0.0  # scene units forward
    truck: float = 0.0  # scene units to the left
    pedestal: float = 0.0  # scene units up
    yaw_deg: float = 0.0  # turned left
    pitch_deg: float = 0.0  # turned up
    roll_deg: float = 0.0  # rolled anticlockwise (operator's view)
    weights: dict[str, float] = field(default_factory=dict)

    def scores(self) -> dict[str, float]:
        return {
            "dolly": self.dolly / FULL_TRANSLATION,
            "pan": self.yaw_deg / FULL_ROTATION_DEG + self.truck / FULL_TRANSLATION,
            "tilt": self.pitch_deg / FULL_ROTATION_DEG + self.pedestal / FULL_TRANSLATION,
            "roll": self.roll_deg / FULL_ROTATION_DEG,
        }


def weights_from_scores(scores: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for axis, (positive, negative) in PAIRS.items():
        score = scores.get(axis, 0.0)
        mag = min(1.0, abs(score))
        if mag < THRESHOLD:
            mag = 0.0
        out[positive] = round(mag, 3) if score > 0 else 0.0
        out[negative] = round(mag, 3) if score < 0 else 0.0
    return out


def motion_from_matrices(matrices: list[Any]) -> CameraMotion:
    """Sum the per-sample moves of a list of 4x4 world matrices (mathutils.Matrix)."""
    motion = CameraMotion()
    for a, b in zip(matrices, matrices[1:], strict=False):
        rot_a = a.to_3x3().normalized()
        rot_b = b.to_3x3().normalized()
        delta = rot_a.transposed() @ (b.translation - a.translation)  # in camera A's axes
        motion.dolly += -delta.z
        motion.truck += -delta.x
        motion.pedestal += delta.y
        # Intrinsic yaw (Y) then pitch (X) then roll (Z) == extrinsic order "ZXY".
        rel = (rot_a.transposed() @ rot_b).to_euler("ZXY")
        motion.yaw_deg += math.degrees(rel.y)
        motion.pitch_deg += math.degrees(rel.x)
        motion.roll_deg += math.degrees(rel.z)
    motion.weights = weights_from_scores(motion.scores())
    return motion


def sample_camera(scene: Any, camera: Any, frame_start: int, frame_end: int) -> list[Any]:
    """World matrices of `camera` over the range; the current frame is restored."""
    frames = list(range(frame_start, frame_end + 1))
    if len(frames) > MAX_SAMPLES:
        step = (len(frames) - 1) / (MAX_SAMPLES - 1)
        frames = sorted({frame_start + round(i * step) for i in range(MAX_SAMPLES)})
    current = scene.frame_current
    out = []
    try:
        for f in frames:
            scene.frame_set(f)
            out.append(camera.matrix_world.copy())
    finally:
        scene.frame_set(current)
    return out


def analyse(scene: Any, camera: Any = None, frame_start: int | None = None,
            frame_end: int | None = None) -> CameraMotion:
    camera = camera or scene.camera
    if camera is None:
        raise ValueError("the scene has no active camera")
    start = scene.frame_start if frame_start is None else frame_start
    end = scene.frame_end if frame_end is None else frame_end
    if end <= start:
        raise ValueError("the frame range has a single frame: there is no motion to read")
    return motion_from_matrices(sample_camera(scene, camera, start, end))


def apply_to_settings(settings: Any, weights: dict[str, float]) -> None:
    from .properties import ensure_camera_loras

    ensure_camera_loras(settings)
    for row in settings.camera_loras:
        w = weights.get(row.motion, 0.0)
        row.enabled = w > 0.0
        if w > 0.0:
            row.weight = w
