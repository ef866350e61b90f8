"""Affine quantization maths: code ranges, parameters from a range, quantize, dequantize.

Values are viewed as groups ``x2`` of shape (G, K) with one scale and zero point per
group (per-channel rows, or a single row). For ``bits >= 2``:

    code = clamp(round(x / scale) + zero_point, qmin, qmax)
    x_q  = (code - zero_point) * scale

Symmetric: qmin = -(2^(b-1) - 1), qmax = 2^(b-1) - 1, zero_point = 0 and
scale = c / qmax for c = max(-lo, hi), so zero is exact and the grid is even.
Asymmetric: qmin = 0, qmax = 2^b - 1, scale = (hi - lo) / qmax and an integer
zero_point = round(-lo / scale), so zero is exact again (the range [lo, hi] holds 0).
For ``bits == 1`` (``QParams.binary``) code 1 stands for +alpha and code 0 for -alpha:
x_q = (2 * code - 1) * alpha, with alpha stored as the scale.
Rounding is half to even, as in ``torch.fake_quantize_per_channel_affine``. Codes are
stored in the smallest signed integer dtype that holds [qmin, qmax].

>>> import torch
>>> qp = qparams_from_range(torch.tensor([-1.5]), torch.tensor([1.5]), 3, True)
>>> qp.scale.tolist(), qp.qmin, qp.qmax
([0.5], -3, 3)
>>> codes = quantize_codes(torch.tensor([[-2.0, -0.5, 0.25, 0.3, 1.5]]), qp)
>>> codes.tolist(), codes.dtype
([[-3, -1, 0, 1, 3]], torch.int8)
>>> dequantize_codes(codes, qp).tolist()
[[-1.5, -0.5, 0.0, 0.5, 1.5]]
>>> qp = qparams_from_range(torch.tensor([-1.0]), torch.tensor([2.0]), 2, False)
>>> qp.scale.tolist(), qp.zero_point.tolist()
([1.0], [1])
>>> fake_quantize(torch.tensor([[-1.0, 0.0, 0.9, 1.6, 5.0]]), qp).tolist()
[[-1.0, 0.0, 1.0, 2.0, 2.0]]
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "QParams",
    "code_range",
    "code_dtype",
    "qparams_from_range",
    "pow2_scale",
    "quantize_codes",
    "dequantize_codes",
    "fake_quantize",
]


class QParams(NamedTuple):
    """Quantization parameters for each group (shape (G,)) and the integer code range."""

    scale: torch.Tensor  # float32 (G,); for 1 bit this is alpha
    zero_point: torch.Tensor  # int64 (G,); 0 for symmetric and 1 bit
    qmin: int
    qmax: int
    lo: torch.Tensor  # float32 (G,): lower clip bound in value units
    hi: torch.Tensor  # float32 (G,): upper clip bound
    binary: bool = False  # 1 bit: x_q = (2 * code - 1) * scale


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer codes a ``bits``-bit quantizer may use.

    >>> code_range(4, True), code_range(4, False), code_range(1, True)
    ((-7, 7), (0, 15), (0, 1))
    """
    if bits == 1:
        return 0, 1
    if symmetric:
        q = 2 ** (bits - 1) - 1
        return -q, q
    return 0, 2**bits - 1


def code_dtype(qmin: int, qmax: int) -> torch.dtype:
    """The smallest signed integer dtype that holds every code in [qmin, qmax].

    >>> code_dtype(*code_range(8, True)), code_dtype(*code_range(8, False))
    (torch.int8, torch.int16)
    """
    for dtype in (torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return dtype
    return torch.int64


def pow2_scale(scale: torch.Tensor, nearest: bool = False) -> torch.Tensor:
    """``scale`` raised to the next power of two (or the nearest one): fixed point.

    With scale = 2^-p a value is stored as round(x * 2^p) and dequantized by a shift.
    Raising (not rounding) keeps the whole range on the grid. Exponents stay in -126..127,
    float32's normal range, which a signed byte holds.

    >>> pow2_scale(torch.tensor([0.3, 0.25, 1e-3])).tolist()
    [0.5, 0.25, 0.001953125]
    """
    e = torch.log2(scale.double())
    e = torch.round(e) if nearest else torch.ceil(e)
    return (2.0 ** e.clamp(-126, 127)).float()


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, pow2: bool = False
) -> QParams:
    """Scale and zero point per group for a range [lo, hi] (each (G,), lo <= 0 <= hi).

    ``pow2`` raises each scale to a power of two (see :func:`pow2_scale`).
    """
    qmin, qmax = code_range(bits, symmetric)
    if symmetric:
        c = torch.maximum(-lo, hi)
        scale = _floor_scale(torch.where(c > 0, c / qmax, torch.ones_like(c)))
        scale = pow2_scale(scale) if pow2 else scale
        zp = torch.zeros_like(c, dtype=torch.int64)
    else:
        width = hi - lo
        scale = _floor_scale(torch.where(width > 0, width / qmax, torch.ones_like(width)))
        scale = pow2_scale(scale) if pow2 else scale
        zp = torch.round(-lo / scale).clamp(qmin, qmax).to(torch.int64)
    return QParams(scale.float(), zp, qmin, qmax, lo.float(), hi.float())


def _floor_scale(scale: torch.Tensor) -> torch.Tensor:
    # a range of subnormal width would give scale 0 (or 1/scale = inf) and wrong codes
    return scale.float().clamp(min=torch.finfo(torch.float32).tiny)


def quantize_codes(
    x2: torch.Tensor, qp: QParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Integer codes (dtype ``code_dtype``, same shape as ``x2``) for groups ``x2`` (G, K).

    Rounds half to even; with a ``generator`` it rounds stochastically: floor(x + u),
    u ~ U[0, 1).
    """
    dtype = code_dtype(qp.qmin, qp.qmax)
    if qp.binary:
        return (x2 >= 0).to(dtype)
    x = x2 * (1.0 / qp.scale[:, None])
    if generator is None:
        x = torch.round(x)
    else:
        x = torch.floor(x + torch.rand(x.shape, generator=generator, dtype=x.dtype))
    # in float32: an in-range sum of an integer and a zero point (< 2^17) is exact, and one
    # beyond 2^24 (or infinite) clamps to the same end of the range as the exact sum would
    return (x + qp.zero_point[:, None]).clamp(qp.qmin, qp.qmax).to(dtype)


def dequantize_codes(codes: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Float32 values from codes (G, K) of any integer dtype: (code - zero_point) * scale."""
    # widened first: small code dtypes would overflow; float32 is exact for 17-bit integers
    c = codes.float()
    if qp.binary:
        return (2 * c - 1) * qp.scale[:, None]
    return (c - qp.zero_point[:, None].float()) * qp.scale[:, None]


def fake_quantize(x2: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Quantize then dequantize groups ``x2`` (G, K): the values a quantized tensor holds."""
    return dequantize_codes(quantize_codes(x2, qp), qp)
