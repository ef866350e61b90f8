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
hence accuracy and loss, are identical (both are scored by ``metrics_from_logits``). It all
runs on the model's shared graph (:mod:`qcore.graph`): layer k's compressed tensors are
replacements in a dictionary, so the shared float model is never changed.

Memory of the fast way: the cached values of one chunk of batches (at most
``max_cache_bytes``, at least one batch), the logits of every (k, s) and, when the split
needs more than one chunk, the compressed weights of every (k, s). For the sample models
on the 1,000-image mnist-5k test split (one batch): mnist-cnn 39 MiB (the inputs of conv1,
conv2, fc1, fc2), mnist-lenet300 5 MiB, mnist-resnet about 300 MiB.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import torch
from torch import nn

from qcore.activations import activation_edges, calibrate
from qcore.compress import Compressed, compress
from qcore.config import ActQuantConfig, CompressionConfig, PruneConfig, QuantConfig, check_bits
from qcore.data import Dataset
from qcore.evaluate import EVAL_BATCH, Metrics, evaluate, metrics_from_logits
from qcore.executors import Executor, check_refs, load_args, load_refs, ref_job
from qcore.fold import has_batchnorm
from qcore.graph import Graph, Plan, Variant, graph_of
from qcore.refs import DatasetRef, ModelRef, Progress

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


def _metrics(logits: torch.Tensor, dataset) -> Metrics:
    return metrics_from_logits(logits, dataset.y, len(dataset.classes))


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


def _check_arguments(quant, prune, bits, prune_rates, act_bits, calib, batch_size,
                     dataset) -> tuple[list[int], list[float], list[int]]:  # fmt: skip
    """The bit widths, rates and activation widths to analyse (checked)."""
    if not isinstance(quant, QuantConfig) or not isinstance(prune, PruneConfig):
        raise ValueError("quant must be a QuantConfig and prune a PruneConfig (or None).")
    if quant.rounding == "stochastic":
        raise ValueError("Sensitivity needs deterministic rounding; use rounding='nearest'.")
    bits = _check_bit_list([bits] if isinstance(bits, int) else bits)
    rates = _check_rates([prune_rates] if isinstance(prune_rates, float) else prune_rates)
    act_list = _check_bit_list([act_bits] if isinstance(act_bits, int) else act_bits)
    if not bits and not rates and not act_list:
        raise ValueError("Give at least one bit width or pruning rate to analyse.")
    if act_list and calib is None:
        raise ValueError("Activation rows need calibration data: pass calib= the 'calib' split.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive whole number; got {batch_size!r}.")
    if dataset is not None and len(dataset.y) == 0:
        raise ValueError("The dataset is empty; pick a split with examples in it.")
    return bits, rates, act_list


def _layer_names(graph: Graph, layers: Iterable[str] | str | None) -> list[str]:
    """The layers to analyse, in model order (checked against the graph's weight layers)."""
    all_layers = list(graph.layers)
    if not all_layers:
        raise ValueError("The model has no linear or convolution layers to analyse.")
    if layers is None:
        return all_layers
    names = [layers] if isinstance(layers, str) else list(dict.fromkeys(layers))
    unknown = [n for n in names if n not in all_layers]
    if unknown:
        raise ValueError(
            f"Unknown layer(s) {', '.join(map(repr, unknown))}; the model's weight layers "
            f"are {', '.join(all_layers)}."
        )
    return [n for n in all_layers if n in names]  # model order


def _act_rows(graph: Graph, dataset: Dataset, calib: Dataset, act: ActQuantConfig,
              act_list: list[int], edges: list[str], ref: Metrics, batch_size: int,
              rows: list[dict], tick: Callable[[int, dict], Any]) -> None:  # fmt: skip
    """Rows of kind "act": each edge alone fake-quantized at each width, the rest float."""
    done = 0
    for b in act_list:
        ranges = calibrate(graph, calib, replace(act, bits=b), edges)
        for j, e in enumerate(edges):
            m = evaluate(Variant(graph, points={e: ranges[e].fake_quantize}), dataset,
                         batch_size=batch_size)
            rows.append({
                "layer": e, "index": j, "kind": "act", "setting": float(b),
                "accuracy": m.accuracy, "loss": m.loss, "drop": ref.accuracy - m.accuracy,
                "loss_increase": m.loss - ref.loss, "sqnr_db": math.nan,
                "sparsity": math.nan, "params": math.nan, "layer_size_bytes": math.nan,
                "layer_float_bytes": math.nan,
            })  # fmt: skip
            done += 1
            tick(done, rows[-1])


def layer_sensitivity(
    model: nn.Module | ModelRef,
    dataset: Dataset | DatasetRef,
    bits: Iterable[int] = DEFAULT_BITS,
    prune_rates: Iterable[float] = DEFAULT_PRUNE_RATES,
    *,
    quant: QuantConfig | None = None,
    prune: PruneConfig | None = None,
    layers: Iterable[str] | None = None,
    fold_bn: bool = True,
    batch_size: int = EVAL_BATCH,
    naive: bool = False,
    max_cache_bytes: int = 512 * 2**20,
    progress: Progress | None = None,
    act_bits: Iterable[int] = (),
    act: ActQuantConfig | None = None,
    calib: Dataset | DatasetRef | None = None,
    executor: Executor | None = None,
    model_bytes: bytes | None = None,
) -> pd.DataFrame:
    """Accuracy when each layer alone is quantized (at each of ``bits``) or pruned.

    ``quant`` and ``prune`` are templates for the scheme (symmetric, per channel, clip,
    structured, ...); their ``bits`` / ``rate`` are replaced by each setting. Every other
    layer stays float. One row per (layer, kind, setting), layers in model order, with
    ``kind`` "quant" (``setting`` = bits) or "prune" (``setting`` = rate); ``drop`` and
    ``loss_increase`` are against the float model (``df.attrs["float_accuracy"]`` and
    ``["float_loss"]``); ``sqnr_db`` and ``layer_size_bytes`` are the layer's own.
    ``naive=True`` compresses and evaluates the whole model per row (same numbers, slower;
    ``df.attrs["method"]`` says which ran; a split that does not fit the model falls back
    to it, so its error names the dataset). ``progress(done, total, row)`` is called after
    each row (when the split is cached in several chunks, after each row of each chunk:
    ``total`` counts them all and the full row comes with the last chunk, before that only
    layer, kind and setting).

    ``act_bits`` adds rows of kind "act": each activation edge alone (``layer`` names the
    edge, e.g. "relu2": conv2 + relu2's output) fake-quantized at each width, everything
    else float, with ranges calibrated on ``calib`` as the ``act`` template says.

    ``model`` and ``dataset`` (and ``calib``) may be refs; with an ``executor``
    (:class:`~qcore.ProcessExecutor`, :class:`~qcore.RayExecutor`) they must be, and each
    layer's rows (and each activation width's) run there as one job: the same table as in
    process (``df.attrs["seconds"]`` aside). A session model's bytes go as ``model_bytes``.
    """
    quant = QuantConfig() if quant is None else quant
    prune = PruneConfig() if prune is None else prune
    act = ActQuantConfig() if act is None else act
    if executor is not None:
        check_refs(model, dataset, calib, model_bytes)
        bits, rates, act_list = _check_arguments(quant, prune, bits, prune_rates, act_bits,
                                                 calib, batch_size, None)  # fmt: skip
        return _on_executor(executor, ref_job(model, dataset, calib, model_bytes), bits,  # type: ignore[arg-type]
                            rates, act_list, quant, prune, act, layers, fold_bn, batch_size,
                            naive, max_cache_bytes, progress)  # fmt: skip
    model, dataset, calib = load_args(model, dataset, calib, model_bytes)
    bits, rates, act_list = _check_arguments(quant, prune, bits, prune_rates, act_bits, calib,
                                             batch_size, dataset)  # fmt: skip
    graph = graph_of(model, fold_bn)  # a ValueError naming the operation if untraceable
    names = _layer_names(graph, layers)
    jobs = _jobs(names, bits, rates, quant, prune, fold_bn)
    edges = activation_edges(graph, names) if act_list else []
    n_act = len(edges) * len(act_list)

    def weight_progress(done: int, total: int, row: dict) -> None:
        progress(done, total + n_act, row)

    start = time.perf_counter()
    result = None
    inner = None if progress is None else weight_progress
    if not jobs:
        ref = evaluate(model, dataset, batch_size=batch_size)
        method, rows = "naive", []
    elif not naive:
        result = _run_cached(model, graph, dataset, jobs, batch_size, max_cache_bytes, inner)
    if jobs and result is None:
        method = "naive"
        ref = evaluate(model, dataset, batch_size=batch_size)
        rows = _run_naive(model, dataset, jobs, ref, batch_size, inner)
    elif result is not None:
        method = "cached"
        rows, ref = result
    def act_progress(done: int, row: dict) -> None:
        if progress is not None:
            progress(len(jobs) + done, len(jobs) + n_act, row)

    if act_list:
        _act_rows(graph, dataset, calib, act, act_list, edges, ref, batch_size, rows,
                  act_progress)  # fmt: skip
    df = pd.DataFrame(rows, columns=list(SENSITIVITY_COLUMNS))
    df.attrs.update(float_accuracy=ref.accuracy, float_loss=ref.loss, method=method,
                    seconds=time.perf_counter() - start)
    return df


# ---------------------------------------------------------------------------------------------
# On an executor: one job per layer (its rows, the cached way) and one per activation width.


def _plan_job(job: dict) -> tuple[list[str], list[str], float | None, float | None]:
    """The layers (and activation edges) to analyse; the float metrics when no weight rows
    will measure them (as in process: ``evaluate`` of the model)."""
    model, dataset, _ = load_refs(job)
    if len(dataset.y) == 0:
        raise ValueError("The dataset is empty; pick a split with examples in it.")
    graph = graph_of(model, job["fold_bn"])
    names = _layer_names(graph, job["layers"])
    edges = activation_edges(graph, names) if job["act_bits"] else []
    if job["weight_rows"]:
        return names, edges, None, None
    ref = evaluate(model, dataset, batch_size=job["batch_size"])
    return names, edges, ref.accuracy, ref.loss


def _layer_job(job: dict) -> tuple[list[dict], float, float, str]:
    """One layer's rows (every bit width and rate), the float accuracy and loss, and the
    method that ran; the same rows as that layer's part of the in-process table."""
    model, dataset, _ = load_refs(job)
    graph = graph_of(model, job["fold_bn"])
    jobs = [replace(j, index=job["index"]) for j in _jobs(
        [job["layer"]], job["bits"], job["rates"], QuantConfig.from_dict(job["quant"]),
        PruneConfig.from_dict(job["prune"]), job["fold_bn"])]  # fmt: skip
    result = None
    if not job["naive"]:
        result = _run_cached(model, graph, dataset, jobs, job["batch_size"],
                             job["max_cache_bytes"], None)  # fmt: skip
    if result is None:
        ref = evaluate(model, dataset, batch_size=job["batch_size"])
        return _run_naive(model, dataset, jobs, ref, job["batch_size"], None), ref.accuracy, \
            ref.loss, "naive"  # fmt: skip
    rows, ref = result
    return rows, ref.accuracy, ref.loss, "cached"


def _act_job(job: dict) -> list[dict]:
    """The rows of one activation width (every edge), ``drop`` and ``loss_increase`` left
    for the caller, who knows the float metrics."""
    model, dataset, calib = load_refs(job)
    graph = graph_of(model, job["fold_bn"])
    nan = Metrics(math.nan, math.nan, len(dataset.y), None, None)  # type: ignore[arg-type]
    rows: list[dict] = []
    _act_rows(graph, dataset, calib, ActQuantConfig.from_dict(job["act"]), [job["bits"]],
              job["edges"], nan, job["batch_size"], rows, lambda _d, _r: None)  # fmt: skip
    return rows


def _on_executor(executor: Executor, refs: dict, bits, rates, act_list, quant, prune, act,
                 layers, fold_bn, batch_size, naive, max_cache_bytes,
                 progress) -> pd.DataFrame:  # fmt: skip
    start = time.perf_counter()
    common = {**refs, "fold_bn": fold_bn, "batch_size": batch_size}
    layer_list = None if layers is None else (
        [layers] if isinstance(layers, str) else list(layers))  # fmt: skip
    [(names, edges, ref_acc, ref_loss)] = executor.map(_plan_job, [{
        **common, "layers": layer_list, "act_bits": act_list,
        "weight_rows": bool(bits or rates)}])  # fmt: skip
    per_layer = len(bits) + len(rates)
    weight_jobs = [{**common, "layer": n, "index": i, "bits": bits, "rates": rates,
                    "quant": quant.to_dict(), "prune": prune.to_dict(), "naive": naive,
                    "max_cache_bytes": max_cache_bytes}
                   for i, n in enumerate(names)] if per_layer else []  # fmt: skip
    act_jobs = [{**common, "bits": b, "edges": edges, "act": act.to_dict()} for b in act_list]
    total = len(weight_jobs) * per_layer + len(act_jobs) * len(edges)
    done = [0]

    def on_result(_i: int, out: Any) -> None:
        rows = out[0] if isinstance(out, tuple) else out
        for row in rows:
            done[0] += 1
            if progress is not None:
                progress(done[0], total, row)

    outs = executor.map(_layer_job, weight_jobs, on_result) if weight_jobs else []
    rows = [row for out in outs for row in out[0]]
    method = "naive"
    if outs:
        _, ref_acc, ref_loss, _ = outs[0]
        method = "cached" if all(o[3] == "cached" for o in outs) else "naive"
    for act_rows in executor.map(_act_job, act_jobs, on_result) if act_jobs else []:
        for row in act_rows:
            rows.append({**row, "drop": ref_acc - row["accuracy"],
                         "loss_increase": row["loss"] - ref_loss})  # fmt: skip
    df = pd.DataFrame(rows, columns=list(SENSITIVITY_COLUMNS))
    df.attrs.update(float_accuracy=ref_acc, float_loss=ref_loss, method=method,
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


def _run_cached(model, graph: Graph, dataset, jobs, batch_size, max_cache_bytes,
                progress) -> tuple[list[dict], Metrics] | None:
    """Rows the fast way, and the float metrics; ``None`` if the data does not fit."""
    x = dataset.inputs()
    starts = list(range(0, x.shape[0], batch_size))
    plans: dict[str, Plan] = {}
    for job in jobs:
        if job.layer not in plans:
            keys = [k for k in (f"{job.layer}.weight", f"{job.layer}.bias") if k in graph.params]
            plans[job.layer] = graph.plan(keys)
    keep = set().union(*(p.reads for p in plans.values())) | {graph.output}
    with torch.inference_mode():
        try:
            first = graph.run(x[:batch_size], keep=keep)[1]
        except RuntimeError:  # e.g. the data does not fit: the naive way says so clearly
            return None
    per_batch = max(1, _value_bytes(first.values()))
    per_chunk = max(1, int(max_cache_bytes // per_batch))
    chunks = [starts[i : i + per_chunk] for i in range(0, len(starts), per_chunk)]
    total = len(jobs) * len(chunks)
    keep_compressed = len(chunks) > 1  # compressed weights are needed again for later chunks
    compressed: dict[int, Compressed] = {}
    logits: list[list[torch.Tensor]] = [[] for _ in jobs]
    float_logits: list[torch.Tensor] = []
    rows: list[dict] = []
    ref = None
    done = 0
    for ci, chunk in enumerate(chunks):
        last = ci == len(chunks) - 1
        with torch.inference_mode():
            caches = [first if s == 0 else graph.run(x[s : s + batch_size], keep=keep)[1]
                      for s in chunk]  # fmt: skip
        first = {}
        float_logits.extend(cache[graph.output] for cache in caches)
        if last:  # folded BatchNorm runs other arithmetic: the float model itself is the ref
            folded = any(job.config.fold_bn for job in jobs) and has_batchnorm(model)
            ref = (evaluate(model, dataset, batch_size=batch_size) if folded
                   else _metrics(torch.cat(float_logits), dataset))
        for j, job in enumerate(jobs):
            c = compressed[j] if j in compressed else compress(model, job.config)
            if keep_compressed and not last:
                compressed[j] = c
            tensors = c.replacements()
            with torch.inference_mode():
                for cache in caches:
                    logits[j].append(graph.run_suffix(plans[job.layer], cache, tensors))
            done += 1
            row: dict = {"layer": job.layer, "kind": job.kind, "setting": job.setting}
            if last:
                m = _metrics(torch.cat(logits[j]), dataset)
                logits[j] = []
                row = _row(job, c, m.accuracy, m.loss, ref.accuracy, ref.loss)
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
    if kind not in ("quant", "prune", "act"):
        raise ValueError(f"kind must be 'quant', 'prune' or 'act'; got {kind!r}.")
    if value not in df.columns:
        raise ValueError(f"No column {value!r}; the table has {', '.join(df.columns)}.")
    part = df[df["kind"] == kind]
    order = part.drop_duplicates("layer").sort_values("index")["layer"].tolist()
    m = part.pivot(index="layer", columns="setting", values=value).reindex(order)
    if kind in ("quant", "act"):
        m.columns = [int(c) for c in m.columns]
    m.columns.name = "rate" if kind == "prune" else "bits"
    return m

