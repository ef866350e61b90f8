"""Every cached computation of the app (the only module that uses ``st.cache_*``).

Loaded models and datasets are cached with ``st.cache_resource`` and never mutated; results
are plain records (``pages.tables``) cached with ``st.cache_data``, keyed by small frozen
records: a :class:`~qcore.refs.ModelRef` and :class:`~qcore.refs.DatasetRef` (a sample
name today, an upload's content hash later) and a :class:`~qcore.config.Settings` (or
:class:`SweepParams`).
The analysis computations take seconds, so the ``run_*`` functions compute them in the
background with a progress bar (``pages.progress``).
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

import qcore
import qcore.activations
import qcore.onnx
import qcore.ptq
from pages import figures, timing
from pages.progress import run_with_progress
from pages.tables import (
    ActInfo,
    Disagreements,
    NewlyWrong,
    Result,
    layer_display,
    make_act_info,
    make_disagreements,
    make_newly_wrong,
    make_result,
)
from qcore.config import Settings
from qcore.refs import DatasetRef, ModelRef

RESULT_CACHE_ENTRIES = 64  # results per process (each is small: numbers and predictions)
COMPRESSED_CACHE_ENTRIES = 8  # compressed models (they hold weight tensors)
ANALYSIS_CACHE_ENTRIES = 16  # sweeps, sensitivity tables and mixed-precision results
MAX_WRONG_SHOWN = 16
MAX_SWEEP_CONFIGS = 120  # a larger grid is refused with a sentence (it would take minutes)
LOADED_CACHE_ENTRIES = 32  # sample models and known dataset splits (a handful of each)
# Memory for uploads (weights and data) of every session together, in MiB: past it, the
# upload used least recently is let go (its sessions read a sentence). QP_UPLOAD_BUDGET_MB.
UPLOAD_BUDGET_ENV = "QP_UPLOAD_BUDGET_MB"
DEFAULT_UPLOAD_BUDGET_MB = 1024


# --- loaders (read-only, shared by every session) ---------------------------------------------


@st.cache_resource(max_entries=LOADED_CACHE_ENTRIES, show_spinner="Loading the model…")
def _sample_model(ref: ModelRef):
    return ref.load()


# Models made in a session (fine-tuned), by SHA-256 of their state, for as long as some
# session holds one (its registry in st.session_state, pages.session). Not a cache_resource:
# that would keep every fine-tuned model of every past session for the life of the process.
# Worker threads (pages.progress) find them here too: they cannot read st.session_state.
_SESSION_MODELS: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def get_model(ref: ModelRef):
    """The float model (eval mode). Shared by every session: never mutate it.

    A sample model is loaded once per process; a model made in a session (``ref.sha256``)
    is the one that session registered with :func:`hold_session_model`.
    """
    if ref.sha256 is None:
        return _sample_model(ref)
    upload = _UPLOADS.get(ref.sha256)
    if upload is not None:
        return upload
    return _held(_SESSION_MODELS, ref, "made", "Pick a sample model in the sidebar.")


def _held(registry: weakref.WeakValueDictionary[str, Any], ref: ModelRef | DatasetRef,
          how: str, instead: str) -> Any:  # fmt: skip
    """What a session registered under ``ref``'s SHA-256; a sentence if none holds it now."""
    held = registry.get(ref.sha256)  # type: ignore[arg-type]
    if held is None:
        if ref.sha256 in _UPLOADS.let_go:
            raise ValueError(
                f"{ref.name} was let go to make room for newer uploads: this server keeps "
                f"{upload_budget() // 2**20:,} MiB of uploads for all its users together, "
                f"the least recently used going first. Upload the file again. {instead}"
            )
        raise ValueError(
            f"{ref.name} was {how} in a session that no longer holds it (the session ended "
            f"or the server restarted). {instead}"
        )
    return held


def hold_session_model(ref: ModelRef, model: Any) -> Any:
    """Make ``model`` what :func:`get_model` returns for ``ref`` while the caller keeps a
    reference to the returned module (the one already held, when the content is identical)."""
    if ref.sha256 is None:
        raise ValueError(f"{ref.name} is a sample model; only session models are held here.")
    return _SESSION_MODELS.setdefault(ref.sha256, model)


@st.cache_resource(max_entries=LOADED_CACHE_ENTRIES, show_spinner="Loading the dataset…")
def _known_dataset(ref: DatasetRef):
    return ref.load()


def upload_budget() -> int:
    """Bytes every session's uploads may hold together (``QP_UPLOAD_BUDGET_MB``, in MiB)."""
    raw = os.environ.get(UPLOAD_BUDGET_ENV, "").strip()
    mib = int(raw) if raw.isascii() and raw.isdigit() and int(raw) > 0 else DEFAULT_UPLOAD_BUDGET_MB
    return mib * 2**20


class _Uploads:
    """Uploads of every session (a module or an UploadedDataset) by SHA-256, within one
    memory budget: the least recently used is let go first. Sessions keep only records
    (name, hash, shape), so letting go here frees the memory once no run still uses it."""

    def __init__(self) -> None:
        self._held: OrderedDict[str, tuple[Any, int]] = OrderedDict()  # oldest use first
        self.let_go: OrderedDict[str, None] = OrderedDict()  # hashes let go (the last 1,000)
        self._lock = threading.Lock()

    def get(self, sha: str | None) -> Any:
        """The upload, marked as just used; None if it is not held."""
        with self._lock:
            entry = self._held.get(sha) if sha else None
            if entry is None:
                return None
            self._held.move_to_end(sha)  # type: ignore[arg-type]
            return entry[0]

    def hold(self, sha: str, obj: Any, nbytes: int, name: str) -> Any:
        """Hold ``obj`` (the one held already for the same content); let the least recently
        used others go until everything fits the budget."""
        budget = upload_budget()
        if nbytes > budget:
            raise ValueError(
                f"{name} takes {nbytes / 2**20:,.0f} MiB in memory; this server keeps at most "
                f"{budget // 2**20:,} MiB of uploads for all its users. Upload a smaller file."
            )
        with self._lock:
            if sha in self._held:
                self._held.move_to_end(sha)
                return self._held[sha][0]
            self._held[sha] = (obj, nbytes)
            self.let_go.pop(sha, None)
            total = sum(n for _, n in self._held.values())
            for old in list(self._held)[:-1]:
                if total <= budget:
                    break
                total -= self._held.pop(old)[1]
                self.let_go[old] = None
            while len(self.let_go) > 1000:
                self.let_go.popitem(last=False)
            return obj

    def __contains__(self, sha: object) -> bool:
        return sha in self._held

    def nbytes(self) -> int:
        """Bytes held now."""
        return sum(n for _, n in self._held.values())


_UPLOADS = _Uploads()


def hold_session_dataset(uploaded: Any) -> Any:
    """Make ``uploaded`` what :func:`get_dataset` returns splits of for its refs, within
    the uploads' memory budget; return it (the one already held, if identical). Keep only
    its record (name, hash, info) in a session, so that letting it go frees its memory."""
    return _UPLOADS.hold(uploaded.sha256, uploaded, uploaded.nbytes, uploaded.name)


def hold_uploaded_model(ref: ModelRef, module: Any) -> Any:
    """Make ``module`` (uploaded weights) what :func:`get_model` returns for ``ref``, within
    the uploads' memory budget (its tensors' bytes)."""
    nbytes = sum(t.element_size() * t.nelement() for t in module.state_dict().values())
    return _UPLOADS.hold(ref.sha256, module, nbytes, ref.name)  # type: ignore[arg-type]


def upload_held(sha: str) -> bool:
    """Whether the upload with this SHA-256 is still held (not let go for the budget)."""
    return sha in _UPLOADS


def get_dataset(ref: DatasetRef):
    """The dataset split (the test split, unless the ref says otherwise). Shared by every
    session: never mutate it. An uploaded dataset's splits come from the session that
    holds it (:func:`hold_session_dataset`)."""
    if ref.sha256 is None:
        return _known_dataset(ref)
    held = _UPLOADS.get(ref.sha256)
    if held is None:
        _held({}, ref, "uploaded", "Pick another dataset in the sidebar.")  # type: ignore[arg-type]
    return held.splits[ref.split]


get_dataset.clear = _known_dataset.clear  # type: ignore[attr-defined]


def get_calib_dataset(ref: DatasetRef):
    """The dataset's calibration split (never the test split). Shared: never mutate it."""
    return get_dataset(replace(ref, split="calib"))


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def layer_names(model: ModelRef) -> list[str]:
    """The model's weight layers (linear and convolution), in definition order."""
    return list(qcore.weight_layers(get_model(model)))


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def removable_blocks(model: ModelRef) -> dict[str, str]:
    """The blocks that layer removal can replace by the identity, each with a description
    (shape kept, parameters held), in model order."""
    m = get_model(model)
    try:
        blocks = qcore.removable_blocks(m)
    except ValueError:  # no input shape known: nothing is offered
        return {}
    return {name: qcore.blocks.describe(b) for name, b in blocks.items()}


# --- the Playground ---------------------------------------------------------------------------


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def float_metrics(model: ModelRef, data: DatasetRef) -> qcore.Metrics:
    """Evaluation of the float model; computed once per (model, dataset)."""
    with timing.phase("evaluate"):
        return qcore.evaluate(get_model(model), get_dataset(data))


@st.cache_resource(max_entries=COMPRESSED_CACHE_ENTRIES, show_spinner=False)
def _compressed(
    model: ModelRef, settings: Settings, data: DatasetRef | None, _progress=None
) -> qcore.Compressed:
    calib = None if data is None else get_calib_dataset(data)
    with timing.phase("compress"):
        return qcore.compress(get_model(model), settings.to_config(), calib=calib,
                              progress=_progress)  # fmt: skip


def get_compressed(
    model: ModelRef, settings: Settings, data: DatasetRef | None = None
) -> qcore.Compressed:
    """The compressed model (its tensors are needed for histograms and export). Read-only.

    With quantized activations (``settings.abits``) they are calibrated on the calibration
    split of ``data`` (never its test split), and bias correction and AdaRound learn from
    it (``settings.needs_calib``); without, ``data`` is not part of the key, so every
    dataset shares the one weight-only variant.
    """
    if not settings.needs_calib:
        return _compressed(model, settings, None)
    if data is None:
        raise ValueError(
            "Quantized activations, bias correction and AdaRound learn from a dataset's "
            "calibration split; no dataset was given."
        )
    return _compressed(model, settings, data)


ADAROUND_TEXT = "AdaRound: learning each layer's rounding on the calibration split…"


def prepare_compressed(model: ModelRef, settings: Settings, data: DatasetRef) -> None:
    """Compress ahead of :func:`results` with a progress bar (one step per layer) when
    AdaRound makes it take seconds; the result lands in the cache that results reads."""
    if settings.bits is None or settings.rounding != "adaround" or settings.codebook != "uniform":
        return
    get_calib_dataset(data)  # loaded here, where its spinner can be drawn
    run_with_progress(_compressed, model, settings, data, text=ADAROUND_TEXT)


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def equalization_ranges(
    model: ModelRef, settings: Settings, data: DatasetRef
) -> dict[str, Any]:
    """Cross-layer equalization as plain values: per equalized layer, each output channel's
    weight min and max before and after (numpy arrays), and the pairs left alone."""
    comp = get_compressed(model, settings, data)
    eq = comp.equalization
    return {"layers": qcore.ptq.equalization_ranges(comp),
            "pairs": [] if eq is None else list(eq.pairs),
            "skipped": [] if eq is None else list(eq.skipped)}  # fmt: skip


def _weights_only(settings: Settings) -> Settings:
    """The same stored bytes without a calibration where none changes them: float
    activations (they store nothing in the packed file), no bias correction (a bias keeps
    its size) and, unless Huffman coding counts the codes, nearest rounding (AdaRound's
    codes are on the same grid, so dense and sparse forms keep their size)."""
    same = {"abits": None, "bias_correction": False}
    if settings.entropy == "none" and settings.rounding == "adaround":
        same["rounding"] = "nearest"
    if all(getattr(settings, k) == v for k, v in same.items()):
        return settings
    return replace(settings, **same).canonical()


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def results(model: ModelRef, data: DatasetRef, settings: Settings) -> Result:
    """Compress, evaluate and account; memoised by (model, dataset, settings)."""
    start = time.perf_counter()
    comp = get_compressed(model, settings, data)
    with timing.phase("evaluate"):
        m = qcore.evaluate(comp.model, get_dataset(data))
    seconds = time.perf_counter() - start
    return make_result(comp, m, float_metrics(model, data), seconds)


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def layer_table(model: ModelRef, data: DatasetRef, settings: Settings) -> pd.DataFrame:
    """The Playground's per-layer table (:func:`pages.tables.layer_display` of the results),
    built once per setting: a revisited setting only sends it."""
    r = results(model, data, settings)
    return layer_display(r.layers, r.sizes)


@st.cache_resource(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def weight_histogram_chart(
    model: ModelRef,
    settings: Settings,
    layer: str,
    channel: int | None,
    data: DatasetRef | None,
    log_y: bool,
    title: str,
) -> Any:
    """The Weights view's plotly figure, built once per setting and view and shared by the
    sessions (plotly's checks make building one cost tens of milliseconds; st.plotly_chart
    only reads it)."""
    h = histogram(model, settings, layer, 80, channel, data)
    return figures.weight_histogram_figure(h, log_y=log_y, title=title)


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def histogram(
    model: ModelRef,
    settings: Settings,
    layer: str,
    bins: int = 80,
    channel: int | None = None,
    data: DatasetRef | None = None,
) -> qcore.Histogram:
    """Binned float and compressed weights of one layer (counts only)."""
    return qcore.layer_histogram(get_compressed(model, settings, data), layer, bins, channel)


def _input_edge(comp: qcore.Compressed, layer: str) -> str | None:
    """The activation edge ``layer`` reads (an engine's stored tensor), None when float."""
    act = next((r.act for r in comp.layers if r.name == layer), None)
    return None if act is None or act.edge not in comp.activations else act.edge


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def activation_histogram(
    model: ModelRef, data: DatasetRef, settings: Settings, layer: str, bins: int = 80
) -> qcore.Histogram | None:
    """Binned values reaching ``layer``'s input before and after its activation quantizer,
    on calibration images (counts only); None when that input is not quantized."""
    comp = get_compressed(model, settings, data)
    edge = _input_edge(comp, layer)
    if edge is None:
        return None
    return qcore.activation_histogram(comp, edge, get_calib_dataset(data), bins)


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def activation_edges(
    model: ModelRef, data: DatasetRef, settings: Settings
) -> tuple[tuple[str, str], ...]:
    """The quantized activation edges, in graph order, each with what it holds."""
    comp = get_compressed(model, settings, data)
    if not comp.activations:
        return ()
    p = qcore.activations.placement(comp.graph, [r.name for r in comp.layers],
                                    comp.config.act.output)  # fmt: skip
    return tuple((e, p.describe(e)) for e in comp.activations)


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def activation_info(
    model: ModelRef, data: DatasetRef, settings: Settings, layer: str
) -> ActInfo | None:
    """The calibrated range of ``layer``'s input as plain numbers; None when it stays float."""
    comp = get_compressed(model, settings, data)
    edge = _input_edge(comp, layer)
    if edge is None:
        return None
    act = comp.activations[edge]
    calib_images = len(get_calib_dataset(data).y)
    return make_act_info(act, settings.aobs, calib_images, pow2=settings.scale == "pow2")


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def newly_wrong(
    model: ModelRef, data: DatasetRef, settings: Settings, limit: int = MAX_WRONG_SHOWN
) -> NewlyWrong:
    """Up to ``limit`` test images that compression turned from right to wrong."""
    return make_newly_wrong(
        get_dataset(data),
        float_metrics(model, data).predictions,
        results(model, data, settings).predictions,
        limit,
    )


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def packed_size(model: ModelRef, settings: Settings, data: DatasetRef | None = None) -> int:
    """Packed bytes of one setting (compress only, no evaluation; activations change no
    byte of the file, so they are left float here and nothing is calibrated; ``data``
    only for AdaRound with Huffman coding, whose learnt codes the size depends on)."""
    return get_compressed(model, _weights_only(settings), data).size_bytes


def packed_download(
    model: ModelRef, settings: Settings, data: DatasetRef | None = None
) -> Callable[[], bytes]:
    """A zero-argument callable for ``st.download_button``: the packed file, built on click."""
    comp = get_compressed(model, settings, data)
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
    act_bits: tuple[int | None, ...] = (None,)  # activation widths; None = float32
    rounding: tuple[str, ...] = ("nearest",)  # "adaround" learns on the calibration split
    equalize: tuple[bool, ...] = (False,)
    bias_correction: tuple[bool, ...] = (False,)

    @property
    def needs_calib(self) -> bool:
        """Whether some configuration learns from the calibration split."""
        return "adaround" in self.rounding or True in self.bias_correction

    def grid(self) -> qcore.SweepGrid:
        """The qcore grid; raises ValueError with a user sentence for an empty or huge one."""
        for name, values in (
            ("bit width", self.bits),
            ("pruning rate", self.prune_rates),
            ("clip", self.clips),
            ("scheme", self.symmetric),
            ("granularity", self.per_channel),
            ("activation width", self.act_bits),
            ("rounding", self.rounding),
            ("equalization choice", self.equalize),
            ("bias correction choice", self.bias_correction),
        ):
            if not values:
                raise ValueError(f"Pick at least one {name} for the sweep.")
        grid = qcore.SweepGrid(
            bits=self.bits,
            prune_rates=self.prune_rates,
            clips=self.clips,
            symmetric=self.symmetric,
            per_channel=self.per_channel,
            act_bits=self.act_bits,
            rounding=self.rounding,
            equalize=self.equalize,
            bias_correction=self.bias_correction,
        )
        if len(grid) > MAX_SWEEP_CONFIGS:
            raise ValueError(
                f"This grid has {len(grid)} configurations; pick fewer values "
                f"(at most {MAX_SWEEP_CONFIGS} configurations per sweep)."
            )
        return grid


@st.cache_data(max_entries=ANALYSIS_CACHE_ENTRIES, show_spinner=False)
def sweep_table(
    model: ModelRef, data: DatasetRef, params: SweepParams, _progress=None
) -> pd.DataFrame:
    """``qcore.sweep`` over the grid on the test split; one row per configuration
    (activations calibrated, AdaRound and bias correction learnt, on the calibration
    split)."""
    needs = params.needs_calib or any(b is not None for b in params.act_bits)
    return qcore.sweep(
        get_model(model), get_dataset(data), params.grid(), progress=_progress,
        calib=get_calib_dataset(data) if needs else None,
    )  # fmt: skip


@st.cache_data(max_entries=ANALYSIS_CACHE_ENTRIES, show_spinner=False)
def sensitivity_table(
    model: ModelRef,
    data: DatasetRef,
    bits: tuple[int, ...],
    prune_rates: tuple[float, ...],
    per_channel: bool,
    _progress=None,
) -> pd.DataFrame:
    """``qcore.layer_sensitivity``: each layer alone quantized or pruned, on the test split."""
    return qcore.layer_sensitivity(
        get_model(model),
        get_dataset(data),
        bits=bits,
        prune_rates=prune_rates,
        quant=qcore.QuantConfig(per_channel=per_channel),
        progress=_progress,
    )


@st.cache_data(max_entries=ANALYSIS_CACHE_ENTRIES, show_spinner=False)
def mixed_result(
    model: ModelRef,
    data: DatasetRef,
    budget_bytes: int,
    candidate_bits: tuple[int, ...],
    per_channel: bool,
    _progress=None,
) -> qcore.MixedPrecisionResult:
    """``qcore.mixed_precision``: bits chosen on the calibration split, scored on the test split."""
    return qcore.mixed_precision(
        get_model(model),
        get_dataset(data),
        budget_bytes,
        candidate_bits,
        quant=qcore.QuantConfig(per_channel=per_channel),
        search_dataset=get_calib_dataset(data),
        progress=_progress,
    )


def run_sweep(model: ModelRef, data: DatasetRef, params: SweepParams) -> pd.DataFrame:
    """The sweep table, from the cache or computed with a progress bar."""
    params.grid()  # a ValueError with a sentence before any thread starts
    if params.needs_calib:
        get_calib_dataset(data)  # loaded here, where its spinner can be drawn
    return run_with_progress(sweep_table, model, data, params, text="Sweeping…")


def check_sensitivity_choice(bits: tuple[int, ...], prune_rates: tuple[float, ...]) -> None:
    """Raise ValueError with a sentence when the sensitivity analysis has nothing to try."""
    if not bits and not prune_rates:
        raise ValueError("Pick at least one bit width or pruning rate.")


def run_sensitivity(
    model: ModelRef,
    data: DatasetRef,
    bits: tuple[int, ...],
    prune_rates: tuple[float, ...],
    per_channel: bool,
) -> pd.DataFrame:
    """The layer sensitivity table, from the cache or computed with a progress bar."""
    check_sensitivity_choice(bits, prune_rates)
    return run_with_progress(
        sensitivity_table, model, data, bits, prune_rates, per_channel,
        text="Testing each layer…",
    )  # fmt: skip


def run_mixed(
    model: ModelRef,
    data: DatasetRef,
    budget_bytes: int,
    candidate_bits: tuple[int, ...],
    per_channel: bool,
) -> qcore.MixedPrecisionResult:
    """The mixed-precision choice, from the cache or computed with a progress bar."""
    if not candidate_bits:
        raise ValueError("Pick at least one candidate bit width.")
    get_calib_dataset(data)  # loaded here, where its spinner can be drawn
    return run_with_progress(
        mixed_result, model, data, budget_bytes, candidate_bits, per_channel,
        text="Measuring each layer on the calibration split…",
    )  # fmt: skip


def budget_bounds_kb(
    model: ModelRef, candidate_bits: tuple[int, ...], per_channel: bool
) -> tuple[float, float]:
    """The budget slider's range in kB (0.1 kB steps): every layer at the lowest candidate
    bit width (rounded up, so the low end always fits) to every layer at 8 bits."""
    lo = packed_size(model, Settings(bits=min(candidate_bits), per_channel=per_channel))
    hi = packed_size(model, Settings(bits=8, per_channel=per_channel))
    lo_kb = math.ceil(lo / 100) / 10
    return lo_kb, max(math.floor(hi / 100) / 10, round(lo_kb + 0.1, 1))


# --- the Playground's teaching panels: one weight's journey, the clip error curve -------------


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def weight_journey(
    model: ModelRef,
    settings: Settings,
    layer: str,
    index: int | None = None,
    data: DatasetRef | None = None,
):
    """``qcore.teach.weight_journey``: one weight of ``layer`` from float to code and back
    (``index=None``: the weight of largest magnitude), or None for a layer left in float."""
    from qcore import teach

    comp = get_compressed(model, settings, data)
    if comp.layer(layer).qparams is None:
        return None
    return teach.weight_journey(comp, layer, index)


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def random_weight_index(
    model: ModelRef, settings: Settings, layer: str, seed: int, data: DatasetRef | None = None
) -> int:
    """``qcore.teach.random_weight_index``: a weight of ``layer`` picked by ``seed``."""
    from qcore import teach

    return teach.random_weight_index(get_compressed(model, settings, data), layer, seed)


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def clip_error_curve(
    model: ModelRef,
    settings: Settings,
    layer: str,
    points: int = 60,
    data: DatasetRef | None = None,
):
    """``qcore.teach.clip_error_curve`` of ``layer``, or None for a layer left in float."""
    from qcore import teach

    comp = get_compressed(model, settings, data)
    if comp.layer(layer).qparams is None:
        return None
    return teach.clip_error_curve(comp, layer, points)


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def error_histogram(
    model: ModelRef, settings: Settings, layer: str, data: DatasetRef | None = None
):
    """``qcore.teach.error_histogram`` of ``layer``, or None for a layer without a grid."""
    from qcore import teach

    comp = get_compressed(model, settings, data)
    if comp.layer(layer).qparams is None:
        return None
    return teach.error_histogram(comp, layer)


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def sqnr_by_bits(
    model: ModelRef, settings: Settings, layer: str, data: DatasetRef | None = None
):
    """``qcore.teach.sqnr_by_bits`` of ``layer``, or None for a layer without a uniform grid."""
    from qcore import teach

    comp = get_compressed(model, settings, data)
    if comp.layer(layer).qparams is None or comp.config.quant.codebook != "uniform":
        return None
    return teach.sqnr_by_bits(comp, layer)


# --- the Fine-tune page: training in the background, results kept in the session -------------
# A training run takes seconds to minutes and has a Stop button, so it runs as a
# pages.progress.Job, not in st.cache_*: a stopped run must not be cached as the finished
# one, and its module belongs to the session that trained it. Finished runs are kept per
# session by (model ref, dataset ref, settings, fine-tuning config), the newest few only.

FINETUNE_KEPT = 4  # finished fine-tuning runs kept per session (each holds a model)
_FINETUNE_RUNS = "finetune_runs"  # st.session_state key: {key: FinetuneOutcome}, oldest first


@dataclass(frozen=True, eq=False)
class FinetuneOutcome:
    """A fine-tuning run and its fine-tuned compressed model, measured on the test split."""

    result: qcore.FinetuneResult  # .model (float, fine-tuned), .history, .stopped, .seconds
    # .model compressed with the same settings (the download); None when trained in a job
    # process (pages.jobs), which sends its packed file instead
    compressed: qcore.Compressed | None
    accuracy: float  # the fine-tuned compressed model, test split (simulated)
    float_accuracy: float  # the fine-tuned float model before compression, test split
    n: int  # test images
    size_bytes: int  # packed payload bytes of the fine-tuned compressed model
    packed: bytes | None = None  # its packed file, when it came from a job process

    def packed_bytes(self) -> bytes:
        """The packed file of the fine-tuned compressed model (the download)."""
        return self.packed if self.packed is not None else qcore.packed_bytes(self.compressed)


def train_dataset(data: DatasetRef):
    """The dataset's train split (fine-tuning's only training data). Shared: never mutate it."""
    return get_dataset(replace(data, split="train"))


def finetune_run(
    model: ModelRef,
    data: DatasetRef,
    settings: Settings,
    ft: qcore.FinetuneConfig,
    *,
    progress=None,
    should_stop=None,
) -> FinetuneOutcome:
    """``qcore.finetune`` on the train split (reporting on the calibration split), then the
    fine-tuned model compressed with ``settings`` and evaluated on the test split. Runs in a
    worker thread: load the splits first (:func:`train_dataset`, :func:`get_calib_dataset`,
    :func:`get_dataset`), where their spinners can be drawn."""
    config = settings.to_config()
    calib = get_calib_dataset(data)
    res = qcore.finetune(get_model(model), train_dataset(data), config, ft, calib=calib,
                         progress=progress, should_stop=should_stop)  # fmt: skip
    # as get_compressed: a calibration only where activations are quantized
    comp = qcore.compress(res.model, config, calib=calib if settings.abits is not None else None)
    test = get_dataset(data)
    m = qcore.evaluate(comp.model, test)
    float_m = qcore.evaluate(res.model, test)
    return FinetuneOutcome(result=res, compressed=comp, accuracy=m.accuracy,
                           float_accuracy=float_m.accuracy, n=m.n,
                           size_bytes=comp.size_bytes)  # fmt: skip


def finished_finetune(key: tuple) -> FinetuneOutcome | None:
    """The finished run of ``key`` kept in this session, if any."""
    return st.session_state.get(_FINETUNE_RUNS, {}).get(key)


def keep_finetune(key: tuple, outcome: FinetuneOutcome) -> None:
    """Keep a finished (not stopped) run in this session, dropping the oldest beyond
    :data:`FINETUNE_KEPT`."""
    runs = st.session_state.setdefault(_FINETUNE_RUNS, {})
    runs.pop(key, None)
    runs[key] = outcome
    while len(runs) > FINETUNE_KEPT:
        runs.pop(next(iter(runs)))


# --- the Robustness page ----------------------------------------------------------------------


@dataclass(frozen=True)
class RobustnessParams:
    """One curve's inputs, as primitives: which perturbation, at which strengths, on how
    many test images (``None`` = all), with how many PGD steps."""

    perturbation: str
    strengths: tuple[float, ...]
    limit: int | None = None
    steps: int = 10


def _first_images(data: DatasetRef, limit: int | None):
    ds = get_dataset(data)
    if limit is None or limit >= len(ds.y):
        return ds
    return replace(ds, x=ds.x[:limit], y=ds.y[:limit], indices=ds.indices[:limit])


def _robustness_target(model: ModelRef, settings: Settings, data: DatasetRef, bitflip: bool):
    """What the perturbation runs on: the float model itself for float settings (bit flips
    excepted: they need the stored form), else the compressed variant."""
    if settings.to_config().keeps_float and not bitflip:
        return get_model(model)
    comp = get_compressed(model, settings, data)
    return comp if bitflip else comp.model


@st.cache_data(max_entries=ANALYSIS_CACHE_ENTRIES * 4, show_spinner=False)
def robustness_table(
    model: ModelRef, data: DatasetRef, settings: Settings, params: RobustnessParams,
    _progress=None,
) -> pd.DataFrame:
    """``qcore.robustness`` of one setting on the first ``params.limit`` test images."""
    target = _robustness_target(model, settings, data, params.perturbation == "bitflip")
    return qcore.robustness(
        target, _first_images(data, params.limit), params.perturbation, params.strengths,
        steps=params.steps, progress=_progress,
    )  # fmt: skip


def run_robustness(
    model: ModelRef, data: DatasetRef, settings: Settings, params: RobustnessParams
) -> pd.DataFrame:
    """One robustness curve, from the cache or computed with a progress bar."""
    settings.to_config()  # a ValueError with a sentence before any thread starts
    return run_with_progress(
        robustness_table, model, data, settings, params,
        text=f"{params.perturbation} on {settings.label()}…",
    )  # fmt: skip


@dataclass(frozen=True)
class PerturbedImages:
    """A few perturbed test images (normalised) and what each model answers on them."""

    images: object  # numpy (K, C, H, W)
    truth: tuple[str, ...]
    float_pred: tuple[str, ...]
    compressed_pred: tuple[str, ...]


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def perturbed_images(
    model: ModelRef, data: DatasetRef, settings: Settings, perturbation: str, strength: float,
    count: int = 8, steps: int = 10,
) -> PerturbedImages:
    """The first ``count`` test images perturbed against the compressed setting (the
    attack's target for FGSM / PGD), with the true class and both models' predictions."""
    import torch

    from qcore.evaluate import predict_logits

    ds = get_dataset(data)
    target = _robustness_target(model, settings, data, False)
    x = qcore.perturb_inputs(target, ds, perturbation, strength, indices=range(count),
                             steps=steps)  # fmt: skip

    def names(m) -> tuple[str, ...]:
        logits = predict_logits(m, x)
        ok = torch.isfinite(logits).all(dim=1)
        return tuple(ds.classes[int(i)] if f else "?" for i, f in
                     zip(logits.argmax(dim=1), ok, strict=True))  # fmt: skip

    return PerturbedImages(
        images=x.numpy(), truth=tuple(ds.classes[int(i)] for i in ds.y[:count]),
        float_pred=names(get_model(model)), compressed_pred=names(target),
    )  # fmt: skip


# --- the Deep Compression page ----------------------------------------------------------------

DEEP_MAX_TRAIN = 10_000  # retraining examples at most: a full MNIST would take many minutes


def deep_train_split(data: DatasetRef):
    """The train split the Deep Compression page retrains on: the first
    :data:`DEEP_MAX_TRAIN` examples of ``data``'s train split (its order is already a
    seeded shuffle)."""
    train = get_dataset(replace(data, split="train"))
    if len(train) <= DEEP_MAX_TRAIN:
        return train
    n = DEEP_MAX_TRAIN
    return replace(train, x=train.x[:n], y=train.y[:n], indices=train.indices[:n])


# a cache_resource: the result holds the final compressed model (tensors, the shared graph),
# read-only, which st.cache_data would pickle on every hit
@st.cache_resource(max_entries=4, show_spinner=False)
def deep_result(
    model: ModelRef,
    data: DatasetRef,
    prune_rate: float | None,
    bits: int | None,
    epochs: int,
    _progress=None,
) -> qcore.DeepCompressionResult:
    """``qcore.deep_compression``: retrained on the train split, measured on the test split."""
    return qcore.deep_compression(
        get_model(model),
        deep_train_split(data),
        get_calib_dataset(data),
        prune_rate=prune_rate,
        bits=bits,
        epochs=epochs,
        test=get_dataset(data),
        progress=_progress,
    )


def run_deep(
    model: ModelRef, data: DatasetRef, prune_rate: float | None, bits: int | None, epochs: int
) -> qcore.DeepCompressionResult:
    """The Deep Compression result, from the cache or computed with a progress bar."""
    get_calib_dataset(data)  # loaded here, where its spinner can be drawn
    return run_with_progress(
        deep_result, model, data, prune_rate, bits, epochs,
        text="Pruning, sharing and retraining…",
    )  # fmt: skip


@dataclass(frozen=True, eq=False)
class DeepOutcome:
    """What the Deep Compression page draws: the result (its ``compressed`` None when it
    ran in a job process), the packed payload's bytes, the file's bytes and its download."""

    result: qcore.DeepCompressionResult
    size_bytes: int  # packed payload bytes of the final stage
    file_bytes: int  # the packed file: payload and header
    download: Callable[[], bytes]  # the packed file, for st.download_button


@st.cache_data(max_entries=ANALYSIS_CACHE_ENTRIES, show_spinner=False)
def deep_packed_size(
    model: ModelRef, data: DatasetRef, prune_rate: float | None, bits: int | None, epochs: int
) -> int:
    """Bytes of the Deep Compression result's packed file, header included."""
    comp = deep_result(model, data, prune_rate, bits, epochs).compressed
    return len(qcore.packed_bytes(comp))


def deep_packed_download(
    model: ModelRef, data: DatasetRef, prune_rate: float | None, bits: int | None, epochs: int
) -> Callable[[], bytes]:
    """A zero-argument callable for ``st.download_button``: the packed file, built on click."""
    comp = deep_result(model, data, prune_rate, bits, epochs).compressed
    return lambda: qcore.packed_bytes(comp)


# --- deploy: the setting as an ONNX file, run by ONNX Runtime ---------------------------------


@dataclass(frozen=True)
class OnnxFile:
    """The quantized ONNX file of one setting: its bytes and which layers run integer."""

    data: bytes
    export: qcore.OnnxExport  # .path names a deleted temporary file: use ``data``


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def onnx_file(model: ModelRef, data: DatasetRef, settings: Settings) -> OnnxFile:
    """``qcore.export_onnx`` of the setting (activations calibrated on ``data``'s calib split)."""
    comp = get_compressed(model, settings, data)
    with tempfile.TemporaryDirectory() as tmp:
        e = qcore.export_onnx(comp, Path(tmp) / "model.onnx")
        return OnnxFile(e.path.read_bytes(), e)


@st.cache_data(max_entries=ANALYSIS_CACHE_ENTRIES, show_spinner=False)
def deployment(
    model: ModelRef, data: DatasetRef, settings: Settings, _progress=None
) -> qcore.onnx.Deployment:
    """Float PyTorch, float ONNX Runtime, the simulation and the int8 file: accuracy on the
    test split and latency at batch 1 and 256 (``qcore.onnx.deploy``)."""
    comp = get_compressed(model, settings, data)
    with tempfile.TemporaryDirectory() as tmp:
        return qcore.onnx.deploy(get_model(model), comp, get_dataset(data),
                                 Path(tmp) / "model.onnx", Path(tmp) / "float.onnx",
                                 settings.wa_label(), progress=_progress)  # fmt: skip


def run_deploy(model: ModelRef, data: DatasetRef, settings: Settings) -> qcore.onnx.Deployment:
    """The deploy table, from the cache or measured with a progress bar."""
    get_calib_dataset(data)  # loaded here, where its spinner can be drawn
    return run_with_progress(deployment, model, data, settings,
                             text="Exporting, evaluating and timing…")  # fmt: skip


@st.cache_data(max_entries=ANALYSIS_CACHE_ENTRIES, show_spinner=False)
def sweep_latency_table(
    model: ModelRef, data: DatasetRef, params: SweepParams, _progress=None
) -> pd.DataFrame:
    """``qcore.onnx.sweep_latency``: batch-1 ONNX Runtime latency of each sweep row that
    runs integer kernels (NaN for the others)."""
    calib = get_calib_dataset(data) if any(b is not None for b in params.act_bits) else None
    return qcore.onnx.sweep_latency(get_model(model), get_dataset(data), params.grid(),
                                    calib=calib, progress=_progress)  # fmt: skip


def run_sweep_latency(model: ModelRef, data: DatasetRef, params: SweepParams) -> pd.DataFrame:
    """The latency column of a sweep, from the cache or measured with a progress bar."""
    params.grid()
    return run_with_progress(sweep_latency_table, model, data, params,
                             text="Exporting and timing the int8 rows…")  # fmt: skip


# --- the Debug page and comparing two settings ------------------------------------------------


@st.cache_data(max_entries=ANALYSIS_CACHE_ENTRIES, show_spinner=False)
def analysis(
    model: ModelRef, data: DatasetRef, settings: Settings, _progress=None
) -> qcore.Analysis:
    """``qcore.analyze`` of one setting on the test split (activations calibrated on the
    calibration split)."""
    calib = None if settings.abits is None else get_calib_dataset(data)
    return qcore.analyze(get_model(model), settings.to_config(), get_dataset(data),
                         calib=calib, progress=_progress)  # fmt: skip


def run_analysis(model: ModelRef, data: DatasetRef, settings: Settings) -> qcore.Analysis:
    """The analysis of ``settings``, from the cache or computed with a progress bar."""
    settings.to_config()  # a ValueError with a sentence before any thread starts
    get_dataset(data)  # loaded here, where their spinners can be drawn
    if settings.abits is not None:
        get_calib_dataset(data)
    return run_with_progress(analysis, model, data, settings,
                             text="Analysing each layer…")  # fmt: skip


@st.cache_data(max_entries=RESULT_CACHE_ENTRIES, show_spinner=False)
def disagreements(
    model: ModelRef, data: DatasetRef, a: Settings, b: Settings, limit: int = MAX_WRONG_SHOWN
) -> Disagreements:
    """Up to ``limit`` test images on which settings ``a`` and ``b`` predict different classes."""
    return make_disagreements(get_dataset(data), results(model, data, a).predictions,
                              results(model, data, b).predictions, limit)  # fmt: skip
