"""Deep Compression (Han, Mao and Dally, ICLR 2016): the three-stage recipe, stage by stage.

1. **Prune + retrain**: magnitude pruning per layer (the paper's LeNet-300-100 recipe keeps
   8 % of fc1, 9 % of fc2 and 26 % of fc3), then fine-tuning with the masks fixed, so the
   weights that survive learn to do the work of those removed.
2. **Share + retrain centroids**: each layer's kept weights are clustered by k-means into
   2^b shared values (linear initialisation; 6 bits for fully connected layers, 8 for
   convolutions), then the centroids are fine-tuned: the gradients of all weights sharing
   a centroid are summed into it, so the sharing survives training.
3. **Huffman**: the weight codes and the relative-index stream are Huffman coded, the code
   tables stored in the file and counted.

Every stage is measured the same way: the packed bytes of :func:`qcore.compress` (what
:func:`qcore.export_packed` writes) and top-1 accuracy on the test split. A stage that
would make the file larger than the stage before it is not applied (its row says so), so
sizes never increase from stage to stage.

The paper's numbers for LeNet-300-100 and LeNet-5 (its Tables 1 to 3) are in
:data:`PAPER`, for reference; ours come from a model trained on 3,500 MNIST digits
(mnist-5k), not 60,000.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
from torch import nn

from qcore.compress import Compressed, compress
from qcore.config import CompressionConfig, PruneConfig, QuantConfig, check_bits
from qcore.data import Dataset
from qcore.evaluate import evaluate
from qcore.finetune import FinetuneConfig, finetune, float_module
from qcore.graph import Graph, graph_of, param_key
from qcore.prune import magnitude_mask
from qcore.refs import Progress

__all__ = [
    "DeepCompressionResult", "deep_compression", "default_prune_rates", "default_bits",
    "paper_reference",
    "STAGES", "STAGE_LABELS", "PAPER", "DEFAULT_EPOCHS", "CENTROID_EPOCHS", "PRUNE_LR",
    "CENTROID_LR",
]  # fmt: skip

STAGES: tuple[str, ...] = ("float", "pruned", "shared", "huffman")
STAGE_LABELS: dict[str, str] = {
    "float": "float32",
    "pruned": "pruned + retrained",
    "shared": "weight sharing + retrained centroids",
    "huffman": "Huffman coded",
}
DEFAULT_EPOCHS = 2  # retraining after pruning: it recovers most of what pruning lost
CENTROID_EPOCHS = 1  # centroid retraining: a shared model moves little (measured, README)
PRUNE_LR = 3e-3  # Adam, cosine decay: retraining after pruning (1e-3 lost 1.3 pp on LeNet-300-100)
CENTROID_LR = 3e-4  # Adam, cosine decay: the centroids move less than free weights

# The paper's per-layer recipes: share of weights pruned and the codebook's bits, by our
# sample architectures' layer names. LeNet-300-100 (Table 2): 8 %, 9 %, 26 % of the
# weights kept, 6 bits. LeNet-5 (Table 3), for our two-conv CNN of the same shape: 66 %,
# 12 %, 8 %, 19 % kept, 8 bits for convolutions and 5 for fully connected layers.
RECIPES: dict[str, tuple[dict[str, float], dict[str, int]]] = {
    "lenet300": ({"fc1": 0.92, "fc2": 0.91, "fc3": 0.74}, {"fc1": 6, "fc2": 6, "fc3": 6}),
    "cnn": ({"conv1": 0.34, "conv2": 0.88, "fc1": 0.92, "fc2": 0.81},
            {"conv1": 8, "conv2": 8, "fc1": 5, "fc2": 5}),
}  # fmt: skip

# The paper's published numbers (Han et al. 2016, Tables 1-3), for reference only: size in
# kB as printed (float32 weights), compression ratio, top-1 error. The paper gives no
# size or error after pruning alone, nor an error before Huffman coding (None).
PAPER: dict[str, pd.DataFrame] = {
    "LeNet-300-100": pd.DataFrame({
        "stage": list(STAGES),
        "kept": [1.0, 0.08, 0.08, 0.08],
        "size_kb": [1070.0, None, None, 27.0],
        "ratio": [1.0, None, 32.0, 40.0],
        "error": [0.0164, None, None, 0.0158],
    }),
    "LeNet-5": pd.DataFrame({
        "stage": list(STAGES),
        "kept": [1.0, 0.08, 0.08, 0.08],
        "size_kb": [1720.0, None, None, 44.0],
        "ratio": [1.0, None, 33.0, 39.0],
        "error": [0.0080, None, None, 0.0074],
    }),
}  # fmt: skip


@dataclass(frozen=True, eq=False)
class DeepCompressionResult:
    """The pipeline's record: one row per stage, one row per layer and stage."""

    # stage, label, size_bytes, ratio, accuracy, kept (share of weights kept),
    # bits_per_weight (weight bytes * 8 / weights, every layer), applied, seconds
    stages: pd.DataFrame
    # layer, stage, weights, kept, bits (codebook bits; 32 = float), bits_per_weight (the
    # weight's bytes * 8 / weights), code_bits, index_bits (exact, before padding),
    # code_bytes, index_bytes, codebook_bytes, table_bytes, scale_bytes, bias_bytes
    # (LayerResult.size_parts: they add up to size_bytes)
    layers: pd.DataFrame
    compressed: Compressed  # the last stage applied: export it with qcore.export_packed
    prune_rates: Mapping[str, float]
    bits: Mapping[str, int]
    history: pd.DataFrame  # both retraining runs (finetune's history and a "stage" column)
    split: str  # where accuracy was measured: "test", or "calib" when no test split is given
    n: int  # how many images accuracy was measured on
    stopped: bool  # should_stop cut a retraining short

    @property
    def ratio(self) -> float:
        return float(self.stages["ratio"].iloc[-1])

    @property
    def accuracy_drop(self) -> float:
        """Float accuracy minus the final accuracy (positive = lost)."""
        return float(self.stages["accuracy"].iloc[0] - self.stages["accuracy"].iloc[-1])


def _arch(model: nn.Module) -> str | None:
    spec = getattr(model, "qcore_spec", None)
    return spec.get("arch") if isinstance(spec, dict) else None


def _recipe(model: nn.Module, graph: Graph) -> tuple[dict[str, float], dict[str, int]] | None:
    recipe = RECIPES.get(_arch(model) or "")
    if recipe is None or set(recipe[0]) != set(graph.layers):
        return None
    return recipe


def paper_reference(model: nn.Module) -> str:
    """The paper's network to compare ``model`` with: "LeNet-5" for the two-conv CNN (the
    same shape), else "LeNet-300-100"."""
    return "LeNet-5" if _arch(model) == "cnn" else "LeNet-300-100"


def default_prune_rates(model: nn.Module) -> dict[str, float]:
    """The share of weights pruned per layer: the paper's recipe for LeNet-300-100 and (for
    the two-conv CNN) LeNet-5; for any other model our own rule after the paper's tables
    (small layers keep more): layers under 1,000 weights 0.3, under 10,000 weights 0.5, the
    last layer and convolutions 0.75, other fully connected layers 0.9."""
    graph = graph_of(model)
    recipe = _recipe(model, graph)
    if recipe is not None:
        return {n: recipe[0][n] for n in graph.layers}
    names = list(graph.layers)
    out = {}
    for n in names:
        w = graph.params[param_key(n, "weight")]
        if w.numel() < 1000:
            out[n] = 0.3
        elif w.numel() < 10_000:
            out[n] = 0.5
        elif n == names[-1] or w.dim() > 2:
            out[n] = 0.75
        else:
            out[n] = 0.9
    return out


def default_bits(model: nn.Module) -> dict[str, int]:
    """The codebook's bits per layer: the paper's recipe where it has one, else 8 bits for
    convolutions and 6 for fully connected layers (the paper's LeNet-300-100 choice)."""
    graph = graph_of(model)
    recipe = _recipe(model, graph)
    if recipe is not None:
        return {n: recipe[1][n] for n in graph.layers}
    return {n: 8 if graph.params[param_key(n, "weight")].dim() > 2 else 6 for n in graph.layers}


def _check_rate(rate: object) -> float:
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate):
        raise ValueError(f"prune_rate must be a number from 0 to 0.99; got {rate!r}.")
    if not 0.0 <= rate < 1.0:
        raise ValueError(
            f"prune_rate must be at least 0 and below 1 (1 would remove every weight); "
            f"got {rate}."
        )
    return float(rate)


def _layer_rows(c: Compressed, stage: str) -> list[dict[str, Any]]:
    rows = []
    for r in c.layers:
        n = math.prod(r.shape)
        parts = r.size_parts  # code, index, codebook, table, scale and bias bytes
        rows.append({
            "layer": r.name, "stage": stage, "weights": n,
            "kept": 1.0 - r.pruned if r.mask is not None else float((r.dequantized != 0).sum()) / n,
            "bits": r.bits,
            "bits_per_weight": 8.0 * r.encoded.nbytes() / n,
            "code_bits": r.code_bits,  # the weight codes (float32 values), before padding
            "index_bits": r.index_bits,  # where the kept weights are
            **parts,
            "size_bytes": r.size_bytes,
        })  # fmt: skip
    return rows


class _Stages:
    """The stage table as it grows: one row per stage, never larger than the stage before."""

    def __init__(self, measure_on: Dataset, done_at: dict[str, int],
                 report: Callable[[int, dict[str, Any]], None]):  # fmt: skip
        self.measure_on, self.done_at, self.report = measure_on, done_at, report
        self.rows: list[dict[str, Any]] = []
        self.layer_rows: list[dict[str, Any]] = []
        self.last: tuple[Compressed, float] | None = None
        self.done = 0

    def add(self, stage: str, c: Compressed, acc: float | None, started: float) -> None:
        applied = self.last is None or c.size_bytes <= self.last[0].size_bytes
        if not applied:  # never larger than the stage before: keep that one
            c, acc = self.last
        acc = evaluate(c.model, self.measure_on).accuracy if acc is None else acc
        weights = sum(math.prod(r.shape) for r in c.layers)
        weight_bytes = sum(r.encoded.nbytes() for r in c.layers)
        kept = sum(math.prod(r.shape) * (1.0 - r.pruned) for r in c.layers) / weights
        self.rows.append({"stage": stage, "label": STAGE_LABELS[stage],
                          "size_bytes": c.size_bytes, "ratio": c.ratio, "accuracy": acc,
                          "kept": kept, "bits_per_weight": 8.0 * weight_bytes / weights,
                          "applied": applied,
                          "seconds": time.perf_counter() - started})  # fmt: skip
        self.layer_rows.extend(_layer_rows(c, stage))
        self.last = (c, acc)
        self.done = self.done_at[stage]
        self.report(self.done, {"stage": stage, "size_bytes": c.size_bytes, "accuracy": acc})


def _pruned_start(model: nn.Module, graph: Graph,
                  rates: dict[str, float]) -> tuple[nn.Module, PruneConfig | None]:  # fmt: skip
    """The model with each layer's smallest weights zeroed at its rate, and the one global
    rate that prunes exactly those zeros (finetune and compress take one rate for the
    whole model, so the per-layer masks are applied first and the zeros then pruned
    globally). ``None`` when nothing is pruned."""
    keys = {n: param_key(n, "weight") for n in graph.layers}
    masked = {keys[n]: graph.params[keys[n]] * magnitude_mask(graph.params[keys[n]], rates[n])
              for n in graph.layers}  # fmt: skip
    zeros = sum(int((w == 0).sum()) for w in masked.values())
    count = sum(w.numel() for w in masked.values())
    if zeros == count:
        raise ValueError("These pruning rates remove every weight; lower them.")
    prune = PruneConfig(rate=zeros / count, scope="global") if 0 < zeros < count else None
    return float_module(model, masked, fold_bn=True), prune  # the graph folds BatchNorm


def deep_compression(
    model: nn.Module,
    train: Dataset,
    calib: Dataset | None,
    *,
    prune_rate: float | None = None,
    bits: int | None = None,
    epochs: int = DEFAULT_EPOCHS,
    centroid_epochs: int = CENTROID_EPOCHS,
    seed: int = 0,
    progress: Progress | None = None,
    test: Dataset | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> DeepCompressionResult:
    """Prune + retrain, share + retrain centroids, Huffman code: Deep Compression on ``model``.

    ``prune_rate`` (one rate for every layer) and ``bits`` (one codebook width for every
    layer) override the recipe of :func:`default_prune_rates` and :func:`default_bits`;
    ``epochs`` and ``centroid_epochs`` are the lengths of the retraining after pruning and
    of the centroid retraining, both on ``train``. Accuracy is
    measured on ``test`` (on ``calib`` when no test split is given: see ``.split``);
    ``calib`` also gives the retraining history its calibration accuracy.
    ``progress(done, total, row)`` reports training steps and stages; ``should_stop()``
    ends a retraining early (the stages after it still run). ``model`` is never changed.
    """
    t0 = time.perf_counter()
    for what, value in (("epochs", epochs), ("centroid_epochs", centroid_epochs)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 100:
            raise ValueError(f"{what} must be a whole number from 1 to 100; got {value!r}.")
    graph = graph_of(model)
    names = list(graph.layers)
    if not names:
        raise ValueError("The model has no linear or convolution layers to compress.")
    rates = default_prune_rates(model) if prune_rate is None else dict.fromkeys(
        names, _check_rate(prune_rate))
    widths = default_bits(model) if bits is None else dict.fromkeys(names, check_bits(bits))
    measure_on = test if test is not None else calib
    if measure_on is None:
        raise ValueError("Give a test split (or at least a calibration split) to measure on.")
    ft_p = FinetuneConfig(epochs=epochs, lr=PRUNE_LR, seed=seed)
    ft_c = FinetuneConfig(epochs=centroid_epochs, lr=CENTROID_LR, seed=seed)
    batches = math.ceil(len(train) / ft_p.batch_size)
    steps_p, steps_c = epochs * batches, centroid_epochs * batches
    total = steps_p + steps_c + len(STAGES)

    def report(done: int, row: dict[str, Any]) -> None:
        if progress is not None:
            progress(done, total, row)

    def relay(offset: int, stage: str) -> Progress:
        def fn(d: int, _t: int, row: dict) -> None:
            if progress is not None:
                progress(offset + d, total, {**row, "stage": stage})
        return fn

    rec = _Stages(measure_on, {"float": 1, "pruned": steps_p + 2,
                               "shared": steps_p + steps_c + 3, "huffman": total}, report)
    add = rec.add

    # 1. float
    started = time.perf_counter()
    add("float", compress(model, CompressionConfig(quant=None)), None, started)

    # 2. prune (per layer) + retrain with the masks fixed
    started = time.perf_counter()
    start, prune = _pruned_start(model, graph, rates)
    cfg_p = CompressionConfig(quant=None, prune=prune)
    hist = []
    stopped = False
    if prune is None:  # nothing pruned (rate 0): nothing to retrain, the model goes on as is
        add("pruned", compress(model, cfg_p), None, started)
        pruned_model = model
    else:
        run_p = finetune(start, train, cfg_p, ft_p, calib=calib,
                         progress=relay(rec.done, "pruned"), should_stop=should_stop)  # fmt: skip
        hist.append(run_p.history.assign(stage="pruned"))
        add("pruned", compress(run_p.model, cfg_p), None, started)
        pruned_model = run_p.model if rec.rows[-1]["applied"] else model
        stopped = run_p.stopped

    # 3. k-means weight sharing + centroid retraining (the masks kept)
    started = time.perf_counter()
    q = QuantConfig(bits=max(widths.values()), codebook="kmeans", layer_bits=widths)
    cfg_s = CompressionConfig(quant=q, prune=prune if pruned_model is not model else None)
    run_s = finetune(pruned_model, train, cfg_s, ft_c, calib=calib,
                     progress=relay(rec.done, "shared"), should_stop=should_stop)  # fmt: skip
    hist.append(run_s.history.assign(stage="shared"))
    shared_model = run_s.model
    add("shared", compress(shared_model, cfg_s), None, started)

    # 4. Huffman coding of codes and index: lossless, the same weights
    started = time.perf_counter()
    shared_acc = rec.rows[-1]["accuracy"]
    huff = compress(shared_model, replace(cfg_s, entropy="huffman"))
    add("huffman", huff, shared_acc if rec.rows[-1]["applied"] else None, started)

    stages = pd.DataFrame(rec.rows)
    stages.attrs["seconds"] = time.perf_counter() - t0
    return DeepCompressionResult(
        stages=stages,
        layers=pd.DataFrame(rec.layer_rows),
        compressed=rec.last[0],
        prune_rates=rates,
        bits=widths,
        history=pd.concat(hist, ignore_index=True),
        split="test" if test is not None else "calib",
        n=len(measure_on),
        stopped=stopped or run_s.stopped,
    )
