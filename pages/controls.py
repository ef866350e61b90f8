"""Widget groups pages share. Each ``*_ui`` function draws widgets and returns plain values.

Every Playground widget has a key equal to its URL query key; the analysis pages' widgets
have keys of their own (``pages.session.ANALYSIS_DEFAULTS``). Their values are initialised
once per session by :func:`pages.session.init_session`, so no widget here passes a default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import streamlit as st

from pages.cache import SweepParams
from pages.session import ensure_layers, settings_from_session
from qcore.config import CLIP_RANGES, FLOAT, Settings

BITS_OPTIONS: tuple[int | str, ...] = (*range(1, 17), FLOAT)  # the bit-width slider


@dataclass(frozen=True)
class ClipSlider:
    """The clip slider of one clip mode: its range, step, default and number format."""

    lo: float
    hi: float
    step: float
    default: float
    fmt: str
    help: str


_SIGMA_HELP = "Clip at c standard deviations of each tensor's (or channel's) weights."
_MSE_HELP = "The range with the least squared error is searched; the slider is unused."
# Per clip mode: the slider's step, number format and help. Its range and default are
# qcore's (CLIP_RANGES), the same values a link may set.
_CLIP_LOOK: dict[str, tuple[float, str, str]] = {
    "ratio": (0.01, "%.2f", "Fraction of the largest |w| the quantizer covers; 1.0 = no clipping."),
    "absolute": (0.005, "%.3f", "Clip weights to [-c, c] in weight units."),
    "sigma": (0.1, "%.1f", _SIGMA_HELP),
    "percentile": (0.1, "%.1f", "Clip at the c-th percentile of |w|."),
    "mse": (0.01, "%.2f", _MSE_HELP),
}
CLIP_SLIDERS: dict[str, ClipSlider] = {
    mode: ClipSlider(lo=r.lo, hi=r.hi, step=_CLIP_LOOK[mode][0], default=r.default,
                     fmt=_CLIP_LOOK[mode][1], help=_CLIP_LOOK[mode][2])
    for mode, r in CLIP_RANGES.items()
}  # fmt: skip

_KEEP = "session"  # widget values survive a visit to another page


def _bits_label(v: int | str) -> str:
    return "float32" if v == FLOAT else f"{v} bit" + ("s" if v != 1 else "")


def _on_clip_mode_change() -> None:
    # each mode measures the threshold in its own units, so start from that mode's default
    st.session_state["clip"] = CLIP_SLIDERS[st.session_state["clip_mode"]].default


def compression_ui(layer_names: Sequence[str]) -> Settings:
    """Bit width, clip (with its mode), pruning rate and the Advanced options."""
    ss = st.session_state
    ensure_layers(layer_names)
    c_bits, c_clip, c_prune = st.columns(3, gap="large")
    with c_bits:
        st.select_slider(
            "Bit width",
            options=BITS_OPTIONS,
            key="bits",
            format_func=_bits_label,
            persist_state=_KEEP,
            help="Bits per stored weight. Right end: float32, no quantization.",
        )
    with c_clip:
        mode_col, slider_col = st.columns([1, 2])
        with mode_col:
            st.selectbox(
                "Clip mode",
                list(CLIP_SLIDERS),
                key="clip_mode",
                persist_state=_KEEP,
                on_change=_on_clip_mode_change,
                disabled=ss["bits"] == FLOAT,
                help="How the clip threshold is measured.",
            )
        r = CLIP_SLIDERS[ss["clip_mode"]]
        with slider_col:
            st.slider(
                "Clip threshold",
                min_value=r.lo,
                max_value=r.hi,
                step=r.step,
                key="clip",
                format=r.fmt,
                help=r.help,
                persist_state=_KEEP,
                disabled=ss["clip_mode"] == "mse" or ss["bits"] == FLOAT,
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
            help="Fraction of weights set to exactly zero, smallest |w| first.",
        )

    with st.expander("Advanced"):
        a, b, c = st.columns(3, gap="large")
        with a:
            st.radio(
                "Range",
                [True, False],
                key="symmetric",
                horizontal=True,
                persist_state=_KEEP,
                format_func=lambda v: "symmetric" if v else "asymmetric",
                help="Symmetric: zero point 0, codes ±(2^(b-1)-1). Asymmetric: codes 0..2^b-1 "
                "with an integer zero point.",
            )
            st.radio(
                "Scales",
                [False, True],
                key="per_channel",
                horizontal=True,
                persist_state=_KEEP,
                format_func=lambda v: "per-channel" if v else "per-tensor",
                help="One scale per tensor, or one per output channel.",
            )
            st.radio(
                "Rounding",
                ["nearest", "stochastic"],
                key="rounding",
                horizontal=True,
                persist_state=_KEEP,
                help="Stochastic rounding is seeded, so results repeat.",
            )
        with b:
            st.toggle(
                "Structured pruning",
                key="structured",
                persist_state=_KEEP,
                help="Remove whole output channels (smallest L2 norm) instead of single weights.",
            )
            st.radio(
                "Pruning scope",
                ["layer", "global"],
                key="scope",
                horizontal=True,
                persist_state=_KEEP,
                help="layer: the same rate in every layer; global: rank all weights together.",
            )
            st.toggle(
                "Fold BatchNorm",
                key="fold_bn",
                persist_state=_KEEP,
                help="Fold BatchNorm into the preceding layer before compressing (as deployed).",
            )
        with c:
            st.multiselect(
                "Layers to compress",
                list(layer_names),
                key="layers",
                persist_state=_KEEP,
                help="Layers left out stay float32.",
            )
    return settings_from_session(ss, layer_names)


def layer_bits_note(settings: Settings) -> None:
    """Say that per-layer bit widths are active, with a button that clears them."""
    if not settings.layer_bits:
        return
    listed = ", ".join(f"{n} {b}" for n, b in settings.layer_bits)
    if settings.bits is None:
        what = "but the bit-width slider is at float32, so no layer is quantized"
    else:
        what = "they override the bit-width slider for these layers"
    text, button = st.columns([5, 1], vertical_alignment="center")
    text.info(f"Per-layer bit widths are active ({listed} bits); {what}.", icon="🧮")
    button.button(
        "Clear per-layer bits",
        key="clear_layer_bits",
        on_click=_clear_layer_bits,
        help="Use the bit-width slider for every layer again.",
    )


def _clear_layer_bits() -> None:
    st.session_state["layer_bits"] = ()


_ANALYSIS_BITS = list(range(1, 17))
_SWEEP_BITS: list[int | str] = [*_ANALYSIS_BITS, FLOAT]
_PRUNE_RATES = [0.0, 0.1, 0.25, 0.5, 0.75, 0.8, 0.9, 0.95]
_CLIPS = [1.0, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5]


def sweep_grid_ui() -> tuple[SweepParams, bool]:
    """The Trade-offs grid in a form; the params and whether Run was pressed."""
    with st.form("tradeoffs_form", border=True):
        a, b, c = st.columns(3, gap="large")
        a.multiselect(
            "Bit widths",
            _SWEEP_BITS,
            key="to_bits",
            persist_state=_KEEP,
            format_func=_bits_label,
            help="float32 rows prune only.",
        )
        a.multiselect(
            "Pruning rates",
            _PRUNE_RATES,
            key="to_prune",
            persist_state=_KEEP,
            format_func=lambda v: f"{v:g}",
            help="Fraction of each layer's weights set to zero, smallest |w| first.",
        )
        b.multiselect(
            "Clip (ratio of max|w|)",
            _CLIPS,
            key="to_clips",
            persist_state=_KEEP,
            format_func=lambda v: f"{v:g}",
            help="1 = no clipping.",
        )
        c.multiselect(
            "Scheme",
            [True, False],
            key="to_symmetric",
            persist_state=_KEEP,
            format_func=lambda v: "symmetric" if v else "asymmetric",
        )
        c.multiselect(
            "Granularity",
            [False, True],
            key="to_per_channel",
            persist_state=_KEEP,
            format_func=lambda v: "per-channel" if v else "per-tensor",
        )
        run = st.form_submit_button("Run sweep", key="to_run", type="primary")
    ss = st.session_state
    params = SweepParams(
        bits=tuple(None if v == FLOAT else int(v) for v in ss["to_bits"]),
        prune_rates=tuple(float(v) for v in ss["to_prune"]),
        clips=tuple(float(v) for v in ss["to_clips"]),
        symmetric=tuple(bool(v) for v in ss["to_symmetric"]),
        per_channel=tuple(bool(v) for v in ss["to_per_channel"]),
    )
    return params, run


def sensitivity_ui() -> tuple[tuple[int, ...], tuple[float, ...], bool, bool]:
    """Bit widths, pruning rates and per-channel scales in a form; and whether Run was pressed."""
    with st.form("sensitivity_form", border=True):
        a, b, c = st.columns([3, 3, 2], gap="large", vertical_alignment="bottom")
        a.multiselect(
            "Bit widths",
            _ANALYSIS_BITS,
            key="sens_bits",
            persist_state=_KEEP,
            format_func=_bits_label,
        )
        b.multiselect(
            "Pruning rates",
            [r for r in _PRUNE_RATES if r > 0],
            key="sens_prune",
            persist_state=_KEEP,
            format_func=lambda v: f"{v:g}",
        )
        c.toggle("Per-channel scales", key="sens_per_channel", persist_state=_KEEP)
        run = st.form_submit_button("Run analysis", key="sens_run", type="primary")
    ss = st.session_state
    bits = tuple(sorted(int(v) for v in ss["sens_bits"]))
    rates = tuple(sorted(float(v) for v in ss["sens_prune"]))
    return bits, rates, bool(ss["sens_per_channel"]), run


def mixed_candidates_ui() -> tuple[tuple[int, ...], bool]:
    """The candidate bit widths and the scale granularity of the mixed-precision search."""
    a, b = st.columns([3, 1], vertical_alignment="bottom")
    a.multiselect(
        "Candidate bit widths",
        list(range(1, 9)),
        key="mp_bits",
        persist_state=_KEEP,
        format_func=_bits_label,
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
