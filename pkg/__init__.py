"""AnimateDiff for Blender: installed home of `protocol` (wire contract) and `backend` (GPU server)."""

__version__ = "0.1.0"
