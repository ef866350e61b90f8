"""Activation quantization: calibrate a range per edge, then fake-quantize where values flow.

Edges are points of the shared graph (:mod:`qcore.graph`): the network's input, the input
of every weight layer and the output of every addition (residuals). Calibration runs the
float graph over the calibration split batch by batch with a :class:`HistogramObserver`
on each edge, then the config's observer policy turns each histogram into a range:

- ``minmax``: [min(x, 0), max(x, 0)], as ``torch.ao.quantization.MinMaxObserver``.
- ``percentile``: |x| clipped at its ``percentile``-th percentile.
- ``mse``: the range with the least squared error over the histogram.
- ``entropy``: the threshold t whose 2^b-level quantized histogram of |x| on [0, t] has
  the least KL divergence from the observed one (TensorRT's calibration). The bin of
  zeros is left out (zero is exact at any threshold; ReLU outputs hold many). On an edge
  whose histogram has a tall spike away from zero (MNIST's input: the background at one
  value, strokes saturated at another) it clips hard; min-max or percentile suit it better.

A calibrated range becomes per-tensor qparams, and the activation runs as
``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``.
Calibration depends only on the float model, the calibration data and the activation
config, so it is cached per (graph, data, config): moving a weight slider never recalibrates.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qcore.affine import QParams, fake_quantize, qparams_from_range
from qcore.config import ActQuantConfig
from qcore.graph import Graph
from qcore.observers import HistogramObserver
from qcore.ranges import mse_range

__all__ = ["ActRange", "activation_edges", "calibrate", "act_points", "entropy_threshold"]

CALIB_BINS = 2048
CALIB_BATCH = 256
# graph -> {(data key, config): ranges}; a few entries per graph (observer x bits choices)
_CALIBRATED: weakref.WeakKeyDictionary[Graph, dict[tuple, dict[str, ActRange]]] = (
    weakref.WeakKeyDictionary()
)
_LOCK = threading.Lock()
MAX_CALIBRATIONS_PER_GRAPH = 16


@dataclass(frozen=True, eq=False)
class ActRange:
    """The calibrated range of one edge and the per-tensor qparams it gives."""

    edge: str
    lo: float  # calibrated range, lo <= 0 <= hi
    hi: float
    observed_min: float  # what the calibration split showed
    observed_max: float
    qparams: QParams  # one group
    bits: int
    symmetric: bool

    @property
    def scale(self) -> float:
        return float(self.qparams.scale[0])

    @property
    def zero_point(self) -> int:
        return int(self.qparams.zero_point[0])

    @property
    def grid_range(self) -> tuple[float, float]:
        """The values the codes can take: [(qmin - zp) * scale, (qmax - zp) * scale]."""
        qp = self.qparams
        return ((qp.qmin - self.zero_point) * self.scale, (qp.qmax - self.zero_point) * self.scale)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` rounded to this edge's grid (same shape)."""
        return fake_quantize(x.reshape(1, -1), self.qparams).reshape(x.shape)


def activation_edges(graph: Graph, layers: Sequence[str] | None = None) -> list[str]:
    """The edges quantized: the input, weight-layer inputs (of ``layers``), additions."""
    keep = set(graph.layers if layers is None else layers)
    out = []
    for name in graph.point_names():
        if name.endswith(".input"):
            if name[: -len(".input")] in keep:
                out.append(name)
        elif name == "input" or name.startswith(("add", "iadd")):
            out.append(name)
    return out


def _data_key(data) -> tuple:
    return (getattr(data, "name", "?"), getattr(data, "split", "?"), data.x.data_ptr(),
            tuple(data.x.shape))  # fmt: skip


def _cached_ranges(per_graph: dict[tuple, dict[str, ActRange]], key: tuple
                   ) -> dict[str, ActRange] | None:  # fmt: skip
    """The ranges of ``key``'s edges from a calibration of the same data and config over
    these edges or more: an edge's observer sees the same values whichever other edges are
    observed (observers pass values on unchanged), so the ranges are the same ones."""
    if key in per_graph:
        return per_graph[key]
    data, cfg, edges = key
    for (d, c, more), ranges in per_graph.items():
        if d == data and c == cfg and set(edges) <= set(more):
            return {e: ranges[e] for e in edges}
    return None


def calibrate(
    graph: Graph,
    data,
    cfg: ActQuantConfig,
    edges: Sequence[str],
    batch_size: int = CALIB_BATCH,
) -> dict[str, ActRange]:
    """Ranges per edge from the float graph run over ``data`` (cached per graph)."""
    if getattr(data, "split", None) == "test":
        raise ValueError(
            "Activations are calibrated on the calibration split, never on the test split; "
            "pass the 'calib' split."
        )
    if len(data.x) == 0:
        raise ValueError("The calibration split is empty; activations cannot be calibrated.")
    key = (_data_key(data), cfg, tuple(edges))
    with _LOCK:
        cached = _cached_ranges(_CALIBRATED.get(graph, {}), key)
    if cached is not None:
        return cached
    observers = {e: HistogramObserver(bins=CALIB_BINS) for e in edges}

    def observe(edge: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def point(t: torch.Tensor) -> torch.Tensor:
            observers[edge].update(t.detach().reshape(1, -1).float())
            return t
        return point

    points = {e: observe(e) for e in edges}
    with torch.inference_mode():
        for i in range(0, data.x.shape[0], batch_size):
            graph.run(data.x[i : i + batch_size], points=points)
    ranges = {e: _range(e, obs, cfg) for e, obs in observers.items()}
    with _LOCK:
        per_graph = _CALIBRATED.setdefault(graph, {})
        if len(per_graph) >= MAX_CALIBRATIONS_PER_GRAPH:
            per_graph.pop(next(iter(per_graph)))
        per_graph[key] = ranges
    return ranges


def _range(edge: str, obs: HistogramObserver, cfg: ActQuantConfig) -> ActRange:
    mn, mx = (t.float() for t in obs.extremes())
    lo, hi = torch.minimum(mn, torch.zeros(1)), torch.maximum(mx, torch.zeros(1))
    if cfg.observer == "percentile":
        c = obs.abs_quantile(cfg.percentile / 100.0).float()
        lo, hi = torch.maximum(lo, -c), torch.minimum(hi, c)
    elif cfg.observer == "mse":
        lo, hi = mse_range(obs, 1.0, cfg.bits, cfg.symmetric)
        lo, hi = lo.float(), hi.float()
    elif cfg.observer == "entropy":
        signed = bool(mn[0] < 0)
        levels = 2 ** (cfg.bits - 1) if signed or cfg.symmetric else 2**cfg.bits
        hist = _abs_histogram(obs)
        hist[0] = 0.0  # zeros (every ReLU's many) are exact at any threshold: they decide nothing
        t = entropy_threshold(hist, float(obs.radius[0]), levels)
        lo, hi = torch.maximum(lo, torch.tensor([-t])), torch.minimum(hi, torch.tensor([t]))
    qp = qparams_from_range(lo, hi, cfg.bits, cfg.symmetric, pow2=cfg.scale == "pow2")
    return ActRange(edge, float(lo[0]), float(hi[0]), float(mn[0]), float(mx[0]), qp, cfg.bits,
                    cfg.symmetric)  # fmt: skip


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


def act_points(ranges: dict[str, ActRange]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Fake-quant points for :meth:`qcore.graph.Graph.run`, one per calibrated edge."""
    return {e: r.fake_quantize for e, r in ranges.items()}
