"""State shared by every page: cached loaders and results, session state, the URL query.

This is the only module that uses ``st.cache_*``. Loaded models and datasets are cached
with ``st.cache_resource`` and never mutated; results are plain records cached with
``st.cache_data`` keyed by primitive arguments (names and a frozen :class:`Settings`).

The settings a page shows live in ``st.session_state`` under the same plain keys as the
URL query (``model``, ``dataset``, ``bits``, ``clip``, ...), so a link restores a page.
:func:`parse_query` and :meth:`Settings.to_query` are pure and unit-tested.
"""

from __future__ import annotations

import json
import math
import queue
import re
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

import qcore
from qcore.config import ROUNDINGS, SCOPES

DEFAULT_MODEL = "mnist-cnn"
BITS_OPTIONS: tuple[int | str, ...] = (*range(1, 17), "float")  # the bit-width slider
FLOAT = "float"  # the bit-width value that means "no quantization"
RESULT_CACHE_ENTRIES = 64  # results per process (each is small: numbers and predictions)
COMPRESSED_CACHE_ENTRIES = 8  # compressed models (they hold weight tensors)
MAX_WRONG_SHOWN = 16
ANALYSIS_CACHE_ENTRIES = 16  # sweeps, sensitivity tables and mixed-precision results
ANALYSIS_DEFAULTS: dict[str, Any] = {  # widget values of the analysis pages
    "to_bits": [2, 3, 4, 6, 8],
    "to_prune": [0.0, 0.5],
    "to_clips": [1.0],
    "to_symmetric": [True],
    "to_per_channel": [False],
    "sens_bits": [2, 3, 4, 5, 6, 7, 8],
    "sens_prune": [0.25, 0.5, 0.75, 0.9],
    "sens_per_channel": False,
    "mp_bits": [2, 3, 4, 5, 6, 8],
    "mp_per_channel": False,
}
MAX_SWEEP_CONFIGS = 120  # a larger grid is refused with a sentence (it would take minutes)


@dataclass(frozen=True)
class ClipSlider:
    """The clip slider of one clip mode: its range, step, default and number format."""

    lo: float
    hi: float
    step: float
    default: float
    fmt: str
    help: str


_RATIO_HELP = "Fraction of the largest |w| the quantizer covers; 1.0 = no clipping."
_MSE_HELP = "The range with the least squared error is searched; the slider is unused."
CLIP_SLIDERS: dict[str, ClipSlider] = {
    "ratio": ClipSlider(lo=0.01, hi=1.0, step=0.01, default=1.0, fmt="%.2f", help=_RATIO_HELP),
    "absolute": ClipSlider(
        lo=0.005, hi=2.0, step=0.005, default=0.5, fmt="%.3f",
        help="Clip weights to [-c, c] in weight units.",
    ),
    "sigma": ClipSlider(
        lo=0.5, hi=8.0, step=0.1, default=3.0, fmt="%.1f",
        help="Clip at c standard deviations of each tensor's (or channel's) weights.",
    ),
    "percentile": ClipSlider(
        lo=50.0, hi=100.0, step=0.1, default=99.9, fmt="%.1f",
        help="Clip at the c-th percentile of |w|.",
    ),
    "mse": ClipSlider(lo=0.01, hi=1.0, step=0.01, default=1.0, fmt="%.2f", help=_MSE_HELP),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Settings: what the Playground's widgets say, as primitives (hashable, URL-friendly).


@dataclass(frozen=True)
class Settings:
    """The compression settings of the Playground, in the units its widgets use."""

    bits: int | None = 8  # None = float, no quantization
    clip: float = 1.0
    clip_mode: str = "ratio"
    prune: float = 0.0
    symmetric: bool = True
    per_channel: bool = False
    rounding: str = "nearest"
    structured: bool = False
    scope: str = "layer"
    fold_bn: bool = True
    layers: tuple[str, ...] | None = None  # None = every weight layer
    # per-layer bit widths overriding ``bits``, as (layer, bits) pairs in model order; set by
    # the Mixed precision page or a link (``layer_bits=fc1:4,fc2:8``)
    layer_bits: tuple[tuple[str, int], ...] = ()

    def to_config(self) -> qcore.CompressionConfig:
        """The qcore config; raises ValueError with a user sentence for a bad combination."""
        if self.layers is not None and not self.layers:
            raise ValueError("Pick at least one layer to compress (Advanced → Layers).")
        quant = None
        if self.bits is not None:
            quant = qcore.QuantConfig(
                bits=self.bits,
                symmetric=self.symmetric,
                per_channel=self.per_channel,
                clip=self.clip,
                clip_mode=self.clip_mode,
                rounding=self.rounding,
                layer_bits=self.layer_bits,
            )
        prune = None
        if self.prune > 0:
            prune = qcore.PruneConfig(rate=self.prune, structured=self.structured, scope=self.scope)
        return qcore.CompressionConfig(
            quant=quant, prune=prune, layers=self.layers, fold_bn=self.fold_bn
        )

    def to_query(self) -> dict[str, str]:
        """URL query values: the main sliders always, advanced options when not default."""
        q = {
            "bits": FLOAT if self.bits is None else str(self.bits),
            "clip": f"{self.clip:g}",
            "clip_mode": self.clip_mode,
            "prune": f"{self.prune:g}",
        }
        default = Settings()
        for key in ("symmetric", "per_channel", "structured", "fold_bn"):
            if getattr(self, key) != getattr(default, key):
                q[key] = "true" if getattr(self, key) else "false"
        for key in ("rounding", "scope"):
            if getattr(self, key) != getattr(default, key):
                q[key] = getattr(self, key)
        if self.layers is not None:
            q["layers"] = ",".join(self.layers)
        if self.layer_bits:
            q["layer_bits"] = ",".join(f"{n}:{b}" for n, b in self.layer_bits)
        return q

    def canonical(self) -> Settings:
        """The same compression with unused options reset, so equal results share a cache key."""
        d = Settings()
        s = self
        if s.bits is None:
            s = replace(
                s,
                clip=d.clip,
                clip_mode=d.clip_mode,
                symmetric=d.symmetric,
                per_channel=d.per_channel,
                rounding=d.rounding,
                layer_bits=d.layer_bits,
            )
        elif s.clip_mode == "mse":
            s = replace(s, clip=d.clip)
        if s.prune == 0:
            s = replace(s, structured=d.structured, scope=d.scope)
        if s.layer_bits and s.layers is not None:  # overrides of float layers change nothing
            s = replace(s, layer_bits=tuple(p for p in s.layer_bits if p[0] in s.layers))
        return s

    def label(self) -> str:
        """A short description, e.g. ``4 bits · clip 1 · symmetric · per-tensor · prune 0.5``."""
        if self.bits is None:
            parts = ["float32"]
        else:
            mode = "" if self.clip_mode == "ratio" else f" ({self.clip_mode})"
            parts = [
                f"{self.bits} bits" + (" (per-layer: " + ", ".join(
                    f"{n} {b}" for n, b in self.layer_bits) + ")" if self.layer_bits else ""),
                f"clip {self.clip:g}{mode}",
                "symmetric" if self.symmetric else "asymmetric",
                "per-channel" if self.per_channel else "per-tensor",
            ]  # fmt: skip
        parts.append(f"prune {self.prune:g}")
        return " · ".join(parts)

    def slug(self) -> str:
        """A short file-name tag, e.g. ``4bit-prune0.5``."""
        parts = ["float" if self.bits is None else f"{self.bits}bit"]
        if self.layer_bits and self.bits is not None:
            parts.append("mixed")
        if self.prune > 0:
            parts.append(f"prune{self.prune:g}")
        return "-".join(parts)


SETTING_KEYS: tuple[str, ...] = tuple(Settings.__dataclass_fields__)
QUERY_KEYS: tuple[str, ...] = ("model", "dataset", *SETTING_KEYS)


def session_defaults(layer_names: Sequence[str]) -> dict[str, Any]:
    """Widget values (session-state form) of the default settings."""
    return settings_to_session(Settings(), layer_names)


def settings_to_session(s: Settings, layer_names: Sequence[str]) -> dict[str, Any]:
    """Settings as widget values: bits ``"float"`` for None, layers as a list."""
    values = asdict(s)
    values["bits"] = FLOAT if s.bits is None else s.bits
    values["layers"] = list(layer_names) if s.layers is None else list(s.layers)
    values["layer_bits"] = tuple(s.layer_bits)
    return values


def settings_from_session(values: Mapping[str, Any], layer_names: Sequence[str]) -> Settings:
    """Settings from widget values; layers in model order, None when all are picked."""
    picked = set(values.get("layers", layer_names))
    layers = tuple(n for n in layer_names if n in picked)
    bits = values.get("bits", 8)
    overrides = {str(n): int(b) for n, b in values.get("layer_bits", ())}
    return Settings(
        bits=None if bits == FLOAT else int(bits),
        clip=float(values.get("clip", 1.0)),
        clip_mode=str(values.get("clip_mode", "ratio")),
        prune=float(values.get("prune", 0.0)),
        symmetric=bool(values.get("symmetric", True)),
        per_channel=bool(values.get("per_channel", False)),
        rounding=str(values.get("rounding", "nearest")),
        structured=bool(values.get("structured", False)),
        scope=str(values.get("scope", "layer")),
        fold_bn=bool(values.get("fold_bn", True)),
        layers=None if len(layers) == len(layer_names) else layers,
        layer_bits=tuple((n, overrides[n]) for n in layer_names if n in overrides),
    )


# ---------------------------------------------------------------------------------------------
# The URL query: pure parsing, every bad value becomes a warning and a default.

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError


def _float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError
    return v


def parse_query(
    params: Mapping[str, str | Sequence[str]],
    *,
    models: Sequence[str],
    datasets: Sequence[str],
    layer_names: Callable[[str], Sequence[str]],
    default_model: str = DEFAULT_MODEL,
) -> tuple[dict[str, Any], list[str]]:
    """Validate a URL query; return the valid values (session-state form) and warnings.

    Only keys present and valid appear in the result; each bad or unknown one adds a
    warning sentence, and the caller keeps the default for it.
    """
    values: dict[str, Any] = {}
    warnings: list[str] = []

    def get(key: str) -> str | None:
        v = params.get(key)
        if v is None:
            return None
        return v if isinstance(v, str) else (v[-1] if len(v) else "")

    def bad(key: str, raw: str, expected: str) -> None:
        warnings.append(f"The link's `{key}={raw}` is not valid ({expected}); using the default.")

    for key in params:
        if key not in QUERY_KEYS:
            warnings.append(f"The link has an unknown setting `{key}`; it was ignored.")

    raw = get("model")
    if raw is not None:
        if raw in models:
            values["model"] = raw
        else:
            bad("model", raw, "known models: " + ", ".join(models))
    model = values.get("model", default_model)

    raw = get("dataset")
    if raw is not None:
        if raw in datasets:
            values["dataset"] = raw
        else:
            bad("dataset", raw, "known datasets: " + ", ".join(datasets))

    raw = get("bits")
    if raw is not None:
        t = raw.strip().lower()
        if t in (FLOAT, "fp32", "32", "none"):
            values["bits"] = FLOAT
        elif _ascii_int(t) and 1 <= int(t) <= 16:
            values["bits"] = int(t)
        else:
            bad("bits", raw, "a whole number from 1 to 16, or float")

    raw = get("clip_mode")
    if raw is not None:
        if raw in CLIP_SLIDERS:
            values["clip_mode"] = raw
        else:
            bad("clip_mode", raw, "one of " + ", ".join(CLIP_SLIDERS))
    mode = values.get("clip_mode", "ratio")
    if mode != "ratio":
        values["clip"] = CLIP_SLIDERS[mode].default  # the default clip of the linked mode

    raw = get("clip")
    if raw is not None:
        r = CLIP_SLIDERS[mode]
        try:
            v = _float(raw)
            if not r.lo <= v <= r.hi:
                raise ValueError
            values["clip"] = v
        except ValueError:
            bad("clip", raw, f"a number from {r.lo:g} to {r.hi:g} in {mode} mode")

    raw = get("prune")
    if raw is not None:
        try:
            v = _float(raw)
            if not 0.0 <= v <= 0.99:
                raise ValueError
            values["prune"] = v
        except ValueError:
            bad("prune", raw, "a rate from 0 to 0.99")

    for key in ("symmetric", "per_channel", "structured", "fold_bn"):
        raw = get(key)
        if raw is not None:
            try:
                values[key] = _bool(raw)
            except ValueError:
                bad(key, raw, "true or false")

    for key, choices in (("rounding", ROUNDINGS), ("scope", SCOPES)):
        raw = get(key)
        if raw is not None:
            if raw in choices:
                values[key] = raw
            else:
                bad(key, raw, "one of " + ", ".join(choices))

    raw = get("layers")
    if raw is not None:
        known = list(layer_names(model))
        picked = [n.strip() for n in raw.split(",") if n.strip()]
        unknown = [n for n in picked if n not in known]
        if picked and not unknown:
            values["layers"] = [n for n in known if n in picked]
        else:
            bad("layers", raw, f"comma-separated layers of {model}: " + ", ".join(known))

    raw = get("layer_bits")
    if raw is not None:
        known = list(layer_names(model))
        pairs = _layer_bits(raw, known)
        if pairs:
            values["layer_bits"] = pairs
        else:
            example = f"{known[0] if known else 'fc1'}:4"
            layers = ", ".join(known)
            bad("layer_bits", raw, f"pairs such as {example}, bits 1 to 16, layers {layers}")
    return values, warnings


def _ascii_int(text: str) -> bool:
    """Plain ASCII digits, few enough to be a bit width (``"²".isdigit()`` is True too)."""
    return re.fullmatch(r"[0-9]{1,3}", text) is not None


def _layer_bits(text: str, known: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """``"fc1:4,fc2:8"`` as pairs in model order; empty when any part is not valid."""
    found: dict[str, int] = {}
    for part in text.split(","):
        name, sep, b = (x.strip() for x in part.partition(":"))
        if not sep or name not in known or name in found or not _ascii_int(b):
            return ()
        if not 1 <= int(b) <= 16:
            return ()
        found[name] = int(b)
    return tuple((n, found[n]) for n in known if n in found)


# ---------------------------------------------------------------------------------------------
# Cached loaders (read-only, shared by every session) and cached results.


@st.cache_resource(show_spinner="Loading the model…")
def get_model(name: str):
    """The float model (eval mode). Shared by every session: never mutate it."""
    return qcore.load_model(name)


@st.cache_resource(show_spinner="Loading the test split…")
def get_dataset(name: str):
    """The dataset's test split. Shared by every session: never mutate it."""
    return qcore.load_dataset(name, "test")


@st.cache_data(show_spinner=False)
def layer_names(model_name: str) -> list[str]:
    """The model's weight layers (linear and convolution), in definition order."""
    return list(qcore.weight_layers(get_model(model_name)))


@st.cache_data(show_spinner=False)
def float_metrics(model_name: str, dataset_name: str) -> qcore.Metrics:
    """Evaluation of the float model; computed once per (model, dataset)."""
    return qcore.evaluate(get_model(model_name), get_dataset(dataset_name))


@st.cache_resource(max_entries=COMPRESSED_CACHE_ENTRIES, show_spinner=False)
def get_compressed(model_name: str, settings: Settings) -> qcore.Compressed:
    """The compressed model (its tensors are needed for histograms and export). Read-only."""
    return qcore.compress(get_model(model_name), settings.to_config())


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


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def results(model_name: str, dataset_name: str, settings: Settings) -> Result:
    """Compress, evaluate and account; memoised by (model, dataset, settings)."""
    start = time.perf_counter()
    comp = get_compressed(model_name, settings)
    m = qcore.evaluate(comp.model, get_dataset(dataset_name))
    seconds = time.perf_counter() - start
    f = float_metrics(model_name, dataset_name)
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


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def histogram(
    model_name: str, settings: Settings, layer: str, bins: int = 80, channel: int | None = None
) -> qcore.Histogram:
    """Binned float and compressed weights of one layer (counts only)."""
    return qcore.layer_histogram(get_compressed(model_name, settings), layer, bins, channel)


@dataclass(frozen=True, eq=False)
class NewlyWrong:
    """Test images the float model got right and the compressed model gets wrong."""

    images: np.ndarray  # float32 (K, C, H, W), normalised as in the dataset
    float_pred: list[str]
    now_pred: list[str]
    truth: list[str]
    total: int  # how many such images there are in the test split


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def newly_wrong(
    model_name: str, dataset_name: str, settings: Settings, limit: int = MAX_WRONG_SHOWN
) -> NewlyWrong:
    """Up to ``limit`` test images that compression turned from right to wrong."""
    ds = get_dataset(dataset_name)
    y = ds.y.numpy()
    before = float_metrics(model_name, dataset_name).predictions
    now = results(model_name, dataset_name, settings).predictions
    idx = np.flatnonzero((before == y) & (now != y))
    shown = idx[:limit]
    names = ds.classes
    return NewlyWrong(
        images=ds.x[shown].numpy(),
        float_pred=[names[i] for i in before[shown]],
        now_pred=[names[i] for i in now[shown]],
        truth=[names[i] for i in y[shown]],
        total=int(idx.size),
    )


def packed_download(model_name: str, settings: Settings) -> Callable[[], bytes]:
    """A zero-argument callable for ``st.download_button``: the packed file, built on click."""
    comp = get_compressed(model_name, settings)
    return lambda: qcore.packed_bytes(comp)


def results_json(model_name: str, dataset_name: str, settings: Settings, r: Result) -> str:
    """The results as a JSON document (settings, headline numbers, per-layer rows)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if isinstance(v, np.generic):
            return clean(v.item())
        return v

    layers = [{k: clean(v) for k, v in row.items()} for row in r.layers.to_dict("records")]
    doc = {
        "model": model_name,
        "dataset": dataset_name,
        "split": "test",
        "settings": asdict(settings),
        "accuracy_simulated": r.accuracy,
        "float_accuracy": r.float_accuracy,
        "accuracy_change": r.accuracy - r.float_accuracy,
        "agreement_with_float": r.agreement,
        "loss": r.loss,
        "examples": r.n,
        "packed_size_bytes": r.size_bytes,
        "float_size_bytes": r.float_size_bytes,
        "compression_ratio": clean(r.ratio),
        "sparsity": r.sparsity,
        "mean_sqnr_db": clean(r.mean_sqnr_db),
        "layers": layers,
    }
    return json.dumps(doc, indent=2)


# ---------------------------------------------------------------------------------------------
# The analysis pages: sweeps, layer sensitivity and mixed precision. Each takes seconds, so it
# runs on a button, and its result is cached by (model, dataset, settings as primitives).
#
# A progress bar cannot be drawn from inside an ``st.cache_data`` function: Streamlit records
# every element call made there and replays it on a cache hit, and a bar created outside the
# function cannot be replayed (CacheReplayClosureError). So the cached function runs in a
# worker thread and reports to a queue (its ``_progress`` argument, unhashed because of the
# leading underscore); the script thread drains the queue into the bar. A hit returns at once
# and draws no bar; a miss draws one. A rerun mid-way stops only the drawing: the worker
# finishes and fills the cache, so the next run finds the result.


@dataclass(frozen=True)
class SweepParams:
    """The grid of the Trade-offs page, as primitives (``None`` in ``bits`` = float rows)."""

    bits: tuple[int | None, ...] = (2, 3, 4, 6, 8)
    prune_rates: tuple[float, ...] = (0.0, 0.5)
    clips: tuple[float, ...] = (1.0,)  # ratio of max|w|; 1.0 = no clipping
    symmetric: tuple[bool, ...] = (True,)
    per_channel: tuple[bool, ...] = (False,)

    def grid(self) -> qcore.SweepGrid:
        """The qcore grid; raises ValueError with a user sentence for an empty or huge one."""
        for name, values in (
            ("bit width", self.bits),
            ("pruning rate", self.prune_rates),
            ("clip", self.clips),
            ("scheme", self.symmetric),
            ("granularity", self.per_channel),
        ):
            if not values:
                raise ValueError(f"Pick at least one {name} for the sweep.")
        grid = qcore.SweepGrid(
            bits=self.bits,
            prune_rates=self.prune_rates,
            clips=self.clips,
            symmetric=self.symmetric,
            per_channel=self.per_channel,
        )
        if len(grid) > MAX_SWEEP_CONFIGS:
            raise ValueError(
                f"This grid has {len(grid)} configurations; pick fewer values "
                f"(at most {MAX_SWEEP_CONFIGS} configurations per sweep)."
            )
        return grid


@st.cache_resource(show_spinner="Loading the calibration split…")
def get_calib_dataset(name: str):
    """The dataset's calibration split (never the test split). Shared: never mutate it."""
    return qcore.load_dataset(name, "calib")


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def packed_size(model_name: str, settings: Settings) -> int:
    """Packed bytes of one setting (compress only, no evaluation)."""
    return get_compressed(model_name, settings).size_bytes


@st.cache_data(max_entries=ANALYSIS_CACHE_ENTRIES, show_spinner=False)
def sweep_table(
    model_name: str, dataset_name: str, params: SweepParams, _progress=None
) -> pd.DataFrame:
    """``qcore.sweep`` over the grid on the test split; one row per configuration."""
    return qcore.sweep(
        get_model(model_name), get_dataset(dataset_name), params.grid(), progress=_progress
    )


@st.cache_data(max_entries=ANALYSIS_CACHE_ENTRIES, show_spinner=False)
def sensitivity_table(
    model_name: str,
    dataset_name: str,
    bits: tuple[int, ...],
    prune_rates: tuple[float, ...],
    per_channel: bool,
    _progress=None,
) -> pd.DataFrame:
    """``qcore.layer_sensitivity``: each layer alone quantized or pruned, on the test split."""
    return qcore.layer_sensitivity(
        get_model(model_name),
        get_dataset(dataset_name),
        bits=bits,
        prune_rates=prune_rates,
        quant=qcore.QuantConfig(per_channel=per_channel),
        progress=_progress,
    )


@st.cache_data(max_entries=ANALYSIS_CACHE_ENTRIES, show_spinner=False)
def mixed_result(
    model_name: str,
    dataset_name: str,
    budget_bytes: int,
    candidate_bits: tuple[int, ...],
    per_channel: bool,
    _progress=None,
) -> qcore.MixedPrecisionResult:
    """``qcore.mixed_precision``: bits chosen on the calibration split, scored on the test split."""
    return qcore.mixed_precision(
        get_model(model_name),
        get_dataset(dataset_name),
        budget_bytes,
        candidate_bits,
        quant=qcore.QuantConfig(per_channel=per_channel),
        search_dataset=get_calib_dataset(dataset_name),
        progress=_progress,
    )


def run_with_progress(fn: Callable[..., Any], *args: Any, text: str) -> Any:
    """``fn(*args, _progress=...)`` in a worker thread, with a progress bar on a cache miss.

    ``fn`` is one of the cached functions above; its ValueError reaches the caller.
    """
    updates: queue.SimpleQueue = queue.SimpleQueue()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qp-analysis")
    bar = None
    try:
        future = pool.submit(fn, *args, _progress=lambda d, t, _row: updates.put((d, t)))
        start = time.perf_counter()
        while True:
            try:
                done, total = updates.get(timeout=0.05)
            except queue.Empty:
                if future.done():
                    break
                if bar is None and time.perf_counter() - start > 0.3:  # a miss, still preparing
                    bar = st.progress(0.0, text=f"{text} (preparing)")
                continue
            if bar is None:
                bar = st.progress(0.0, text=text)
            bar.progress(min(done / max(total, 1), 1.0), text=f"{text} {done}/{total}")
        return future.result()
    finally:
        pool.shutdown(wait=False)  # on a rerun mid-way the worker still fills the cache
        if bar is not None:
            bar.empty()


def run_sweep(model_name: str, dataset_name: str, params: SweepParams) -> pd.DataFrame:
    """The sweep table, from the cache or computed with a progress bar."""
    params.grid()  # a ValueError with a sentence before any thread starts
    return run_with_progress(sweep_table, model_name, dataset_name, params, text="Sweeping…")


def run_sensitivity(
    model_name: str,
    dataset_name: str,
    bits: tuple[int, ...],
    prune_rates: tuple[float, ...],
    per_channel: bool,
) -> pd.DataFrame:
    """The layer sensitivity table, from the cache or computed with a progress bar."""
    if not bits and not prune_rates:
        raise ValueError("Pick at least one bit width or pruning rate.")
    return run_with_progress(
        sensitivity_table, model_name, dataset_name, bits, prune_rates, per_channel,
        text="Testing each layer…",
    )  # fmt: skip


def run_mixed(
    model_name: str,
    dataset_name: str,
    budget_bytes: int,
    candidate_bits: tuple[int, ...],
    per_channel: bool,
) -> qcore.MixedPrecisionResult:
    """The mixed-precision choice, from the cache or computed with a progress bar."""
    if not candidate_bits:
        raise ValueError("Pick at least one candidate bit width.")
    get_calib_dataset(dataset_name)  # loaded here, where its spinner can be drawn
    return run_with_progress(
        mixed_result, model_name, dataset_name, budget_bytes, candidate_bits, per_channel,
        text="Measuring each layer on the calibration split…",
    )  # fmt: skip


def budget_bounds_kb(
    model_name: str, candidate_bits: tuple[int, ...], per_channel: bool
) -> tuple[float, float]:
    """The budget slider's range in kB (0.1 kB steps): every layer at the lowest candidate
    bit width (rounded up, so the low end always fits) to every layer at 8 bits."""
    lo = packed_size(model_name, Settings(bits=min(candidate_bits), per_channel=per_channel))
    hi = packed_size(model_name, Settings(bits=8, per_channel=per_channel))
    lo_kb = math.ceil(lo / 100) / 10
    return lo_kb, max(math.floor(hi / 100) / 10, round(lo_kb + 0.1, 1))


def mixed_settings(result: qcore.MixedPrecisionResult, layer_names: Sequence[str]) -> Settings:
    """The Playground settings that reproduce a mixed-precision choice."""
    q = result.config
    return Settings(
        bits=q.bits,
        symmetric=q.symmetric,
        per_channel=q.per_channel,
        clip=q.clip,
        clip_mode=q.clip_mode,
        rounding=q.rounding,
        layer_bits=tuple((n, q.bits_for(n)) for n in layer_names),
    )


def open_in_playground(settings: Settings, layer_names: Sequence[str]) -> None:
    """Make ``settings`` the Playground's (its widgets read them on their next run)."""
    st.session_state.update(settings_to_session(settings, layer_names))


def playground_settings(layer_names: Sequence[str]) -> Settings:
    """The Playground's current settings (canonical), read from the session."""
    return settings_from_session(st.session_state, layer_names).canonical()


# ---------------------------------------------------------------------------------------------
# Session state, the sidebar pickers and the URL.


def _default_model(models: Sequence[str]) -> str:
    return DEFAULT_MODEL if DEFAULT_MODEL in models else models[0]


def init_session() -> None:
    """Fill ``st.session_state`` once per session, from the URL query where it is valid.

    Warnings about bad query values are kept in ``query_warnings`` for the page to show.
    """
    ss = st.session_state
    if "_initialised" in ss:
        return
    try:
        models = qcore.list_models()
    except ValueError as e:  # a corrupt manifest
        st.error(str(e))
        st.stop()
    if not models:
        st.error("No sample models were found. Run `python -m qcore train-samples` first.")
        st.stop()
    values, warnings = parse_query(
        st.query_params.to_dict(),
        models=models,
        datasets=qcore.list_datasets(),
        layer_names=_layer_names_or_empty,
        default_model=_default_model(models),
    )
    model = values.get("model", _default_model(models))
    ss.update({k: v for k, v in session_defaults([]).items() if k != "layers"})
    ss["model"] = model
    ss["dataset"] = qcore.model_info(model).dataset
    ss.update(values)
    ss.update({k: list(v) if isinstance(v, list) else v for k, v in ANALYSIS_DEFAULTS.items()})
    ss["query_warnings"] = warnings
    ss["_initialised"] = True


def _layer_names_or_empty(model_name: str) -> list[str]:
    try:
        return layer_names(model_name)
    except ValueError:  # the page reports why the model does not load
        return []


def ensure_layers(names: Sequence[str]) -> None:
    """Start the layer picker at "every layer" for a new model (or a new session)."""
    ss = st.session_state
    if "layers" not in ss or any(n not in names for n in ss["layers"]):
        ss["layers"] = list(names)


MODEL_PICKER, DATASET_PICKER = "model_picker", "dataset_picker"


def _on_model_change() -> None:
    """A new model: its own dataset, and every layer of it compressed."""
    ss = st.session_state
    ss["model"] = ss[MODEL_PICKER]
    ss["dataset"] = qcore.model_info(ss["model"]).dataset
    ss.pop("layers", None)  # ensure_layers picks all of the new model's layers
    ss["layer_bits"] = ()  # they name the old model's layers
    ss.pop("hist_layer", None)
    ss.pop("hist_channel", None)


def _on_dataset_change() -> None:
    ss = st.session_state
    ss["dataset"] = ss[f"{DATASET_PICKER}:{ss['model']}"]


def _model_label(name: str) -> str:
    i = qcore.model_info(name)
    return f"{name} · {i.dataset} · {_count(i.params)} params · {i.float_accuracy:.1%}"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else (f"{n / 1e3:.1f}k" if n >= 1e3 else str(n))


def sidebar_pickers() -> None:
    """The model and dataset pickers (keys ``model``, ``dataset``), shared by every page."""
    # The pickers sit in app.py, outside the pages. Such a widget, when its value is set
    # through st.session_state, comes back as its first option after any other widget
    # changes (seen in the browser with Streamlit 1.67, not in AppTest). So the pickers
    # take their value from ``index`` under keys of their own, and copy it to "model" and
    # "dataset" when the user picks; the dataset picker's key names the model, so a new
    # model starts it afresh at that model's own dataset.
    ss = st.session_state
    models = qcore.list_models()
    st.selectbox(
        "Model",
        models,
        index=models.index(ss["model"]),
        key=MODEL_PICKER,
        format_func=_model_label,
        on_change=_on_model_change,
        help="Sample models with the dataset each was trained on, its size and float accuracy.",
    )
    info = qcore.model_info(ss["model"])
    st.caption(
        f"{info.description} Trained on **{info.dataset}**; {info.params:,} parameters; "
        f"float accuracy {info.float_accuracy:.1%} on its test split."
    )
    datasets = qcore.list_datasets()
    st.selectbox(
        "Dataset",
        datasets,
        index=datasets.index(ss["dataset"]),
        key=f"{DATASET_PICKER}:{ss['model']}",
        on_change=_on_dataset_change,
        format_func=lambda n: f"{n} (the model's own)" if n == info.dataset else n,
        help="Accuracy is measured on this dataset's held-out test split.",
    )
    st.caption(qcore.dataset_info(ss["dataset"]).description)


def require_model_and_dataset() -> tuple[str, str]:
    """The picked model and dataset, loaded and checked to fit; else an error and stop."""
    ss = st.session_state
    model_name, dataset_name = ss["model"], ss["dataset"]
    try:
        # whether it fits is known without the data, so a dataset that cannot run is never
        # offered for download
        qcore.check_fit(qcore.model_info(model_name), qcore.dataset_info(dataset_name))
        get_model(model_name)
        get_dataset(dataset_name)
    except qcore.DatasetNotFound as e:
        st.error(str(e))
        _download_button(e.name, e.folder)
        st.stop()
    except ValueError as e:
        st.error(str(e))
        st.stop()
    return model_name, dataset_name


def _download_button(name: str, folder) -> None:
    """Offer to fetch a torchvision dataset into the data folder, then show the page."""
    if not st.button(f"Download {name} into {folder}", key=f"download_{name}",
                     icon=":material/download:"):
        return
    try:
        with st.spinner(f"Downloading {name}…", show_time=True):
            qcore.load_dataset(name, "test", download=True)
    except ValueError as e:
        st.error(str(e))
        return
    st.rerun()


def show_query_warnings() -> None:
    """Show (once) the warnings about bad values in the link the session opened with."""
    for w in st.session_state.pop("query_warnings", []):
        st.warning(w, icon="⚠️")


def sync_query(page_params: Mapping[str, str]) -> None:
    """Write model, dataset and ``page_params`` to the URL, so it can always be shared."""
    ss = st.session_state
    want = {"model": ss["model"], "dataset": ss["dataset"], **page_params}
    if st.query_params.to_dict() != want:
        st.query_params.from_dict(want)
