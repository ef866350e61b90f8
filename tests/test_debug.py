"""qcore.analyze: every number equals its own compress + evaluate, the SQNRs are finite and
behave, the calibration reuse and the suffix runner with points are exact; the CLI; the
model graph's DOT text and the Debug page's figures."""

from __future__ import annotations

import io
import math
from contextlib import redirect_stdout
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FakeDataset, _randomise_bn, state_hash
from test_app import needs_sample
from torch import nn

import qcore
from pages import compare, figures
from pages.query import parse_query
from qcore import activations, cli
from qcore.config import ActQuantConfig, CompressionConfig, PruneConfig, QuantConfig, Settings
from qcore.debug import (
    LAYER_COLUMNS,
    SUMMARY_SETTINGS,
    analyze,
    graph_outline,
    layer_configs,
    summary_configs,
    summary_sentence,
)
from qcore.evaluate import EVAL_BATCH


class TinyResNet(nn.Module):
    """conv-BN-ReLU stem, a residual block with a 1x1 shortcut, pooled linear head:
    input (N, 1, 6, 6), 3 classes; two residual additions."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.conv1 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.shortcut = nn.Conv2d(4, 6, 1)
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(s)))) + self.shortcut(s))
        y = torch.relu(self.conv3(y) + y)
        return self.fc(y.mean(dim=(2, 3)))


LAYERS = ["stem.0", "conv1", "conv2", "shortcut", "conv3", "fc"]


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    model = TinyResNet()
    _randomise_bn(model, 1)
    return model.eval()


@pytest.fixture(scope="module")
def data(resnet: nn.Module) -> tuple[FakeDataset, FakeDataset]:
    """A test split of 600 images (three batches of evaluate, the last short) labelled by
    the float model (so compression has accuracy to lose), and a calibration split."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(600, 1, 6, 6, generator=g)
    with torch.inference_mode():
        y = resnet(x).argmax(1)
    y = torch.where(torch.rand(600, generator=g) < 0.1, (y + 1) % 3, y)  # some wrong
    calib = FakeDataset(torch.randn(64, 1, 6, 6, generator=g), torch.zeros(64, dtype=torch.long),
                        ("a", "b", "c"), name="fake-calib")  # fmt: skip
    return FakeDataset(x, y, ("a", "b", "c")), calib


def _scored(model, cfg, test, calib) -> qcore.Metrics:
    c = qcore.compress(model, cfg, calib=calib if cfg.act is not None else None)
    return qcore.evaluate(c.model, test)


CONFIGS = {
    "W3A4": CompressionConfig(quant=QuantConfig(bits=3), act=ActQuantConfig(bits=4)),
    "W2 per-channel, prune 0.5, A6 percentile": CompressionConfig(
        quant=QuantConfig(bits=2, per_channel=True), prune=PruneConfig(rate=0.5),
        act=ActQuantConfig(bits=6, observer="percentile", percentile=99.0)),
    "W4 weights only, unfolded": CompressionConfig(quant=QuantConfig(bits=4), fold_bn=False),
    "A3 activations only, three layers": CompressionConfig(
        quant=None, act=ActQuantConfig(bits=3), layers=("conv1", "conv3", "fc")),
    # variants that differ from their base beyond one layer: they run whole
    "global pruning, stochastic rounding": CompressionConfig(
        quant=QuantConfig(bits=3, rounding="stochastic", seed=3),
        prune=PruneConfig(rate=0.6, scope="global"), act=ActQuantConfig(bits=5)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_accuracy_equals_its_own_compress_and_evaluate(resnet, data, name) -> None:
    test, calib = data
    cfg = CONFIGS[name]
    before = state_hash(resnet)
    a = analyze(resnet, cfg, test, calib=calib)
    assert state_hash(resnet) == before  # the shared model is never changed
    assert a.summary["setting"].tolist() == list(SUMMARY_SETTINGS)
    for setting, c in summary_configs(cfg).items():
        m = _scored(resnet, c, test, calib)
        row = a.summary.set_index("setting").loc[setting]
        assert (row["accuracy"], row["loss"]) == (m.accuracy, m.loss), setting
    records = qcore.compress(resnet, cfg, calib=calib).layers
    names = [r.name for r in records]
    assert a.layers["layer"].tolist() == names  # Compressed.layers order
    assert list(a.layers.columns) == list(LAYER_COLUMNS)
    only, rest = layer_configs(cfg, names)
    for _, row in a.layers.iterrows():
        m = _scored(resnet, only[row["layer"]], test, calib)
        assert (row["accuracy_only_this"], row["loss_only_this"]) == (m.accuracy, m.loss)
        m = _scored(resnet, rest[row["layer"]], test, calib)
        assert (row["accuracy_all_but_this"], row["loss_all_but_this"]) == (m.accuracy, m.loss)
    # a layer makes error where its weights are compressed or the edge it reads is
    # quantized; with neither (its input left float by the fused placement) it makes none
    for r, local in zip(records, a.layers["sqnr_local_db"], strict=True):
        if r.changed or r.act is not None:
            assert np.isfinite(local), r.name
        else:
            assert local == np.inf, r.name
    assert np.isfinite(a.layers["sqnr_cumulative_db"]).all()
    assert a.n == 600


def test_the_analysis_loses_accuracy_where_it_should(resnet, data) -> None:
    test, calib = data
    a = analyze(resnet, CONFIGS["W3A4"], test, calib=calib)
    acc = a.summary.set_index("setting")["accuracy"]
    # folding BatchNorm changes the arithmetic, hardly a class
    assert abs(acc["float"] - qcore.evaluate(resnet, test).accuracy) <= 1 / 600
    assert acc["both"] < acc["float"]
    # keeping a layer float is "all but this": the gain is that column against "both"
    gain = a.float_keeping
    assert gain.to_dict() == pytest.approx(
        (a.layers.set_index("layer")["accuracy_all_but_this"] - acc["both"]).to_dict())
    best = a.best_float_layer
    assert best == gain.idxmax() and gain[best] > 0
    worst = a.worst_layers(3)
    assert worst["sqnr_local_db"].tolist() == sorted(a.layers["sqnr_local_db"])[:3]
    with pytest.raises(ValueError, match="No column"):
        a.worst_layers(3, by="colour")


def test_local_equals_cumulative_where_nothing_before_is_compressed(resnet, data) -> None:
    """The first layer reads the network input in both runs; a layer compressed alone
    reads float values in both: there, made and piled-up error are one error."""
    test, _ = data
    a = analyze(resnet, CompressionConfig(quant=QuantConfig(bits=3)), test)
    rows = a.layers.set_index("layer")
    assert rows.loc["stem.0", "sqnr_local_db"] == rows.loc["stem.0", "sqnr_cumulative_db"]
    alone = analyze(resnet, CompressionConfig(quant=QuantConfig(bits=3), layers=("conv2",)),
                    test).layers  # fmt: skip
    assert alone["layer"].tolist() == ["conv2"]
    assert alone.loc[0, "sqnr_local_db"] == alone.loc[0, "sqnr_cumulative_db"]
    assert math.isnan(alone.loc[0, "accuracy_all_but_this"])  # no other layer to compress


def test_local_sqnr_by_hand_for_a_linear_model(mlp, images) -> None:
    """digits-like MLP: fc0 local SQNR from its float input and its 2-bit weight by hand."""
    y = torch.zeros(16, dtype=torch.long)
    test = FakeDataset(images, y, ("a", "b", "c"))
    cfg = CompressionConfig(quant=QuantConfig(bits=2))
    a = analyze(mlp, cfg, test)
    c = qcore.compress(mlp, cfg)
    first, second = c.layers
    x = images.flatten(1).double()
    ref = x @ first.float_weight.double().T + mlp[1].bias.detach().double()  # the float output
    err = x @ (first.float_weight.double() - first.dequantized.double()).T
    want = 10 * math.log10(float((ref**2).sum()) / float((err**2).sum()))
    assert a.layers.loc[0, "sqnr_local_db"] == pytest.approx(want, rel=1e-6)
    assert a.layers.loc[0, "weight_sqnr_db"] == first.sqnr_db
    assert a.layers.loc[1, "bits"] == second.bits == 2


def test_calibrating_fewer_edges_reuses_a_larger_calibration_exactly(resnet, data) -> None:
    _, calib = data
    graph = qcore.graph_of(resnet)
    cfg = ActQuantConfig(bits=4, observer="mse")
    every = activations.activation_edges(graph)
    few = activations.activation_edges(graph, ["conv2"])
    assert set(few) < set(every)
    activations._CALIBRATED.pop(graph, None)
    fresh = activations.calibrate(graph, calib, cfg, few)
    activations._CALIBRATED.pop(graph, None)
    big = activations.calibrate(graph, calib, cfg, every)
    reused = activations.calibrate(graph, calib, cfg, few)
    assert list(reused) == few
    for e in few:
        assert reused[e] is big[e]  # taken from the larger calibration, not recomputed
        assert torch.equal(reused[e].qparams.scale, fresh[e].qparams.scale)
        assert torch.equal(reused[e].qparams.zero_point, fresh[e].qparams.zero_point)
        assert (reused[e].lo, reused[e].hi) == (fresh[e].lo, fresh[e].hi)


def test_run_suffix_with_points_equals_a_whole_run(resnet, data) -> None:
    test, calib = data
    c = qcore.compress(resnet, CONFIGS["W3A4"], calib=calib)
    graph, r, p = c.graph, c.replacements(), c.model.points
    plan = graph.plan(["conv2.weight", "conv2.bias"])
    base = {k: v for k, v in r.items() if not k.startswith("conv2.")}
    base_p = {e: f for e, f in p.items() if e != "conv2.input"}
    x = test.x[:EVAL_BATCH]
    with torch.inference_mode():
        _, cache = graph.run(x, base, base_p, keep=plan.reads)
        assert torch.equal(graph.run_suffix(plan, cache, r, p), graph.run(x, r, p))


def test_bad_arguments_are_sentences(resnet, data) -> None:
    test, calib = data
    with pytest.raises(ValueError, match="CompressionConfig"):
        analyze(resnet, {"bits": 3}, test)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="calibration data"):
        analyze(resnet, CONFIGS["W3A4"], test)
    empty = FakeDataset(test.x[:0], test.y[:0], test.classes)
    with pytest.raises(ValueError, match="empty"):
        analyze(resnet, CONFIGS["W3A4"], empty, calib=calib)


def test_progress_reports_every_summary_row_and_batch(resnet, data) -> None:
    test, _ = data
    seen = []
    analyze(resnet, CompressionConfig(quant=QuantConfig(bits=4)), test,
            progress=lambda d, t, row: seen.append((d, t)))  # fmt: skip
    assert seen == [(i, 1 + 4 + 3) for i in range(1, 9)]  # compressed, 4 rows, 3 batches


def test_summary_sentence_in_words() -> None:
    t = pd.DataFrame({"setting": list(SUMMARY_SETTINGS), "accuracy": [0.99, 0.99, 0.995, 0.5],
                      "loss": [0.1] * 4})  # fmt: skip
    assert summary_sentence(t) == ("Weights cost nothing, activations gain 0.5 pp, both cost "
                                   "49.0 pp (float 99.0 %, both 50.0 %).")  # fmt: skip


# --- the graph and the figures ----------------------------------------------------------------


def test_the_graph_names_every_weight_layer_and_shows_adds_and_activation_edges(
    resnet, data
) -> None:
    test, calib = data
    a = analyze(resnet, CONFIGS["W3A4"], test, calib=calib)
    kinds = [n.kind for n in a.outline]
    assert kinds.count("add") == 2 and kinds.count("layer") == len(LAYERS)
    assert [n.layer for n in a.outline if n.kind == "layer"] == LAYERS
    sqnr = dict(zip(a.layers["layer"], a.layers["sqnr_local_db"], strict=True))
    dot = figures.model_graph_dot(a.outline, sqnr, a.act_edges, act_label="A4")
    for layer in LAYERS:
        assert f'label="{layer}\\n' in dot, layer
    assert dot.count('shape="circle"') == 2  # the two residual additions
    # every fake-quantized edge is drawn as one: the input and each fused group's output
    assert dot.count('label=" A4"') >= len(LAYERS)
    for _, color, text in figures.SQNR_BANDS:
        assert text in dot and color in dot
    for layer, db in sqnr.items():
        assert f"SQNR {db:.1f} dB" in dot and figures.sqnr_color(db) in dot, layer
    assert dot.startswith("digraph model {") and dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")


def test_sqnr_colours_sit_on_a_fixed_scale() -> None:
    assert figures.sqnr_color(9.99) == figures.SQNR_BANDS[0][1]
    assert figures.sqnr_color(10.0) == figures.SQNR_BANDS[1][1]
    assert figures.sqnr_color(39.9) == figures.SQNR_BANDS[3][1]
    assert figures.sqnr_color(120.0) == figures.SQNR_BANDS[4][1]
    assert figures.sqnr_color(-3.0) == figures.SQNR_BANDS[0][1]
    assert figures.sqnr_color(math.inf) == figures.sqnr_color(math.nan) == figures.EXACT_COLOR


def test_outline_of_a_plain_mlp(mlp) -> None:
    outline = graph_outline(qcore.graph_of(mlp))
    assert [(n.kind, n.label) for n in outline] == [
        ("input", "input"), ("other", "flatten"), ("layer", "linear 36→16"),
        ("activation", "relu"), ("layer", "linear 16→3"), ("output", "output")]  # fmt: skip
    assert outline[2].inputs == (outline[1].name,)


def test_debug_figures_draw_what_they_are_given() -> None:
    t = pd.DataFrame({"setting": list(SUMMARY_SETTINGS), "accuracy": [0.99, 0.98, 0.9, 0.85],
                      "loss": [0.1, 0.2, 0.3, 0.4]})  # fmt: skip
    fig = figures.debug_summary_bars(t)
    assert list(fig.data[0].x) == list(SUMMARY_SETTINGS)
    assert list(fig.data[0].y) == pytest.approx([99, 98, 90, 85])
    layers = pd.DataFrame({"layer": ["a", "b"], "sqnr_local_db": [12.0, math.inf],
                           "sqnr_cumulative_db": [12.0, 3.5]})  # fmt: skip
    fig = figures.sqnr_lines(layers)
    assert [list(d.x) for d in fig.data] == [["a", "b"], ["a", "b"]]
    assert fig.data[0].y[0] == 12.0 and math.isnan(fig.data[0].y[1])  # inf: no point
    assert list(fig.data[1].y) == [12.0, 3.5]


def test_compare_histograms_overlay_both_settings() -> None:
    w = torch.linspace(-1, 1, 101)
    ha = qcore.weight_histogram(w, torch.round(w * 2) / 2, bins=10)
    hb = qcore.weight_histogram(w, torch.round(w * 4) / 4, bins=12)
    fig = figures.compare_histograms(ha, hb, names=("A: W2A32", "B: W3A32"))
    assert [d.name for d in fig.data] == ["float weights", "A: W2A32", "B: W3A32"]
    assert sum(fig.data[1].y) == sum(fig.data[2].y) == 101
    assert fig.layout.barmode == "overlay"


# --- the link's setting A ---------------------------------------------------------------------


@pytest.mark.parametrize("s", [
    Settings(bits=3, abits=4),
    Settings(bits=None, prune=0.5, structured=True),
    Settings(bits=4, clip=2.5, clip_mode="sigma", per_channel=True, layers=("fc1",),
             layer_bits=(("fc1", 2),)),
])  # fmt: skip
def test_setting_a_round_trips_through_its_link_value(s: Settings) -> None:
    text = compare.encode(s)
    assert "&" in text and "?" not in text
    back, warnings = compare.decode(text, ["fc1", "fc2"], model="m")
    assert warnings == [] and back == s


def test_a_bad_setting_a_warns_and_keeps_the_default() -> None:
    back, warnings = compare.decode("bits=99&colour=red", ["fc1"], model="m")
    assert back.bits == Settings().bits
    assert warnings == [
        "The pinned setting A has an unknown setting `colour`; it was ignored.",
        "The pinned setting A's `bits=99` is not valid (a whole number from 1 to 16, or "
        "float); using the default.",
    ]
    _, warnings = compare.decode("&".join(f"k{i}=1" for i in range(100)), ["fc1"], model="m")
    assert len(warnings) == 1 and "more than" in warnings[0]


def test_the_link_keeps_a_for_compare_mode_and_warns_about_nothing() -> None:
    values, ignored = parse_query({"model": "m", "a": "bits=3&clip=1"}, models=["m"],
                                  datasets=[], layer_names=lambda m: [])  # fmt: skip
    assert values == {"model": "m", "compare_a_link": "bits=3&clip=1"} and ignored == []


# --- the command line -------------------------------------------------------------------------


@needs_sample
def test_cli_analyze_prints_the_analysis_as_csv() -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli.main(["analyze", "--model", "digits-mlp", "--bits", "3", "--abits", "4",
                               "--csv", "--quiet"])  # fmt: skip
    assert code == 0
    summary_text, layers_text = out.getvalue().split("\n\n")
    summary = pd.read_csv(io.StringIO(summary_text))
    layers = pd.read_csv(io.StringIO(layers_text))
    model = qcore.load_model("digits-mlp")
    cfg = Settings(bits=3, abits=4).to_config()
    a = analyze(model, cfg, qcore.load_dataset("digits"),
                calib=qcore.load_dataset("digits", "calib"))  # fmt: skip
    pd.testing.assert_frame_equal(summary, a.summary)
    assert layers["layer"].tolist() == a.layers["layer"].tolist() == ["fc1", "fc2"]
    assert layers["accuracy_only_this"].tolist() == a.layers["accuracy_only_this"].tolist()
    assert layers["sqnr_local_db"].to_numpy() == pytest.approx(a.layers["sqnr_local_db"])


@needs_sample
def test_cli_analyze_table_names_the_layer_to_keep_float(capsys) -> None:
    assert cli.main(["analyze", "--model", "digits-mlp", "--bits", "2", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[1].startswith("Weights cost ")
    assert "accuracy simulated" in text and "fc1" in text and "fc2" in text
    assert cli.main(["analyze", "--model", "digits-mlp", "--abits", "4", "--bits", "1x"]) == 2


def test_summary_configs_split_weights_from_activations() -> None:
    cfg = CONFIGS["W2 per-channel, prune 0.5, A6 percentile"]
    cfg = replace(cfg, drop=("layer1",))
    c = summary_configs(cfg)
    assert c["both"] is cfg
    assert c["weights only"] == replace(cfg, act=None)
    assert c["activations only"] == replace(cfg, quant=None, prune=None, drop=())
    assert c["float"].keeps_float and c["float"].act is None


@needs_sample
@pytest.mark.parametrize("name", qcore.list_models())
def test_every_sample_models_graph_names_each_of_its_weight_layers(name: str) -> None:
    model = qcore.load_model(name)
    outline = graph_outline(qcore.graph_of(model))
    layers = list(qcore.weight_layers(model))
    assert [n.layer for n in outline if n.kind == "layer"] == layers
    dot = figures.model_graph_dot(outline, dict.fromkeys(layers, 12.0))
    for layer in layers:
        assert f'label="{layer}\\n' in dot
    assert dot.count(f'fillcolor="{figures.sqnr_color(12.0)}"') == len(layers) + 1  # + legend
    names = {n.name for n in outline}
    assert all(i in names for n in outline for i in n.inputs)  # every edge has both ends
