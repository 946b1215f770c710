"""Entry point of a standalone client: one organisation's process."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from clients.capabilities import UploadMeter, measure
from clients.client import FederatedClient
from clients.connection import GatewayLink, RetryPolicy
from clients.training import train_locally
from fedq.config import EnvReader, SettingsError
from fedq.datasets import load_dataset, partition
from fedq.models import ModelError, default_model_for
from fedq.tls import ClientTls

__all__ = ["ClientSettings", "run_client"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientSettings:
    """Which gateways, which data, which share of it."""

    client_id: str
    gateways: tuple[str, ...]
    dataset: str = "mnist"
    data_dir: str = ""
    partitions: int = 1
    partition_index: int = 0
    partition_scheme: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    call_timeout_s: float = 120.0
    retry_attempts: int = 8
    tls: ClientTls = field(default_factory=ClientTls)
    probe: bool = True
    upload_bytes_per_second: float = 0.0  # 0: measured from the last upload
    mode: str = "sync"  # "async": train continuously on the newest model version

    def __post_init__(self) -> None:
        if not self.client_id:
            raise SettingsError("FEDQ_CLIENT_ID (--client-id) is required")
        if not self.gateways:
            raise SettingsError("FEDQ_GATEWAYS (--gateways) needs at least one host:port")
        if not 0 <= self.partition_index < self.partitions:
            raise SettingsError(
                f"partition index {self.partition_index} is outside 0..{self.partitions - 1}"
            )

    @classmethod
    def from_env(cls, env: EnvReader | None = None, **overrides: Any) -> ClientSettings:
        """Read ``FEDQ_CLIENT_*``; keyword overrides (from the command line) win."""
        env = env or EnvReader()
        values: dict[str, Any] = {
            "client_id": env.str("CLIENT_ID", ""),
            "gateways": tuple(env.list("GATEWAYS", ["127.0.0.1:50051"])),
            "dataset": env.str("DATASET", "mnist"),
            "data_dir": env.str("DATA_DIR", ""),
            "partitions": env.int("CLIENT_PARTITIONS", 1, minimum=1),
            "partition_index": env.int("CLIENT_PARTITION_INDEX", 0, minimum=0),
            "partition_scheme": env.str("CLIENT_PARTITION", "iid", choices=("iid", "dirichlet")),
            "alpha": env.float("CLIENT_ALPHA", 0.5, minimum=1e-6),
            "seed": env.int("SEED", 0, minimum=0),
            "call_timeout_s": env.float("CLIENT_CALL_TIMEOUT_S", 120.0, minimum=1.0),
            "retry_attempts": env.int("CLIENT_RETRY_ATTEMPTS", 8, minimum=1),
            "tls": ClientTls(
                ca=env.str("TLS_CA", ""),
                cert=env.str("TLS_CLIENT_CERT", ""),
                key=env.str("TLS_CLIENT_KEY", ""),
            ),
            "probe": env.bool("CLIENT_PROBE", True),
            "upload_bytes_per_second": env.float("CLIENT_UPLOAD_BPS", 0.0, minimum=0.0),
            "mode": env.str("MODE", "sync", choices=("sync", "async")),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


async def run_client(settings: ClientSettings) -> int:
    """Train in every round this client is selected for; returns rounds accepted."""
    data = _local_data(settings)

    def trainer(model_name: str, arrays: dict[str, np.ndarray], plan: Any) -> Any:
        return train_locally(model_name, arrays, data, plan)

    policy = RetryPolicy(attempts=settings.retry_attempts, call_timeout_s=settings.call_timeout_s)
    credentials = settings.tls.credentials() if settings.tls.enabled else None
    link = GatewayLink(
        list(settings.gateways), policy=policy, seed=settings.seed, credentials=credentials
    )
    upload = UploadMeter(configured_bytes_per_second=settings.upload_bytes_per_second)

    def probe(model_name: str) -> Any:
        return measure(model_name, data, upload=upload)

    client = FederatedClient(
        client_id=settings.client_id,
        link=link,
        num_examples=len(data),
        trainer=trainer,
        probe=probe if settings.probe else None,
        upload=upload,
        continuous=settings.mode == "async",
        model_name=_guess_model(settings.dataset),  # the gateway's name wins at join
    )
    try:
        outcomes = await client.run()
    finally:
        await link.close()
    accepted = sum(o.outcome == "accepted" for o in outcomes)
    log.info(
        "client %s done: %d of %d rounds accepted", settings.client_id, accepted, len(outcomes)
    )
    return accepted


def _local_data(settings: ClientSettings) -> torch.utils.data.TensorDataset:
    """This client's partition of the training set.

    A copy, so that the whole set (188 MB of float32 for MNIST) is freed on return
    instead of staying alive for as long as the client runs.
    """
    train = load_dataset(settings.dataset, root=settings.data_dir or None, train=True)
    parts = partition(
        train.tensors[1].numpy(),
        settings.partitions,
        scheme=settings.partition_scheme,
        alpha=settings.alpha,
        seed=settings.seed,
    )
    indices = torch.from_numpy(parts[settings.partition_index])
    return torch.utils.data.TensorDataset(*(t[indices] for t in train.tensors))


def _guess_model(dataset: str) -> str:
    """The data set's default model, probed before joining; empty when there is none."""
    try:
        return default_model_for(dataset)
    except ModelError:
        return ""
