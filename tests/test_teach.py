"""Tests for qcore.teach: one weight's journey, the clip-error curve, the 2-bit trap hint."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_bn_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qcore.compress import Compressed, compress
from qcore.config import CompressionConfig, PruneConfig, QuantConfig
from qcore.quant import quantize_tensor
from qcore.teach import (
    ErrorCurve,
    Journey,
    clip_error_curve,
    random_weight_index,
    trap_hint,
    weight_journey,
)


def linear(weights: list[list[float]]) -> nn.Module:
    t = torch.tensor(weights)
    lin = nn.Linear(t.shape[1], t.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(t)
    return nn.Sequential(lin).eval()


def squeeze(quant: QuantConfig | None, prune: PruneConfig | None = None,
            model: nn.Module | None = None) -> Compressed:
    model = model or linear([[-1.0, -0.2, 0.0, 0.26, 1.0]])
    return compress(model, CompressionConfig(quant=quant, prune=prune))


# ---------------------------------------------------------------- one weight's journey


def test_journey_symmetric_hand_case() -> None:
    # 3 bits symmetric over [-1, 1]: scale 1/3, codes -3..3 stored as code + 3 in 3 bits
    c = squeeze(QuantConfig(bits=3))
    third = float(torch.tensor(1.0) / 3)  # float32
    j = weight_journey(c, "0")  # the largest |w|: -1.0 at 0 and 1.0 at 4, the first
    assert isinstance(j, Journey)
    assert (j.index, j.position, j.weight, j.pruned, j.bits) == (0, (0, 0), -1.0, False, 3)
    assert (j.clip_lo, j.clip_hi) == (-1.0, 1.0)
    assert (j.grid_lo, j.grid_hi) == (-1.0, 1.0)  # 3 * scale in float32
    assert (j.scale, j.zero_point) == (third, 0)
    assert j.scaled == float(torch.tensor(-1.0) * (1.0 / torch.tensor(third)))  # about -3
    assert (j.code, j.code_binary, j.dequantized) == (-3, "000", -1.0)
    assert j.error == 0.0
    j = weight_journey(c, "0", 3)  # 0.26 / (1/3) = 0.78 rounds to code 1, stored as 4
    assert (j.weight, j.code, j.code_binary) == (float(torch.tensor(0.26)), 1, "100")
    assert j.scaled == pytest.approx(0.78, abs=1e-6)
    assert j.dequantized == third and j.error == third - float(torch.tensor(0.26))


def test_journey_asymmetric_hand_case() -> None:
    # 2 bits asymmetric over [-0.75, 2.25]: scale 1, zero point round(0.75) = 1, grid [-1, 2]
    c = squeeze(QuantConfig(bits=2, symmetric=False), model=linear([[-0.75, 2.25, 1.0]]))
    j = weight_journey(c, "0")
    assert (j.index, j.weight, j.clip_lo, j.clip_hi) == (1, 2.25, -0.75, 2.25)
    assert (j.grid_lo, j.grid_hi, j.scale, j.zero_point) == (-1.0, 2.0, 1.0, 1)
    # 2.25 + 1 = 3.25; round(2.25) + 1 = 3 = qmax; stored as 3 - 0 = "11"; back: (3 - 1) * 1
    assert (j.scaled, j.code, j.code_binary, j.dequantized, j.error) == (
        3.25, 3, "11", 2.0, -0.25)
    j = weight_journey(c, "0", 0)  # -0.75 + 1 = 0.25: code round(-0.75) + 1 = 0, back -1
    assert (j.scaled, j.code, j.code_binary, j.dequantized, j.error) == (
        0.25, 0, "00", -1.0, -0.25)


def test_journey_one_bit_and_pruned() -> None:
    c = squeeze(QuantConfig(bits=1), PruneConfig(rate=0.4))  # prunes 0.0 and -0.2
    alpha = float(torch.tensor(2.26) / 3)  # mean |w| of the kept -1, 0.26, 1
    j = weight_journey(c, "0", 3)
    assert (j.bits, j.scale, j.zero_point, j.code, j.code_binary) == (1, alpha, 0, 1, "1")
    assert math.isnan(j.scaled) and (j.grid_lo, j.grid_hi) == (-alpha, alpha)
    assert j.dequantized == alpha and not j.pruned
    j = weight_journey(c, "0", 1)  # pruned: zero by its mask, whatever its sign
    assert j.pruned and j.dequantized == 0.0 and j.error == float(torch.tensor(0.2))
    assert math.copysign(1.0, j.dequantized) == 1.0  # shown as 0, not -0
    assert weight_journey(c, "0", 0).code_binary == "0"
    c = squeeze(QuantConfig(bits=4), PruneConfig(rate=0.4))
    j = weight_journey(c, "0", 1)  # pruned at 4 bits: the zero code, stored as 0 + 7
    assert j.pruned and (j.code, j.code_binary, j.dequantized) == (0, "0111", 0.0)


@settings(max_examples=25, deadline=None)
@given(bits=st.integers(1, 8), symmetric=st.booleans(), per_channel=st.booleans(),
       rounding=st.sampled_from(["nearest", "stochastic"]), rate=st.sampled_from([0.0, 0.3]),
       structured=st.booleans(), seed=st.integers(0, 1000))
def test_property_journey_lands_on_the_compressed_weight(
    bits, symmetric, per_channel, rounding, rate, structured, seed
) -> None:
    """Two ways agree: the journey's dequantized value is the compressed model's weight, its
    code the stored one, and the code is the formula applied to ``scaled``."""
    q = QuantConfig(bits=bits, symmetric=symmetric, per_channel=per_channel, rounding=rounding,
                    clip=0.8, seed=seed)
    prune = PruneConfig(rate=rate, structured=structured) if rate else None
    c = compress(make_bn_model(seed % 3), CompressionConfig(quant=q, prune=prune))
    res = c.layer("3")
    after, codes = res.dequantized.reshape(-1), res.codes.reshape(-1)
    for i in range(0, res.float_weight.numel(), 7):
        j = weight_journey(c, "3", i)
        assert j.dequantized == float(after[i]) and j.code == int(codes[i])
        assert len(j.code_binary) == bits and int(j.code_binary, 2) == j.code - res.qparams.qmin
        assert j.pruned == (res.mask is not None and not bool(res.mask.reshape(-1)[i]))
        assert j.grid_lo <= j.dequantized <= j.grid_hi
        if bits > 1 and rounding == "nearest" and not j.pruned:
            lo, hi = res.qparams.qmin, res.qparams.qmax
            x = j.scaled - j.zero_point
            assert j.code == min(hi, max(lo, round(x) + j.zero_point))  # Python rounds half even
        if bits > 1 and not j.pruned:
            assert j.dequantized == float(torch.tensor(float(j.code - j.zero_point))
                                          * torch.tensor(j.scale))


def test_journey_refuses_float_layers_and_bad_indices() -> None:
    with pytest.raises(ValueError, match="left in float"):
        weight_journey(squeeze(None, PruneConfig(rate=0.4)), "0")
    c = squeeze(QuantConfig(bits=4))
    for bad in (-1, 5, 2.0, True):
        with pytest.raises(ValueError, match=r"index must be a whole number in 0\.\.4"):
            weight_journey(c, "0", bad)
    with pytest.raises(ValueError, match="No layer named"):
        weight_journey(c, "fc9")


def test_random_weight_index_is_seeded() -> None:
    c = compress(make_bn_model(), CompressionConfig(quant=QuantConfig(bits=4)))
    n = c.layer("7").float_weight.numel()
    picks = [random_weight_index(c, "7", s) for s in range(20)]
    assert all(0 <= i < n for i in picks) and len(set(picks)) > 10
    assert picks == [random_weight_index(c, "7", s) for s in range(20)]


# ---------------------------------------------------------------- the clip-error curve


def gaussian_model(n: int = 2000, seed: int = 0, rows: int = 4) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    return linear((torch.randn(rows, n // rows, generator=g) * 0.1).tolist())


@pytest.mark.parametrize("bits, symmetric, rate", [
    (2, True, 0.0), (3, True, 0.3), (4, False, 0.0), (3, False, 0.5), (1, True, 0.0),
    (1, True, 0.3)])  # fmt: skip
def test_curve_splits_the_error_exactly(bits: int, symmetric: bool, rate: float) -> None:
    prune = PruneConfig(rate=rate) if rate else None
    c = squeeze(QuantConfig(bits=bits, symmetric=symmetric), prune, gaussian_model())
    curve = clip_error_curve(c, "0", points=20)
    assert isinstance(curve, ErrorCurve) and len(curve.table) == 20
    t = curve.table
    assert list(t.columns) == ["c", "clip_error", "rounding_error", "total"]
    assert (t["total"] == t["clip_error"] + t["rounding_error"]).all()
    res = c.layer("0")
    w = res.float_weight.reshape(-1)
    kept = w if res.mask is None else w[res.mask.reshape(-1)]  # pruned weights left out
    assert curve.max_abs == float(kept.abs().max())
    assert t["c"].is_monotonic_increasing and t["c"].iloc[15] == curve.max_abs  # 16 / 16
    assert t["c"].iloc[-1] == pytest.approx(1.25 * curve.max_abs)
    for row in t.itertuples():
        # directly: quantize the kept weights over [-c, c] (the absolute clip mode)
        q = quantize_tensor(kept, QuantConfig(bits=bits, symmetric=symmetric,
                                              clip_mode="absolute", clip=row.c))
        direct = float(((kept.double() - q.double()) ** 2).sum())
        assert row.total == pytest.approx(direct, rel=1e-12)
        beyond = kept.abs() > row.c
        assert row.clip_error == pytest.approx(
            float(((kept.double() - q.double())[beyond] ** 2).sum()), rel=1e-12)
        if row.c >= curve.max_abs:
            assert row.clip_error == 0.0
        else:
            assert row.clip_error > 0.0


def test_curve_current_and_optimum() -> None:
    c = squeeze(QuantConfig(bits=3, clip=0.6), PruneConfig(rate=0.3), gaussian_model())
    curve = clip_error_curve(c, "0")
    res = c.layer("0")
    kept = res.mask.reshape(-1)
    w, after = res.float_weight.reshape(-1)[kept], res.dequantized.reshape(-1)[kept]
    # per tensor, symmetric, nearest: the curve's value at the layer's clip is its real error
    assert curve.current[0] == float(res.qparams.hi[0]) == pytest.approx(0.6 * curve.max_abs)
    assert curve.current[1] == pytest.approx(float(((w.double() - after.double()) ** 2).sum()),
                                             rel=1e-12)
    best = curve.table["total"].idxmin()
    assert curve.optimum == (curve.table["c"][best], curve.table["total"][best])
    assert curve.optimum[1] <= curve.current[1]
    assert not curve.per_channel and curve.note == "" and (curve.bits, curve.symmetric) == (3, True)
    pc = clip_error_curve(squeeze(QuantConfig(bits=3, per_channel=True), None,
                                  gaussian_model()), "0")
    assert pc.per_channel and "one scale for the whole tensor" in pc.note
    with pytest.raises(ValueError, match="left in float"):
        clip_error_curve(squeeze(None, PruneConfig(rate=0.5)), "0")
    with pytest.raises(ValueError, match="at least 2"):
        clip_error_curve(c, "0", points=1)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mse_clip_mode_lands_near_the_curve_optimum(bits: int, seed: int) -> None:
    model = gaussian_model(seed=seed)
    curve = clip_error_curve(squeeze(QuantConfig(bits=bits), None, model), "0", points=60)
    mse = squeeze(QuantConfig(bits=bits, clip_mode="mse"), None, model).layer("0")
    c_mse = float(mse.qparams.hi[0])
    step = curve.table["c"].diff().max()  # one point of the curve
    assert abs(c_mse - curve.optimum[0]) <= step


def test_rounding_error_grows_with_the_range() -> None:
    """Evenly spread weights: a wider range means wider steps, so more rounding error."""
    model = linear([torch.linspace(-1.0, 1.0, 2001).tolist()])
    for bits in (2, 3, 4, 6):
        curve = clip_error_curve(squeeze(QuantConfig(bits=bits), None, model), "0", points=60)
        coarse = curve.table["rounding_error"].iloc[::6]
        assert coarse.is_monotonic_increasing, bits
        assert curve.table["clip_error"].is_monotonic_decreasing


def test_mnist_cnn_two_bit_trap() -> None:
    """At 2 bits and ratio 1.0 mnist-cnn's fc1 rounds nearly every weight to 0; the curve's
    least error sits far inside max|w|, near where the mse mode puts the range."""
    import qcore

    try:
        model = qcore.load_model("mnist-cnn")
    except ValueError as exc:
        pytest.skip(f"sample model not available: {exc}")
    c = compress(model, CompressionConfig(quant=QuantConfig(bits=2)))
    curve = clip_error_curve(c, "fc1")
    assert curve.current[0] == curve.max_abs and curve.optimum[0] < 0.25 * curve.max_abs
    assert curve.optimum[1] < 0.5 * curve.current[1]


# ---------------------------------------------------------------- the trap hint


def test_trap_hint() -> None:
    hint = trap_hint(2, "ratio", 1.0, 0.097, 0.691)
    assert hint is not None and "\n" not in hint
    assert "9.7%" in hint and "69.1%" in hint and "mse" in hint
    assert trap_hint(3, "ratio", 1.0, 0.097, 0.691) is None
    assert trap_hint(2, "mse", 1.0, 0.097, 0.691) is None
    assert trap_hint(2, "ratio", 0.9, 0.097, 0.691) is None
    assert trap_hint(2, "ratio", 1.0, 0.691, 0.691) is None  # not below
    assert trap_hint(2, "ratio", 1.0, 0.097, None) is None  # 1 bit not measured
