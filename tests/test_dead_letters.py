"""Dead letters on the real RabbitMQ: poison updates, delivery limits, REST and CLI operations."""

from __future__ import annotations

import asyncio
import io
import time

import pytest

from coordinator.api import ApiServer, create_app
from coordinator.privacy import PrivacyLedger
from coordinator.settings import CoordinatorSettings
from fedq.admin_cli import run_dead_letters
from fedq.cli import _parser
from fedq.queue.amqp import AmqpQueue
from fedq.queue.base import ALL_DEAD_LETTERS, REASON_HEADER, REQUEUED_HEADER
from fedq.queue.memory import MemoryQueue
from fedq.queue.message import QueuedUpdate
from fedq.state import RoundStore
from fedq.tasks import cancel_and_wait
from tests.support import start_stack, submit, update_for
from workers import AggregationWorker, WorkerSettings

ADMIN = "dead-letter-admin"
POISON = b"\xc1 this is not msgpack"


async def _bury(queue, ids: list[str]) -> None:
    """Publish poison messages and dead-letter them as a worker would."""
    for message_id in ids:
        await queue.publish(POISON, message_id=message_id, headers={"round": 1})
    deliveries = queue.consume(prefetch=len(ids))
    try:
        for _ in ids:
            delivery = await asyncio.wait_for(deliveries.__anext__(), 10)
            await queue.dead_letter(delivery, reason="test: poison")
    finally:
        await deliveries.aclose()


async def _next_update(queue) -> object:
    """The next message on the update queue (acknowledged)."""
    deliveries = queue.consume(prefetch=1)
    try:
        delivery = await asyncio.wait_for(deliveries.__anext__(), 10)
        await delivery.ack()
        return delivery
    finally:
        await deliveries.aclose()


async def _drive_round(stack, redis, queue) -> object:
    settings = WorkerSettings(batch_updates=2, flush_s=0.05)
    task = asyncio.create_task(
        AggregationWorker(queue=queue, redis=redis, settings=settings, name="dl-worker").run()
    )
    try:
        for _ in range(600):  # 30 s at most, for a busy machine
            await stack.manager.tick()
            record = await stack.store.round(1)
            if record.status == "finalized" and await queue.dead_letters(1):
                break
            await asyncio.sleep(0.05)
    finally:
        await cancel_and_wait(task)
    return record


async def test_a_poison_update_is_dead_lettered_with_its_reason_while_the_round_completes(
    redis, queue
):
    stack = await start_stack(redis, queue, clients=["a", "b"])
    try:
        await queue.publish(POISON, message_id="poison-1", headers={"round": 1})
        for i, client_id in enumerate(("a", "b")):
            update = update_for(stack.initial, seed=i)
            await submit(stack, client_id, update, update_id=f"{client_id}-r1")

        record = await _drive_round(stack, redis, queue)
    finally:
        await stack.close()

    assert record.status == "finalized"
    assert record.accepted == record.aggregated == 2
    [letter] = await queue.dead_letters()
    assert letter.message_id == "poison-1" and letter.round == 1
    assert letter.reason.startswith("undecodable message") and letter.size == len(POISON)
    assert letter.dead_at is not None
    detail = await queue.inspect_dead_letter("poison-1")
    assert detail.update["decodable"] is False
    assert detail.headers[REASON_HEADER] == letter.reason
    listed_again = [(d.message_id, d.reason) for d in await queue.dead_letters()]
    assert listed_again == [("poison-1", letter.reason)], "listing must not consume"
    assert abs(letter.dead_at - time.time()) < 60


async def test_an_update_past_the_delivery_limit_is_dead_lettered_by_the_broker(queue):
    update = QueuedUpdate("u-limit", 3, "c", 7, "blosc2", b"payload", accepted_at=1.0)
    await queue.publish(update.encode(), message_id="u-limit", headers={"round": 3})

    deliveries = queue.consume(prefetch=1)
    try:
        for _ in range(10):
            if await queue.dead_letters(1):
                break
            try:
                delivery = await asyncio.wait_for(deliveries.__anext__(), 1.0)
            except TimeoutError:
                continue
            await delivery.nack(requeue=True)
    finally:
        await deliveries.aclose()

    [letter] = await queue.dead_letters()
    assert letter.reason == "delivery_limit"
    assert (letter.message_id, letter.round, letter.client_id) == ("u-limit", 3, "c")
    detail = await queue.inspect_dead_letter("u-limit")
    assert detail.update["update_id"] == "u-limit" and detail.update["num_examples"] == 7


@pytest.fixture(params=["memory", "rabbitmq"])
async def any_queue(request):
    """The same dead-letter contract on the in-process queue and on RabbitMQ."""
    if request.param == "memory":
        chosen = MemoryQueue()
    else:
        chosen = await AmqpQueue.connect(request.getfixturevalue("amqp_url"))
        await chosen.purge_updates()
    yield chosen
    if isinstance(chosen, AmqpQueue):
        await chosen.purge_updates()
    await chosen.close()


async def test_dead_letters_can_be_requeued_and_purged_by_id_or_all(any_queue):
    await _bury(any_queue, ["p-1", "p-2", "p-3"])

    requeued = await any_queue.requeue_dead_letters({"p-1", "ghost"})
    purged = await any_queue.purge_dead_letters({"p-2"})

    assert (requeued.done, requeued.missing) == (["p-1"], ["ghost"])
    assert (purged.done, purged.missing) == (["p-2"], [])
    assert [d.message_id for d in await any_queue.dead_letters()] == ["p-3"]
    again = await _next_update(any_queue)
    assert again.message_id == "p-1" and again.body == POISON
    assert again.headers[REQUEUED_HEADER] == 1 and REASON_HEADER not in again.headers

    everything = await any_queue.purge_dead_letters(ALL_DEAD_LETTERS)
    assert everything.done == ["p-3"] and await any_queue.dead_letters() == []


def _app(redis, queue):
    settings = CoordinatorSettings(admin_token=ADMIN)
    ledger = PrivacyLedger(redis, delta=1e-5, default_budget=10.0)
    return create_app(store=RoundStore(redis), ledger=ledger, queue=queue, settings=settings)


async def test_rest_lists_shows_and_lets_only_the_admin_requeue_or_purge(redis, queue):
    await _bury(queue, ["p-1", "p-2"])
    client = _app(redis, queue).test_client()
    admin = {"Authorization": f"Bearer {ADMIN}"}

    listed = await (await client.get("/v1/dead-letters")).get_json()
    shown = await client.get("/v1/dead-letters/p-1")
    unknown = await client.get("/v1/dead-letters/nope")
    anonymous = await client.post("/v1/dead-letters/requeue", json={"all": True})
    wrong = await client.post(
        "/v1/dead-letters/purge", json={"all": True}, headers={"Authorization": "Bearer x"}
    )
    malformed = [
        (await client.post("/v1/dead-letters/requeue", json=body, headers=admin)).status_code
        for body in ({"ids": []}, {"all": False}, ["p-1"], {"ids": [1]}, {"all": True, "ids": []})
    ]
    requeued = await client.post("/v1/dead-letters/requeue", json={"ids": ["p-1"]}, headers=admin)
    purged = await client.post("/v1/dead-letters/purge", json={"all": True}, headers=admin)

    assert listed["count"] == 2 and [d["id"] for d in listed["dead_letters"]] == ["p-1", "p-2"]
    assert listed["dead_letters"][0]["reason"] == "test: poison"
    body = await shown.get_json()
    assert shown.status_code == 200 and body["headers"][REASON_HEADER] == "test: poison"
    assert body["update"]["decodable"] is False
    assert unknown.status_code == 404
    assert (anonymous.status_code, wrong.status_code) == (401, 403)
    assert malformed == [400] * 5
    assert (await requeued.get_json()) == {"requeued": ["p-1"], "missing": []}
    assert (await purged.get_json()) == {"purged": ["p-2"], "missing": []}
    assert await queue.dead_letters() == []
    assert (await _next_update(queue)).message_id == "p-1"


async def test_cli_talks_to_the_api_and_needs_the_admin_token(redis, queue, monkeypatch):
    monkeypatch.delenv("FEDQ_ADMIN_TOKEN", raising=False)
    await _bury(queue, ["p-1", "p-2"])
    server = ApiServer(
        host="127.0.0.1",
        port=0,
        store=RoundStore(redis),
        ledger=PrivacyLedger(redis, delta=1e-5, default_budget=10.0),
        queue=queue,
        settings=CoordinatorSettings(admin_token=ADMIN),
    )

    async def cli(*argv: str) -> tuple[int, str]:
        out = io.StringIO()
        args = _parser().parse_args(["dead-letters", *argv, "--api", server.url])
        return await run_dead_letters(args, out=out), out.getvalue()

    async with server:
        listed = await cli("list")
        shown = await cli("show", "p-2")
        refused = await cli("purge", "p-1")
        purged = await cli("purge", "p-1", "--admin-token", ADMIN)
        requeued = await cli("requeue", "--all", "--admin-token", ADMIN)

    assert listed[0] == 0 and "p-1" in listed[1] and "test: poison" in listed[1]
    assert shown[0] == 0 and '"decodable": false' in shown[1]
    assert refused[0] == 1
    assert purged == (0, "purged 1: p-1\n")
    assert requeued == (0, "requeued 1: p-2\n")
    assert await queue.dead_letters() == []
    assert (await _next_update(queue)).message_id == "p-2"
