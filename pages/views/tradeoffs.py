"""Trade-offs: sweep bit widths, pruning rates, clip and scheme; accuracy against packed size."""

import streamlit as st

import qcore
from pages import cache, controls, figures, jobs
from pages.query import sync_query
from pages.session import last_run, playground_settings
from pages.sidebar import require_model_and_dataset

st.title("Trade-offs")
model, data = require_model_and_dataset()
sync_query({})
st.caption(
    "Accuracy against packed size. Every combination of the values below is compressed and "
    f"evaluated on {data.name}'s test split. Accuracy is simulated (fake-quant); sizes are "
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
    table,
    hide_index=True,
    key="tradeoff_table",
    column_order=["bits", "prune", "clip", "scheme", "granularity", "accuracy", "agreement",
                  "size_bytes", "ratio", "sparsity", "mean_sqnr_db", "pareto"],
    column_config={
        "bits": st.column_config.NumberColumn("bits", help="empty = float32"),
        "accuracy": st.column_config.NumberColumn("accuracy (sim.)", format="percent"),
        "agreement": st.column_config.NumberColumn("agreement", format="percent"),
        "size_bytes": st.column_config.NumberColumn("packed bytes", format="localized"),
        "ratio": st.column_config.NumberColumn("ratio", format="%.1fx"),
        "sparsity": st.column_config.NumberColumn("sparsity", format="percent"),
        "mean_sqnr_db": st.column_config.NumberColumn("mean SQNR (dB)", format="%.1f"),
        "pareto": st.column_config.CheckboxColumn("Pareto"),
    },
)  # fmt: skip
st.download_button(
    "Download the table (CSV)",
    data=table.to_csv(index=False),
    file_name=f"{model.name}-{data.name}-sweep.csv",
    mime="text/csv",
    on_click="ignore",
    key="download_sweep",
    icon=":material/download:",
)
