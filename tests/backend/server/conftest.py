"""Fixtures for the server tests: a server on a random loopback port (FakeEngine,
temp data dir) and protocol clients connected to it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from server_helpers import KEY

from animatediff_blender.backend.engine.fake import FakeEngine
from animatediff_blender.backend.server.config import ServerConfig
from animatediff_blender.backend.server.server import Server
from animatediff_blender.protocol.client import BackendClient, ClientConfig
from animatediff_blender.protocol.messages import Limits


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def make(
        engine: Any = None,
        data_dir: Path | None = None,
        limits: Limits | None = None,
        **config: Any,
    ) -> Server:
        cfg = ServerConfig(
            key=KEY,
            data_dir=data_dir or tmp_path / "data",
            bind="tcp://127.0.0.1:*",
            limits=limits or Limits(),
            linger_ms=0,
            shutdown_timeout_s=5,
            **config,
        )
        server = Server(cfg, engine if engine is not None else FakeEngine())
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server: Callable[..., Server]) -> Server:
    return make_server()


@pytest.fixture
def make_client() -> Iterator[Callable[..., BackendClient]]:
    clients: list[BackendClient] = []

    def make(server: Server | str, client_id: str = "artist-a", **config: Any) -> BackendClient:
        address = server if isinstance(server, str) else server.endpoint
        config.setdefault("timeout_s", 10)
        cfg = ClientConfig(address=address, key=KEY, client_id=client_id, **config)
        client = BackendClient(cfg)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(server: Server, make_client: Callable[..., BackendClient]) -> BackendClient:
    c = make_client(server)
    c.connect()
    return c
