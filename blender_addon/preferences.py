"""Add-on preferences: where the backend is, its keys, and an optional local backend."""

import bpy
from bpy.props import BoolProperty, FloatProperty, StringProperty
from bpy.types import AddonPreferences

from .state import STATE


def _reconnect(_self=None, _context=None) -> None:
    """An update callback of the connection settings: a running worker takes them now (it
    connects again, and the panel's first line says what the new address answers).  It used to
    keep the old ones until the next Generate or refresh: the panel still said "connected" to
    the old backend, and jobs owed by a backend that could not be reached were retried there."""
    from . import jobs
    from . import messages as m
    from .settings import network_refusal

    w = STATE.worker
    if w is None or not w.is_alive():
        return  # the first worker reads the preferences when it starts
    cfg = jobs.client_config()
    if cfg == w.config or network_refusal(cfg["address"]):
        return
    w.send(m.Configure(cfg))
    w.send(m.RefreshModels())  # connect now (the client was dropped): the model list and the status


def _absolute(attr: str):
    """An update callback: a `//` path (the file browser makes one relative to the .blend open
    at that moment) becomes absolute at once; kept relative, it would resolve against whichever
    .blend is open later, and the key would be "missing" in every other project."""

    def update(self, context) -> None:
        value = getattr(self, attr)
        if value.startswith("//") and bpy.data.filepath:
            setattr(self, attr, bpy.path.abspath(value))  # calls this again, with the absolute path
            return
        _reconnect(self, context)

    return update


class ADB_Preferences(AddonPreferences):
    bl_idname = __package__

    address: StringProperty(  # type: ignore[valid-type]
        update=_reconnect, name="Backend address", default="tcp://127.0.0.1:5557",
        description="ZeroMQ address of the AnimateDiff backend (tcp://host:port)")
    key_file: StringProperty(  # type: ignore[valid-type]
        update=_absolute("key_file"), name="Shared key file", subtype="FILE_PATH", default="",
        description="HMAC key shared with the backend (empty: the default key of this user)")
    server_public_key_file: StringProperty(  # type: ignore[valid-type]
        update=_absolute("server_public_key_file"), name="Server public key", subtype="FILE_PATH", default="",
        description="CurveZMQ: the backend's public certificate (for encrypted remote connections)")
    client_secret_key_file: StringProperty(  # type: ignore[valid-type]
        update=_absolute("client_secret_key_file"), name="Client secret key", subtype="FILE_PATH", default="",
        description="CurveZMQ: this client's secret certificate")
    timeout_s: FloatProperty(  # type: ignore[valid-type]
        update=_reconnect, name="Timeout (s)", default=10.0, min=0.5, max=600.0,
        description="How long a request to the backend may take before it counts as unreachable")
    backend_command: StringProperty(  # type: ignore[valid-type]
        name="Local backend command", default="",
        description="e.g. animatediff-blender serve --bind tcp://127.0.0.1:5557 (started on loopback only)")
    auto_start: BoolProperty(  # type: ignore[valid-type]
        name="Start the local backend automatically", default=False,
        description="Start the command above when Blender needs the backend; stopped when Blender quits")

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        col = layout.column()
        col.prop(self, "address")
        col.prop(self, "key_file")
        box = col.box()
        box.label(text="Encryption (CurveZMQ, for remote backends)")
        box.prop(self, "server_public_key_file")
        box.prop(self, "client_secret_key_file")
        col.prop(self, "timeout_s")
        row = col.row()
        row.operator("animatediff.test_connection", icon="LINKED")
        if STATE.test_running:
            col.label(text="Testing...", icon="TIME")
        elif STATE.test_message:
            ok = STATE.test_message.startswith("OK")
            for i, line in enumerate(_wrap(STATE.test_message, 90)):
                col.label(text=line, icon=("CHECKMARK" if ok else "ERROR") if i == 0 else "BLANK1")
        box = col.box()
        box.label(text="Local backend")
        box.prop(self, "backend_command")
        box.prop(self, "auto_start")
        row = box.row()
        row.operator("animatediff.start_backend", icon="PLAY")
        row.operator("animatediff.stop_backend", icon="PAUSE")
        proc = STATE.backend_process
        if proc is not None:
            code = proc.poll()
            box.label(text=f"running (pid {proc.pid})" if code is None else f"exited with code {code}")


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def register() -> None:
    bpy.utils.register_class(ADB_Preferences)


def unregister() -> None:
    bpy.utils.unregister_class(ADB_Preferences)
