"""Magnitude pruning as masks: compute the mask, then apply it. Inputs are never changed.

Unstructured pruning zeroes floor(rate * n) weights with the smallest |w| (ties broken by
position, so the count is exact). Structured pruning zeroes whole output channels
(dim 0), smallest L2 norm first.

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
    "prune_count", "magnitude_mask", "channel_mask", "layer_mask", "global_masks", "prune_tensor",
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


def channel_mask(w: torch.Tensor, rate: float) -> torch.Tensor:
    """Bool mask (same shape as ``w``) removing floor(rate * C) output channels by L2 norm."""
    if w.dim() < 2:
        return magnitude_mask(w, rate)
    keep = _smallest_mask(_channel_scores(w, rms=False), prune_count(rate, w.shape[0]))
    return keep.reshape(-1, *([1] * (w.dim() - 1))).expand_as(w).clone()


def global_masks(weights: Mapping[str, torch.Tensor], cfg: PruneConfig) -> dict[str, torch.Tensor]:
    """Masks for several tensors ranked together (``scope="global"``).

    Unstructured: the floor(rate * total) smallest |w| over all tensors.
    Structured: the floor(rate * channels) output channels with the smallest RMS.
    """
    names = list(weights)
    if not names:
        return {}
    if cfg.structured:
        scores = [_channel_scores(weights[n], rms=True) for n in names]
    else:
        scores = [weights[n].detach().abs().float().reshape(-1) for n in names]
    flat = torch.cat(scores)
    keep = _smallest_mask(flat, prune_count(cfg.rate, flat.numel()))
    masks, start = {}, 0
    for n, s in zip(names, scores, strict=True):
        part, start = keep[start : start + s.numel()], start + s.numel()
        w = weights[n]
        if cfg.structured:
            part = part.reshape(-1, *([1] * (w.dim() - 1))).expand_as(w).clone()
        masks[n] = part.reshape(w.shape)
    return masks


def layer_mask(w: torch.Tensor, cfg: PruneConfig) -> torch.Tensor:
    """The mask ``cfg`` gives a single tensor (layer scope)."""
    return channel_mask(w, cfg.rate) if cfg.structured else magnitude_mask(w, cfg.rate)


def prune_tensor(w: torch.Tensor, cfg: PruneConfig) -> torch.Tensor:
    """A copy of ``w`` with the pruned weights set to exactly zero."""
    return torch.where(layer_mask(w, cfg), w.detach(), torch.zeros((), dtype=w.dtype))
