"""Playground: move bit width, clip and pruning and see accuracy, size and weights change."""

import math

import streamlit as st

from pages import cache, figures, tables
from pages.controls import compression_ui, layer_bits_note
from pages.query import sync_query
from pages.sidebar import require_model_and_dataset
from qcore.config import Settings
from qcore.refs import ModelRef


def _sqnr(v: float) -> str:
    return "∞ (unchanged)" if math.isinf(v) and v > 0 else f"{v:.1f} dB"


model, data = require_model_and_dataset()
layer_names = cache.layer_names(model)
settings = compression_ui(layer_names)
layer_bits_note(settings)
sync_query(settings.to_flat())
settings = settings.canonical()  # unused options must not split the cache

try:
    settings.to_config()
    with st.spinner("Compressing and evaluating…", show_time=True):
        r = cache.results(model, data, settings)
except ValueError as e:
    st.error(str(e))
    st.stop()

# --- headline numbers -------------------------------------------------------------------------
acc, size, sparsity, sqnr, agree = st.columns([1.2, 1.2, 1, 1, 1])
acc.metric(
    "Accuracy (simulated)",
    f"{r.accuracy:.1%}",
    delta=f"{(r.accuracy - r.float_accuracy) * 100:+.1f} pts vs float",
    border=True,
    help=f"Top-1 on the {r.n:,} images of {data.name}'s test split, weights rounded but run "
    f"in float arithmetic. The float model gets {r.float_accuracy:.1%}.",
)
size.metric(
    "Packed size",
    figures.format_bytes(r.size_bytes),
    # light pruning can cost more in its sparse index than it saves (see the README)
    delta=f"{r.ratio:.1f}x smaller" if r.ratio >= 1 else f"{1 / r.ratio:.2f}x larger",
    delta_color="off",
    delta_arrow="off",
    border=True,
    help=f"{r.size_bytes:,} bytes of packed export (codes, scales, sparse index, float "
    f"biases) against {r.float_size_bytes:,} bytes as float32.",
)
sparsity.metric(
    "Sparsity",
    f"{r.sparsity:.1%}",
    border=True,
    help="Share of the weights of the compressed layers that are exactly zero.",
)
sqnr.metric(
    "Mean SQNR",
    _sqnr(r.mean_sqnr_db),
    border=True,
    help="10·log10(‖w‖² / ‖w − q(w)‖²), averaged over the layers that changed.",
)
agree.metric(
    "Agreement",
    f"{r.agreement:.1%}",
    border=True,
    help="Agreement with the float model: the share of test images on which the compressed "
    "model predicts the same class as the float model.",
)
st.caption(
    f"Float model: {r.float_accuracy:.1%} accuracy, "
    f"{figures.format_bytes(r.float_size_bytes)} as float32. "
    f"Computed in {r.seconds:.2f} s (repeat settings come from the cache)."
)


# --- weight histogram (its own controls rerun only this part) ---------------------------------
def _reset_channel() -> None:
    st.session_state["hist_channel"] = 0


@st.fragment
def histogram_section(model: ModelRef, settings: Settings, shapes: dict) -> None:
    st.subheader("Weights of one layer")
    if st.session_state.get("hist_layer") not in shapes:
        st.session_state.pop("hist_layer", None)
    pick, chan, log = st.columns([2, 1, 1], vertical_alignment="bottom")
    layer = pick.selectbox("Layer", list(shapes), key="hist_layer", on_change=_reset_channel)
    channel = None
    if settings.per_channel and settings.bits is not None:
        if st.session_state.get("hist_channel", 0) >= shapes[layer][0]:
            st.session_state["hist_channel"] = 0  # the picked layer has fewer channels
        channel = chan.number_input(
            "Output channel",
            min_value=0,
            max_value=shapes[layer][0] - 1,
            step=1,
            key="hist_channel",
            help="Per-channel scales: levels and clip of this channel.",
        )
    log_y = log.toggle("Log scale", key="hist_log")
    try:
        h = cache.histogram(model, settings, layer, 80, channel)
    except ValueError as e:
        st.error(str(e))
        return
    what = "" if channel is None else f", output channel {channel}"
    st.plotly_chart(
        figures.weight_histogram_figure(h, log_y=log_y, title=f"{layer}{what}"),
        key="hist_chart",
    )


histogram_section(model, settings, r.shapes)

ds = cache.get_dataset(data)

# --- details ----------------------------------------------------------------------------------
table_tab, wrong_tab, confusion_tab = st.tabs(
    ["Per-layer table", "Newly wrong images", "Confusion matrix"]
)
with table_tab:
    st.dataframe(
        r.layers,
        hide_index=True,
        column_config=tables.LAYER_TABLE_COLUMNS,
    )
with wrong_tab:
    w = cache.newly_wrong(model, data, settings)
    if w.total == 0:
        st.info("No test image that the float model gets right is wrong now.")
    else:
        st.caption(
            f"{w.total} test images the float model gets right are wrong now; the first "
            f"{len(w.truth)} are shown."
        )
        st.image(
            figures.display_images(w.images, ds.mean, ds.std),
            caption=[
                f"float: {f} → now: {n}" for f, n in zip(w.float_pred, w.now_pred, strict=True)
            ],
        )
with confusion_tab:
    diff = st.toggle("Show the change against the float model", key="confusion_diff")
    st.plotly_chart(
        figures.confusion_figure(
            r.confusion,
            ds.classes,
            reference=r.float_confusion if diff else None,
            title="Compressed model − float model" if diff else "Compressed model (test split)",
        ),
        key="confusion_chart",
    )

# --- downloads --------------------------------------------------------------------------------
name = f"{model.name}-{settings.slug()}"
packed_col, json_col = st.columns(2)
packed_col.download_button(
    "Download the packed model",
    data=cache.packed_download(model, settings),
    file_name=f"{name}.qpk",
    mime="application/octet-stream",
    on_click="ignore",
    key="download_packed",
    icon=":material/download:",
    help=f"Exactly {r.size_bytes:,} bytes of payload plus a small JSON header; "
    "load it with qcore.load_packed.",
)
json_col.download_button(
    "Download the results (JSON)",
    data=tables.results_json(model.name, data.name, settings, r),
    file_name=f"{name}-results.json",
    mime="application/json",
    on_click="ignore",
    key="download_json",
    icon=":material/data_object:",
)
