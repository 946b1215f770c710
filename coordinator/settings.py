"""Settings of the coordinator (round manager, REST API) and of the gateway."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedq.config import EnvReader, SettingsError, redact_url
from fedq.plan import DP_MODES, TrainingPlan
from fedq.tls import ServerTls
from proto.codec import CODECS

__all__ = ["MODES", "CoordinatorSettings", "GatewaySettings", "ServiceUrls"]

MODES = ("sync", "async")


@dataclass(frozen=True)
class ServiceUrls:
    """Where the broker and the store are; empty means the embedded stand-ins."""

    amqp_url: str = ""
    redis_url: str = ""
    delivery_limit: int = 5

    def __repr__(self) -> str:
        amqp, redis = redact_url(self.amqp_url), redact_url(self.redis_url)
        return f"ServiceUrls(amqp_url={amqp!r}, redis_url={redis!r})"

    @classmethod
    def from_env(cls, env: EnvReader | None = None) -> ServiceUrls:
        """Read ``FEDQ_AMQP_URL``, ``FEDQ_REDIS_URL`` and ``FEDQ_DELIVERY_LIMIT``."""
        env = env or EnvReader()
        return cls(
            amqp_url=env.str("AMQP_URL", ""),
            redis_url=env.str("REDIS_URL", ""),
            delivery_limit=env.int("DELIVERY_LIMIT", 5, minimum=1),
        )


@dataclass(frozen=True)
class GatewaySettings:
    """The gRPC gateway."""

    host: str = "127.0.0.1"
    port: int = 50051
    max_update_bytes: int = 0  # 0: derived from the model (its float32 size plus slack)
    max_abs_value: float = 1e3
    max_examples: int = 1_000_000
    chunk_bytes: int = 1 << 20
    poll_s: float = 0.2
    metrics_port: int = 0
    tls: ServerTls = field(default_factory=ServerTls)
    max_message_bytes: int = 16 << 20  # larger updates are queued as several messages

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"FEDQ_GRPC_PORT={self.port}: expected a port number")
        if not 64 << 10 <= self.max_message_bytes <= 128 << 20:
            raise SettingsError(
                f"FEDQ_MAX_MESSAGE_BYTES={self.max_message_bytes}: expected 64 KiB to 128 MiB "
                "(RabbitMQ's default max_message_size is 128 MiB)"
            )
        if self.chunk_bytes < 1024 or self.chunk_bytes > 3 << 20:
            raise SettingsError(f"FEDQ_CHUNK_BYTES={self.chunk_bytes}: expected 1 KiB to 3 MiB")

    @classmethod
    def from_env(cls, env: EnvReader | None = None) -> GatewaySettings:
        """Read ``FEDQ_GRPC_*`` and the upload bounds."""
        env = env or EnvReader()
        return cls(
            host=env.str("GRPC_HOST", "0.0.0.0"),
            port=env.int("GRPC_PORT", 50051, minimum=0),
            max_update_bytes=env.int("MAX_UPDATE_BYTES", 0, minimum=0),
            max_abs_value=env.float("MAX_ABS_VALUE", 1e3, minimum=1e-6),
            max_examples=env.int("MAX_EXAMPLES", 1_000_000, minimum=1),
            chunk_bytes=env.int("CHUNK_BYTES", 1 << 20, minimum=1024),
            poll_s=env.float("POLL_S", 0.2, minimum=0.01, maximum=10),
            metrics_port=env.int("METRICS_PORT", 9100, minimum=0),
            tls=ServerTls(
                cert=env.str("TLS_CERT", ""),
                key=env.str("TLS_KEY", ""),
                client_ca=env.str("TLS_CLIENT_CA", ""),
            ),
            max_message_bytes=env.int("MAX_MESSAGE_BYTES", 16 << 20, minimum=64 << 10),
        )


@dataclass(frozen=True)
class CoordinatorSettings:
    """The round manager and the REST API."""

    dataset: str = "mnist"
    model: str = ""  # empty: the dataset's default model
    data_dir: str = ""
    rounds: int = 5
    clients_per_round: int = 10
    min_clients: int = 0  # 0: clients_per_round
    quorum_fraction: float = 0.8
    round_timeout_s: float = 300.0
    max_extensions: int = 1
    client_timeout_s: float = 60.0
    plan: TrainingPlan = field(default_factory=lambda: TrainingPlan(round=0))
    delta: float = 1e-5
    epsilon_budget: float = 10.0
    accountant: str = "rdp"
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    admin_token: str = ""
    seed: int = 0
    evaluate: bool = True
    leader_ttl_s: float = 10.0
    client_fraction: float = 0.0  # > 0: select this share of live clients per round
    adaptive_plans: bool = True
    min_local_steps: int = 1
    max_local_steps: int = 0  # 0: the plan's local_steps
    plan_safety: float = 0.5
    mode: str = "sync"
    async_buffer: int = 0  # 0: clients_per_round
    async_max_staleness: int = 4
    server_learning_rate: float = 1.0
    server_momentum: float = 0.0
    sample_rate: float = 0.0  # > 0: every client's Poisson rate; 0: from the plan's batch size

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.clients_per_round < 1:
            raise SettingsError("FEDQ_ROUNDS and FEDQ_CLIENTS_PER_ROUND must be at least 1")
        if not 0 <= self.client_fraction <= 1:
            raise SettingsError(f"FEDQ_CLIENT_FRACTION={self.client_fraction}: expected [0, 1]")
        if self.max_local_steps and self.max_local_steps < self.min_local_steps:
            raise SettingsError(
                f"FEDQ_MAX_LOCAL_STEPS={self.max_local_steps} is below "
                f"FEDQ_MIN_LOCAL_STEPS={self.min_local_steps}"
            )
        if not 0 < self.plan_safety <= 1:
            raise SettingsError(f"FEDQ_PLAN_SAFETY={self.plan_safety}: expected (0, 1]")
        if self.mode not in MODES:
            raise SettingsError(f"FEDQ_MODE={self.mode!r}: expected one of {', '.join(MODES)}")
        if not 0 < self.quorum_fraction <= 1:
            raise SettingsError(f"FEDQ_QUORUM_FRACTION={self.quorum_fraction}: expected (0, 1]")
        if not 0 <= self.sample_rate <= 1:
            raise SettingsError(f"FEDQ_SAMPLE_RATE={self.sample_rate}: expected [0, 1]")
        if not self.server_learning_rate > 0:
            raise SettingsError(
                f"FEDQ_SERVER_LEARNING_RATE={self.server_learning_rate}: expected a number > 0"
            )
        if not 0 <= self.server_momentum < 1:
            raise SettingsError(f"FEDQ_SERVER_MOMENTUM={self.server_momentum}: expected [0, 1)")
        if not 0 < self.delta < 1:
            raise SettingsError(f"FEDQ_DELTA={self.delta}: expected a number in (0, 1)")

    def __repr__(self) -> str:
        token = "***" if self.admin_token else ""
        return (
            f"CoordinatorSettings(dataset={self.dataset!r}, rounds={self.rounds}, "
            f"admin_token={token!r})"
        )

    @property
    def start_clients(self) -> int:
        """Clients that must have joined before round 1 opens."""
        return self.min_clients or self.clients_per_round

    @property
    def max_steps(self) -> int:
        """Most local steps an adapted plan may ask for."""
        return self.max_local_steps or max(self.plan.local_steps, self.min_local_steps)

    @property
    def buffer_size(self) -> int:
        """Accepted updates that make one model version in asynchronous mode."""
        return self.async_buffer or self.clients_per_round

    def participants_for(self, live: int) -> int:
        """How many of ``live`` clients a round selects."""
        if self.client_fraction > 0:
            return max(1, math.ceil(self.client_fraction * live))
        return self.clients_per_round

    @classmethod
    def from_env(cls, env: EnvReader | None = None) -> CoordinatorSettings:
        """Read every ``FEDQ_*`` setting of the coordinator."""
        env = env or EnvReader()
        try:
            plan = TrainingPlan(
                round=0,
                dp_mode=env.str("DP_MODE", "sample", choices=DP_MODES),
                noise_multiplier=env.float("NOISE_MULTIPLIER", 1.0, minimum=0.0),
                clip_norm=env.float("CLIP_NORM", 1.0, minimum=1e-9),
                batch_size=env.int("BATCH_SIZE", 64, minimum=1),
                local_steps=env.int("LOCAL_STEPS", 50, minimum=1),
                learning_rate=env.float("LEARNING_RATE", 0.5, minimum=1e-9),
                fedprox_mu=env.float("FEDPROX_MU", 0.0, minimum=0.0),
                codec=env.str("CODEC", "q8", choices=CODECS),
                secure_rng=env.bool("SECURE_RNG", False),
            )
        except ValueError as exc:
            if isinstance(exc, SettingsError):
                raise
            raise SettingsError(f"training plan settings: {exc}") from exc

        return cls(
            dataset=env.str("DATASET", "mnist"),
            model=env.str("MODEL", ""),
            data_dir=env.str("DATA_DIR", ""),
            rounds=env.int("ROUNDS", 5, minimum=1),
            clients_per_round=env.int("CLIENTS_PER_ROUND", 10, minimum=1),
            min_clients=env.int("MIN_CLIENTS", 0, minimum=0),
            quorum_fraction=env.float("QUORUM_FRACTION", 0.8, minimum=0.01, maximum=1.0),
            round_timeout_s=env.float("ROUND_TIMEOUT_S", 300.0, minimum=0.1),
            max_extensions=env.int("MAX_EXTENSIONS", 1, minimum=0),
            client_timeout_s=env.float("CLIENT_TIMEOUT_S", 60.0, minimum=1.0),
            plan=plan,
            delta=env.float("DELTA", 1e-5, minimum=1e-12, maximum=0.5),
            epsilon_budget=env.float("EPSILON_BUDGET", 10.0, minimum=1e-6),
            accountant=env.str("ACCOUNTANT", "rdp", choices=("rdp", "prv")),
            api_host=env.str("API_HOST", "0.0.0.0"),
            api_port=env.int("API_PORT", 8080, minimum=0),
            admin_token=env.str("ADMIN_TOKEN", ""),
            seed=env.int("SEED", 0, minimum=0),
            evaluate=env.bool("EVALUATE", True),
            leader_ttl_s=env.float("LEADER_TTL_S", 10.0, minimum=0.5, maximum=600),
            client_fraction=env.float("CLIENT_FRACTION", 0.0, minimum=0.0, maximum=1.0),
            adaptive_plans=env.bool("ADAPTIVE_PLANS", True),
            min_local_steps=env.int("MIN_LOCAL_STEPS", 1, minimum=1),
            max_local_steps=env.int("MAX_LOCAL_STEPS", 0, minimum=0),
            plan_safety=env.float("PLAN_SAFETY", 0.5, minimum=0.01, maximum=1.0),
            mode=env.str("MODE", "sync", choices=MODES),
            async_buffer=env.int("ASYNC_BUFFER", 0, minimum=0),
            async_max_staleness=env.int("ASYNC_MAX_STALENESS", 4, minimum=0),
            server_learning_rate=env.float("SERVER_LEARNING_RATE", 1.0, minimum=1e-9),
            server_momentum=env.float("SERVER_MOMENTUM", 0.0, minimum=0.0, maximum=0.999),
            sample_rate=env.float("SAMPLE_RATE", 0.0, minimum=0.0, maximum=1.0),
        )
