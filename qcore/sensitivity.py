"""Per-layer sensitivity: the accuracy when only one layer is quantized or pruned.

For each weight layer k and each setting s (a bit width, or a pruning rate) the result is
exactly what ``evaluate(compress(model, CompressionConfig(..., layers=(k,))).model, data)``
gives, the naive way. The fast way gets the same numbers bit for bit with less work:
when only layer k changes, every activation that does not depend on k is the float one.
So the (BN-folded) model is traced with ``torch.fx``, the float graph is run once over the
evaluation split keeping only the values that the recomputed parts read, and for each
(k, s) only the graph descendants of k are run again, with the compressed weights of k,
reading the cached float values for every other input. Both ways run the same batches
(those of :func:`qcore.evaluate.evaluate`) through the same modules, so the logits, and
hence accuracy and loss, are identical (they are scored by ``evaluate`` itself). Layer k
runs as a shallow copy of its module with the compressed tensors swapped in, so the shared
float model is never changed, not even for the length of a call.

Memory of the fast way: the cached values of one chunk of batches (at most
``max_cache_bytes``, at least one batch), the logits of every (k, s) and, when the split
needs more than one chunk, the compressed weights of every (k, s). For the sample models
on the 1,000-image mnist-5k test split (one batch): mnist-cnn 39 MiB (the inputs of conv1,
conv2, fc1, fc2), mnist-lenet300 5 MiB, mnist-resnet about 300 MiB.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import torch
from torch import fx, nn

from qcore.compress import Compressed, compress, shallow_copy_with
from qcore.config import CompressionConfig, PruneConfig, QuantConfig, check_bits
from qcore.evaluate import evaluate
from qcore.fold import _assert_eval, fold_batchnorm, weight_layers

__all__ = [
    "DEFAULT_BITS",
    "DEFAULT_PRUNE_RATES",
    "SENSITIVITY_COLUMNS",
    "Progress",
    "layer_sensitivity",
    "sensitivity_matrix",
]

DEFAULT_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
DEFAULT_PRUNE_RATES: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)
SENSITIVITY_COLUMNS: tuple[str, ...] = (
    "layer", "index", "kind", "setting", "accuracy", "loss", "drop", "loss_increase",
    "sqnr_db", "sparsity", "params", "layer_size_bytes", "layer_float_bytes",
)  # fmt: skip

Progress = Callable[[int, int, dict], None]  # progress(done, total, row)


@dataclass(frozen=True)
class _Job:
    """One row: layer ``layer`` alone compressed with ``config``."""

    layer: str
    index: int  # position of the layer in the model
    kind: str  # "quant" or "prune"
    setting: float  # bits or pruning rate
    config: CompressionConfig


def _check_rates(rates: Iterable[float]) -> tuple[float, ...]:
    out = []
    for r in rates:
        PruneConfig(rate=r)  # a ValueError with a sentence if out of range
        out.append(float(r))
    return tuple(dict.fromkeys(out))


def _check_bit_list(bits: Iterable[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(check_bits(b) for b in bits))


def _jobs(
    names: Sequence[str],
    bits: Sequence[int],
    rates: Sequence[float],
    quant: QuantConfig,
    prune: PruneConfig,
    fold_bn: bool,
) -> list[_Job]:
    jobs = []
    for i, n in enumerate(names):
        for b in bits:
            q = replace(quant, bits=b, layer_bits=())
            jobs.append(_Job(n, i, "quant", float(b), CompressionConfig(
                quant=q, prune=None, layers=(n,), fold_bn=fold_bn)))
        for r in rates:
            p = replace(prune, rate=r)
            jobs.append(_Job(n, i, "prune", r, CompressionConfig(
                quant=None, prune=p, layers=(n,), fold_bn=fold_bn)))
    return jobs


def _row(job: _Job, c: Compressed, acc: float, loss: float, ref_acc: float, ref_loss: float):
    s = c.layers[0]
    return {
        "layer": job.layer,
        "index": job.index,
        "kind": job.kind,
        "setting": job.setting,
        "accuracy": acc,
        "loss": loss,
        "drop": ref_acc - acc,
        "loss_increase": loss - ref_loss,
        "sqnr_db": s.sqnr_db,
        "sparsity": s.sparsity,
        "params": s.params,
        "layer_size_bytes": s.size_bytes,
        "layer_float_bytes": s.float_bytes,
    }


class _Replay(nn.Module):
    """Hands back precomputed logits batch by batch, so :func:`evaluate` scores them."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits, self.pos = logits, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.logits[self.pos : self.pos + x.shape[0]]
        self.pos += x.shape[0]
        return out


def _metrics(logits: torch.Tensor, dataset, batch_size: int) -> tuple[float, float]:
    """Accuracy and loss of ``logits``, scored by evaluate() itself so the two never differ."""
    m = evaluate(_Replay(logits).eval(), dataset, batch_size=batch_size)
    return m.accuracy, m.loss


# ---------------------------------------------------------------------------------------------
# The graph: trace, find what each layer's change reaches, run parts of it.


class _Graph:
    """A traced float module, split into what is cached and what each layer recomputes."""

    def __init__(self, base: nn.Module, layers: Sequence[str]):
        gm = base if isinstance(base, fx.GraphModule) else fx.symbolic_trace(base)
        self.root = gm  # its submodules are the very modules ``base`` runs
        self.nodes = list(gm.graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ValueError("Only models with a single input can be analysed by layer.")
        self.input = placeholders[0]
        self.output = next(n for n in self.nodes if n.op == "output")
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.sources: dict[str, list[fx.Node]] = {}
        self.suffix: dict[str, list[fx.Node]] = {}
        self.reads: dict[str, set[fx.Node]] = {}
        for k in layers:
            src = [n for n in self.nodes if self._touches(n, k)]
            if not src:
                raise ValueError(f"Layer {k!r} does not appear in the traced graph.")
            desc: set[fx.Node] = set()
            todo = list(src)
            while todo:
                n = todo.pop()
                if n not in desc:
                    desc.add(n)
                    todo.extend(n.users)
            suffix = sorted(desc, key=self.order.__getitem__)
            self.sources[k] = src
            self.suffix[k] = suffix
            self.reads[k] = {a for n in suffix for a in n.all_input_nodes if a not in desc}
            if self.output not in desc:  # the layer does not reach the output
                self.reads[k].add(self.output)
        self.cached = set().union(*self.reads.values()) if self.reads else set()

    @staticmethod
    def _touches(node: fx.Node, layer: str) -> bool:
        t = node.target
        if node.op == "call_module":
            return t == layer or layer.startswith(f"{t}.")
        return node.op == "get_attr" and isinstance(t, str) and t.startswith(f"{layer}.")

    def swapped(self, layer: str, overrides: dict[str, torch.Tensor]) -> dict[str, Any]:
        """What runs in place of the graph's own values when ``layer`` has ``overrides``.

        For each module call that touches the layer: a shallow copy of that module with the
        tensors swapped in (the shared module itself is never changed, not even briefly);
        for each ``get_attr`` of an overridden tensor: the tensor.
        """
        out: dict[str, Any] = {}
        for node in self.sources[layer]:
            t = node.target
            if node.op == "get_attr":
                out[t] = overrides.get(t, _fetch(self.root, t))
            elif t not in out:
                local = {k[len(t) + 1 :]: v for k, v in overrides.items() if k.startswith(f"{t}.")}
                out[t] = shallow_copy_with(self.root.get_submodule(t), local)
        return out

    def _run(self, node: fx.Node, env: dict, swapped: dict[str, Any]) -> Any:
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        op, t = node.op, node.target
        if op == "call_module":
            mod = swapped[t] if t in swapped else self.root.get_submodule(t)
            return mod(*args, **kwargs)
        if op == "call_function":
            return t(*args, **kwargs)
        if op == "call_method":
            obj, *rest = args
            return getattr(obj, t)(*rest, **kwargs)
        if op == "get_attr":
            return swapped[t] if t in swapped else _fetch(self.root, t)
        if op == "output":
            return args[0]
        raise ValueError(f"Unexpected graph node {node.op!r}.")

    def run_float(self, x: torch.Tensor) -> dict[fx.Node, Any]:
        """Run the whole float graph on ``x``; keep the values some layer's suffix reads."""
        last_use = {}
        for n in self.nodes:
            for a in n.all_input_nodes:
                last_use[a] = self.order[n]
        env: dict[fx.Node, Any] = {self.input: x}
        kept = {}
        for i, n in enumerate(self.nodes):
            if n.op != "placeholder":
                env[n] = self._run(n, env, {})
            if n in self.cached:
                kept[n] = env[n]
            for a in n.all_input_nodes:
                if last_use.get(a) == i:
                    del env[a]
        kept[self.output] = env[self.output]
        return kept

    def run_suffix(self, layer: str, cache: dict, swapped: dict[str, Any]):
        """The output with only ``layer`` changed (``swapped`` from :meth:`swapped`)."""
        suffix = self.suffix[layer]
        env = {n: cache[n] for n in self.reads[layer]}
        if self.output not in suffix:
            return cache[self.output]
        for n in suffix:
            env[n] = self._run(n, env, swapped)
        return env[self.output]


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _value_bytes(values: Iterable[Any]) -> int:
    """Bytes held by the tensors in ``values`` (nested lists too), each storage counted once."""
    seen: dict[int, int] = {}

    def visit(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            st = v.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        elif isinstance(v, list | tuple):
            for a in v:
                visit(a)

    for v in values:
        visit(v)
    return sum(seen.values())


# ---------------------------------------------------------------------------------------------
# The public function.


def layer_sensitivity(
    model: nn.Module,
    dataset,
    bits: Iterable[int] = DEFAULT_BITS,
    prune_rates: Iterable[float] = DEFAULT_PRUNE_RATES,
    *,
    quant: QuantConfig | None = None,
    prune: PruneConfig | None = None,
    layers: Iterable[str] | None = None,
    fold_bn: bool = True,
    batch_size: int = 2000,
    naive: bool = False,
    max_cache_bytes: int = 512 * 2**20,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Accuracy when each layer alone is quantized (at each of ``bits``) or pruned.

    ``quant`` and ``prune`` are templates for the scheme (symmetric, per channel, clip,
    structured, ...); their ``bits`` / ``rate`` are replaced by each setting. Every other
    layer stays float. One row per (layer, kind, setting), layers in model order, with
    ``kind`` "quant" (``setting`` = bits) or "prune" (``setting`` = rate); ``drop`` and
    ``loss_increase`` are against the float model (``df.attrs["float_accuracy"]`` and
    ``["float_loss"]``); ``sqnr_db`` and ``layer_size_bytes`` are the layer's own.
    ``naive=True`` compresses and evaluates the whole model per row (same numbers, slower);
    models torch.fx cannot trace are always done that way (``df.attrs["method"]`` says
    which ran). ``progress(done, total, row)`` is called after each row (when the split
    is cached in several chunks, after each row of each chunk: ``total`` counts them all
    and the full row comes with the last chunk, before that only layer, kind and setting).
    """
    quant = QuantConfig() if quant is None else quant
    prune = PruneConfig() if prune is None else prune
    if not isinstance(quant, QuantConfig) or not isinstance(prune, PruneConfig):
        raise ValueError("quant must be a QuantConfig and prune a PruneConfig (or None).")
    if quant.rounding == "stochastic":
        raise ValueError("Sensitivity needs deterministic rounding; use rounding='nearest'.")
    bits = _check_bit_list([bits] if isinstance(bits, int) else bits)
    rates = _check_rates([prune_rates] if isinstance(prune_rates, float) else prune_rates)
    if not bits and not rates:
        raise ValueError("Give at least one bit width or pruning rate to analyse.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive whole number; got {batch_size!r}.")
    if len(dataset.y) == 0:
        raise ValueError("The dataset is empty; pick a split with examples in it.")
    _assert_eval(model)
    base = fold_batchnorm(model) if fold_bn else model
    all_layers = list(weight_layers(base))
    if not all_layers:
        raise ValueError("The model has no linear or convolution layers to analyse.")
    if layers is None:
        names = all_layers
    else:
        names = [layers] if isinstance(layers, str) else list(dict.fromkeys(layers))
        unknown = [n for n in names if n not in all_layers]
        if unknown:
            raise ValueError(
                f"Unknown layer(s) {', '.join(map(repr, unknown))}; the model's weight layers "
                f"are {', '.join(all_layers)}."
            )
        names = [n for n in all_layers if n in names]  # model order
    jobs = _jobs(names, bits, rates, quant, prune, fold_bn)

    start = time.perf_counter()
    result = None
    if not naive:
        try:
            graph = _Graph(base, names)
        except Exception:  # data-dependent control flow etc.: do it the slow way
            graph = None
        if graph is not None:
            result = _run_cached(model, base, graph, dataset, jobs, batch_size,
                                 max_cache_bytes, progress)
    if result is None:
        method = "naive"
        ref = evaluate(model, dataset, batch_size=batch_size)
        rows = _run_naive(model, dataset, jobs, ref, batch_size, progress)
    else:
        method = "cached"
        rows, ref = result
    df = pd.DataFrame(rows, columns=list(SENSITIVITY_COLUMNS))
    df.attrs.update(float_accuracy=ref.accuracy, float_loss=ref.loss, method=method,
                    seconds=time.perf_counter() - start)
    return df


def _run_naive(model, dataset, jobs, ref, batch_size, progress) -> list[dict]:
    rows = []
    for i, job in enumerate(jobs):
        c = compress(model, job.config)
        m = evaluate(c.model, dataset, batch_size=batch_size)
        rows.append(_row(job, c, m.accuracy, m.loss, ref.accuracy, ref.loss))
        if progress is not None:
            progress(i + 1, len(jobs), rows[-1])
    return rows


def _run_cached(model, base, graph: _Graph, dataset, jobs, batch_size, max_cache_bytes,
                progress) -> tuple[list[dict], Any] | None:
    """Rows the fast way, and the float metrics; ``None`` if the graph cannot be trusted."""
    x = dataset.x
    starts = list(range(0, x.shape[0], batch_size))
    with torch.inference_mode():
        try:
            # the traced graph must compute what the module does (checked on a few examples)
            probe = x[: min(8, batch_size)]
            if not torch.equal(graph.run_float(probe)[graph.output], base(probe)):
                return None
            first = graph.run_float(x[:batch_size])
        except RuntimeError:  # e.g. the data does not fit: the naive way says so clearly
            return None
    ref = None if base is model else evaluate(model, dataset, batch_size=batch_size)
    per_batch = max(1, _value_bytes(first.values()))
    per_chunk = max(1, int(max_cache_bytes // per_batch))
    chunks = [starts[i : i + per_chunk] for i in range(0, len(starts), per_chunk)]
    total = len(jobs) * len(chunks)
    keep = len(chunks) > 1  # compressed weights are needed again for later chunks
    compressed: dict[int, Compressed] = {}
    logits: list[list[torch.Tensor]] = [[] for _ in jobs]
    float_logits: list[torch.Tensor] = []
    rows: list[dict] = []
    done = 0
    for ci, chunk in enumerate(chunks):
        last = ci == len(chunks) - 1
        with torch.inference_mode():
            caches = [first if s == 0 else graph.run_float(x[s : s + batch_size]) for s in chunk]
        first = {}
        float_logits.extend(cache[graph.output] for cache in caches)
        if last and ref is None:  # unfolded: the graph's float output is the model's
            ref = evaluate(_Replay(torch.cat(float_logits)).eval(), dataset, batch_size)
        for j, job in enumerate(jobs):
            c = compressed[j] if j in compressed else compress(model, job.config)
            if keep and not last:
                compressed[j] = c
            swapped = graph.swapped(job.layer, c.model.overrides)
            with torch.inference_mode():
                for cache in caches:
                    logits[j].append(graph.run_suffix(job.layer, cache, swapped))
            done += 1
            row: dict = {"layer": job.layer, "kind": job.kind, "setting": job.setting}
            if last:
                acc, loss = _metrics(torch.cat(logits[j]), dataset, batch_size)
                logits[j] = []
                row = _row(job, c, acc, loss, ref.accuracy, ref.loss)
                rows.append(row)
                compressed.pop(j, None)
            if progress is not None:
                progress(done, total, row)
        del caches
    return rows, ref


def sensitivity_matrix(
    df: pd.DataFrame, kind: str = "quant", value: str = "accuracy"
) -> pd.DataFrame:
    """Pivot a :func:`layer_sensitivity` table to layers (rows, model order) x settings.

    >>> t = pd.DataFrame({"layer": ["b", "b", "a", "a"], "index": [1, 1, 0, 0],
    ...                   "kind": "quant", "setting": [2.0, 8.0, 2.0, 8.0],
    ...                   "accuracy": [0.5, 0.9, 0.7, 0.9]})
    >>> sensitivity_matrix(t).values.tolist()
    [[0.7, 0.9], [0.5, 0.9]]
    """
    if kind not in ("quant", "prune"):
        raise ValueError(f"kind must be 'quant' or 'prune'; got {kind!r}.")
    if value not in df.columns:
        raise ValueError(f"No column {value!r}; the table has {', '.join(df.columns)}.")
    part = df[df["kind"] == kind]
    order = part.drop_duplicates("layer").sort_values("index")["layer"].tolist()
    m = part.pivot(index="layer", columns="setting", values=value).reindex(order)
    if kind == "quant":
        m.columns = [int(c) for c in m.columns]
    m.columns.name = "bits" if kind == "quant" else "rate"
    return m

