"""Range policies: from an observer's statistics to the range [lo, hi] a quantizer covers.

Every policy is ``policy(obs, c, bits, symmetric) -> (lo, hi)``, each (G,) float32, with
``c`` the clip setting in that policy's units. The range always holds 0 (an asymmetric
grid needs it for an exact zero point) and is symmetric, [-b, b], for symmetric or 1-bit
quantizers. The policies:

- ``ratio``: a fraction ``c`` of the observed range; 1.0 keeps it whole.
- ``absolute``: at most [-c, c].
- ``sigma``: ``c`` standard deviations, never wider than the observed range.
- ``percentile``: the ``c``-th percentile (0..100] of |x|.
- ``mse``: the fraction of the observed range whose quantizer has the least squared error
  on the observer's samples (the values themselves, or histogram bins weighted by count).
- ``minmax``: the observed range as it is (``c`` unused), as
  ``torch.ao.quantization.MinMaxObserver``.
- ``entropy``: the threshold t on |x| whose 2^b-level quantized histogram has the least
  KL divergence from the observed one (TensorRT's calibration); needs a histogram
  observer. The bin of zeros is left out (zero is exact at any threshold; ReLU outputs
  hold many). On an edge whose histogram has a tall spike away from zero (MNIST's input:
  the background at one value, strokes saturated at another) it clips hard; min-max or
  percentile suit it better.

Weights use ``ratio`` .. ``mse`` (``QuantConfig.clip_mode``); activations use ``minmax``,
``percentile``, ``mse`` and ``entropy`` (``ActQuantConfig.observer``): one table for both.

>>> import torch
>>> from qcore.observers import TensorObserver
>>> obs = TensorObserver()
>>> obs.update(torch.tensor([[-4.0, 1.0, -2.0, 3.0, 5.0]]))
>>> ratio_range(obs, 0.5, 4, True), ratio_range(obs, 0.5, 4, False)
((tensor([-2.5000]), tensor([2.5000])), (tensor([-2.]), tensor([2.5000])))
>>> percentile_range(obs, 50.0, 4, True)
(tensor([-3.]), tensor([3.]))
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from qcore.affine import fake_quantize, qparams_from_range
from qcore.observers import HistogramObserver, Observer

__all__ = [
    "POLICIES",
    "Policy",
    "choose_range",
    "ratio_range",
    "absolute_range",
    "sigma_range",
    "percentile_range",
    "mse_range",
    "minmax_range",
    "entropy_range",
    "entropy_threshold",
]

Policy = Callable[[Observer, float, int, bool], tuple[torch.Tensor, torch.Tensor]]


def _extent(obs: Observer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The observed range widened to hold 0, and its largest magnitude: lo, hi, amax."""
    lo, hi = obs.extremes()
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)  # a group with no values gets [0, 0]
    return lo, hi, torch.maximum(-lo, hi)


def _within(
    obs: Observer, bound: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """[-bound, bound], or for an asymmetric grid the observed range cut to it."""
    if symmetric or bits == 1:
        return -bound, bound
    lo, hi, _ = _extent(obs)
    return torch.maximum(lo, -bound), torch.minimum(hi, bound)


def ratio_range(
    obs: Observer, c: float, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fraction ``c`` of the observed range (of max|x| each way when symmetric)."""
    lo, hi, amax = _extent(obs)
    return (-c * amax, c * amax) if symmetric or bits == 1 else (c * lo, c * hi)


def absolute_range(
    obs: Observer, c: float, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """[-c, c], cut to the observed range when asymmetric."""
    _, _, amax = _extent(obs)
    return _within(obs, torch.full_like(amax, c), bits, symmetric)


def sigma_range(
    obs: Observer, c: float, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``c`` standard deviations each way, never beyond max|x|."""
    _, _, amax = _extent(obs)
    return _within(obs, torch.minimum(c * obs.moments().std, amax), bits, symmetric)


def percentile_range(
    obs: Observer, c: float, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``c``-th percentile of |x| each way."""
    return _within(obs, obs.abs_quantile(c / 100.0), bits, symmetric)


def mse_range(
    obs: Observer, c: float, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fraction of the observed range with the least squared error; ``c`` is unused.

    At 1 bit the whole range: mean|x| is already the least-squares level for sign(x).
    """
    lo, hi, amax = _extent(obs)
    if bits == 1:
        return -amax, amax
    r = _mse_ratio(obs, lo, hi, amax, bits, symmetric)
    return (-r * amax, r * amax) if symmetric else (r * lo, r * hi)


def _mse_ratio(
    obs: Observer,
    lo: torch.Tensor,
    hi: torch.Tensor,
    amax: torch.Tensor,
    bits: int,
    symmetric: bool,
) -> torch.Tensor:
    """Per group, the fraction r of the range whose quantizer errs least on the samples.

    A coarse grid (0.05 .. 1.0) and then a fine one (steps of 0.0025) around the best.
    """
    values, weights = obs.samples()  # (G, S) each

    def error(r: torch.Tensor) -> torch.Tensor:
        qp = qparams_from_range(-r * amax, r * amax, bits, True) if symmetric else (
            qparams_from_range(r * lo, r * hi, bits, False)
        )
        return ((fake_quantize(values, qp) - values) ** 2 * weights).sum(dim=1)

    best_r = torch.ones(values.shape[0])
    best_e = error(best_r)

    def consider(r: torch.Tensor) -> None:
        nonlocal best_r, best_e
        e = error(r)
        better = e < best_e
        best_r, best_e = torch.where(better, r, best_r), torch.where(better, e, best_e)

    for s in torch.linspace(0.05, 0.95, 19):
        consider(torch.full_like(best_r, float(s)))
    coarse = best_r.clone()
    for s in torch.linspace(-0.05, 0.05, 41):
        consider((coarse + s).clamp(0.01, 1.0))
    return best_r


def minmax_range(
    obs: Observer, c: float, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The observed range, widened to hold 0; ``c`` is unused."""
    lo, hi, _ = _extent(obs)
    return lo, hi


def entropy_range(
    obs: Observer, c: float, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The observed range cut at the KL-optimal threshold of |x| (one group); ``c`` unused."""
    if not isinstance(obs, HistogramObserver):
        raise ValueError("The entropy range policy needs a histogram of the values.")
    lo, hi, _ = _extent(obs)
    mn, _ = obs.extremes()
    signed = bool(mn[0] < 0)
    levels = 2 ** (bits - 1) if signed or symmetric else 2**bits
    hist = _abs_histogram(obs)
    hist[0] = 0.0  # zeros (every ReLU's many) are exact at any threshold: they decide nothing
    t = entropy_threshold(hist, float(obs.radius[0]), levels)
    return torch.maximum(lo, torch.tensor([-t])), torch.minimum(hi, torch.tensor([t]))


def _abs_histogram(obs: HistogramObserver) -> np.ndarray:
    """Counts of |x| on [0, radius] (half as many bins): the two halves folded together."""
    counts = obs.counts[0].double().numpy()
    half = counts.size // 2
    return counts[half:] + counts[:half][::-1]


def entropy_threshold(hist: np.ndarray, top: float, levels: int) -> float:
    """The clip threshold on |x| with the least KL divergence after quantizing to ``levels``.

    ``hist`` counts |x| in equal bins over [0, top]. For each candidate threshold (a bin
    edge i >= levels) the reference distribution p is the histogram cut at i with the
    outliers added to its last bin; q merges the cut histogram (without them) into
    ``levels`` equal groups and spreads each group's count evenly over p's nonzero bins.
    The threshold of the least KL(p || q) is returned (the whole range when the histogram
    has too few bins).

    >>> h = np.round(1000 * np.exp(-np.arange(64) / 3)); h[63] = 1   # a tail, one outlier
    >>> float(entropy_threshold(h, 64.0, 4))   # clips the tail: 4 levels go to the mass
    12.0
    """
    n = hist.size
    if n <= levels or hist.sum() == 0:
        return top
    width = top / n
    best_i, best_kl = n, np.inf
    step = max(1, (n - levels) // 256)  # at most ~256 candidates
    for i in range(levels, n + 1, step):
        sliced = hist[:i]
        p = sliced.copy()
        p[-1] += hist[i:].sum()  # the reference keeps the clipped mass in its last bin
        nonzero = p > 0
        group = np.arange(i) * levels // i  # which of the ``levels`` groups each bin is in
        sums = np.bincount(group, weights=sliced, minlength=levels)  # q: without the clip
        filled = np.bincount(group, weights=nonzero, minlength=levels)
        q = np.where(nonzero, sums[group] / np.maximum(filled[group], 1), 0.0)
        if q.sum() == 0:  # everything below this threshold is empty: nothing to compare
            continue
        pn, qn = p[nonzero] / p.sum(), q[nonzero] / q.sum()
        qn = np.maximum(qn, 1e-12)  # a clipped-in bin q left empty: a large, finite penalty
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i * width


POLICIES: dict[str, Policy] = {
    "ratio": ratio_range,
    "absolute": absolute_range,
    "sigma": sigma_range,
    "percentile": percentile_range,
    "mse": mse_range,
    "minmax": minmax_range,
    "entropy": entropy_range,
}


def choose_range(
    obs: Observer, mode: str, c: float, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The range [lo, hi] (each (G,)) that policy ``mode`` picks from ``obs``."""
    if mode not in POLICIES:
        raise ValueError(f"The range policy must be one of {', '.join(POLICIES)}; got {mode!r}.")
    return POLICIES[mode](obs, c, bits, symmetric)
