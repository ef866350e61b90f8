"""Sweeps over compression settings, and the Pareto front of a sweep.

A :class:`SweepGrid` is the cartesian product of its axes; :func:`sweep` compresses and
evaluates the model once per configuration and returns one table row each.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from itertools import product

import numpy as np
import pandas as pd
from torch import nn

from qcore.compress import compress
from qcore.config import (
    ACT_OBSERVERS,
    CLIP_MODES,
    ROUNDINGS,
    SCOPES,
    ActObserver,
    ClipMode,
    CompressionConfig,
    PruneConfig,
    Scope,
    Settings,
    check_bits,
)
from qcore.data import Dataset
from qcore.evaluate import EVAL_BATCH, Metrics, agreement, evaluate
from qcore.executors import (
    Executor,
    check_refs,
    load_args,
    load_refs,
    ref_job,
    refs_key,
    worker_memo,
)
from qcore.refs import DatasetRef, ModelRef, Progress

__all__ = ["SWEEP_COLUMNS", "SweepGrid", "sweep", "pareto_front"]

SWEEP_COLUMNS: tuple[str, ...] = (
    "bits", "clip", "clip_mode", "prune", "symmetric", "per_channel", "scheme", "granularity",
    "act_bits", "act_observer", "rounding", "equalize", "bias_correction",
    "accuracy", "loss", "agreement", "size_bytes", "float_size_bytes", "ratio", "sparsity",
    "mean_sqnr_db", "sqnr_db", "seconds",
)  # fmt: skip

def _tuple(name: str, values: object) -> tuple:
    if isinstance(values, str) or not isinstance(values, Iterable):
        values = (values,)
    out = tuple(dict.fromkeys(values))  # drop repeats, keep order
    if not out:
        raise ValueError(f"The sweep grid needs at least one value for {name}.")
    return out


@dataclass(frozen=True)
class SweepGrid:
    """The settings a sweep tries: every combination of the tuples below.

    A ``None`` in ``bits`` adds float rows (pruning only, no quantization); they do not
    vary with clip, scheme or granularity. Lists are accepted and stored as tuples, repeats
    dropped, so ``SweepGrid(bits=[2, 4, None], prune_rates=[0, 0.5])`` works.
    """

    bits: tuple[int | None, ...] = (2, 3, 4, 6, 8)
    prune_rates: tuple[float, ...] = (0.0,)
    clips: tuple[float, ...] = (1.0,)  # read as clip_mode says; 1.0 ratio = no clipping
    clip_mode: ClipMode = "ratio"
    symmetric: tuple[bool, ...] = (True,)
    per_channel: tuple[bool, ...] = (False,)
    structured: bool = False  # prune whole output channels instead of single weights
    prune_scope: Scope = "layer"
    fold_bn: bool = True
    act_bits: tuple[int | None, ...] = (None,)  # activation widths; None = float activations
    act_observer: ActObserver = "minmax"
    # post-training remedies (qcore.ptq); rows with adaround or bias correction need calib
    rounding: tuple[str, ...] = ("nearest",)
    equalize: tuple[bool, ...] = (False,)
    bias_correction: tuple[bool, ...] = (False,)
    _configs: tuple[CompressionConfig, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        bits = tuple(None if b is None else check_bits(b) for b in _tuple("bits", self.bits))
        object.__setattr__(self, "bits", tuple(dict.fromkeys(bits)))
        object.__setattr__(self, "prune_rates", _tuple("prune_rates", self.prune_rates))
        object.__setattr__(self, "clips", _tuple("clips", self.clips))
        object.__setattr__(self, "symmetric", tuple(bool(s) for s in _tuple(
            "symmetric", self.symmetric)))
        object.__setattr__(self, "per_channel", tuple(bool(s) for s in _tuple(
            "per_channel", self.per_channel)))
        act_bits = tuple(None if b is None else check_bits(b, "activation bits")
                         for b in _tuple("act_bits", self.act_bits))  # fmt: skip
        object.__setattr__(self, "act_bits", act_bits)
        if self.act_observer not in ACT_OBSERVERS:
            raise ValueError(f"act_observer must be one of {', '.join(ACT_OBSERVERS)}; "
                             f"got {self.act_observer!r}.")
        object.__setattr__(self, "rounding", _tuple("rounding", self.rounding))
        for r in self.rounding:
            if r not in ROUNDINGS:
                raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}; got {r!r}.")
        for key in ("equalize", "bias_correction"):
            object.__setattr__(self, key, tuple(bool(v) for v in _tuple(key, getattr(self, key))))
        if self.clip_mode not in CLIP_MODES:
            raise ValueError(f"clip_mode must be one of {', '.join(CLIP_MODES)}; "
                             f"got {self.clip_mode!r}.")
        if self.prune_scope not in SCOPES:
            raise ValueError(f"prune_scope must be one of {', '.join(SCOPES)}; "
                             f"got {self.prune_scope!r}.")
        configs = []
        for b, rate, ab in product(self.bits, self.prune_rates, self.act_bits):
            # a ValueError with a sentence for a bad rate or clip, before any work is done
            PruneConfig(rate=rate, structured=self.structured, scope=self.prune_scope)
            flat = Settings(bits=b, prune=rate, structured=self.structured,
                            scope=self.prune_scope, fold_bn=self.fold_bn, abits=ab,
                            aobs=self.act_observer)  # fmt: skip
            if b is None:  # float rows do not vary with clip, scheme or granularity
                configs.append(flat.to_config())
                continue
            for clip, sym, pc, rnd, eq, bc in product(self.clips, self.symmetric,
                                                      self.per_channel, self.rounding,
                                                      self.equalize, self.bias_correction):
                configs.append(replace(flat, clip=clip, clip_mode=self.clip_mode, symmetric=sym,
                                       per_channel=pc, equalize=eq,
                                       rounding=rnd if b != 1 else "nearest",  # no choice
                                       bias_correction=bc).to_config())
        object.__setattr__(self, "_configs", tuple(dict.fromkeys(configs)))

    def to_dict(self) -> dict:
        """Plain JSON values (tuples as lists); :meth:`from_dict` reads them back."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in fields(self) if f.init}  # fmt: skip

    @classmethod
    def from_dict(cls, d: object) -> SweepGrid:
        """The grid ``to_dict`` wrote; unknown keys are a ValueError."""
        names = [f.name for f in fields(cls) if f.init]
        if not isinstance(d, dict) or not set(d) <= set(names):
            extra = sorted(set(d) - set(names)) if isinstance(d, dict) else d
            raise ValueError(f"A sweep grid has the keys {', '.join(names)}; got {extra!r}.")
        return cls(**d)

    def configs(self) -> tuple[CompressionConfig, ...]:
        """Every configuration of the grid, in a fixed order (bits, rate, clip, scheme, ...)."""
        return self._configs

    def __len__(self) -> int:
        return len(self._configs)


def _describe(cfg: CompressionConfig) -> dict:
    q, p, a = cfg.quant, cfg.prune, cfg.act
    rate = p.rate if p is not None else 0.0
    act = {"act_bits": None if a is None else a.bits,
           "act_observer": None if a is None else a.observer}  # fmt: skip
    if q is None:
        return {"bits": None, "clip": math.nan, "clip_mode": None, "prune": rate,
                "symmetric": None, "per_channel": None, "scheme": "float",
                "granularity": "none", "rounding": None, "equalize": False,
                "bias_correction": cfg.bias_correction, **act}  # fmt: skip
    return {
        **act,
        "bits": q.bits,
        "clip": q.clip,
        "clip_mode": q.clip_mode,
        "prune": rate,
        "symmetric": q.symmetric,
        "per_channel": q.per_channel,
        "scheme": "symmetric" if q.symmetric else "asymmetric",
        "granularity": "per-channel" if q.per_channel else "per-tensor",
        "rounding": q.rounding,
        "equalize": cfg.equalize,
        "bias_correction": cfg.bias_correction,
    }


def _row(model: nn.Module, dataset: Dataset, ref: Metrics, cfg: CompressionConfig,
         calib: Dataset | None, batch_size: int) -> dict:
    """One row of the sweep table: ``cfg`` applied to ``model`` and evaluated."""
    start = time.perf_counter()
    c = compress(model, cfg, calib=calib)
    m = evaluate(c.model, dataset, batch_size=batch_size)
    row = _describe(cfg)
    row.update(
        accuracy=m.accuracy,
        loss=m.loss,
        agreement=agreement(m, ref),
        size_bytes=c.size_bytes,
        float_size_bytes=c.float_size_bytes,
        ratio=c.ratio,
        sparsity=c.sparsity,
        mean_sqnr_db=c.mean_sqnr_db,
        sqnr_db=c.sqnr_db,
        seconds=time.perf_counter() - start,
    )
    return row


def _sweep_job(job: dict) -> tuple[dict, float, float]:
    """A worker's row: the job names the model and data by reference and the
    configuration as a dict; returns the row and the float model's accuracy and loss."""
    model, dataset, calib = load_refs(job)
    ref = worker_memo(("float", *refs_key(job)[:2], job["batch_size"]),
                      lambda: evaluate(model, dataset, batch_size=job["batch_size"]))
    cfg = CompressionConfig.from_dict(job["config"])
    return _row(model, dataset, ref, cfg, calib, job["batch_size"]), ref.accuracy, ref.loss


def sweep(
    model: nn.Module | ModelRef,
    dataset: Dataset | DatasetRef,
    grid: SweepGrid | None = None,
    *,
    calib: Dataset | DatasetRef | None = None,
    progress: Progress | None = None,
    batch_size: int = EVAL_BATCH,
    executor: Executor | None = None,
    model_bytes: bytes | None = None,
) -> pd.DataFrame:
    """Compress and evaluate ``model`` once per configuration of ``grid``.

    One row per configuration, in the grid's order, with the columns of
    :data:`SWEEP_COLUMNS`: the setting (``bits`` is missing for float rows; ``scheme`` is
    "symmetric", "asymmetric" or "float"; ``granularity`` "per-tensor", "per-channel" or
    "none"), the simulated ``accuracy`` and ``loss``, ``agreement`` with the float model's
    predictions, the packed ``size_bytes`` next to ``float_size_bytes``, their ``ratio``,
    the weight ``sparsity``, the ``mean_sqnr_db`` over layers that changed (inf if none
    did), the whole model's ``sqnr_db`` and the ``seconds`` the row took. Rows with
    activation bits (``act_bits``), AdaRound or bias correction learn from ``calib``, the
    calibration split.
    ``df.attrs`` holds the float accuracy and loss. ``progress(done, total, row)`` is called
    after each row. Deterministic.

    ``model`` and ``dataset`` (and ``calib``) may be a :class:`~qcore.ModelRef` /
    :class:`~qcore.DatasetRef`; with an ``executor`` (:class:`~qcore.ProcessExecutor`,
    :class:`~qcore.RayExecutor`) they must be, and the rows run there, one job per
    configuration: the same table as in process, ``seconds`` aside (``progress`` then
    follows the order in which rows finish). A model made in a session (a ref with a
    ``sha256``) goes to the workers as ``model_bytes`` (:func:`qcore.executors.pack_model`).
    """
    grid = SweepGrid() if grid is None else grid
    if not isinstance(grid, SweepGrid):
        raise ValueError("grid must be a SweepGrid, e.g. SweepGrid(bits=[2, 4, 8]).")
    configs = grid.configs()
    if executor is not None:
        check_refs(model, dataset, calib, model_bytes)
        refs = ref_job(model, dataset, calib, model_bytes)  # type: ignore[arg-type]
        jobs = [{**refs, "config": cfg.to_dict(), "batch_size": batch_size} for cfg in configs]
        done = [0]

        def on_result(_i: int, out: tuple[dict, float, float]) -> None:
            done[0] += 1
            if progress is not None:
                progress(done[0], len(configs), out[0])

        outs = executor.map(_sweep_job, jobs, on_result)
        rows = [row for row, _, _ in outs]
        float_acc, float_loss = (outs[0][1], outs[0][2]) if outs else (math.nan, math.nan)
    else:
        model, dataset, calib = load_args(model, dataset, calib, model_bytes)
        ref = evaluate(model, dataset, batch_size=batch_size)
        float_acc, float_loss = ref.accuracy, ref.loss
        rows = []
        for i, cfg in enumerate(configs):
            rows.append(_row(model, dataset, ref, cfg, calib, batch_size))
            if progress is not None:
                progress(i + 1, len(configs), rows[-1])
    df = pd.DataFrame(rows, columns=list(SWEEP_COLUMNS))
    df["bits"] = df["bits"].astype("Int64")  # missing for float rows
    df["act_bits"] = df["act_bits"].astype("Int64")  # missing for float activations
    df.attrs.update(float_accuracy=float_acc, float_loss=float_loss)
    return df


def pareto_front(
    df: pd.DataFrame, x: str = "size_bytes", y: str = "accuracy", *, maximize_y: bool = True
) -> pd.DataFrame:
    """The non-dominated rows of ``df``: smaller ``x`` is better, larger ``y`` is better.

    A row is dominated when another row is at least as good in both and better in one.
    Among rows with equal (x, y) the first in ``df`` is kept; rows where x or y is missing
    are dropped. The result keeps ``df``'s index and is sorted by ``x`` (so ``y`` rises
    strictly along it). ``maximize_y=False`` makes smaller ``y`` better (e.g. loss).

    >>> d = pd.DataFrame({"size_bytes": [10, 20, 20, 30, 15, 10],
    ...                   "accuracy": [0.5, 0.9, 0.8, 0.9, 0.4, 0.5]})
    >>> pareto_front(d).index.tolist()
    [0, 1]
    """
    for col in (x, y):
        if col not in df.columns:
            raise ValueError(f"No column {col!r}; the table has {', '.join(map(str, df.columns))}.")
    part = df[df[x].notna() & df[y].notna()]
    xs = part[x].to_numpy()
    gain = part[y].to_numpy() if maximize_y else -part[y].to_numpy()
    # by x ascending, best y first among equal x, ties in df order (lexsort is stable)
    order = np.lexsort((-gain, xs))
    keep, best = [], None
    for pos in order:
        if best is None or gain[pos] > best:
            keep.append(pos)
            best = gain[pos]
    return part.iloc[keep]
