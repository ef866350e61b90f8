"""The analysis pages (Trade-offs, Layer sensitivity, Mixed precision) through AppTest, and
the per-layer bits they hand to the Playground (session, URL, table)."""

from __future__ import annotations

import json
import re

import pytest
from streamlit.testing.v1 import AppTest
from test_app import APP, needs_sample, ok

from pages import cache, tables
from pages.query import parse_query
from pages.session import settings_from_session
from qcore.config import Settings
from qcore.refs import DatasetRef, ModelRef

PAGES = {
    "tradeoffs": "pages/views/tradeoffs.py",
    "sensitivity": "pages/views/sensitivity.py",
    "mixed": "pages/views/mixed.py",
}
TITLES = {"tradeoffs": "Trade-offs", "sensitivity": "Layer sensitivity", "mixed": "Mixed precision"}


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
    ok(at, TITLES[page])  # its own heading, not the Playground's
    assert not any(m.value.startswith("A trained network stores") for m in at.markdown)
    assert at.session_state["model"] == "mnist-cnn"
    assert "press" in at.info[0].value.lower()  # nothing runs before the button
    assert not at.get("plotly_chart")


@needs_sample
def test_tradeoffs_run_draws_front_star_table_and_csv() -> None:
    at = open_page("tradeoffs", "digits-mlp")
    ok(at, TITLES["tradeoffs"])
    at.multiselect(key="to_bits").set_value([2, 8])
    at.multiselect(key="to_prune").set_value([0.0, 0.5])
    at.button(key="to_run").click().run()
    ok(at, TITLES["tradeoffs"])
    (fig,) = charts(at).values()
    names = [t["name"] for t in fig["data"]]
    assert {"prune 0", "prune 0.5", "Pareto front", "Playground setting"} <= set(names)
    star = fig["data"][names.index("Playground setting")]
    assert star["marker"]["symbol"] == "star-open"  # open: the points under it show
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
    ok(at, TITLES["tradeoffs"])
    assert len(at.dataframe[0].value) == 4


@needs_sample
def test_tradeoffs_empty_grid_is_a_sentence() -> None:
    at = open_page("tradeoffs", "digits-mlp")
    at.multiselect(key="to_bits").set_value([])
    at.button(key="to_run").click().run()
    assert not at.exception
    assert "Pick at least one bit width" in at.error[0].value
    assert not at.info  # one message: the error, not also "press Run sweep"


@needs_sample
def test_sensitivity_with_nothing_to_try_shows_only_the_error() -> None:
    at = open_page("sensitivity", "digits-mlp")
    at.multiselect(key="sens_bits").set_value([])
    at.multiselect(key="sens_prune").set_value([])
    at.button(key="sens_run").click().run()
    assert not at.exception
    assert [e.value for e in at.error] == ["Pick at least one bit width or pruning rate."]
    assert not at.info


@needs_sample
def test_analysis_forms_show_whole_chip_labels() -> None:
    at = open_page("tradeoffs")
    assert at.multiselect(key="to_bits").options[:3] == ["1", "2", "3"]
    assert at.multiselect(key="to_bits").options[-1] == "float32"
    assert "bits" in at.multiselect(key="to_bits").label
    at.switch_page(PAGES["sensitivity"]).run()
    assert at.multiselect(key="sens_bits").options[:2] == ["1", "2"]
    at.switch_page(PAGES["mixed"]).run()
    assert at.multiselect(key="mp_bits").options[:2] == ["1", "2"]


@needs_sample
def test_sensitivity_run_draws_heatmap_sqnr_and_prune_curves() -> None:
    at = open_page("sensitivity", "digits-mlp")
    at.multiselect(key="sens_bits").set_value([2, 8])
    at.multiselect(key="sens_prune").set_value([0.5, 0.9])
    at.button(key="sens_run").click().run()
    ok(at, TITLES["sensitivity"])
    figs = charts(at)
    heat = next(f for t, f in figs.items() if t.startswith("Accuracy drop"))
    assert heat["data"][0]["y"] == ["fc1", "fc2"] and heat["data"][0]["x"] == ["2 bits", "8 bits"]
    assert any(t.startswith("Per-layer SQNR at 2 bits") for t in figs)
    curves = next(f for t, f in figs.items() if t.startswith("Accuracy with one layer pruned"))
    assert [t["name"] for t in curves["data"]] == ["fc1", "fc2"]
    summary = " ".join(m.value for m in at.markdown)
    assert "Most sensitive: fc" in summary and "least sensitive: fc" in summary
    at.select_slider(key="sens_sqnr_bits").set_value(8).run()
    ok(at, TITLES["sensitivity"])
    assert any(t.startswith("Per-layer SQNR at 8 bits") for t in charts(at))


def _kb(text: str) -> float:
    return float(text.split()[-2] if text.startswith("budget") else text.split()[0])


@needs_sample
def test_mixed_precision_fits_the_budget_and_opens_in_the_playground() -> None:
    at = open_page("mixed", "digits-mlp")
    ok(at, TITLES["mixed"])
    at.multiselect(key="mp_bits").set_value([2, 4, 8]).run()
    lo, hi = at.slider(key="mp_budget_kb").min, at.slider(key="mp_budget_kb").max
    assert lo < hi
    at.slider(key="mp_budget_kb").set_value(3.2).run()
    at.button(key="mp_run").click().run()
    ok(at, TITLES["mixed"])
    size = next(m for m in at.metric if m.label.startswith("Packed size"))
    assert _kb(size.value) <= _kb(size.delta) == 3.2  # chosen size within the budget
    figs = charts(at)
    bits_fig = figs["Bits per layer"]["data"][0]
    chosen = dict(zip(bits_fig["x"], bits_fig["y"], strict=True))
    assert set(chosen) == {"fc1", "fc2"} and set(chosen.values()) <= {2, 4, 8}
    scatter = figs["Mixed precision against uniform bit widths (test split)"]
    assert "mixed precision" in [t["name"] for t in scatter["data"]]
    res = cache.mixed_result(ModelRef("digits-mlp"), DatasetRef("digits"), 3200, (2, 4, 8),
                             False)
    assert res.size_bytes <= 3200 and res.layer_bits == chosen

    at.button(key="mp_open").click().run()
    ok(at)  # the Playground
    assert at.session_state["layer_bits"] == tuple(chosen.items())
    assert per_layer_bits(at) == chosen  # the Playground's per-layer table
    assert layer_bits_note(at)
    assert at.query_params["layer_bits"] == ",".join(f"{n}:{b}" for n, b in chosen.items())
    size_now = next(m for m in at.metric if m.label == "Packed size").value
    assert size_now == tables.format_bytes(res.size_bytes)
    # AppTest reruns the page it was switched to last, not the one st.switch_page picked
    at.switch_page("pages/views/playground.py").run()
    assert per_layer_bits(at) == chosen
    at.button(key="clear_layer_bits").click().run()
    ok(at)
    assert at.session_state["layer_bits"] == ()
    assert per_layer_bits(at) == {"fc1": 8, "fc2": 8}
    assert not layer_bits_note(at)
    assert "layer_bits" not in at.query_params


def _uniform_table(at: AppTest):
    return next(d.value for d in at.dataframe if "fits the budget" in d.value.columns
                or "fits" in d.value.columns)  # fmt: skip


@needs_sample
def test_mixed_precision_compares_with_every_uniform_width_that_fits(
    monkeypatch, jobs_in_process
) -> None:
    """mnist-cnn at the default budget: uniform 4 bits fits and ties the mixed choice on the
    test split, so the page may not say that mixed precision beats it (its progress texts
    are the in-process ones: QP_JOB_WORKERS=0)."""
    texts: list[str] = []
    real = cache.run_with_progress

    def spy(fn, *args, text):
        texts.append(text)
        return real(fn, *args, text=text)

    monkeypatch.setattr(cache, "run_with_progress", spy)
    import pages.progress

    monkeypatch.setattr(pages.progress, "run_with_progress", spy)
    at = open_page("mixed")
    ok(at, TITLES["mixed"])
    at.button(key="mp_run").click().run()
    ok(at, TITLES["mixed"])
    # each background step has its own progress text; none says "Sweeping"
    assert any("calibration split" in t for t in texts) and not any("Sweep" in t for t in texts)
    res = cache.mixed_result(ModelRef("mnist-cnn"), DatasetRef("mnist-5k"),
                             at.session_state["mixed_last"][2][0], (2, 3, 4, 5, 6, 8), False)
    table = _uniform_table(at)
    uniform_rows = table[table["choice"].str.startswith("uniform")]
    assert list(uniform_rows["choice"]) == [f"uniform {u.bits} bits" for u in res.uniform]
    assert list(uniform_rows["fits"]) == [u.fits for u in res.uniform]
    assert list(uniform_rows["search"] / 100) == pytest.approx(
        [u.search_accuracy for u in res.uniform], abs=1e-12
    )  # shown in percent
    mixed_row = table.iloc[0]
    assert mixed_row["test"] / 100 == pytest.approx(res.accuracy, abs=1e-12)
    assert mixed_row["search"] / 100 == pytest.approx(res.search_accuracy, abs=1e-12)
    # the chart's uniform points are the table's test accuracies
    scatter = charts(at)["Mixed precision against uniform bit widths (test split)"]
    points = {(round(x * 1e3), y) for t in scatter["data"] if t.get("mode") == "markers"
              and t["name"] != "mixed precision" for x, y in zip(t["x"], t["y"], strict=True)}
    rows = {(int(b), round(a / 100, 9)) for b, a in zip(
        uniform_rows["size_bytes"], uniform_rows["test"], strict=True)}  # fmt: skip
    assert rows <= {(x, round(y, 9)) for x, y in points}
    for u in res.uniform:  # qcore measured the same test accuracies as the chart
        if u.fits:
            row = uniform_rows[uniform_rows["choice"] == f"uniform {u.bits} bits"].iloc[0]
            assert row["test"] / 100 == pytest.approx(u.test_accuracy, abs=1e-12)
    # no claim of a win over a width the table shows as good as the mixed choice
    note = next(i.value for i in at.info if "split" in i.value)
    for u in res.uniform:
        if u.fits and u.test_accuracy >= res.accuracy:
            assert u.bits not in res.beats
            assert f"beats uniform {u.bits} bits" not in note
            claim = note.split("beats", 1)[1].split(";")[0] if "beats" in note else ""
            assert str(u.bits) not in re.findall(r"\d+", claim), note
    assert "calib" in note and "test split" in note
    # the cards compare with the best fitting width on the test split, and say which
    best = max((u for u in res.uniform if u.fits), key=lambda u: (u.test_accuracy, -u.size_bytes))
    card = next(m for m in at.metric if m.label.startswith("Best uniform within budget"))
    assert card.label.endswith(f"{best.bits} bits")
    mixed_card = next(m for m in at.metric if m.label.startswith("Accuracy, mixed"))
    assert "test split" in mixed_card.label
    gain = round((res.accuracy - best.test_accuracy) * 100, 1)
    if gain:
        assert mixed_card.delta == f"{gain:+.1f} pts vs uniform {best.bits} bits"
    else:  # a tie is not shown as a gain (no "+0.0", no up arrow)
        assert mixed_card.delta == f"same as uniform {best.bits} bits"


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
