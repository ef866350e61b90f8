"""Power-of-two (fixed-point) scales: round(w * 2^p), stored as a signed-byte exponent."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcore.affine import pow2_scale
from qcore.codecs import decode, encode_quantized
from qcore.config import ActQuantConfig, QuantConfig
from qcore.quant import quantize_with_params


def is_pow2(t: torch.Tensor) -> bool:
    e = torch.log2(t.double())
    return bool(torch.all(e == torch.round(e)))


@settings(deadline=None, max_examples=60)
@given(bits=st.integers(1, 16), symmetric=st.booleans(), per_channel=st.booleans(),
       seed=st.integers(0, 1000))
def test_weight_scales_are_powers_of_two_and_cover_the_range(bits, symmetric, per_channel, seed):
    w = torch.randn(6, 20, generator=torch.Generator().manual_seed(seed)) * 0.3
    cfg = QuantConfig(bits=bits, symmetric=symmetric, per_channel=per_channel, scale="pow2")
    res = quantize_with_params(w, cfg)
    assert is_pow2(res.qparams.scale)
    if bits > 1:  # raising the scale keeps the weights inside the grid: symmetric exactly,
        # asymmetric within one step (the integer zero point shifts the grid, as it does
        # for float scales too)
        ref = quantize_with_params(w, QuantConfig(bits=bits, symmetric=symmetric,
                                                  per_channel=per_channel))
        assert torch.all(res.qparams.scale >= ref.qparams.scale)
        assert torch.all(res.qparams.scale < 2 * ref.qparams.scale)
        qp = res.qparams
        lo = (qp.qmin - qp.zero_point) * qp.scale
        hi = (qp.qmax - qp.zero_point) * qp.scale
        w2 = w.reshape(qp.scale.numel(), -1)
        slack = 1e-6 if symmetric else qp.scale + 1e-6
        assert torch.all(w2.min(dim=1).values >= lo - slack)
        assert torch.all(w2.max(dim=1).values <= hi + slack)


def test_fixed_point_is_round_w_times_two_to_the_p() -> None:
    """Symmetric 8 bits, max|w| = 0.9: scale 0.9/127 raised to 2^-7, codes round(w * 128)."""
    w = torch.tensor([0.9, -0.5, 0.0123, -0.9])
    res = quantize_with_params(w, QuantConfig(bits=8, scale="pow2"))
    assert float(res.qparams.scale[0]) == 2.0**-7
    assert res.codes.tolist() == [round(0.9 * 128), round(-0.5 * 128), round(0.0123 * 128),
                                  round(-0.9 * 128)]  # fmt: skip
    assert pow2_scale(torch.tensor([2.0**-7])).item() == 2.0**-7  # already a power: kept


@pytest.mark.parametrize("per_channel", [False, True])
def test_exponents_take_a_byte_and_round_trip(per_channel: bool) -> None:
    w = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    for symmetric in (True, False):
        res = quantize_with_params(w, QuantConfig(bits=5, symmetric=symmetric,
                                                  per_channel=per_channel, scale="pow2"))
        enc = encode_quantized(res.codes, res.qparams, 5, per_channel=res.per_channel,
                               symmetric=symmetric, pow2=True)
        plain = encode_quantized(res.codes, res.qparams, 5, per_channel=res.per_channel,
                                 symmetric=symmetric)
        groups = res.qparams.scale.numel()
        assert enc.bytes_of("exponents") == groups and enc.bytes_of("scales") == 0
        assert plain.nbytes() - enc.nbytes() == 3 * groups  # 1 byte instead of 4 per scale
        data = enc.encode()
        assert len(data) == enc.nbytes()
        assert torch.equal(decode(enc.header(), data, (5, 12), "w"), res.values)


def test_scale_mode_is_checked() -> None:
    with pytest.raises(ValueError, match="scale"):
        QuantConfig(scale="log")
    with pytest.raises(ValueError, match="scale"):
        ActQuantConfig(scale="int")
    assert QuantConfig.from_dict(QuantConfig(scale="pow2").to_dict()).scale == "pow2"
    assert math.isclose(pow2_scale(torch.tensor([0.3]), nearest=True).item(), 0.25)
