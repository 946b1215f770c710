"""Property-based fuzzing of the three edges that parse untrusted input.

- the update codec: arbitrary and mutated payloads raise ``CodecError`` and nothing
  else, quickly, without allocating beyond the caller's bound;
- the gateway over real gRPC: malformed messages and broken chunk sequences end with a
  clear non-OK status, only valid uploads are acknowledged or queued, and the gateway
  keeps serving;
- the REST API: malformed query parameters and bodies get a 4xx JSON error, never 500.

How many cases each target tried is written to ``benchmarks/results/fuzz_cases.json``.
"""

from __future__ import annotations

import hashlib
import json
import time
import tracemalloc
from collections import Counter
from typing import Any
from urllib.parse import quote

import grpc
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.api import create_app
from coordinator.privacy import PrivacyLedger
from coordinator.settings import CoordinatorSettings
from fedq.queue.memory import MemoryQueue
from fedq.state import RoundStore
from fedq.state.rounds import FederationRecord
from fedq.tensors import ModelSpec
from proto import fedq_v1_pb2 as pb
from proto.codec import CODECS, CodecError, decode_tensors, encode_tensors, validate_update
from tests.conftest import REPO_ROOT
from tests.support import as_stream, small_model, start_stack, update_for

CASES: Counter[str] = Counter()
RESULTS = REPO_ROOT / "benchmarks" / "results" / "fuzz_cases.json"
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module", autouse=True)
def _record_case_counts():
    """Write how many cases each target tried, merged with earlier runs' other targets."""
    yield
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    previous.update(CASES)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(dict(sorted(previous.items())), indent=2) + "\n")
    print("fuzz cases:", dict(CASES))


# -- the codec ---------------------------------------------------------------------------

SPEC = ModelSpec.from_arrays(small_model())
MAX_BYTES = SPEC.update_nbytes
VALID = {codec: encode_tensors(update_for(small_model(), seed=1), codec=codec) for codec in CODECS}

odd_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=40),
    st.lists(st.integers(min_value=-(2**63), max_value=2**64 - 1), max_size=40),
    st.lists(st.booleans(), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**63 - 1), max_size=3),
)
field_values = {
    "name": st.one_of(st.sampled_from(["layer.weight", "layer.bias", "steps", ""]), odd_values),
    "dtype": st.one_of(
        st.sampled_from(["float32", "float64", "int64", "uint8", "object", "<f4", "V8", "U3"]),
        odd_values,
    ),
    "shape": st.one_of(
        st.lists(st.integers(min_value=-2, max_value=2**63), max_size=70),
        st.lists(st.sampled_from([0, 1, 8, 2**31, 2**62, 2**63]), max_size=40),
        odd_values,
    ),
    "nbytes": st.one_of(st.sampled_from([0, 32, 128, 2**40, 2**63, -1]), odd_values),
    "compression": st.one_of(st.sampled_from([*CODECS, "zstd", "pickle"]), odd_values),
    "data": st.one_of(st.binary(max_size=300), odd_values),
    "block": st.one_of(st.sampled_from([0, 1, 63, 64, 4096, 1 << 21]), odd_values),
}


def _decode_and_validate(payload: bytes) -> None:
    """Decode and check like the gateway does: only CodecError, bounded time and memory."""
    CASES["codec"] += 1
    started = time.monotonic()
    tracemalloc.start()
    try:
        tensors = decode_tensors(payload, max_bytes=MAX_BYTES, expected=SPEC)
        validate_update(tensors, SPEC, max_abs_value=1e3)
    except CodecError as exc:
        assert str(exc)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.monotonic() - started < 5.0
    assert peak <= 4 * len(payload) + 4 * MAX_BYTES + (256 << 10), f"{peak} bytes traced"


@FUZZ
@given(payload=st.binary(max_size=2048))
def test_arbitrary_bytes_raise_only_codec_errors(payload):
    _decode_and_validate(payload)


@FUZZ
@given(
    codec=st.sampled_from(CODECS),
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 7)), max_size=8),
    cut=st.one_of(st.none(), st.integers(min_value=0)),
)
def test_bit_flipped_and_truncated_payloads_raise_only_codec_errors(codec, flips, cut):
    payload = bytearray(VALID[codec])
    for position, bit in flips:
        payload[position % len(payload)] ^= 1 << bit
    if cut is not None:
        payload = payload[: cut % len(payload)]

    _decode_and_validate(bytes(payload))


@FUZZ
@given(
    codec=st.sampled_from(CODECS),
    changes=st.lists(
        st.tuples(st.integers(0, 3), st.sampled_from(sorted(field_values)), st.data()),
        min_size=1,
        max_size=3,
    ),
    envelope_change=st.one_of(
        st.none(),
        st.tuples(st.sampled_from(["format", "version", "tensors", "extra"]), odd_values),
    ),
)
def test_envelopes_with_wrong_fields_raise_only_codec_errors(codec, changes, envelope_change):
    envelope = msgpack.unpackb(VALID[codec])
    records = envelope["tensors"]
    for index, name, data in changes:
        record = records[index % len(records)]
        record[name] = data.draw(field_values[name])
    if envelope_change is not None:
        envelope[envelope_change[0]] = envelope_change[1]

    _decode_and_validate(msgpack.packb(envelope))


@FUZZ
@given(
    codec=st.sampled_from(CODECS),
    value=st.sampled_from([np.nan, np.inf, -np.inf, 1e30, -3e3]),
    where=st.integers(min_value=0),
)
def test_non_finite_and_huge_values_are_refused(codec, value, where):
    update = update_for(small_model(), seed=2)
    update["layer.weight"].reshape(-1)[where % update["layer.weight"].size] = value

    with pytest.raises(CodecError):
        _decode_and_validate_strict(encode_tensors(update, codec=codec))


def _decode_and_validate_strict(payload: bytes) -> None:
    CASES["codec"] += 1
    tensors = decode_tensors(payload, max_bytes=MAX_BYTES, expected=SPEC)
    validate_update(tensors, SPEC, max_abs_value=1e3)


# -- the gateway -------------------------------------------------------------------------

CLIENTS = ["fa", "fb", "fc"]
SUBMIT = "/fedq.v1.Federation/SubmitUpdate"
# gRPC's client reports this, instead of the gateway's status, when the gateway answers
# while the client is still sending; the gateway's side is checked through its log.
CLIENT_SIDE_ABORT = "Internal error from Core"
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.ALREADY_EXISTS,
}


@pytest.fixture
async def stack(redis, queue):
    s = await start_stack(redis, queue, clients=[*CLIENTS, "keeper"])
    yield s
    await s.close()


@st.composite
def uploads(draw) -> tuple[list[Any], bool, bool]:
    """An upload's parts (or raw bytes), whether it is valid, and whether it may replay."""
    client = draw(st.sampled_from(CLIENTS))
    token_of = draw(st.sampled_from(["own", "other", "forged", "empty"]))
    payload = draw(
        st.one_of(
            st.just("valid"),
            st.sampled_from(["nan", "shape", "dtype", "junk", "q8-nan"]),
        )
    )
    header = {
        "client_id": draw(st.one_of(st.just(client), st.text(max_size=140))),
        "round": draw(st.one_of(st.just(1), st.integers(0, 2**64 - 1))),
        "update_id": draw(
            st.one_of(
                st.just(f"{client}-u"),
                st.from_regex(r"[a-z]{1,8}", fullmatch=True),
                st.text(max_size=140),
            )
        ),
        "num_examples": draw(st.one_of(st.just(10), st.integers(0, 2**64 - 1))),
        "codec": draw(st.one_of(st.sampled_from(CODECS), st.text(max_size=10))),
        "size": draw(st.one_of(st.just("exact"), st.integers(0, 2**64 - 1))),
        "metrics": draw(st.dictionaries(st.text(max_size=8), st.floats(), max_size=3)),
    }
    layout = draw(
        st.sampled_from(
            [
                "ok",
                "no-header",
                "two-headers",
                "after-trailer",
                "no-trailer",
                "truncated",
                "bad-checksum",
                "empty-part",
                "raw-bytes",
            ]
        )
    )
    chunk_bytes = draw(st.sampled_from([7, 64, 1 << 20]))
    raw = draw(st.lists(st.binary(max_size=200), max_size=5))
    valid = (
        token_of == "own"
        and payload == "valid"
        and header["client_id"] == client
        and header["round"] == 1
        and header["update_id"] == f"{client}-u"
        and 1 <= header["num_examples"] <= 1_000_000
        and header["size"] == "exact"
        and layout == "ok"
    )
    # Same client, token and update id as an accepted upload: the gateway answers from the
    # idempotency key alone (what follows the header is never read), as a retry needs.
    replay = (
        token_of == "own"
        and header["client_id"] == client
        and header["round"] == 1
        and header["num_examples"] >= 1
        and header["codec"] in CODECS
        and layout not in ("no-header", "raw-bytes")
    )
    return [client, token_of, payload, header, layout, chunk_bytes, raw], valid, replay


def _payload(kind: str, codec: str, initial: dict[str, np.ndarray]) -> bytes:
    update = update_for(initial, seed=5)
    if kind == "nan":
        update["layer.bias"][3] = np.nan
    elif kind == "shape":
        update["layer.bias"] = np.zeros(9, np.float32)
    elif kind == "dtype":
        update["layer.bias"] = np.zeros(8, np.float64)
    elif kind == "junk":
        return b"\x93not an envelope" * 3
    elif kind == "q8-nan":
        update["layer.weight"][0, 0] = np.inf
        return encode_tensors(update, codec="q8")
    return encode_tensors(update, codec=codec if codec in CODECS else "blosc2")


def _messages(stack, upload: list[Any]) -> list[Any]:
    client, token_of, kind, h, layout, chunk_bytes, raw = upload
    if layout == "raw-bytes":
        return raw
    token = {
        "own": stack.tokens[client],
        "other": next(t for c, t in stack.tokens.items() if c != client),
        "forged": "x" * 43,
        "empty": "",
    }[token_of]
    payload = _payload(kind, h["codec"], stack.initial)
    header = pb.UpdateChunk(
        header=pb.UpdateHeader(
            client_id=h["client_id"],
            token=token,
            round=h["round"],
            update_id=h["update_id"],
            num_examples=h["num_examples"],
            codec=h["codec"],
            total_size=len(payload) if h["size"] == "exact" else h["size"],
            metrics=h["metrics"],
        )
    )
    body = payload[:-5] if layout == "truncated" else payload
    data = [
        pb.UpdateChunk(data=body[i : i + chunk_bytes]) for i in range(0, len(body), chunk_bytes)
    ]
    digest = "0" * 64 if layout == "bad-checksum" else hashlib.sha256(payload).hexdigest()
    trailer = pb.UpdateChunk(trailer=pb.UpdateTrailer(sha256=digest))

    parts = {
        "no-header": [*data, trailer],
        "two-headers": [header, header, *data, trailer],
        "after-trailer": [header, *data, trailer, data[0]],
        "no-trailer": [header, *data],
        "empty-part": [header, pb.UpdateChunk(), *data, trailer],
    }.get(layout, [header, *data, trailer])
    return [p.SerializeToString() for p in parts]


async def test_the_gateway_refuses_malformed_uploads_and_keeps_serving(stack, queue, caplog):
    send = stack.channel.stream_unary(SUBMIT)  # no serializers: messages are raw bytes
    accepted: dict[str, str] = {}

    @FUZZ
    @given(upload=uploads())
    def one_upload(upload):
        pending.append(upload)

    # Hypothesis drives synchronous functions; collect the cases, then send each one.
    pending: list[Any] = []
    one_upload()
    for upload, valid, replay in pending:
        await _send_and_check(stack, send, upload, valid=valid, replay=replay, accepted=accepted)

    keeper = _messages(stack, ["keeper", "own", "valid", _valid_header("keeper"), "ok", 64, []])
    reply = pb.SubmitReply.FromString(await send(as_stream(keeper)))
    assert reply.outcome == pb.SubmitReply.ACCEPTED
    assert (await queue.stats()).ready == len(accepted) + 1
    assert await stack.store.accepted_ids(1) == {*accepted.values(), "keeper-u"}
    failures = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert not failures, [r.getMessage() for r in failures]


def _valid_header(client: str) -> dict[str, Any]:
    return {
        "client_id": client,
        "round": 1,
        "update_id": f"{client}-u",
        "num_examples": 10,
        "codec": "blosc2",
        "size": "exact",
        "metrics": {},
    }


async def _send_and_check(
    stack, send, upload, *, valid: bool, replay: bool, accepted: dict[str, str]
) -> None:
    CASES["gateway"] += 1
    client, update_id = upload[0], upload[3]["update_id"]
    try:
        reply = pb.SubmitReply.FromString(await send(as_stream(_messages(stack, upload))))
    except grpc.aio.AioRpcError as exc:
        if exc.details() == CLIENT_SIDE_ABORT:
            return
        assert exc.code() in REFUSALS, (exc.code(), exc.details(), upload)
        assert exc.details(), upload
        assert not (valid and client not in accepted), (exc.code(), exc.details(), upload)
        return

    if client in accepted:
        assert replay and update_id == accepted[client], (reply, upload)
        assert reply.outcome == pb.SubmitReply.DUPLICATE
    else:
        assert valid, (reply, upload)
        assert reply.outcome == pb.SubmitReply.ACCEPTED
        accepted[client] = update_id


# -- the REST API ------------------------------------------------------------------------

ADMIN = "fuzz-admin-token"
junk = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", "0", "-1", "1e309", "nan", "inf", "-inf", "1.5", "2**64", "0x10", "1,2,"]),
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(str),
)
json_bodies = st.one_of(
    st.binary(max_size=60),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=6,
    ).map(lambda v: json.dumps(v).encode()),
    st.builds(
        lambda v: json.dumps({"epsilon": v}).encode(),
        st.one_of(st.floats(), st.integers(-(2**80), 2**80), st.text(max_size=5)),
    ),
    st.integers(-(10**400), 10**400).map(lambda v: b'{"epsilon": %d}' % v),
)


@pytest.fixture
async def api(redis):
    store = RoundStore(redis)
    arrays = small_model()
    record = FederationRecord(
        model_name="fuzz", dataset="mnist", spec=ModelSpec.from_arrays(arrays), total_rounds=3
    )
    await store.init_federation(record, initial_model=encode_tensors(arrays))
    await store.register_client("fa", num_examples=10, capabilities={})
    queue = MemoryQueue()
    settings = CoordinatorSettings(rounds=3, admin_token=ADMIN, evaluate=False)
    ledger = PrivacyLedger(redis, delta=1e-5, default_budget=10.0)
    yield create_app(store=store, ledger=ledger, queue=queue, settings=settings).test_client()
    await queue.close()


@st.composite
def api_requests(draw) -> tuple[str, str, bytes | None]:
    """A method, a path with a query string, and a body."""
    kind = draw(st.sampled_from(["rounds", "round", "download", "tradeoff", "budget", "privacy"]))
    value = draw(junk)
    q = quote(value, safe="")
    if kind == "rounds":
        return "GET", f"/v1/rounds?limit={q}", None
    if kind == "round":
        return "GET", f"/v1/rounds/{q or '%20'}", None
    if kind == "download":
        fmt = draw(st.sampled_from(["pt", "safetensors", q]))
        return "GET", f"/v1/model/download?format={fmt}&round={q}", None
    if kind == "tradeoff":
        name = draw(
            st.sampled_from(
                ["noise", "sample_rate", "local_steps", "rounds", "delta", "accountant"]
            )
        )
        return "GET", f"/v1/privacy/tradeoff?{name}={q}&rounds=3&local_steps=2", None
    if kind == "privacy":
        return "GET", f"/v1/clients/{q or 'fa'}/privacy", None
    return (
        "PUT",
        f"/v1/clients/{draw(st.sampled_from(['fa', q or 'zz']))}/budget",
        draw(json_bodies),
    )


async def test_the_api_answers_malformed_requests_with_a_json_error(api):
    pending: list[tuple[str, str, bytes | None]] = []

    @FUZZ
    @given(request=api_requests())
    def one_request(request):
        pending.append(request)

    one_request()
    for method, path, body in pending:
        CASES["api"] += 1
        headers = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"}
        response = await api.open(path, method=method, data=body, headers=headers)

        # 503 only says a shared backing service was slow to answer; 500 would be a bug.
        assert response.status_code in (*range(200, 500), 503), (method, path, body, response)
        if response.status_code >= 400:
            answer = await response.get_json()
            assert isinstance(answer, dict) and isinstance(answer.get("error"), str), answer
