"""Whether a few-step preset meets the motion module it will run on (pure: no bpy).

The Fast (Lightning) and LCM presets schedule 4-8 steps with little or no guidance: only a
motion module distilled for that schedule makes a clip of them (and, for LCM, the spatial
LoRA distilled with it).  On any other module they
make a blurred smear, and the backend cannot refuse it (it knows modules by their detected
version, which a renamed file loses), so the artist is told before and when submitting.
"""

from __future__ import annotations

from typing import Any

# preset -> (its name in the panel, the motion modules made for it)
FEW_STEP = {"lightning": ("Fast", "AnimateDiff-Lightning"), "lcm": ("LCM", "AnimateLCM")}


def preset_mismatch(preset: str, motion_module: str, models: list[dict[str, Any]], defaults: dict[str, str],
                    domain_adapter: str = "") -> str:
    """Words for the artist when `preset` will run on a motion module not made for it, or (LCM)
    without the spatial LoRA made with it, else "".  `motion_module` "" is the backend's
    choice: its default for the preset (`defaults`, from the backend's welcome) when it has
    one.  Unknown models say nothing: the backend answers."""
    if preset not in FEW_STEP:
        return ""
    label, family = FEW_STEP[preset]
    motion = motion_module or defaults.get(f"motion_{preset}") or defaults.get("motion", "")
    info = next((x for x in models if x.get("kind") == "motion" and x.get("id") == motion), None)
    if info is None:
        return ""
    if info.get("version") == preset:
        # AnimateLCM's motion module was distilled with a spatial LoRA, which the backend adds
        # by itself ("adapter_lcm") when it has one and the request names no domain adapter.
        if preset == "lcm" and not domain_adapter and not defaults.get("adapter_lcm"):
            return (f"{label} also needs AnimateLCM's spatial LoRA, which the backend does not have, and the "
                    "clip will be soft: install it on the backend (animatediff-blender models fetch --only lcm)")
        return ""
    have = sorted(x["id"] for x in models if x.get("kind") == "motion" and x.get("version") == preset)
    fix = f"choose {have[0]} as the motion module" if have else f"install an {family} motion module on the backend"
    return (f"{label} ({family}) needs its own motion module; {motion} is not one, and the clip will be a blur: "
            f"{fix}, or use Quality")
