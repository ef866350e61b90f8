"""Widget groups pages share. Each ``*_ui`` function draws widgets and returns plain values.

Every widget has a key equal to its URL query key; its value is initialised once per
session by :func:`pages.state.init_session`, so no widget here passes a default.
"""

from __future__ import annotations

from collections.abc import Sequence

import streamlit as st

from pages.state import (
    BITS_OPTIONS,
    CLIP_SLIDERS,
    FLOAT,
    Settings,
    ensure_layers,
    settings_from_session,
)

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
