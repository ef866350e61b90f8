"""Figure builders as plain functions: checked against the counts they were given."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

import qcore
from pages import figures


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
    _trace(fig, "clip bounds")
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


def test_histogram_of_a_compressed_layer_with_255_levels_is_quick() -> None:
    import time

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    c = qcore.compress(model, qcore.CompressionConfig(quant=qcore.QuantConfig(bits=8)))
    h = qcore.layer_histogram(c, "1")
    start = time.perf_counter()
    fig = figures.weight_histogram_figure(h)
    assert time.perf_counter() - start < 2.0  # one trace for all levels, not 255 shapes
    assert _trace(fig, "255 quantization levels")


def test_confusion_figure_shows_matrix_and_change() -> None:
    m = np.array([[5, 1], [2, 7]])
    ref = np.array([[6, 0], [1, 8]])
    fig = figures.confusion_figure(m, ["cat", "dog"], title="t")
    (heat,) = fig.data
    assert isinstance(heat, go.Heatmap)
    np.testing.assert_array_equal(heat.z, m)
    assert list(heat.x) == list(heat.y) == ["cat", "dog"]
    assert fig.layout.yaxis.autorange == "reversed"  # true class 0 on top
    diff = figures.confusion_figure(m, ["cat", "dog"], reference=ref)
    np.testing.assert_array_equal(diff.data[0].z, m - ref)
    assert diff.data[0].zmid == 0


def test_display_images_undo_normalisation_and_enlarge() -> None:
    pix = np.random.default_rng(0).random((3, 1, 28, 28)).astype(np.float32)
    mean, std = (0.1307,), (0.3081,)
    x = (pix - mean[0]) / std[0]
    out = figures.display_images(x, mean, std)
    assert len(out) == 3 and out[0].shape == (84, 84)  # 28 px repeated 3 times
    np.testing.assert_allclose(out[1][::3, ::3], pix[1, 0], atol=1e-6)
    assert out[0].min() >= 0.0 and out[0].max() <= 1.0


def test_display_images_colour_and_clipping() -> None:
    x = np.full((2, 3, 32, 32), 10.0, dtype=np.float32)  # far above 1 after un-normalising
    out = figures.display_images(x, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), min_size=64)
    assert out[0].shape == (64, 64, 3)
    assert np.all(out[0] == 1.0)
    with pytest.raises(ValueError, match="K, C, H, W"):
        figures.display_images(np.zeros((28, 28)), (0.0,), (1.0,))
