"""The AnimateDiff for Blender wire protocol: message schemas (`messages`), the signed
envelope (`wire`), key material (`auth`) and the client (`client`).

Imports only the standard library, `zmq` and `msgspec`, and only relatively, so that the
folder can be copied unchanged into the Blender extension.
"""

from .version import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION"]
