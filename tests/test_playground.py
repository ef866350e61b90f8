"""The Playground through AppTest: numbers that never mislead, and the teaching panels.

Every number a test expects is computed here from qcore (never typed in), so a test says
that the page shows what the core computes, in words that say what it is.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
from e2e import CHROMIUM, browser_page, pick_option, wait_idle
from playwright.sync_api import expect
from streamlit.testing.v1 import AppTest

import qcore
from pages import cache, figures, tables
from qcore import report, teach
from qcore.config import Settings
from qcore.refs import DatasetRef, ModelRef

APP = str(Path(__file__).resolve().parent.parent / "app.py")
needs_sample = pytest.mark.skipif(
    "mnist-cnn" not in qcore.list_models(), reason="sample models not trained yet"
)
CNN, MNIST = ModelRef("mnist-cnn"), DatasetRef("mnist-5k")


def open_app(**query: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params.update(query)
    return at.run()


def show(at: AppTest, view: str, key: str = "layer_view") -> AppTest:
    """Open one tab of a lazily drawn tab row (only the open tab is computed and sent)."""
    at.session_state[key] = view
    return at.run()


JOURNEY, CURVE, ACTS = "One weight's journey", "Clipping error", "Activations"


def ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def the_metric(at: AppTest, label: str):
    found = [m for m in at.metric if m.label == label]
    assert len(found) == 1, [m.label for m in at.metric]
    return found[0]


def compressed(model: str = "mnist-cnn", **settings) -> qcore.Compressed:
    return qcore.compress(qcore.load_model(model), Settings(**settings).canonical().to_config())


def charts(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def chart_titled(at: AppTest, prefix: str) -> dict:
    found = [f for f in charts(at) if (f["layout"].get("title") or {}).get("text", "")
             .startswith(prefix)]  # fmt: skip
    assert len(found) == 1, [(f["layout"].get("title") or {}).get("text") for f in charts(at)]
    return found[0]


def chart_with_trace(at: AppTest, prefix: str) -> dict:
    found = [f for f in charts(at) if any(t.get("name", "").startswith(prefix)
                                          for t in f["data"])]  # fmt: skip
    assert len(found) == 1, prefix
    return found[0]


def layer_picker(at: AppTest):
    found = [s for s in at.selectbox if s.label == "Layer"]
    assert len(found) == 1
    return found[0]


def markdown_text(at: AppTest) -> str:
    return "\n".join(m.value for m in at.markdown)


# --- A: headline numbers ----------------------------------------------------------------------


@needs_sample
def test_headline_shows_the_whole_models_sqnr_and_sparsity_split_in_two() -> None:
    at = open_app(bits="2", prune="0.5")
    ok(at)
    c = compressed(bits=2, prune=0.5)
    sqnr = the_metric(at, "SQNR (whole model)")
    assert sqnr.value == f"{c.sqnr_db:.1f} dB"
    assert "Mean SQNR" not in [m.label for m in at.metric]
    assert "total signal over the total error" in sqnr.proto.help
    sparsity = the_metric(at, "Sparsity")
    assert sparsity.value == f"{c.pruned + c.rounded_zero:.1%}"
    split = f"{c.pruned:.1%} pruned  \n{c.rounded_zero:.1%} rounded to zero"
    assert split in [x.value for x in at.caption]
    assert c.rounded_zero > 0.01  # 2 bits round many small weights to zero: it shows


@needs_sample
def test_rounding_zeros_are_not_called_pruning_at_eight_bits() -> None:
    at = open_app()
    ok(at)
    c = compressed()
    assert c.pruned == 0 and c.rounded_zero > 0
    split = f"0.0% pruned  \n{c.rounded_zero:.1%} rounded to zero"
    assert split in [x.value for x in at.caption]


@needs_sample
def test_float_state_reads_clearly() -> None:
    at = open_app(bits="float")
    ok(at)
    sqnr = the_metric(at, "SQNR (whole model)")
    assert sqnr.value == "—" and "no error" in sqnr.proto.help
    assert the_metric(at, "Packed size").delta == "same as float32"
    table = at.dataframe[0].value
    assert list(table["SQNR (dB)"]) == ["unchanged"] * 4
    for col in ("grid range", "scale Δ", "zero point"):
        assert list(table[col]) == ["float32"] * 4, col
    assert not table.isna().any().any()  # nothing the grid would show as a grey "None"


@needs_sample
def test_accuracy_says_how_many_test_images_and_what_one_is_worth() -> None:
    at = open_app()
    ok(at)
    n = cache.results(CNN, MNIST, Settings()).n
    assert n == qcore.load_dataset("mnist-5k", "test").y.numel() == 1000
    assert "1,000 test images:  \none image is 0.1 pts" in [c.value for c in at.caption]


# --- B: pruning that costs bytes --------------------------------------------------------------


@needs_sample
def test_pruning_that_costs_bytes_is_shown_against_no_pruning() -> None:
    at = open_app(model="digits-mlp", dataset="digits", bits="1", prune="0.1")
    ok(at)
    pruned = compressed("digits-mlp", bits=1, prune=0.1).size_bytes
    unpruned = compressed("digits-mlp", bits=1).size_bytes
    assert pruned > unpruned  # 1 bit has no zero code: the mask costs more than it saves
    size = the_metric(at, "Packed size")
    assert size.value == tables.format_bytes(pruned)
    assert size.delta == f"+{tables.format_bytes(pruned - unpruned)} vs no pruning"
    assert f"{pruned - unpruned:,} bytes more" in size.proto.help
    assert "smaller than float32" in size.proto.help  # the ratio against float is still said


@needs_sample
def test_pruning_that_saves_bytes_keeps_the_ratio_against_float() -> None:
    at = open_app(bits="4", prune="0.9")
    ok(at)
    c = compressed(bits=4, prune=0.9)
    assert the_metric(at, "Packed size").delta == (
        f"{c.float_size_bytes / c.size_bytes:.1f}x smaller than float32"
    )


# --- C: the histogram -------------------------------------------------------------------------


@needs_sample
def test_one_bit_with_pruning_draws_three_levels_and_the_grid_range() -> None:
    at = open_app(bits="1", prune="0.5")
    ok(at)
    fig = chart_titled(at, "conv1")
    names = [t.get("name", "") for t in fig["data"]]
    assert "3 quantization levels (ternary)" in names, names
    assert figures.GRID_RANGE_LABEL in names
    c = compressed(bits=1, prune=0.5)
    lo, hi = c.layer("conv1").grid_range
    drawn = sorted(s["x0"] for s in fig["layout"]["shapes"] if s["line"]["dash"] == "dash")
    assert drawn == pytest.approx(sorted([float(lo[0]), float(hi[0])]))  # -alpha, +alpha


@needs_sample
def test_layer_picker_follows_a_model_change() -> None:
    at = open_app()
    layer_picker(at).set_value("fc1").run()
    ok(at)
    assert chart_titled(at, "fc1")
    at.selectbox(key="model_picker").set_value("mnist-dwsep").run()
    ok(at)
    picker = layer_picker(at)
    dwsep = qcore.weight_layers(qcore.load_model("mnist-dwsep"))
    assert picker.value in dwsep and picker.value == "stem.0"
    assert picker.options == list(dwsep)
    assert chart_titled(at, picker.value)  # the chart shows what the picker says
    assert "mnist-dwsep" in picker.key  # a new model, a new widget (the browser kept fc1)
    at.selectbox(key="model_picker").set_value("mnist-cnn").run()
    assert layer_picker(at).value == "fc1"  # back: the layer picked there before


# --- D: the per-layer table and the JSON download ---------------------------------------------


@needs_sample
def test_layer_table_shows_grid_scale_zero_point_and_both_zero_counts() -> None:
    at = open_app(bits="4", symmetric="false", prune="0.3")
    ok(at)
    table = at.dataframe[0].value.set_index("layer")
    c = compressed(bits=4, symmetric=False, prune=0.3)
    for s in c.layers:
        row = table.loc[s.name]
        lo, hi = (float(t[0]) for t in s.grid_range)
        assert row["grid range"] == f"{lo:.4g} … {hi:.4g}".replace("-", "−")
        assert row["scale Δ"] == f"{float(s.scales[0]):.4g}"
        assert row["zero point"] == str(int(s.zero_points[0]))
        assert row["pruned"] == pytest.approx(s.pruned)
        assert row["rounded to zero"] == pytest.approx(s.rounded_zero)
        assert row["SQNR (dB)"] == f"{s.sqnr_db:.1f}"


@needs_sample
def test_layer_table_summarises_per_channel_scales() -> None:
    at = open_app(bits="4", per_channel="true")
    ok(at)
    table = at.dataframe[0].value.set_index("layer")
    c = compressed(bits=4, per_channel=True)
    s = c.layer("conv2")
    n = s.scales.numel()
    assert n == s.shape[0] > 1
    text = table.loc["conv2", "scale Δ"]
    assert text == (f"{float(s.scales.min()):.4g} … {float(s.scales.max()):.4g} "
                    f"over {n} channels")  # fmt: skip
    assert table.loc["conv2", "zero point"] == "0"  # symmetric: zero in every channel
    assert f"({n} channels)" in table.loc["conv2", "grid range"]


@needs_sample
def test_one_bit_layers_have_no_zero_point_and_alpha_as_scale() -> None:
    at = open_app(bits="1")
    ok(at)
    table = at.dataframe[0].value.set_index("layer")
    c = compressed(bits=1)
    assert list(table["zero point"]) == ["none (±α)"] * 4  # no code stands for 0 at 1 bit
    alpha = float(c.layer("fc1").scales[0])
    assert table.loc["fc1", "scale Δ"] == f"{alpha:.4g}"
    assert table.loc["fc1", "grid range"] == f"−{alpha:.4g} … {alpha:.4g}"


def _strict_json(text: str) -> dict:
    def refuse(name: str):
        raise AssertionError(f"{name} in the JSON")

    return json.loads(text, parse_constant=refuse)


@needs_sample
@pytest.mark.parametrize(
    "settings",
    [Settings(bits=4, prune=0.5), Settings(bits=None), Settings(bits=1, per_channel=True),
     Settings(bits=3, symmetric=False, layers=("conv2", "fc1"))],
    ids=["4bit-pruned", "float", "1bit-per-channel", "3bit-asym-two-layers"],
)  # fmt: skip
def test_results_json_is_strict_json_with_the_old_keys_and_the_new(settings) -> None:
    r = cache.results(CNN, MNIST, settings)
    doc = _strict_json(tables.results_json("mnist-cnn", "mnist-5k", settings, r))
    old = {"model", "dataset", "split", "settings", "config", "accuracy_simulated",
           "float_accuracy", "accuracy_change", "agreement_with_float", "loss", "examples",
           "packed_size_bytes", "float_size_bytes", "compression_ratio", "sparsity",
           "mean_sqnr_db", "layers"}  # fmt: skip
    assert old | {"sqnr_db", "pruned", "rounded_to_zero"} == set(doc)
    c = cache.get_compressed(CNN, settings)
    assert doc["pruned"] == c.pruned and doc["rounded_to_zero"] == c.rounded_zero
    assert doc["sqnr_db"] == (c.sqnr_db if math.isfinite(c.sqnr_db) else "inf")
    old_row = {"layer", "kind", "shape", "params", "bits", "sparsity", "SQNR (dB)",
               "packed bytes", "float32 bytes", "encoding"}  # fmt: skip
    new_row = {"pruned", "rounded to zero", "grid low", "grid high", "scale min", "scale max",
               "zero point min", "zero point max", "channels"}  # fmt: skip
    for row, s in zip(doc["layers"], c.layers, strict=True):
        assert set(row) == old_row | new_row
        if s.qparams is None:
            assert row["grid low"] is row["scale min"] is row["zero point max"] is None
        elif s.bits == 1:
            assert row["zero point min"] is row["zero point max"] is None
        else:
            assert row["grid low"] == pytest.approx(float(s.grid_range[0].min()))
            assert row["grid high"] == pytest.approx(float(s.grid_range[1].max()))
            assert row["scale max"] == pytest.approx(float(s.scales.max()))
            assert row["channels"] == s.scales.numel()


def test_results_json_writes_no_nan_or_infinity() -> None:
    text = report.results_json(
        "m", "d", Settings(bits=2), accuracy=0.1, float_accuracy=0.9, agreement=0.1,
        loss=float("nan"), examples=10, size_bytes=1, float_size_bytes=4, ratio=math.inf,
        sparsity=0.0, mean_sqnr_db=math.inf, sqnr_db=-math.inf, pruned=0.0, rounded_zero=0.0,
        layers=[{"layer": "a", "SQNR (dB)": float("nan"), "grid low": float("-inf")}],
    )  # fmt: skip
    doc = _strict_json(text)
    assert doc["loss"] is None and doc["compression_ratio"] == "inf"
    assert doc["sqnr_db"] == "-inf" and doc["layers"][0] == {
        "layer": "a", "SQNR (dB)": None, "grid low": "-inf"}  # fmt: skip


# --- E: the teaching panels -------------------------------------------------------------------


def _journey_markdown(at: AppTest) -> str:
    found = [m.value for m in at.markdown if "| step |" in m.value]
    assert len(found) == 1, markdown_text(at)[:2000]
    return found[0]


@needs_sample
def test_journey_of_the_largest_weight_shows_every_step() -> None:
    at = show(open_app(bits="4"), JOURNEY)
    ok(at)
    j = teach.weight_journey(compressed(bits=4), "conv1")
    text = _journey_markdown(at)
    assert "largest |w|" in text.replace("\\|", "|")
    for value in (j.weight, j.scale, j.scaled, j.dequantized, j.error):
        assert tables.number(value) in text, value
    assert f"`{j.code_binary}`" in text and f"**{tables.number(j.code)}**" in text


@needs_sample
def test_journey_follows_the_sliders_and_a_random_weight() -> None:
    at = show(open_app(bits="4"), JOURNEY)
    before = _journey_markdown(at)
    at.select_slider(key="bits").set_value(3).run()
    ok(at)
    after = _journey_markdown(at)
    assert after != before
    j3 = teach.weight_journey(compressed(bits=3), "conv1")
    assert tables.number(j3.scale) in after and f"`{j3.code_binary}`" in after
    at.button(key="journey_random").click().run()
    ok(at)
    key = "journey_index:mnist-cnn:conv1"
    index = at.session_state[key]
    assert index == teach.random_weight_index(compressed(bits=3), "conv1", 1)
    j = teach.weight_journey(compressed(bits=3), "conv1", index)
    assert tables.number(j.weight) in _journey_markdown(at)
    at.button(key="journey_largest").click().run()
    assert key not in at.session_state
    assert _journey_markdown(at) == after


@needs_sample
def test_journey_of_a_float_layer_says_so() -> None:
    at = show(open_app(bits="float"), JOURNEY)
    ok(at)
    infos = [i.value for i in at.info if "left in float32" in i.value]
    assert len(infos) == 1  # the journey
    assert not [m for m in at.markdown if "| step |" in m.value]
    show(at, CURVE)
    ok(at)
    infos = [i.value for i in at.info if "left in float32" in i.value]
    assert len(infos) == 1 and "no clip range" in infos[0]  # the error curve


@needs_sample
def test_clip_error_curve_marks_now_and_the_optimum() -> None:
    at = show(open_app(bits="3", clip="0.8"), CURVE)
    ok(at)
    fig = chart_with_trace(at, "total squared error")
    curve = teach.clip_error_curve(compressed(bits=3, clip=0.8), "conv1")
    names = [t["name"] for t in fig["data"]]
    now = [t for t in fig["data"] if t["name"].startswith("now: c = ")]
    best = [t for t in fig["data"] if t["name"].startswith("least error (mse)")]
    assert len(now) == len(best) == 1, names
    assert now[0]["x"] == [pytest.approx(curve.current[0])]
    assert best[0]["x"] == [pytest.approx(curve.optimum[0])]
    assert any(n.startswith("clipping error") for n in names)
    assert any(n.startswith("rounding error") for n in names)


@needs_sample
def test_two_bit_trap_points_at_mse_with_numbers_from_the_code() -> None:
    at = open_app(bits="2")
    ok(at)
    s2 = Settings(bits=2)
    acc2 = cache.results(CNN, MNIST, s2).accuracy
    acc1 = cache.results(CNN, MNIST, replace(s2, bits=1)).accuracy
    mse = cache.results(CNN, MNIST, replace(s2, clip_mode="mse").canonical()).accuracy
    assert acc2 < acc1 < mse
    hint = [i.value for i in at.info if "mse" in i.value]
    assert len(hint) == 1
    for number in (f"{acc2:.1%}", f"{acc1:.1%}", f"{mse:.1%}"):
        assert number in hint[0], number
    at.button(key="trap_try_mse").click().run()
    ok(at)
    assert at.selectbox(key="clip_mode").value == "mse"
    assert not [i for i in at.info if "with clip mode mse" in i.value]


@needs_sample
def test_no_trap_hint_where_two_bits_are_not_a_trap() -> None:
    at = open_app(bits="2", clip_mode="mse")
    ok(at)
    assert not [i for i in at.info if "1 bit" in i.value]


def _journey(**kw) -> teach.Journey:
    base = dict(layer="fc", index=5, position=(1, 1), weight=0.9, pruned=False, bits=3,
                clip_lo=-0.8, clip_hi=0.8, grid_lo=-0.75, grid_hi=0.75, scale=0.25,
                zero_point=0, scaled=3.6, code=3, code_binary="110", dequantized=0.75,
                error=-0.15)  # fmt: skip
    return teach.Journey(**(base | kw))


def _rows(text: str) -> dict[str, str]:
    """The journey table as {step name: 'what happens | value'}."""
    out = {}
    for line in text.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("| ").split(" | ")]
        out[cells[0].split(". ", 1)[1]] = " | ".join(cells[1:])
    return out


def test_journey_table_says_clipped_and_clamped_in_words() -> None:
    rows = _rows(tables.journey_markdown(_journey(), largest=True))
    assert "largest \\|w\\|" in rows["the weight"] and "`fc[1, 1]`" in rows["the weight"]
    assert rows["clip range"].endswith("[−0.8, 0.8]: w is **outside: clipped**")
    assert rows["step Δ, zero point z"].endswith("Δ = 0.25, z = 0")
    assert rows["code q"].endswith("4, clamped to **3**")  # round(3.6) = 4 > qmax 3
    assert "kept within [−3, 3]" in rows["code q"]
    assert rows["stored bits"] == "q − (−3) = 6, in 3 binary digits | `110`"
    assert rows["error"] == "dequantized − w | −0.15 (0.60 of step Δ)"
    inside = _rows(tables.journey_markdown(_journey(weight=0.3, scaled=1.2, code=1)))
    assert inside["code q"].endswith("| **1**") and "inside" in inside["clip range"]
    assert "weight #5" in inside["the weight"]


def test_journey_table_of_a_pruned_weight_and_of_one_bit() -> None:
    pruned = _rows(tables.journey_markdown(_journey(pruned=True, code=0, dequantized=0.0)))
    assert "**pruned** → 0" in pruned["pruning"] and "zero code" in pruned["code q"]
    assert "w / Δ + z" not in pruned  # a pruned weight is not scaled and rounded
    one = _rows(tables.journey_markdown(_journey(
        bits=1, scale=0.4, scaled=math.nan, code=1, code_binary="1", dequantized=0.4,
        error=-0.5, grid_lo=-0.4, grid_hi=0.4)))  # fmt: skip
    assert one["level α"].endswith("α = 0.4") and one["code"].endswith("**1**")
    assert one["dequantized"] == "(2·code − 1)·α | **0.4**"
    assert "nan" not in " ".join(one.values())


# --- F: newly wrong images --------------------------------------------------------------------


@needs_sample
def test_each_newly_wrong_image_has_its_own_caption() -> None:
    at = open_app(bits="2")
    ok(at)
    assert not at.get("image")  # drawn only when its tab is open
    show(at, "Newly wrong images", key="details_view")
    ok(at)
    w = cache.newly_wrong(CNN, MNIST, Settings(bits=2))
    assert len(w.truth) == cache.MAX_WRONG_SHOWN
    captions = [c.value for c in at.caption if c.value.startswith("true **")]
    assert captions == [
        tables.wrong_caption(t, f, n)
        for t, f, n in zip(w.truth, w.float_pred, w.now_pred, strict=True)
    ]
    assert all(c.count("  \n") == 2 for c in captions)  # three lines each
    assert len(at.get("image")) == len(captions)


# --- G: activations: the control, the W/A label, the tab, the journey, the link ---------------


def calib_compressed(model: str = "mnist-cnn", dataset: str = "mnist-5k",
                     **settings) -> qcore.Compressed:  # fmt: skip
    """The compress the page runs with activations on: calibrated on the calib split."""
    cfg = Settings(**settings).canonical().to_config()
    return qcore.compress(qcore.load_model(model), cfg, calib=qcore.load_dataset(dataset, "calib"))


def _array(v) -> list:
    """A plotly JSON array: a list, or plotly's typed array ({"dtype", "bdata"})."""
    if isinstance(v, dict) and "bdata" in v:
        import base64

        import numpy as np

        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).tolist()
    return list(v)


def captions(at: AppTest) -> list[str]:
    return [c.value for c in at.caption]


@needs_sample
def test_eight_bit_activations_show_what_qcore_computes_with_calibration() -> None:
    at = open_app()
    ok(at)
    assert at.select_slider(key="abits").value == "float"
    assert "**W8A32** · simulated" in captions(at)
    assert at.selectbox(key="aobs").disabled
    show(at, ACTS)
    float_tab = [i.value for i in at.info if "Set **Activations**" in i.value]
    assert len(float_tab) == 1  # the Activations tab says how to turn them on
    at.select_slider(key="abits").set_value(8).run()
    ok(at)
    c = calib_compressed(bits=8, abits=8)
    assert c.activations  # calibrated
    m = qcore.evaluate(c.model, qcore.load_dataset("mnist-5k", "test"))
    assert the_metric(at, "Accuracy (simulated)").value == f"{m.accuracy:.1%}"
    assert "**W8A8** · simulated" in captions(at)
    assert at.query_params["abits"] == "8"
    assert not at.selectbox(key="aobs").disabled


@needs_sample
def test_activation_tab_draws_the_calibrated_levels_and_says_where_they_come_from() -> None:
    at = show(open_app(abits="8"), ACTS)
    ok(at)
    fig = chart_titled(at, "Input of conv1: edge input")
    c = calib_compressed(bits=8, abits=8)
    calib = qcore.load_dataset("mnist-5k", "calib")
    h = qcore.activation_histogram(c, "input", calib, bins=80)
    assert h.levels is not None and len(h.levels) == 256
    names = [t.get("name", "") for t in fig["data"]]
    assert figures.level_label(256) in names and figures.GRID_RANGE_LABEL in names
    levels = [t for t in fig["data"] if t.get("name") == figures.level_label(256)][0]
    xs = _array(levels["x"])
    assert len({x for x in xs if x is not None and math.isfinite(x)}) == 256  # a line each
    act = c.activations["input"]
    text = [t for t in captions(at) if t.startswith("Calibrated on ")]
    assert len(text) == 1
    # the edges listed by name: where an int8 engine stores tensors, logits float
    listed = [t for t in captions(at) if "quantized edges" in t]
    assert listed == [
        "4 quantized edges, where an int8 engine stores a tensor (nothing inside a fused "
        "group; the logits stay float): `input` (the network's input); `relu1` (conv1 + "
        "relu1 output); `relu2` (conv2 + relu2 output); `relu3` (fc1 + relu3 output)."
    ]
    n = len(calib.y)
    assert f"Calibrated on {n:,} calibration images" in text[0] and "**minmax**" in text[0]
    for v in (act.lo, act.hi, act.observed_min, act.observed_max):
        assert tables.number(v) in text[0], v
    # one activation's journey: the largest input seen, by plain arithmetic from the range
    show(at, JOURNEY)
    ok(at)
    journey = [m.value for m in at.markdown if "| activation step |" in m.value]
    assert len(journey) == 1
    x = act.observed_max
    code = min(max(round(x / act.scale + act.zero_point), act.qparams.qmin), act.qparams.qmax)
    assert f"**{code}**" in journey[0]
    assert tables.number((code - act.zero_point) * act.scale) in journey[0]


@needs_sample
def test_a_link_restores_the_activation_widgets() -> None:
    at = open_app(abits="4", aobs="percentile", scale="pow2")
    ok(at)
    assert not at.warning
    assert at.select_slider(key="abits").value == 4
    assert at.selectbox(key="aobs").value == "percentile"
    assert at.radio(key="scale").value == "pow2"
    assert "**W8A4** · simulated" in captions(at)
    c = calib_compressed(bits=8, abits=4, aobs="percentile", scale="pow2")
    m = qcore.evaluate(c.model, qcore.load_dataset("mnist-5k", "test"))
    assert the_metric(at, "Accuracy (simulated)").value == f"{m.accuracy:.1%}"
    q = at.query_params
    assert (q["abits"], q["aobs"], q["scale"]) == ("4", "percentile", "pow2")


@needs_sample
def test_one_bit_activations_in_a_link_warn_and_stay_float() -> None:
    at = open_app(abits="1")
    ok(at)
    assert len(at.warning) == 1 and "`abits=1`" in at.warning[0].value
    assert at.select_slider(key="abits").value == "float"
    assert "**W8A32** · simulated" in captions(at)


def test_activation_settings_round_trip_through_the_link_and_the_session() -> None:
    from pages.query import parse_query
    from pages.session import settings_from_session, settings_to_session

    names = ["conv1", "conv2", "fc1", "fc2"]

    def parse(**q: str):
        return parse_query(q, models=["mnist-cnn"], datasets=["mnist-5k"],
                           layer_names=lambda _: names)  # fmt: skip

    values, warnings = parse(abits="4", aobs="percentile", scale="pow2")
    assert warnings == [] and values == {"abits": 4, "aobs": "percentile", "scale": "pow2"}
    assert parse(abits="float")[0] == {"abits": "float"}  # the slider's float value
    s = Settings(bits=4, abits=8, aobs="entropy", scale="pow2")
    assert settings_from_session(settings_to_session(s, names), names) == s
    assert settings_from_session(parse(**s.to_flat())[0], names) == s
    assert settings_from_session(settings_to_session(Settings(), names), names) == Settings()


def test_activation_journey_clamps_and_dequantizes_by_plain_arithmetic() -> None:
    a = tables.ActInfo(edge="fc1.input", bits=8, observer="percentile", lo=0.0, hi=25.5,
                       observed_min=0.0, observed_max=30.0, scale=0.1, zero_point=0, qmin=0,
                       qmax=255, grid_lo=0.0, grid_hi=25.5, calib_images=500)  # fmt: skip
    rows = _rows(tables.act_journey_markdown(a, 30.0, "the largest value"))
    assert rows["code q"].endswith("300, clamped to **255**")
    assert rows["dequantized"].endswith("**25.5**")
    assert "outside: clipped" in rows["calibrated range"]
    assert rows["error"].startswith("dequantized − x | −4.5")
    inside = _rows(tables.act_journey_markdown(a, 1.04, "a value"))
    assert inside["code q"].endswith("| **10**") and "inside" in inside["calibrated range"]
    text = tables.act_caption(a, 256)
    assert "Calibrated on 500 calibration images" in text and "clipped" in text


# --- H: codebook (k-means) and entropy coding (Huffman) ---------------------------------------


def size_columns_match(table, c: qcore.Compressed) -> None:
    """The size columns say what qcore's layer records say, and add up to the layer."""
    table = table.set_index("layer")
    for s in c.layers:
        row, parts = table.loc[s.name], s.size_parts
        assert row["code bits"] == s.code_bits, s.name
        assert row["index bits"] == s.index_bits, s.name
        assert row["codebook bytes"] == parts["codebook_bytes"], s.name
        assert row["table bytes"] == parts["table_bytes"], s.name
        assert row["packed bytes"] == s.size_bytes == sum(parts.values()), s.name


@needs_sample
def test_a_link_sets_codebook_and_entropy_and_the_size_table_shows_where_bytes_go() -> None:
    q = dict(bits="4", prune="0.9", scope="global", codebook="kmeans", entropy="huffman")
    at = open_app(**q)
    ok(at)
    assert not at.warning
    assert at.radio(key="codebook").value == "kmeans"
    assert at.radio(key="entropy").value == "huffman"
    c = compressed(bits=4, prune=0.9, scope="global", codebook="kmeans", entropy="huffman")
    assert the_metric(at, "Packed size").value == tables.format_bytes(c.size_bytes)
    table = at.dataframe[0].value
    size_columns_match(table, c)
    by_layer = table.set_index("layer")
    for s in c.layers:
        assert s.codebook is not None and s.codebook.numel() <= 16
        assert by_layer.loc[s.name, "grid range"] == f"k-means: {s.codebook.numel()} shared values"
        assert by_layer.loc[s.name, "zero point"] == "none (codebook)"
        assert by_layer.loc[s.name, "codebook bytes"] == 4 * s.codebook.numel() > 0
    assert sum(by_layer["table bytes"]) > 0  # some stream is Huffman coded
    # k-means sets no grid: clip and range widgets are off; the link keeps both settings
    assert at.slider(key="clip").disabled and at.radio(key="symmetric").disabled
    for key, value in q.items():
        assert at.query_params[key] == value, key


@needs_sample
def test_entropy_coding_shrinks_the_file_and_leaves_accuracy_alone() -> None:
    at = open_app(bits="4", prune="0.8")
    ok(at)
    assert at.radio(key="codebook").value == "uniform"
    assert at.radio(key="entropy").value == "none"
    assert "codebook" not in at.query_params and "entropy" not in at.query_params
    before = the_metric(at, "Accuracy (simulated)").value
    plain = compressed(bits=4, prune=0.8)
    assert sum(at.dataframe[0].value["table bytes"]) == 0
    at.radio(key="entropy").set_value("huffman").run()
    ok(at)
    coded = compressed(bits=4, prune=0.8, entropy="huffman")
    assert coded.size_bytes < plain.size_bytes
    assert the_metric(at, "Packed size").value == tables.format_bytes(coded.size_bytes)
    assert the_metric(at, "Accuracy (simulated)").value == before  # the same weights
    size_columns_match(at.dataframe[0].value, coded)
    assert at.query_params["entropy"] == "huffman"
    at.radio(key="codebook").set_value("kmeans").run()
    ok(at)
    shared = compressed(bits=4, prune=0.8, entropy="huffman", codebook="kmeans")
    assert the_metric(at, "Packed size").value == tables.format_bytes(shared.size_bytes)
    size_columns_match(at.dataframe[0].value, shared)


@needs_sample
def test_codebook_and_entropy_help_explain_them_in_plain_words() -> None:
    at = open_app()
    ok(at)
    codebook, entropy = at.radio(key="codebook"), at.radio(key="entropy")
    assert codebook.label == "Codebook" and entropy.label == "Entropy coding"
    assert list(codebook.options) == ["uniform", "k-means"]
    assert list(entropy.options) == ["none", "Huffman"]
    assert "share at most 2^b values" in codebook.help and "codebook" in codebook.help
    assert "never makes the file larger" in entropy.help and "table" in entropy.help


@needs_sample
def test_k_means_with_per_channel_scales_says_what_was_changed() -> None:
    # issue 18 item 4: the link's clash gives a page of results and a note, not an error
    at = open_app(bits="4", per_channel="true", codebook="kmeans")
    ok(at)
    assert [i.value for i in at.info if "per-channel" in i.value] == [
        "A k-means codebook is shared by a whole layer, so per-channel scales do not apply: "
        "each layer gets one codebook (per-tensor)."
    ]
    assert at.radio(key="per_channel").disabled  # the control that clashes is off
    at.radio(key="codebook").set_value("uniform").run()
    ok(at)
    assert not at.radio(key="per_channel").disabled and at.radio(key="per_channel").value
    assert not [i for i in at.info if "per-channel" in i.value]


@needs_sample
def test_teaching_panels_say_a_k_means_layer_has_no_grid() -> None:
    at = show(open_app(bits="4", codebook="kmeans"), JOURNEY)
    ok(at)
    infos = [i.value for i in at.info]
    layer = layer_picker(at).value
    assert any(v.startswith(f"{layer} shares its weights through a k-means codebook: each")
               for v in infos), infos  # fmt: skip
    assert not any("left in float32" in v for v in infos), infos
    show(at, CURVE)
    ok(at)
    infos = [i.value for i in at.info]
    assert any("has no clip range" in v for v in infos), infos
    assert not any("left in float32" in v for v in infos), infos


def test_codebook_and_entropy_round_trip_through_the_link_and_the_session() -> None:
    from pages.query import parse_query
    from pages.session import settings_from_session, settings_to_session

    names = ["conv1", "conv2", "fc1", "fc2"]
    s = Settings(bits=5, prune=0.9, codebook="kmeans", entropy="huffman")
    values, warnings = parse_query(s.to_flat(), models=["mnist-cnn"], datasets=["mnist-5k"],
                                   layer_names=lambda _: names)  # fmt: skip
    assert warnings == []
    assert values["codebook"] == "kmeans" and values["entropy"] == "huffman"
    assert settings_from_session(values, names) == s
    assert settings_from_session(settings_to_session(s, names), names) == s


# --- in a real headless Chromium: what AppTest cannot see -------------------------------------

_no_browser = pytest.mark.skipif(
    not Path(CHROMIUM).exists() and not os.environ.get("QP_REQUIRE_BROWSER"),
    reason=f"Chromium not found at {CHROMIUM}",
)


def browser_test(f):
    """An end-to-end test: marked ``browser``, skipped without Chromium (unless CI requires
    it) or without the sample models."""
    return pytest.mark.browser(_no_browser(needs_sample(f)))


# Any metric text the browser cuts short with an ellipsis ("∞ (un…", "SQNR (whole mo…")
_CUT_SHORT = """() => [...document.querySelectorAll('[data-testid="stMetric"] *')]
    .filter(e => getComputedStyle(e).textOverflow === 'ellipsis' && e.scrollWidth > e.clientWidth)
    .map(e => e.innerText)"""


# resolves after two animation frames: a resized page has been laid out and painted again
_NEXT_FRAMES = "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"


def _open(page, url: str) -> None:
    page.goto(url, wait_until="domcontentloaded")
    for label in ("Accuracy (simulated", "Agreement"):  # the first card and the last
        page.locator('[data-testid="stMetric"]', has_text=label).wait_for(timeout=90_000)
    wait_idle(page)
    page.locator('[data-testid="stPlotlyChart"]').first.wait_for(timeout=60_000)


def _layer_picker_text(page) -> str:
    picker = page.locator('input[role="combobox"][aria-label="Layer"]')
    # a rerun may show the last run's picker beside the new one for a moment
    expect(picker).to_have_count(1, timeout=30_000)
    return picker.input_value()


def _histogram_title(page) -> str:
    chart = page.locator('[data-testid="stPlotlyChart"]', has_text="weight value").first
    return chart.locator(".gtitle").first.text_content().strip()


@browser_test
def test_browser_layer_picker_shows_the_layer_drawn_after_a_model_change(app_url) -> None:
    with browser_page() as page:
        _open(page, f"{app_url}/?model=mnist-cnn")
        pick_option(page, page.locator('[data-testid="stSelectbox"]', has_text="Layer").first,
                    page.get_by_role("option", name="fc1", exact=True))  # fmt: skip
        page.wait_for_function(
            """() => [...document.querySelectorAll('[data-testid="stPlotlyChart"] .gtitle')]
                .some(e => e.textContent.trim() === 'fc1')""",
            timeout=60_000,
        )
        assert _layer_picker_text(page) == "fc1"
        model_picker = page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').first
        pick_option(page, model_picker, page.get_by_role("option", name="mnist-dwsep",
                                                         exact=False))  # fmt: skip
        page.wait_for_function(
            """() => [...document.querySelectorAll('[data-testid="stPlotlyChart"] .gtitle')]
                .some(e => e.textContent.trim() === 'stem.0')""",
            timeout=90_000,
        )
        wait_idle(page)
        assert _histogram_title(page) == "stem.0"
        assert _layer_picker_text(page) == "stem.0"  # it read fc1 before the fix


@browser_test
@pytest.mark.parametrize(
    "query", ["", "bits=float", "bits=1&prune=0.5", "model=digits-mlp&dataset=digits&bits=2"]
)
def test_browser_no_headline_text_is_cut_short(app_url, query: str) -> None:
    with browser_page(viewport=(1400, 900)) as page:
        _open(page, f"{app_url}/?{query}")
        page.locator('[data-testid="stMetric"]', has_text="SQNR (whole model)").wait_for(
            timeout=30_000
        )
        wait_idle(page)
        for width in (1400, 1100):  # the same page, laid out again at the narrower width
            page.set_viewport_size({"width": width, "height": 900})
            page.evaluate(_NEXT_FRAMES)
            assert page.evaluate("() => window.innerWidth") == width
            assert page.evaluate(_CUT_SHORT) == [], width
            assert len(page.locator('[data-testid="stMetric"]').all()) == 5


@browser_test
def test_browser_mixed_precision_bars_log_no_colour_warnings(app_url) -> None:
    link = "?model=digits-mlp&dataset=digits"
    with browser_page() as page:
        messages: list[str] = []
        page.on("console", lambda m: messages.append(m.text))
        _open(page, f"{app_url}/{link}")
        page.goto(f"{app_url}/mixed{link}", wait_until="domcontentloaded")
        run = page.get_by_role("button", name="Find per-layer bits")
        run.wait_for(timeout=60_000)
        wait_idle(page)
        run.click()
        chart = page.locator('[data-testid="stPlotlyChart"]', has_text="Bits per layer")
        chart.wait_for(timeout=120_000)
        wait_idle(page)
        page.wait_for_timeout(1000)
        assert chart.locator("g.barlayer path").count() > 0
        assert not [m for m in messages if "Invalid color" in m], messages[:5]
