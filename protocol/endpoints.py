"""ZeroMQ endpoint rules that need only the standard library (the Blender add-on calls them
on its main thread, where importing zmq would cost tens of milliseconds)."""

from __future__ import annotations

import ipaddress


def is_loopback(address: str) -> bool:
    """True when a ZeroMQ endpoint is reachable only from this machine: `ipc://`,
    `inproc://`, or `tcp://` on 127.0.0.0/8, ::1 or `localhost`.  A wildcard (`*`,
    0.0.0.0), an interface name or any other host is not."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        return False
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    # tcp://[source;]host:port — a source address only names the local side.
    rest = rest.rsplit(";", 1)[-1]
    host, colon, _port = rest.rpartition(":")
    if not colon:
        return False
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def connect_problem(address: str) -> str | None:
    """Why a client cannot connect to `address`, or None.  libzmq accepts `tcp://host:99999`
    and `tcp://:5557` and then waits in vain; a typo should fail at once instead."""
    scheme, sep, rest = address.partition("://")
    if not sep or not rest:
        return "expected tcp://HOST:PORT (or ipc://PATH)"
    if scheme != "tcp":
        return None  # ipc/inproc paths, or a scheme libzmq itself refuses in words
    host, colon, port = rest.rsplit(";", 1)[-1].rpartition(":")
    if not colon or not host or host == "*":
        return "expected tcp://HOST:PORT"
    if not (port.isdigit() and 1 <= int(port) <= 65535):
        return f"the port must be a number from 1 to 65535, not {port!r}"
    return None


def bind_problem(address: str) -> str | None:
    """Why a server cannot listen on `address`, or None.  libzmq reads a bind's port modulo
    65536 and ignores what follows the digits: `tcp://127.0.0.1:65557`, a typo of 5557, listens
    on port 21.  A bind may name a wildcard host (`*`) or an interface, and port `*` or 0 for
    one the system picks."""
    scheme, sep, rest = address.partition("://")
    if not sep or not rest:
        return "expected tcp://HOST:PORT (or ipc://PATH)"
    if scheme != "tcp":
        return None
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        return "expected tcp://HOST:PORT"
    if port == "*":
        return None
    if not (port.isdigit() and 0 <= int(port) <= 65535):
        return f"the port must be a number from 1 to 65535 (or * for any), not {port!r}"
    return None
