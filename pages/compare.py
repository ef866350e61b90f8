"""Compare two settings on the Playground: *Compare* pins the current setting as A, and
the page then shows A beside the live setting B (the sliders): every headline number with
its delta, both weight histograms of one layer overlaid, and the test images on which A
and B disagree. The link carries A (``a=`` its flat settings, URL-encoded), so a shared
link opens the same comparison. A presentation layout: sidebar collapsed, larger numbers.

The Playground calls :func:`link_params`, :func:`view` and :func:`pin_button`; the rest
stays here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from urllib.parse import parse_qsl, urlencode

import streamlit as st

from pages import cache, figures, tables
from pages.controls import display_images, image_grid
from pages.query import COMPARE_KEY
from pages.tables import Result
from qcore.config import Settings
from qcore.refs import DatasetRef, ModelRef

PINNED = "compare_a"  # session: (model name, Settings) of the pinned A
LINK = "compare_a_link"  # session: the raw ``a=`` of the link the session opened with
ENDED = "compare_ended"  # session: set by Stop comparing, so the sidebar comes back once
MAX_LINK_FIELDS = 40  # an ``a=`` with more fields than this is refused
SHOWN_IMAGES = 16
IMAGES_PER_ROW = 8
# larger numbers for a presentation, inside the compare view only
STYLE = """<style>
.st-key-compare_view [data-testid="stMetricValue"] { font-size: 3rem; line-height: 1.1; }
.st-key-compare_view [data-testid="stMetricLabel"] p { font-size: 1.1rem; }
.st-key-compare_view [data-testid="stMetricDelta"] { font-size: 1.15rem; }
</style>"""


def encode(settings: Settings) -> str:
    """A setting as the value of ``a=``: its flat settings, URL-encoded.

    >>> encode(Settings(bits=3, abits=4))
    'bits=3&clip=1&clip_mode=ratio&prune=0&abits=4'
    """
    return urlencode(settings.to_flat())


def decode(
    text: str, layer_names: Sequence[str], *, model: str, blocks: Sequence[str] | None = None
) -> tuple[Settings, list[str]]:
    """The setting an ``a=`` value holds and a warning sentence for each bad part of it
    (which keeps its default), as a link's own settings are read."""
    try:
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_LINK_FIELDS)
    except ValueError:
        return Settings(), [f"The link's setting A has more than {MAX_LINK_FIELDS} parts; "
                            "it was ignored."]  # fmt: skip
    return Settings.from_flat(dict(pairs), layer_names, model=model, source="pinned setting A",
                              blocks=blocks)  # fmt: skip


def pinned(model: ModelRef, layer_names: Sequence[str], blocks: Sequence[str]) -> Settings | None:
    """The pinned setting A of this model (from the link the session opened with, once);
    None when nothing is pinned. A pin of another model is let go."""
    ss = st.session_state
    raw = ss.pop(LINK, None)
    if raw is not None:
        a, warnings = decode(raw, layer_names, model=model.name, blocks=blocks)
        for w in warnings:
            st.warning(w, icon=":material/link_off:")
        try:
            a.to_config()
            ss[PINNED] = (model.name, a.canonical())
        except ValueError as e:
            st.warning(f"The link's setting A cannot be compared: {e}", icon=":material/link_off:")
    held = ss.get(PINNED)
    if held is None or held[0] != model.name:
        ss.pop(PINNED, None)
        return None
    return held[1]


def link_params(model: ModelRef, layer_names: Sequence[str], blocks: Sequence[str]
                ) -> dict[str, str]:  # fmt: skip
    """``{"a": ...}`` for the URL while a setting is pinned, else nothing."""
    a = pinned(model, layer_names, blocks)
    return {} if a is None else {COMPARE_KEY: encode(a)}


def _pin(model: str, settings: Settings) -> None:
    st.session_state[PINNED] = (model, settings)


def _unpin() -> None:
    st.session_state.pop(PINNED, None)
    st.session_state[ENDED] = True


def pin_button(model: ModelRef, settings: Settings) -> None:
    """The *Compare* button: pins ``settings`` as A."""
    st.button(
        "Compare",
        key="compare_pin",
        icon=":material/compare:",
        on_click=_pin,
        args=(model.name, settings),
        help="Pin this setting as A, then move the sliders: A and the live setting B are "
        "shown side by side, and the link carries both.",
    )


def _sqnr(v: float) -> str:
    return f"{v:.1f} dB" if math.isfinite(v) else "∞ (no error)"


def _signed_bytes(n: int) -> str:
    # an ASCII sign: st.metric colours a delta by its leading "-"
    return ("+" if n > 0 else "-" if n < 0 else "±") + tables.format_bytes(abs(n))


def headline(r: Result, a: Result | None) -> list[tuple[str, str, str | None, str]]:
    """(label, value, delta against A or None, delta colour) of each headline number."""

    def pts(x: float, y: float) -> str:
        return f"{(x - y) * 100:+.1f} pts vs A"

    def db(x: float, y: float) -> str | None:
        if math.isfinite(x) and math.isfinite(y):
            return f"{x - y:+.1f} dB vs A"
        return "same as A" if x == y else ("∞ vs A" if x == math.inf else "finite vs A")

    rows = [
        ("Accuracy (simulated)", f"{r.accuracy:.1%}",
         None if a is None else pts(r.accuracy, a.accuracy), "normal"),
        ("Packed size", tables.format_bytes(r.size_bytes),
         None if a is None else f"{_signed_bytes(r.size_bytes - a.size_bytes)} vs A", "inverse"),
        ("Sparsity", f"{r.sparsity:.1%}", None if a is None else pts(r.sparsity, a.sparsity),
         "off"),
        ("SQNR (whole model)", _sqnr(r.sqnr_db), None if a is None else db(r.sqnr_db, a.sqnr_db),
         "normal"),
        ("Agreement with float", f"{r.agreement:.1%}",
         None if a is None else pts(r.agreement, a.agreement), "normal"),
    ]  # fmt: skip
    return rows


def _numbers(a: Settings, ra: Result, b: Settings, rb: Result) -> None:
    """A's and B's headline numbers, one row per number (so each pair lines up), B's with
    its delta against A."""
    left, right = st.columns(2, gap="large")
    for col, title, s in ((left, "A (pinned)", a), (right, "B (live)", b)):
        col.markdown(f"### {title} · {s.wa_label()}")
        col.caption(s.label())
    for (label, va, _, _), (_, vb, delta, color) in zip(headline(ra, None), headline(rb, ra),
                                                         strict=True):  # fmt: skip
        ca, cb = st.columns(2, gap="large")
        ca.metric(label, va, border=True, height="stretch")
        cb.metric(label, vb, delta=delta, delta_color=color, border=True, height="stretch")


def view(
    model: ModelRef,
    data: DatasetRef,
    b: Settings,
    rb: Result,
    layer_names: Sequence[str],
    blocks: Mapping[str, str],
) -> bool:
    """A beside the live setting B, when a setting is pinned; False (nothing drawn) if not."""
    a = pinned(model, layer_names, list(blocks))
    if a is None:
        if st.session_state.pop(ENDED, False):
            st.set_page_config(initial_sidebar_state="expanded")
        return False
    st.set_page_config(initial_sidebar_state="collapsed")
    st.html(STYLE)
    try:
        ra = cache.results(model, data, a)
    except ValueError as e:
        st.error(f"Setting A cannot be computed: {e}")
        st.button("Stop comparing", key="compare_unpin", on_click=_unpin)
        return True
    with st.container(key="compare_view"):
        head, stop = st.columns([5, 1], vertical_alignment="center")
        head.markdown(
            f"**A** is pinned; **B** follows the sliders above. Accuracy simulated on the "
            f"{rb.n:,} images of {data.name}'s test split (one image is {100 / rb.n:.2g} pts)."
        )
        stop.button("Stop comparing", key="compare_unpin", on_click=_unpin,
                    icon=":material/close:", width="stretch")  # fmt: skip
        _numbers(a, ra, b, rb)
    _histograms(model, data, a, b, ra, rb, layer_names)
    _disagreeing(model, data, a, b, rb.n)
    return True


def _histograms(model: ModelRef, data: DatasetRef, a: Settings, b: Settings, ra: Result,
                rb: Result, layer_names: Sequence[str]) -> None:  # fmt: skip
    st.subheader("Weights of one layer, A and B")
    both = [n for n in layer_names if n in ra.shapes and n in rb.shapes]
    if not both:
        st.info("A and B compress no layer in common, so there is no histogram to overlay.")
        return
    if st.session_state.get("compare_layer") not in both:
        st.session_state.pop("compare_layer", None)
    pick, log = st.columns([3, 1], vertical_alignment="bottom")
    layer = pick.selectbox("Layer", both, key="compare_layer")
    log_y = log.toggle("Log scale", key="compare_log")
    try:
        ha = cache.histogram(model, a, layer, 80, None, data)
        hb = cache.histogram(model, b, layer, 80, None, data)
    except ValueError as e:
        st.error(str(e))
        return
    st.plotly_chart(
        figures.compare_histograms(ha, hb, names=(f"A: {a.wa_label()}", f"B: {b.wa_label()}"),
                                   title=f"{layer}: compressed weights of A and B",
                                   log_y=log_y),
        key="compare_hist_chart",
    )  # fmt: skip


def _disagreeing(model: ModelRef, data: DatasetRef, a: Settings, b: Settings, n: int) -> None:
    st.subheader("Test images where A and B disagree")
    d = cache.disagreements(model, data, a, b, SHOWN_IMAGES)
    if d.total == 0:
        st.info(f"A and B predict the same class on all {n:,} test images.")
        return
    st.caption(
        f"A and B predict different classes on {d.total:,} of {n:,} test images; the first "
        f"{len(d.truth)} are shown with the true class and each setting's answer."
    )
    ds = cache.get_dataset(data)
    images = display_images(d.images, ds.mean, ds.std)
    captions = [f"true {t}  \nA {a} · B {b}" for t, a, b in zip(d.truth, d.a_pred, d.b_pred,
                                                                   strict=True)]  # fmt: skip
    image_grid(images, captions, IMAGES_PER_ROW)
