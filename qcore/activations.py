"""Activation quantization: calibrate a range per edge, then fake-quantize where values flow.

Edges are where an integer engine (torch.ao, ONNX Runtime, TensorRT) materialises a
tensor: the network's input and the output of each fused group: a conv or linear layer
with the BatchNorm and ReLU after it, an addition with the ReLU after it, any other op on
its own. Nothing inside a group is rounded, so a residual sum is stored once, after its
ReLU, and a convolution's output once, after its BatchNorm and ReLU. Pooling, flattening
and the identity keep their input's qparams (an average is rounded again to that grid).
The logits stay float unless ``ActQuantConfig(output=True)``. An edge is named after the
last node of its group (``relu1``: conv1 + relu1 of mnist-cnn; ``layer1_relu2``: an
addition and its ReLU); :func:`placement` says which nodes each edge closes.

Calibration runs the float graph over the calibration split batch by batch with a
:class:`HistogramObserver` on each edge, then the config's observer policy turns each
histogram into a range:

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

import operator
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import fx, nn
from torch.nn import functional as F

from qcore.affine import QParams, qparams_from_range
from qcore.config import ActQuantConfig
from qcore.graph import Graph
from qcore.observers import ExtremesObserver, HistogramObserver, Observer
from qcore.ranges import choose_range, entropy_threshold

__all__ = [
    "ActRange", "Placement", "placement", "activation_edges", "calibrate", "calibrate_placed",
    "act_points", "entropy_threshold",
]  # fmt: skip

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
        """``x`` rounded to this edge's grid (same shape): qcore's formula
        (:func:`qcore.affine.fake_quantize`) in torch's one fused kernel, which computes it
        the same way in float32 (round(x * (1/scale)) + zp, clamp, - zp, * scale) and is
        bit for bit equal (``tests/test_activations.py``), in one pass instead of five."""
        qp = self.qparams
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, qp.qmin,
                                                     qp.qmax)  # fmt: skip


# how each op places activations (see the module docstring)
_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}
_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_RELU_FNS = {F.relu, F.relu6, torch.relu, "relu", "relu_"}
# ops whose output lies on their input's grid: no edge of their own, the input's qparams
_SAME_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Flatten, nn.Unflatten,
                 nn.Identity, nn.Dropout)  # fmt: skip
_SAME_FNS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool2d, torch.flatten,
             F.dropout, "flatten", "view", "reshape", "contiguous", "squeeze",
             "unsqueeze"}  # fmt: skip
# averages keep their input's qparams, but the mean of codes falls between levels: rounded again
_AVERAGE_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)  # fmt: skip
_AVERAGE_FNS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                F.adaptive_avg_pool2d}  # fmt: skip
# other tensor ops an engine runs on their own, each writing its output
_OTHER_FNS = {operator.mul, operator.sub, operator.matmul, torch.mul, torch.sub, torch.cat,
              torch.matmul, torch.sigmoid, torch.tanh, F.gelu, F.silu, F.sigmoid, F.hardswish,
              "mul", "sub", "sigmoid", "tanh", "matmul"}  # fmt: skip


@dataclass(frozen=True, eq=False)
class Placement:
    """Where an integer engine materialises the tensors of one graph.

    ``edges`` are calibrated, in graph order: ``"input"`` and each group's output, named
    after the group's last node (``groups[edge]`` lists its nodes). ``shared`` maps a
    pooling, flattening or identity node to the edge whose qparams it keeps; ``rounds``
    are those of them (averages) whose output is rounded to that grid again. ``inputs``
    gives each weight layer the point its input is read from (None: left float), and
    ``logits`` the edge that holds the network's output (left out of ``edges`` unless
    asked for).
    """

    edges: tuple[str, ...]
    groups: dict[str, tuple[str, ...]]
    shared: dict[str, str]
    rounds: tuple[str, ...]
    inputs: dict[str, str | None]
    logits: str | None

    def describe(self, edge: str) -> str:
        """A few words on what ``edge`` holds, e.g. "conv1 + relu1 output"."""
        if edge == "input":
            return "the network's input"
        if edge in self.shared:
            return f"{edge} output, on {self.shared[edge]}'s grid (pooling keeps its qparams)"
        if edge in self.groups:
            return " + ".join(self.groups[edge]) + " output"
        raise ValueError(f"No activation edge {edge!r}; the edges are {', '.join(self.edges)}.")


def _role(n: fx.Node, graph: Graph) -> str | None:
    """weight, bn, relu, add, same, average, other, or None (not a tensor op we place)."""
    if n.op == "call_module":
        if n.target in graph.layers:
            return "weight"
        mod = graph.module.get_submodule(n.target)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            return "bn"
        if isinstance(mod, _RELU_MODULES):
            return "relu"
        if isinstance(mod, _SAME_MODULES):
            return "same"
        if isinstance(mod, _AVERAGE_MODULES):
            return "average"
        return "other"
    if n.op not in ("call_function", "call_method"):
        return None
    t = n.target
    for role, targets in (("add", _ADDS), ("relu", _RELU_FNS), ("same", _SAME_FNS),
                          ("average", _AVERAGE_FNS), ("other", _OTHER_FNS)):  # fmt: skip
        try:
            if t in targets:
                return role
        except TypeError:  # an unhashable target
            return None
    return None


def _fused_next(n: fx.Node, graph: Graph, role: str) -> fx.Node | None:
    """The node after ``n`` that joins its group: its only reader, of role ``role``."""
    users = list(n.users)
    if len(users) == 1 and users[0].args and users[0].args[0] is n \
            and _role(users[0], graph) == role:
        return users[0]
    return None


def _label(n: fx.Node) -> str:
    return str(n.target) if n.op == "call_module" else n.name


def placement(graph: Graph, layers: Sequence[str] | None = None, output: bool = False) -> Placement:
    """The activation edges of ``graph`` as an integer engine fuses it (module docstring).

    Groups headed by a weight layer outside ``layers`` are left float; ``output=True``
    also quantizes the logits.
    """
    keep = set(graph.layers if layers is None else layers)
    taken: set[fx.Node] = set()
    carrier: dict[fx.Node, str] = {graph.input: "input"}  # value -> the point it is read from
    source: dict[fx.Node, str] = {graph.input: "input"}  # value -> the edge of its qparams
    groups: dict[str, tuple[str, ...]] = {}
    heads: dict[str, fx.Node] = {}
    shared: dict[str, str] = {}
    rounds: list[str] = []
    for n in graph.nodes:
        role = _role(n, graph)
        if n in taken or role is None:
            continue
        if role in ("same", "average"):
            arg = n.args[0] if n.args else None
            if isinstance(arg, fx.Node) and arg in source:
                source[n] = source[arg]
                shared[n.name] = source[arg]
                carrier[n] = n.name if role == "average" else carrier[arg]
                if role == "average":
                    rounds.append(n.name)
            continue
        members = [n]
        if role == "weight" and (bn := _fused_next(members[-1], graph, "bn")) is not None:
            members.append(bn)
        if role in ("weight", "add") and (
            (r := _fused_next(members[-1], graph, "relu")) is not None
        ):
            members.append(r)
        taken.update(members)
        last = members[-1]
        groups[last.name] = tuple(_label(m) for m in members)
        heads[last.name] = n
        carrier[last] = source[last] = last.name
    out = graph.output.args[0]
    logits = source.get(out) if isinstance(out, fx.Node) else None
    dropped = {e for e, head in heads.items()
               if head.op == "call_module" and head.target in graph.layers
               and head.target not in keep}  # fmt: skip
    edges = ["input"] + [e for e in heads if e not in dropped and (output or e != logits)]
    quantized = set(edges)
    shared = {k: v for k, v in shared.items() if v in quantized}
    inputs = {}
    for n in graph.nodes:
        if n.op == "call_module" and n.target in graph.layers:
            arg = n.args[0] if n.args else None
            point = carrier.get(arg) if isinstance(arg, fx.Node) else None
            inputs[str(n.target)] = point if point in quantized or point in shared else None
    return Placement(tuple(edges), groups, shared, tuple(r for r in rounds if r in shared),
                     inputs, logits)  # fmt: skip


def activation_edges(
    graph: Graph, layers: Sequence[str] | None = None, output: bool = False
) -> list[str]:
    """The calibrated edges: the input and each fused group's output (see :func:`placement`)."""
    return list(placement(graph, layers, output).edges)


def calibrate_placed(
    graph: Graph, data, cfg: ActQuantConfig, layers: Sequence[str] | None = None,
    replacements: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, ActRange]:
    """Ranges of every placed edge, and of each average that keeps its input's qparams
    (``replacements``: float tensors the graph runs with instead, e.g. equalized ones)."""
    p = placement(graph, layers, cfg.output)
    ranges = calibrate(graph, data, cfg, p.edges, replacements=replacements)
    shared = {e: replace(ranges[p.shared[e]], edge=e) for e in p.rounds}
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    both = {**ranges, **shared}
    return {e: both[e] for e in sorted(both, key=lambda e: -1 if e == "input" else order[e])}


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
    replacements: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, ActRange]:
    """Ranges per edge from the float graph run over ``data`` (cached per graph; with
    ``replacements``, e.g. equalized float tensors, computed afresh)."""
    if getattr(data, "split", None) == "test":
        raise ValueError(
            "Activations are calibrated on the calibration split, never on the test split; "
            "pass the 'calib' split."
        )
    if len(data.x) == 0:
        raise ValueError("The calibration split is empty; activations cannot be calibrated.")
    key = (_data_key(data), cfg, tuple(edges))
    with _LOCK:
        cached = None if replacements else _cached_ranges(_CALIBRATED.get(graph, {}), key)
    if cached is not None:
        return cached
    observers = _observe(graph, data, edges, cfg.observer == "minmax", batch_size,
                         replacements)  # fmt: skip
    ranges = {e: _range(e, obs, cfg) for e, obs in observers.items()}
    if not replacements:
        _remember(_CALIBRATED, graph, key, ranges)
    return ranges


def _observe(graph: Graph, data, edges: Sequence[str], extremes_only: bool, batch_size: int,
             replacements: Mapping[str, torch.Tensor] | None = None) -> dict[str, Observer]:
    """The statistics of each edge over ``data`` (cached per graph unless ``replacements``
    change the tensors): they do not depend on the bit width, so moving the activation
    slider derives new ranges without a pass. Min-max needs only the extremes; the other
    policies a histogram."""
    key = (_data_key(data), tuple(edges), extremes_only, batch_size)
    with _LOCK:
        cached = None if replacements else _STATISTICS.get(graph, {}).get(key)
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
            graph.run(data.inputs(slice(i, i + batch_size)), replacements or None,
                      points=points)  # fmt: skip
    if not replacements:
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
