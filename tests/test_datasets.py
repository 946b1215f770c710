"""Tests for data set loading and client partitioning."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fedq.datasets import (
    DatasetMissingError,
    input_shape,
    load_dataset,
    num_classes,
    partition,
)
from tests.conftest import _unavailable


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDQ_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "pictures"
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("test", 2)):
        for cls in ("cats", "dogs"):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


def _listing(root):
    return sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_mnist_loads_60000_train_and_10000_test_images_without_writing_to_the_root(data_root):
    before = _listing(data_root / "MNIST")

    train = load_dataset("mnist", root=data_root, train=True)
    test = load_dataset("mnist", root=data_root, train=False)

    images, labels = train.tensors
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert test.tensors[0].shape == (10000, 1, 28, 28)
    assert abs(images.mean().item()) < 0.01 and abs(images.std().item() - 1) < 0.01
    assert labels.bincount().tolist()[:3] == [5923, 6742, 5958]
    assert _listing(data_root / "MNIST") == before


def test_fashion_mnist_test_split_has_1000_images_per_class(data_root):
    test = load_dataset("fashion-mnist", root=data_root, train=False)

    assert test.tensors[0].shape == (10000, 1, 28, 28)
    assert test.tensors[1].bincount().tolist() == [1000] * 10


def test_unpacked_idx_files_are_read_as_well_as_gzipped_ones(data_root, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(data_root / "MNIST" / "raw" / f"{stem}.gz", "rb") as src:
            (raw / stem).write_bytes(src.read())

    unpacked = load_dataset("mnist", root=tmp_path, train=False, download=False)
    packed = load_dataset("mnist", root=data_root, train=False)

    assert torch.equal(unpacked.tensors[0], packed.tensors[0])
    assert torch.equal(unpacked.tensors[1], packed.tensors[1])


def test_missing_files_raise_an_error_listing_files_and_folders(tmp_path):
    with pytest.raises(DatasetMissingError) as caught:
        load_dataset("mnist", root=tmp_path, train=True, download=False)

    message = str(caught.value)
    assert "train-images-idx3-ubyte.gz" in message and "train-labels-idx1-ubyte.gz" in message
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "FEDQ_DATA_DIR" in message
    assert isinstance(caught.value, FileNotFoundError)


def test_failed_download_into_a_writable_root_still_lists_the_missing_files(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)

    with pytest.raises(DatasetMissingError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset("fashion-mnist", root=tmp_path, train=False)


def test_image_folder_is_decoded_once_and_then_read_from_the_cache(image_folder, cache_dir):
    before = _listing(image_folder)

    first = load_dataset(f"folder:{image_folder}", root=None, train=True)
    cached = sorted(cache_dir.rglob("*.npy"))
    second = load_dataset(f"folder:{image_folder}", root=None, train=True)

    assert first.tensors[0].shape == (6, 3, 6, 5)
    assert first.tensors[1].tolist() == [0, 0, 0, 1, 1, 1]
    assert len(cached) == 1
    assert torch.equal(first.tensors[0], second.tensors[0])
    assert _listing(image_folder) == before
    assert num_classes(f"folder:{image_folder}") == 2
    assert input_shape(f"folder:{image_folder}") == (3, 6, 5)


def test_changed_image_folder_is_decoded_again(image_folder, cache_dir):
    load_dataset(f"folder:{image_folder}", root=None, train=False)
    shutil.copy(image_folder / "test" / "cats" / "0.png", image_folder / "test" / "cats" / "9.png")

    grown = load_dataset(f"folder:{image_folder}", root=None, train=False)

    assert len(grown) == 5
    assert len(list(cache_dir.rglob("*.npy"))) == 2


def test_cifar10_jpeg_test_split_loads_as_normalised_rgb(data_root, cache_dir):
    if not (data_root / "CIFAR10-jpeg").is_dir():
        _unavailable("the CIFAR10-jpeg folder in the test data")

    test = load_dataset("cifar10", root=data_root, train=False)

    images, labels = test.tensors
    assert images.shape == (10000, 3, 32, 32)
    assert labels.bincount().tolist() == [1000] * 10
    assert images.mean(dim=(0, 2, 3)).abs().max().item() < 0.05
    assert input_shape("cifar10") == (3, 32, 32) and num_classes("cifar10") == 10


def test_iid_partition_is_disjoint_covering_balanced_and_seeded():
    labels = np.repeat(np.arange(10), 101)

    parts = partition(labels, 7, seed=3)
    again = partition(labels, 7, seed=3)
    other = partition(labels, 7, seed=4)

    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))
    assert {len(p) for p in parts} <= {144, 145}
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_partition_is_disjoint_covering_skewed_and_respects_min_size():
    labels = np.repeat(np.arange(10), 600)

    parts = partition(labels, 10, scheme="dirichlet", alpha=0.1, seed=0, min_size=50)
    again = partition(labels, 10, scheme="dirichlet", alpha=0.1, seed=0, min_size=50)

    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    assert min(len(p) for p in parts) >= 50
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    top_class_share = [np.bincount(labels[p]).max() / len(p) for p in parts]
    assert np.median(top_class_share) > 0.5


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"num_clients": 0}, "num_clients 0 must be at least 1"),
        ({"num_clients": 101}, "num_clients 101 exceeds the 100 examples"),
        ({"num_clients": 2, "scheme": "shards"}, "unknown scheme 'shards'"),
        ({"num_clients": 2, "scheme": "dirichlet", "alpha": 0.0}, "alpha 0.0 must be > 0"),
        ({"num_clients": 20, "scheme": "dirichlet", "min_size": 10}, "exceeds the 100 examples"),
    ],
)
def test_invalid_partition_requests_are_refused_with_the_bad_value(kwargs, expected):
    labels = np.arange(100) % 10

    with pytest.raises(ValueError, match=expected):
        partition(labels, **kwargs)


def test_impossible_dirichlet_minimum_gives_up_with_advice():
    labels = np.arange(100) % 10

    with pytest.raises(ValueError, match="raise alpha, lower min_size or use fewer clients"):
        partition(labels, 10, scheme="dirichlet", alpha=0.01, min_size=9)


def test_unknown_data_set_name_is_refused():
    with pytest.raises(ValueError, match="unknown data set 'svhn'"):
        load_dataset("svhn", root=None, train=True)
