"""TLS and mutual TLS for gRPC: loading PEM files and building credentials."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from fedq.config import SettingsError

__all__ = ["ClientTls", "ServerTls"]


def _read(path: str, variable: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SettingsError(
            f"{variable}={path!r}: cannot read the PEM file ({exc.strerror})"
        ) from exc


@dataclass(frozen=True)
class ServerTls:
    """A gateway's certificate and key; with ``client_ca``, clients must present certificates."""

    cert: str = ""
    key: str = ""
    client_ca: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise SettingsError("FEDQ_TLS_CERT and FEDQ_TLS_KEY must be set together")
        if self.client_ca and not self.cert:
            raise SettingsError("FEDQ_TLS_CLIENT_CA (mutual TLS) needs FEDQ_TLS_CERT and _KEY")

    @property
    def enabled(self) -> bool:
        """Whether the gateway serves TLS."""
        return bool(self.cert)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials; client certificates are required when a client CA is set."""
        pair = (_read(self.key, "FEDQ_TLS_KEY"), _read(self.cert, "FEDQ_TLS_CERT"))
        ca = _read(self.client_ca, "FEDQ_TLS_CLIENT_CA") if self.client_ca else None
        return grpc.ssl_server_credentials(
            [pair], root_certificates=ca, require_client_auth=ca is not None
        )


@dataclass(frozen=True)
class ClientTls:
    """What a client trusts (``ca``) and, for mutual TLS, its own certificate and key."""

    ca: str = ""
    cert: str = ""
    key: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise SettingsError("FEDQ_TLS_CLIENT_CERT and FEDQ_TLS_CLIENT_KEY must be set together")

    @property
    def enabled(self) -> bool:
        """Whether the client connects with TLS."""
        return bool(self.ca or self.cert)

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials (the system roots when no CA file is given)."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "FEDQ_TLS_CA") if self.ca else None,
            private_key=_read(self.key, "FEDQ_TLS_CLIENT_KEY") if self.key else None,
            certificate_chain=_read(self.cert, "FEDQ_TLS_CLIENT_CERT") if self.cert else None,
        )
