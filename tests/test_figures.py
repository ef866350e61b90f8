"""Figure builders as plain functions: checked against the counts they were given."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from _plotly_utils.basevalidators import ColorValidator
from conftest import FakeDataset, make_mlp

import qcore
from pages import controls, figures, tables


def _layer_hist(bits: int = 3, clip: float = 0.5, per_channel: bool = False, **kw):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 32, generator=g)
    cfg = qcore.QuantConfig(bits=bits, clip=clip, per_channel=per_channel)
    res = qcore.quantize_with_params(w, cfg)
    lo, hi = float(res.qparams.lo[0]), float(res.qparams.hi[0])
    levels = torch.unique(res.values)
    return w, res, qcore.weight_histogram(w, res.values, 40, levels=levels, clip=(lo, hi), **kw)


def _trace(fig: go.Figure, prefix: str):
    found = [t for t in fig.data if (t.name or "").startswith(prefix)]
    assert len(found) == 1, [t.name for t in fig.data]
    return found[0]


def test_histogram_bars_carry_the_counts_on_shared_bins() -> None:
    w, res, h = _layer_hist()
    fig = figures.weight_histogram_figure(h, title="fc1")
    before, after = _trace(fig, "float"), _trace(fig, "compressed")
    assert isinstance(before, go.Bar) and isinstance(after, go.Bar)
    np.testing.assert_array_equal(before.y, h.before)
    np.testing.assert_array_equal(after.y, h.after)
    np.testing.assert_allclose(before.x, (h.edges[:-1] + h.edges[1:]) / 2)
    np.testing.assert_allclose(after.x, before.x)  # the same bins
    assert sum(before.y) == sum(after.y) == w.numel()
    assert fig.layout.barmode == "overlay"
    assert fig.layout.title.text == "fc1"
    assert fig.layout.yaxis.type == "linear"


def test_histogram_draws_every_level_and_both_clip_bounds() -> None:
    _, res, h = _layer_hist(bits=3)
    fig = figures.weight_histogram_figure(h)
    levels = _trace(fig, "7 quantization levels")  # 3-bit symmetric: codes -3..3
    xs = np.asarray(levels.x, dtype=float)
    drawn = np.unique(xs[~np.isnan(xs)])
    np.testing.assert_allclose(drawn, np.sort(h.levels))
    assert levels.yaxis == "y2" and tuple(fig.layout.yaxis2.range) == (0, 1)
    clip_x = sorted(s.x0 for s in fig.layout.shapes)
    np.testing.assert_allclose(clip_x, sorted(h.clip))
    _trace(fig, "grid range")  # the range the codes reach, named as such
    texts = [a.text for a in fig.layout.annotations]
    assert any(t.startswith("grid low") for t in texts) and not any("clip" in t for t in texts)
    texts = [a.text for a in fig.layout.annotations]
    assert any("exactly zero after" in t and f"{h.zeros_after:,}" in t for t in texts)


def test_histogram_without_levels_or_clip_and_log_scale() -> None:
    w = torch.linspace(-1, 1, 101)
    h = qcore.weight_histogram(w, torch.where(w.abs() < 0.2, 0.0, w), 10)
    fig = figures.weight_histogram_figure(h, log_y=True)
    assert fig.layout.yaxis.type == "log"
    assert len(fig.layout.shapes) == 0
    assert [t.name for t in fig.data] == ["float weights", "compressed weights"]
    assert h.zeros_after == 19
    assert any("19 weights exactly zero after" in a.text for a in fig.layout.annotations)


def test_histogram_of_a_compressed_layer_draws_255_levels_as_one_trace() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    c = qcore.compress(model, qcore.CompressionConfig(quant=qcore.QuantConfig(bits=8)))
    h = qcore.layer_histogram(c, "1")
    fig = figures.weight_histogram_figure(h)
    # one trace of segments for all levels, not 255 shapes (the browser draws it quickly)
    assert len(fig.data) == 4 and len(fig.layout.shapes) <= 2
    xs = np.asarray(_trace(fig, "255 quantization levels").x, dtype=float)
    np.testing.assert_array_equal(xs[0::3], np.asarray(h.levels, dtype=float))
    np.testing.assert_array_equal(xs[1::3], xs[0::3])
    assert np.isnan(xs[2::3]).all() and len(xs) == 3 * 255


@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_histogram_of_a_kmeans_layer_draws_its_shared_values(rate: float) -> None:
    model = make_mlp()
    cfg = qcore.CompressionConfig(quant=qcore.QuantConfig(bits=3, codebook="kmeans"),
                                  prune=qcore.PruneConfig(rate=rate))  # fmt: skip
    c = qcore.compress(model, cfg)
    res = c.layer("1")
    h = qcore.layer_histogram(c, "1")
    # every value a weight takes after sharing, zero included when pruning removed some
    values = torch.unique(res.dequantized).double().numpy()
    np.testing.assert_array_equal(np.asarray(h.levels), values)
    assert h.clip is None and h.requested is None  # a codebook has no grid
    assert h.shared == res.codebook.numel() <= 2**3
    assert len(values) == h.shared + (rate > 0)
    fig = figures.weight_histogram_figure(h)
    pruned = " and 0 (pruned)" if rate > 0 else ""
    trace = _trace(fig, f"{h.shared} shared values (k-means){pruned}")
    assert trace.name == f"{h.shared} shared values (k-means){pruned}"
    np.testing.assert_array_equal(np.asarray(trace.x, dtype=float)[0::3], values)
    assert not [t for t in fig.data if "quantization levels" in (t.name or "")]


def test_confusion_figure_shows_matrix_and_change() -> None:
    m = np.array([[5, 1], [2, 7]])
    ref = np.array([[6, 0], [1, 8]])
    fig = figures.confusion_figure(m, ["cat", "dog"], title="t")
    (heat,) = fig.data
    assert isinstance(heat, go.Heatmap)
    # row percentages, and it says so (issue 18 item 12); the counts ride in the hover
    np.testing.assert_allclose(heat.z, [[500 / 6, 100 / 6], [200 / 9, 700 / 9]])
    np.testing.assert_allclose(np.sum(heat.z, axis=1), [100, 100])
    np.testing.assert_array_equal(heat.customdata, m)
    assert "each row sums to 100" in heat.colorbar.title.text
    assert "% of the row" in heat.hovertemplate and "images" in heat.hovertemplate
    assert list(heat.x) == list(heat.y) == ["cat", "dog"]
    assert fig.layout.yaxis.autorange == "reversed"  # true class 0 on top
    diff = figures.confusion_figure(m, ["cat", "dog"], reference=ref)
    np.testing.assert_allclose(diff.data[0].z, [[500 / 6 - 100, 100 / 6],
                                                [200 / 9 - 100 / 9, 700 / 9 - 800 / 9]])
    np.testing.assert_array_equal(diff.data[0].customdata, m - ref)
    assert diff.data[0].zmid == 0


def test_display_images_undo_normalisation_and_enlarge() -> None:
    pix = np.random.default_rng(0).random((3, 1, 28, 28)).astype(np.float32)
    mean, std = (0.1307,), (0.3081,)
    x = (pix - mean[0]) / std[0]
    out = controls.display_images(x, mean, std)
    assert len(out) == 3 and out[0].shape == (84, 84)  # 28 px repeated 3 times
    np.testing.assert_allclose(out[1][::3, ::3], pix[1, 0], atol=1e-6)
    assert out[0].min() >= 0.0 and out[0].max() <= 1.0


def test_display_images_colour_and_clipping() -> None:
    x = np.full((2, 3, 32, 32), 10.0, dtype=np.float32)  # far above 1 after un-normalising
    out = controls.display_images(x, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), min_size=64)
    assert out[0].shape == (64, 64, 3)
    assert np.all(out[0] == 1.0)
    with pytest.raises(ValueError, match="K, C, H, W"):
        controls.display_images(np.zeros((28, 28)), (0.0,), (1.0,))


# --- trade-offs, layer sensitivity and mixed precision ----------------------------------------

def _tiny_sweep() -> pd.DataFrame:
    g = torch.Generator().manual_seed(123)
    ds = FakeDataset(torch.randn(16, 1, 6, 6, generator=g),
                     torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(7)),
                     ("a", "b", "c"))  # fmt: skip
    grid = qcore.SweepGrid(bits=[2, 8, None], prune_rates=[0.0, 0.5], symmetric=[True, False])
    return qcore.sweep(make_mlp(), ds, grid)


def _sensitivity_table() -> pd.DataFrame:
    """A hand-made layer_sensitivity table: conv (2 bits: -30 pts), fc (2 bits: -5 pts)."""
    rows = []
    for i, (layer, drops, sqnr, params) in enumerate(
        [("conv", {2: 0.30, 8: 0.0}, {2: 3.0, 8: 40.0}, 320),
         ("fc", {2: 0.05, 8: 0.01}, {2: 5.0, 8: math.inf}, 1000)]
    ):  # fmt: skip
        for b in (2, 8):
            rows.append({"layer": layer, "index": i, "kind": "quant", "setting": float(b),
                         "accuracy": 0.9 - drops[b], "drop": drops[b], "sqnr_db": sqnr[b],
                         "params": params})  # fmt: skip
        for rate, drop in ((0.5, 0.02 * (i + 1)), (0.9, 0.2 * (i + 1))):
            rows.append({"layer": layer, "index": i, "kind": "prune", "setting": rate,
                         "accuracy": 0.9 - drop, "drop": drop, "sqnr_db": 1.0,
                         "params": params})  # fmt: skip
    return pd.DataFrame(rows)


def test_tradeoff_figure_points_front_star_and_hover() -> None:
    df = _tiny_sweep()
    front = qcore.pareto_front(df)
    current = {"size_bytes": 500, "accuracy": 0.5, "label": "4 bits"}
    extra = [{"size_bytes": 300, "accuracy": 0.55, "name": "mixed precision", "label": "m"}]
    fig = figures.tradeoff_figure(df, front, current=current, extra=extra, float_accuracy=0.56)
    assert fig.layout.xaxis.type == "log"
    groups = [t for t in fig.data if t.name.startswith("prune ")]
    assert sorted(t.name for t in groups) == ["prune 0", "prune 0.5"]  # coloured by pruning
    xs = sorted(x for t in groups for x in t.x)
    assert np.allclose(xs, sorted(df["size_bytes"] / 1e3))  # every row once, in kB
    ys = sorted(y for t in groups for y in t.y)
    assert np.allclose(ys, sorted(df["accuracy"]))
    line = _trace(fig, "Pareto front")
    assert line.mode == "lines" and np.allclose(line.x, front["size_bytes"] / 1e3)
    assert list(line.y) == front["accuracy"].tolist()
    star = _trace(fig, "Playground setting")
    # an open star (issue 18 item 12): the points it sits on show through it
    assert star.marker.symbol == "star-open" and star.x == (0.5,) and star.y == (0.5,)
    assert fig.layout.xaxis.dtick == "D2"  # log axis labelled at 1, 2 and 5 only
    assert _trace(fig, "mixed precision").x == (0.3,)
    hover = " ".join(t for g in groups for t in g.text)
    for word in ("2 bits", "8 bits", "float32", "clip 1", "prune 0.5", "asymmetric",
                 "per-tensor", "x smaller"):  # fmt: skip
        assert word in hover, word
    by_scheme = figures.tradeoff_figure(df, None, color_by="scheme")
    assert sorted(t.name for t in by_scheme.data) == [
        "asymmetric, per-tensor", "float32", "symmetric, per-tensor"]  # fmt: skip
    with pytest.raises(ValueError, match="color_by"):
        figures.tradeoff_figure(df, None, color_by="bits")


def test_tradeoff_figure_budget_line_and_single_rate_colours_by_scheme() -> None:
    df = _tiny_sweep()
    one_rate = df[df["prune"] == 0.0]
    fig = figures.tradeoff_figure(one_rate, qcore.pareto_front(one_rate), budget_bytes=600)
    assert "symmetric, per-tensor" in [t.name for t in fig.data]
    budget = [t for t in fig.data if t.name.startswith("budget")]
    assert len(budget) == 1 and list(budget[0].x) == [0.6, 0.6]  # in kB, as the points


def test_config_label_of_sweep_rows() -> None:
    assert figures.config_label({"bits": 4, "clip": 0.9, "clip_mode": "ratio", "prune": 0.5,
                                 "scheme": "symmetric", "granularity": "per-channel"}) == (
        "4 bits · clip 0.9 · symmetric · per-channel · prune 0.5")  # fmt: skip
    assert figures.config_label({"bits": pd.NA, "prune": 0.0}) == "float32 · prune 0"


def test_sensitivity_heatmap_shows_drops_in_points() -> None:
    df = _sensitivity_table()
    matrix = qcore.sensitivity_matrix(df, "quant", "drop")
    fig = figures.sensitivity_heatmap(matrix)
    heat = fig.data[0]
    assert list(heat.y) == ["conv", "fc"] and list(heat.x) == ["2 bits", "8 bits"]
    assert np.allclose(heat.z, [[30.0, 0.0], [5.0, 1.0]])


def test_sqnr_bars_at_one_bit_width() -> None:
    df = _sensitivity_table()
    bars = figures.sqnr_bars(df, 2).data[0]
    assert list(bars.x) == ["conv", "fc"] and np.allclose(bars.y, [3.0, 5.0])
    assert list(bars.customdata) == [320, 1000]
    unchanged = figures.sqnr_bars(df, 8).data[0]
    assert unchanged.y[0] == 40.0 and math.isnan(unchanged.y[1])  # inf: no bar, text ∞
    assert list(unchanged.text) == ["40.0", "∞"]


def test_prune_curves_one_line_per_layer_from_float() -> None:
    df = _sensitivity_table()
    fig = figures.prune_curves(df, float_accuracy=0.9)
    assert [t.name for t in fig.data] == ["conv", "fc"]
    conv = fig.data[0]
    assert list(conv.x) == [0.0, 0.5, 0.9] and np.allclose(conv.y, [0.9, 0.88, 0.7])
    assert list(figures.prune_curves(df).data[1].x) == [0.5, 0.9]


def test_sensitivity_summary_names_most_and_least_sensitive() -> None:
    df = _sensitivity_table()
    assert tables.sensitivity_summary(df) == (
        "Most sensitive: conv (drop 30.0 pts at 2 bits); "
        "least sensitive: fc (drop 5.0 pts at 2 bits)."
    )
    prune_only = df[df["kind"] == "prune"]
    assert tables.sensitivity_summary(prune_only).startswith(
        "Most sensitive: fc (drop 40.0 pts pruned 90%)")  # fmt: skip
    one = df[df["layer"] == "fc"]
    assert tables.sensitivity_summary(one) == "Only one layer: fc (drop 5.0 pts at 2 bits)."
    tie = df.copy()
    tie.loc[(tie["kind"] == "quant") & (tie["setting"] == 2.0), "drop"] = 0.1
    # equal drops at 2 bits: the mean over all bit widths decides (fc loses 1 pt at 8 bits)
    assert tables.sensitivity_summary(tie).startswith("Most sensitive: fc")
    with pytest.raises(ValueError):
        tables.sensitivity_summary(df.iloc[0:0])


def test_bits_bars_in_model_order_with_params() -> None:
    fig = figures.bits_bars({"conv1": 8, "fc1": 3, "fc2": 4}, {"conv1": 320, "fc1": 9000})
    bars = fig.data[0]
    assert list(bars.x) == ["conv1", "fc1", "fc2"] and list(bars.y) == [8, 3, 4]
    assert list(bars.customdata) == [320, 9000, 0]
    assert "9,000 params" in fig.layout.xaxis.ticktext[1]


def test_format_bytes_keeps_three_significant_figures() -> None:
    from pages.tables import format_bytes

    assert [format_bytes(n) for n in (0, 840, 1000, 9500, 12_345, 126_640, 1_334_104)] == [
        "0 B", "840 B", "1.00 kB", "9.50 kB", "12.3 kB", "127 kB", "1.33 MB",
    ]


def test_three_levels_are_called_ternary_and_two_binary() -> None:
    w = torch.linspace(-1, 1, 101)
    for levels, label in (([-0.5, 0.0, 0.5], "3 quantization levels (ternary)"),
                          ([-0.5, 0.5], "2 quantization levels (binary)"),
                          ([-1.0, -0.5, 0.0, 0.5, 1.0], "5 quantization levels")):  # fmt: skip
        h = qcore.weight_histogram(w, w, 10, levels=torch.tensor(levels), clip=(-0.5, 0.5))
        fig = figures.weight_histogram_figure(h)
        assert [t.name for t in fig.data if "levels" in (t.name or "")] == [label]


# --- the clip error curve ---------------------------------------------------------------------


class _Curve:
    """A hand-made error curve: clipping error falls with c, rounding error grows with c."""

    def __init__(self) -> None:
        c = np.linspace(0.1, 1.0, 10)
        clip = (1.0 - c) ** 2 * 10
        rounding = c**2
        self.table = pd.DataFrame(
            {"c": c, "clip_error": clip, "rounding_error": rounding, "total": clip + rounding}
        ).iloc[::-1]  # unsorted on purpose: the figure sorts by c
        best = int(np.argmin(clip + rounding))
        self.current = (1.0, float(clip[-1] + rounding[-1]))
        self.optimum = (float(c[best]), float((clip + rounding)[best]))
        self.max_abs = 0.9


def test_clip_error_figure_stacks_both_parts_and_marks_now_and_optimum() -> None:
    curve = _Curve()
    fig = figures.clip_error_figure(curve, x_title="clip (ratio of max|w|)", title="fc1")
    t = curve.table.sort_values("c")
    clip, rounding = _trace(fig, "clipping error"), _trace(fig, "rounding error")
    assert clip.stackgroup == rounding.stackgroup  # stacked: rounding drawn on top of clipping
    np.testing.assert_allclose(clip.x, t["c"])
    np.testing.assert_allclose(clip.y, t["clip_error"])
    np.testing.assert_allclose(rounding.y, t["rounding_error"])
    total = _trace(fig, "total squared error")
    np.testing.assert_allclose(total.y, np.asarray(clip.y) + np.asarray(rounding.y))
    now = _trace(fig, "now: c = 1")
    best = _trace(fig, "least error (mse): c = ")
    assert now.x == (1.0,) and now.y == (pytest.approx(curve.current[1]),)
    assert best.x == (pytest.approx(curve.optimum[0]),) and best.marker.symbol == "star"
    assert best.y[0] == pytest.approx(min(t["total"]))
    assert sorted(s.x0 for s in fig.layout.shapes) == sorted([curve.optimum[0], 1.0, 0.9])
    texts = [a.text for a in fig.layout.annotations]
    assert "now: c = 1" in texts and "max|w|" in texts
    assert any(t.startswith("least error (mse): c = ") for t in texts)
    top = fig.layout.yaxis.range[1]  # the valley fills the plot; tiny c's huge error is cut
    assert max(t["total"]) > top > 1.2 * max(t.loc[t["c"] >= curve.optimum[0] / 2, "total"])
    assert fig.layout.xaxis.title.text == "clip (ratio of max|w|)"
    assert fig.layout.title.text == "fc1" and fig.layout.yaxis.type == "linear"
    assert figures.clip_error_figure(curve, log_y=True).layout.yaxis.type == "log"


# --- every colour is one plotly.js reads (the browser logged "Invalid color specifier") -----

_HEX = re.compile(r"#(?:[0-9a-f]{3}|[0-9a-f]{6})")
_NUM = r"\s*-?\d+(?:\.\d+)?%?\s*"
_FUNC = re.compile(
    rf"(?:rgb|hsl)\({_NUM},{_NUM},{_NUM}\)|(?:rgba|hsla)\({_NUM},{_NUM},{_NUM},{_NUM}\)"
)
_NAMED = set(ColorValidator.named_colors) | {"transparent"}


def _is_css_colour(v: object) -> bool:
    if not isinstance(v, str):
        return False  # numbers as colours are what plotly.js warned about
    v = v.strip().lower()
    return bool(_HEX.fullmatch(v) or _FUNC.fullmatch(v) or v in _NAMED)


def _colours(obj: object, path: str = "") -> list[tuple[str, object]]:
    """Every (path, value) under a key naming a colour, in a figure's JSON."""
    found: list[tuple[str, object]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{path}.{k}"
            if k.lower().endswith("color") or k == "colorway":
                values = v.tolist() if isinstance(v, np.ndarray) else v
                many = isinstance(values, list | tuple)
                found += [(p, x) for x in (values if many else [values])]
            elif k == "colorscale" and isinstance(v, list | tuple):
                found += [(p, pair[1]) for pair in v]
            else:
                found += _colours(v, p)
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            found += _colours(v, f"{path}[{i}]")
    return found


def _every_figure() -> dict[str, go.Figure]:
    _, _, h = _layer_hist(bits=3)
    sweep = _tiny_sweep()
    sens = _sensitivity_table()
    return {
        "histogram": figures.weight_histogram_figure(h, log_y=True, title="t"),
        "confusion": figures.confusion_figure(np.eye(2, dtype=int), ["a", "b"]),
        "confusion change": figures.confusion_figure(
            np.eye(2, dtype=int), ["a", "b"], reference=np.ones((2, 2), dtype=int)),
        "tradeoff": figures.tradeoff_figure(
            sweep, qcore.pareto_front(sweep), current={"size_bytes": 500, "accuracy": 0.5},
            extra=[{"size_bytes": 300, "accuracy": 0.5, "name": "mixed precision"}],
            float_accuracy=0.6, budget_bytes=600),
        "tradeoff by scheme": figures.tradeoff_figure(sweep, None, color_by="scheme"),
        "sensitivity": figures.sensitivity_heatmap(qcore.sensitivity_matrix(sens, "quant", "drop")),
        "sqnr bars": figures.sqnr_bars(sens, 2),
        "prune curves": figures.prune_curves(sens, float_accuracy=0.9),
        "bits bars": figures.bits_bars({"conv1": 8, "fc1": 3, "fc2": 1}, {"conv1": 320}),
        "clip error": figures.clip_error_figure(_Curve()),
    }  # fmt: skip


def test_every_colour_in_every_figure_is_a_css_colour_string() -> None:
    for name, fig in _every_figure().items():
        colours = _colours(fig.to_plotly_json())
        assert colours, name
        bad = [(p, v) for p, v in colours if not _is_css_colour(v)]
        assert not bad, (name, bad[:5])


def test_colour_check_refuses_numbers_and_unknown_forms() -> None:
    assert all(map(_is_css_colour, ["#abc", "#A0B1C2", "rgb(1, 2, 3)", "rgba(90,90,90,0.45)",
                                    "gold", "hsl(120, 50%, 50%)"]))  # fmt: skip
    assert not any(map(_is_css_colour, [3, 8.0, "#12345678", "rgb(1,2)", "notacolour", None]))


def test_bits_bars_colour_each_bit_width_by_a_string() -> None:
    fig = figures.bits_bars({"a": 1, "b": 8, "c": 3}, {})
    assert list(fig.data[0].marker.color) == figures.bits_colors([1, 8, 3])
    assert figures.bits_colors([1, 8]) == ["rgb(68, 1, 84)", "rgb(253, 231, 37)"]  # Viridis ends


def test_one_bit_pruned_layer_draws_ternary_levels_the_grid_and_the_asked_clip() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    cfg = qcore.CompressionConfig(quant=qcore.QuantConfig(bits=1), prune=qcore.PruneConfig(0.5))
    c = qcore.compress(model, cfg)
    h = qcore.layer_histogram(c, "1")
    fig = figures.weight_histogram_figure(h)
    names = [t.name for t in fig.data]
    assert "3 quantization levels (ternary)" in names  # -alpha, 0 (pruned), +alpha
    lo, hi = c.layer("1").grid_range
    grid = sorted(s.x0 for s in fig.layout.shapes if s.line.dash == "dash")
    np.testing.assert_allclose(grid, [float(lo[0]), float(hi[0])])  # the grid: +-alpha
    asked = sorted(s.x0 for s in fig.layout.shapes if s.line.dash == "dot")
    np.testing.assert_allclose(asked, sorted(h.requested))  # the clip asked for: +-max|w|
    assert any(n.startswith("clip range asked for") for n in names)
    assert float(hi[0]) < max(h.requested)  # alpha sits well inside the clip range


def test_no_asked_clip_drawn_where_the_grid_is_the_clip_range() -> None:
    h = qcore.weight_histogram(torch.zeros(4), torch.zeros(4), 4, clip=(-1.0, 1.0),
                               requested=(-1.0, 1.0))  # fmt: skip
    fig = figures.weight_histogram_figure(h)
    assert not [t for t in fig.data if (t.name or "").startswith("clip range asked")]
    assert len(fig.layout.shapes) == 2


def test_clip_error_figure_with_now_at_the_optimum_draws_one_labelled_line() -> None:
    curve = _Curve()
    curve.current = curve.optimum
    fig = figures.clip_error_figure(curve)
    lines = [s.x0 for s in fig.layout.shapes if s.line.dash == "dash"]
    assert lines == [curve.optimum[0]]
    texts = [a.text for a in fig.layout.annotations]
    assert f"now = least error: c = {curve.optimum[0]:.3g}" in texts
    assert _trace(fig, "now: c = ").x == _trace(fig, "least error (mse)").x  # both markers


# --- the Fine-tune page's training curves -----------------------------------------------------


def test_training_curves_draw_every_step_and_calib_only_at_epoch_ends() -> None:
    nan = math.nan
    history = pd.DataFrame({
        "epoch": [0, 1, 1, 2, 2], "step": [0, 1, 2, 3, 4],
        "loss": [nan, 2.0, 1.5, 1.2, 1.0],
        "train_accuracy": [nan, 0.25, 0.5, 0.625, 0.75],
        "calib_accuracy": [0.4, nan, 0.6, nan, 0.8],
    })  # fmt: skip
    fig = figures.training_curves(history, total_steps=4, title="t")
    loss, train, calib = fig.data
    assert (loss.name, train.name, calib.name) == (
        "loss", "training batches", "calibration split (epoch end)")
    assert list(loss.x) == [0, 1, 2, 3, 4] and np.allclose(loss.y[1:], [2.0, 1.5, 1.2, 1.0])
    assert np.allclose(train.y[1:], [25.0, 50.0, 62.5, 75.0])  # percent
    # the calibration split: the start (post-training) and each epoch's end, nothing else
    assert list(calib.x) == [0, 2, 4] and np.allclose(calib.y, [40.0, 60.0, 80.0])
    assert loss.xaxis == "x" and train.xaxis == "x2" == calib.xaxis  # loss left, accuracy right
    assert list(fig.layout.xaxis.range) == [0, 4] == list(fig.layout.xaxis2.range)
    assert fig.layout.yaxis2.title.text == "accuracy (%)"


def test_training_curves_of_no_rows_yet_is_an_empty_frame() -> None:
    fig = figures.training_curves(pd.DataFrame(), total_steps=20)
    assert [len(t.x) for t in fig.data] == [0, 0]  # live: drawn before the first step
    assert list(fig.layout.xaxis.range) == [0, 20]


# --- issue 18: the robustness chart draws only what was measured ----------------------------


def _rows(strengths, accuracies) -> pd.DataFrame:
    return pd.DataFrame({"strength": strengths, "accuracy": accuracies,
                         "agreement": [1.0] * len(strengths)})  # fmt: skip


def test_bitflip_curves_draw_points_only_where_measured() -> None:
    # strengths "0 0.0001": the float model falls, two quantized variants keep the same
    curves = {"float32": _rows([0.0, 1e-4], [0.985, 0.144]),
              "8-bit": _rows([0.0, 1e-4], [0.985, 0.985]),
              "4-bit": _rows([0.0, 1e-4], [0.985, 0.985])}  # fmt: skip
    fig = figures.robustness_curves(curves, "bitflip", "fraction of stored bits flipped")
    for t in fig.data:
        assert list(t.x) == [1e-4]  # no point at 0 drawn at the axis' left edge
        assert t.mode == "markers"  # one measured point: no line from nowhere
    assert [t.name for t in fig.data] == [
        "float32 (clean 98.5 %)", "8-bit (clean 98.5 %)", "4-bit (clean 98.5 %)"]
    # the axis spans the measured strength, not an empty decade to 10^-3 and beyond
    assert fig.layout.xaxis.range == (-4.5, -3.5) and fig.layout.xaxis.dtick == 1
    # coinciding curves: their own markers, and a note naming them
    symbols = [t.marker.symbol for t in fig.data]
    assert len(set(symbols)) == 3
    (note,) = [a.text for a in fig.layout.annotations]
    assert note.endswith("8-bit and 4-bit")


def test_linear_curves_keep_strength_zero_and_no_note_when_distinct() -> None:
    curves = {"float32": _rows([0.0, 0.1], [0.98, 0.6]), "4 bits": _rows([0.0, 0.1], [0.97, 0.7])}
    fig = figures.robustness_curves(curves, "fgsm", "epsilon")
    assert [list(t.x) for t in fig.data] == [[0.0, 0.1], [0.0, 0.1]]
    assert all(t.mode == "lines+markers" for t in fig.data)
    assert not fig.layout.annotations and figures.coinciding(curves) == []


def test_log_axes_label_decades_and_the_histogram_spans_its_bins() -> None:
    _, _, h = _layer_hist()
    fig = figures.weight_histogram_figure(h, log_y=True)
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.dtick == 1
    assert fig.layout.xaxis.range == (float(h.edges[0]), float(h.edges[-1]))
    assert fig.layout.xaxis.nticks == 9  # several labels, however narrow the range
    # the legend below the tick labels and the axis title (at -0.2 it covered the labels)
    assert fig.layout.legend.yanchor == "top" and fig.layout.legend.y <= -0.4
    assert figures.weight_histogram_figure(h).layout.yaxis.dtick is None  # linear: auto
