"""The analysis pages (Trade-offs, Layer sensitivity, Mixed precision) through AppTest, and
the per-layer bits they hand to the Playground (session, URL, table)."""

from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest
from test_app import APP, needs_sample, ok

from pages import cache, figures
from pages.query import parse_query
from pages.session import settings_from_session
from qcore.config import Settings
from qcore.refs import DatasetRef, ModelRef

PAGES = {
    "tradeoffs": "pages/views/tradeoffs.py",
    "sensitivity": "pages/views/sensitivity.py",
    "mixed": "pages/views/mixed.py",
}


def open_page(page: str, model: str | None = None, **query: str) -> AppTest:
    """The app on ``page``; with ``model`` picked in the sidebar as a user would."""
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params.update(query)
    at.run()
    at.switch_page(PAGES[page]).run()
    if model is not None:
        at.selectbox(key="model_picker").set_value(model).run()
    return at


def charts(at: AppTest) -> dict[str, dict]:
    """The plotly figures on screen, by title (or by trace names when untitled)."""
    out = {}
    for c in at.get("plotly_chart"):
        fig = json.loads(c.proto.spec)
        title = fig["layout"].get("title", {}).get("text") or ",".join(
            str(t.get("name")) for t in fig["data"]
        )
        out[title] = fig
    return out


def per_layer_bits(at: AppTest) -> dict[str, int]:
    """The Playground's per-layer table: layer -> bits."""
    table = at.dataframe[0].value
    return dict(zip(table["layer"], table["bits"].astype(int), strict=True))


def layer_bits_note(at: AppTest) -> str:
    """The Playground's note that per-layer bits are active ("" when it is not shown)."""
    notes = [i.value for i in at.info if i.value.startswith("Per-layer bit widths are active")]
    assert len(notes) <= 1
    return notes[0] if notes else ""


@needs_sample
@pytest.mark.parametrize("page", list(PAGES))
def test_each_page_renders_with_the_default_model(page: str) -> None:
    at = open_page(page)
    ok(at)
    assert at.session_state["model"] == "mnist-cnn"
    assert at.subheader, "the page has a heading"
    assert "press" in at.info[0].value.lower()  # nothing runs before the button
    assert not at.get("plotly_chart")


@needs_sample
def test_tradeoffs_run_draws_front_star_table_and_csv() -> None:
    at = open_page("tradeoffs", "digits-mlp")
    ok(at)
    at.multiselect(key="to_bits").set_value([2, 8])
    at.multiselect(key="to_prune").set_value([0.0, 0.5])
    at.button(key="to_run").click().run()
    ok(at)
    (fig,) = charts(at).values()
    names = [t["name"] for t in fig["data"]]
    assert {"prune 0", "prune 0.5", "Pareto front", "Playground setting"} <= set(names)
    star = fig["data"][names.index("Playground setting")]
    assert star["marker"]["symbol"] == "star"
    assert fig["layout"]["xaxis"]["type"] == "log"
    table = at.dataframe[0].value
    assert len(table) == 4 and set(table["bits"]) == {2, 8}
    assert table["pareto"].any()
    (download,) = at.get("download_button")
    assert "CSV" in download.proto.label
    # the Playground's star is its own cached result: 8 bits, no pruning
    r = cache.results(ModelRef("digits-mlp"), DatasetRef("digits"), Settings())
    assert star["y"] == [r.accuracy] and star["x"] == [r.size_bytes / 1e3]
    # a rerun (or a return to the page) shows the same sweep from the cache, without Run
    at.run()
    ok(at)
    assert len(at.dataframe[0].value) == 4


@needs_sample
def test_tradeoffs_empty_grid_is_a_sentence() -> None:
    at = open_page("tradeoffs", "digits-mlp")
    at.multiselect(key="to_bits").set_value([])
    at.button(key="to_run").click().run()
    assert not at.exception
    assert "Pick at least one bit width" in at.error[0].value


@needs_sample
def test_sensitivity_run_draws_heatmap_sqnr_and_prune_curves() -> None:
    at = open_page("sensitivity", "digits-mlp")
    at.multiselect(key="sens_bits").set_value([2, 8])
    at.multiselect(key="sens_prune").set_value([0.5, 0.9])
    at.button(key="sens_run").click().run()
    ok(at)
    figs = charts(at)
    heat = next(f for t, f in figs.items() if t.startswith("Accuracy drop"))
    assert heat["data"][0]["y"] == ["fc1", "fc2"] and heat["data"][0]["x"] == ["2 bits", "8 bits"]
    assert any(t.startswith("Per-layer SQNR at 2 bits") for t in figs)
    curves = next(f for t, f in figs.items() if t.startswith("Accuracy with one layer pruned"))
    assert [t["name"] for t in curves["data"]] == ["fc1", "fc2"]
    summary = " ".join(m.value for m in at.markdown)
    assert "Most sensitive: fc" in summary and "least sensitive: fc" in summary
    at.select_slider(key="sens_sqnr_bits").set_value(8).run()
    ok(at)
    assert any(t.startswith("Per-layer SQNR at 8 bits") for t in charts(at))


def _kb(text: str) -> float:
    return float(text.split()[-2] if text.startswith("budget") else text.split()[0])


@needs_sample
def test_mixed_precision_fits_the_budget_and_opens_in_the_playground() -> None:
    at = open_page("mixed", "digits-mlp")
    ok(at)
    at.multiselect(key="mp_bits").set_value([2, 4, 8]).run()
    lo, hi = at.slider(key="mp_budget_kb").min, at.slider(key="mp_budget_kb").max
    assert lo < hi
    at.slider(key="mp_budget_kb").set_value(3.2).run()
    at.button(key="mp_run").click().run()
    ok(at)
    size = next(m for m in at.metric if m.label.startswith("Packed size"))
    assert _kb(size.value) <= _kb(size.delta) == 3.2  # chosen size within the budget
    figs = charts(at)
    bits_fig = figs["Bits per layer"]["data"][0]
    chosen = dict(zip(bits_fig["x"], bits_fig["y"], strict=True))
    assert set(chosen) == {"fc1", "fc2"} and set(chosen.values()) <= {2, 4, 8}
    scatter = figs["Mixed precision against uniform bit widths"]
    assert "mixed precision" in [t["name"] for t in scatter["data"]]
    res = cache.mixed_result(ModelRef("digits-mlp"), DatasetRef("digits"), 3200, (2, 4, 8),
                             False)
    assert res.size_bytes <= 3200 and res.layer_bits == chosen

    at.button(key="mp_open").click().run()
    ok(at)
    assert at.session_state["layer_bits"] == tuple(chosen.items())
    assert per_layer_bits(at) == chosen  # the Playground's per-layer table
    assert layer_bits_note(at)
    assert at.query_params["layer_bits"] == ",".join(f"{n}:{b}" for n, b in chosen.items())
    size_now = next(m for m in at.metric if m.label == "Packed size").value
    assert size_now == figures.format_bytes(res.size_bytes)
    # AppTest reruns the page it was switched to last, not the one st.switch_page picked
    at.switch_page("pages/views/playground.py").run()
    assert per_layer_bits(at) == chosen
    at.button(key="clear_layer_bits").click().run()
    ok(at)
    assert at.session_state["layer_bits"] == ()
    assert per_layer_bits(at) == {"fc1": 8, "fc2": 8}
    assert not layer_bits_note(at)
    assert "layer_bits" not in at.query_params


@needs_sample
def test_deep_link_with_layer_bits_restores_them() -> None:
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update(model="digits-mlp", dataset="digits", layer_bits="fc2:3,fc1:6")
    at.run()
    ok(at)
    assert not at.warning
    assert at.session_state["layer_bits"] == (("fc1", 6), ("fc2", 3))
    assert per_layer_bits(at) == {"fc1": 6, "fc2": 3}
    assert "(fc1 6, fc2 3 bits)" in layer_bits_note(at)
    assert at.query_params["layer_bits"] == "fc1:6,fc2:3"


@needs_sample
@pytest.mark.parametrize("raw", ["fc1:0", "fc9:4", "fc1:4,fc1:5", "fc1", "fc1:four", ""])
def test_bad_layer_bits_link_warns_and_uses_the_slider(raw: str) -> None:
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update(model="digits-mlp", dataset="digits", layer_bits=raw)
    at.run()
    ok(at)
    assert any("`layer_bits=" in w.value for w in at.warning)
    assert at.session_state["layer_bits"] == ()
    assert per_layer_bits(at) == {"fc1": 8, "fc2": 8}
    assert not layer_bits_note(at)


# --- pure helpers -----------------------------------------------------------------------------

LAYERS = {"mnist-cnn": ["conv1", "conv2", "fc1", "fc2"], "digits-mlp": ["fc1", "fc2"]}


def parse(**q: str):
    return parse_query(
        q,
        models=list(LAYERS),
        datasets=["mnist-5k", "digits"],
        layer_names=LAYERS.__getitem__,
    )


def test_layer_bits_round_trip_through_the_url_and_config() -> None:
    names = LAYERS["mnist-cnn"]
    s = Settings(bits=8, layer_bits=(("conv1", 6), ("conv2", 6), ("fc1", 3), ("fc2", 4)))
    q = s.to_flat()
    assert q["layer_bits"] == "conv1:6,conv2:6,fc1:3,fc2:4"
    values, warnings = parse(**q)
    assert warnings == []
    assert settings_from_session(values, names) == s
    cfg = s.to_config().quant
    assert [cfg.bits_for(n) for n in names] == [6, 6, 3, 4]
    assert "layer_bits" not in Settings().to_flat()
    assert s.slug() == "8bit-mixed"


def test_layer_bits_in_canonical_settings_and_session_order() -> None:
    assert Settings(bits=None, layer_bits=(("fc1", 4),)).canonical() == Settings(bits=None)
    partial = Settings(layers=("fc2",), layer_bits=(("fc1", 4), ("fc2", 3)))
    assert partial.canonical().layer_bits == (("fc2", 3),)  # fc1 stays float anyway
    assert partial.canonical().to_config() == Settings(
        layers=("fc2",), layer_bits=(("fc2", 3),)
    ).to_config()
    # session values in any order become model order, so one compression has one cache key
    s = settings_from_session({"layer_bits": [["fc2", 3], ["fc1", 4]]}, LAYERS["digits-mlp"])
    assert s.layer_bits == (("fc1", 4), ("fc2", 3))


@pytest.mark.parametrize("raw", ["conv1:0", "conv1:17", "conv9:4", "conv1:4,conv1:5", "conv1",
                                 "conv1:x", ":4", ",", "fc1:4;fc2:4"])  # fmt: skip
def test_parse_query_warns_on_bad_layer_bits(raw: str) -> None:
    values, warnings = parse(layer_bits=raw)
    assert "layer_bits" not in values
    assert len(warnings) == 1 and "`layer_bits=" in warnings[0]


def test_layer_bits_are_checked_against_the_linked_model() -> None:
    values, warnings = parse(model="digits-mlp", layer_bits="fc1:2, fc2:5")
    assert warnings == [] and values["layer_bits"] == (("fc1", 2), ("fc2", 5))
    _, warnings = parse(model="digits-mlp", layer_bits="conv1:4")
    assert len(warnings) == 1
