"""The gateway against the real RabbitMQ and Redis: what it accepts and what it refuses."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from fedq.queue.message import QueuedUpdate
from proto import fedq_v1_pb2 as pb
from proto.codec import encode_tensors
from tests.support import as_stream, start_stack, submit, update_for, upload_chunks

CLIENTS = ["alice", "bob", "carol"]


@pytest.fixture
async def stack(redis, queue):
    s = await start_stack(redis, queue, clients=CLIENTS)
    yield s
    await s.close()


def _bad(update: dict[str, np.ndarray], name: str, value: np.ndarray) -> dict[str, np.ndarray]:
    return {**update, name: value}


async def _refused(stack, chunks) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.SubmitUpdate(as_stream(chunks))
    return caught.value


async def test_a_valid_update_is_accepted_and_queued(stack, queue):
    update = update_for(stack.initial, seed=1)

    reply = await submit(stack, "alice", update, update_id="alice-r1")

    assert reply.outcome == pb.SubmitReply.ACCEPTED
    assert (await queue.stats()).ready == 1
    assert await stack.store.is_accepted(1, "alice-r1")


async def test_resubmitting_the_same_update_id_is_a_duplicate_and_queued_once(stack, queue):
    update = update_for(stack.initial, seed=1)
    await submit(stack, "alice", update, update_id="alice-r1")

    again = await submit(stack, "alice", update, update_id="alice-r1")

    assert again.outcome == pb.SubmitReply.DUPLICATE
    assert (await queue.stats()).ready == 1


BAD_TENSORS = {
    "wrong shape": (lambda u: _bad(u, "layer.bias", np.zeros(9, np.float32)), "shape"),
    "wrong dtype": (lambda u: _bad(u, "layer.bias", np.zeros(8, np.float64)), "dtype"),
    "NaN": (lambda u: _bad(u, "layer.bias", np.full(8, np.nan, np.float32)), "NaN"),
    "Inf": (lambda u: _bad(u, "layer.bias", np.full(8, np.inf, np.float32)), "NaN or Inf"),
    "huge value": (lambda u: _bad(u, "layer.bias", np.full(8, 1e9, np.float32)), "exceeds"),
    "missing tensor": (lambda u: {"layer.weight": u["layer.weight"]}, "lacks"),
    "extra tensor": (lambda u: {**u, "other": np.zeros(2, np.float32)}, "does not have"),
}


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
async def test_updates_that_do_not_fit_the_model_are_invalid_argument(stack, queue, case):
    make, expected = BAD_TENSORS[case]
    payload = encode_tensors(make(update_for(stack.initial, seed=2)))
    chunks = upload_chunks(
        client_id="bob",
        token=stack.tokens["bob"],
        round_id=1,
        update_id=f"bad-{case.replace(' ', '-')}",
        payload=payload,
    )

    error = await _refused(stack, chunks)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in error.details()
    assert (await queue.stats()).ready == 0


async def _good_chunks(stack, client="bob", **knobs):
    payload = encode_tensors(update_for(stack.initial, seed=3))
    return upload_chunks(
        client_id=client,
        token=stack.tokens.get(client, "x"),
        round_id=1,
        update_id=f"{client}-r1",
        payload=payload,
        **knobs,
    )


@pytest.mark.parametrize(
    ("knobs", "code", "expected"),
    [
        ({"checksum": "0" * 64}, grpc.StatusCode.DATA_LOSS, "checksum mismatch"),
        ({"drop_tail": 10}, grpc.StatusCode.DATA_LOSS, "truncated"),
        ({"trailer": False}, grpc.StatusCode.DATA_LOSS, "truncated"),
        ({"declared_size": 1 << 40}, grpc.StatusCode.RESOURCE_EXHAUSTED, "at most"),
        ({"codec": "pickle"}, grpc.StatusCode.INVALID_ARGUMENT, "codec"),
        ({"num_examples": 0}, grpc.StatusCode.INVALID_ARGUMENT, "num_examples"),
    ],
    ids=["checksum", "truncated", "no-trailer", "oversize", "codec", "no-examples"],
)
async def test_broken_streams_get_a_clear_status(stack, queue, knobs, code, expected):
    chunks = await _good_chunks(stack, **knobs)

    error = await _refused(stack, chunks)

    assert error.code() == code
    assert expected in error.details()
    assert (await queue.stats()).ready == 0


async def test_a_payload_that_is_not_a_codec_envelope_is_refused(stack):
    chunks = upload_chunks(
        client_id="bob",
        token=stack.tokens["bob"],
        round_id=1,
        update_id="junk",
        payload=b"\x93not msgpack at all",
    )

    error = await _refused(stack, chunks)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "msgpack" in error.details() or "envelope" in error.details()


async def test_an_upload_without_a_header_is_refused(stack):
    error = await _refused(stack, [pb.UpdateChunk(data=b"abc")])

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "header" in error.details()


async def test_unknown_clients_and_wrong_tokens_are_unauthenticated(stack):
    stranger = await _refused(stack, await _good_chunks(stack, client="mallory"))
    stack.tokens["bob"] = "forged-token"
    forged = await _refused(stack, await _good_chunks(stack, client="bob"))

    assert stranger.code() == forged.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "token" in forged.details()


async def test_uploads_to_a_closed_or_unknown_round_fail_precondition(stack):
    await stack.store.update_round(1, status="closing")
    closed = await _refused(stack, await _good_chunks(stack))
    payload = encode_tensors(update_for(stack.initial, seed=4))
    unknown = await _refused(
        stack,
        upload_chunks(
            client_id="bob", token=stack.tokens["bob"], round_id=7, update_id="b7", payload=payload
        ),
    )

    assert closed.code() == unknown.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no longer takes updates" in closed.details()
    assert "does not exist" in unknown.details()


async def test_a_client_cannot_submit_two_different_updates_in_one_round(stack):
    await submit(stack, "carol", update_for(stack.initial, seed=5), update_id="carol-a")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await submit(stack, "carol", update_for(stack.initial, seed=6), update_id="carol-b")

    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "carol-a" in caught.value.details()


async def test_the_gateway_keeps_serving_after_bad_uploads(stack, queue):
    for knobs in ({"checksum": "f" * 64}, {"drop_tail": 3}, {"declared_size": 1 << 33}):
        await _refused(stack, await _good_chunks(stack, **knobs))

    reply = await submit(stack, "bob", update_for(stack.initial, seed=7), update_id="bob-ok")

    assert reply.outcome == pb.SubmitReply.ACCEPTED
    assert (await queue.stats()).ready == 1
    assert await stack.store.accepted_ids(1) == {"bob-ok"}


async def test_fetch_model_resumes_from_an_offset(stack):
    blob, digest = await stack.store.model(1)
    request = pb.FetchModelRequest(
        client_id="alice", token=stack.tokens["alice"], round=1, offset=10
    )

    chunks = [c async for c in stack.stub.FetchModel(request)]

    assert b"".join(c.data for c in chunks) == blob[10:]
    assert chunks[0].digest == digest and chunks[0].offset == 10


async def test_fetch_model_refuses_a_bad_token_and_an_offset_past_the_end(stack):
    bad_token = pb.FetchModelRequest(client_id="alice", token="nope", round=1)
    past_end = pb.FetchModelRequest(
        client_id="alice", token=stack.tokens["alice"], round=1, offset=1 << 30
    )

    with pytest.raises(grpc.aio.AioRpcError) as auth:
        [c async for c in stack.stub.FetchModel(bad_token)]
    with pytest.raises(grpc.aio.AioRpcError) as offset:
        [c async for c in stack.stub.FetchModel(past_end)]

    assert auth.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert offset.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_join_refuses_bad_ids_and_sizes(stack):
    for request in (
        pb.JoinRequest(client_id="bad id!", num_examples=5),
        pb.JoinRequest(client_id="ok", num_examples=0),
        pb.JoinRequest(client_id="ok", num_examples=5, protocol="fedq.v9"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.stub.Join(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_watch_rounds_tells_participants_their_plan(stack):
    request = pb.WatchRequest(client_id="alice", token=stack.tokens["alice"])

    stream = stack.stub.WatchRounds(request)
    first = await stream.read()
    stream.cancel()

    assert first.kind == pb.RoundEvent.OPENED and first.round == 1
    assert first.selected and first.plan.round == 1 and first.plan.dp_mode == "none"


async def test_queued_message_carries_the_update_unchanged(stack, queue):
    update = update_for(stack.initial, seed=8)
    await submit(stack, "alice", update, update_id="alice-msg", num_examples=42)

    delivery = await anext(queue.consume(prefetch=1))
    message = QueuedUpdate.decode(delivery.body)
    await delivery.ack()

    assert (message.update_id, message.round, message.num_examples) == ("alice-msg", 1, 42)
    assert message.payload == encode_tensors(update)
