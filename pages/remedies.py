"""The Playground's view of the post-training remedies (qcore.ptq): which layer pairs
cross-layer equalization rescaled, with each channel's weight range before and after."""

from __future__ import annotations

import streamlit as st

from pages import cache, figures
from qcore.config import Settings
from qcore.refs import DatasetRef, ModelRef


def equalization_panel(model: ModelRef, data: DatasetRef, settings: Settings) -> None:
    """AIMET's picture for one equalized layer, the pairs equalized and those left alone."""
    if not settings.equalize or settings.bits is None:
        return
    info = cache.equalization_ranges(model, settings, data)
    pairs, skipped = info["pairs"], info["skipped"]
    with st.expander(f"Cross-layer equalization: {len(pairs)} pair"
                     f"{'' if len(pairs) == 1 else 's'} of layers rescaled"):  # fmt: skip
        if info["layers"]:
            names = list(info["layers"])
            layer = st.selectbox(
                "Layer", names, key=f"eq_layer:{model.name}",
                help="Each bar is one output channel's weights, from the smallest to the "
                "largest. Equal bars share one per-tensor grid well.",
            )  # fmt: skip
            st.plotly_chart(figures.channel_ranges_figure(info["layers"][layer], layer),
                            key="eq_chart")  # fmt: skip
            st.caption("Equalized pairs: " + ", ".join(f"{a} → {b}" for a, b in pairs)
                       + ". The float model computes the same function: only the spread of "
                       "ranges over the channels changed.")  # fmt: skip
        else:
            st.info("No two consecutive layers of this model can be equalized.")
        if skipped:
            st.markdown("**Left alone:**\n" + "\n".join(
                f"- {a} → {b}: {why}" for a, b, why in skipped))  # fmt: skip
