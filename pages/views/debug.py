"""Debug: why the Playground's setting loses accuracy: weights or activations, which layer,
where its error is made and where it piles up, and the model drawn coloured by error."""

from dataclasses import replace

import streamlit as st

from pages import cache, figures
from pages.query import sync_query
from pages.session import open_in_playground, playground_settings
from pages.sidebar import require_model_and_dataset
from qcore.debug import summary_sentence

SQNR_COLOURS = {  # what the graph colours each weight layer by: column, words
    "local": ("sqnr_local_db", "local SQNR"),
    "cumulative": ("sqnr_cumulative_db", "cumulative SQNR"),
    "weights": ("weight_sqnr_db", "weight SQNR"),
}

st.title("Debug a setting")
model, data = require_model_and_dataset()
layer_names = cache.layer_names(model)
settings = playground_settings(layer_names)
sync_query(settings.to_flat())  # a link to this page carries the setting it debugs
st.markdown(
    f"The Playground's setting: **{settings.label()}** ({settings.wa_label()}); change it on "
    f"the Playground. Accuracy is simulated (fake-quant) on {data.name}'s test split, and so "
    "is each layer's output SQNR, 10·log10(Σ y² / Σ (y − y_float)²)."
)
try:
    a = cache.run_analysis(model, data, settings)
except ValueError as e:
    st.error(str(e))
    st.stop()

st.markdown(f"#### {summary_sentence(a.summary)}")
left, right = st.columns(2, gap="large")
left.plotly_chart(
    figures.debug_summary_bars(a.summary, title="Float, weights only, activations only, both"),
    key="debug_summary_chart",
)
right.plotly_chart(
    figures.sqnr_lines(a.layers, title="Each layer's output SQNR: made there vs piled up"),
    key="debug_sqnr_chart",
)
st.caption(
    "Local: only this layer compressed (its weights, and its input's quantizer when "
    "activations are quantized), fed the float model's input; the error it makes itself. "
    "Cumulative: the layer's output in the compressed model against the float model's; "
    "the error that reaches it from every layer before, too."
)

both = a.accuracy("both")
best = a.best_float_layer
if best is None:
    st.info(f"Keeping any one layer in float wins no accuracy here (all set: {both:.1%}).")
else:
    gain = float(a.float_keeping[best])
    kept = a.layers.set_index("layer").loc[best, "accuracy_all_but_this"]
    text, button = st.columns([4, 1], vertical_alignment="center")
    text.success(
        f"Keeping **{best}** in float wins the most: {both:.1%} → {kept:.1%} "
        f"({gain * 100:+.1f} pts), every other layer as set.",
        icon=":material/lightbulb:",
    )
    if button.button("Open in Playground", key="debug_open", icon=":material/open_in_new:",
                     help=f"The Playground's setting with {best} left in float32."):  # fmt: skip
        rest = tuple(n for n in a.layers["layer"] if n != best)
        open_in_playground(replace(settings, layers=rest), layer_names)
        st.switch_page("pages/views/playground.py")

st.subheader("The model, coloured by error")
colour = st.radio(
    "Colour each weight layer by",
    list(SQNR_COLOURS),
    format_func=lambda k: SQNR_COLOURS[k][1],
    horizontal=True,
    key="debug_colour",
)
column, words = SQNR_COLOURS[colour]
sqnr = dict(zip(a.layers["layer"], a.layers[column].astype(float), strict=True))
act_label = "" if settings.abits is None else f"A{settings.abits}"
st.graphviz_chart(
    figures.model_graph_dot(a.outline, sqnr, a.act_edges, act_label=act_label, what=words),
)
st.caption(
    "Traced with torch.fx" + (", BatchNorm folded" if settings.fold_bn else "") + ". "
    "Circles are residual additions; thick purple edges carry fake-quantized activations. "
    "The colour scale is fixed, so two settings can be compared by eye."
)

with st.expander("The table"):
    st.dataframe(a.layers, hide_index=True, key="debug_table")
    st.download_button(
        "Download the table (CSV)",
        data=a.layers.to_csv(index=False),
        file_name=f"{model.name}-{settings.slug()}-debug.csv",
        mime="text/csv",
        on_click="ignore",
        key="download_debug",
        icon=":material/download:",
    )
st.caption(f"Analysed in {a.seconds:.1f} s (the same setting again comes from the cache).")
