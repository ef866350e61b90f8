"""Widget groups pages share. Each ``*_ui`` function draws widgets and returns plain values.

Every Playground widget has a key equal to its URL query key; the analysis pages' widgets
have keys of their own (``pages.session.ANALYSIS_DEFAULTS``). Their values are initialised
once per session by :func:`pages.session.init_session`, so no widget here passes a default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import streamlit as st

from pages.cache import SweepParams
from pages.session import ensure_layers, settings_from_session
from pages.tables import ACT_OBSERVER_HELP
from qcore.config import (
    ACT_OBSERVERS,
    CLIP_RANGES,
    CODEBOOKS,
    ENTROPY_CODINGS,
    FLOAT,
    ROUNDINGS,
    SCALE_MODES,
    Settings,
)

BITS_OPTIONS: tuple[int | str, ...] = (*range(1, 17), FLOAT)  # the bit-width slider
ABITS_OPTIONS: tuple[int | str, ...] = (*range(2, 17), FLOAT)  # activations need 2 bits
ACTIVATIONS_HELP = (
    "Bits per activation: the values flowing between layers, rounded where an int8 engine "
    "stores them: the network's input and the output of each fused group (a conv or linear "
    "layer with its BatchNorm and ReLU, an addition with its ReLU), never inside a group; "
    "pooling keeps its input's grid and the logits stay float. Each range is calibrated on "
    "the dataset's calibration split, never the test split. The Activations tab lists the "
    "edges. Right end: float32, activations not quantized."
)
OBSERVER_HELP = "How the calibration split sets each activation's range:\n\n" + "\n".join(
    f"- **{name}**: {ACT_OBSERVER_HELP[name]}" for name in ACT_OBSERVERS
)
DROP_HELP = (
    "Layer removal: a picked block is skipped, its input passed straight on (the identity), "
    "so its weights are neither run nor stored. Only blocks whose output has their input's "
    "shape are listed. Accuracy usually falls a long way at first; the Fine-tune page can "
    "win much of it back."
)
CODEBOOK_LABELS = {"uniform": "uniform", "kmeans": "k-means"}
CODEBOOK_HELP = (
    "uniform: each weight is rounded to the nearest level of an evenly spaced grid (a scale "
    "and an integer code).\n\n"
    "k-means: the weights of each layer share at most 2^b values, found by clustering the "
    "weights pruning kept (k-means, started evenly over their range). Each weight stores "
    "only which shared value it takes (b bits); the shared values are stored once per "
    "layer as float32 numbers (the codebook, counted in the size). The shared values follow "
    "the weights, so clip, range, rounding and scale mode do not apply; pruned weights stay "
    "exactly zero. This is the weight sharing of Deep Compression (Han et al.)."
)
ENTROPY_LABELS = {"none": "none", "huffman": "Huffman"}
ENTROPY_HELP = (
    "Huffman: codes that occur often get short bit strings and rare ones long, so the file "
    "spends fewer bits on the common values. Applied to the weights' codes and to the "
    "sparse index (the gaps between kept weights), each with its code table stored in the "
    "file (5 bits per symbol) and counted in the size. A layer keeps whichever form is "
    "smaller, so Huffman coding never makes the file larger. The weights do not change, "
    "only how they are written, so accuracy stays the same."
)
ROUNDING_HELP = (
    "nearest: each weight to the nearest level. stochastic: up or down at random, with the "
    "chance of each its nearness (seeded, so results repeat). adaround: up or down as "
    "learnt for each weight on the calibration split, so that each layer's output stays "
    "close to the float one (AdaRound, Nagel et al. 2020); the codes stay on the same grid, "
    "with the same bits per weight and the same file format. It takes about a minute per "
    "model, with a progress bar. Unused at 1 bit."
)
EQUALIZE_HELP = (
    "Cross-layer equalization (Nagel et al. 2019): where two layers have only ReLU or "
    "pooling between them, output channel i of the first is divided by s_i = "
    "sqrt(r1_i·r2_i)/r2_i and input channel i of the second multiplied by it, so their "
    "per-channel weight ranges r1 and r2 match and one per-tensor scale fits every channel. "
    "The float model computes the same function (to float rounding). Pairs across a "
    "residual addition are left alone and listed under the headline."
)
BIAS_CORRECTION_HELP = (
    "Quantizing a layer's weights shifts its mean output by E[(W_q − W)·x]. That shift is "
    "measured on the dataset's calibration split (never the test split), layer by layer, "
    "and subtracted from each bias. Layers without a bias are left as they are."
)
SCALE_MODE_LABELS = {"float": "float", "pow2": "power of two (fixed point)"}
SCALE_MODE_HELP = (
    "Every scale a power of two: a value is round(x·2^p), dequantized by a shift; the file "
    "stores a one-byte exponent. Applies to weights and activations."
)


@dataclass(frozen=True)
class ClipSlider:
    """The clip slider of one clip mode: its range, step, default, number format, and the
    label and help that say what the threshold measures in that mode."""

    lo: float
    hi: float
    step: float
    default: float
    fmt: str
    label: str
    help: str


_ABSOLUTE_HELP = (
    "Clip every weight to [-c, c], in the weights' own units, the same c for every layer. "
    "A c above a layer's largest |w| clips nothing there and widens its grid beyond its "
    "weights, so fewer levels land on them: mnist-cnn's largest |w| is about 0.5, and at "
    "4 bits c = 2.0 leaves it at about 7 % accuracy."
)
# Per clip mode: the slider's step, number format, label and help. Its range and default
# are qcore's (CLIP_RANGES), the same values a link may set.
_CLIP_LOOK: dict[str, tuple[float, str, str, str]] = {
    "ratio": (0.01, "%.2f", "Clip: fraction of max|w|",
              "The quantizer covers this fraction of each tensor's (or channel's) largest "
              "|w|; larger weights are clipped. 1.00 = no clipping."),
    "absolute": (0.005, "%.3f", "Clip to ±c (weight units)", _ABSOLUTE_HELP),
    "sigma": (0.1, "%.1f", "Clip: standard deviations",
              "Clip at c standard deviations of each tensor's (or channel's) weights."),
    "percentile": (0.1, "%.1f", "Clip: percentile of |w|",
                   "Clip at the c-th percentile of |w| in each tensor (or channel): 99.9 "
                   "clips the largest 0.1 % of the weights."),
    "mse": (0.01, "%.2f", "Clip threshold (unused under mse)",
            "Under mse the range with the least squared error is searched for each tensor "
            "(or channel); this slider is not used."),
}  # fmt: skip
CLIP_MODE_LABELS = {  # the clip-mode picker's options, short enough for its column at
    # 800 px ("ratio of max|w|" showed as "ratio of ma"); the slider's label says the unit
    "ratio": "ratio",
    "absolute": "absolute ±c",
    "sigma": "sigma",
    "percentile": "percentile",
    "mse": "mse",
}
CLIP_SLIDERS: dict[str, ClipSlider] = {
    mode: ClipSlider(lo=r.lo, hi=r.hi, step=_CLIP_LOOK[mode][0], default=r.default,
                     fmt=_CLIP_LOOK[mode][1], label=_CLIP_LOOK[mode][2],
                     help=_CLIP_LOOK[mode][3])
    for mode, r in CLIP_RANGES.items()
}  # fmt: skip

PRUNE_HELP = (
    "The share of each layer's weights (or, with scope global, of all compressed weights) "
    "set to exactly zero, smallest |w| first. Structured pruning removes whole output "
    "channels instead, smallest L2 norm first, until that share of the weights is reached; "
    "it never removes a layer's last channel."
)
ONE_BIT_NOTE = (
    "At 1 bit each weight becomes ±α (its sign times the mean |w| of its tensor or "
    "channel): there is no zero point to place and nothing to round, so the range and "
    "rounding choices change nothing."
)
ALL_LAYER_BITS_NOTE = (
    "Per-layer bit widths set every compressed layer, so this slider is off until they "
    "are cleared (Clear per-layer bits, below)."
)

_KEEP = "session"  # widget values survive a visit to another page


def _bits_label(v: int | str) -> str:
    return "float32" if v == FLOAT else f"{v} bit" + ("s" if v != 1 else "")


def _on_clip_mode_change() -> None:
    # each mode measures the threshold in its own units, so start from that mode's default
    st.session_state["clip"] = CLIP_SLIDERS[st.session_state["clip_mode"]].default


def _covers_every_layer(layer_bits: Sequence[tuple[str, int]], layers: Sequence[str]) -> bool:
    """Whether the per-layer bits name every compressed layer (the slider then sets none)."""
    named = {n for n, _ in layer_bits}
    return bool(layers) and all(n in named for n in layers)


@dataclass(frozen=True)
class _Shown:
    """What the current values switch off in the other controls."""

    is_float: bool  # the slider is at float32: nothing is quantized
    one_bit: bool
    shared: bool  # a k-means codebook: no grid, range or rounding to set
    act_float: bool  # activations stay float32
    overridden: bool  # per-layer bits name every compressed layer: the slider sets none


def _shown(ss: Any) -> _Shown:
    is_float = ss["bits"] == FLOAT
    return _Shown(
        is_float=is_float,
        one_bit=ss["bits"] == 1,
        shared=not is_float and ss.get("codebook") == "kmeans",
        act_float=ss.get("abits", FLOAT) == FLOAT,
        overridden=not is_float and _covers_every_layer(ss.get("layer_bits", ()), ss["layers"]),
    )


def compression_ui(layer_names: Sequence[str], blocks: Mapping[str, str] | None = None) -> Settings:
    """Bit widths of weights and activations, clip (with its mode), pruning rate and the
    Advanced options (activation observer and scale mode among them)."""
    ss = st.session_state
    ensure_layers(layer_names)
    shown = _shown(ss)
    _sliders(ss, shown)
    with st.expander("Advanced"):
        a, b, c = st.columns(3, gap="large")
        with a:
            _grid_options(shown)
        with b:
            _pruning_options()
        with c:
            _pipeline_options(ss, shown)
        _layer_options(ss, layer_names, blocks or {})
    return settings_from_session(ss, layer_names)


def _sliders(ss: Any, shown: _Shown) -> None:
    """The three columns above the fold: bit widths, clip, pruning rate."""
    is_float, shared, overridden = shown.is_float, shown.shared, shown.overridden
    c_bits, c_clip, c_prune = st.columns(3, gap="large")
    with c_bits:
        st.select_slider(
            "Bit width",
            options=BITS_OPTIONS,
            key="bits",
            format_func=_bits_label,
            persist_state=_KEEP,
            disabled=overridden,
            help=ALL_LAYER_BITS_NOTE
            if overridden
            else "Bits per stored weight. Right end: float32, no quantization.",
        )
        if overridden:
            st.caption("Off: the per-layer bits below set every layer.")
        st.select_slider(
            "Activations",
            options=ABITS_OPTIONS,
            key="abits",
            format_func=_bits_label,
            persist_state=_KEEP,
            help=ACTIVATIONS_HELP,
        )
    with c_clip:
        st.selectbox(
            "Clip mode",
            list(CLIP_SLIDERS),
            key="clip_mode",
            format_func=CLIP_MODE_LABELS.__getitem__,
            persist_state=_KEEP,
            on_change=_on_clip_mode_change,
            disabled=is_float or shared,
            help="What the clip threshold measures: ratio, a fraction of the largest |w|; "
            "absolute, ±c in weight units; sigma, standard deviations; percentile, a "
            "percentile of |w|; mse searches the range.",
        )
        r = CLIP_SLIDERS[ss["clip_mode"]]
        st.slider(
            r.label,
            min_value=r.lo,
            max_value=r.hi,
            step=r.step,
            key="clip",
            format=r.fmt,
            help=r.help,
            persist_state=_KEEP,
            disabled=ss["clip_mode"] == "mse" or is_float or shared,
        )
    with c_prune:
        st.slider(
            "Pruning rate",
            min_value=0.0,
            max_value=0.99,
            step=0.01,
            key="prune",
            persist_state=_KEEP,
            format="%.2f",
            help=PRUNE_HELP,
        )


def _grid_options(shown: _Shown) -> None:
    """Range, scales, rounding and codebook: how weights meet their grid."""
    is_float, one_bit, shared = shown.is_float, shown.one_bit, shown.shared
    st.radio(
        "Range",
        [True, False],
        key="symmetric",
        horizontal=True,
        persist_state=_KEEP,
        disabled=is_float or one_bit or shared,
        format_func=lambda v: "symmetric" if v else "asymmetric",
        help="Symmetric: zero point 0, codes ±(2^(b-1)-1). Asymmetric: codes 0..2^b-1 "
        "with an integer zero point. Unused at 1 bit.",
    )
    st.radio(
        "Scales",
        [False, True],
        key="per_channel",
        horizontal=True,
        persist_state=_KEEP,
        disabled=is_float or shared,
        format_func=lambda v: "per-channel" if v else "per-tensor",
        help="One scale per tensor, or one per output channel."
        + ("\n\nUnused with a k-means codebook: one codebook per layer." if shared
           else ""),
    )
    st.radio(
        "Rounding",
        list(ROUNDINGS),
        key="rounding",
        horizontal=True,
        persist_state=_KEEP,
        disabled=is_float or one_bit or shared,
        help=ROUNDING_HELP,
    )
    if one_bit and not shared:
        st.caption(ONE_BIT_NOTE)
    st.radio(
        "Codebook",
        list(CODEBOOKS),
        key="codebook",
        horizontal=True,
        persist_state=_KEEP,
        disabled=is_float,
        format_func=CODEBOOK_LABELS.__getitem__,
        help=CODEBOOK_HELP,
    )


def _pruning_options() -> None:
    """Structured pruning, its scope, and entropy coding of the codes."""
    st.toggle(
        "Structured pruning",
        key="structured",
        persist_state=_KEEP,
        help="Remove whole output channels (smallest L2 norm first) until the "
        "pruning rate's share of the weights is reached; never a layer's last "
        "channel.",
    )
    st.radio(
        "Pruning scope",
        ["layer", "global"],
        key="scope",
        horizontal=True,
        persist_state=_KEEP,
        help="layer: the same rate in every layer; global: the rate is a share of "
        "all compressed weights, ranked together, so layers lose different shares.",
    )
    st.radio(
        "Entropy coding",
        list(ENTROPY_CODINGS),
        key="entropy",
        horizontal=True,
        persist_state=_KEEP,
        format_func=ENTROPY_LABELS.__getitem__,
        help=ENTROPY_HELP,
    )


def _pipeline_options(ss: Any, shown: _Shown) -> None:
    """BatchNorm folding, equalization, bias correction and the activation observer."""
    is_float, shared, act_float = shown.is_float, shown.shared, shown.act_float
    st.toggle(
        "Fold BatchNorm",
        key="fold_bn",
        persist_state=_KEEP,
        help="Fold BatchNorm into the preceding layer before compressing (as deployed).",
    )
    st.toggle(
        "Cross-layer equalization",
        key="equalize",
        persist_state=_KEEP,
        disabled=is_float,
        help=EQUALIZE_HELP,
    )
    st.toggle(
        "Bias correction",
        key="bias_correction",
        persist_state=_KEEP,
        disabled=is_float and ss.get("prune", 0.0) == 0,
        help=BIAS_CORRECTION_HELP,
    )
    st.selectbox(
        "Activation observer",
        list(ACT_OBSERVERS),
        key="aobs",
        persist_state=_KEEP,
        disabled=act_float,
        help=OBSERVER_HELP + ("\n\nUnused while activations are float32."
                              if act_float else ""),
    )
    st.radio(
        "Scale mode",
        list(SCALE_MODES),
        key="scale",
        horizontal=True,
        persist_state=_KEEP,
        disabled=(is_float or shared) and act_float,
        format_func=SCALE_MODE_LABELS.__getitem__,
        help=SCALE_MODE_HELP,
    )


def _layer_options(ss: Any, layer_names: Sequence[str], blocks: Mapping[str, str]) -> None:
    """Which layers are compressed, and which blocks leave the network."""
    st.multiselect(
        "Layers to compress",
        list(layer_names),
        key="layers",
        persist_state=_KEEP,
        help="Layers left out stay float32. A layer inside a removed block (below) "
        "leaves the network whether it is listed here or not.",
    )
    # said in a caption, not in the options' labels: a multiselect whose labels change
    # between runs can lose its selection in the browser
    dropped = [b for b in ss.get("drop", []) if b in blocks]
    gone = [n for n in layer_names
            if any(n == b or n.startswith(b + ".") for b in dropped)]  # fmt: skip
    if gone:
        st.caption(f"Removed with their block: {', '.join(gone)}. They leave the network "
                   "whether they are listed above or not.")  # fmt: skip
    _drop_picker(blocks)


def _drop_picker(blocks: Mapping[str, str]) -> None:
    """Layer removal: the blocks whose output has their input's shape, any of which the
    network can skip (its weights then leave the file)."""
    ss = st.session_state
    ss["drop"] = [n for n in ss.get("drop", []) if n in blocks]  # another model's blocks
    if not blocks:
        st.caption("Remove blocks: this model has no block that keeps its input's shape, so "
                   "none can be skipped.")  # fmt: skip
        return
    st.multiselect(
        "Remove blocks (fewer layers)",
        list(blocks),
        key="drop",
        persist_state=_KEEP,
        format_func=lambda n: blocks.get(n, n),
        help=DROP_HELP,
    )


def layer_bits_note(settings: Settings) -> None:
    """Say that per-layer bit widths are active, with a button that clears them."""
    if not settings.layer_bits:
        return
    listed = ", ".join(f"{n} {b}" for n, b in settings.layer_bits)
    if settings.bits is None:
        what = "but the bit-width slider is at float32, so no layer is quantized"
    elif _covers_every_layer(settings.layer_bits, st.session_state["layers"]):
        what = "they set every compressed layer, so the bit-width slider is off"
    else:
        what = "they override the bit-width slider for these layers"
    # the button as wide as its label: a fixed share of the row cut it to "Clear p…"
    row = st.container(horizontal=True, vertical_alignment="center", key="layer_bits_row")
    row.info(
        f"Per-layer bit widths are active ({listed} bits); {what}.",
        icon=":material/stacked_bar_chart:",
    )
    row.button(
        "Clear per-layer bits",
        key="clear_layer_bits",
        on_click=_clear_layer_bits,
        help="Use the bit-width slider for every layer again.",
        width="content",
    )


def settings_notes(settings: Settings) -> None:
    """Say which choice could not be used with another, and what is used instead
    (:meth:`qcore.config.Settings.notes`): the page still shows results."""
    for note in settings.notes():
        st.info(note, icon=":material/info:")


def _clear_layer_bits() -> None:
    st.session_state["layer_bits"] = ()


_ANALYSIS_BITS = list(range(1, 17))
_SWEEP_BITS: list[int | str] = [*_ANALYSIS_BITS, FLOAT]
_PRUNE_RATES = [0.0, 0.1, 0.25, 0.5, 0.75, 0.8, 0.9, 0.95]
_CLIPS = [1.0, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5]


def _bits_chip(v: int | str) -> str:
    """A bit width as a multiselect chip: the number alone (the label says "bits")."""
    return "float32" if v == FLOAT else str(v)


def sweep_grid_ui() -> tuple[SweepParams, bool]:
    """The Trade-offs grid in a form; the params and whether Run was pressed."""
    with st.form("tradeoffs_form", border=True):
        st.multiselect(  # a row of its own: up to 17 widths stay readable
            "Bit widths (bits)",
            _SWEEP_BITS,
            key="to_bits",
            persist_state=_KEEP,
            format_func=_bits_chip,
            help="float32 rows prune only.",
        )
        a, b = st.columns(2, gap="large")
        a.multiselect(
            "Pruning rates",
            _PRUNE_RATES,
            key="to_prune",
            persist_state=_KEEP,
            format_func=lambda v: f"{v:g}",
            help="The share of each layer's weights set to zero, smallest |w| first.",
        )
        b.multiselect(
            "Clip (fraction of max|w|)",
            _CLIPS,
            key="to_clips",
            persist_state=_KEEP,
            format_func=lambda v: f"{v:g}",
            help="1 = no clipping.",
        )
        a, b = st.columns(2, gap="large")
        a.multiselect(
            "Scheme",
            [True, False],
            key="to_symmetric",
            persist_state=_KEEP,
            format_func=lambda v: "symmetric" if v else "asymmetric",
        )
        b.multiselect(
            "Granularity",
            [False, True],
            key="to_per_channel",
            persist_state=_KEEP,
            format_func=lambda v: "per-channel" if v else "per-tensor",
        )
        st.multiselect(
            "Activations (bits)",
            [FLOAT, 8, 6, 4],
            key="to_abits",
            persist_state=_KEEP,
            format_func=_bits_chip,
            help="Activation widths, calibrated min-max on the calibration split. W8A8 rows "
            "can be timed in ONNX Runtime's integer kernels below the chart.",
        )
        a, b, c = st.columns(3, gap="large")
        a.multiselect(
            "Rounding",
            list(ROUNDINGS),
            key="to_rounding",
            persist_state=_KEEP,
            help="adaround learns each layer's rounding on the calibration split: seconds to "
            "minutes per configuration.",
        )
        b.multiselect(
            "Cross-layer equalization",
            [False, True],
            key="to_equalize",
            persist_state=_KEEP,
            format_func=lambda v: "on" if v else "off",
            help=EQUALIZE_HELP,
        )
        c.multiselect(
            "Bias correction",
            [False, True],
            key="to_bias_correction",
            persist_state=_KEEP,
            format_func=lambda v: "on" if v else "off",
            help=BIAS_CORRECTION_HELP,
        )
        run = st.form_submit_button("Run sweep", key="to_run", type="primary")
    ss = st.session_state
    params = SweepParams(
        bits=tuple(None if v == FLOAT else int(v) for v in ss["to_bits"]),
        prune_rates=tuple(float(v) for v in ss["to_prune"]),
        clips=tuple(float(v) for v in ss["to_clips"]),
        symmetric=tuple(bool(v) for v in ss["to_symmetric"]),
        per_channel=tuple(bool(v) for v in ss["to_per_channel"]),
        act_bits=tuple(None if v == FLOAT else int(v) for v in ss.get("to_abits", [FLOAT])),
        rounding=tuple(str(v) for v in ss.get("to_rounding", ["nearest"])),
        equalize=tuple(bool(v) for v in ss.get("to_equalize", [False])),
        bias_correction=tuple(bool(v) for v in ss.get("to_bias_correction", [False])),
    )
    return params, run


def sensitivity_ui() -> tuple[tuple[int, ...], tuple[float, ...], bool, bool]:
    """Bit widths, pruning rates and per-channel scales in a form; and whether Run was pressed."""
    with st.form("sensitivity_form", border=True):
        st.multiselect(  # a row of its own: up to 16 widths stay readable
            "Bit widths (bits)",
            _ANALYSIS_BITS,
            key="sens_bits",
            persist_state=_KEEP,
            format_func=_bits_chip,
        )
        a, b = st.columns([3, 1], gap="large", vertical_alignment="bottom")
        a.multiselect(
            "Pruning rates",
            [r for r in _PRUNE_RATES if r > 0],
            key="sens_prune",
            persist_state=_KEEP,
            format_func=lambda v: f"{v:g}",
        )
        b.toggle("Per-channel scales", key="sens_per_channel", persist_state=_KEEP)
        run = st.form_submit_button("Run analysis", key="sens_run", type="primary")
    ss = st.session_state
    bits = tuple(sorted(int(v) for v in ss["sens_bits"]))
    rates = tuple(sorted(float(v) for v in ss["sens_prune"]))
    return bits, rates, bool(ss["sens_per_channel"]), run


def mixed_candidates_ui() -> tuple[tuple[int, ...], bool]:
    """The candidate bit widths and the scale granularity of the mixed-precision search."""
    a, b = st.columns([3, 1], vertical_alignment="bottom")
    a.multiselect(
        "Candidate bit widths (bits)",
        list(range(1, 9)),
        key="mp_bits",
        persist_state=_KEEP,
        format_func=_bits_chip,
        help="Each layer gets one of these.",
    )
    b.toggle("Per-channel scales", key="mp_per_channel", persist_state=_KEEP)
    ss = st.session_state
    return tuple(sorted(int(v) for v in ss["mp_bits"])), bool(ss["mp_per_channel"])


def budget_ui(lo_kb: float, hi_kb: float) -> float:
    """The size budget slider in kB, kept within [lo_kb, hi_kb]."""
    ss = st.session_state
    value = ss.get("mp_budget_kb")
    if not isinstance(value, float) or not lo_kb <= value <= hi_kb:
        ss["mp_budget_kb"] = round(lo_kb + (hi_kb - lo_kb) / 2, 1)
    return st.slider(
        "Size budget (packed kB)",
        min_value=lo_kb,
        max_value=hi_kb,
        step=0.1,
        format="%.1f kB",
        key="mp_budget_kb",
        persist_state=_KEEP,
        help="From every layer at the lowest candidate bit width to every layer at 8 bits.",
    )


def image_grid(images: Sequence, captions: Sequence[str], per_row: int) -> None:
    """Images in rows of ``per_row`` columns, each with its own caption under it."""
    for start in range(0, len(images), per_row):
        cols = st.columns(per_row)
        shown = range(start, min(start + per_row, len(images)))
        for col, i in zip(cols, shown, strict=False):  # the last row may be short
            col.image(images[i], width="content")
            col.caption(captions[i])


def display_images(
    x: np.ndarray, mean: Sequence[float], std: Sequence[float], *, min_size: int = 84
) -> list[np.ndarray]:
    """Normalised images (K, C, H, W) back to pixels in [0, 1], enlarged for display.

    Grey images become (H', W'), colour ones (H', W', C); each side is repeated (nearest
    neighbour) by a whole factor so that it is at least ``min_size`` pixels, when it is smaller.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"Images must be (K, C, H, W); got shape {x.shape}.")
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    pix = np.clip(x * s + m, 0.0, 1.0)
    factor = max(1, -(-min_size // max(x.shape[2], 1)))
    if factor > 1:
        pix = pix.repeat(factor, axis=2).repeat(factor, axis=3)
    out = pix[:, 0] if pix.shape[1] == 1 else pix.transpose(0, 2, 3, 1)
    return list(out)
