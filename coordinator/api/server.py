"""Serving the REST API with hypercorn inside the caller's event loop."""

from __future__ import annotations

import asyncio
import logging
import socket

from hypercorn.asyncio import serve
from hypercorn.config import Config

from coordinator.api.app import create_app
from coordinator.privacy import PrivacyLedger
from coordinator.settings import CoordinatorSettings
from fedq.queue import UpdateQueue
from fedq.state import RoundStore

__all__ = ["ApiServer"]

log = logging.getLogger(__name__)

GRACE_S = 3.0  # time open requests get to finish once stop() is called


class ApiServer:
    """The REST API on ``host:port`` (port 0 picks a free one, then exposed as ``.port``)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        store: RoundStore,
        ledger: PrivacyLedger,
        queue: UpdateQueue,
        settings: CoordinatorSettings,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"API port {port} must be in 0..65535 (0 picks a free port)")
        self.host = host
        self.port = port
        self.app = create_app(store=store, ledger=ledger, queue=queue, settings=settings)
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """Base URL of the running server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> int:
        """Bind, start serving in a background task and return the bound port."""
        if self._task is not None:
            raise RuntimeError(f"API server already started on {self.url}")
        sock = _listening_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        self._stopping = asyncio.Event()

        config = Config()
        # Hypercorn takes the socket over by descriptor and closes it on shutdown.
        config.bind = [f"fd://{sock.detach()}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("hypercorn.error")  # no handlers of its own
        config.graceful_timeout = GRACE_S

        self._task = asyncio.create_task(
            serve(self.app, config, shutdown_trigger=self._stopping.wait), name="rest-api"
        )
        self._task.add_done_callback(self._on_exit)
        log.info("REST API listening on %s", self.url)
        return self.port

    async def stop(self) -> None:
        """Stop taking requests and wait for open ones to finish; calling it twice is harmless."""
        task, self._task = self._task, None
        if task is None:
            return

        self._stopping.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), GRACE_S + 2.0)
        except TimeoutError:
            log.warning("REST API did not stop within %.0fs; cancelling it", GRACE_S + 2.0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        except Exception:  # already logged by _on_exit
            pass
        log.info("REST API on %s stopped", self.url)

    async def __aenter__(self) -> ApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _on_exit(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("REST API on %s crashed", self.url, exc_info=task.exception())


def _listening_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket; binding here is what makes port 0 knowable."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        # Listening now queues early connections until hypercorn starts accepting them.
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port} for the REST API: {exc}") from exc
    return sock
