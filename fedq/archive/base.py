"""The update archive contract and its settings.

Every update the queue accepts is also appended to an archive that nothing
consumes: a RabbitMQ stream (``fedq.updates.archive``) in deployment, a folder of
per-round msgpack files in embedded mode. Replaying a round reads it back.

Contract of ``read_round``:

* it yields every archived, decodable update of the round (others are skipped);
* the same update id may come more than once (a retried publish, a requeued dead
  letter, or an earlier federation that reused the round number and id): telling
  the copies apart is the reader's job, using ``accepted_at``;
* ``since`` (unix seconds) is a hint: the archive may skip updates accepted before
  it, and may also yield some of them;
* it stops once it has caught up with the archive; it never waits for new updates.
"""

from __future__ import annotations

import abc
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fedq.config import EnvReader, SettingsError
from fedq.queue.message import QueuedUpdate

__all__ = ["ArchiveError", "ArchiveSettings", "UpdateArchive"]

# RabbitMQ's x-max-age units: years, months, days, hours, minutes, seconds.
_AGE = re.compile(r"^([1-9][0-9]*)([YMDhms])$")
_AGE_UNIT_S = {"Y": 365 * 86400, "M": 30 * 86400, "D": 86400, "h": 3600, "m": 60, "s": 1}


class ArchiveError(RuntimeError):
    """The archive could not be read (missing stream or folder, broker unreachable)."""


@dataclass(frozen=True)
class ArchiveSettings:
    """Retention of the archive and where the embedded one lives."""

    max_bytes: int = 10 * 2**30
    max_age: str = "7D"
    directory: str = ""  # embedded mode; empty: ~/.cache/fedq/archive

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise SettingsError(f"FEDQ_ARCHIVE_MAX_BYTES={self.max_bytes}: expected at least 1")
        if not _AGE.match(self.max_age):
            raise SettingsError(
                f"FEDQ_ARCHIVE_MAX_AGE={self.max_age!r}: expected a count and a unit of "
                "Y, M, D, h, m or s, such as 7D or 12h"
            )

    @property
    def max_age_s(self) -> float:
        """``max_age`` in seconds (a month counts 30 days, a year 365)."""
        match = _AGE.match(self.max_age)
        assert match is not None
        return float(int(match.group(1)) * _AGE_UNIT_S[match.group(2)])

    @property
    def path(self) -> Path:
        """Folder of the embedded archive."""
        if self.directory:
            return Path(self.directory).expanduser()
        return Path.home() / ".cache" / "fedq" / "archive"

    @classmethod
    def from_env(cls, env: EnvReader | None = None) -> ArchiveSettings:
        """Read ``FEDQ_ARCHIVE_MAX_BYTES``, ``FEDQ_ARCHIVE_MAX_AGE`` and ``FEDQ_ARCHIVE_DIR``."""
        env = env or EnvReader()
        return cls(
            max_bytes=env.int("ARCHIVE_MAX_BYTES", 10 * 2**30, minimum=1),
            max_age=env.str("ARCHIVE_MAX_AGE", "7D"),
            directory=env.str("ARCHIVE_DIR", ""),
        )


class UpdateArchive(abc.ABC):
    """Append-only record of the updates the queue accepted, readable per round."""

    @abc.abstractmethod
    def read_round(
        self, round_id: int, *, since: float | None = None
    ) -> AsyncIterator[QueuedUpdate]:
        """The archived updates of ``round_id``, oldest first (see the module contract)."""

    async def close(self) -> None:  # noqa: B027  (optional: only some archives hold connections)
        """Release connections; calling it twice is harmless."""

    async def __aenter__(self) -> UpdateArchive:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
