"""Weight sharing: a k-means codebook of at most 2^b shared values per layer (Han et al.).

The kept weights (those a pruning mask keeps; every weight when unpruned) of one layer are
clustered in one dimension into k = 2^b clusters, and each weight is replaced by its
cluster's centroid: the layer then stores a float32 codebook of centroids and a b-bit
index per weight. Pruned weights are not clustered: they stay exactly zero, carried by the
sparse encodings' mask or relative index, never by a centroid.

- Initialisation is linear: k centroids evenly spaced over [min, max] of the kept weights
  (Deep Compression found it best: the few large weights, which matter most, keep
  centroids of their own).
- Lloyd iterations: assign every weight to its nearest centroid (ties to the lower one),
  move each centroid to the mean of its weights (in float64), until nothing moves or
  :data:`MAX_ITERATIONS` passes; a centroid left without weights keeps its place.
- The codebook keeps only the centroids some weight uses, sorted ascending, so it never
  holds more than 2^b values (fewer when the weights take fewer distinct values).
- Weights that already take at most 2^b distinct values are their own codebook, exactly,
  so a layer whose weights are already shared compresses to the same weights.

The clustering ignores the quantizer's range settings (clip, clip mode, symmetric,
rounding, power-of-two scales): the centroids are the least-squares levels of the weights
themselves, so an outlier gets a centroid of its own rather than being clipped. A codebook
is per tensor; per-channel codebooks are refused by :class:`~qcore.config.QuantConfig`.

>>> w = torch.tensor([0.0, 0.1, 0.9, 1.0, 5.0])
>>> cb = kmeans_codebook(w, bits=1)
>>> cb.codebook.tolist(), cb.codes.tolist()
([0.5, 5.0], [0, 0, 0, 0, 1])
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

__all__ = ["Codebook", "kmeans_codebook", "MAX_ITERATIONS"]

MAX_ITERATIONS = 200  # Lloyd passes at most (each costs O(k log n)); most layers settle sooner


class Codebook(NamedTuple):
    """A shared-weight layer: ``codebook[codes]`` where kept, 0 where pruned."""

    codebook: torch.Tensor  # (C,) float32, sorted ascending, C <= 2^bits, every entry used
    codes: torch.Tensor  # the weight's shape, int16 (int32 from 16 bits), 0 where pruned
    values: torch.Tensor  # the shared weights: codebook[codes], pruned weights exactly 0


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of sorted ``centroids`` for each of ``x`` (ties to the lower)."""
    mids = (centroids[1:] + centroids[:-1]) / 2
    return torch.bucketize(x, mids, right=False)


def _lloyd(xs: np.ndarray, k: int) -> np.ndarray:
    """Sorted centroids (float64) of 1-D k-means on sorted ``xs`` (float64), linear
    initialisation.

    In one dimension a cluster is a run of the sorted weights, so each pass finds the runs'
    ends by binary search and their sums from a prefix sum: O(k log n) a pass, after one
    sort (numpy: a pass is a few small array operations, where torch's per-call cost
    would dominate).
    """
    prefix = np.concatenate([[0.0], np.cumsum(xs)])
    centroids = np.linspace(xs[0], xs[-1], k)
    bounds = None
    for _ in range(MAX_ITERATIONS):
        mids = (centroids[1:] + centroids[:-1]) / 2
        # a weight equal to a midpoint goes to the lower centroid, as in _nearest
        new = np.concatenate([[0], np.searchsorted(xs, mids, side="right"), [xs.size]])
        if bounds is not None and np.array_equal(new, bounds):
            break
        bounds = new
        counts = np.diff(bounds)
        sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
        moved = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        centroids = np.sort(moved)
    return centroids


def kmeans_codebook(
    w: torch.Tensor, bits: int, mask: torch.Tensor | None = None
) -> Codebook:
    """The k-means codebook of ``w``'s kept weights with at most ``2^bits`` centroids.

    ``mask`` (bool, ``w``'s shape, True = kept) marks the weights pruning kept. ``w`` is
    never changed. Deterministic: the same weights give the same codebook.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"A k-means codebook needs 1 to 16 bits; got {bits}.")
    w = w.detach().float()
    flat = w.reshape(-1)
    kept = None if mask is None else mask.reshape(-1).bool()
    x = flat if kept is None else flat[kept]
    code_dtype = torch.int16 if bits < 16 else torch.int32
    if x.numel() == 0:  # everything pruned: no centroid at all
        return Codebook(torch.zeros(0), torch.zeros(w.shape, dtype=code_dtype), torch.zeros_like(w))
    k = 2**bits
    xs = torch.sort(x).values
    distinct = xs[torch.cat([torch.tensor([True]), xs[1:] != xs[:-1]])]
    if distinct.numel() <= k:  # already shared: the values themselves, exactly
        codebook = distinct
        idx = torch.searchsorted(codebook, x)
    else:
        centroids = torch.from_numpy(_lloyd(xs.double().numpy(), k)).float()
        used = centroids[torch.bincount(_nearest(x, centroids), minlength=k) > 0]
        # float32 rounding may make two neighbours equal: keep one
        codebook = used[torch.cat([torch.tensor([True]), used[1:] != used[:-1]])]
        idx = _nearest(x, codebook)
    codes = torch.zeros(flat.numel(), dtype=code_dtype)
    values = torch.zeros(flat.numel())
    if kept is None:
        codes, values = idx.to(code_dtype), codebook[idx]
    else:
        codes[kept] = idx.to(code_dtype)
        values[kept] = codebook[idx]
    return Codebook(codebook, codes.reshape(w.shape), values.reshape(w.shape))
