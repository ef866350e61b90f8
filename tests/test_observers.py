"""Tests for qcore.observers and qcore.ranges: streaming equals one batch, histograms bin
exactly, and every policy on one batch of weights gives the pre-rebuild clip range."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcore.affine import fake_quantize, qparams_from_range
from qcore.config import CLIP_MODES, QuantConfig
from qcore.observers import HistogramObserver, MinMaxObserver, TensorObserver
from qcore.quant import clip_range
from qcore.ranges import POLICIES, choose_range, mse_range

PROPS = settings(deadline=None, max_examples=60)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@st.composite
def batches(draw):
    """Groups x2 (G, K), a kept mask, and cut points splitting K into batches."""
    g, k = draw(st.integers(1, 4)), draw(st.integers(1, 60))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    x2 = (torch.randn(g, k, generator=gen) + draw(st.sampled_from([0.0, 3.0]))) * scale
    if draw(st.booleans()):  # exact zeros and repeats, as in pruned or ReLU data
        x2 = (x2 * 4).round() / 4
    kept = torch.rand(g, k, generator=gen) > draw(st.sampled_from([0.0, 0.3, 0.9]))
    cuts = sorted(draw(st.lists(st.integers(0, k), max_size=5)))
    return x2, kept, [0, *cuts, k]


def feed(obs, x2: torch.Tensor, kept: torch.Tensor, cuts: list[int]):
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        obs.update(x2[:, a:b], kept[:, a:b])
    return obs


def kept_values(x2: torch.Tensor, kept: torch.Tensor, g: int) -> torch.Tensor:
    return x2[g][kept[g]].double()


# ---------------------------------------------------------------- streaming = one batch


@PROPS
@given(data=batches(), hist=st.booleans())
def test_property_batches_give_the_statistics_of_one_batch(data, hist: bool) -> None:
    x2, kept, cuts = data
    make = (lambda: HistogramObserver(bins=64)) if hist else MinMaxObserver
    split, whole = feed(make(), x2, kept, cuts), feed(make(), x2, kept, [0, x2.shape[1]])
    for a, b in zip(split.extremes(), whole.extremes(), strict=True):
        assert torch.equal(a, b)
    ms, mw = split.moments(), whole.moments()
    assert torch.equal(ms.count, mw.count) and torch.equal(ms.count, kept.sum(dim=1))
    tol = dict(rtol=1e-5, atol=1e-6 * float(x2.abs().max()))
    assert torch.allclose(ms.mean, mw.mean, **tol) and torch.allclose(ms.std, mw.std, **tol)
    for g in range(x2.shape[0]):  # and both are the statistics of the values themselves
        v = kept_values(x2, kept, g)
        if v.numel():
            assert float(split.extremes()[0][g]) == float(v.min())
            assert float(split.extremes()[1][g]) == float(v.max())
            stats = torch.stack([v.mean(), v.std(unbiased=False)]).float()
            assert torch.allclose(torch.stack([ms.mean[g], ms.std[g]]), stats, **tol)
        else:
            assert split.extremes()[0][g] == float("inf") and ms.std[g] == 0


@PROPS
@given(data=batches())
def test_property_tensor_observer_in_batches_is_exact(data) -> None:
    x2, kept, cuts = data
    split = feed(TensorObserver(), x2, kept, cuts)
    whole = feed(TensorObserver(), x2, kept, [0, x2.shape[1]])
    assert torch.equal(split.values, x2) and torch.equal(split.kept, kept)
    for a, b in zip(split.moments(), whole.moments(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(split.abs_quantile(0.9), whole.abs_quantile(0.9))


# ---------------------------------------------------------------- histogram


@PROPS
@given(data=batches(), bins=st.sampled_from([2, 8, 64, 2048]))
def test_property_histogram_counts_bracket_the_values(data, bins: int) -> None:
    """Counts sum to the values fed, and below every edge lie all values < it, none > it.

    This holds however the radius grew, so merging bins on growth loses nothing.
    """
    x2, kept, cuts = data
    h = feed(HistogramObserver(bins=bins), x2, kept, cuts)
    assert h.counts.shape == (x2.shape[0], bins)
    assert torch.equal(h.counts.sum(dim=1), kept.sum(dim=1))
    half = bins // 2
    for g in range(x2.shape[0]):
        v = kept_values(x2, kept, g)
        assert float(h.radius[g]) >= float(v.abs().max()) if v.numel() else h.radius[g] == 0
        below = torch.cat([torch.zeros(1, dtype=torch.int64), h.counts[g].cumsum(0)])
        for j in range(bins + 1):
            edge = (j - half) * h.radius[g]  # compared as x * half: both sides exact
            strictly = int((v * half < edge).sum())
            assert strictly <= int(below[j]) <= int((v * half <= edge).sum()), j


@PROPS
@given(data=batches(), q=st.floats(0.0, 1.0), bins=st.sampled_from([8, 64, 2048]))
def test_property_histogram_quantile_within_one_bin(data, q: float, bins: int) -> None:
    x2, kept, cuts = data
    h = feed(HistogramObserver(bins=bins), x2, kept, cuts)
    est = h.abs_quantile(q)
    width = h.radius / (bins // 2)
    for g in range(x2.shape[0]):
        v = kept_values(x2, kept, g).abs()
        ref = float(torch.quantile(v, q)) if v.numel() else 0.0
        assert abs(float(est[g]) - ref) <= float(width[g]) * (1 + 1e-6) + 1e-12 * ref


def test_histogram_grows_by_doubling_and_keeps_zeros() -> None:
    h = HistogramObserver(bins=4)
    h.update(torch.zeros(1, 3))  # radius unknown yet: zeros wait in the bin above 0
    assert h.radius.tolist() == [0.0] and h.counts.tolist() == [[0, 0, 3, 0]]
    h.update(torch.tensor([[-1.0, 0.25]]))
    assert h.radius.tolist() == [1.0] and h.counts.tolist() == [[1, 0, 4, 0]]
    h.update(torch.tensor([[5.0]]))  # radius 1 -> 8: old bins fall in [-4, 0) and [0, 4)
    assert h.radius.tolist() == [8.0] and h.counts.tolist() == [[0, 1, 4, 1]]
    assert h.extremes() == (torch.tensor([-1.0]), torch.tensor([5.0]))


def test_histogram_groups_grow_separately() -> None:
    h = HistogramObserver(bins=4)
    h.update(torch.tensor([[1.0], [1.0]]))
    h.update(torch.tensor([[0.25], [3.0]]))  # only the second group's radius doubles, twice
    assert h.radius.tolist() == [1.0, 4.0]
    assert h.counts.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]


# ---------------------------------------------------------------- errors


def test_observer_errors_are_sentences() -> None:
    with pytest.raises(ValueError, match="even number of bins"):
        HistogramObserver(bins=7)
    obs = MinMaxObserver()
    obs.update(torch.ones(2, 3))
    with pytest.raises(ValueError, match="2 groups but the batch has 3 rows"):
        obs.update(torch.ones(3, 3))
    with pytest.raises(ValueError, match="shape"):
        obs.update(torch.ones(2, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape \\(G, K\\)"):
        obs.update(torch.ones(6))
    with pytest.raises(ValueError, match="NaN or infinite"):
        obs.update(torch.tensor([[1.0], [float("nan")]]))
    for mode in ("percentile", "mse"):
        with pytest.raises(ValueError, match=f"{mode} range needs a HistogramObserver"):
            choose_range(obs, mode, 50.0, 4, True)
    # one policy table for weights and activations: entropy is an entry, and needs a histogram
    with pytest.raises(ValueError, match="entropy range policy needs a histogram"):
        choose_range(obs, "entropy", 1.0, 4, True)
    with pytest.raises(ValueError, match="policy must be one of ratio"):
        choose_range(obs, "bogus", 1.0, 4, True)


# ---------------------------------------------------------------- policies on weights


def _reference_clip_range(w2, kept, cfg, bits):
    """qcore.quant.clip_range before the rebuild (extremes, std and quantile inline)."""
    zero = torch.zeros((), dtype=w2.dtype)
    lo = torch.where(kept, w2, zero).amin(dim=1).clamp(max=0.0)
    hi = torch.where(kept, w2, zero).amax(dim=1).clamp(min=0.0)
    amax = torch.maximum(-lo, hi)
    mode, c = cfg.clip_mode, cfg.clip
    if mode == "ratio":
        return (-c * amax, c * amax) if cfg.symmetric or bits == 1 else (c * lo, c * hi)
    if mode == "mse":
        return None  # a search: checked against brute force below
    if mode == "absolute":
        bound = torch.full_like(amax, c)
    elif mode == "sigma":
        n = kept.sum(dim=1).clamp(min=1)
        mean = (w2 * kept).sum(dim=1) / n
        std = ((((w2 - mean[:, None]) * kept) ** 2).sum(dim=1) / n).sqrt()
        bound = torch.minimum(c * std, amax)
    else:
        a = torch.where(kept, w2.abs(), torch.tensor(float("nan")))
        bound = torch.nan_to_num(torch.nanquantile(a, c / 100.0, dim=1), nan=0.0)
    if cfg.symmetric or bits == 1:
        return -bound, bound
    return torch.maximum(lo, -bound), torch.minimum(hi, bound)


@PROPS
@given(
    data=batches(),
    mode=st.sampled_from([m for m in CLIP_MODES if m != "mse"]),
    c=st.floats(0.05, 1.0),
    bits=st.integers(1, 16),
    symmetric=st.booleans(),
)
def test_property_policies_on_one_batch_equal_the_old_clip_range(
    data, mode: str, c: float, bits: int, symmetric: bool
) -> None:
    x2, kept, _ = data
    clip = {"ratio": c, "absolute": 3 * c, "sigma": 4 * c, "percentile": 100 * c}[mode]
    cfg = QuantConfig(bits=bits, symmetric=symmetric, clip=clip, clip_mode=mode)
    ref = _reference_clip_range(x2, kept, cfg, bits)
    obs = TensorObserver()
    obs.update(x2, kept)
    for got in (clip_range(x2, kept, cfg, bits), POLICIES[mode](obs, clip, bits, symmetric)):
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_policy_on_one_batch_is_the_best_of_its_grid(symmetric: bool) -> None:
    w2 = randn(3, 300, seed=1)
    w2[:, 0] *= 10
    kept = torch.ones_like(w2, dtype=torch.bool)
    cfg = QuantConfig(bits=3, symmetric=symmetric, per_channel=True, clip_mode="mse")
    lo, hi = clip_range(w2, kept, cfg, 3)
    amax = w2.abs().amax(dim=1)
    ratio = (hi - lo) / (w2.amax(dim=1).clamp(min=0) - w2.amin(dim=1).clamp(max=0))
    assert torch.all((ratio > 0.01) & (ratio < 0.9))  # outliers: the best range clips

    def err(lo_, hi_):
        qp = qparams_from_range(lo_, hi_, 3, symmetric)
        return ((fake_quantize(w2, qp) - w2) ** 2).sum(dim=1)

    best = err(lo, hi)
    for r in torch.linspace(0.05, 1.0, 96):
        if symmetric:
            assert torch.all(best <= err(-r * amax, r * amax) * (1 + 1e-6))
        else:
            assert torch.all(best <= err(r * w2.amin(dim=1), r * w2.amax(dim=1)) * (1 + 1e-6))


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_policy_on_a_histogram_is_close_to_the_exact_search(symmetric: bool) -> None:
    x2 = randn(2, 4000, seed=2)
    x2[:, :5] *= 12
    exact, hist = TensorObserver(), HistogramObserver()
    for part in x2.split(500, dim=1):  # calibration in batches
        exact.update(part)
        hist.update(part)
    def err(rng):
        qp = qparams_from_range(rng[0], rng[1], 4, symmetric)
        return ((fake_quantize(x2, qp) - x2) ** 2).sum(dim=1)

    e_exact = err(mse_range(exact, 1.0, 4, symmetric))
    e_hist = err(mse_range(hist, 1.0, 4, symmetric))
    e_full = err(POLICIES["ratio"](exact, 1.0, 4, symmetric))
    assert torch.all(e_hist <= e_exact * 1.02) and torch.all(e_hist < 0.5 * e_full)


def test_streaming_policies_agree_with_exact_ones() -> None:
    x2 = randn(3, 1000, seed=3) * torch.tensor([[0.1], [1.0], [10.0]])
    exact, mm, hist = TensorObserver(), MinMaxObserver(), HistogramObserver()
    for part in x2.split(128, dim=1):
        for obs in (exact, mm, hist):
            obs.update(part)
    for mode, c in (("ratio", 0.7), ("absolute", 0.5)):
        for sym in (True, False):
            want = choose_range(exact, mode, c, 8, sym)
            for obs in (mm, hist):
                got = choose_range(obs, mode, c, 8, sym)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    sig = choose_range(exact, "sigma", 2.0, 8, True)[1]
    assert torch.allclose(choose_range(mm, "sigma", 2.0, 8, True)[1], sig, rtol=1e-5)
    pct = choose_range(exact, "percentile", 99.0, 8, True)[1]
    width = hist.radius.float() / (hist.bins // 2)
    assert torch.all((choose_range(hist, "percentile", 99.0, 8, True)[1] - pct).abs() <= width)
