"""The results of one compression as a JSON document (the Playground's results download).

A pure function over plain values: the settings, the headline numbers and the per-layer
rows. Numbers JSON cannot hold are written as text (``"inf"``) or ``null`` (NaN).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from qcore.config import Settings

__all__ = ["results_json"]


def _plain(v: Any) -> Any:
    """A JSON-safe scalar: numpy scalars as Python ones, inf as text, NaN as None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, np.generic):
        return _plain(v.item())
    return v


def results_json(
    model: str,
    dataset: str,
    settings: Settings,
    *,
    accuracy: float,
    float_accuracy: float,
    agreement: float,
    loss: float,
    examples: int,
    size_bytes: int,
    float_size_bytes: int,
    ratio: float,
    sparsity: float,
    mean_sqnr_db: float,
    layers: Sequence[Mapping[str, Any]],
    split: str = "test",
) -> str:
    """The document: model, dataset and split; the flat ``settings`` and the ``config``
    they make (``CompressionConfig.to_dict``, which ``from_dict`` reads back); simulated and
    float accuracy, agreement, loss, packed and float sizes; one entry per layer row.

    >>> doc = json.loads(results_json("m", "d", Settings(bits=4), accuracy=0.5,
    ...     float_accuracy=0.75, agreement=0.5, loss=1.0, examples=4, size_bytes=10,
    ...     float_size_bytes=40, ratio=4.0, sparsity=0.0, mean_sqnr_db=float("inf"), layers=[]))
    >>> doc["accuracy_change"], doc["mean_sqnr_db"], doc["config"]["quant"]["bits"]
    (-0.25, 'inf', 4)
    """
    doc = {
        "model": model,
        "dataset": dataset,
        "split": split,
        "settings": asdict(settings),
        "config": settings.to_config().to_dict(),
        "accuracy_simulated": accuracy,
        "float_accuracy": float_accuracy,
        "accuracy_change": accuracy - float_accuracy,
        "agreement_with_float": agreement,
        "loss": loss,
        "examples": examples,
        "packed_size_bytes": size_bytes,
        "float_size_bytes": float_size_bytes,
        "compression_ratio": _plain(ratio),
        "sparsity": sparsity,
        "mean_sqnr_db": _plain(mean_sqnr_db),
        "layers": [{k: _plain(v) for k, v in row.items()} for row in layers],
    }
    return json.dumps(doc, indent=2)
