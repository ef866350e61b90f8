"""Activation quantization: calibrate a range per edge, then fake-quantize where values flow.

Edges are points of the shared graph (:mod:`qcore.graph`): the network's input, the input
of every weight layer and the output of every addition (residuals). Calibration runs the
float graph over the calibration split batch by batch with a :class:`HistogramObserver`
on each edge, then the config's observer policy turns each histogram into a range:

``minmax``, ``percentile`` (at ``ActQuantConfig.percentile``), ``mse`` or ``entropy``:
entries of the one range-policy table in :mod:`qcore.ranges`, which the weights use too.

A calibrated range becomes per-tensor qparams, and the activation runs as
``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``.
Calibration depends only on the float model, the calibration data and the activation
config, so it is cached per (graph, data, config): moving a weight slider never recalibrates.
The statistics under it (extremes for min-max, histograms for the others) do not depend on
the bit width, so they are cached too: a new activation width needs no calibration pass.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qcore.affine import QParams, fake_quantize, qparams_from_range
from qcore.config import ActQuantConfig
from qcore.graph import Graph
from qcore.observers import ExtremesObserver, HistogramObserver, Observer
from qcore.ranges import choose_range, entropy_threshold

__all__ = ["ActRange", "activation_edges", "calibrate", "act_points", "entropy_threshold"]

CALIB_BINS = 2048
CALIB_BATCH = 256
# graph -> {(data key, config): ranges}; a few entries per graph (observer x bits choices)
_CALIBRATED: weakref.WeakKeyDictionary[Graph, dict[tuple, dict[str, ActRange]]] = (
    weakref.WeakKeyDictionary()
)
_LOCK = threading.Lock()
# graph -> {(data key, edges, kind, batch): observers}: the statistics ranges are made from
_STATISTICS: weakref.WeakKeyDictionary[Graph, dict[tuple, dict[str, Observer]]] = (
    weakref.WeakKeyDictionary()
)
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
        cached = _CALIBRATED.get(graph, {}).get(key)
    if cached is not None:
        return cached
    observers = _observe(graph, data, edges, cfg.observer == "minmax", batch_size)
    ranges = {e: _range(e, obs, cfg) for e, obs in observers.items()}
    _remember(_CALIBRATED, graph, key, ranges)
    return ranges


def _observe(graph: Graph, data, edges: Sequence[str], extremes_only: bool,
             batch_size: int) -> dict[str, Observer]:  # fmt: skip
    """The statistics of each edge over ``data`` (cached per graph): they do not depend on
    the bit width, so moving the activation slider derives new ranges without a pass.
    Min-max needs only the extremes; the other policies a histogram."""
    key = (_data_key(data), tuple(edges), extremes_only, batch_size)
    with _LOCK:
        cached = _STATISTICS.get(graph, {}).get(key)
    if cached is not None:
        return cached
    observers: dict[str, Observer] = {
        e: ExtremesObserver() if extremes_only else HistogramObserver(bins=CALIB_BINS)
        for e in edges
    }

    def observe(edge: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def point(t: torch.Tensor) -> torch.Tensor:
            observers[edge].update(t.detach().reshape(1, -1).float())
            return t
        return point

    points = {e: observe(e) for e in edges}
    with torch.inference_mode():
        for i in range(0, data.x.shape[0], batch_size):
            graph.run(data.inputs(slice(i, i + batch_size)), points=points)
    _remember(_STATISTICS, graph, key, observers)  # read-only from here on
    return observers


def _remember(cache: weakref.WeakKeyDictionary, graph: Graph, key: tuple, value) -> None:
    with _LOCK:
        per_graph = cache.setdefault(graph, {})
        if len(per_graph) >= MAX_CALIBRATIONS_PER_GRAPH:
            per_graph.pop(next(iter(per_graph)))
        per_graph[key] = value


def _range(edge: str, obs: Observer, cfg: ActQuantConfig) -> ActRange:
    mn, mx = (t.float() for t in obs.extremes())
    c = cfg.percentile if cfg.observer == "percentile" else 1.0
    lo, hi = (t.float() for t in choose_range(obs, cfg.observer, c, cfg.bits, cfg.symmetric))
    qp = qparams_from_range(lo, hi, cfg.bits, cfg.symmetric, pow2=cfg.scale == "pow2")
    return ActRange(edge, float(lo[0]), float(hi[0]), float(mn[0]), float(mx[0]), qp, cfg.bits,
                    cfg.symmetric)  # fmt: skip


def act_points(ranges: dict[str, ActRange]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Fake-quant points for :meth:`qcore.graph.Graph.run`, one per calibrated edge."""
    return {e: r.fake_quantize for e, r in ranges.items()}
