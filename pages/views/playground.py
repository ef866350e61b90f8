"""Playground: move bit width, clip and pruning and see accuracy, size and weights change."""

import math
import zlib
from dataclasses import replace

import streamlit as st

from pages import cache, compare, figures, remedies, tables, timing
from pages.controls import (
    CLIP_SLIDERS,
    compression_ui,
    display_images,
    image_grid,
    layer_bits_note,
    settings_notes,
)
from pages.query import sync_query
from pages.session import model_ref, reference_model
from pages.sidebar import require_model_and_dataset
from qcore import teach
from qcore.analysis import ACT_HISTOGRAM_IMAGES
from qcore.config import Settings
from qcore.refs import DatasetRef, ModelRef

WRONG_PER_ROW = 8  # newly wrong images per row, each with its own caption


def _sqnr(v: float) -> str:
    return f"{v:.1f} dB" if math.isfinite(v) else "—"


def _times(ratio: float) -> str:
    return f"{ratio:.1f}x" if ratio >= 1.1 else f"{ratio:.2f}x"


def _against_float(size: int, float_size: int) -> str:
    """The packed size against float32, in words."""
    if size == float_size:
        return "same as float32"
    if size < float_size:
        return f"{_times(float_size / size)} smaller than float32"
    return f"{_times(size / float_size)} larger than float32"


model, data = require_model_and_dataset()
layer_names = cache.layer_names(model)
blocks = cache.removable_blocks(model)
settings = compression_ui(layer_names, blocks)
layer_bits_note(settings)
settings_notes(settings)
if settings.drop:
    st.caption(
        "Removed: " + "; ".join(blocks.get(n, n) for n in settings.drop) + ". Each runs as the "
        "identity (its input passed straight on), and its weights are not stored."
    )
sync_query({**settings.to_flat(), **compare.link_params(model, layer_names, list(blocks))})
settings = settings.canonical()  # unused options must not split the cache

try:
    settings.to_config()
    cache.prepare_compressed(model, settings, data)  # AdaRound: a progress bar per layer
    with st.spinner("Compressing and evaluating…", show_time=True):
        r = cache.results(model, data, settings)
        # pruning can cost more in its sparse index than it saves (see the README): then the
        # size is compared with the same setting unpruned
        unpruned = (
            cache.packed_size(model, replace(settings, prune=0.0).canonical(), data)
            if settings.prune > 0
            else None
        )
except ValueError as e:
    st.error(str(e))
    st.stop()
if compare.view(model, data, settings, r, layer_names, blocks):  # A pinned: A beside B
    st.stop()

# --- headline numbers -------------------------------------------------------------------------
# Cards as wide as their text, wrapping to a second row on a narrow screen: columns of a
# fixed share cut labels and values short ("∞ (un…", "Accuracy (simulat…")
row = st.container(horizontal=True, wrap=True, gap="small", key="headline")
acc, size, sparsity, sqnr, agree = (row.container(width="content") for _ in range(5))
acts_text = (
    "activations float32"
    if settings.abits is None
    else f"activations rounded to {settings.abits}-bit codes on ranges calibrated on the "
    f"calibration split ({settings.aobs})"
)
# a fine-tuned model is compared with the model it came from, not its own float weights
base = reference_model(model.name)
ref_acc = (r.float_accuracy if base is None
           else cache.float_metrics(model_ref(base), data).accuracy)  # fmt: skip
ref_text = tables.reference_text(base, ref_acc, r.float_accuracy)
change = tables.points_delta(r.accuracy, ref_acc, "float" if base is None else base)
wa = settings.wa_label(layer_names)
acc.metric(
    "Accuracy (simulated)",
    f"{r.accuracy:.1%}",
    delta=change.text,
    delta_color=change.color,
    delta_arrow=change.arrow,
    border=True,
    help=f"Top-1 on the {r.n:,} images of the {data.name} test split, weights rounded "
    f"({acts_text}) but run in float arithmetic. {wa}: weights in "
    f"{settings.weight_bits_text(layer_names)}, activations in "
    f"{'32' if settings.abits is None else settings.abits} bits. {ref_text}",
)
acc.caption(f"**{wa}** · simulated")
acc.caption(f"{r.n:,} test images:  \none image is {100 / r.n:.2g} pts")
vs_float = _against_float(r.size_bytes, r.float_size_bytes)
if unpruned is not None and r.size_bytes > unpruned:
    size_delta = f"+{tables.format_bytes(r.size_bytes - unpruned)} vs no pruning"
    size_help = (
        f"Pruning costs bytes here: the mask or index that marks the pruned weights takes "
        f"more than they save (at 1 bit there is no zero code), so this is "
        f"{r.size_bytes - unpruned:,} bytes more than the same setting without pruning "
        f"({unpruned:,} bytes). Against float32 it is {vs_float}."
    )
else:
    size_delta, size_help = vs_float, ""
size.metric(
    "Packed size",
    tables.format_bytes(r.size_bytes),
    delta=size_delta,
    delta_color="inverse" if size_delta.endswith("vs no pruning") else "off",  # red: a cost
    delta_arrow="off",
    border=True,
    help=f"{r.size_bytes:,} bytes of packed export (codes, scales, sparse index, float "
    f"biases) against {r.float_size_bytes:,} bytes as float32. {size_help}".strip(),
)
sparsity.metric(
    "Sparsity",
    f"{r.sparsity:.1%}",
    border=True,
    help="Share of the weights of the compressed layers that are exactly zero: those pruned "
    "(set to zero on purpose, smallest |w| first) plus those that quantization rounded to "
    "zero (small weights nearer to 0 than to the first level).",
)
# the two kinds of zero, each named (a line each keeps the card narrow)
sparsity.caption(f"{r.pruned:.1%} pruned  \n{r.rounded_zero:.1%} rounded to zero")
sqnr.metric(
    "SQNR (whole model)",
    _sqnr(r.sqnr_db),
    border=True,
    help="10·log10(Σ‖w‖² / Σ‖w − q(w)‖²) over all compressed layers together: the total "
    "signal over the total error, so large layers weigh more. The weights of a removed "
    "block count as all error (they are gone). Each layer's own SQNR is in the per-layer "
    "table."
    + (
        " — means no error at all: every weight is the float one (infinite SQNR)."
        if r.sqnr_db == math.inf
        else ""
    ),
)
agree.metric(
    "Agreement",
    f"{r.agreement:.1%}",
    border=True,
    help="Agreement with the float model: the share of test images on which the compressed "
    "model predicts the same class as the float model"
    + (" (this fine-tuned model's own float weights)." if base is not None else "."),
)
st.caption(
    f"{ref_text} Float32 size: {tables.format_bytes(r.float_size_bytes)}. "
    f"Computed in {r.seconds:.2f} s (repeat settings come from the cache)."
)
timing.mark("headline")
remedies.equalization_panel(model, data, settings)
compare.pin_button(model, settings)


if r.clip_note:  # an absolute clip above max|w|: levels that hold no weight
    st.warning(r.clip_note, icon=":material/open_in_full:")


# --- the 2-bit trap: plain ratio clipping at 2 bits can score below 1 bit ---------------------
def _use_mse() -> None:
    st.session_state["clip_mode"] = "mse"
    st.session_state["clip"] = CLIP_SLIDERS["mse"].default


if (
    settings.bits == 2
    and settings.clip_mode == "ratio"
    and settings.clip == 1.0
    and not settings.layer_bits
):
    try:
        one_bit = cache.results(model, data, replace(settings, bits=1).canonical())
        hint = teach.trap_hint(2, "ratio", 1.0, r.accuracy, one_bit.accuracy,
                               symmetric=settings.symmetric)  # fmt: skip
        if hint:
            mse = cache.results(model, data, replace(settings, clip_mode="mse").canonical())
    except ValueError:
        hint = None
    if hint:
        text, button = st.columns([5, 1], vertical_alignment="center")
        text.info(
            f"{hint} Here 2 bits with mse score {mse.accuracy:.1%}.", icon=":material/lightbulb:"
        )
        button.button(
            "Try clip mode mse",
            key="trap_try_mse",
            on_click=_use_mse,
            help="Search the clip range with the least squared error for each tensor.",
        )


# --- one layer up close (its own controls rerun only this part) -------------------------------
def _layer_key(model: ModelRef, names: list[str]) -> str:
    # Keyed by the model and its layer list: a picker whose options change under one key
    # shows the old layer in the browser while the page draws another (issue item 9)
    digest = zlib.crc32(",".join(names).encode())
    return f"hist_layer:{model.name}:{digest:08x}"


def _remember_layer(model: ModelRef, key: str) -> None:
    st.session_state[f"hist_layer_last:{model.name}"] = st.session_state[key]


def _journey_key(model: ModelRef, layer: str) -> str:
    return f"journey_index:{model.name}:{layer}"


def _random_weight(model: ModelRef, data: DatasetRef, settings: Settings, layer: str) -> None:
    ss = st.session_state
    ss["journey_seed"] = ss.get("journey_seed", 0) + 1  # repeatable within a session
    ss[_journey_key(model, layer)] = cache.random_weight_index(
        model, settings, layer, ss["journey_seed"], data
    )


def _largest_weight(model: ModelRef, layer: str) -> None:
    st.session_state.pop(_journey_key(model, layer), None)


def _shared_layer(settings: Settings, layer: str) -> bool:
    """Whether ``layer`` shares its weights through a k-means codebook (compressed, kmeans)."""
    return (settings.codebook == "kmeans" and settings.bits is not None
            and (settings.layers is None or layer in settings.layers))  # fmt: skip


def _pick_weight(model: ModelRef, layer: str, key: str) -> None:
    if st.session_state.get(key) is not None:
        st.session_state[_journey_key(model, layer)] = int(st.session_state[key])


def journey_panel(
    model: ModelRef, data: DatasetRef, settings: Settings, layer: str, n_weights: int = 0
) -> None:
    """One weight of ``layer`` followed from float to code and back, step by step."""
    st.markdown("#### One weight's journey")
    if n_weights:  # a teacher picks the weight: by its flat index, the largest or at random
        pick = f"journey_pick:{model.name}:{layer}"
        st.number_input(
            "Weight index", min_value=0, max_value=n_weights - 1, value=None, step=1,
            key=pick, on_change=_pick_weight, args=(model, layer, pick),
            placeholder=f"0 … {n_weights - 1:,}",
            help=f"Follow the weight at this flat index of {layer} (row-major over its "
            "shape), or use the buttons below.",
        )  # fmt: skip
    index = st.session_state.get(_journey_key(model, layer))  # None: the largest |w|
    a, b = st.columns(2)
    a.button(
        "Largest |w|",
        key="journey_largest",
        on_click=_largest_weight,
        args=(model, layer),
        help="Follow the weight of largest magnitude in this layer.",
        width="stretch",
    )
    b.button(
        "Random weight",
        key="journey_random",
        on_click=_random_weight,
        args=(model, data, settings, layer),
        icon=":material/casino:",
        help="Follow another weight of this layer, picked at random.",
        width="stretch",
    )
    j = cache.weight_journey(model, settings, layer, index, data)
    if j is None and _shared_layer(settings, layer):
        st.info(
            f"{layer} shares its weights through a k-means codebook: each weight is replaced "
            "by the nearest of the layer's shared values and stores only which one, so "
            "there is no scale, zero point or rounding step to follow. The per-layer table "
            "below gives the number of shared values and the bytes of the codebook."
        )
    elif j is None:
        st.info(
            f"{layer} is left in float32: each weight is stored as it is, in 32 bits, so "
            "there is no step, code or rounding error to follow."
        )
    else:
        st.markdown(
            tables.journey_markdown(
                j, largest=index is None, stochastic=settings.rounding == "stochastic"
            )
        )
    activation_journey(model, data, settings, layer)


def activation_journey(model: ModelRef, data: DatasetRef, settings: Settings, layer: str) -> None:
    """The activation side: the largest value reaching ``layer``'s input during calibration,
    through its calibrated range, scale, zero point and code (plain arithmetic)."""
    st.markdown("#### One activation's journey")
    if settings.abits is None:
        st.caption(
            "Activations are float32 now: set **Activations** (beside the bit width) to a "
            "number of bits to follow one of this layer's input values to its code."
        )
        return
    a = cache.activation_info(model, data, settings, layer)
    if a is None:
        st.caption(f"{layer} is not compressed, so its input is not quantized.")
        return
    which = (
        f"the largest value reaching `{a.edge}` on the {a.calib_images:,} calibration "
        "images (float model)"
    )
    st.markdown(tables.act_journey_markdown(a, a.observed_max, which))


def error_curve_panel(model: ModelRef, data: DatasetRef, settings: Settings, layer: str) -> None:
    """The layer's squared error against the clip threshold, split into its two causes."""
    st.markdown("#### Clipping error vs rounding error")
    try:
        curve = cache.clip_error_curve(model, settings, layer, data=data)
    except ValueError as e:  # e.g. every weight of the layer pruned
        st.info(str(e))
        return
    if curve is None and _shared_layer(settings, layer):
        st.info(
            f"{layer} shares its weights through a k-means codebook, which has no clip range: "
            "its shared values are fitted to the weights themselves."
        )
        return
    if curve is None:
        st.info(f"{layer} is left in float32: no clip range, no rounding, no error.")
        return
    log_y = st.toggle("Log scale", key="curve_log")
    st.plotly_chart(
        figures.clip_error_figure(curve, x_title=tables.CLIP_AXIS_TITLE, log_y=log_y),
        key="clip_error_chart",
    )
    st.caption(tables.clip_curve_caption(curve))


def activation_panel(
    model: ModelRef, data: DatasetRef, settings: Settings, layer: str, log_y: bool
) -> None:
    """The values reaching ``layer``'s input and the levels of its activation quantizer."""
    if settings.abits is None:
        st.info(
            "Activations are float32 now, so nothing is calibrated or rounded between the "
            "layers. Set **Activations** (beside the bit width) to, say, 8 bits: each "
            "tensor an int8 engine stores (the input, each fused group's output) is then "
            "calibrated on the calibration split, and this tab draws the values this "
            "layer reads, their range and their levels.",
            icon=":material/info:",
        )
        return
    try:
        h = cache.activation_histogram(model, data, settings, layer)
        a = cache.activation_info(model, data, settings, layer)
    except ValueError as e:
        st.error(str(e))
        return
    if h is None or a is None:
        st.info(f"{layer} reads a value that stays float, so its input is not quantized.")
        return
    st.plotly_chart(
        figures.weight_histogram_figure(
            h,
            log_y=log_y,
            title=f"Input of {layer}: edge {a.edge} ({a.bits}-bit activations, {a.observer})",
            noun="activations",
            names=("before quantizing", "quantized"),
            requested_label="calibrated",
        ),
        key="act_hist_chart",
    )
    st.caption(tables.act_caption(a, min(a.calib_images, ACT_HISTOGRAM_IMAGES)))
    edges = cache.activation_edges(model, data, settings)
    st.caption(tables.edges_caption(edges))


def error_panel(
    model: ModelRef, data: DatasetRef, settings: Settings, layer: str, log_y: bool
) -> None:
    """The error w − q(w) of every kept weight of ``layer``: rounding noise within half a
    step, clipping error in the tails."""
    h = cache.error_histogram(model, settings, layer, data)
    if h is None:
        st.info(f"{layer} shares its weights through a k-means codebook: there is no "
                "rounding step to measure its error against." if _shared_layer(settings, layer)
                else f"{layer} keeps its float32 weights: its error is zero.")  # fmt: skip
        return
    st.plotly_chart(figures.error_histogram_figure(h, log_y=log_y, title=f"w − q(w), {layer}"),
                    key="error_hist_chart")  # fmt: skip
    st.caption(tables.error_caption(h))


def sqnr_bits_panel(model: ModelRef, data: DatasetRef, settings: Settings, layer: str) -> None:
    """``layer``'s SQNR at every bit width beside the 6.02 dB-per-bit rule of thumb."""
    df = cache.sqnr_by_bits(model, settings, layer, data)
    if df is None:
        st.info(f"{layer} shares its weights through a k-means codebook: there is no "
                "uniform grid whose bit width to vary." if _shared_layer(settings, layer)
                else f"{layer} keeps its float32 weights: there is no bit width to vary.")
        return
    now = dict(settings.layer_bits).get(layer, settings.bits)
    st.plotly_chart(figures.sqnr_bits_figure(df, current=now, title=f"SQNR against bits, "
                                             f"{layer}"), key="sqnr_bits_chart")  # fmt: skip
    st.caption(tables.sqnr_bits_caption(df))


@st.fragment
def layer_section(model: ModelRef, data: DatasetRef, settings: Settings, shapes: dict) -> None:
    ss = st.session_state
    st.subheader("One layer up close")
    names = list(shapes)
    key = _layer_key(model, names)
    last = ss.get(f"hist_layer_last:{model.name}")
    if ss.get(key) not in names:
        ss.pop(key, None)
    pick, chan, log = st.columns([2, 1, 1], vertical_alignment="bottom")
    layer = pick.selectbox(
        "Layer",
        names,
        index=names.index(last) if last in names else 0,
        key=key,
        on_change=_remember_layer,
        args=(model, key),
        help="The histogram, the weight's journey and the error curve show this layer.",
    )
    channel = None
    if settings.per_channel and settings.bits is not None:
        ckey = f"hist_channel:{model.name}:{layer}"
        if not 0 <= ss.get(ckey, 0) < shapes[layer][0]:
            ss.pop(ckey, None)
        channel = chan.number_input(
            "Output channel",
            min_value=0,
            max_value=shapes[layer][0] - 1,
            step=1,
            key=ckey,
            help="Per-channel scales: levels and grid range of this channel.",
        )
    log_y = log.toggle("Log scale", key="hist_log")
    # only the open view is computed and sent: a slider move redraws one chart, not six
    weights_tab, acts_tab, error_tab, bits_tab, journey_tab, curve_tab = st.tabs(
        ["Weights", "Activations", "Error w − q(w)", "SQNR against bits",
         "One weight's journey", "Clipping error"],
        key="layer_view", on_change="rerun",
    )
    if weights_tab.open:
        with weights_tab:
            what = "" if channel is None else f", output channel {channel}"
            try:
                fig = cache.weight_histogram_chart(model, settings, layer, channel, data,
                                                   log_y, f"{layer}{what}")  # fmt: skip
            except ValueError as e:
                st.error(str(e))
                return
            st.plotly_chart(fig, key="hist_chart")
    if acts_tab.open:
        with acts_tab:
            activation_panel(model, data, settings, layer, log_y)
    if error_tab.open:
        with error_tab:
            error_panel(model, data, settings, layer, log_y)
    if bits_tab.open:
        with bits_tab:
            sqnr_bits_panel(model, data, settings, layer)
    if journey_tab.open:
        with journey_tab:
            journey_panel(model, data, settings, layer, math.prod(shapes[layer]))
    if curve_tab.open:
        with curve_tab:
            error_curve_panel(model, data, settings, layer)


with timing.phase("layer section"):
    layer_section(model, data, settings, r.shapes)



@st.fragment
def details_section(model: ModelRef, data: DatasetRef, settings: Settings, r) -> None:
    """The per-layer table, the newly wrong images and the confusion matrix: only the open
    tab is computed and sent (switching tabs reruns this part alone)."""
    table_tab, wrong_tab, confusion_tab = st.tabs(
        ["Per-layer table", "Newly wrong images", "Confusion matrix"],
        key="details_view", on_change="rerun",
    )
    if table_tab.open:
        with table_tab:
            shown = cache.layer_table(model, data, settings)
            st.dataframe(
                shown,
                hide_index=True,
                column_order=tables.layer_display_order(shown),
                column_config=tables.LAYER_DISPLAY_COLUMNS,
                key="layer_table",
            )
    if wrong_tab.open:
        with wrong_tab:
            wrong_images(model, data, settings)
    if confusion_tab.open:
        with confusion_tab:
            ds = cache.get_dataset(data)
            diff = st.toggle("Show the change against the float model", key="confusion_diff")
            st.plotly_chart(
                figures.confusion_figure(
                    r.confusion,
                    ds.classes,
                    reference=r.float_confusion if diff else None,
                    title="Compressed model − float model" if diff
                    else "Compressed model (test split)",
                ),
                key="confusion_chart",
            )


def wrong_images(model: ModelRef, data: DatasetRef, settings: Settings) -> None:
    w = cache.newly_wrong(model, data, settings)
    if w.total == 0:
        st.info("No test image that the float model gets right is wrong now.")
        return
    st.caption(
        f"{w.total} test images the float model gets right are wrong now; the first "
        f"{len(w.truth)} are shown, each with its true class, the float model's answer "
        "and the compressed model's."
    )
    ds = cache.get_dataset(data)
    images = display_images(w.images, ds.mean, ds.std)
    captions = [tables.wrong_caption(t, f, n)
                for t, f, n in zip(w.truth, w.float_pred, w.now_pred, strict=True)]  # fmt: skip
    image_grid(images, captions, WRONG_PER_ROW)


with timing.phase("details tabs"):
    details_section(model, data, settings, r)

# --- downloads (built when clicked) ------------------------------------------------------------
def downloads(model: ModelRef, data: DatasetRef, settings: Settings, r) -> None:
    name = f"{model.name}-{settings.slug()}"
    packed_col, json_col = st.columns(2)
    packed_col.download_button(
        "Download the packed model",
        data=cache.packed_download(model, settings, data),
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
        data=lambda: tables.results_json(model.name, data.name, settings, r),
        file_name=f"{name}-results.json",
        mime="application/json",
        on_click="ignore",
        key="download_json",
        icon=":material/data_object:",
    )


with timing.phase("downloads"):
    downloads(model, data, settings, r)
