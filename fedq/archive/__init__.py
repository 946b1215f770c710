"""The archive of accepted updates: a RabbitMQ stream, or a folder when embedded."""

from fedq.archive.base import ArchiveError, ArchiveSettings, UpdateArchive

__all__ = ["ArchiveError", "ArchiveSettings", "UpdateArchive", "open_archive"]


async def open_archive(
    amqp_url: str | None, *, settings: ArchiveSettings | None = None, idle_s: float = 1.0
) -> UpdateArchive:
    """The stream archive on the broker at ``amqp_url``, or the folder archive without one."""
    settings = settings or ArchiveSettings.from_env()
    if not amqp_url:
        from fedq.archive.disk import DiskArchive

        return DiskArchive.from_settings(settings)

    from fedq.archive.stream import StreamArchive

    return await StreamArchive.connect(amqp_url, idle_s=idle_s)
