"""Tests for the model registry, DP compatibility and weight conversion."""

from __future__ import annotations

import re
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from fedq.models import (
    ModelError,
    build_model,
    default_model_for,
    load_arrays,
    make_dp_compatible,
    model_arrays,
)


class _CountingScale(nn.Module):
    """A trainable layer with a buffer: Opacus has no way to privatise the buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    source = """
        from torch import nn

        def tiny_net():
            return nn.Sequential(nn.Flatten(), nn.Linear(4, 2))

        def not_a_model():
            return "a string"
    """
    (tmp_path / "fedq_custom_net.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "fedq_custom_net"


def test_mnist_cnn_has_about_26k_parameters_and_gives_ten_logits():
    model = build_model("mnist_cnn")

    logits = model(torch.zeros(3, 1, 28, 28))

    assert sum(p.numel() for p in model.parameters()) == 26010
    assert logits.shape == (3, 10)


def test_cifar_cnn_gives_ten_logits_with_groupnorm_and_no_batchnorm():
    model = build_model("cifar_cnn")

    logits = model(torch.zeros(2, 3, 32, 32))

    assert logits.shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) < 500_000
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_builtin_models_are_accepted_by_opacus_unchanged():
    for name in ("mnist_cnn", "cifar_cnn"):
        model = build_model(name)

        assert make_dp_compatible(model) is model


def test_same_seed_builds_identical_weights_and_other_seed_differs():
    first = model_arrays(build_model("mnist_cnn", seed=7))
    again = model_arrays(build_model("mnist_cnn", seed=7))
    other = model_arrays(build_model("mnist_cnn", seed=8))

    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not all(np.array_equal(first[k], other[k]) for k in first)


def test_import_path_model_is_built_from_its_factory(custom_module):
    model = build_model(f"{custom_module}:tiny_net")

    assert model(torch.zeros(1, 2, 2)).shape == (1, 2)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("no_such_package_xyz.models:net", "cannot import module 'no_such_package_xyz.models'"),
        ("{module}:missing", "has no attribute 'missing'"),
        ("{module}:not_a_model", "returned str, not a torch.nn.Module"),
        ("resnet_9000", "unknown model 'resnet_9000'"),
    ],
)
def test_bad_model_names_are_refused_with_the_reason(custom_module, name, expected):
    with pytest.raises(ModelError, match=re.escape(expected)):
        build_model(name.format(module=custom_module))


def test_batchnorm_is_replaced_so_the_model_becomes_dp_compatible():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 2))

    fixed = make_dp_compatible(model)

    assert isinstance(fixed[1], nn.GroupNorm)
    assert make_dp_compatible(fixed) is fixed


def test_unfixable_layer_is_refused_with_its_name():
    model = nn.Sequential(nn.Linear(4, 4), _CountingScale())

    with pytest.raises(ModelError, match=r"1 \(_CountingScale\).*buffers \['calls'\]"):
        make_dp_compatible(model)


def test_arrays_round_trip_into_a_fresh_model_in_state_dict_order():
    source = build_model("mnist_cnn", seed=1)
    target = build_model("mnist_cnn", seed=2)

    arrays = model_arrays(source)
    load_arrays(target, arrays)

    assert list(arrays) == list(source.state_dict())
    assert all(np.array_equal(arrays[k], v.numpy()) for k, v in target.state_dict().items())


def test_loading_arrays_of_another_model_names_what_is_wrong():
    arrays = model_arrays(build_model("mnist_cnn"))
    wrong_shape = dict(arrays, **{"0.weight": np.zeros((1, 1), dtype=np.float32)})
    missing = {k: v for k, v in arrays.items() if k != "0.bias"}

    with pytest.raises(ModelError, match=r"'0\.weight' has shape \(1, 1\)"):
        load_arrays(build_model("mnist_cnn"), wrong_shape)
    with pytest.raises(ModelError, match=r"missing \['0\.bias'\]"):
        load_arrays(build_model("mnist_cnn"), missing)


def test_default_models_are_chosen_per_data_set():
    assert default_model_for("mnist") == "mnist_cnn"
    assert default_model_for("fashion-mnist") == "mnist_cnn"
    assert default_model_for("cifar10") == "cifar_cnn"
    with pytest.raises(ModelError, match="no default model for data set 'imagenet'"):
        default_model_for("imagenet")
