"""The global model: ``/v1/model`` (metadata) and ``/v1/model/download`` (weights)."""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Any

import numpy as np
import torch
from quart import Blueprint, Response, request
from safetensors.torch import save as save_safetensors

from coordinator.api.context import api_context
from coordinator.api.errors import BadRequestError, NotFoundError
from coordinator.api.rounds import parse_round_id
from fedq.state import RoundStore
from fedq.state.rounds import FederationRecord
from proto.codec import decode_tensors

__all__ = ["FORMATS", "blueprint", "latest_model_round"]

log = logging.getLogger(__name__)

blueprint = Blueprint("model", __name__)

FORMATS = {"pt": ".pt", "safetensors": ".safetensors"}


@blueprint.get("/v1/model")
async def model() -> dict[str, Any]:
    """Round, digest, name, size and tensor specs of the newest global model."""
    store = api_context().store
    federation = await _federation(store)
    round_id = await latest_model_round(store, federation)
    if round_id is None:
        raise NotFoundError("no global model is stored yet")

    spec = federation.spec
    return {
        "round": round_id,
        "digest": await store.model_digest(round_id),
        "model": federation.model_name,
        "dataset": federation.dataset,
        "parameters": spec.update_size,
        "nbytes": sum(t.nbytes for t in spec.tensors),
        "tensors": [
            {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "trainable": t.trainable}
            for t in spec.tensors
        ],
        "download": f"/v1/model/download?round={round_id}",
    }


@blueprint.get("/v1/model/download")
async def download() -> Response:
    """The weights of one round's model as a torch state dict or a safetensors file."""
    fmt = request.args.get("format", "pt")
    if fmt not in FORMATS:
        raise BadRequestError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    store = api_context().store
    federation = await _federation(store)

    raw_round = request.args.get("round")
    if raw_round is None:
        round_id = await latest_model_round(store, federation)
    else:
        round_id = parse_round_id(raw_round, name="round")
    found = await store.model(round_id) if round_id is not None else None
    if found is None:
        raise NotFoundError(f"no model is stored for round {raw_round or 'latest'}")

    blob, digest = found
    max_bytes = sum(t.nbytes for t in federation.spec.tensors)
    # Decompressing and serialising a large model takes a while: keep it off the event loop.
    body = await asyncio.to_thread(_serialise, blob, max_bytes=max_bytes, fmt=fmt)
    log.info("round %d model sent as %s (%d bytes)", round_id, fmt, len(body))

    filename = f"fedq-round-{round_id}{FORMATS[fmt]}"
    return Response(
        body,
        mimetype="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "X-Model-Digest": digest,
        },
    )


async def latest_model_round(store: RoundStore, federation: FederationRecord) -> int | None:
    """The highest round with a stored model, searching down from the current round's next."""
    for round_id in range(federation.current_round + 1, 0, -1):
        if await store.model_digest(round_id) is not None:
            return round_id
    return None


async def _federation(store: RoundStore) -> FederationRecord:
    record = await store.federation()
    if record is None:
        raise NotFoundError("no federation yet, so no model: the coordinator has not created one")
    return record


def _serialise(blob: bytes, *, max_bytes: int, fmt: str) -> bytes:
    arrays = decode_tensors(blob, max_bytes=max_bytes)
    tensors = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
    if fmt == "safetensors":
        return save_safetensors(tensors)

    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()
