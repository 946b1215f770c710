"""Model registry: build models by name, make them DP-compatible, move weights as arrays.

A model name is either a built-in (``"mnist_cnn"``, ``"cifar_cnn"``) or an import
path ``"package.module:factory"`` whose factory takes no arguments and returns an
``nn.Module``. Every process that builds the same name gets the same state-dict
layout, which is what lets the coordinator, workers and clients exchange weights
as plain named arrays.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

__all__ = [
    "BUILTIN_MODELS",
    "ModelError",
    "build_model",
    "default_model_for",
    "load_arrays",
    "make_dp_compatible",
    "model_arrays",
]

log = logging.getLogger(__name__)


class ModelError(ValueError):
    """A model cannot be built, made DP-compatible, or loaded with the given weights."""


def _mnist_cnn() -> nn.Module:
    # The small tanh CNN commonly used for DP-SGD on MNIST (about 26k parameters):
    # tanh keeps activations bounded, which suits per-sample clipping.
    return nn.Sequential(
        nn.Conv2d(1, 16, 8, stride=2, padding=3),
        nn.Tanh(),
        nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, stride=2),
        nn.Tanh(),
        nn.MaxPool2d(2, 1),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 32),
        nn.Tanh(),
        nn.Linear(32, 10),
    )


def _cifar_cnn() -> nn.Module:
    # GroupNorm instead of BatchNorm: per-sample gradients stay independent of the batch.
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.GroupNorm(8, c_out),
            nn.Tanh(),
            nn.MaxPool2d(2),
        ]

    return nn.Sequential(
        *block(3, 32),
        *block(32, 64),
        *block(64, 64),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128),
        nn.Tanh(),
        nn.Linear(128, 10),
    )


BUILTIN_MODELS: dict[str, Callable[[], nn.Module]] = {
    "mnist_cnn": _mnist_cnn,
    "cifar_cnn": _cifar_cnn,
}

_DEFAULT_FOR_DATASET = {
    "mnist": "mnist_cnn",
    "fashion-mnist": "mnist_cnn",
    "cifar10": "cifar_cnn",
}


def build_model(name: str, seed: int | None = None) -> nn.Module:
    """Build a fresh model by registry name or ``"package.module:factory"`` import path.

    When ``seed`` is given the global torch RNG is seeded first, so the initial
    weights are the same in every process that builds the same name and seed.

    Raises:
        ModelError: unknown name, missing module or attribute, or a factory that does
            not return an ``nn.Module``.
    """
    factory = _resolve_factory(name)
    if seed is not None:
        torch.manual_seed(seed)

    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module; "
            "make the factory return the model instance"
        )
    return model


def default_model_for(dataset: str) -> str:
    """Name of the built-in model that fits a data set (``"mnist"``, ``"cifar10"``, ...)."""
    key = dataset.strip().lower().replace("_", "-")
    if key == "fashionmnist":
        key = "fashion-mnist"
    if key not in _DEFAULT_FOR_DATASET:
        known = ", ".join(sorted(_DEFAULT_FOR_DATASET))
        raise ModelError(
            f"no default model for data set {dataset!r}; pass a model name explicitly "
            f"(data sets with a default: {known})"
        )
    return _DEFAULT_FOR_DATASET[key]


def make_dp_compatible(model: nn.Module) -> nn.Module:
    """Return ``model`` if Opacus accepts it, else a fixed copy (e.g. BatchNorm -> GroupNorm).

    Raises:
        ModelError: naming every layer that is still unsupported after fixing, and why.
    """
    from opacus.validators import ModuleValidator

    model.train()
    if not _dp_problems(model):
        return model

    before = {name: type(module).__name__ for name, module in model.named_modules()}
    fixed = ModuleValidator.fix(model)
    for name, module in fixed.named_modules():
        old = before.get(name)
        if old is not None and old != type(module).__name__:
            log.info("replaced layer %s: %s -> %s", name, old, type(module).__name__)

    problems = _dp_problems(fixed)
    if problems:
        details = "; ".join(f"{name}: {reason}" for name, reason in problems)
        raise ModelError(
            f"model cannot be trained with DP-SGD even after automatic fixes: {details}. "
            "Replace these layers (no running statistics or other buffers in trainable layers)"
        )
    return fixed


def model_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """Copy a model's state dict to numpy arrays, in state-dict order."""
    return {
        name: tensor.detach().cpu().numpy().copy() for name, tensor in model.state_dict().items()
    }


def load_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load named arrays into a model; names, shapes and dtype kinds must match exactly.

    Raises:
        ModelError: listing missing, unexpected or mis-shaped entries.
    """
    state = model.state_dict()
    missing = [name for name in state if name not in arrays]
    unexpected = [name for name in arrays if name not in state]
    if missing or unexpected:
        raise ModelError(
            f"weights do not fit the model: missing {missing or 'none'}, "
            f"unexpected {unexpected or 'none'}; were they produced by the same model name "
            "(and, for DP training, by make_dp_compatible)?"
        )

    loaded: dict[str, torch.Tensor] = {}
    for name, target in state.items():
        array = np.asarray(arrays[name])
        if tuple(array.shape) != tuple(target.shape):
            raise ModelError(
                f"weight {name!r} has shape {tuple(array.shape)}, the model expects "
                f"{tuple(target.shape)}"
            )
        loaded[name] = torch.as_tensor(array).to(dtype=target.dtype)

    model.load_state_dict(loaded, strict=True)


def _resolve_factory(name: str) -> Callable[[], object]:
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name]
    if ":" not in name:
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise ModelError(
            f"unknown model {name!r}; use one of {known} or an import path 'package.module:factory'"
        )

    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(
            f"model {name!r}: cannot import module {module_name!r} ({exc}); "
            "check the path and that the package is installed"
        ) from exc

    factory = getattr(module, attr, None)
    if factory is None:
        raise ModelError(f"model {name!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise ModelError(f"model {name!r}: {attr!r} is a {type(factory).__name__}, not callable")
    return factory


def _dp_problems(model: nn.Module) -> list[tuple[str, str]]:
    """(layer name, reason) for every trainable layer Opacus would refuse."""
    from opacus.validators import ModuleValidator

    problems: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        label = f"{name or '<root>'} ({type(module).__name__})"
        validator = ModuleValidator.VALIDATORS.get(type(module))
        if validator is not None:
            problems.extend((label, str(error)) for error in validator(module))
        # Per-sample gradients cannot privatise buffers (running statistics and the like).
        buffers = [b for b, _ in module.named_buffers()]
        if buffers:
            problems.append((label, f"trainable layer holds buffers {buffers}"))
    return problems
