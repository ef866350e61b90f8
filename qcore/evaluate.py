"""Top-1 accuracy, loss, confusion matrix and agreement on a held-out split."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from qcore.data import Dataset
from qcore.fold import assert_eval
from qcore.graph import Variant

__all__ = ["Metrics", "evaluate", "agreement", "predict_logits", "metrics_from_logits"]


@dataclass(frozen=True, eq=False)
class Metrics:
    """Evaluation of one model on one split."""

    accuracy: float  # top-1, in [0, 1]
    loss: float  # mean cross-entropy
    n: int
    predictions: np.ndarray  # int64 [N], predicted class per example
    confusion: np.ndarray  # int64 [C, C]; row = true class, column = predicted

    @property
    def per_class_accuracy(self) -> np.ndarray:
        """Recall per true class (nan for a class with no examples)."""
        totals = self.confusion.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(totals > 0, np.diag(self.confusion) / totals, np.nan)


EVAL_BATCH = 256  # fits the CPU cache better than one large batch (see qcore bench)


def _logits(model: nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """The logits of each batch, concatenated: the model's replacement tensors are derived
    once for all batches, and everything runs under inference mode."""
    assert_eval(model, "evaluating")
    run = Variant.of(model).runner()
    with torch.inference_mode():
        outs = [run(x) for x in batches]
    return torch.cat(outs) if outs else torch.empty(0)


def predict_logits(
    model: nn.Module, x: torch.Tensor, batch_size: int = EVAL_BATCH
) -> torch.Tensor:
    """Logits for ``x`` in batches, under inference mode.

    ``model`` runs as a :class:`qcore.graph.Variant`: a variant as it is, a plain module as
    its own traced graph (the same logits; ValueError naming the line torch.fx cannot trace).
    """
    return _logits(model, (x[i : i + batch_size] for i in range(0, x.shape[0], batch_size)))


def metrics_from_logits(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> Metrics:
    """Accuracy, loss, predictions and confusion matrix of ``logits`` (N, C) for labels ``y``."""
    if logits.dim() != 2 or logits.shape[1] != num_classes:
        raise ValueError(
            f"The model gives {tuple(logits.shape[1:])} outputs per example but the dataset has "
            f"{num_classes} classes."
        )
    loss = float(F.cross_entropy(logits, y, reduction="mean")) if len(y) else float("nan")
    pred = logits.argmax(dim=1)
    confusion = torch.bincount(y * num_classes + pred, minlength=num_classes**2)
    return Metrics(
        accuracy=int((pred == y).sum()) / len(y) if len(y) else float("nan"),  # exact, not f32
        loss=loss,
        n=int(len(y)),
        predictions=pred.numpy().astype(np.int64),
        confusion=confusion.reshape(num_classes, num_classes).numpy().astype(np.int64),
    )


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = EVAL_BATCH) -> Metrics:
    """Top-1 accuracy and mean loss of ``model`` on ``dataset`` (a qcore Dataset)."""
    n = len(dataset)
    try:  # inputs batch by batch: an upload's uint8 pixels are normalised per batch
        logits = _logits(model, (dataset.inputs(slice(i, i + batch_size))
                                 for i in range(0, n, batch_size)))  # fmt: skip
    except RuntimeError as exc:  # shape mismatch inside the network
        raise ValueError(
            f"The model cannot run on dataset {getattr(dataset, 'name', '?')!r} "
            f"(inputs {tuple(dataset.x.shape[1:])}): {exc}"
        ) from exc
    return metrics_from_logits(logits, dataset.y, len(dataset.classes))


def agreement(a: Metrics, b: Metrics) -> float:
    """Fraction of examples on which two evaluations predict the same class."""
    if a.n != b.n:
        raise ValueError("The two evaluations are on different numbers of examples.")
    return float((a.predictions == b.predictions).mean()) if a.n else float("nan")
