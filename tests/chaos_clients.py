"""Client processes for the chaos test: deterministic updates, no training.

Each client's update in round r depends only on (client, r), so the model a
federation ends with is known in advance whatever faults happen on the way.

    python -m tests.chaos_clients --gateways h:p,h:p --clients 8 --work-s 1.5
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from types import SimpleNamespace

import numpy as np

from clients.client import FederatedClient
from clients.connection import GatewayLink, RetryPolicy

EXAMPLES = 120


def client_update(client_index: int, round_id: int, arrays: dict[str, np.ndarray]) -> dict:
    """The update client ``client_index`` sends in ``round_id``."""
    rng = np.random.default_rng([client_index, round_id])
    return {
        name: (rng.standard_normal(a.shape) * 0.01).astype(a.dtype)
        for name, a in arrays.items()
        if a.dtype.kind == "f"
    }


def _trainer(index: int, work_s: float):
    def train(model_name: str, arrays: dict[str, np.ndarray], plan: object) -> SimpleNamespace:
        time.sleep(work_s)  # stands in for local training, so faults land mid-round
        return SimpleNamespace(
            delta=client_update(index, plan.round, arrays),
            num_examples=EXAMPLES,
            loss=0.0,
            seconds=work_s,
        )

    return train


async def main() -> None:
    """Run the clients until the federation finishes."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--gateways", required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--work-s", type=float, default=1.0)
    args = parser.parse_args()

    policy = RetryPolicy(attempts=40, base_s=0.2, max_s=2.0, call_timeout_s=20.0)
    gateways = args.gateways.split(",")
    clients = [
        FederatedClient(
            client_id=f"chaos-{i}",
            link=GatewayLink(gateways, policy=policy, seed=i),
            num_examples=EXAMPLES,
            trainer=_trainer(i, args.work_s),
        )
        for i in range(args.clients)
    ]
    await asyncio.gather(*(c.run() for c in clients))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())
