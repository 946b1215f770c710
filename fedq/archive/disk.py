"""The embedded archive: one append-only msgpack file per round in a folder.

Each record is the queued message body as one msgpack ``bin`` object, appended and
flushed to disk before the publish that carries it returns. A crash mid-append
leaves at most a truncated last record, which reading skips with a warning.
Retention mirrors the stream's: on opening, round files older than ``max_age`` go,
then the oldest files until the folder holds at most ``max_bytes``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack

from fedq.archive.base import ArchiveError, ArchiveSettings, UpdateArchive
from fedq.queue.message import MessageError, QueuedUpdate

__all__ = ["DiskArchive"]

log = logging.getLogger(__name__)

_PATTERN = "round-*.msgpack"


class DiskArchive(UpdateArchive):
    """Archived updates as ``<directory>/round-NNNNNN.msgpack`` files."""

    def __init__(
        self, directory: Path, *, max_age_s: float | None = None, max_bytes: int | None = None
    ) -> None:
        self.directory = Path(directory)
        self._lock = asyncio.Lock()
        self._prune(max_age_s=max_age_s, max_bytes=max_bytes)

    @classmethod
    def from_settings(cls, settings: ArchiveSettings) -> DiskArchive:
        """The archive in ``settings.path`` with its retention."""
        return cls(settings.path, max_age_s=settings.max_age_s, max_bytes=settings.max_bytes)

    def round_path(self, round_id: int) -> Path:
        """The file that holds a round's updates."""
        return self.directory / f"round-{round_id:06d}.msgpack"

    async def append(self, body: bytes) -> None:
        """Archive one queued message; bodies that are not updates are not kept.

        Raises:
            ArchiveError: the file could not be written.
        """
        try:
            round_id = QueuedUpdate.decode(body).round
        except MessageError as exc:
            log.debug("not archiving a message that is no update: %s", exc)
            return

        record = msgpack.packb(bytes(body), use_bin_type=True)
        async with self._lock:
            try:
                await asyncio.to_thread(self._write, self.round_path(round_id), record)
            except OSError as exc:
                raise ArchiveError(f"cannot append to {self.round_path(round_id)}: {exc}") from exc

    async def read_round(  # type: ignore[override]
        self, round_id: int, *, since: float | None = None
    ) -> AsyncIterator[QueuedUpdate]:
        path = self.round_path(round_id)
        if not path.exists():
            return
        try:
            raw = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise ArchiveError(f"cannot read {path}: {exc}") from exc

        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=0)
        unpacker.feed(raw)
        for body in unpacker:
            update = _decode(body, path)
            if update is not None and update.round == round_id:
                if since is None or update.accepted_at >= since:
                    yield update
        if unpacker.tell() < len(raw):
            log.warning(
                "%s ends in a truncated record (%d bytes skipped)", path, len(raw) - unpacker.tell()
            )

    @staticmethod
    def _write(path: Path, record: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as file:
            file.write(record)
            file.flush()
            os.fsync(file.fileno())

    def _prune(self, *, max_age_s: float | None, max_bytes: int | None) -> None:
        if not self.directory.is_dir():
            return
        files = sorted(self.directory.glob(_PATTERN), key=lambda p: p.stat().st_mtime)
        now = time.time()
        if max_age_s is not None:
            for old in [p for p in files if now - p.stat().st_mtime > max_age_s]:
                old.unlink(missing_ok=True)
                files.remove(old)
                log.info("archive: removed %s (older than %.0fs)", old, max_age_s)

        total = sum(p.stat().st_size for p in files)
        while max_bytes is not None and files and total > max_bytes:
            oldest = files.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)
            log.info("archive: removed %s to stay within %d bytes", oldest, max_bytes)


def _decode(body: object, path: Path) -> QueuedUpdate | None:
    if not isinstance(body, bytes):
        log.warning("%s holds a record that is not a message body; skipped", path)
        return None
    try:
        return QueuedUpdate.decode(body)
    except MessageError as exc:
        log.warning("%s holds an undecodable record; skipped: %s", path, exc)
        return None
