"""Trade-offs: sweep bit widths, pruning rates, clip and scheme; accuracy against packed size."""

import streamlit as st

import qcore
from pages import cache, controls, figures, jobs, tables
from pages.query import sync_query
from pages.session import last_run, playground_settings
from pages.sidebar import require_model_and_dataset

st.title("Trade-offs")
model, data = require_model_and_dataset()
sync_query({})
st.caption(
    "Accuracy against packed size. Every combination of the values below is compressed and "
    f"evaluated on the {data.name} test split. Accuracy is simulated (fake-quant); sizes are "
    "packed bytes. The dotted line is the Pareto front: no other setting is both smaller "
    "and more accurate."
)

params, run = controls.sweep_grid_ui()
params = last_run(
    "tradeoffs_last", model, data, params, run=run,
    check=lambda p: p.grid(),  # the last good run stays on screen
    prompt=f"Choose the grid and press **Run sweep** ({model.name} on {data.name}).",
    stale="The results below are of the last run; press **Run sweep** for the grid above.",
)  # fmt: skip
try:
    df = jobs.run_sweep(model, data, params, restart=run)  # in a worker process (pages/jobs.py)
except ValueError as e:
    st.error(str(e))
    st.stop()
front = qcore.pareto_front(df)

# the Playground's current setting, as a star (skipped when it is not a valid setting)
layer_names = cache.layer_names(model)
current = None
settings = playground_settings(layer_names)
try:
    settings.to_config()
    with st.spinner("Evaluating the Playground's setting…"):
        r = cache.results(model, data, settings)
    current = {"size_bytes": r.size_bytes, "accuracy": r.accuracy, "label": settings.label()}
except ValueError as e:
    st.caption(f"The Playground's setting is not shown: {e}")

st.plotly_chart(
    figures.tradeoff_figure(
        df, front, current=current, float_accuracy=df.attrs.get("float_accuracy")
    ),
    key="tradeoff_chart",
)
st.caption(
    f"{len(df)} configurations of {model.name} on {data.name}; {len(front)} on the Pareto "
    "front. The star is the Playground's current setting. Hover a point for its setting."
)

table = df.assign(pareto=df.index.isin(front.index))
st.dataframe(
    # the whole model's SQNR, as on the Playground (the per-layer mean is in the CSV only)
    table[list(tables.SWEEP_SHOWN)],
    hide_index=True,
    key="tradeoff_table",
    column_config={
        "bits": st.column_config.NumberColumn("bits", help="empty = float32"),
        "act_bits": st.column_config.NumberColumn("activation bits", help="empty = float32"),
        "accuracy": st.column_config.NumberColumn("accuracy (sim.)", format="percent"),
        "agreement": st.column_config.NumberColumn("agreement", format="percent"),
        "size_bytes": st.column_config.NumberColumn("packed bytes", format="localized"),
        "ratio": st.column_config.NumberColumn("ratio", format="%.1fx"),
        "sparsity": st.column_config.NumberColumn("sparsity", format="percent"),
        "sqnr_db": st.column_config.NumberColumn(
            "SQNR (dB, whole model)", format="%.1f",
            help="10·log10(Σ‖w‖² / Σ‖w − q(w)‖²) over all compressed layers together, as on "
            "the Playground.",
        ),
        "pareto": st.column_config.CheckboxColumn("Pareto"),
        "equalize": st.column_config.CheckboxColumn("equalized"),
        "bias_correction": st.column_config.CheckboxColumn("bias corrected"),
    },
)  # fmt: skip
# --- latency: only rows with a real runtime (W8A8 runs integer kernels in ONNX Runtime) ---
int8_rows = int(((df["bits"] == 8) & (df["act_bits"] == 8)).fillna(False).sum())
st.subheader("Latency")
if not int8_rows:
    st.caption(
        "Latency is measured only for settings a real runtime runs: W8A8 (8-bit weights and "
        "activations) in ONNX Runtime's integer kernels. This sweep has none; add 8 to "
        "**Bit widths** and to **Activations (bits)**. Other rows are simulated only."
    )
else:
    ss = st.session_state
    key = ("to_latency", model, data, params)
    if st.button(f"Measure latency of the {int8_rows} W8A8 row(s)", key="to_latency_run",
                 help="Exports each W8A8 row to ONNX and times it in ONNX Runtime at batch 1."):
        ss["to_latency_last"] = key
    if ss.get("to_latency_last") == key:
        try:
            lat = cache.run_sweep_latency(model, data, params)
        except ValueError as e:
            st.error(str(e))
            st.stop()
        st.plotly_chart(figures.latency_figure(df, lat), key="latency_chart")
        timed = int(lat["runtime"].notna().sum())
        st.caption(
            f"{timed} of {len(df)} rows ran in a real runtime (int8 ONNX Runtime) and are "
            f"drawn at their measured latency; the other {len(df) - timed} have no integer "
            "kernel (weights or activations not at 8 bits) and are left out: their accuracy "
            f"is simulated only. {lat.attrs['threads']} thread(s). {lat.attrs['cpu']}"
        )
        table = table.assign(latency_ms=lat["latency_ms"].round(3), runtime=lat["runtime"])

st.download_button(
    "Download the table (CSV)",
    data=table.to_csv(index=False),
    file_name=f"{model.name}-{data.name}-sweep.csv",
    mime="text/csv",
    on_click="ignore",
    key="download_sweep",
    icon=":material/download:",
)
