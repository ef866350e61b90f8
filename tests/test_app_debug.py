"""The Debug page and the Playground's compare mode through AppTest (digits-mlp: quick)."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

import numpy as np
from streamlit.testing.v1 import AppTest
from test_app import APP, needs_sample, ok
from test_playground import _array

import qcore
from pages import compare
from qcore.config import Settings
from qcore.debug import analyze, summary_sentence

MODEL, DATA = "digits-mlp", "digits"


def open_page(page: str | None = None, **query: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=240)
    at.query_params.update({"model": MODEL, **query})
    at.run()
    if page is not None:
        at.switch_page(page).run()
    return at


def scored(s: Settings) -> qcore.Metrics:
    """The test-split metrics of a setting, computed here without the app."""
    model = qcore.load_model(MODEL)
    calib = None if s.abits is None else qcore.load_dataset(DATA, "calib")
    c = qcore.compress(model, s.canonical().to_config(), calib=calib)
    return qcore.evaluate(c.model, qcore.load_dataset(DATA))


def metrics(at: AppTest) -> list[tuple[str, str, str]]:
    return [(m.label, m.value, m.delta) for m in at.metric]


@needs_sample
def test_debug_page_analyses_the_playgrounds_setting() -> None:
    at = open_page("pages/views/debug.py", bits="3", abits="4")
    ok(at, "Debug a setting")
    s = Settings(bits=3, abits=4)
    a = analyze(qcore.load_model(MODEL), s.to_config(), qcore.load_dataset(DATA),
                calib=qcore.load_dataset(DATA, "calib"))  # fmt: skip
    texts = [m.value for m in at.markdown]
    assert f"#### {summary_sentence(a.summary)}" in texts
    assert any(t.startswith(f"The Playground's setting: **{s.label()}** (W3A4)") for t in texts)
    figs = {json.loads(c.proto.spec)["layout"]["title"]["text"]: json.loads(c.proto.spec)
            for c in at.get("plotly_chart")}  # fmt: skip
    bars = figs["Float, weights only, activations only, both"]["data"][0]
    assert bars["x"] == ["float", "weights only", "activations only", "both"]
    assert np.allclose(_array(bars["y"]), 100 * a.summary["accuracy"].to_numpy())
    lines = figs["Each layer's output SQNR: made there vs piled up"]["data"]
    assert np.allclose(_array(lines[0]["y"]), a.layers["sqnr_local_db"])
    assert np.allclose(_array(lines[1]["y"]), a.layers["sqnr_cumulative_db"])
    dot = at.get("graphviz_chart")[0].proto.spec
    for layer in ("fc1", "fc2"):
        assert f'label="{layer}\\n' in dot
    assert "activations A4" in dot
    best = a.best_float_layer
    assert best is not None
    kept = a.layers.set_index("layer").loc[best, "accuracy_all_but_this"]
    assert [m.value for m in at.success] == [
        f"Keeping **{best}** in float wins the most: {a.accuracy('both'):.1%} → {kept:.1%} "
        f"({a.float_keeping[best] * 100:+.1f} pts), every other layer as set."
    ]
    assert at.query_params["bits"] == "3" and at.query_params["abits"] == "4"

    # the graph coloured by another SQNR names the same layers, with those values
    at.radio(key="debug_colour").set_value("cumulative").run()
    dot = at.get("graphviz_chart")[0].proto.spec
    for _, row in a.layers.iterrows():
        assert f"cumulative SQNR {row['sqnr_cumulative_db']:.1f} dB" in dot

    # the button opens the setting with that layer in float, whose accuracy is the row's
    at.button(key="debug_open").click().run()
    ok(at)
    assert at.session_state["layers"] == [n for n in a.layers["layer"] if n != best]
    assert [m.value for m in at.metric][0] == f"{kept:.1%}"


@needs_sample
def test_debug_page_shows_a_bad_setting_as_a_sentence() -> None:
    at = open_page()
    at.session_state["layers"] = []  # no layer picked on the Playground
    at.switch_page("pages/views/debug.py").run()
    assert not at.exception
    assert [e.value for e in at.error] == [
        "Pick at least one layer to compress (Advanced → Layers)."]
    assert not at.get("graphviz_chart")


@needs_sample
def test_compare_pins_a_and_shows_it_beside_the_live_setting() -> None:
    at = open_page(bits="3")
    ok(at)
    assert len(at.metric) == 5  # no comparison yet
    at.button(key="compare_pin").click().run()
    at.select_slider(key="bits").set_value(2).run()
    assert not at.exception and not at.error
    a, b = Settings(bits=3), Settings(bits=2)
    ma, mb = scored(a), scored(b)
    shown = metrics(at)
    labels = ["Accuracy (simulated)", "Packed size", "Sparsity", "SQNR (whole model)",
              "Agreement with float"]  # fmt: skip
    assert [m[0] for m in shown] == [x for label in labels for x in (label, label)]  # A, B
    assert shown[0][1:] == (f"{ma.accuracy:.1%}", "")
    assert shown[1][1:] == (f"{mb.accuracy:.1%}",
                            f"{(mb.accuracy - ma.accuracy) * 100:+.1f} pts vs A")  # fmt: skip
    assert all(d.endswith("vs A") for _, _, d in shown[1::2])  # every number with its delta
    assert all(d == "" for _, _, d in shown[::2])
    assert [c.value for c in at.caption][:2] == [a.label(), b.label()]
    # the link carries A
    assert dict(parse_qsl(at.query_params["a"])) == a.to_flat()
    assert at.query_params["bits"] == "2"
    # the weights of one layer, A's and B's, overlaid
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert [d["name"] for d in fig["data"]] == ["float weights", "A: W3A32", "B: W2A32"]
    # the images where they disagree, counted from the two predictions
    total = int((ma.predictions != mb.predictions).sum())
    n = len(ma.predictions)
    assert f"A and B predict different classes on {total:,} of {n:,} test images" in (
        " ".join(c.value for c in at.caption))
    assert len(at.get("image")) == min(total, compare.SHOWN_IMAGES)

    at.button(key="compare_unpin").click().run()
    ok(at)
    assert len(at.metric) == 5 and "a" not in at.query_params


@needs_sample
def test_a_link_with_a_opens_the_comparison() -> None:
    a = Settings(bits=4, prune=0.5)
    at = open_page(bits="2", a=compare.encode(a))
    assert not at.exception and not at.error and not at.warning
    shown = metrics(at)
    assert len(shown) == 10
    assert shown[0][1] == f"{scored(a).accuracy:.1%}"
    assert shown[1][1] == f"{scored(Settings(bits=2)).accuracy:.1%}"
    assert at.session_state["compare_a"] == (MODEL, a.canonical())


@needs_sample
def test_a_bad_a_in_a_link_warns_and_compares_with_the_default() -> None:
    at = open_page(bits="2", a="bits=99")
    assert not at.exception and not at.error
    assert [w.value for w in at.warning] == [
        "The pinned setting A's `bits=99` is not valid (a whole number from 1 to 16, or "
        "float); using the default."
    ]
    assert at.session_state["compare_a"] == (MODEL, Settings())
    assert len(at.metric) == 10


@needs_sample
def test_debug_page_of_the_float_setting_finds_no_error() -> None:
    at = open_page("pages/views/debug.py", bits="float")
    ok(at, "Debug a setting")
    assert "#### Weights cost nothing, activations cost nothing, both cost nothing" in (
        at.markdown[1].value)
    assert [i.value for i in at.info] == [
        "Keeping any one layer in float wins no accuracy here (all set: "
        f"{scored(Settings(bits=None)).accuracy:.1%})."]
    dot = at.get("graphviz_chart")[0].proto.spec
    assert dot.count("local SQNR no error") == 2  # fc1 and fc2, both exact
