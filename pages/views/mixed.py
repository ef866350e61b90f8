"""Mixed precision: a bit width per layer that fits a size budget, against uniform bits."""

import streamlit as st

import qcore
from pages import cache, controls, figures, tables
from pages.query import sync_query
from pages.session import last_run, mixed_settings, open_in_playground
from pages.sidebar import require_model_and_dataset

model, data = require_model_and_dataset()
sync_query({})
layer_names = cache.layer_names(model)
st.subheader("Mixed precision")
st.caption(
    "Sensitive layers get more bits, robust ones fewer, within a packed-size budget. The bits "
    f"are chosen on {data.name}'s calibration split and the results below are measured on "
    "its test split, which the search never sees. Accuracy is simulated (fake-quant)."
)

candidates, per_channel = controls.mixed_candidates_ui()
if not candidates:
    st.error("Pick at least one candidate bit width.")
    st.stop()
try:
    lo_kb, hi_kb = cache.budget_bounds_kb(model, candidates, per_channel)
except ValueError as e:
    st.error(str(e))
    st.stop()
budget_kb = controls.budget_ui(lo_kb, hi_kb)
choice = (round(budget_kb * 1000), candidates, per_channel)  # budget in bytes
run = st.button("Find per-layer bits", key="mp_run", type="primary")
budget_bytes, candidates, per_channel = last_run(
    "mixed_last", model, data, choice, run=run,
    prompt="Set the budget and press **Find per-layer bits**.",
    stale="The results below are of the last run; press **Find per-layer bits** again.",
)  # fmt: skip
try:
    res = cache.run_mixed(model, data, budget_bytes, candidates, per_channel)
    chosen = mixed_settings(res, layer_names)
    with st.spinner("Evaluating on the test split…"):
        r = cache.results(model, data, chosen)  # the Playground's own numbers
    uniform = cache.run_sweep(
        model,
        data,
        cache.SweepParams(bits=candidates, prune_rates=(0.0,), per_channel=(per_channel,)),
    )
except ValueError as e:
    st.error(str(e))
    st.stop()

mixed_col, size_col, uniform_col = st.columns(3)
mixed_col.metric(
    "Accuracy, mixed (simulated)",
    f"{r.accuracy:.1%}",
    delta=f"{(r.accuracy - res.uniform_accuracy) * 100:+.1f} pts vs uniform",
    border=True,
    help=f"Top-1 on the {r.n:,} test images; the float model gets {r.float_accuracy:.1%}.",
)
size_col.metric(
    "Packed size, mixed",
    figures.format_bytes(r.size_bytes),
    delta=f"budget {figures.format_bytes(budget_bytes)}",
    delta_color="off",
    delta_arrow="off",
    border=True,
    help=f"{r.size_bytes:,} bytes; the budget is {budget_bytes:,} bytes.",
)
uniform_col.metric(
    f"Best uniform that fits: {res.uniform_bits} bits",
    f"{res.uniform_accuracy:.1%}",
    delta=f"{figures.format_bytes(res.uniform_size_bytes)} packed",
    delta_color="off",
    delta_arrow="off",
    border=True,
    help="The uniform bit width with the best calibration accuracy within the budget, "
    "measured on the test split.",
)
st.info(res.note)

bars_col, scatter_col = st.columns(2, gap="large")
params = dict(zip(r.layers["layer"], r.layers["params"], strict=True))
bars_col.plotly_chart(
    figures.bits_bars(res.layer_bits, params, title="Bits per layer"), key="bits_chart"
)
scatter_col.plotly_chart(
    figures.tradeoff_figure(
        uniform,
        qcore.pareto_front(uniform),
        extra=[{"size_bytes": r.size_bytes, "accuracy": r.accuracy, "name": "mixed precision",
                "label": chosen.label(), "symbol": "diamond"}],
        color_by="scheme",
        float_accuracy=r.float_accuracy,
        budget_bytes=budget_bytes,
        title="Mixed precision against uniform bit widths",
    ),
    key="mixed_tradeoff_chart",
)  # fmt: skip
st.dataframe(
    r.layers[["layer", "params", "bits", "SQNR (dB)", "packed bytes", "float32 bytes"]],
    hide_index=True,
    column_config=tables.LAYER_TABLE_COLUMNS,
    key="mixed_layers_table",
)
if st.button(
    "Open in Playground",
    key="mp_open",
    icon=":material/open_in_new:",
    help="Show this per-layer configuration on the Playground (it replaces its settings).",
):
    open_in_playground(chosen, layer_names)
    st.switch_page("pages/views/playground.py")
