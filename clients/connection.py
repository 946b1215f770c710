"""A client's link to the gateways: deadlines, retries with backoff, failover."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from proto import fedq_v1_pb2_grpc as pb_grpc

__all__ = ["GatewayLink", "RetryPolicy", "TRANSIENT_CODES"]

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DATA_LOSS,  # a stream cut mid-way arrives truncated
        # A gateway that refuses an upload before reading all of it (say, while Redis
        # restarts) can surface here as INTERNAL "Internal error from Core". Every call
        # is idempotent (uploads carry their update id), so retrying it is safe.
        grpc.StatusCode.INTERNAL,
    }
)

_RETIRE_GRACE_S = 30.0

_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),  # retries are ours, with idempotency keys
    # A link owns its connection: closing the channel on fail-over must drop it, not leave
    # a half-dead one in gRPC's process-wide pool for the next channel to pick up.
    ("grpc.use_local_subchannel_pool", 1),
]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter."""

    attempts: int = 8
    base_s: float = 0.2
    max_s: float = 10.0
    call_timeout_s: float = 120.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before attempt ``attempt + 1``."""
        return rng.uniform(0, min(self.max_s, self.base_s * 2**attempt))


class GatewayLink:
    """Channels to one or more gateways; calls fail over to the next on transient errors."""

    def __init__(
        self,
        addresses: list[str],
        *,
        policy: RetryPolicy,
        seed: int = 0,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("at least one gateway address is needed")
        self._addresses = list(addresses)
        self._policy = policy
        self._credentials = credentials
        self._rng = random.Random(seed)
        self._index = self._rng.randrange(len(addresses))
        self._channel: grpc.aio.Channel | None = None
        self._retired: list[grpc.aio.Channel] = []
        self._stub: pb_grpc.FederationStub | None = None

    @property
    def stub(self) -> pb_grpc.FederationStub:
        """Stub on the current gateway's channel."""
        if self._stub is None:
            address = self._addresses[self._index]
            if self._credentials is not None:
                self._channel = grpc.aio.secure_channel(
                    address, self._credentials, options=_CHANNEL_OPTIONS
                )
            else:
                self._channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
            self._stub = pb_grpc.FederationStub(self._channel)
        return self._stub

    @property
    def timeout_s(self) -> float:
        """Deadline of one call."""
        return self._policy.call_timeout_s

    async def call(self, what: str, attempt: Callable[[pb_grpc.FederationStub], Awaitable[T]]) -> T:
        """Run ``attempt`` with retries; non-transient errors propagate at once."""
        last: grpc.aio.AioRpcError | None = None
        for n in range(self._policy.attempts):
            try:
                return await attempt(self.stub)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in TRANSIENT_CODES:
                    raise
                last = exc
                delay = self._policy.delay(n, self._rng)
                log.warning(
                    "%s failed (%s: %s); retry %d in %.2fs",
                    what,
                    exc.code().name,
                    exc.details(),
                    n + 1,
                    delay,
                )
                await self.fail_over()
                await asyncio.sleep(delay)
        assert last is not None
        raise last

    async def fail_over(self) -> None:
        """Move to the next gateway; the old channel closes after a grace period.

        Other calls of this client (its round stream, a download) may still be using
        the old channel; closing it at once would cancel them under their feet.
        """
        old = self._channel
        self._channel = self._stub = None
        self._index = (self._index + 1) % len(self._addresses)
        if old is not None:
            self._retired.append(old)
            asyncio.get_running_loop().call_later(
                _RETIRE_GRACE_S, lambda: asyncio.ensure_future(self._close_retired(old))
            )

    async def _close_retired(self, channel: grpc.aio.Channel) -> None:
        if channel in self._retired:
            self._retired.remove(channel)
            await channel.close()

    async def close(self) -> None:
        """Close every channel; harmless twice."""
        for channel in [self._channel, *self._retired]:
            if channel is not None:
                await channel.close()
        self._channel = self._stub = None
        self._retired.clear()
