"""Starting and stopping a gateway: the gRPC server and its round watcher."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from coordinator.gateway.servicer import FederationServicer
from coordinator.gateway.watcher import RoundWatcher
from coordinator.settings import GatewaySettings
from fedq.queue import UpdateQueue
from fedq.state import RoundStore
from fedq.tasks import cancel_and_wait
from proto import fedq_v1_pb2_grpc as pb_grpc

__all__ = ["GRPC_OPTIONS", "GatewayServer"]

log = logging.getLogger(__name__)

# Chunks are at most 3 MiB, so the default 4 MiB message limit holds; keepalives
# find dead clients on flaky links.
GRPC_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # Accept the clients' keepalive pings (every 20 s, also on an idle round stream)
    # instead of answering them with a too_many_pings GOAWAY.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
]


class GatewayServer:
    """A gRPC gateway bound to one address; an async context manager."""

    def __init__(
        self,
        *,
        store: RoundStore,
        queue: UpdateQueue,
        settings: GatewaySettings,
        ledger: Any | None = None,
    ) -> None:
        self._settings = settings
        self.watcher = RoundWatcher(store, poll_s=settings.poll_s)
        self.servicer = FederationServicer(
            store=store, queue=queue, settings=settings, watcher=self.watcher, ledger=ledger
        )
        self._server: grpc.aio.Server | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        """Bind and serve; returns the port (useful with port 0)."""
        self._server = grpc.aio.server(options=GRPC_OPTIONS)
        pb_grpc.add_FederationServicer_to_server(self.servicer, self._server)
        address = f"{self._settings.host}:{self._settings.port}"
        tls = self._settings.tls
        if tls.enabled:
            self.port = self._server.add_secure_port(address, tls.credentials())
        else:
            self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind gRPC on {self._settings.host}:{self._settings.port}")
        await self._server.start()
        self._watch_task = asyncio.create_task(self.watcher.run(), name="round-watcher")
        log.info(
            "gateway listening on %s:%d (%s)",
            self._settings.host,
            self.port,
            "mutual TLS" if tls.client_ca else "TLS" if tls.enabled else "plaintext",
        )
        return self.port

    async def stop(self, *, grace_s: float = 5.0) -> None:
        """Stop taking calls, let running ones finish within ``grace_s``; idempotent."""
        if self._watch_task is not None:
            await cancel_and_wait(self._watch_task)
            self._watch_task = None
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
            log.info("gateway on port %d stopped", self.port)

    async def wait(self) -> None:
        """Serve until terminated."""
        assert self._server is not None
        await self._server.wait_for_termination()

    async def __aenter__(self) -> GatewayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
