"""The one model runtime: a model traced once with torch.fx, run with replacement tensors.

A :class:`Graph` is made once per (model, fold_bn) and shared read-only by every session:
BatchNorm is folded first (when asked), the module is traced, and every node becomes a
step that reads the tensors it needs from a dictionary instead of from the module. A
variant of the model is then just that graph run with a dictionary of replacement
tensors (``{"conv1.weight": q, ...}``): nothing is copied, nothing on the shared module
is swapped, so two threads can run two variants of one model at once. Gradients flow
through the replacement tensors (the shared float tensors never require them).

Points: a mapping from an edge name to a function ``Tensor -> Tensor`` applied where the
value flows: ``"input"`` (the network input), ``"<layer>.input"`` (what a weight layer
reads) and the name of any node (its output: additions, activations, ...). An observer
returns its input unchanged after recording it; a fake-quant point returns the rounded
value. :meth:`Graph.point_names` lists them.

Prefix reuse: :meth:`Graph.plan` says which nodes depend on a set of changed tensors;
:meth:`Graph.run` can keep the values such a suffix reads, and :meth:`Graph.run_suffix`
recomputes only the suffix from them (layer sensitivity runs on this).
"""

from __future__ import annotations

import linecache
import operator
import threading
import traceback
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from qcore.fold import assert_eval, fold_batchnorm, state_for_size, weight_layers

__all__ = ["Graph", "Plan", "graph_of", "param_key", "Points"]

Points = Mapping[str, Callable[[torch.Tensor], torch.Tensor]]

# model -> {fold_bn: (graph, the model's tensor versions when it was traced)}
_GRAPHS: weakref.WeakKeyDictionary[nn.Module, dict[bool, tuple[Graph, tuple]]] = (
    weakref.WeakKeyDictionary()
)
_LOCK = threading.Lock()

# call_function / call_method targets whose output is an addition point
_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
                nn.Hardswish, nn.Hardtanh, nn.ELU)  # fmt: skip
_ACTIVATION_FNS = {F.relu, F.relu6, F.gelu, F.silu, torch.relu, torch.sigmoid, torch.tanh,
                   "relu", "sigmoid", "tanh"}  # fmt: skip


def param_key(layer: str, attr: str) -> str:
    """The state-dict key of ``attr`` in ``layer`` ("" is the root module itself)."""
    return f"{layer}.{attr}" if layer else attr


def _version(model: nn.Module) -> tuple:
    return tuple((id(t), t._version) for t in model.state_dict(keep_vars=True).values())


def graph_of(model: nn.Module, fold_bn: bool = True) -> Graph:
    """The shared traced graph of ``model`` (made once, rebuilt if the model changed in place)."""
    assert_eval(model)
    version = _version(model)
    with _LOCK:
        per_model = _GRAPHS.setdefault(model, {})
        graph, seen = per_model.get(fold_bn, (None, None))
        if graph is not None and seen == version:
            return graph
    graph = Graph(fold_batchnorm(model) if fold_bn else model)
    with _LOCK:
        _GRAPHS.setdefault(model, {})[fold_bn] = (graph, version)
    return graph


def _trace_error(exc: Exception) -> ValueError:
    """A sentence naming the operation torch.fx could not trace (the user's own code line)."""
    where = ""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/torch/" not in f.filename.replace("\\", "/")]  # fmt: skip
    if frames:
        f = frames[-1]
        line = (f.line or linecache.getline(f.filename, f.lineno)).strip()
        where = f" at `{line}` ({f.filename.rsplit('/', 1)[-1]}:{f.lineno})"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ValueError(
        f"The model cannot be traced by torch.fx{where}: {first}. Models with data-dependent "
        "control flow are not supported."
    )


@dataclass(frozen=True)
class Plan:
    """The part of a graph that changes when the tensors ``keys`` change."""

    keys: frozenset[str]
    suffix: tuple[fx.Node, ...]  # nodes to recompute, in graph order
    reads: frozenset[fx.Node]  # values from outside the suffix that it reads


class Graph:
    """A traced model whose tensors come from a dictionary at run time. Read-only."""

    def __init__(self, module: nn.Module):
        try:
            gm = module if isinstance(module, fx.GraphModule) else fx.symbolic_trace(module)
        except Exception as exc:  # data-dependent control flow, unsupported calls, ...
            raise _trace_error(exc) from exc
        self.module = gm  # its submodules are the very modules the model runs
        self.spec = getattr(module, "qcore_spec", None)
        self.params: dict[str, torch.Tensor] = {
            k: v.detach() for k, v in state_for_size(module).items()
        }  # the shared float tensors, never written
        self.layers: dict[str, nn.Module] = weight_layers(module)
        self.nodes: list[fx.Node] = list(gm.graph.nodes)
        inputs = [n for n in self.nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise ValueError(f"The model takes {len(inputs)} inputs; only one is supported.")
        self.input = inputs[0]
        self.output = next(n for n in self.nodes if n.op == "output")
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self._steps = {n: self._step(n) for n in self.nodes}
        self._reads_keys = {n: self._keys_of(n) for n in self.nodes}
        last: dict[fx.Node, int] = {}
        for n in self.nodes:
            for a in n.all_input_nodes:
                last[a] = self.order[n]
        self._last_use = last

    # ------------------------------------------------------------------ building steps

    def _keys_of(self, node: fx.Node) -> frozenset[str]:
        """The parameter keys a node reads from the tensor dictionary."""
        if node.op == "get_attr":
            return frozenset({node.target}) if node.target in self.params else frozenset()
        if node.op != "call_module":
            return frozenset()
        return frozenset(k for k in self.params if k.startswith(f"{node.target}."))

    def _step(self, node: fx.Node) -> Callable[[tuple, dict, Mapping[str, Any]], Any]:
        """A function (args, kwargs, tensors) -> value for one node."""
        op, t = node.op, node.target
        if op == "call_module":
            mod = self.module.get_submodule(t)
            w, b = param_key(t, "weight"), param_key(t, "bias")
            if isinstance(mod, nn.Linear):
                return lambda args, kw, P: F.linear(args[0], P[w], P.get(b))
            if isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Conv3d):
                return lambda args, kw, P: mod._conv_forward(args[0], P[w], P.get(b))
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats:
                rm, rv = param_key(t, "running_mean"), param_key(t, "running_var")
                eps = mod.eps
                # always the eval-mode formula: a variant never writes running statistics
                return lambda args, kw, P: F.batch_norm(
                    args[0], P[rm], P[rv], P.get(w), P.get(b), False, 0.0, eps
                )
            return lambda args, kw, P: mod(*args, **kw)
        if op == "call_function":
            return lambda args, kw, P: t(*args, **kw)
        if op == "call_method":
            return lambda args, kw, P: getattr(args[0], t)(*args[1:], **kw)
        if op == "get_attr":
            if t in self.params:
                return lambda args, kw, P: P[t]
            value = _fetch(self.module, t)
            return lambda args, kw, P: value
        if op == "output":
            return lambda args, kw, P: args[0]
        return lambda args, kw, P: None  # placeholder: set by the caller

    # ------------------------------------------------------------------ running

    def tensors(self, replacements: Mapping[str, torch.Tensor] | None = None) -> dict:
        """The float tensors with ``replacements`` swapped in (a new dict; nothing copied)."""
        if not replacements:
            return self.params
        unknown = [k for k in replacements if k not in self.params]
        if unknown:
            raise ValueError(f"No tensor named {', '.join(map(repr, unknown))} in the model.")
        return {**self.params, **replacements}

    def point_names(self) -> list[str]:
        """Edges where an observer or fake-quant point can sit, in graph order."""
        names = ["input"]
        for n in self.nodes:
            if n.op == "call_module" and n.target in self.layers:
                names.append(f"{n.target}.input")
            elif _is_add(n) or _is_activation(n, self.module):
                names.append(n.name)
        return names

    def _eval(self, node: fx.Node, env: dict, P: Mapping, points: Points | None) -> Any:
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if points and node.op == "call_module" and f"{node.target}.input" in points:
            args = (points[f"{node.target}.input"](args[0]), *args[1:])
        out = self._steps[node](args, kwargs, P)
        if points and node.name in points:
            out = points[node.name](out)
        return out

    def run(
        self,
        x: torch.Tensor,
        replacements: Mapping[str, torch.Tensor] | None = None,
        points: Points | None = None,
        keep: Iterable[fx.Node] = (),
    ) -> Any:
        """The model's output on ``x`` with ``replacements``; with ``keep``, also those values.

        With ``keep`` the result is ``(output, {node: value})``.
        """
        P = self.tensors(replacements)
        keep = set(keep)
        env: dict[fx.Node, Any] = {}
        kept: dict[fx.Node, Any] = {}
        for i, n in enumerate(self.nodes):
            if n.op == "placeholder":
                env[n] = points["input"](x) if points and "input" in points else x
            else:
                env[n] = self._eval(n, env, P, points)
            if n in keep:
                kept[n] = env[n]
            for a in n.all_input_nodes:  # free what no later node reads
                if self._last_use.get(a) == i and a not in keep:
                    del env[a]
        out = env[self.output]
        return (out, kept) if keep else out

    def plan(self, keys: Iterable[str]) -> Plan:
        """The nodes that depend on the tensors ``keys`` and what else they read."""
        keys = frozenset(keys)
        unknown = keys - set(self.params)
        if unknown:
            raise ValueError(f"No tensor named {', '.join(map(repr, sorted(unknown)))}.")
        todo = [n for n in self.nodes if self._reads_keys[n] & keys]
        desc: set[fx.Node] = set()
        while todo:
            n = todo.pop()
            if n not in desc:
                desc.add(n)
                todo.extend(n.users)
        suffix = tuple(sorted(desc, key=self.order.__getitem__))
        reads = {a for n in suffix for a in n.all_input_nodes if a not in desc}
        if self.output not in desc:  # the change does not reach the output
            reads.add(self.output)
        return Plan(keys, suffix, frozenset(reads))

    def run_suffix(
        self,
        plan: Plan,
        cache: Mapping[fx.Node, Any],
        replacements: Mapping[str, torch.Tensor] | None = None,
        points: Points | None = None,
    ) -> Any:
        """The output with only ``plan.keys`` replaced, from the cached values ``plan.reads``.

        ``points`` act on the suffix's nodes only: the cached values already carry the
        points of the run that kept them.
        """
        if self.output not in plan.suffix:
            return cache[self.output]
        P = self.tensors(replacements)
        env = {n: cache[n] for n in plan.reads}
        for n in plan.suffix:
            env[n] = self._eval(n, env, P, points)
        return env[self.output]


def _is_add(n: fx.Node) -> bool:
    return n.op in ("call_function", "call_method") and n.target in _ADDS


def _is_activation(n: fx.Node, root: nn.Module) -> bool:
    if n.op == "call_module":
        return isinstance(root.get_submodule(n.target), _ACTIVATIONS)
    return n.op in ("call_function", "call_method") and n.target in _ACTIVATION_FNS


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
