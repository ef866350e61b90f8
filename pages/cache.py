"""Every cached computation of the app (the only module that uses ``st.cache_*``).

Loaded models and datasets are cached with ``st.cache_resource`` and never mutated; results
are plain records (``pages.tables``) cached with ``st.cache_data``, keyed by primitive
arguments: names and a frozen :class:`~qcore.config.Settings` (or :class:`SweepParams`).
The analysis computations take seconds, so the ``run_*`` functions compute them in the
background with a progress bar (``pages.progress``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import streamlit as st

import qcore
from pages.progress import run_with_progress
from pages.tables import NewlyWrong, Result, make_newly_wrong, make_result
from qcore.config import Settings

RESULT_CACHE_ENTRIES = 64  # results per process (each is small: numbers and predictions)
COMPRESSED_CACHE_ENTRIES = 8  # compressed models (they hold weight tensors)
ANALYSIS_CACHE_ENTRIES = 16  # sweeps, sensitivity tables and mixed-precision results
MAX_WRONG_SHOWN = 16
MAX_SWEEP_CONFIGS = 120  # a larger grid is refused with a sentence (it would take minutes)


# --- loaders (read-only, shared by every session) ---------------------------------------------


@st.cache_resource(show_spinner="Loading the model…")
def get_model(name: str):
    """The float model (eval mode). Shared by every session: never mutate it."""
    return qcore.load_model(name)


@st.cache_resource(show_spinner="Loading the test split…")
def get_dataset(name: str):
    """The dataset's test split. Shared by every session: never mutate it."""
    return qcore.load_dataset(name, "test")


@st.cache_resource(show_spinner="Loading the calibration split…")
def get_calib_dataset(name: str):
    """The dataset's calibration split (never the test split). Shared: never mutate it."""
    return qcore.load_dataset(name, "calib")


@st.cache_data(show_spinner=False)
def layer_names(model_name: str) -> list[str]:
    """The model's weight layers (linear and convolution), in definition order."""
    return list(qcore.weight_layers(get_model(model_name)))


# --- the Playground ---------------------------------------------------------------------------


@st.cache_data(show_spinner=False)
def float_metrics(model_name: str, dataset_name: str) -> qcore.Metrics:
    """Evaluation of the float model; computed once per (model, dataset)."""
    return qcore.evaluate(get_model(model_name), get_dataset(dataset_name))


@st.cache_resource(max_entries=COMPRESSED_CACHE_ENTRIES, show_spinner=False)
def get_compressed(model_name: str, settings: Settings) -> qcore.Compressed:
    """The compressed model (its tensors are needed for histograms and export). Read-only."""
    return qcore.compress(get_model(model_name), settings.to_config())


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def results(model_name: str, dataset_name: str, settings: Settings) -> Result:
    """Compress, evaluate and account; memoised by (model, dataset, settings)."""
    start = time.perf_counter()
    comp = get_compressed(model_name, settings)
    m = qcore.evaluate(comp.model, get_dataset(dataset_name))
    seconds = time.perf_counter() - start
    return make_result(comp, m, float_metrics(model_name, dataset_name), seconds)


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def histogram(
    model_name: str, settings: Settings, layer: str, bins: int = 80, channel: int | None = None
) -> qcore.Histogram:
    """Binned float and compressed weights of one layer (counts only)."""
    return qcore.layer_histogram(get_compressed(model_name, settings), layer, bins, channel)


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def newly_wrong(
    model_name: str, dataset_name: str, settings: Settings, limit: int = MAX_WRONG_SHOWN
) -> NewlyWrong:
    """Up to ``limit`` test images that compression turned from right to wrong."""
    return make_newly_wrong(
        get_dataset(dataset_name),
        float_metrics(model_name, dataset_name).predictions,
        results(model_name, dataset_name, settings).predictions,
        limit,
    )


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def packed_size(model_name: str, settings: Settings) -> int:
    """Packed bytes of one setting (compress only, no evaluation)."""
    return get_compressed(model_name, settings).size_bytes


def packed_download(model_name: str, settings: Settings) -> Callable[[], bytes]:
    """A zero-argument callable for ``st.download_button``: the packed file, built on click."""
    comp = get_compressed(model_name, settings)
    return lambda: qcore.packed_bytes(comp)


# --- the analysis pages: sweeps, layer sensitivity and mixed precision -------------------------
# Each takes seconds, so it runs on a button, in the background (pages.progress), and its
# result is cached by (model, dataset, settings as primitives).


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


def run_sweep(model_name: str, dataset_name: str, params: SweepParams) -> pd.DataFrame:
    """The sweep table, from the cache or computed with a progress bar."""
    params.grid()  # a ValueError with a sentence before any thread starts
    return run_with_progress(sweep_table, model_name, dataset_name, params, text="Sweeping…")


def check_sensitivity_choice(bits: tuple[int, ...], prune_rates: tuple[float, ...]) -> None:
    """Raise ValueError with a sentence when the sensitivity analysis has nothing to try."""
    if not bits and not prune_rates:
        raise ValueError("Pick at least one bit width or pruning rate.")


def run_sensitivity(
    model_name: str,
    dataset_name: str,
    bits: tuple[int, ...],
    prune_rates: tuple[float, ...],
    per_channel: bool,
) -> pd.DataFrame:
    """The layer sensitivity table, from the cache or computed with a progress bar."""
    check_sensitivity_choice(bits, prune_rates)
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
