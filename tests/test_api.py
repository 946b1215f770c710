"""REST API over a federation seeded in the real Redis and the in-process queue."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import os
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from quart import Quart
from redis.asyncio import Redis
from safetensors.torch import load as load_safetensors

from coordinator.api import ApiServer, create_app
from coordinator.privacy import PrivacyLedger, tradeoff_table
from coordinator.settings import CoordinatorSettings
from fedq.models import build_model, model_arrays
from fedq.plan import TrainingPlan
from fedq.queue import QueueUnavailableError
from fedq.queue.memory import MemoryQueue
from fedq.state import RoundRecord, RoundStore, StoreUnavailableError, connect_redis
from fedq.state.rounds import FederationRecord, reset_federation
from fedq.tensors import ModelSpec
from proto.codec import encode_tensors
from tests.conftest import _unavailable

REDIS_URL = os.environ.get("FEDQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_TOKEN = "test-admin-token"
DELTA = 1e-5
PLAN = TrainingPlan(round=0, noise_multiplier=1.0, sample_rate=0.01, local_steps=50)
CLIENTS = ("client-a", "client-b", "client-c")


@dataclass
class Seeded:
    """What the seeded federation holds, to compare API answers against."""

    store: RoundStore
    ledger: PrivacyLedger
    queue: MemoryQueue
    models: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    """The real Redis, wiped of ``fedq:*`` keys before and after the test."""
    try:
        client = await connect_redis(REDIS_URL)
    except StoreUnavailableError as exc:
        _unavailable(f"Redis ({exc})")

    await reset_federation(client)
    yield client
    await reset_federation(client)
    await client.aclose()


@pytest.fixture
async def seeded(redis: Redis) -> AsyncIterator[Seeded]:
    """Three rounds (two evaluated), three clients, ledger charges and a busy queue."""
    queue = MemoryQueue()
    state = Seeded(
        store=RoundStore(redis),
        ledger=PrivacyLedger(redis, delta=DELTA, default_budget=10.0),
        queue=queue,
    )
    await seed_federation(state)
    consumers = await occupy_queue(queue)

    yield state

    for consumer in consumers:
        await consumer.aclose()
    await queue.close()


@pytest.fixture
def make_app(seeded: Seeded) -> Callable[..., Quart]:
    """Build the app over the seeded state with settings changed as asked."""

    def build(**changes: object) -> Quart:
        settings = CoordinatorSettings(
            **{"rounds": 5, "delta": DELTA, "plan": PLAN, "admin_token": ADMIN_TOKEN, **changes}
        )
        return create_app(
            store=seeded.store, ledger=seeded.ledger, queue=seeded.queue, settings=settings
        )

    return build


@pytest.fixture
def client(make_app: Callable[..., Quart]):
    return make_app().test_client()


async def seed_federation(state: Seeded) -> None:
    """Write the federation, its models, rounds, clients and ε charges."""
    arrays = _initial_arrays()
    record = FederationRecord(
        model_name="mnist_cnn", dataset="mnist", spec=ModelSpec.from_arrays(arrays), total_rounds=5
    )
    await state.store.init_federation(record, initial_model=encode_tensors(arrays))
    state.models[1] = arrays
    for round_id in (2, 3):
        shifted = {
            name: a + np.asarray(0.01 * round_id, dtype=a.dtype) for name, a in arrays.items()
        }
        await state.store.put_model(round_id, encode_tensors(shifted))
        state.models[round_id] = shifted

    now = time.time()
    for client_id in CLIENTS:
        await state.store.register_client(client_id, num_examples=600, capabilities={})
    metrics = {1: (0.81, 0.62), 2: (0.87, 0.41), 3: (None, None)}
    for round_id, (accuracy, loss) in metrics.items():
        await state.store.put_round(
            RoundRecord(
                round=round_id,
                status="finalized" if accuracy else "open",
                opened_at=now - 60,
                deadline=now + 240,
                target=3,
                quorum=2,
                participants=list(CLIENTS),
                model_digest=await state.store.model_digest(round_id) or "",
                accuracy=accuracy,
                loss=loss,
            )
        )
    await state.store.set_progress(current_round=3, status="running")

    for round_id, done in ((1, 3), (2, 3), (3, 1)):
        for i in range(done):
            await state.store.record_accepted(
                round_id, client_id=CLIENTS[i], update_id=f"u-{round_id}-{i}"
            )
        await state.store.update_round(round_id, aggregated=done if round_id < 3 else 0)
    for client_id, rounds in (("client-a", (1, 2, 3)), ("client-b", (1, 2))):
        for round_id in rounds:
            await state.ledger.charge(client_id, PLAN.with_round(round_id))


async def occupy_queue(queue: MemoryQueue) -> list:
    """Six updates: one dead-lettered, two held by two consumers, three ready."""
    for i in range(6):
        await queue.publish(b"update", message_id=f"m-{i}", headers={})
    consumers = [queue.consume(prefetch=1) for _ in range(3)]
    deliveries = [await c.__anext__() for c in consumers]
    await queue.dead_letter(deliveries[0], reason="malformed")
    await consumers[0].aclose()
    return consumers[1:]


# -- federation and rounds --------------------------------------------------------------


async def test_federation_reports_model_and_progress(client) -> None:
    response = await client.get("/v1/federation")

    assert response.status_code == 200
    body = await response.get_json()
    assert body["model"] == "mnist_cnn"
    assert body["current_round"] == 3
    assert body["status"] == "running"


async def test_federation_is_404_before_one_exists(client, seeded: Seeded) -> None:
    await reset_federation(seeded.store.redis)

    response = await client.get("/v1/federation")

    assert response.status_code == 404
    assert "no federation" in (await response.get_json())["error"]


async def test_rounds_are_listed_in_order_with_counts_and_metrics(client) -> None:
    response = await client.get("/v1/rounds")

    body = await response.get_json()
    assert [r["round"] for r in body["rounds"]] == [1, 2, 3]
    first = body["rounds"][0]
    assert first["status"] == "finalized"
    assert first["updates_received"] == 3 and first["updates_aggregated"] == 3
    assert first["test_accuracy"] == 0.81 and first["test_loss"] == 0.62
    assert body["rounds"][2]["test_accuracy"] is None


async def test_rounds_limit_keeps_the_latest_rounds(client) -> None:
    response = await client.get("/v1/rounds?limit=2")

    assert [r["round"] for r in (await response.get_json())["rounds"]] == [2, 3]


async def test_rounds_limit_below_one_is_refused_naming_limit(client) -> None:
    response = await client.get("/v1/rounds?limit=0")

    assert response.status_code == 400
    assert "limit" in (await response.get_json())["error"]


async def test_one_round_has_participants_counts_and_deadline(client, seeded: Seeded) -> None:
    response = await client.get("/v1/rounds/3")

    assert response.status_code == 200
    body = await response.get_json()
    assert body == (await seeded.store.round(3)).to_public()
    assert body["participants"] == list(CLIENTS)
    assert body["updates_received"] == 1 and body["deadline"] > time.time()


async def test_an_unknown_round_is_404(client) -> None:
    response = await client.get("/v1/rounds/99")

    assert response.status_code == 404
    assert "round 99" in (await response.get_json())["error"]


@pytest.mark.parametrize("raw", ["abc", "0", "-1", "1.5"])
async def test_a_round_that_is_not_a_positive_integer_is_400(client, raw: str) -> None:
    response = await client.get(f"/v1/rounds/{raw}")

    assert response.status_code == 400
    assert "round" in (await response.get_json())["error"]


# -- model ------------------------------------------------------------------------------


async def test_model_metadata_names_the_latest_round_and_its_digest(client, seeded: Seeded) -> None:
    response = await client.get("/v1/model")

    body = await response.get_json()
    assert body["round"] == 3
    assert body["digest"] == await seeded.store.model_digest(3)
    assert body["model"] == "mnist_cnn"
    assert [t["name"] for t in body["tensors"]] == list(seeded.models[3])
    assert body["parameters"] == sum(a.size for a in seeded.models[3].values())


@pytest.mark.parametrize("query, round_id", [("?round=1", 1), ("", 3), ("?round=2&format=pt", 2)])
async def test_model_download_loads_with_torch_and_equals_the_stored_arrays(
    client, seeded: Seeded, query: str, round_id: int
) -> None:
    response = await client.get(f"/v1/model/download{query}")

    assert response.status_code == 200
    disposition = response.headers["Content-Disposition"]
    assert f'filename="fedq-round-{round_id}.pt"' in disposition
    state = torch.load(io.BytesIO(await response.get_data()), weights_only=True)
    _assert_same_arrays(state, seeded.models[round_id])


async def test_safetensors_download_equals_the_stored_arrays(client, seeded: Seeded) -> None:
    response = await client.get("/v1/model/download?round=2&format=safetensors")

    assert response.status_code == 200
    assert "fedq-round-2.safetensors" in response.headers["Content-Disposition"]
    state = load_safetensors(await response.get_data())
    _assert_same_arrays(state, seeded.models[2], ordered=False)


async def test_model_download_of_a_round_without_model_is_404(client) -> None:
    response = await client.get("/v1/model/download?round=42")

    assert response.status_code == 404
    assert "round 42" in (await response.get_json())["error"]


async def test_model_download_in_an_unknown_format_is_400(client) -> None:
    response = await client.get("/v1/model/download?format=onnx")

    assert response.status_code == 400
    assert "format" in (await response.get_json())["error"]


# -- clients and budgets ----------------------------------------------------------------


async def test_clients_are_listed_with_epsilon_spent_and_budget(client, seeded: Seeded) -> None:
    response = await client.get("/v1/clients")

    rows = {row["client_id"]: row for row in (await response.get_json())["clients"]}
    assert sorted(rows) == list(CLIENTS)
    assert rows["client-a"]["epsilon_spent"] == pytest.approx(await seeded.ledger.spent("client-a"))
    assert rows["client-a"]["epsilon_spent"] > rows["client-b"]["epsilon_spent"] > 0
    assert rows["client-c"]["epsilon_spent"] == 0.0
    assert rows["client-c"]["remaining"] == rows["client-c"]["epsilon_budget"] == 10.0
    assert rows["client-a"]["num_examples"] == 600 and rows["client-a"]["last_seen"] > 0


async def test_client_privacy_lists_its_charges(client, seeded: Seeded) -> None:
    response = await client.get("/v1/clients/client-b/privacy")

    body = await response.get_json()
    assert [c["round"] for c in body["history"]] == [1, 2]
    assert body["epsilon_spent"] == pytest.approx(await seeded.ledger.spent("client-b"))
    assert body["remaining"] == pytest.approx(10.0 - body["epsilon_spent"])


async def test_privacy_of_an_unknown_client_is_404(client) -> None:
    response = await client.get("/v1/clients/nobody/privacy")

    assert response.status_code == 404
    assert "nobody" in (await response.get_json())["error"]


async def test_budget_change_without_a_token_is_401(client) -> None:
    response = await client.put("/v1/clients/client-a/budget", json={"epsilon": 20.0})

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "Bearer" in (await response.get_json())["error"]


async def test_budget_change_with_a_wrong_token_is_403(client) -> None:
    response = await client.put(
        "/v1/clients/client-a/budget", json={"epsilon": 20.0}, headers=_auth("not-the-token")
    )

    assert response.status_code == 403
    assert "does not match" in (await response.get_json())["error"]


async def test_budget_endpoints_are_disabled_without_an_admin_token(make_app) -> None:
    client = make_app(admin_token="").test_client()

    put = await client.put(
        "/v1/clients/client-a/budget", json={"epsilon": 20.0}, headers=_auth("anything")
    )
    delete = await client.delete("/v1/clients/client-a/budget")

    for response in (put, delete):
        assert response.status_code == 403
        assert (await response.get_json())["error"] == ("admin API disabled: set FEDQ_ADMIN_TOKEN")


async def test_budget_set_by_admin_shows_in_privacy_and_delete_restores_default(client) -> None:
    put = await client.put(
        "/v1/clients/client-a/budget", json={"epsilon": 25.5}, headers=_auth(ADMIN_TOKEN)
    )

    assert put.status_code == 200
    privacy = await (await client.get("/v1/clients/client-a/privacy")).get_json()
    assert privacy["epsilon_budget"] == 25.5
    assert privacy["remaining"] == pytest.approx(25.5 - privacy["epsilon_spent"])

    delete = await client.delete("/v1/clients/client-a/budget", headers=_auth(ADMIN_TOKEN))

    assert delete.status_code == 200
    assert (await delete.get_json())["epsilon_budget"] == 10.0


@pytest.mark.parametrize(
    "body, message",
    [
        ("{not json", "body must be JSON"),
        ('{"eps": 3}', '"epsilon"'),
        ('{"epsilon": "3"}', "epsilon must be a number"),
        ('{"epsilon": 0}', "epsilon must be a finite number > 0"),
        ('{"epsilon": -2.5}', "epsilon must be a finite number > 0"),
        ('{"epsilon": NaN}', "epsilon must be a finite number > 0"),
    ],
)
async def test_a_malformed_budget_is_400_with_a_message(client, body: str, message: str) -> None:
    response = await client.put(
        "/v1/clients/client-a/budget",
        data=body,
        headers={**_auth(ADMIN_TOKEN), "Content-Type": "application/json"},
    )

    assert response.status_code == 400
    assert message in (await response.get_json())["error"]


async def test_budget_of_an_unknown_client_is_404(client) -> None:
    response = await client.put(
        "/v1/clients/nobody/budget", json={"epsilon": 5.0}, headers=_auth(ADMIN_TOKEN)
    )

    assert response.status_code == 404


# -- privacy trade-off ------------------------------------------------------------------


async def test_tradeoff_table_equals_the_accountant(client) -> None:
    response = await client.get(
        "/v1/privacy/tradeoff?noise=0.8,1.0,1.5&sample_rate=0.01"
        "&local_steps=50&rounds=10&delta=1e-5&accountant=rdp"
    )

    assert response.status_code == 200
    expected = tradeoff_table(
        [0.8, 1.0, 1.5], sample_rate=0.01, local_steps=50, rounds=10, delta=1e-5, accountant="rdp"
    )
    assert (await response.get_json())["table"] == expected


async def test_tradeoff_defaults_to_the_configured_plan(client) -> None:
    response = await client.get("/v1/privacy/tradeoff")

    expected = tradeoff_table(
        [PLAN.noise_multiplier],
        sample_rate=PLAN.sample_rate,
        local_steps=PLAN.local_steps,
        rounds=5,
        delta=DELTA,
    )
    assert (await response.get_json())["table"] == expected


@pytest.mark.parametrize(
    "query, name",
    [
        ("noise=0.8,abc", "noise"),
        ("noise=0", "noise"),
        ("sample_rate=1.5", "sample_rate"),
        ("local_steps=x", "local_steps"),
        ("delta=1", "delta"),
        ("accountant=foo", "accountant"),
    ],
)
async def test_a_malformed_tradeoff_parameter_is_400_naming_it(
    client, query: str, name: str
) -> None:
    response = await client.get(f"/v1/privacy/tradeoff?{query}")

    assert response.status_code == 400
    assert (await response.get_json())["error"].startswith(name)


# -- queue, health, metrics, dashboard --------------------------------------------------


async def test_queue_reports_depth_consumers_backlog_and_dead_letters(client) -> None:
    response = await client.get("/v1/queue")

    assert await response.get_json() == {
        "ready": 3,
        "consumers": 2,
        "backlog_per_worker": 1.5,
        "dead": 1,
    }


async def test_metrics_export_shared_queue_and_epsilon_metrics(client) -> None:
    response = await client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = (await response.get_data()).decode()
    assert "fedq_updates_accepted_total" in text
    assert "fedq_queue_depth 3.0" in text
    assert 'fedq_epsilon_spent{client_id="client-a"}' in text


async def test_health_and_readiness_pass_with_redis_and_queue_up(client) -> None:
    health = await client.get("/healthz")
    ready = await client.get("/readyz")

    assert (health.status_code, await health.get_json()) == (200, {"status": "ok"})
    assert ready.status_code == 200
    assert (await ready.get_json())["checks"] == {"redis": "ok", "queue": "ok"}


async def test_readiness_is_503_naming_the_failed_queue(seeded: Seeded) -> None:
    app = create_app(
        store=seeded.store,
        ledger=seeded.ledger,
        queue=_BrokenQueue(),
        settings=CoordinatorSettings(),
    )

    response = await app.test_client().get("/readyz")

    assert response.status_code == 503
    body = await response.get_json()
    assert body["checks"] == {"redis": "ok", "queue": "error"}
    assert "queue unavailable" in body["error"]


async def test_queue_endpoint_is_503_when_the_broker_fails(seeded: Seeded) -> None:
    app = create_app(
        store=seeded.store,
        ledger=seeded.ledger,
        queue=_BrokenQueue(),
        settings=CoordinatorSettings(),
    )

    response = await app.test_client().get("/v1/queue")

    assert response.status_code == 503
    assert "broker unavailable" in (await response.get_json())["error"]


async def test_dashboard_page_and_its_script_are_served(client) -> None:
    page = await client.get("/")
    script = await client.get("/static/dashboard.js")

    html = (await page.get_data()).decode()
    assert page.status_code == 200 and page.mimetype == "text/html"
    for element_id in ("current-round", "latest-accuracy", "queue-ready", "dead-letters"):
        assert f'id="{element_id}"' in html
    assert script.status_code == 200 and b"/v1/rounds" in await script.get_data()


async def test_an_unknown_endpoint_answers_json_404(client) -> None:
    response = await client.get("/v1/nothing-here")

    assert response.status_code == 404
    assert "no such endpoint" in (await response.get_json())["error"]


async def test_server_on_port_zero_serves_on_the_port_it_reports(seeded: Seeded) -> None:
    server = ApiServer(
        host="127.0.0.1",
        port=0,
        store=seeded.store,
        ledger=seeded.ledger,
        queue=seeded.queue,
        settings=CoordinatorSettings(),
    )

    port = await server.start()
    body = await asyncio.to_thread(_get_json, f"http://127.0.0.1:{port}/v1/federation")
    await server.stop()
    await server.stop()

    assert port == server.port > 0
    assert body["current_round"] == 3


# -- helpers ----------------------------------------------------------------------------


@functools.cache
def _initial_arrays() -> dict[str, np.ndarray]:
    return model_arrays(build_model("mnist_cnn", seed=0))


class _BrokenQueue(MemoryQueue):
    async def stats(self):
        raise QueueUnavailableError("broker connection lost")


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _assert_same_arrays(
    state: dict[str, torch.Tensor], arrays: dict[str, np.ndarray], *, ordered: bool = True
) -> None:
    # safetensors stores tensors by size and dtype, so only a torch state dict keeps order.
    assert list(state) == list(arrays) if ordered else sorted(state) == sorted(arrays)
    for name, array in arrays.items():
        assert state[name].dtype == torch.from_numpy(array).dtype
        np.testing.assert_array_equal(state[name].numpy(), array)
