"""A seeded TCP proxy for tests that drops, cuts and delays loopback connections.

Each accepted connection draws its fate from its own seeded generator (seed and
connection index), so a run with the same seed makes the same decisions in the same
order whatever the timing:

- drop: close the client's socket at accept, before anything is forwarded;
- cut: after a random number of bytes (both directions together), close both sides
  mid-stream;
- delay: sleep before forwarding each chunk, in either direction.

The proxy only listens on and connects to loopback addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
from dataclasses import dataclass, field

__all__ = ["FaultCounters", "FaultPlan", "FaultProxy"]

log = logging.getLogger(__name__)

_READ_BYTES = 64 * 1024


@dataclass(frozen=True)
class FaultPlan:
    """Rates (0..1, per connection) and ranges of the faults a proxy injects."""

    drop_rate: float = 0.0
    cut_rate: float = 0.0
    delay_rate: float = 0.0
    delay_s: tuple[float, float] = (0.001, 0.01)
    cut_bytes: tuple[int, int] = (1, 1 << 20)

    def __post_init__(self) -> None:
        for name in ("drop_rate", "cut_rate", "delay_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: expected 0..1")
        if not 0.0 <= self.delay_s[0] <= self.delay_s[1]:
            raise ValueError(f"delay_s={self.delay_s}: expected 0 <= low <= high")
        if not 1 <= self.cut_bytes[0] <= self.cut_bytes[1]:
            raise ValueError(f"cut_bytes={self.cut_bytes}: expected 1 <= low <= high")


@dataclass
class FaultCounters:
    """What the proxy did so far."""

    connections: int = 0
    dropped: int = 0
    cut: int = 0
    delayed: int = 0
    bytes_forwarded: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return dict(vars(self))


@dataclass(eq=False)
class _Fate:
    drop: bool
    cut_after: int | None
    delay_s: float
    sent: int = 0
    cutting: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


class FaultProxy:
    """Forwards ``127.0.0.1:<port>`` to a loopback target, injecting seeded faults."""

    def __init__(
        self, target_port: int, *, plan: FaultPlan, seed: int = 0, target_host: str = "127.0.0.1"
    ) -> None:
        if not ipaddress.ip_address(target_host).is_loopback:
            raise ValueError(f"target {target_host} is not a loopback address")
        self.target = (target_host, target_port)
        self.plan = plan
        self.seed = seed
        self.counters = FaultCounters()
        self.enabled = True  # with False, connections are forwarded untouched
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._fates: set[_Fate] = set()

    @property
    def address(self) -> str:
        """``host:port`` for a gRPC channel."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> int:
        """Listen on a free loopback port; returns it."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        """Stop listening and break every open connection; harmless twice."""
        if self._server is not None:
            self._server.close()
            self._server = None
        # Ending a connection's wait, rather than cancelling its handler, lets asyncio's
        # stream machinery see the handler return normally.
        for fate in list(self._fates):
            fate.done.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _decide(self, index: int) -> _Fate:
        # Draw every value in a fixed order so one decision never shifts another.
        rng = random.Random(f"{self.seed}:{index}")
        drop, cut, delay = rng.random(), rng.random(), rng.random()
        cut_after = rng.randint(*self.plan.cut_bytes)
        delay_s = rng.uniform(*self.plan.delay_s)
        if not self.enabled:
            return _Fate(drop=False, cut_after=None, delay_s=0.0)
        return _Fate(
            drop=drop < self.plan.drop_rate,
            cut_after=cut_after if cut < self.plan.cut_rate else None,
            delay_s=delay_s if delay < self.plan.delay_rate else 0.0,
        )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.counters.connections
        self.counters.connections += 1
        fate = self._decide(index)
        if self._server is None:
            fate.drop = True  # closing: take no new connections
        if fate.drop:
            self.counters.dropped += 1
            writer.transport.abort()
            return

        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError as exc:
            log.debug("proxy connection %d: target refused (%s)", index, exc)
            writer.transport.abort()
            return
        if fate.delay_s:
            self.counters.delayed += 1

        self._fates.add(fate)
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, fate)),
            asyncio.create_task(self._pump(up_reader, writer, fate)),
        ]
        try:
            await fate.done.wait()
        finally:
            self._fates.discard(fate)
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for w in (writer, up_writer):
                w.transport.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fate: _Fate
    ) -> None:
        try:
            while not fate.done.is_set():
                data = await reader.read(_READ_BYTES)
                if not data:
                    break
                if fate.delay_s:
                    await asyncio.sleep(fate.delay_s)
                if fate.cut_after is not None and fate.sent + len(data) >= fate.cut_after:
                    # Forward what fits, then break the connection in both directions.
                    if not fate.cutting:
                        fate.cutting = True
                        self.counters.cut += 1
                        writer.write(data[: fate.cut_after - fate.sent])
                        await writer.drain()
                    break
                fate.sent += len(data)
                self.counters.bytes_forwarded += len(data)
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            fate.done.set()
            with contextlib.suppress(OSError):
                writer.transport.abort()
