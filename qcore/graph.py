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

:class:`Variant` is the one ``nn.Module`` for "this graph with these tensors and these
points": what ``compress(...).model`` and ``load_packed(...).model`` are, and what
evaluation, robustness, sensitivity, export and fine-tuning run.

Tracing and running: torch.fx replaces process-wide state (``nn.Module.__call__``) while it
traces, so a model run in another thread at that moment would be traced by mistake. Every
trace (:func:`graph_of`, :func:`fold_batchnorm`) holds :func:`tracing`, an exclusive lock,
and every model run holds :func:`running`, its shared side: runs go on side by side, a
trace waits for the runs under way (one batch each) and runs wait for the trace.
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

from qcore.fold import assert_eval, fold_copy, has_batchnorm, state_for_size, weight_layers

__all__ = [
    "Graph", "Plan", "Variant", "graph_of", "fold_batchnorm", "param_key", "Points", "running",
    "tracing",
]  # fmt: skip

Points = Mapping[str, Callable[[torch.Tensor], torch.Tensor]]

# model -> {fold_bn: (graph, the model's tensor versions when it was traced)}
_GRAPHS: weakref.WeakKeyDictionary[nn.Module, dict[bool, tuple[Graph, tuple]]] = (
    weakref.WeakKeyDictionary()
)
# model -> (folded copy, the model's tensor versions when it was folded)
_FOLDED: weakref.WeakKeyDictionary[nn.Module, tuple[nn.Module, tuple]] = (
    weakref.WeakKeyDictionary()
)
_LOCK = threading.Lock()

class _TraceLock:
    """Many model runs at once, or one trace alone (a readers-writer lock).

    A waiting trace goes first: runs that start after it wait, so a stream of batches
    cannot starve it. Both sides are re-entrant within a thread; a thread that is running
    a model must not start a trace (it would wait for itself), and none does: tracing
    happens in :func:`graph_of` and :func:`fold_batchnorm`, never inside a run.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._runs = 0
        self._tracer: int | None = None  # thread ident of the trace under way
        self._waiting = 0  # traces waiting for the runs to finish
        self._local = threading.local()

    def _depth(self, side: str) -> int:
        return getattr(self._local, side, 0)

    def acquire_run(self) -> None:
        me = threading.get_ident()
        if self._depth("run") or self._tracer == me:  # nested, or run inside own trace
            self._local.run = self._depth("run") + 1
            return
        with self._cond:
            while self._tracer is not None or self._waiting:
                self._cond.wait()
            self._runs += 1
        self._local.run = 1

    def release_run(self) -> None:
        self._local.run = self._depth("run") - 1
        if self._local.run or self._tracer == threading.get_ident():
            return
        with self._cond:
            self._runs -= 1
            if self._runs == 0:
                self._cond.notify_all()

    def acquire_trace(self) -> None:
        me = threading.get_ident()
        if self._tracer == me:
            self._local.trace = self._depth("trace") + 1
            return
        if self._depth("run"):
            raise RuntimeError("A model cannot be traced from inside a model run.")
        with self._cond:
            self._waiting += 1
            while self._tracer is not None or self._runs:
                self._cond.wait()
            self._waiting -= 1
            self._tracer = me
        self._local.trace = 1

    def release_trace(self) -> None:
        self._local.trace = self._depth("trace") - 1
        if self._local.trace:
            return
        with self._cond:
            self._tracer = None
            self._cond.notify_all()


_TRACE_LOCK = _TraceLock()


class _Side:
    def __init__(self, acquire: Callable[[], None], release: Callable[[], None]):
        self._acquire, self._release = acquire, release

    def __enter__(self) -> None:
        self._acquire()

    def __exit__(self, *exc: object) -> None:
        self._release()


def tracing() -> _Side:
    """Hold while torch.fx traces: no model runs in any thread meanwhile."""
    return _Side(_TRACE_LOCK.acquire_trace, _TRACE_LOCK.release_trace)


def running() -> _Side:
    """Hold while a model runs: no trace patches ``nn.Module.__call__`` meanwhile."""
    return _Side(_TRACE_LOCK.acquire_run, _TRACE_LOCK.release_run)


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
    """The shared traced graph of ``model`` (made once, rebuilt if the model changed in place).

    Safe to call from many threads: the first caller traces under :func:`tracing`, the
    others wait for it and get the same graph.
    """
    assert_eval(model)
    version = _version(model)
    with _LOCK:
        graph, seen = _GRAPHS.get(model, {}).get(fold_bn, (None, None))
    if graph is not None and seen == version:
        return graph
    with tracing():
        with _LOCK:  # another thread may have traced it while this one waited
            graph, seen = _GRAPHS.get(model, {}).get(fold_bn, (None, None))
        if graph is None or seen != version:
            graph = Graph(fold_batchnorm(model) if fold_bn else model)
            with _LOCK:
                _GRAPHS.setdefault(model, {})[fold_bn] = (graph, version)
    return graph


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with BatchNorm folded into the layer before it (:func:`qcore.fold.fold_copy`),
    made once per model and reused, so compressing a model again costs no copy; folded
    again when the model changed in place (training, ``load_state_dict``). ``model``
    itself when it has no BatchNorm. Never mutate the result: it is shared."""
    if not has_batchnorm(model):
        return model
    version = _version(model)
    with _LOCK:
        folded, seen = _FOLDED.get(model, (None, None))
    if folded is not None and seen == version:
        return folded
    with tracing():
        with _LOCK:
            folded, seen = _FOLDED.get(model, (None, None))
        if folded is None or seen != version:
            folded = fold_copy(model)
            with _LOCK:
                _FOLDED[model] = (folded, version)
    return folded


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
            with tracing():
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
        self._stats: dict[str, tuple[bool, float]] = {}  # float_stats, filled on first use
        self._stats_lock = threading.Lock()
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
            tile = _tile_of(mod)
            if tile is not None:
                return lambda args, kw, P: _max_of_tiles(args[0], tile, mod)
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

    def float_stats(self, key: str) -> tuple[bool, float]:
        """(every value finite, ||t||^2 in float64) of the shared float tensor ``key``:
        computed once per graph, since the shared tensors never change."""
        with self._stats_lock:
            hit = self._stats.get(key)
        if hit is None:
            t = self.params[key]
            hit = (bool(torch.isfinite(t).all()), float((t.double() ** 2).sum()))
            with self._stats_lock:
                self._stats[key] = hit
        return hit

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
        with running():
            self._run_nodes(x, env, kept, keep, P, points)
        out = env[self.output]
        return (out, kept) if keep else out

    def _run_nodes(self, x, env: dict, kept: dict, keep: set, P: Mapping,
                   points: Points | None) -> None:
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
        with running():
            for n in plan.suffix:
                env[n] = self._eval(n, env, P, points)
        return env[self.output]


Tensors = Mapping[str, torch.Tensor]


class Variant(nn.Module):
    """A shared :class:`Graph` run with replacement tensors and activation points.

    ``tensors`` is a mapping from state-dict key to the tensor that replaces the float one,
    or a function returning such a mapping, called once per forward (so a cached variant
    can keep codes and masks and derive its weights only when it runs, and a fine-tuned one
    recomputes them from its trained tensors with gradients). ``points`` maps an edge name
    to a function applied where the value flows (:meth:`Graph.point_names`).

    Nothing of the graph is registered or copied: a variant costs its replacements only and
    never changes the shared model. It computes BatchNorm with running statistics, so it
    runs in eval mode only; gradients still flow through replacement tensors that need them.

    >>> from torch import nn
    >>> g = graph_of(nn.Sequential(nn.Linear(2, 1, bias=False)).eval())
    >>> v = Variant(g, {"0.weight": torch.tensor([[1.0, 2.0]])})
    >>> v(torch.tensor([[3.0, 4.0]])).item()
    11.0
    """

    def __init__(
        self,
        graph: Graph,
        tensors: Tensors | Callable[[], Tensors] | None = None,
        points: Points | None = None,
    ):
        super().__init__()
        if not isinstance(graph, Graph):
            raise ValueError("A Variant is made from a qcore Graph (see qcore.graph_of).")
        object.__setattr__(self, "_graph", graph)  # held by reference, not registered
        object.__setattr__(self, "_tensors", tensors if tensors is not None else {})
        self._points = dict(points or {})
        nn.Module.train(self, False)

    @classmethod
    def of(cls, model: Any) -> Variant:
        """``model`` as a variant: a Variant itself, a ``Compressed``'s model, or a plain
        eval-mode module run as its own traced graph (BatchNorm not folded, so its logits
        are the module's own). Raises ValueError for a model torch.fx cannot trace."""
        if isinstance(model, Variant):
            return model
        inner = getattr(model, "model", None)
        if isinstance(inner, Variant):  # a qcore.Compressed
            return inner
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"Expected a torch nn.Module or a qcore.Compressed; got {type(model).__name__}."
            )
        return cls(graph_of(model, fold_bn=False))

    @property
    def graph(self) -> Graph:
        return self._graph

    @property
    def points(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The edges with a point on them (empty when activations stay float)."""
        return dict(self._points)

    def replacements(self) -> dict[str, torch.Tensor]:
        """The tensors that differ from the graph's float ones, by state-dict key."""
        t = self._tensors
        return dict(t() if callable(t) else t)

    def tensors(self) -> Tensors:
        """Every tensor the variant runs with (float ones where nothing replaces them)."""
        return self._graph.tensors(self.replacements())

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Every tensor the variant runs with, detached, by state-dict key of the (folded)
        model: what ``load_state_dict`` on a module of that structure would take."""
        return {k: v.detach() for k, v in self.tensors().items()}

    def weight(self, key: str) -> torch.Tensor:
        """The tensor ``key`` as this variant runs it."""
        return self.replacements().get(key, self._graph.params[key])

    def with_points(self, points: Points | None) -> Variant:
        """The same tensors with other points (``None``: none)."""
        return Variant(self._graph, self._tensors, points)

    def with_tensors(self, tensors: Tensors | Callable[[], Tensors] | None) -> Variant:
        """The same points with other replacement tensors."""
        return Variant(self._graph, tensors, self._points)

    def runner(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function x -> output with the replacements derived once (for many batches)."""
        tensors, points, graph = self.replacements(), self._points, self._graph
        return lambda x: graph.run(x, tensors, points)

    def train(self, mode: bool = True) -> Variant:
        if mode:
            raise RuntimeError(
                "A qcore Variant shares its graph with the float model and runs in eval mode "
                "only; gradients flow through its replacement tensors without train mode."
            )
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._graph.run(x, self.replacements(), self._points)

    def extra_repr(self) -> str:
        return f"{len(self.replacements())} replaced tensors, {len(self._points)} points"


def _tile_of(mod: nn.Module) -> tuple[int, int] | None:
    """(kh, kw) when ``mod`` is a MaxPool2d over non-overlapping kh x kw tiles (stride equal
    to the kernel, no padding or dilation, floor mode, no indices, more than one value)."""
    if not isinstance(mod, nn.MaxPool2d) or mod.ceil_mode or mod.return_indices:
        return None

    def pair(v: Any) -> tuple[int, ...]:
        return (v, v) if isinstance(v, int) else tuple(v)

    k = pair(mod.kernel_size)
    if len(k) != 2 or k == (1, 1) or pair(mod.stride or mod.kernel_size) != k:
        return None
    if pair(mod.padding) != (0, 0) or pair(mod.dilation) != (1, 1):
        return None
    return (int(k[0]), int(k[1]))


def _max_of_tiles(x: Any, tile: tuple[int, int], mod: nn.Module) -> Any:
    """``mod(x)`` for a tiling MaxPool2d (:func:`_tile_of`), computed as the element-wise
    maximum of its kh*kw strided slices: the same values (NaN wins, as in max_pool2d), about
    four times faster on CPU than max_pool2d's kernel, which also records each maximum's
    index. With a gradient to carry, the module itself runs (its backward picks one input)."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) or (
        x.requires_grad and torch.is_grad_enabled()
    ):
        return mod(x)
    kh, kw = tile
    h, w = x.shape[-2] // kh * kh, x.shape[-1] // kw * kw
    if h == 0 or w == 0:
        return mod(x)  # max_pool2d's own error for an input smaller than a tile
    out = None
    for i in range(kh):
        for j in range(kw):
            part = x[..., i:h:kh, j:w:kw]
            out = part if out is None else torch.maximum(out, part)
    return out


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
