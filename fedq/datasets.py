"""Load image-classification data sets into memory and split them between clients.

Supported names: ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"`` and
``"folder:/path"`` (any ``path/{train,test}/<class>/<image>`` tree). The data
root may be read-only: MNIST-style IDX ``.gz`` files are read directly, and
decoded JPEG/PNG folders are cached under a separate, writable cache folder.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = [
    "DATASETS",
    "DatasetMissingError",
    "default_cache_dir",
    "default_data_root",
    "input_shape",
    "load_dataset",
    "num_classes",
    "partition",
]

log = logging.getLogger(__name__)

DATASETS = ("mnist", "fashion-mnist", "cifar10")
PARTITION_SCHEMES = ("iid", "dirichlet")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})

_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
}
_IDX_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_IDX_STEMS = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_MAGIC = {3: 2051, 1: 2049}  # dimensions -> magic number of a uint8 IDX file
_NORMALISATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
_FOLDER_NORMALISATION = 0.5  # generic folders: scale [0, 1] to [-1, 1] in every channel
_CIFAR_JPEG_FOLDER = "CIFAR10-jpeg"
_CIFAR_OFFICIAL_FOLDER = "cifar-10-batches-py"
_DIRICHLET_ATTEMPTS = 100


class DatasetMissingError(FileNotFoundError):
    """The files of a data set are not where we looked and could not be downloaded."""


def default_data_root() -> Path:
    """Data root: ``$FEDQ_DATA_DIR``, else ``~/.cache/fedq/data``."""
    env = os.environ.get("FEDQ_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedq" / "data"


def default_cache_dir() -> Path:
    """Writable cache for decoded images: ``$FEDQ_CACHE_DIR``, else ``~/.cache/fedq``."""
    env = os.environ.get("FEDQ_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedq"


def load_dataset(
    name: str, *, root: str | Path | None, train: bool, download: bool = True
) -> TensorDataset:
    """Load a split into memory as normalised float32 N×C×H×W images and int64 labels.

    Args:
        name: ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"`` or ``"folder:/path"``.
        root: folder holding the data sets (torchvision layout); ``None`` uses
            ``default_data_root()``. Ignored for ``folder:`` names.
        train: the training split if true, else the test split.
        download: when files are missing and ``root`` is writable, try torchvision's
            download into ``root`` first.

    Raises:
        DatasetMissingError: files missing and not downloadable; the message lists them.
        ValueError: unknown name or corrupt files.
    """
    key = _canonical(name)
    base = Path(root).expanduser() if root is not None else default_data_root()

    if key.startswith("folder:"):
        folder = Path(key.removeprefix("folder:")).expanduser()
        images, labels = _load_image_folder(folder / _split(train))
        channels = 1 if images.ndim == 3 else images.shape[-1]
        mean = std = (_FOLDER_NORMALISATION,) * channels
    elif key == "cifar10":
        images, labels = _load_cifar10(base, train=train, download=download)
        mean, std = _NORMALISATION[key]
    else:
        images, labels = _load_idx_dataset(key, base, train=train, download=download)
        mean, std = _NORMALISATION[key]

    dataset = TensorDataset(_to_float_tensor(images, mean=mean, std=std), torch.from_numpy(labels))
    log.info("loaded %s %s split: %d examples", key, _split(train), len(labels))
    return dataset


def num_classes(name: str) -> int:
    """Number of classes of a data set (for folders: class folders under ``train``)."""
    key = _canonical(name)
    if key.startswith("folder:"):
        return len(_class_dirs(Path(key.removeprefix("folder:")).expanduser() / "train"))
    return 10


def input_shape(name: str) -> tuple[int, int, int]:
    """Shape (C, H, W) of one input image of a data set."""
    key = _canonical(name)
    if key in _IDX_FOLDERS:
        return (1, 28, 28)
    if key == "cifar10":
        return (3, 32, 32)

    from PIL import Image

    files = _list_image_files(Path(key.removeprefix("folder:")).expanduser() / "train")
    with Image.open(files[0][1]) as image:
        channels = 1 if _image_mode(image) == "L" else 3
        return (channels, image.height, image.width)


def partition(
    labels: np.ndarray,
    num_clients: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Split example indices into ``num_clients`` disjoint, sorted index arrays.

    ``"iid"`` shuffles all indices and deals them out in near-equal parts.
    ``"dirichlet"`` splits every class between clients in proportions drawn from
    Dirichlet(``alpha``) (smaller alpha: more skewed), drawing again until every
    client holds at least ``min_size`` examples. Both cover every index once.
    """
    labels = np.asarray(labels)
    _check_partition_args(labels, num_clients, scheme=scheme, alpha=alpha, min_size=min_size)
    rng = np.random.default_rng(seed)

    if scheme == "iid":
        parts = np.array_split(rng.permutation(len(labels)), num_clients)
        return [np.sort(part) for part in parts]

    for _ in range(_DIRICHLET_ATTEMPTS):
        parts = _dirichlet_split(labels, num_clients, alpha=alpha, rng=rng)
        if min(len(part) for part in parts) >= min_size:
            return parts
    raise ValueError(
        f"Dirichlet(alpha={alpha}) split of {len(labels)} examples into {num_clients} clients "
        f"left a client with fewer than min_size={min_size} examples in "
        f"{_DIRICHLET_ATTEMPTS} draws; raise alpha, lower min_size or use fewer clients"
    )


def _check_partition_args(
    labels: np.ndarray, num_clients: int, *, scheme: str, alpha: float, min_size: int
) -> None:
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if num_clients < 1:
        raise ValueError(f"num_clients {num_clients} must be at least 1")
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(
            f"unknown scheme {scheme!r}; expected one of {', '.join(PARTITION_SCHEMES)}"
        )
    if num_clients > len(labels):
        raise ValueError(
            f"num_clients {num_clients} exceeds the {len(labels)} examples; use fewer clients"
        )
    if scheme == "dirichlet" and alpha <= 0:
        raise ValueError(f"alpha {alpha} must be > 0 for the Dirichlet scheme")
    if scheme == "dirichlet" and num_clients * min_size > len(labels):
        raise ValueError(
            f"{num_clients} clients x min_size {min_size} exceeds the {len(labels)} examples; "
            "lower min_size or use fewer clients"
        )


def _dirichlet_split(
    labels: np.ndarray, num_clients: int, *, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    shares: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
        for client, chunk in enumerate(np.split(members, cuts)):
            shares[client].append(chunk)
    return [np.sort(np.concatenate(chunks)) for chunks in shares]


def _canonical(name: str) -> str:
    if name.startswith("folder:"):
        if not name.removeprefix("folder:"):
            raise ValueError("data set 'folder:' needs a path, e.g. 'folder:/data/my-images'")
        return name
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(
            f"unknown data set {name!r}; expected one of {', '.join(DATASETS)} or 'folder:/path'"
        )
    return key


def _split(train: bool) -> str:
    return "train" if train else "test"


def _to_float_tensor(
    images: np.ndarray, *, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """uint8 N×H×W(×C) -> normalised float32 N×C×H×W."""
    tensor = torch.from_numpy(images)
    tensor = tensor.unsqueeze(1) if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)
    tensor = tensor.to(torch.float32).div_(255.0)

    shape = (1, len(mean), 1, 1)
    tensor.sub_(torch.tensor(mean).view(shape)).div_(torch.tensor(std).view(shape))
    return tensor.contiguous()


# --- IDX files (MNIST, Fashion-MNIST) ------------------------------------------------------


def _load_idx_dataset(
    key: str, root: Path, *, train: bool, download: bool
) -> tuple[np.ndarray, np.ndarray]:
    folder = _IDX_FOLDERS[key]
    searched = [root / folder / "raw", root / folder]
    found = [_find_idx(searched, stem) for stem in _IDX_STEMS[train]]

    if None in found and download and _is_writable(root):
        _torchvision_download(key, root, train=train)
        found = [_find_idx(searched, stem) for stem in _IDX_STEMS[train]]
    if None in found:
        missing = [
            f"{stem}.gz"
            for stem, path in zip(_IDX_STEMS[train], found, strict=True)
            if path is None
        ]
        raise _missing_error(key, train=train, missing=missing, searched=searched)

    images_path, labels_path = found
    assert images_path is not None and labels_path is not None
    images = _read_idx(images_path, ndim=3)
    labels = _read_idx(labels_path, ndim=1).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} "
            "labels; the files do not belong together"
        )
    return images, labels


def _find_idx(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                return candidate
    return None


def _read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """Read a uint8 IDX file (optionally gzipped): big-endian magic, dims, then the values."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as stream:
        raw = stream.read()

    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    magic, *dims = struct.unpack(f">{1 + ndim}I", raw[:header])
    if magic != _IDX_MAGIC[ndim]:
        raise ValueError(f"{path}: IDX magic {magic}, expected {_IDX_MAGIC[ndim]}; wrong file?")

    values = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if values.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {values.size} values, header promises {dims}; file truncated?")
    return values.reshape(dims).copy()


# --- CIFAR-10 ----------------------------------------------------------------------------------


def _load_cifar10(root: Path, *, train: bool, download: bool) -> tuple[np.ndarray, np.ndarray]:
    official = root / _CIFAR_OFFICIAL_FOLDER
    jpeg = root / _CIFAR_JPEG_FOLDER / _split(train)

    if official.is_dir():
        loaded = _read_cifar_official(root, train=train)
        if loaded is not None:
            return loaded
    if jpeg.is_dir():
        return _load_image_folder(jpeg)

    if download and _is_writable(root):
        _torchvision_download("cifar10", root, train=train)
        loaded = _read_cifar_official(root, train=train)
        if loaded is not None:
            return loaded
    raise _missing_error(
        "cifar10",
        train=train,
        missing=[f"{_CIFAR_OFFICIAL_FOLDER}/ (official python release)", f"{jpeg}/<class>/*.jpg"],
        searched=[official, jpeg],
    )


def _read_cifar_official(root: Path, *, train: bool) -> tuple[np.ndarray, np.ndarray] | None:
    from torchvision.datasets import CIFAR10

    try:
        data = CIFAR10(str(root), train=train, download=False)
    except RuntimeError as exc:  # torchvision's "not found or corrupted"
        log.warning("%s: unusable CIFAR-10 release (%s)", root / _CIFAR_OFFICIAL_FOLDER, exc)
        return None
    return np.asarray(data.data, dtype=np.uint8), np.asarray(data.targets, dtype=np.int64)


# --- Image folders (with a decode cache) ------------------------------------------------------


def _load_image_folder(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    files = _list_image_files(folder)
    labels = np.array([label for label, _ in files], dtype=np.int64)

    digest = _listing_digest(folder, files)
    cache = default_cache_dir() / "images" / f"{folder.parent.name}-{folder.name}-{digest}.npy"
    images = _read_cache(cache, count=len(files))
    if images is None:
        log.info("decoding %d images under %s (cached afterwards)", len(files), folder)
        images = _decode_images([path for _, path in files])
        _write_cache(cache, images)
    return images, labels


def _class_dirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DatasetMissingError(
            f"image folder {folder} does not exist; expected <root>/{{train,test}}/<class>/*.jpg"
        )
    return sorted(p for p in folder.iterdir() if p.is_dir())


def _list_image_files(folder: Path) -> list[tuple[int, Path]]:
    files = [
        (label, path)
        for label, class_dir in enumerate(_class_dirs(folder))
        for path in sorted(class_dir.iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise DatasetMissingError(
            f"no .jpg/.jpeg/.png images in class folders under {folder}; "
            "expected <folder>/<class>/<image>"
        )
    return files


def _listing_digest(folder: Path, files: list[tuple[int, Path]]) -> str:
    digest = hashlib.sha256()
    for label, path in files:
        stat = path.stat()
        rel = path.relative_to(folder).as_posix()
        digest.update(f"{label}\0{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _decode_images(paths: list[Path]) -> np.ndarray:
    from PIL import Image

    with Image.open(paths[0]) as first:
        mode = _image_mode(first)

    def decode(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode), dtype=np.uint8)

    # PIL releases the GIL while decoding, so threads help even on a small machine.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(decode, paths, chunksize=256))

    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(
            f"images under {paths[0].parent.parent} differ in size ({sorted(shapes)[:3]}...); "
            "resize them to one size first"
        )
    return np.stack(arrays)


def _image_mode(image: object) -> str:
    return "L" if getattr(image, "mode", "RGB") in ("1", "L", "LA", "I", "I;16") else "RGB"


def _read_cache(path: Path, *, count: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        images = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable image cache %s: %s", path, exc)
        return None
    if images.dtype != np.uint8 or len(images) != count:
        log.warning("ignoring image cache %s: it does not match the folder", path)
        return None
    return images


def _write_cache(path: Path, images: np.ndarray) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp, images, allow_pickle=False)
        os.replace(tmp, path)  # atomic: concurrent loaders never see half a file
    except OSError as exc:
        log.warning("could not write image cache %s (%s); set FEDQ_CACHE_DIR", path, exc)
        tmp.unlink(missing_ok=True)


# --- Missing files --------------------------------------------------------------------------


def _is_writable(root: Path) -> bool:
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return os.access(existing, os.W_OK)


def _torchvision_download(key: str, root: Path, *, train: bool) -> None:
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}.get(
        key, datasets.CIFAR10
    )
    log.info("%s not found under %s; trying a download", key, root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        cls(str(root), train=train, download=True)
    except (OSError, RuntimeError, ValueError) as exc:  # no network, HTTP error, bad checksum
        log.warning("download of %s into %s failed: %s", key, root, exc)


def _missing_error(
    key: str, *, train: bool, missing: list[str], searched: list[Path]
) -> DatasetMissingError:
    return DatasetMissingError(
        f"data set {key!r} ({_split(train)} split) not found: missing {', '.join(missing)}; "
        f"searched {', '.join(str(p) for p in searched)}. Copy the files there (torchvision "
        "layout, e.g. <root>/MNIST/raw/*.gz) or point FEDQ_DATA_DIR / --data-dir at a folder "
        "that has them"
    )
