"""Why did a setting break? Weights or activations, which layer, made there or piled up.

:func:`analyze` answers the questions people ask when a *given* compression setting loses
accuracy (AIMET's QuantAnalyzer answers some of them in files):

- ``summary``: four rows, ``setting`` in "float", "weights only", "activations only" and
  "both", each exactly ``evaluate(compress(model, cfg, calib).model, dataset)`` of the
  config :func:`summary_configs` gives. "Weights" is everything done to the weights
  (quantization, pruning, removed blocks); "activations" the calibrated fake-quant points.
- ``layers``: one row per compressed weight layer, in ``Compressed.layers`` order:
  ``sqnr_local_db``, the SQNR of the layer's output when only it is compressed (its
  weights, and its input's quantizer when activations are quantized), fed the float
  model's input to it: where error is *made*; ``sqnr_cumulative_db``, the SQNR of the
  layer's output in the compressed model against the float model's: where it *piles up*;
  ``accuracy_only_this`` and ``accuracy_all_but_this``, exactly what ``compress(...,
  layers=...)`` of those sets gives (:func:`layer_configs`).

SQNR of an output y against the float output y_f, over the whole split:
10*log10(sum y_f^2 / sum (y_f - y)^2) in dB (float64 sums; inf when equal).

Prefix reuse (as :mod:`qcore.sensitivity`): "only layer k" differs from the float model
(with the input and residual quantizers, when activations are quantized) only in k's
tensors and k's input quantizer, and "all but k" differs from the whole compressed model
only there. So each of those two bases runs once per batch keeping the values that k's
graph suffix reads, and each variant runs only its suffix (:meth:`Graph.run_suffix`).
Every variant is compressed by :func:`compress` itself and checked, tensor by tensor and
range by range, to differ from its base only where expected; one that differs elsewhere
(global pruning, stochastic rounding) runs whole. Same batches, same operations: the
logits, hence accuracy and loss, are those of :func:`evaluate`, bit for bit (see tests).

The float reference of the SQNRs is the float model traced as the compressed one is
(BatchNorm folded when the config folds it, removed blocks removed).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import torch
from torch import fx, nn
from torch.nn import functional as F

from qcore.activations import placement
from qcore.compress import Compressed, _db, compress
from qcore.compress import _energies as _energy
from qcore.config import CompressionConfig
from qcore.data import Dataset
from qcore.evaluate import EVAL_BATCH, Metrics, evaluate, metrics_from_logits
from qcore.graph import Graph, Plan, param_key
from qcore.refs import Progress

__all__ = [
    "Analysis",
    "GraphNode",
    "LAYER_COLUMNS",
    "SUMMARY_SETTINGS",
    "analyze",
    "graph_outline",
    "layer_configs",
    "summary_configs",
    "summary_sentence",
]

SUMMARY_SETTINGS: tuple[str, ...] = ("float", "weights only", "activations only", "both")
LAYER_COLUMNS: tuple[str, ...] = (
    "layer", "index", "kind", "bits", "weight_sqnr_db", "sqnr_local_db",
    "sqnr_cumulative_db", "accuracy_only_this", "loss_only_this", "accuracy_all_but_this",
    "loss_all_but_this",
)  # fmt: skip


@dataclass(frozen=True)
class GraphNode:
    """One node of the traced graph, as plain values (for drawing the model)."""

    name: str  # the fx node's name, unique
    kind: str  # "input", "layer", "add", "activation", "other" or "output"
    label: str  # e.g. "conv 1→16, 3×3", "+", "relu"
    inputs: tuple[str, ...]  # names of the nodes it reads
    layer: str | None = None  # the weight layer's module name (kind "layer")


@dataclass(frozen=True, eq=False)
class Analysis:
    """What :func:`analyze` found for one setting (plain, picklable values)."""

    summary: pd.DataFrame  # setting, accuracy, loss
    layers: pd.DataFrame  # LAYER_COLUMNS, one row per compressed weight layer
    config: CompressionConfig
    outline: tuple[GraphNode, ...]  # the traced graph the layers were measured on
    act_edges: tuple[str, ...]  # activation edges fake-quantized in "both" (point names)
    n: int  # evaluation images
    seconds: float

    def accuracy(self, setting: str) -> float:
        """The accuracy of one summary row ("float", "weights only", ...)."""
        if setting not in SUMMARY_SETTINGS:
            raise ValueError(f"setting must be one of {', '.join(SUMMARY_SETTINGS)}; got "
                             f"{setting!r}.")  # fmt: skip
        return float(self.summary.set_index("setting").loc[setting, "accuracy"])

    @property
    def float_keeping(self) -> pd.Series:
        """Accuracy won by keeping each layer float (the rest as set), by layer: points in
        [0, 1], ``accuracy_all_but_this - accuracy("both")`` (NaN for a sole layer)."""
        gain = self.layers["accuracy_all_but_this"] - self.accuracy("both")
        return pd.Series(gain.to_numpy(), index=self.layers["layer"].to_numpy())

    @property
    def best_float_layer(self) -> str | None:
        """The layer whose float-keeping wins most accuracy; None when none wins any."""
        gain = self.float_keeping.dropna()
        if gain.empty or gain.max() <= 0:
            return None
        return str(gain.idxmax())

    def worst_layers(self, k: int = 3, by: str = "sqnr_local_db") -> pd.DataFrame:
        """The ``k`` rows of lowest ``by`` (an SQNR or accuracy column), lowest first."""
        if by not in self.layers.columns:
            raise ValueError(f"No column {by!r}; the columns are {', '.join(self.layers)}.")
        return self.layers.sort_values(by, kind="stable").head(k)


def summary_configs(config: CompressionConfig) -> dict[str, CompressionConfig]:
    """The four configs of the summary, by setting name: float, weights only (everything
    done to weights: quantization, pruning, removed blocks), activations only, both."""
    plain = replace(config, quant=None, prune=None, drop=(), entropy=None)
    return {
        "float": replace(plain, act=None),
        "weights only": replace(config, act=None),
        "activations only": plain,
        "both": config,
    }


def layer_configs(
    config: CompressionConfig, names: Sequence[str]
) -> tuple[dict[str, CompressionConfig], dict[str, CompressionConfig | None]]:
    """Per layer of ``names`` (the compressed layers): the config that compresses only it,
    and the one that compresses all the others (None when it is the only one)."""
    only = {n: replace(config, layers=(n,)) for n in names}
    rest = {n: replace(config, layers=tuple(m for m in names if m != n)) if len(names) > 1
            else None for n in names}  # fmt: skip
    return only, rest


def summary_sentence(summary: pd.DataFrame) -> str:
    """The summary in one sentence, costs in percentage points against float.

    >>> t = pd.DataFrame({"setting": list(SUMMARY_SETTINGS),
    ...                   "accuracy": [0.99, 0.987, 0.899, 0.88], "loss": [0.0] * 4})
    >>> summary_sentence(t)
    'Weights cost 0.3 pp, activations cost 9.1 pp, both cost 11.0 pp (float 99.0 %, both 88.0 %).'
    """
    acc = summary.set_index("setting")["accuracy"]
    f = float(acc["float"])

    def cost(setting: str) -> str:
        pp = (f - float(acc[setting])) * 100
        if abs(pp) < 0.05:
            return "cost nothing"
        return f"cost {pp:.1f} pp" if pp > 0 else f"gain {-pp:.1f} pp"

    return (f"Weights {cost('weights only')}, activations {cost('activations only')}, "
            f"both {cost('both')} (float {100 * f:.1f} %, both {100 * float(acc['both']):.1f} %).")


# ---------------------------------------------------------------------------------------------
# The graph as plain records


def graph_outline(graph: Graph) -> tuple[GraphNode, ...]:
    """The traced graph's nodes (get_attr constants left out), in graph order."""
    out = []
    skip = {n for n in graph.nodes if n.op == "get_attr"}
    points = set(graph.point_names())
    for n in graph.nodes:
        if n in skip:
            continue
        inputs = tuple(a.name for a in n.all_input_nodes if a not in skip)
        if n.op == "placeholder":
            out.append(GraphNode(n.name, "input", "input", ()))
        elif n.op == "output":
            out.append(GraphNode(n.name, "output", "output", inputs))
        elif n.op == "call_module" and n.target in graph.layers:
            out.append(GraphNode(n.name, "layer", _layer_label(graph.layers[n.target]),
                                 inputs, layer=str(n.target)))  # fmt: skip
        elif n.name in points and not n.name.startswith(("add", "iadd")):
            out.append(GraphNode(n.name, "activation", _op_label(n, graph), inputs))
        elif n.op in ("call_function", "call_method") and n.name.startswith(("add", "iadd")):
            out.append(GraphNode(n.name, "add", "+", inputs))
        else:
            out.append(GraphNode(n.name, "other", _op_label(n, graph), inputs))
    return tuple(out)


def _layer_label(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return f"linear {m.in_features}→{m.out_features}"
    size = "×".join(str(k) for k in getattr(m, "kernel_size", ()))
    groups = getattr(m, "groups", 1)
    dw = " depthwise" if groups > 1 and groups == getattr(m, "in_channels", 0) else ""
    return f"conv{dw} {getattr(m, 'in_channels', '?')}→{getattr(m, 'out_channels', '?')}, {size}"


def _op_label(n: fx.Node, graph: Graph) -> str:
    if n.op == "call_module":
        return type(graph.module.get_submodule(n.target)).__name__.lower()
    return getattr(n.target, "__name__", str(n.target))


# ---------------------------------------------------------------------------------------------
# The analysis


@dataclass
class _Variant:
    """One layer row's variant: run by its suffix from a base, or whole."""

    layer: str
    family: str  # "only" or "rest"
    replacements: Mapping[str, torch.Tensor]
    points: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]
    plan: Plan | None  # None: run the whole graph
    logits: list[torch.Tensor]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b))  # fmt: skip
    return a == b


def _same_range(a: Any, b: Any) -> bool:
    """Whether two calibrated activation ranges round every value alike."""
    if a is b:
        return True
    if a is None or b is None:
        return False
    qa, qb = a.qparams, b.qparams
    return (a.bits == b.bits and a.symmetric == b.symmetric
            and all(_same(qa[i], qb[i]) for i in range(len(qa))))  # fmt: skip


def _diff(
    base_r: Mapping[str, torch.Tensor], base_a: Mapping[str, Any],
    r: Mapping[str, torch.Tensor], a: Mapping[str, Any],
) -> tuple[set[str], set[str]]:  # fmt: skip
    """The tensor keys and activation edges in which a variant differs from its base."""
    keys = {k for k in set(base_r) | set(r) if not _same(base_r.get(k), r.get(k))}
    edges = {e for e in set(base_a) | set(a) if not _same_range(base_a.get(e), a.get(e))}
    return keys, edges


def _layer_keys(graph: Graph, layer: str) -> list[str]:
    return [k for k in (param_key(layer, "weight"), param_key(layer, "bias")) if k in graph.params]


def _apply_layer(mod: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
                 ) -> torch.Tensor:  # fmt: skip
    """A linear or convolution layer's output with weight ``w`` and bias ``b`` (as the
    graph runs it)."""
    if isinstance(mod, nn.Linear):
        return F.linear(x, w, b)
    return mod._conv_forward(x, w, b)


def _scored(model: nn.Module, cfg: CompressionConfig, calib: Dataset | None,
            dataset: Dataset) -> Metrics:  # fmt: skip
    """``evaluate(compress(model, cfg, calib).model, dataset)``: one summary row."""
    return evaluate(compress(model, cfg, calib=calib if cfg.act is not None else None).model,
                    dataset)  # fmt: skip


def _own_edges(graph, names: Sequence[str], config: CompressionConfig,
               node_of: dict) -> tuple[dict[str, set[str]], dict[str, str | None]]:  # fmt: skip
    """Per compressed layer, the activation edges that quantize its own group's output
    (with a pooling that keeps their grid), and the edge each layer reads its input from
    (:func:`qcore.activations.placement`); empty when activations stay float."""
    if config.act is None:
        return {}, {}
    p = placement(graph, names, config.act.output)
    own: dict[str, set[str]] = {}
    for n, node in node_of.items():
        mine = {e for e, members in p.groups.items() if node.name in members}
        mine |= {e for e in p.rounds if p.shared.get(e) in mine}
        own[n] = mine
    return own, dict(p.inputs)


def analyze(
    model: nn.Module,
    config: CompressionConfig,
    dataset: Dataset,
    *,
    calib: Dataset | None = None,
    progress: Progress | None = None,
) -> Analysis:
    """Where a compression setting loses accuracy: weights or activations, which layer,
    and whether a layer's error is its own or piled up from the layers before it.

    ``calib`` is the calibration split (needed when ``config.act`` is set). Accuracy and
    loss are on ``dataset`` (the test split), as the SQNRs. ``progress(done, total, row)``
    is called once the setting is compressed (and calibrated), after each summary row and
    after each batch of the layer rows. A model with
    one compressed layer has no "all but this" set: NaN there.
    """
    start = time.perf_counter()
    if not isinstance(config, CompressionConfig):
        raise ValueError("config must be a CompressionConfig.")
    if config.act is not None and calib is None:
        raise ValueError("Quantizing activations needs calibration data: pass calib= the "
                         "dataset's 'calib' split (never the test split).")  # fmt: skip
    if len(dataset.y) == 0:
        raise ValueError("The dataset is empty; pick a split with examples in it.")
    x = dataset.inputs()
    starts = list(range(0, x.shape[0], EVAL_BATCH))  # the batches of evaluate
    full = compress(model, config, calib=calib)  # calibrates every edge once (reused below)
    graph = full.graph
    names = [r.name for r in full.layers]
    total = 1 + len(SUMMARY_SETTINGS) + len(starts)
    done = 0

    def report(row: dict) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, row)

    report({"setting": "both", "step": "compressed"})  # activations calibrated, if any

    # "both" is the whole compressed model and "float" (unless blocks are removed, which
    # the float row keeps) the graph without replacements or points: both run below, batch
    # by batch as evaluate runs them, so their logits come from there
    configs = summary_configs(config)
    from_runs = {"both"} if config.drop else {"both", "float"}
    summary: dict[str, Metrics] = {}
    for setting, cfg in configs.items():
        if setting not in from_runs:
            summary[setting] = _scored(model, cfg, calib, dataset)
            report({"setting": setting})
    float_logits: list[torch.Tensor] = []
    both_logits: list[torch.Tensor] = []
    full_r, full_p = full.replacements(), full.model.points
    node_of = {n.target: n for n in graph.nodes if n.op == "call_module" and n.target in names}

    variants, base_p, reads_from = _variants(model, config, calib, full, full_r, names,
                                                node_of)

    keep_base = set().union(*(v.plan.reads for v in variants if v.plan and v.family == "only"))
    keep_full = set().union(*(v.plan.reads for v in variants if v.plan and v.family == "rest"))
    outs = set(node_of.values())
    ins = {node.args[0] for node in outs}
    energy = {n: [0.0, 0.0, 0.0] for n in names}  # sum y_f^2, local error, cumulative error
    with torch.inference_mode():
        for s in starts:
            xb = x[s : s + EVAL_BATCH]
            flo_out, flo = graph.run(xb, keep=outs | ins | (keep_base if not base_p else set()))
            float_logits.append(flo_out)
            if base_p:
                _, base = graph.run(xb, None, base_p, keep=keep_base | {graph.output})
            else:
                base = flo
            both_out, whole = graph.run(xb, full_r, full_p, keep=keep_full | outs | {graph.output})
            both_logits.append(both_out)
            _add_energy(graph, node_of, flo, whole, full_r, full_p, reads_from, energy)
            for v in variants:
                if v.plan is None:
                    v.logits.append(graph.run(xb, v.replacements, v.points))
                else:
                    cache = base if v.family == "only" else whole
                    v.logits.append(graph.run_suffix(v.plan, cache, v.replacements, v.points))
            del flo, base, whole
            report({"batch": s // EVAL_BATCH})

    classes = len(dataset.classes)
    for setting, logits in (("float", float_logits), ("both", both_logits)):
        if setting in from_runs:
            summary[setting] = metrics_from_logits(torch.cat(logits), dataset.y, classes)
            report({"setting": setting})
    scores: dict[tuple[str, str], Metrics] = {
        (v.layer, v.family): metrics_from_logits(torch.cat(v.logits), dataset.y, classes)
        for v in variants
    }
    return Analysis(
        summary=pd.DataFrame([{"setting": k, "accuracy": summary[k].accuracy,
                               "loss": summary[k].loss} for k in SUMMARY_SETTINGS]),
        layers=pd.DataFrame(_layer_rows(full, energy, scores), columns=list(LAYER_COLUMNS)),
        config=config,
        outline=graph_outline(graph),
        act_edges=tuple(full.activations),
        n=int(len(dataset.y)),
        seconds=time.perf_counter() - start,
    )


def _variants(model: nn.Module, config: CompressionConfig, calib: Dataset | None,
              full: Compressed, full_r: dict, names: list[str], node_of: dict[str, Any]
              ) -> tuple[list[_Variant], dict[str, Any], dict[str, str | None]]:  # fmt: skip
    """Each layer's "only this" and "all but this" variants, each with the plan that runs
    only the graph after the layer when its difference from its base stays inside it; the
    base's activation points (those every "only" variant quantizes too: the input and the
    residual additions); and the edge each layer reads."""
    graph = full.graph
    # the two bases: float weights with the edges every "only k" variant quantizes too
    # (input, residual additions), and the whole compressed model
    full_a, full_p = dict(full.activations), full.model.points
    own, reads_from = _own_edges(graph, names, config, node_of)
    layer_edges = set().union(*own.values()) if own else set()
    base_a = {e: r for e, r in full_a.items() if e not in layer_edges}
    base_p = {e: f for e, f in full_p.items() if e in base_a}
    plans = {n: graph.plan(_layer_keys(graph, n)) for n in names}
    only_cfg, rest_cfg = layer_configs(config, names)
    variants: list[_Variant] = []
    for n in names:
        for family, cfg, br, ba in (("only", only_cfg[n], {}, base_a),
                                    ("rest", rest_cfg[n], full_r, full_a)):  # fmt: skip
            if cfg is None:
                continue
            c = compress(model, cfg, calib=calib)
            r, a = c.replacements(), dict(c.activations)
            keys, edges = _diff(br, ba, r, a)
            local = keys <= set(_layer_keys(graph, n)) and edges <= own.get(n, set())
            if local:  # share the base's tensors: equal, and no second copy held
                r = {k: (v if k in keys else br[k]) for k, v in r.items()}
            variants.append(_Variant(n, family, r, c.model.points,
                                     plans[n] if local else None, []))  # fmt: skip
            del c
    return variants, base_p, reads_from


def _add_energy(graph: Any, node_of: dict[str, Any], flo: dict, whole: dict,
                full_r: dict, full_p: dict, reads_from: dict[str, str | None],
                energy: dict[str, list[float]]) -> None:  # fmt: skip
    """Add one batch's signal, local error (the layer alone, fed the float input) and
    cumulative error (the compressed model up to it) to each layer's ``energy``."""
    for n, node in node_of.items():
        ref = flo[node]
        xin = flo[node.args[0]]
        point = full_p.get(reads_from.get(n) or "")
        if point is not None:
            xin = point(xin)
        w = full_r.get(param_key(n, "weight"), graph.params[param_key(n, "weight")])
        bkey = param_key(n, "bias")
        b = full_r.get(bkey, graph.params.get(bkey))
        y_local = _apply_layer(graph.layers[n], xin, w, b)
        sig, err_local = _energy(ref, y_local)
        _, err_cum = _energy(ref, whole[node])
        e = energy[n]
        e[0] += sig
        e[1] += err_local
        e[2] += err_cum


def _layer_rows(full: Compressed, energy: dict[str, list[float]],
                scores: dict[tuple[str, str], Metrics]) -> list[dict]:  # fmt: skip
    """One row per compressed layer: its weights' SQNR, its output's local and cumulative
    SQNR, and the accuracy and loss with only it compressed and with all but it."""
    rows = []
    for i, s in enumerate(full.layers):
        e = energy[s.name]
        only, rest = scores.get((s.name, "only")), scores.get((s.name, "rest"))
        rows.append({
            "layer": s.name, "index": i, "kind": s.kind, "bits": s.bits,
            "weight_sqnr_db": s.sqnr_db, "sqnr_local_db": _db(e[0], e[1]),
            "sqnr_cumulative_db": _db(e[0], e[2]),
            "accuracy_only_this": only.accuracy, "loss_only_this": only.loss,
            "accuracy_all_but_this": math.nan if rest is None else rest.accuracy,
            "loss_all_but_this": math.nan if rest is None else rest.loss,
        })  # fmt: skip
    return rows

