"""Request checks against the server's configured `Limits`, before any GPU work.

The message schemas already enforce static bounds (types, multiples of 8, id
patterns) at decode time; these are the limits an operator configures.  Every
violation is reported, each with the field path a form can highlight
(`$.request.width`), not only the first one.
"""

from __future__ import annotations

from animatediff_blender.protocol.messages import FieldError, GenerateRequest, Limits

MAX_TRAVEL_ENTRIES = 256  # prompt-travel keyframes, on top of "one per frame at most"


def check_request(req: GenerateRequest, limits: Limits, prefix: str = "$.request") -> list[FieldError]:
    errors: list[FieldError] = []

    def bad(field: str, message: str) -> None:
        errors.append(FieldError(field=f"{prefix}.{field}", message=message))

    for name, value, cap in (
        ("width", req.width, limits.max_width),
        ("height", req.height, limits.max_height),
    ):
        if value % 8:
            bad(name, "must be a multiple of 8")
        if value > cap:
            bad(name, f"must be <= {cap}")
    if req.frames > limits.max_frames:
        bad("frames", f"must be <= {limits.max_frames}")
    budget = req.width * req.height * req.frames
    if budget > limits.max_pixel_frames:
        bad(
            "frames",
            f"width x height x frames = {budget} exceeds the server's budget of {limits.max_pixel_frames}; "
            "use fewer frames or a smaller size",
        )
    if req.steps is not None and req.steps > limits.max_steps:
        bad("steps", f"must be <= {limits.max_steps}")
    if req.guidance is not None and not (limits.min_guidance <= req.guidance <= limits.max_guidance):
        bad("guidance", f"must be between {limits.min_guidance} and {limits.max_guidance}")

    for name, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
        if len(text) > limits.max_prompt_chars:
            bad(name, f"must be at most {limits.max_prompt_chars} characters")
    if req.prompt_travel is not None:
        cap = min(req.frames, MAX_TRAVEL_ENTRIES)
        if len(req.prompt_travel) > cap:
            bad("prompt_travel", f"at most {cap} entries (one per frame)")
        # The first `cap` only: an error per entry of 600,000 made a reply too large to send.
        for frame, text in sorted(req.prompt_travel.items())[:cap]:
            if not 0 <= frame < req.frames:
                bad(f"prompt_travel.{frame}", f"frame index must be between 0 and {req.frames - 1}")
            if len(text) > limits.max_prompt_chars:
                bad(f"prompt_travel.{frame}", f"must be at most {limits.max_prompt_chars} characters")

    if len(req.motion_loras) > limits.max_motion_loras:
        bad("motion_loras", f"at most {limits.max_motion_loras} MotionLoRAs")
    for i, lora in enumerate(req.motion_loras[: limits.max_motion_loras]):
        if not limits.min_lora_weight <= lora.weight <= limits.max_lora_weight:
            bad(
                f"motion_loras[{i}].weight",
                f"must be between {limits.min_lora_weight} and {limits.max_lora_weight}",
            )
    if (
        req.context_length is not None
        and req.context_stride is not None
        and req.context_stride > req.context_length
    ):
        bad("context_stride", "must be <= context_length")
    return errors
