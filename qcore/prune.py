"""Magnitude pruning as masks: compute the mask, then apply it. Inputs are never changed.

Unstructured pruning zeroes floor(rate * n) weights with the smallest |w| (ties broken by
position, so the count is exact). Structured pruning zeroes whole output channels
(dim 0), smallest L2 norm first, and never a layer's last channel: per layer it removes
min(floor(rate * C), C - 1) of the C channels; across layers (``scope="global"``) it
counts weights, not channels (see :func:`global_channel_masks`).

>>> import torch
>>> prune_tensor(torch.tensor([0.5, -0.1, 2.0, -3.0]), PruneConfig(rate=0.5)).tolist()
[0.0, 0.0, 2.0, -3.0]
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from qcore.config import PruneConfig

__all__ = [
    "prune_count", "magnitude_mask", "channel_mask", "global_channel_masks", "layer_mask",
    "global_masks", "prune_tensor",
]  # fmt: skip


def prune_count(rate: float, n: int) -> int:
    """How many of ``n`` items a pruning ``rate`` removes: floor(rate * n).

    >>> prune_count(0.29, 100), prune_count(0.5, 3), prune_count(0.99, 10)
    (29, 1, 9)
    """
    # the small epsilon keeps 0.29 * 100 = 28.999999999999996 from flooring to 28
    return min(n, int(math.floor(rate * n + 1e-9)))


def _smallest_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask over flat ``scores`` that is False for the ``k`` smallest.

    Ties at the threshold are pruned first by position, the same choice a stable sort
    makes, but found in linear time with ``kthvalue`` instead of a full sort.
    """
    flat = scores.reshape(-1)
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if k <= 0:
        return keep
    if k >= flat.numel():
        return ~keep
    threshold = torch.kthvalue(flat, k).values
    below = flat < threshold
    keep[below] = False
    ties = torch.nonzero(flat == threshold).reshape(-1)[: k - int(below.sum())]
    keep[ties] = False
    return keep


def _channel_scores(w: torch.Tensor, rms: bool) -> torch.Tensor:
    w2 = w.detach().float().reshape(w.shape[0], -1)
    norm = w2.norm(dim=1)
    return norm / math.sqrt(w2.shape[1]) if rms else norm


def magnitude_mask(w: torch.Tensor, rate: float) -> torch.Tensor:
    """Bool mask (same shape as ``w``): False for the floor(rate * n) smallest |w|."""
    keep = _smallest_mask(w.detach().abs().float(), prune_count(rate, w.numel()))
    return keep.reshape(w.shape)


def _rows_to_mask(keep: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A per-channel keep vector (C,) broadcast to a mask of ``w``'s shape."""
    return keep.reshape(-1, *([1] * (w.dim() - 1))).expand_as(w).clone()


def channel_mask(w: torch.Tensor, rate: float) -> torch.Tensor:
    """Bool mask (same shape as ``w``) removing min(floor(rate * C), C - 1) output channels
    by L2 norm: a layer always keeps its strongest channel."""
    if w.dim() < 2:
        return magnitude_mask(w, rate)
    k = min(prune_count(rate, w.shape[0]), w.shape[0] - 1)
    return _rows_to_mask(_smallest_mask(_channel_scores(w, rms=False), k), w)


def global_channel_masks(
    weights: Mapping[str, torch.Tensor], rate: float
) -> dict[str, torch.Tensor]:
    """Structured masks over several tensors: whole output channels, counted in weights.

    Every output channel of every tensor is ranked by its RMS, ||w_c||_2 / sqrt(fan-in),
    so layers of different fan-in compare fairly (ties by layer order, then channel). The
    channels are removed in that order while fewer than ``target = floor(rate * total
    weights)`` weights are gone, so the last channel taken may overshoot the target by
    less than its own fan-in. A layer's last channel is never removed (its strongest one,
    the last in the ranking, is skipped), so a rate near 1 may stop short of the target.

    >>> a = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.3, 0.3, 0.3, 0.3]])  # rms 1, 0.3
    >>> b = torch.tensor([[3.0], [0.5], [0.2]])  # rms 3, 0.5, 0.2
    >>> m = global_channel_masks({"a": a, "b": b}, 0.3)  # target floor(0.3 * 11) = 3
    >>> m["a"][:, 0].tolist(), m["b"][:, 0].tolist()  # b[2] (1 weight), then a[1] (4)
    ([True, False], [True, True, False])
    """
    names = list(weights)
    if not names:
        return {}
    ws = [weights[n] for n in names]
    rows = [w.reshape(w.shape[0], -1) for w in ws]  # (C, fan-in) each
    scores = torch.cat([_channel_scores(r, rms=True) for r in rows])  # (total channels,)
    fan_in = torch.cat([torch.full((r.shape[0],), r.shape[1], dtype=torch.int64) for r in rows])
    layer_of = torch.cat([torch.full((r.shape[0],), i, dtype=torch.int64)
                          for i, r in enumerate(rows)])  # fmt: skip
    order = torch.sort(scores, stable=True).indices  # ascending RMS, ties by position
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    # each layer's last channel in the ranking is never removed
    last = torch.zeros(len(rows), dtype=torch.int64).scatter_reduce(
        0, layer_of, rank, reduce="amax", include_self=False)
    protected = rank == last[layer_of]
    cand = order[~protected[order]]  # removal order, protected channels left out
    target = prune_count(rate, int(fan_in.sum()))
    removed_before = torch.cumsum(fan_in[cand], 0) - fan_in[cand]
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[cand[removed_before < target]] = False
    masks, start = {}, 0
    for n, w, r in zip(names, ws, rows, strict=True):
        part, start = keep[start : start + r.shape[0]], start + r.shape[0]
        masks[n] = _rows_to_mask(part, w)
    return masks


def global_masks(weights: Mapping[str, torch.Tensor], cfg: PruneConfig) -> dict[str, torch.Tensor]:
    """Masks for several tensors ranked together (``scope="global"``).

    Unstructured: the floor(rate * total) smallest |w| over all tensors.
    Structured: whole channels by RMS until floor(rate * total) weights are removed
    (:func:`global_channel_masks`).
    """
    if cfg.structured:
        return global_channel_masks(weights, cfg.rate)
    names = list(weights)
    if not names:
        return {}
    scores = [weights[n].detach().abs().float().reshape(-1) for n in names]
    keep = _smallest_mask(torch.cat(scores), prune_count(cfg.rate, sum(s.numel() for s in scores)))
    masks, start = {}, 0
    for n, s in zip(names, scores, strict=True):
        part, start = keep[start : start + s.numel()], start + s.numel()
        masks[n] = part.reshape(weights[n].shape)
    return masks


def layer_mask(w: torch.Tensor, cfg: PruneConfig) -> torch.Tensor:
    """The mask ``cfg`` gives a single tensor (layer scope)."""
    return channel_mask(w, cfg.rate) if cfg.structured else magnitude_mask(w, cfg.rate)


def prune_tensor(w: torch.Tensor, cfg: PruneConfig) -> torch.Tensor:
    """A copy of ``w`` with the pruned weights set to exactly zero."""
    return torch.where(layer_mask(w, cfg), w.detach(), torch.zeros((), dtype=w.dtype))
