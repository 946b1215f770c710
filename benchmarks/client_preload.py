"""What a benchmark's ``fedq client`` process does once, before it joins.

Importing this module imports what ``fedq client`` needs (torch, Opacus, gRPC, the
client), then trains the MNIST model twice on 256 random images, with plain SGD and
with DP-SGD, and freezes the garbage collector's view of every object made so far. A
client's first round would otherwise pay these one-time costs inside the timed run:
on a 2-core machine a cold first DP-SGD round of 30 steps took 4.0 s against 1.0 s
warm, a plain one 1.2 s against 0.3 s.

The process benchmark's fork server imports this module, so that every client forked
from it starts warm and shares the imported libraries' memory. Run as a program it
does the same for one client and then is ``fedq``::

    python -m benchmarks.client_preload client --client-id client-000 ...
"""

from __future__ import annotations

import gc
import os
import sys
import warnings

import opacus  # noqa: F401  (imported here so that no client imports it while timed)
import torch

import clients.service  # noqa: F401  (the client and everything it imports)
from clients.training import train_locally
from fedq.cli import main
from fedq.datasets import input_shape
from fedq.models import build_model, make_dp_compatible, model_arrays
from fedq.plan import TrainingPlan

__all__ = ["run_fedq", "warm_up"]

WARM_UP_MODEL = "mnist_cnn"
_WARM_UP_EXAMPLES = 256

# multiprocessing runs the benchmark's main module again, as __mp_main__, in every child
# forked from the fork server; the fork server imported it already (so that this costs
# the child nothing), which runpy would warn about in each child.
warnings.filterwarnings(
    "ignore", message=".*found in sys.modules after import of package", category=RuntimeWarning
)


def warm_up(model_name: str = WARM_UP_MODEL) -> None:
    """Train ``model_name`` for 2 steps without DP and 2 with DP-SGD on random data."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(_WARM_UP_EXAMPLES, *input_shape("mnist"), generator=generator)
    labels = torch.randint(0, 10, (_WARM_UP_EXAMPLES,), generator=generator)
    data = torch.utils.data.TensorDataset(images, labels)

    for dp_mode in ("none", "sample"):
        model = build_model(model_name, seed=0)
        if dp_mode != "none":
            model = make_dp_compatible(model)
        plan = TrainingPlan(round=0, dp_mode=dp_mode, sample_rate=0.25, local_steps=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train_locally(model_name, model_arrays(model), data, plan)

    gc.collect()
    gc.freeze()  # forked children then leave these objects' pages shared


def run_fedq(argv: list[str], env: dict[str, str]) -> int:
    """Run the ``fedq`` command line ``argv`` on one torch thread.

    ``env``'s ``FEDQ_*`` variables replace this process's own (a forked child
    inherits the fork server's environment); its other variables are added.
    """
    for name in [n for n in os.environ if n.startswith("FEDQ_")]:
        del os.environ[name]
    os.environ.update(env)
    torch.set_num_threads(1)
    return main(argv)


warm_up()

if __name__ == "__main__":
    raise SystemExit(run_fedq(sys.argv[1:], dict(os.environ)))
