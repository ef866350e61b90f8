"""Layer sensitivity: how much accuracy each layer loses when it alone is quantized or pruned."""

import streamlit as st

import qcore
from pages import cache, controls, figures, jobs, tables
from pages.query import sync_query
from pages.session import last_run
from pages.sidebar import require_model_and_dataset

st.title("Layer sensitivity")
model, data = require_model_and_dataset()
sync_query({})
st.caption(
    "Each layer is quantized (or pruned) on its own while every other layer stays float, and "
    f"the model is evaluated on the {data.name} test split. A large drop means the layer "
    "needs more bits; a small one means it can take fewer. Accuracy is simulated (fake-quant)."
)

bits, rates, per_channel, run = controls.sensitivity_ui()
bits, rates, per_channel = last_run(
    "sensitivity_last", model, data, (bits, rates, per_channel), run=run,
    check=lambda c: cache.check_sensitivity_choice(c[0], c[1]),
    prompt=f"Choose bit widths and pruning rates and press **Run analysis** ({model.name}).",
    stale="The results below are of the last run; press **Run analysis** to apply the above.",
)  # fmt: skip
try:
    df = jobs.run_sensitivity(model, data, bits, rates, per_channel, restart=run)  # a worker
except ValueError as e:
    st.error(str(e))
    st.stop()

st.markdown(f"**{tables.sensitivity_summary(df)}**")
float_accuracy = df.attrs.get("float_accuracy")
if bits:
    scales = "per-channel" if per_channel else "per-tensor"
    st.plotly_chart(
        figures.sensitivity_heatmap(
            qcore.sensitivity_matrix(df, "quant", "drop"),
            title=f"Accuracy drop (points) with one layer quantized ({scales} scales)",
        ),
        key="sensitivity_heatmap",
    )

    @st.fragment
    def sqnr_section() -> None:
        if st.session_state.get("sens_sqnr_bits") not in bits:
            st.session_state["sens_sqnr_bits"] = bits[0]
        picked = st.select_slider(
            "SQNR at bit width", options=list(bits), key="sens_sqnr_bits",
            format_func=lambda b: f"{b} bits",
        )  # fmt: skip
        st.plotly_chart(
            figures.sqnr_bars(df, picked, title=f"Per-layer SQNR at {picked} bits"),
            key="sqnr_chart",
        )

    sqnr_section()
if rates:
    st.plotly_chart(
        figures.prune_curves(
            df,
            float_accuracy=float_accuracy,
            title="Accuracy with one layer pruned (the others untouched)",
        ),
        key="prune_chart",
    )
with st.expander("The table"):
    st.dataframe(df, hide_index=True, key="sensitivity_table")
    st.download_button(
        "Download the table (CSV)",
        data=df.to_csv(index=False),
        file_name=f"{model.name}-{data.name}-sensitivity.csv",
        mime="text/csv",
        on_click="ignore",
        key="download_sensitivity",
        icon=":material/download:",
    )
