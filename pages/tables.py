"""The records the pages draw from: a Playground result, the newly wrong images, the
per-layer table (and how its columns are shown), and the results download built from them.

The records hold plain, picklable values, so ``st.cache_data`` can keep them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import streamlit as st

import qcore
from qcore import report
from qcore.config import Settings


@dataclass(frozen=True, eq=False)
class Result:
    """What the Playground shows for one (model, dataset, settings): plain, picklable values."""

    accuracy: float  # simulated: fake-quantized weights in float arithmetic
    float_accuracy: float
    loss: float
    n: int
    size_bytes: int  # packed
    float_size_bytes: int
    ratio: float
    sparsity: float
    mean_sqnr_db: float
    agreement: float  # fraction of test predictions equal to the float model's
    predictions: np.ndarray  # int64 [N]
    confusion: np.ndarray  # int64 [C, C]
    float_confusion: np.ndarray
    layers: pd.DataFrame
    shapes: dict[str, tuple[int, ...]]  # weight shape per compressed layer
    seconds: float  # time to compress and evaluate


def make_result(
    comp: qcore.Compressed, m: qcore.Metrics, f: qcore.Metrics, seconds: float
) -> Result:
    """The record of a compressed model ``comp``, its metrics ``m`` and the float ones ``f``."""
    return Result(
        accuracy=m.accuracy,
        float_accuracy=f.accuracy,
        loss=m.loss,
        n=m.n,
        size_bytes=comp.size_bytes,
        float_size_bytes=comp.float_size_bytes,
        ratio=comp.ratio,
        sparsity=comp.sparsity,
        mean_sqnr_db=comp.mean_sqnr_db,
        agreement=qcore.agreement(m, f),
        predictions=m.predictions,
        confusion=m.confusion,
        float_confusion=f.confusion,
        layers=layer_table(comp),
        shapes={s.name: s.shape for s in comp.layers},
        seconds=seconds,
    )


def layer_table(compressed: qcore.Compressed) -> pd.DataFrame:
    """One row per compressed weight layer."""
    rows = [
        {
            "layer": s.name,
            "kind": s.kind,
            "shape": "×".join(map(str, s.shape)),
            "params": s.params,
            "bits": s.bits,
            "sparsity": s.sparsity,
            "SQNR (dB)": s.sqnr_db if math.isfinite(s.sqnr_db) else None,
            "packed bytes": s.size_bytes,
            "float32 bytes": s.float_bytes,
            "encoding": s.encoding,
        }
        for s in compressed.layers
    ]
    return pd.DataFrame(rows)


# How the per-layer table's columns are shown, wherever a page draws it.
LAYER_TABLE_COLUMNS = {
    "params": st.column_config.NumberColumn("params", format="localized"),
    "bits": st.column_config.NumberColumn("bits", help="32 = left in float"),
    "sparsity": st.column_config.NumberColumn("sparsity", format="percent"),
    "SQNR (dB)": st.column_config.NumberColumn(
        "SQNR (dB)", format="%.1f", help="empty = unchanged"
    ),
    "packed bytes": st.column_config.NumberColumn("packed bytes", format="localized"),
    "float32 bytes": st.column_config.NumberColumn("float32 bytes", format="localized"),
}


@dataclass(frozen=True, eq=False)
class NewlyWrong:
    """Test images the float model got right and the compressed model gets wrong."""

    images: np.ndarray  # float32 (K, C, H, W), normalised as in the dataset
    float_pred: list[str]
    now_pred: list[str]
    truth: list[str]
    total: int  # how many such images there are in the test split


def make_newly_wrong(
    ds: qcore.Dataset, before: np.ndarray, now: np.ndarray, limit: int
) -> NewlyWrong:
    """The first ``limit`` images of ``ds`` that predictions ``before`` got right and
    ``now`` gets wrong (both int64 [N]), with class names."""
    y = ds.y.numpy()
    idx = np.flatnonzero((before == y) & (now != y))
    shown = idx[:limit]
    names: Sequence[str] = ds.classes
    return NewlyWrong(
        images=ds.x[shown].numpy(),
        float_pred=[names[i] for i in before[shown]],
        now_pred=[names[i] for i in now[shown]],
        truth=[names[i] for i in y[shown]],
        total=int(idx.size),
    )


def results_json(model_name: str, dataset_name: str, settings: Settings, r: Result) -> str:
    """The results download: :func:`qcore.report.results_json` over the record ``r``."""
    return report.results_json(
        model_name,
        dataset_name,
        settings,
        accuracy=r.accuracy,
        float_accuracy=r.float_accuracy,
        agreement=r.agreement,
        loss=r.loss,
        examples=r.n,
        size_bytes=r.size_bytes,
        float_size_bytes=r.float_size_bytes,
        ratio=r.ratio,
        sparsity=r.sparsity,
        mean_sqnr_db=r.mean_sqnr_db,
        layers=r.layers.to_dict("records"),
    )
