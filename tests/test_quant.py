"""Tests for qcore.quant and QuantConfig: the grid, zero, error bounds, oracles, clip modes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcore.affine import code_dtype, fake_quantize, qparams_from_range
from qcore.config import CLIP_MODES, QuantConfig
from qcore.quant import (
    choose_qparams,
    clip_range,
    code_range,
    dequantize_codes,
    quantize_codes,
    quantize_tensor,
    quantize_with_params,
)

PROPS = settings(deadline=None, max_examples=50)


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def groups_of(t: torch.Tensor, per_channel: bool) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if per_channel and t.dim() >= 2 else t.reshape(1, -1)


def assert_on_grid(w: torch.Tensor, cfg: QuantConfig) -> None:
    """Every value is (code - zp) * scale for an in-range integer code of its group."""
    res = quantize_with_params(w, cfg)
    qp = res.qparams
    v2, c2 = groups_of(res.values, res.per_channel), groups_of(res.codes, res.per_channel)
    assert int(c2.min()) >= qp.qmin and int(c2.max()) <= qp.qmax
    assert torch.equal(dequantize_codes(c2, qp), v2)
    if not qp.binary:
        steps = v2 / qp.scale[:, None]
        assert torch.allclose(steps, steps.round(), atol=1e-3)
        assert torch.equal(steps.round() + qp.zero_point[:, None], c2.double().float())


# ---------------------------------------------------------------- hand-computed cases


def test_code_range() -> None:
    assert code_range(2, True) == (-1, 1)
    assert code_range(8, True) == (-127, 127)
    assert code_range(8, False) == (0, 255)
    assert code_range(16, False) == (0, 65535)
    assert code_range(1, False) == (0, 1)


def test_two_bit_symmetric_is_minus_c_zero_c() -> None:
    w = torch.tensor([-1.0, -0.2, 0.0, 0.26, 1.0, -0.6, 0.49])
    out = quantize_tensor(w, QuantConfig(bits=2))
    assert out.tolist() == [-1.0, 0.0, 0.0, 0.0, 1.0, -1.0, 0.0]
    assert set(out.tolist()) <= {-1.0, 0.0, 1.0}


def test_three_bit_symmetric_hand_case() -> None:
    w = torch.tensor([-1.5, -0.5, 0.0, 0.2, 0.25, 1.5])
    # scale = 1.5 / 3 = 0.5; codes round(w / 0.5) = -3, -1, 0, 0 (0.4), 0 (0.5 -> even), 3
    out = quantize_tensor(w, QuantConfig(bits=3))
    assert out.tolist() == [-1.5, -0.5, 0.0, 0.0, 0.0, 1.5]


def test_asymmetric_hand_case() -> None:
    w = torch.tensor([-1.0, 0.0, 2.0, 0.9, 1.6])
    res = quantize_with_params(w, QuantConfig(bits=2, symmetric=False))
    # lo = -1, hi = 2: scale = 3 / 3 = 1, zero point = 1
    assert res.qparams.scale.tolist() == [1.0]
    assert res.qparams.zero_point.tolist() == [1]
    assert res.codes.tolist() == [0, 1, 3, 2, 3]
    assert res.values.tolist() == [-1.0, 0.0, 2.0, 1.0, 2.0]


def test_asymmetric_range_always_contains_zero() -> None:
    w = torch.tensor([1.0, 2.0, 3.0])  # all positive: the range must still reach 0
    res = quantize_with_params(w, QuantConfig(bits=2, symmetric=False))
    assert res.qparams.lo.tolist() == [0.0] and res.qparams.hi.tolist() == [3.0]
    assert res.values.tolist() == [1.0, 2.0, 3.0]


def test_eight_bit_scale_and_codes() -> None:
    w = torch.tensor([[0.5, -1.27], [0.01, 0.0]])
    res = quantize_with_params(w, QuantConfig(bits=8))
    assert res.qparams.scale.item() == pytest.approx(0.01, rel=1e-6)
    assert res.codes.tolist() == [[50, -127], [1, 0]]


def test_one_bit_per_tensor_is_sign_times_mean_abs() -> None:
    w = randn(6, 5, seed=1)
    out = quantize_tensor(w, QuantConfig(bits=1))
    expected = torch.sign(w) * w.abs().mean()
    assert torch.allclose(out, expected, rtol=1e-6, atol=0)
    assert len(set(out.reshape(-1).tolist())) == 2


def test_one_bit_per_channel_is_sign_times_channel_mean_abs() -> None:
    w = randn(4, 3, 2, seed=2)
    out = quantize_tensor(w, QuantConfig(bits=1, per_channel=True))
    alpha = w.abs().reshape(4, -1).mean(dim=1)
    expected = torch.sign(w) * alpha[:, None, None]
    assert torch.allclose(out, expected, rtol=1e-6, atol=0)
    for ch in range(4):
        assert len(set(out[ch].reshape(-1).tolist())) <= 2


def test_one_bit_ignores_symmetric_flag() -> None:
    w = randn(20, seed=3)
    a = quantize_tensor(w, QuantConfig(bits=1, symmetric=True))
    b = quantize_tensor(w, QuantConfig(bits=1, symmetric=False))
    assert torch.equal(a, b)


def test_one_bit_with_mask_uses_kept_weights_and_keeps_zeros() -> None:
    w = torch.tensor([0.1, -0.2, 3.0, -5.0])
    mask = torch.tensor([False, False, True, True])
    out = quantize_tensor(w, QuantConfig(bits=1), mask=mask)
    assert out.tolist() == [0.0, 0.0, 4.0, -4.0]


def test_mask_range_over_kept_weights_and_pruned_stay_zero() -> None:
    w = torch.tensor([10.0, 0.3, -0.6, 0.0])
    mask = torch.tensor([False, True, True, True])
    res = quantize_with_params(w, QuantConfig(bits=2), mask=mask)
    assert res.qparams.hi.tolist() == pytest.approx([0.6])
    assert res.values.tolist() == pytest.approx([0.0, 0.0, -0.6, 0.0])  # 0.5 step -> even
    assert res.values[0].item() == 0.0


# ---------------------------------------------------------------- oracle: torch fake-quant


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_torch_fake_quantize_per_tensor(bits: int, symmetric: bool) -> None:
    """Oracle: the scale and zero point of torch.ao's MinMaxObserver, then torch's fake-quant."""
    w = randn(7, 5, 3, seed=bits, scale=0.3)
    res = quantize_with_params(w, QuantConfig(bits=bits, symmetric=symmetric))
    qp = res.qparams
    qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert (qp.qmin, qp.qmax) == (qmin, qmax)
    obs = torch.ao.quantization.MinMaxObserver(
        dtype=torch.qint8 if symmetric else torch.quint8,
        qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine,
        quant_min=qmin, quant_max=qmax,
    )
    obs(w)
    scale, zp = obs.calculate_qparams()
    assert torch.equal(qp.scale, scale) and qp.zero_point.tolist() == zp.tolist()
    ref = torch.fake_quantize_per_tensor_affine(w, float(scale), int(zp), qmin, qmax)
    assert torch.equal(res.values, ref)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_torch_fake_quantize_per_channel(bits: int, symmetric: bool) -> None:
    """Oracle: torch.ao's PerChannelMinMaxObserver's scales and zero points, then torch's
    per-channel fake-quant."""
    w = randn(6, 4, 3, 3, seed=10 + bits) * torch.linspace(0.05, 2.0, 6)[:, None, None, None]
    res = quantize_with_params(w, QuantConfig(bits=bits, symmetric=symmetric, per_channel=True))
    qp = res.qparams
    assert qp.scale.shape == (6,)
    obs = torch.ao.quantization.PerChannelMinMaxObserver(
        ch_axis=0,
        dtype=torch.qint8 if symmetric else torch.quint8,
        qscheme=torch.per_channel_symmetric if symmetric else torch.per_channel_affine,
        quant_min=qp.qmin, quant_max=qp.qmax,
    )
    obs(w)
    scale, zp = obs.calculate_qparams()
    assert torch.equal(qp.scale, scale) and qp.zero_point.tolist() == zp.tolist()
    ref = torch.fake_quantize_per_channel_affine(w, scale, zp.to(torch.int32), 0, qp.qmin,
                                                 qp.qmax)  # fmt: skip
    assert torch.equal(res.values, ref)


# ---------------------------------------------------------------- code dtypes and fake quant

SMALLER = {torch.int16: torch.int8, torch.int32: torch.int16}


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_use_the_smallest_dtype_that_fits(bits: int, symmetric: bool) -> None:
    qmin, qmax = code_range(bits, symmetric)
    dtype = code_dtype(qmin, qmax)
    info = torch.iinfo(dtype)
    assert info.min <= qmin and qmax <= info.max
    if dtype in SMALLER:
        smaller = torch.iinfo(SMALLER[dtype])
        assert qmin < smaller.min or qmax > smaller.max
    else:
        assert dtype == torch.int8
    # far outside the range, codes land on its ends and dequantize without overflow
    w = torch.tensor([[-1e30, -1.0, 0.0, 0.5, 1.0, 1e30]])
    res = quantize_with_params(w, QuantConfig(bits=bits, symmetric=symmetric, clip=1.0,
                                              clip_mode="absolute"))
    qp = res.qparams
    assert res.codes.dtype == dtype and quantize_codes(w, qp).dtype == dtype
    assert res.codes.min().item() == qmin and res.codes.max().item() == qmax
    ends = dequantize_codes(torch.tensor([[qmin, qmax]], dtype=dtype), qp)
    if qp.binary:
        expected = [-float(qp.scale), float(qp.scale)]
    else:
        zp, s = int(qp.zero_point), float(qp.scale)
        expected = [(qmin - zp) * s, (qmax - zp) * s]
    assert ends.reshape(-1).tolist() == pytest.approx(expected, rel=1e-6)
    assert res.values[0, 0] < 0 < res.values[0, -1]


@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_matches_torch_per_channel_8bit(symmetric: bool) -> None:
    x2 = randn(5, 300, seed=21) * torch.linspace(0.01, 3.0, 5)[:, None]
    lo = -x2.abs().amax(dim=1) * 0.8 if symmetric else x2.amin(dim=1).clamp(max=0) * 0.7
    hi = -lo if symmetric else x2.amax(dim=1).clamp(min=0) * 0.9
    qp = qparams_from_range(lo, hi, 8, symmetric)
    ref = torch.fake_quantize_per_channel_affine(
        x2, qp.scale, qp.zero_point.to(torch.int32), 0, qp.qmin, qp.qmax
    )
    assert torch.equal(fake_quantize(x2, qp), ref)
    assert torch.equal(fake_quantize(x2, qp), dequantize_codes(quantize_codes(x2, qp), qp))


# ---------------------------------------------------------------- properties


@st.composite
def tensors(draw, min_dims: int = 1):
    dims = draw(st.integers(min_dims, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=dims, max_size=dims)))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 50.0]))
    w = randn(*shape, seed=seed, scale=scale)
    if draw(st.booleans()):  # some exact zeros
        w = w * (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.3)
    return w


@st.composite
def quant_configs(draw, min_bits: int = 2):
    mode = draw(st.sampled_from(CLIP_MODES))
    clip = {
        "ratio": draw(st.floats(0.05, 1.0)),
        "absolute": draw(st.floats(0.01, 3.0)),
        "sigma": draw(st.floats(0.5, 4.0)),
        "percentile": draw(st.floats(1.0, 100.0)),
        "mse": 1.0,
    }[mode]
    return QuantConfig(
        bits=draw(st.integers(min_bits, 8)),
        symmetric=draw(st.booleans()),
        per_channel=draw(st.booleans()),
        clip=clip,
        clip_mode=mode,
        rounding=draw(st.sampled_from(["nearest", "stochastic"])),
        seed=draw(st.integers(0, 1000)),
    )


@PROPS
@given(w=tensors(), cfg=quant_configs(min_bits=1))
def test_property_values_on_grid_and_level_count(w: torch.Tensor, cfg: QuantConfig) -> None:
    before = w.clone()
    res = quantize_with_params(w, cfg)
    assert torch.equal(w, before)
    assert res.values.shape == w.shape and res.values.dtype == torch.float32
    assert_on_grid(w, cfg)
    for row in groups_of(res.values, res.per_channel):
        assert row.unique().numel() <= 2**cfg.bits
        if cfg.symmetric and cfg.bits > 1:
            assert row.unique().numel() <= 2**cfg.bits - 1


@PROPS
@given(w=tensors(), cfg=quant_configs())
def test_property_zero_is_exact(w: torch.Tensor, cfg: QuantConfig) -> None:
    w = w.clone().reshape(-1)
    w[0] = 0.0
    w = w.reshape(-1)
    out = quantize_tensor(w, cfg)
    assert out[0].item() == 0.0
    assert torch.all(out[w == 0] == 0)


@PROPS
@given(
    w=tensors(),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    per_channel=st.booleans(),
    clip=st.floats(0.1, 1.0),
)
def test_property_error_at_most_half_a_step_inside_range(
    w: torch.Tensor, bits: int, symmetric: bool, per_channel: bool, clip: float
) -> None:
    cfg = QuantConfig(bits=bits, symmetric=symmetric, per_channel=per_channel, clip=clip)
    res = quantize_with_params(w, cfg)
    qp = res.qparams
    w2, v2 = groups_of(w, res.per_channel), groups_of(res.values, res.per_channel)
    s, zp = qp.scale[:, None], qp.zero_point[:, None]
    lo, hi = (qp.qmin - zp) * s, (qp.qmax - zp) * s  # the representable range
    inside = (w2 >= lo) & (w2 <= hi)
    err = (w2 - v2).abs()
    tol = s / 2 * (1 + 1e-5) + 1e-7 * w2.abs()
    assert torch.all(err[inside] <= tol.expand_as(err)[inside])
    # outside the range a weight maps to the nearest end of it
    assert torch.all(v2[w2 > hi] == hi.expand_as(v2)[w2 > hi])
    assert torch.all(v2[w2 < lo] == lo.expand_as(v2)[w2 < lo])


@PROPS
@given(w=tensors(), bits=st.integers(2, 8), symmetric=st.booleans(), per_channel=st.booleans())
def test_property_idempotent(
    w: torch.Tensor, bits: int, symmetric: bool, per_channel: bool
) -> None:
    cfg = QuantConfig(bits=bits, symmetric=symmetric, per_channel=per_channel)
    once = quantize_tensor(w, cfg)
    twice = quantize_tensor(once, cfg)
    assert torch.allclose(twice, once, rtol=1e-5, atol=1e-6 * float(w.abs().max()))


def test_idempotent_exact_symmetric_8bit() -> None:
    w = randn(50, seed=4)
    once = quantize_tensor(w, QuantConfig(bits=8))
    assert torch.equal(quantize_tensor(once, QuantConfig(bits=8)), once)


@PROPS
@given(w=tensors(), cfg=quant_configs())
def test_property_matches_torch_oracle(w: torch.Tensor, cfg: QuantConfig) -> None:
    if cfg.rounding != "nearest":
        return
    res = quantize_with_params(w, cfg)
    qp = res.qparams
    if res.per_channel:
        ref = torch.fake_quantize_per_channel_affine(
            w, qp.scale, qp.zero_point.to(torch.int32), 0, qp.qmin, qp.qmax
        )
    else:
        ref = torch.fake_quantize_per_tensor_affine(
            w, float(qp.scale), int(qp.zero_point), qp.qmin, qp.qmax
        )
    assert torch.equal(res.values, ref)


# ---------------------------------------------------------------- clip modes


def test_clip_ratio_half_halves_the_range() -> None:
    w = randn(40, seed=5)
    amax = float(w.abs().max())
    res = quantize_with_params(w, QuantConfig(bits=4, clip=0.5))
    assert float(res.qparams.hi) == pytest.approx(amax / 2, rel=1e-6)
    assert float(res.qparams.lo) == pytest.approx(-amax / 2, rel=1e-6)
    assert float(res.values.abs().max()) == pytest.approx(amax / 2, rel=1e-6)
    full = quantize_with_params(w, QuantConfig(bits=4, clip=1.0))
    assert float(res.qparams.scale) == pytest.approx(float(full.qparams.scale) / 2, rel=1e-6)


def test_clip_ratio_asymmetric_scales_both_ends() -> None:
    w = torch.tensor([-1.0, 0.5, 3.0])
    res = quantize_with_params(w, QuantConfig(bits=4, symmetric=False, clip=0.5))
    assert res.qparams.lo.tolist() == [-0.5] and res.qparams.hi.tolist() == [1.5]


def test_clip_absolute_range() -> None:
    w = randn(40, seed=6)
    res = quantize_with_params(w, QuantConfig(bits=4, clip=0.3, clip_mode="absolute"))
    assert res.qparams.lo.tolist() == pytest.approx([-0.3])
    assert res.qparams.hi.tolist() == pytest.approx([0.3])
    assert float(res.values.abs().max()) == pytest.approx(0.3, rel=1e-6)
    assert float(res.qparams.scale) == pytest.approx(0.3 / 7, rel=1e-6)


def test_clip_absolute_far_outside_range_keeps_sign() -> None:
    w = torch.tensor([1e30, -1e30, 0.0005, 0.0])
    for sym in (True, False):
        out = quantize_tensor(w, QuantConfig(bits=4, symmetric=sym, clip=1e-3,
                                             clip_mode="absolute"))
        assert out[0] > 0 and out[1] < 0 and out[3] == 0


def test_clip_sigma() -> None:
    w = randn(1000, seed=7)
    std = float(w.std(unbiased=False))
    res = quantize_with_params(w, QuantConfig(bits=4, clip=2.0, clip_mode="sigma"))
    assert float(res.qparams.hi) == pytest.approx(2 * std, rel=1e-5)
    # sigma never widens the range beyond max|w|
    wide = quantize_with_params(w, QuantConfig(bits=4, clip=100.0, clip_mode="sigma"))
    assert float(wide.qparams.hi) == pytest.approx(float(w.abs().max()), rel=1e-6)


def test_clip_percentile_100_equals_ratio_1() -> None:
    w = randn(5, 7, seed=8)
    for sym in (True, False):
        for pc in (True, False):
            a = quantize_tensor(w, QuantConfig(bits=4, symmetric=sym, per_channel=pc,
                                               clip=100.0, clip_mode="percentile"))
            b = quantize_tensor(w, QuantConfig(bits=4, symmetric=sym, per_channel=pc))
            assert torch.equal(a, b)


def test_clip_percentile_50_is_median_abs() -> None:
    w = torch.tensor([-4.0, 1.0, -2.0, 3.0, 5.0])
    res = quantize_with_params(w, QuantConfig(bits=4, clip=50.0, clip_mode="percentile"))
    assert res.qparams.hi.tolist() == [3.0]


def sq_err(w: torch.Tensor, cfg: QuantConfig) -> float:
    return float(((quantize_tensor(w, cfg) - w).double() ** 2).sum())


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
def test_clip_mse_beats_ratio_grid(bits: int, symmetric: bool, per_channel: bool) -> None:
    w = randn(4, 200, seed=bits)
    w[:, 0] *= 8  # outliers make clipping worth it
    kw = dict(bits=bits, symmetric=symmetric, per_channel=per_channel)
    mse = sq_err(w, QuantConfig(clip_mode="mse", **kw))
    tol = 1e-6
    assert mse <= sq_err(w, QuantConfig(clip=1.0, **kw)) * (1 + tol)
    for r in torch.linspace(0.05, 0.95, 19).tolist():
        assert mse <= sq_err(w, QuantConfig(clip=r, **kw)) * (1 + tol), r
    if bits <= 4:  # with outliers, the best range clips
        assert mse < sq_err(w, QuantConfig(clip=1.0, **kw))


def test_clip_mse_one_bit_is_mean_abs() -> None:
    w = randn(30, seed=9)
    assert torch.equal(quantize_tensor(w, QuantConfig(bits=1, clip_mode="mse")),
                       quantize_tensor(w, QuantConfig(bits=1)))


def test_clip_range_and_choose_qparams_direct() -> None:
    w2 = torch.tensor([[-2.0, 1.0, 0.5], [0.25, -0.5, 0.0]])
    kept = torch.ones_like(w2, dtype=torch.bool)
    lo, hi = clip_range(w2, kept, QuantConfig(per_channel=True), 8)
    assert lo.tolist() == [-2.0, -0.5] and hi.tolist() == [2.0, 0.5]
    qp = choose_qparams(w2, kept, QuantConfig(per_channel=True, bits=3), 3)
    assert qp.scale.tolist() == pytest.approx([2 / 3, 0.5 / 3])
    codes = quantize_codes(w2, qp)
    assert codes.tolist() == [[-3, 2, 1], [2, -3, 0]]  # 1.5 -> 2, 0.75 -> 1 (half to even)
    assert torch.equal(dequantize_codes(codes, qp), codes.float() * qp.scale[:, None])


def test_all_zero_tensor_stays_zero() -> None:
    for cfg in (QuantConfig(bits=4), QuantConfig(bits=4, symmetric=False), QuantConfig(bits=1),
                QuantConfig(bits=4, clip_mode="mse"), QuantConfig(bits=4, clip_mode="sigma")):
        assert torch.equal(quantize_tensor(torch.zeros(3, 4), cfg), torch.zeros(3, 4))


def test_subnormal_weights_keep_their_sign_and_stay_finite() -> None:
    w = torch.tensor([1e-39, -1e-39, 0.0])
    for sym in (True, False):
        out = quantize_tensor(w, QuantConfig(bits=8, symmetric=sym))
        assert torch.isfinite(out).all()
        assert out[0] >= 0 and out[1] <= 0 and out[2] == 0


def test_sixteen_bits_is_nearly_lossless() -> None:
    w = randn(100, seed=11)
    out = quantize_tensor(w, QuantConfig(bits=16))
    assert float((out - w).abs().max()) <= float(w.abs().max()) / 32767 / 2 * 1.0001


# ---------------------------------------------------------------- stochastic rounding


def test_stochastic_seeded_and_on_grid() -> None:
    w = randn(500, seed=12)
    cfg = QuantConfig(bits=3, rounding="stochastic", seed=1)
    a, b = quantize_tensor(w, cfg), quantize_tensor(w, cfg)
    assert torch.equal(a, b)
    c = quantize_tensor(w, QuantConfig(bits=3, rounding="stochastic", seed=2))
    assert not torch.equal(a, c)
    assert not torch.equal(a, quantize_tensor(w, QuantConfig(bits=3)))
    assert_on_grid(w, cfg)
    scale = float(w.abs().max()) / 3
    assert float((a - w).abs().max()) < scale * (1 + 1e-5)  # within one step


def test_stochastic_generator_argument_is_used() -> None:
    w = randn(200, seed=13)
    cfg = QuantConfig(bits=3, rounding="stochastic")
    r1 = quantize_with_params(w, cfg, generator=torch.Generator().manual_seed(5)).values
    r2 = quantize_with_params(w, cfg, generator=torch.Generator().manual_seed(5)).values
    r3 = quantize_with_params(w, cfg, generator=torch.Generator().manual_seed(6)).values
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)


def test_stochastic_is_unbiased() -> None:
    # scale 1 (max 1, 2 bits): 0.3 rounds to 1 with probability 0.3, else 0
    w = torch.full((20001,), 0.3)
    w[0] = 1.0
    out = quantize_tensor(w, QuantConfig(bits=2, rounding="stochastic", seed=3))[1:]
    assert set(out.unique().tolist()) == {0.0, 1.0}
    assert float(out.mean()) == pytest.approx(0.3, abs=0.015)  # ~5 standard errors
    # and averaged over seeds, on an arbitrary tensor
    w = randn(64, seed=14)
    cfg = dict(bits=3)
    mean = torch.stack([
        quantize_tensor(w, QuantConfig(rounding="stochastic", seed=s, **cfg)) for s in range(400)
    ]).mean(dim=0)
    step = float(w.abs().max()) / 3
    assert float((mean - w).abs().max()) < 0.25 * step


# ---------------------------------------------------------------- input safety and errors


@pytest.mark.parametrize(
    "cfg",
    [QuantConfig(bits=4), QuantConfig(bits=4, clip_mode="mse", per_channel=True),
     QuantConfig(bits=1), QuantConfig(bits=4, rounding="stochastic"),
     QuantConfig(bits=5, symmetric=False, clip=90.0, clip_mode="percentile")],
)
def test_input_never_modified(cfg: QuantConfig) -> None:
    w = randn(4, 6, seed=15).requires_grad_(True)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) > 0.5
    before, mask_before = w.detach().clone(), mask.clone()
    out = quantize_tensor(w, cfg, mask=mask)
    assert torch.equal(w.detach(), before) and torch.equal(mask, mask_before)
    assert not out.requires_grad
    assert out.data_ptr() != w.data_ptr()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_raise(bad: float) -> None:
    w = torch.tensor([0.5, bad, -1.0])
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_tensor(w, QuantConfig())


def test_integer_weights_raise() -> None:
    with pytest.raises(ValueError, match="floating-point"):
        quantize_tensor(torch.tensor([1, 2, 3]), QuantConfig())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(bits=0), "from 1 to 16"),
        (dict(bits=17), "from 1 to 16"),
        (dict(bits=-3), "from 1 to 16"),
        (dict(bits=2.5), "whole number"),
        (dict(bits=float("inf")), "whole number"),
        (dict(bits=float("nan")), "whole number"),
        (dict(bits=True), "whole number"),
        (dict(bits="8"), "whole number"),
        (dict(clip=0.0), r"clip ratio must be in \(0, 1\]"),
        (dict(clip=1.5), r"clip ratio must be in \(0, 1\]"),
        (dict(clip=-0.2), r"clip ratio"),
        (dict(clip=float("nan")), "finite"),
        (dict(clip=150.0, clip_mode="percentile"), r"percentile must be in \(0, 100\]"),
        (dict(clip=0.0, clip_mode="percentile"), "percentile"),
        (dict(clip=0.0, clip_mode="absolute"), "must be > 0"),
        (dict(clip=-1.0, clip_mode="sigma"), "must be > 0"),
        (dict(clip_mode="max"), "clip_mode must be one of ratio, absolute"),
        (dict(rounding="floor"), "rounding must be one of nearest, stochastic"),
        (dict(layer_bits={"fc": 0}), "bits for layer 'fc'"),
        (dict(layer_bits=[("fc",)]), "pairs"),
    ],
)
def test_bad_quant_config_raises(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_quant_config_normalises() -> None:
    cfg = QuantConfig(bits=4.0, clip=1, layer_bits={"b": 2, "a": 8})
    assert cfg.bits == 4 and isinstance(cfg.bits, int) and isinstance(cfg.clip, float)
    assert cfg.layer_bits == (("a", 8), ("b", 2))
    assert cfg.bits_for("a") == 8 and cfg.bits_for("c") == 4
    assert hash(cfg) == hash(QuantConfig(bits=4, layer_bits=[("b", 2), ("a", 8)]))
    assert QuantConfig(clip=7.0, clip_mode="mse").clip == 7.0
    with pytest.raises(AttributeError):
        cfg.bits = 3  # type: ignore[misc]


def test_per_channel_on_vector_falls_back_to_per_tensor() -> None:
    w = randn(9, seed=16)
    res = quantize_with_params(w, QuantConfig(bits=4, per_channel=True))
    assert not res.per_channel and res.qparams.scale.numel() == 1
    assert torch.equal(res.values, quantize_tensor(w, QuantConfig(bits=4)))


def test_scalar_math_sanity() -> None:
    # a per-channel quantizer is a per-tensor quantizer applied to each channel
    w = randn(3, 8, seed=17)
    pc = quantize_tensor(w, QuantConfig(bits=5, per_channel=True, symmetric=False))
    for ch in range(3):
        assert torch.equal(pc[ch], quantize_tensor(w[ch], QuantConfig(bits=5, symmetric=False)))
    assert math.isfinite(float(pc.sum()))
