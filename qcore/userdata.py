"""Your own data: images and labels in a NumPy ``.npz`` file, read safely.

``numpy.savez(path, x=images, y=labels)`` (optionally ``classes=names``): ``x`` is
(N, H, W), (N, C, H, W) or (N, H, W, C) with C 1 or 3, uint8 pixels (0..255) or floats in
[0, 1]; ``y`` holds N whole numbers 0..K-1, every class with images. The file is read with
``allow_pickle=False`` after its zip table and each array's header are checked against the
bytes it holds, so a crafted file cannot ask for more memory than it brings. It is split
like the embedded sets (seeded and stratified by class: 20 % test, 10 % calib, the rest
train) and normalised with the train split's mean and standard deviation per channel.
uint8 pixels stay uint8 (a quarter of float32's memory); :meth:`qcore.data.Dataset.inputs`
normalises them batch by batch.
"""

from __future__ import annotations

import hashlib
import io
import math
import zipfile
from typing import Any

import numpy as np
import numpy.lib.format  # noqa: F401  (np.lib.format)
import torch

from qcore.data import Dataset, DatasetInfo, _stratified_splits
from qcore.refs import DATA_PREFIX
from qcore.upload import check_size, check_zip_table

__all__ = ["UploadedDataset", "load_npz", "MAX_DATA_IMAGES", "MAX_DATA_VALUES"]

MAX_DATA_IMAGES = 200_000
MAX_DATA_VALUES = 60_000_000  # pixels in all images: 60,000 28x28 images are 47 million
MIN_DATA_IMAGES = 20  # fewer cannot be split into train, calib and test
MAX_DATA_CLASSES = 1000
MAX_IMAGE_SIDE = 256
MAX_DATA_ARRAYS = 16  # x, y and perhaps classes; a few more are tolerated and ignored
MAX_DATA_UNPACKED = 200 * 2**20  # a data file's arrays together, unpacked
_DAMAGED = (zipfile.BadZipFile, ValueError, OSError, EOFError, RuntimeError, KeyError)


def _plain(text: str) -> str:
    """``text`` with anything but letters, digits and ``. _ -`` and spaces as ``_``."""
    return "".join(ch if ch.isalnum() or ch in "._- " else "_" for ch in text)


class UploadedDataset:
    """An uploaded dataset: its three splits (:class:`~qcore.data.Dataset`), the record
    that describes it (:class:`~qcore.data.DatasetInfo`), its name and SHA-256."""

    __slots__ = ("name", "sha256", "info", "splits", "filename", "__weakref__")

    def __init__(self, name: str, sha256: str, info: DatasetInfo,
                 splits: dict[str, Any], filename: str) -> None:  # fmt: skip
        self.name, self.sha256, self.info = name, sha256, info
        self.splits, self.filename = splits, filename

    @property
    def nbytes(self) -> int:
        """Bytes its three splits hold in memory."""
        return sum(s.nbytes for s in self.splits.values())

    def __repr__(self) -> str:
        return f"UploadedDataset({self.name!r}, {self.info.input_shape}, {self.info.num_classes})"


def _read_arrays(data: bytes, label: str) -> dict[str, np.ndarray]:
    """x, y and (when there) classes of an .npz's bytes, each header checked first."""
    if data[:4] != b"PK\x03\x04":
        raise ValueError(
            f"{label} is not a NumPy .npz file; save the images and labels with "
            "numpy.savez(path, x=images, y=labels)."
        )
    check_zip_table(data, MAX_DATA_ARRAYS, "a dataset file holds x, y and perhaps classes")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
    except _DAMAGED as e:
        raise ValueError(f"{label} is a damaged .npz (zip) archive ({e}).") from e
    total = sum(i.file_size for i in infos)
    if len(infos) > MAX_DATA_ARRAYS or total > MAX_DATA_UNPACKED:
        raise ValueError(
            f"{label} holds {len(infos)} arrays unpacking to {total / 2**20:,.0f} MiB; a "
            f"dataset file holds x, y and perhaps classes, at most "
            f"{MAX_DATA_UNPACKED // 2**20} MiB unpacked."
        )
    members = {i.filename.removesuffix(".npy"): i for i in infos}
    if not {"x", "y"} <= set(members):
        raise ValueError(
            f"{label} holds arrays {sorted(members)[:8]}; it needs x (the images) and y (the "
            "labels): numpy.savez(path, x=images, y=labels)."
        )
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for key in [k for k in ("x", "y", "classes") if k in members]:
                arrays[key] = _read_member(z, members[key], key)
    except ValueError as e:
        if "object arrays" in str(e) or "Object arrays cannot be loaded" in str(e):
            raise ValueError(
                f"{label} holds object arrays, which need unpickling and are never loaded "
                "here; save plain numeric arrays."
            ) from e
        raise ValueError(f"{label} could not be read as a .npz file ({e}).") from e
    except (*_DAMAGED, MemoryError) as e:
        raise ValueError(f"{label} could not be read as a .npz file ({e}).") from e
    return arrays


def _read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, key: str) -> np.ndarray:
    """One .npy member; its header is read first, since numpy allocates what it declares."""
    with z.open(info) as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)  # fmt: skip
        shape, _, dtype = read_header(f)
    if dtype.hasobject:
        raise ValueError("object arrays")
    declared = math.prod(shape) * dtype.itemsize
    if declared > info.file_size:
        raise ValueError(f"array {key} declares {declared:,} bytes but holds {info.file_size:,}")
    with z.open(info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def _images(x: np.ndarray, label: str) -> np.ndarray:
    """``x`` as (N, C, H, W) with C 1 or 3, its size within the limits."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # channels last -> channels first
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            f"{label}'s images x have shape {tuple(x.shape)}; give (N, H, W), (N, C, H, W) "
            "or (N, H, W, C) with 1 or 3 channels."
        )
    n, c, h, w = (int(d) for d in x.shape)
    if not MIN_DATA_IMAGES <= n <= MAX_DATA_IMAGES or x.size > MAX_DATA_VALUES:
        raise ValueError(
            f"{label} holds {n:,} images of {c}x{h}x{w}; give {MIN_DATA_IMAGES} to "
            f"{MAX_DATA_IMAGES:,} images of at most {MAX_DATA_VALUES:,} values in all."
        )
    if not (1 <= h <= MAX_IMAGE_SIDE and 1 <= w <= MAX_IMAGE_SIDE):
        raise ValueError(f"{label}'s images are {h}x{w}; sides up to {MAX_IMAGE_SIDE} are read.")
    return x


def _pixels(x: np.ndarray, label: str) -> torch.Tensor:
    """The images as uint8 pixels (kept as they are) or float32 values in [0, 1]."""
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x))
    if x.dtype.kind != "f":
        raise ValueError(f"{label}'s images are {x.dtype}; give uint8 pixels or floats in [0, 1].")
    pixels = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if not bool(torch.isfinite(pixels).all()) or pixels.min() < 0 or pixels.max() > 1:
        raise ValueError(
            f"{label}'s float images must hold values in [0, 1] (or give uint8 pixels "
            "0..255); they hold values outside it."
        )
    return pixels


def _labels(y: np.ndarray, n: int, label: str) -> tuple[torch.Tensor, int]:
    """The labels as int64 and the class count K; every class 0..K-1 must have images."""
    if y.shape != (n,) or y.dtype.kind not in "iu":
        raise ValueError(
            f"{label}'s labels y are {y.dtype} of shape {tuple(y.shape)}; give {n:,} whole "
            "numbers, one per image."
        )
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    lo, hi = int(labels.min()), int(labels.max())
    k = hi + 1
    if lo < 0 or not 2 <= k <= MAX_DATA_CLASSES:
        raise ValueError(
            f"{label}'s labels run from {lo} to {hi}; give classes numbered 0..K-1 with K "
            f"from 2 to {MAX_DATA_CLASSES}."
        )
    empty = torch.nonzero(torch.bincount(labels, minlength=k) == 0).flatten().tolist()
    if empty:  # a "10 classes" dataset with 8 of them empty would mislead every page
        shown = ", ".join(str(c) for c in empty[:8]) + (", ..." if len(empty) > 8 else "")
        raise ValueError(
            f"{label}'s labels run from 0 to {hi} but {len(empty):,} of those {k:,} classes "
            f"have no images ({shown}); number the classes that occur 0..K-1 without gaps."
        )
    return labels, k


def _class_names(classes: np.ndarray | None, k: int, label: str) -> tuple[str, ...]:
    """The class names given (plain characters only: they are shown in captions), or 0..K-1."""
    if classes is None:
        return tuple(str(i) for i in range(k))
    if classes.shape != (k,) or classes.dtype.kind not in "USiu":
        raise ValueError(
            f"{label}'s classes hold {classes.shape} {classes.dtype}; give {k} names, "
            "one per label."
        )
    return tuple(
        _plain(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))[:40]
        for v in classes.tolist()
    )


def _mean_std(pixels: torch.Tensor, train: torch.Tensor) -> tuple[tuple[float, ...], ...]:
    """Per-channel mean and (unbiased) standard deviation of the train split, on [0, 1]."""
    if pixels.dtype != torch.uint8:
        x = pixels[train]
        mean = tuple(float(v) for v in x.mean(dim=(0, 2, 3)))
        return mean, tuple(max(float(v), 1e-6) for v in x.std(dim=(0, 2, 3)))
    # uint8: exactly, from a 256-bin histogram per channel (no float copy of the images)
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(pixels.shape[1]):
        counts = torch.bincount(pixels[train, c].flatten(), minlength=256).to(torch.float64)
        m = float((counts * levels).sum() / counts.sum())
        var = float((counts * (levels - m) ** 2).sum() / max(float(counts.sum()) - 1, 1))
        means.append(m)
        stds.append(max(math.sqrt(var), 1e-6))
    return tuple(means), tuple(stds)


def load_npz(data: bytes, *, filename: str = "") -> UploadedDataset:
    """Images and labels from a NumPy ``.npz`` file (``numpy.savez(path, x=images, y=labels)``,
    optionally ``classes=names``), split like the embedded sets (seeded and stratified by
    class: 20 % test, 10 % calib, the rest train) and normalised with the train split's mean
    and standard deviation per channel.

    ``x`` is (N, H, W), (N, C, H, W) or (N, H, W, C) with C 1 or 3: uint8 pixels (0..255)
    or floats in [0, 1]. ``y`` holds N whole numbers 0..K-1 (K from 2 to 1,000), each class
    with images. Read with ``allow_pickle=False``: object arrays, which would need
    unpickling, are refused. uint8 pixels are kept as uint8 (``Dataset.inputs`` normalises
    them per batch). The name is ``ud-`` and the first 12 hex digits of the file's SHA-256.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"Data must be given as bytes; got {type(data).__name__}.")
    data = bytes(data)
    label = f"{filename!r}" if filename else "The file"
    check_size(len(data), label, "data files")
    arrays = _read_arrays(data, label)
    x, y = arrays["x"], arrays["y"]
    if not all(isinstance(a, np.ndarray) and a.ndim >= 1 for a in (x, y)):
        raise ValueError(f"{label}'s x and y must be arrays with one row per image.")
    x = _images(x, label)
    n, c, h, w = (int(d) for d in x.shape)
    labels, k = _labels(y, n, label)
    pixels = _pixels(x, label)
    names = _class_names(arrays.get("classes"), k, label)
    splits_idx = _stratified_splits(labels)
    if any(len(v) == 0 for v in splits_idx.values()):
        raise ValueError(
            f"{label} has too few images of each class for a train, calib and test split "
            "(20 % of each class goes to test, 10 % to calib); give at least 10 of each class."
        )
    mean, std = _mean_std(pixels, splits_idx["train"])
    sha = hashlib.sha256(data).hexdigest()
    name = DATA_PREFIX + sha[:12]
    source = _plain(filename)[:80]
    description = (f"Uploaded from {source or 'a file'}: {n:,} images, {c}x{h}x{w}, "
                   f"{k} classes.")  # fmt: skip
    info = DatasetInfo(name, (c, h, w), k, description, "uploaded",
                       tuple((s, int(len(v))) for s, v in splits_idx.items()))  # fmt: skip
    if pixels.dtype == torch.uint8:
        def stored(idx: torch.Tensor) -> torch.Tensor:
            return pixels[idx]  # a copy of just these rows, still uint8
    else:
        m = torch.tensor(mean).view(1, -1, 1, 1)
        sd = torch.tensor(std).view(1, -1, 1, 1)

        def stored(idx: torch.Tensor) -> torch.Tensor:
            return ((pixels[idx] - m) / sd).contiguous()
    splits = {
        s: Dataset(name=name, split=s, x=stored(idx), y=labels[idx].clone(), classes=names,
                   description=description, mean=mean, std=std, indices=idx.clone())
        for s, idx in splits_idx.items()
    }  # fmt: skip
    return UploadedDataset(name, sha, info, splits, filename)
