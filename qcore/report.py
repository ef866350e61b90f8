"""The results of one compression as a JSON document (the Playground's results download),
and the per-layer rows it lists (the Playground's per-layer table).

Pure functions over plain values and a :class:`~qcore.compress.Compressed` record.
Numbers JSON cannot hold are written as text (``"inf"``) or ``null`` (NaN), so the document
is strict JSON that any parser reads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from qcore.compress import Compressed, LayerResult
from qcore.config import Settings

__all__ = ["layer_row", "layer_rows", "results_json"]


def _plain(v: Any) -> Any:
    """A JSON-safe value: numpy scalars as Python ones, inf as text, NaN as None; mappings
    and sequences element by element."""
    if isinstance(v, np.generic):
        return _plain(v.item())
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def _span(t: torch.Tensor | None) -> tuple[float | None, float | None]:
    """The smallest and largest entry of a per-group tensor (G,), or (None, None)."""
    if t is None or t.numel() == 0:
        return None, None
    return float(t.min()), float(t.max())


def _kept_groups(s: LayerResult) -> torch.Tensor:
    """Which scale groups (G,) hold a kept weight: every group unless a pruning mask
    removed whole output channels of a per-channel layer (none kept: every group, so an
    all-pruned layer is still described)."""
    g = 1 if s.scales is None else s.scales.numel()
    if s.mask is None or g == 1 or not s.per_channel:
        return torch.ones(g, dtype=torch.bool)
    kept = s.mask.reshape(g, -1).any(dim=1)
    return kept if bool(kept.any()) else torch.ones(g, dtype=torch.bool)


def layer_row(s: LayerResult) -> dict[str, Any]:
    """One layer as plain numbers (``None`` where a float layer has none).

    Grid, scale and zero point are the tensor's, or with per-channel scales the envelope of
    the channels: the lowest grid bound and the highest, the smallest scale and the largest.
    Only channels that keep a weight count: a channel that pruning removed whole holds no
    weight and its placeholder scale says nothing. ``channels`` counts the scale groups
    described (1 per tensor, the kept channels per channel, 0 for a layer left in float).
    An unchanged layer's SQNR (infinite) is ``None``, and so is a 1-bit layer's zero point
    (its levels are -alpha and +alpha: no code stands for 0).
    """
    keep = _kept_groups(s)
    grid = s.grid_range
    lo = None if grid is None else _span(grid[0][keep])[0]
    hi = None if grid is None else _span(grid[1][keep])[1]
    scales = None if s.scales is None else s.scales[keep]
    scale_min, scale_max = _span(scales)
    # 1 bit has no zero code (levels -alpha and +alpha): no zero point to report
    binary = s.qparams is not None and s.qparams.binary
    zp_min, zp_max = (None, None) if binary else _span(
        None if s.zero_points is None else s.zero_points[keep])
    return {
        "layer": s.name,
        "kind": s.kind,
        "shape": "×".join(map(str, s.shape)),
        "params": s.params,
        "bits": s.bits,
        "sparsity": s.sparsity,
        "pruned": s.pruned,
        "rounded to zero": s.rounded_zero,
        "SQNR (dB)": s.sqnr_db if math.isfinite(s.sqnr_db) else None,
        "grid low": lo,
        "grid high": hi,
        "scale min": scale_min,
        "scale max": scale_max,
        "zero point min": None if zp_min is None else int(zp_min),
        "zero point max": None if zp_max is None else int(zp_max),
        "channels": 0 if scales is None else int(scales.numel()),
        "packed bytes": s.size_bytes,
        "float32 bytes": s.float_bytes,
        "encoding": s.encoding,
    } | ({} if s.rounding_changed is None else {"rounding changed": s.rounding_changed})


def layer_rows(compressed: Compressed) -> list[dict[str, Any]]:
    """One :func:`layer_row` per compressed weight layer, in model order."""
    return [layer_row(s) for s in compressed.layers]


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
    sqnr_db: float | None = None,
    pruned: float | None = None,
    rounded_zero: float | None = None,
    split: str = "test",
) -> str:
    """The document: model, dataset and split; the flat ``settings`` and the ``config``
    they make (``CompressionConfig.to_dict``, which ``from_dict`` reads back); simulated and
    float accuracy, agreement, loss, packed and float sizes; the whole model's SQNR
    (``sqnr_db``: total signal over total error) beside the mean of the layers' SQNRs;
    sparsity split into ``pruned`` and ``rounded_to_zero``; one entry per layer row.

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
        "compression_ratio": ratio,
        "sparsity": sparsity,
        "pruned": pruned,
        "rounded_to_zero": rounded_zero,
        "sqnr_db": sqnr_db,
        "mean_sqnr_db": mean_sqnr_db,
        "layers": list(layers),
    }
    # allow_nan=False: a NaN or inf that slipped past _plain is an error here, not bad JSON
    return json.dumps(_plain(doc), indent=2, allow_nan=False)
