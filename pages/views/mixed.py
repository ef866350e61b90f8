"""Mixed precision: a bit width per layer that fits a size budget, against every uniform
width."""

import pandas as pd
import streamlit as st

import qcore
from pages import cache, controls, figures, jobs, tables
from pages.query import sync_query
from pages.session import last_run, mixed_settings, open_in_playground
from pages.sidebar import require_model_and_dataset

st.title("Mixed precision")
model, data = require_model_and_dataset()
sync_query({})
layer_names = cache.layer_names(model)
st.caption(
    "Sensitive layers get more bits, robust ones fewer, within a packed-size budget. The bits "
    f"are chosen on the {data.name} calibration split; the results are measured on its test "
    "split, which the search never sees. Accuracy is simulated (fake-quant)."
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
    # the choice, and every uniform width on the test split for the chart (a worker's job)
    res, uniform = jobs.run_mixed(model, data, budget_bytes, candidates, per_channel,
                                  restart=run)  # fmt: skip
    chosen = mixed_settings(res, layer_names)
    with st.spinner("Evaluating on the test split…"):
        r = cache.results(model, data, chosen)  # the Playground's own numbers
except ValueError as e:
    st.error(str(e))
    st.stop()

# the comparison: every candidate width, the split of each number named; the mixed choice
# is compared with the best uniform width that fits *on the test split*, the chart's axis
test_acc = dict(zip(uniform["bits"].astype(int), uniform["accuracy"], strict=True))
fitting = [u for u in res.uniform if u.fits]
best = max(fitting, key=lambda u: (test_acc[u.bits], -u.size_bytes))
gain = round((r.accuracy - test_acc[best.bits]) * 100, 1)  # points, as shown
mixed_col, size_col, uniform_col = st.columns(3)
mixed_col.metric(
    "Accuracy, mixed (test split)",
    f"{r.accuracy:.1%}",
    delta=f"{gain:+.1f} pts vs uniform {best.bits} bits" if gain else
    f"same as uniform {best.bits} bits",
    delta_color="normal" if gain else "off",
    delta_arrow="auto" if gain else "off",
    border=True,
    help=f"Simulated top-1 on the {r.n:,} test images; the float model gets "
    f"{r.float_accuracy:.1%}. Compared with uniform {best.bits} bits, the most accurate "
    "uniform width within the budget on the test split.",
)
size_col.metric(
    "Packed size, mixed",
    tables.format_bytes(r.size_bytes),
    delta=f"budget {tables.format_bytes(budget_bytes)}",
    delta_color="off",
    delta_arrow="off",
    border=True,
    help=f"{r.size_bytes:,} bytes; the budget is {budget_bytes:,} bytes.",
)
uniform_col.metric(
    f"Best uniform within budget: {best.bits} bits",
    f"{test_acc[best.bits]:.1%}",
    delta=f"{tables.format_bytes(best.size_bytes)} packed",
    delta_color="off",
    delta_arrow="off",
    border=True,
    help="The uniform width that fits the budget with the highest accuracy on the test split "
    "(the smallest one among equals). The table below has every width.",
)
st.info(res.note, icon=":material/info:")

rows = [{"choice": "mixed (this result)", "size_bytes": res.size_bytes, "fits": True,
         "search": res.search_accuracy, "test": r.accuracy}]
rows += [{"choice": f"uniform {u.bits} bits", "size_bytes": u.size_bytes, "fits": u.fits,
          "search": u.search_accuracy, "test": test_acc[u.bits]} for u in res.uniform]
table = pd.DataFrame(rows)
table[["search", "test"]] *= 100  # percent, shown with one decimal like the cards
st.dataframe(
    table,
    hide_index=True,
    key="mixed_uniform_table",
    column_config={
        "choice": st.column_config.TextColumn("bit widths"),
        "size_bytes": st.column_config.NumberColumn("packed bytes", format="localized"),
        "fits": st.column_config.CheckboxColumn(
            "fits the budget", help=f"Packed size at most {budget_bytes:,} bytes."
        ),
        "search": st.column_config.NumberColumn(
            "accuracy, calibration split", format="%.1f %%",
            help="Where the bits are chosen: the search compares these.",
        ),
        "test": st.column_config.NumberColumn(
            "accuracy, test split", format="%.1f %%",
            help="Held out from the search; the cards and the chart show these.",
        ),
    },
)  # fmt: skip

bars_col, scatter_col = st.columns(2, gap="large")
params_per_layer = dict(zip(r.layers["layer"], r.layers["params"], strict=True))
bars_col.plotly_chart(
    figures.bits_bars(res.layer_bits, params_per_layer, title="Bits per layer"), key="bits_chart"
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
        title="Mixed precision against uniform bit widths (test split)",
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
