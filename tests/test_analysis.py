"""Tests for qcore.analysis: binned counts, shared edges, levels and clip bounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qcore.analysis import MAX_LEVELS_DRAWN, layer_histogram, weight_histogram
from qcore.compress import compress
from qcore.config import CompressionConfig, PruneConfig, QuantConfig
from qcore.graph import fold_batchnorm
from qcore.quant import clip_range


def test_counts_sum_to_numel_and_edges_shared() -> None:
    g = torch.Generator().manual_seed(0)
    before = torch.randn(1000, generator=g)
    after = before.clamp(-0.5, 2.5) * 1.5
    h = weight_histogram(before, after, bins=37)
    assert h.edges.shape == (38,) and h.before.shape == h.after.shape == (37,)
    assert h.before.sum() == 1000 and h.after.sum() == 1000
    assert h.edges[0] == pytest.approx(float(torch.minimum(before.min(), after.min())))
    assert h.edges[-1] == pytest.approx(float(torch.maximum(before.max(), after.max())))
    assert np.allclose(np.diff(h.edges), np.diff(h.edges)[0])
    assert np.array_equal(h.before, np.histogram(before.double().numpy(), bins=h.edges)[0])
    assert h.centers.shape == (37,)
    assert h.levels is None and h.clip is None


def test_constant_and_empty_inputs() -> None:
    h = weight_histogram(torch.zeros(5), torch.zeros(5), bins=4)
    assert h.before.sum() == 5 and h.zeros_after == 5 and h.edges[0] < 0 < h.edges[-1]
    assert weight_histogram(torch.empty(0), torch.empty(0), bins=3).before.sum() == 0
    with pytest.raises(ValueError, match="bins"):
        weight_histogram(torch.ones(3), torch.ones(3), bins=0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_layer_histogram_levels_and_clip(bn_model: nn.Module, symmetric: bool) -> None:
    q = QuantConfig(bits=4, symmetric=symmetric, clip=0.7)
    c = compress(bn_model, CompressionConfig(quant=q, prune=PruneConfig(rate=0.3)))
    w = fold_batchnorm(bn_model).get_submodule("7").weight.detach()
    h = layer_histogram(c, "7", bins=50)
    assert h.before.sum() == w.numel() and h.after.sum() == w.numel()
    assert h.zeros_after == int((c.replacements()["7.weight"] == 0).sum())
    assert h.levels is not None and len(h.levels) == (15 if symmetric else 16)
    after_values = set(c.replacements()["7.weight"].unique().tolist())
    assert after_values <= set(np.float32(h.levels).tolist())
    assert 0.0 in h.levels.tolist()
    lo, hi = clip_range(w.reshape(1, -1), c.layer("7").mask.reshape(1, -1), q, 4)
    assert h.requested == (float(lo), float(hi))  # the range asked for
    grid_lo, grid_hi = c.layer("7").grid_range  # the range the levels really span
    assert h.clip == (float(grid_lo), float(grid_hi)) == (min(h.levels), max(h.levels))


def test_levels_absent_for_sixteen_bits(bn_model: nn.Module) -> None:
    c = compress(bn_model, CompressionConfig(quant=QuantConfig(bits=16)))
    h = layer_histogram(c, "0")
    assert h.levels is None and h.clip is not None
    c8 = compress(bn_model, CompressionConfig(quant=QuantConfig(bits=8, symmetric=False)))
    assert len(layer_histogram(c8, "0").levels) == 256 <= MAX_LEVELS_DRAWN


def test_per_channel_levels_only_for_a_channel(bn_model: nn.Module) -> None:
    q = QuantConfig(bits=3, per_channel=True)
    c = compress(bn_model, CompressionConfig(quant=q))
    assert layer_histogram(c, "3").levels is None
    h = layer_histogram(c, "3", channel=2)
    w = fold_batchnorm(bn_model).get_submodule("3").weight.detach()
    assert h.before.sum() == w[2].numel()
    amax = float(w[2].abs().max())
    assert h.clip == pytest.approx((-amax, amax))
    assert len(h.levels) == 7 and h.levels.max() == pytest.approx(amax)
    with pytest.raises(ValueError, match="Channel must be in 0..5"):
        layer_histogram(c, "3", channel=6)


def test_one_bit_levels_and_float_layers(bn_model: nn.Module) -> None:
    c = compress(bn_model, CompressionConfig(quant=QuantConfig(bits=1)))
    h = layer_histogram(c, "10")
    w = fold_batchnorm(bn_model).get_submodule("10").weight.detach()
    alpha = float(w.abs().mean())
    assert sorted(h.levels.tolist()) == pytest.approx([-alpha, alpha])
    cf = compress(bn_model, CompressionConfig(quant=None, prune=PruneConfig(rate=0.5)))
    hf = layer_histogram(cf, "10")
    assert hf.levels is None and hf.clip is None and hf.zeros_after == w.numel() // 2
    with pytest.raises(ValueError, match="No layer named"):
        layer_histogram(cf, "nope")


def test_one_bit_histogram_draws_the_clip_range_and_the_two_levels() -> None:
    """At 1 bit the levels are +-mean|w|: the grid spans them, the requested range is the
    clip range (alpha is the mean of the clipped |w|)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    w = model[0].weight.detach()
    for clip, bound in ((1.0, float(w.abs().max())), (0.5, 0.5 * float(w.abs().max()))):
        c = compress(model, CompressionConfig(quant=QuantConfig(bits=1, clip=clip)))
        h = layer_histogram(c, "0", bins=20)
        alpha = float(w.clamp(-bound, bound).abs().mean())
        assert h.requested == pytest.approx((-bound, bound))
        assert h.clip == pytest.approx((-alpha, alpha))
        assert h.levels.tolist() == pytest.approx([-alpha, alpha])


def test_a_channel_pruned_away_draws_no_grid() -> None:
    """Structured pruning can empty a channel: it has no scale of its own, so no levels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    cfg = CompressionConfig(quant=QuantConfig(bits=4, per_channel=True),
                            prune=PruneConfig(rate=0.5, structured=True))
    c = compress(model, cfg)
    alive = c.layer("0").mask.any(dim=1)
    dead, live = int(torch.nonzero(~alive)[0]), int(torch.nonzero(alive)[0])
    gone = layer_histogram(c, "0", bins=10, channel=dead)
    assert gone.levels is None and gone.clip is None and gone.zeros_after == 8
    kept = layer_histogram(c, "0", bins=10, channel=live)
    assert kept.levels is not None and len(kept.levels) == 15 and kept.clip is not None


def _grid_model(weights: list[float]) -> nn.Module:
    model = nn.Sequential(nn.Linear(len(weights), 1, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([weights]))
    return model


def test_asymmetric_grid_drawn_where_its_levels_are() -> None:
    """``?bits=2&symmetric=false``: the zero point is rounded to an integer, which shifts the
    grid off the requested range; the drawn bounds are the grid's end levels."""
    # range [-0.25, 2.75]: scale 3 / 3 = 1, zero point round(0.25) = 0, so the grid is
    # 0, 1, 2, 3: the level 3 lies beyond the requested 2.75 (and 2.75 rounds up to it)
    c = compress(_grid_model([-0.25, 0.5, 2.75]),
                 CompressionConfig(quant=QuantConfig(bits=2, symmetric=False)))
    h = layer_histogram(c, "0", bins=10)
    assert h.requested == (-0.25, 2.75)
    assert h.clip == (0.0, 3.0)
    assert h.levels.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert c.layer("0").dequantized.tolist() == [[0.0, 0.0, 3.0]]
    # range [-0.75, 2.25]: scale 1, zero point round(0.75) = 1, grid -1, 0, 1, 2
    c = compress(_grid_model([-0.75, 2.25, 1.0]),
                 CompressionConfig(quant=QuantConfig(bits=2, symmetric=False)))
    h = layer_histogram(c, "0", bins=10)
    assert h.requested == (-0.75, 2.25) and h.clip == (-1.0, 2.0)
    assert h.levels.tolist() == [-1.0, 0.0, 1.0, 2.0]


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 4), n=st.integers(2, 200), shift=st.floats(-1.0, 1.0),
       clip=st.floats(0.05, 1.0), per_channel=st.booleans(), seed=st.integers(0, 10_000))
def test_property_every_level_within_the_drawn_bounds(bits, n, shift, clip, per_channel, seed):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(n, 3, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(3, n, generator=g) + shift)
    q = QuantConfig(bits=bits, symmetric=False, clip=clip, per_channel=per_channel)
    c = compress(model, CompressionConfig(quant=q))
    after = c.layer("0").dequantized
    for channel in (range(3) if per_channel else [None]):
        h = layer_histogram(c, "0", bins=10, channel=channel)
        lo, hi = h.clip
        assert lo <= h.levels.min() and h.levels.max() <= hi
        assert (lo, hi) == (h.levels.min(), h.levels.max())
        values = after if channel is None else after[channel]
        assert lo <= float(values.min()) and float(values.max()) <= hi


@pytest.mark.parametrize("rate, levels", [(0.0, 2), (0.5, 3)])
def test_one_bit_with_pruning_is_ternary(rate: float, levels: int) -> None:
    """A pruned weight is exactly 0 at 1 bit (by its mask): a third level, drawn as such."""
    w = [0.5, -1.5, 0.25, 2.0, -0.75, 1.0]
    prune = PruneConfig(rate=rate) if rate else None
    c = compress(_grid_model(w), CompressionConfig(quant=QuantConfig(bits=1), prune=prune))
    h = layer_histogram(c, "0", bins=10)
    # alpha = mean |w| over the kept weights: all six (6 / 6 = 1), or the three largest
    # left after pruning floor(0.5 * 6) = 3 ((2 + 1.5 + 1) / 3 = 1.5)
    expected = [-1.0, 1.0] if levels == 2 else [-1.5, 0.0, 1.5]
    assert h.levels.tolist() == expected
    assert set(c.layer("0").dequantized.reshape(-1).tolist()) <= set(h.levels.tolist())
    assert len(h.levels) == levels
