"""Streaming statistics per group, fed batch by batch; range policies read them.

Every observer takes batches ``x2`` of shape (G, K): G groups (per-channel rows, or one
row for per-tensor) and any number K of values per group in each batch, with an optional
bool ``kept`` mask of the same shape (values it marks False are not counted). The number
of groups is fixed by the first batch. An observer answers what it can:

- ``extremes()``: min and max per group of the values counted (+inf and -inf if none);
- ``moments()``: count, mean and population standard deviation per group;
- ``abs_quantile(q)``: the q-quantile of |x| per group, as ``torch.quantile`` interpolates;
- ``samples()``: values (G, S) and weights (G, S) that stand for the distribution, so a
  range can be scored by the weighted squared error of quantizing the samples.

:class:`MinMaxObserver` keeps extremes and moments only (Chan et al.'s pairwise update,
in float64). :class:`HistogramObserver` adds a running histogram of x whose range grows
by powers of two, so old bins merge into new ones exactly. :class:`TensorObserver` keeps
every value and gives exact answers: weights use it with one batch.

>>> import torch
>>> h = HistogramObserver(bins=8)
>>> h.update(torch.tensor([[0.5, -1.0]]))
>>> h.update(torch.tensor([[3.0, 0.25]]))  # the range grows from [-1, 1] to [-4, 4]
>>> h.counts.tolist(), h.radius.tolist()
([[0, 0, 0, 1, 2, 0, 0, 1]], [4.0])
>>> h.extremes()
(tensor([-1.]), tensor([3.]))
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "Moments", "Observer", "ExtremesObserver", "MinMaxObserver", "HistogramObserver",
    "TensorObserver",
]  # fmt: skip


class Moments(NamedTuple):
    """Count, mean and population standard deviation of the values counted, per group."""

    count: torch.Tensor  # int64 (G,)
    mean: torch.Tensor  # float32 (G,); 0 for a group with no values
    std: torch.Tensor  # float32 (G,); 0 for a group with no values


class Observer:
    """Base of the observers: ``update`` batch by batch, then read the statistics."""

    groups: int | None = None  # fixed by the first batch

    def update(self, x2: torch.Tensor, kept: torch.Tensor | None = None) -> None:
        """Count the values of a batch ``x2`` (G, K) that ``kept`` marks (all if None)."""
        raise NotImplementedError

    def extremes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Min and max per group (float32 (G,)); +inf and -inf for a group with no values."""
        raise NotImplementedError

    def moments(self) -> Moments:
        """Count, mean and standard deviation per group."""
        raise NotImplementedError

    def abs_quantile(self, q: float) -> torch.Tensor:
        """The ``q``-quantile (q in [0, 1]) of |x| per group (float32 (G,)); 0 if no values."""
        raise ValueError(
            f"A {type(self).__name__} keeps no distribution; a percentile range needs a "
            "HistogramObserver or a TensorObserver."
        )

    def samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Values (G, S) and how many values each stands for (G, S)."""
        raise ValueError(
            f"A {type(self).__name__} keeps no distribution; an mse range needs a "
            "HistogramObserver or a TensorObserver."
        )

    def _check(self, x2: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
        """``kept`` as a bool mask after checking the shapes; fixes the group count."""
        self._check_shape(x2)
        if kept is None:
            return torch.ones_like(x2, dtype=torch.bool)
        if kept.shape != x2.shape:
            raise ValueError(f"The kept mask has shape {kept.shape}, the batch {x2.shape}.")
        return kept.bool()

    def _check_shape(self, x2: torch.Tensor) -> None:
        if x2.dim() != 2 or not torch.is_floating_point(x2):
            raise ValueError(f"An observer takes float batches of shape (G, K); got {x2.shape}.")
        if self.groups is None:
            self.groups = x2.shape[0]
        if x2.shape[0] != self.groups:
            raise ValueError(
                f"This observer has {self.groups} groups but the batch has {x2.shape[0]} rows."
            )


def _check_finite(x2: torch.Tensor) -> None:
    if not torch.isfinite(x2).all():
        raise ValueError("The observed values contain NaN or infinite values.")


class ExtremesObserver(Observer):
    """Running min and max per group, nothing else: the cheapest pass, all a min-max range
    needs (activation calibration runs it over every edge of every batch)."""

    def __init__(self) -> None:
        self.min = self.max = torch.zeros(0)  # (G,) float32

    def update(self, x2: torch.Tensor, kept: torch.Tensor | None = None) -> None:
        if kept is not None:
            raise ValueError("An ExtremesObserver counts every value; it takes no kept mask.")
        self._check_shape(x2)
        if not x2.shape[1]:
            return
        lo, hi = x2.detach().amin(dim=1).float(), x2.detach().amax(dim=1).float()
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):  # NaN propagates
            raise ValueError("The observed values contain NaN or infinite values.")
        if not self.min.numel():
            self.min, self.max = lo, hi
        else:
            self.min, self.max = torch.minimum(self.min, lo), torch.maximum(self.max, hi)

    def extremes(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.groups or 0
        if not self.min.numel():
            return torch.full((g,), math.inf), torch.full((g,), -math.inf)
        return self.min, self.max


class MinMaxObserver(Observer):
    """Running min, max, count, mean and spread (sum of squared deviations) per group."""

    def __init__(self) -> None:
        self.count = torch.zeros(0, dtype=torch.int64)  # (G,)
        self.mean = self.m2 = torch.zeros(0, dtype=torch.float64)  # (G,)
        self.min = self.max = torch.zeros(0)  # (G,) float32

    def update(self, x2: torch.Tensor, kept: torch.Tensor | None = None) -> None:
        """Count the values of a batch ``x2`` (G, K) that ``kept`` marks (all if None)."""
        first = self.groups is None
        kept = self._check(x2, kept)
        _check_finite(x2)
        if first:
            self._start(x2.shape[0])
        if x2.shape[1]:
            self._accumulate(x2.detach(), kept)

    def _start(self, g: int) -> None:
        self.count = torch.zeros(g, dtype=torch.int64)
        self.mean = self.m2 = torch.zeros(g, dtype=torch.float64)
        self.min, self.max = torch.full((g,), math.inf), torch.full((g,), -math.inf)

    def _accumulate(self, x2: torch.Tensor, kept: torch.Tensor) -> None:
        self.min = torch.minimum(self.min, torch.where(kept, x2, math.inf).amin(dim=1).float())
        self.max = torch.maximum(self.max, torch.where(kept, x2, -math.inf).amax(dim=1).float())
        x = x2.double()
        n_b = kept.sum(dim=1)
        mean_b = (x * kept).sum(dim=1) / n_b.clamp(min=1)
        m2_b = (((x - mean_b[:, None]) * kept) ** 2).sum(dim=1)
        # merge two (count, mean, M2) summaries: Chan, Golub and LeVeque (1979)
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * n_b / n.clamp(min=1)
        self.m2 = self.m2 + m2_b + delta**2 * self.count * n_b / n.clamp(min=1)
        self.count = n

    def extremes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Min and max per group (float32 (G,)); +inf and -inf for a group with no values."""
        return self.min, self.max

    def moments(self) -> Moments:
        """Count, mean and standard deviation per group."""
        var = self.m2 / self.count.clamp(min=1)
        return Moments(self.count, self.mean.float(), var.sqrt().float())


class HistogramObserver(MinMaxObserver):
    """A running histogram of x per group over [-radius, radius], plus min/max and moments.

    ``bins`` (even) bins of width 2 * radius / bins, zero on an edge. When a batch reaches
    beyond the radius it doubles as often as needed; every old bin then lies inside one
    new bin, so counts merge exactly. Quantiles and samples are exact to within a bin.
    """

    def __init__(self, bins: int = 2048) -> None:
        super().__init__()
        if bins < 2 or bins % 2:
            raise ValueError(f"A histogram needs an even number of bins (2 or more); got {bins}.")
        self.bins = bins
        self.counts = torch.zeros(0, bins, dtype=torch.int64)  # (G, bins)
        self.radius = torch.zeros(0, dtype=torch.float64)  # (G,); 0 until a nonzero value

    def _start(self, g: int) -> None:
        super()._start(g)
        self.counts = torch.zeros(g, self.bins, dtype=torch.int64)
        self.radius = torch.zeros(g, dtype=torch.float64)

    def _accumulate(self, x2: torch.Tensor, kept: torch.Tensor) -> None:
        super()._accumulate(x2, kept)
        g, half = x2.shape[0], self.bins // 2
        x = x2.double()
        self._grow(torch.where(kept, x.abs(), 0.0).amax(dim=1))
        radius = torch.where(self.radius > 0, self.radius, 1.0)  # all zeros: any radius
        # x * half is exact and the division rounds once, so no value lands one bin off
        idx = (torch.floor(x * half / radius[:, None]) + half).clamp(0, self.bins - 1).long()
        flat = (torch.arange(g)[:, None] * self.bins + idx)[kept]
        self.counts = self.counts + torch.bincount(flat, minlength=g * self.bins).reshape(g, -1)

    def _grow(self, amax: torch.Tensor) -> None:
        """Double each group's radius until it covers ``amax``, merging old bins exactly."""
        empty = self.radius == 0  # every value so far was 0: its bin stays, the radius is set
        ratio = torch.where(empty | (amax <= self.radius), 1.0, amax / self.radius)
        k = torch.ceil(torch.log2(ratio))
        k = torch.where(~empty & (self.radius * 2**k < amax), k + 1, k)  # log2 rounding
        self.radius = torch.where(empty, amax, self.radius * 2**k)
        if not bool((k > 0).any()):
            return
        half = self.bins // 2
        # old bin i covers [(i - half) w, (i - half + 1) w); with width w * 2^k it falls in
        # new bin floor((i - half) / 2^k) + half (k capped: beyond log2(bins) it is 0 or -1)
        step = (2 ** k.clamp(max=62).long())[:, None]
        i = torch.arange(self.bins)[None, :] - half
        new = torch.div(i, step, rounding_mode="floor") + half
        g = self.counts.shape[0]
        flat = (torch.arange(g)[:, None] * self.bins + new).reshape(-1)
        merged = torch.zeros(g * self.bins, dtype=torch.int64)
        self.counts = merged.index_add_(0, flat, self.counts.reshape(-1)).reshape(g, -1)

    def _width(self) -> torch.Tensor:
        return self.radius / (self.bins // 2)  # (G,) float64

    def abs_quantile(self, q: float) -> torch.Tensor:
        """The ``q``-quantile (q in [0, 1]) of |x| per group (float32 (G,)); 0 if no values.

        Each order statistic is placed inside its bin (its rank spread evenly over the bin)
        and neighbours are interpolated like ``torch.quantile``: off by less than a bin.
        """
        half = self.bins // 2
        counts = self.counts[:, half:] + self.counts[:, :half].flip(1)  # |x| bins from 0 up
        cum = counts.cumsum(dim=1)
        n = cum[:, -1]
        t = q * (n - 1).clamp(min=0).double()
        i = torch.floor(t).long()
        lower = self._order_statistic(counts, cum, i)
        upper = self._order_statistic(counts, cum, torch.minimum(i + 1, (n - 1).clamp(min=0)))
        value = lower + (t - i) * (upper - lower)
        return torch.where(n > 0, value, 0.0).float()

    def _order_statistic(
        self, counts: torch.Tensor, cum: torch.Tensor, rank: torch.Tensor
    ) -> torch.Tensor:
        """An estimate of the ``rank``-th smallest |x| (0-based) per group, inside its bin."""
        b = torch.searchsorted(cum, rank[:, None], right=True).clamp(max=counts.shape[1] - 1)
        in_bin = counts.gather(1, b).clamp(min=1)
        before = cum.gather(1, b) - counts.gather(1, b)
        pos = b + (rank[:, None] - before + 0.5) / in_bin
        return (pos * self._width()[:, None]).reshape(-1)

    def samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Bin centres (float32 (G, bins)) and bin counts (float64 (G, bins))."""
        j = torch.arange(self.bins, dtype=torch.float64) - self.bins // 2 + 0.5
        return (j[None, :] * self._width()[:, None]).float(), self.counts.double()


class TensorObserver(Observer):
    """Keeps every value it is fed: exact statistics, for weights (one batch) or small sets.

    The values are assumed finite (``quantize_with_params`` checks weights once, before).
    """

    def __init__(self) -> None:
        self.values = torch.empty(0, 0)  # (G, K) every batch side by side
        self.kept = torch.empty(0, 0, dtype=torch.bool)

    def update(self, x2: torch.Tensor, kept: torch.Tensor | None = None) -> None:
        """Keep the values of a batch ``x2`` (G, K) and its ``kept`` mask (all if None)."""
        first = self.groups is None
        kept = self._check(x2, kept)
        if first:
            self.values, self.kept = x2.detach(), kept
        else:
            self.values = torch.cat([self.values, x2.detach()], dim=1)
            self.kept = torch.cat([self.kept, kept], dim=1)

    def extremes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Min and max per group (float32 (G,)); +inf and -inf for a group with no values."""
        lo = torch.where(self.kept, self.values, math.inf).amin(dim=1)
        hi = torch.where(self.kept, self.values, -math.inf).amax(dim=1)
        return lo, hi

    def moments(self) -> Moments:
        """Count, mean and standard deviation per group (two passes over the values)."""
        x, kept = self.values, self.kept
        count = kept.sum(dim=1)
        n = count.clamp(min=1)
        mean = (x * kept).sum(dim=1) / n
        var = (((x - mean[:, None]) * kept) ** 2).sum(dim=1) / n
        return Moments(count, mean, var.sqrt())

    def abs_quantile(self, q: float) -> torch.Tensor:
        """The ``q``-quantile (q in [0, 1]) of |x| per group (float32 (G,)); 0 if no values."""
        a = torch.where(self.kept, self.values.abs(), torch.tensor(math.nan))
        return torch.nan_to_num(torch.nanquantile(a, q, dim=1), nan=0.0)

    def samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The values themselves (G, K), each standing for 1 (kept) or 0 (not kept) values."""
        return self.values, self.kept.to(self.values.dtype)
