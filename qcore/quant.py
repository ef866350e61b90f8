"""Uniform weight quantization: choose a range, choose scale and zero point, round.

For ``bits >= 2`` every weight becomes

    code = clamp(round(w / scale) + zero_point, qmin, qmax)
    w_q  = (code - zero_point) * scale

Symmetric: qmin = -(2^(b-1) - 1), qmax = 2^(b-1) - 1, zero_point = 0 and
scale = c / qmax for a clip magnitude c, so zero is exact and the grid is even.
Asymmetric: qmin = 0, qmax = 2^b - 1, scale = (hi - lo) / qmax and an integer
zero_point = round(-lo / scale), so zero is exact again.
For ``bits == 1`` a weight becomes sign(w) * alpha with alpha = mean|w| over the
tensor or channel (code 1 for w >= 0, code 0 otherwise).

Ranges and scales are computed over the weights a pruning mask keeps, so levels are
spent on the weights that survive. Weights are viewed as (groups, K): one group per
output channel (dim 0) for per-channel scales, a single group for per-tensor.

>>> import torch
>>> w = torch.tensor([-1.0, -0.2, 0.0, 0.26, 1.0])
>>> quantize_tensor(w, QuantConfig(bits=2)).tolist()
[-1.0, 0.0, 0.0, 0.0, 1.0]
>>> quantize_tensor(w, QuantConfig(bits=3)).tolist()
[-1.0, -0.3333333432674408, 0.0, 0.3333333432674408, 1.0]
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from qcore.config import QuantConfig

__all__ = [
    "QParams",
    "QuantResult",
    "clip_range",
    "choose_qparams",
    "quantize_codes",
    "dequantize_codes",
    "quantize_with_params",
    "quantize_checked",
    "quantize_tensor",
    "code_range",
]


class QParams(NamedTuple):
    """Quantization parameters for each group (shape (G,)) and the integer code range."""

    scale: torch.Tensor  # float32 (G,); for 1 bit this is alpha
    zero_point: torch.Tensor  # int64 (G,); 0 for symmetric and 1 bit
    qmin: int
    qmax: int
    lo: torch.Tensor  # float32 (G,): lower clip bound in weight units
    hi: torch.Tensor  # float32 (G,): upper clip bound
    binary: bool = False  # 1 bit: w_q = (2 * code - 1) * scale


class QuantResult(NamedTuple):
    """Everything one quantized tensor needs: its values and how to store them."""

    values: torch.Tensor  # dequantized weights, same shape as the input
    codes: torch.Tensor  # int64 codes, same shape as the input
    qparams: QParams
    bits: int
    per_channel: bool
    symmetric: bool


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


def _groups(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """View ``w`` as (G, K): one row per output channel, or a single row."""
    if per_channel and w.dim() >= 1:
        return w.reshape(w.shape[0], -1)
    return w.reshape(1, -1)


def _masked_extremes(w2: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    zero = torch.zeros((), dtype=w2.dtype)
    # includes 0, as an asymmetric range must (else the clamped zero point shifts the grid)
    lo = torch.where(kept, w2, zero).amin(dim=1).clamp(max=0.0)
    hi = torch.where(kept, w2, zero).amax(dim=1).clamp(min=0.0)
    return lo, hi


def _masked_std(w2: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    n = kept.sum(dim=1).clamp(min=1)
    mean = (w2 * kept).sum(dim=1) / n
    var = (((w2 - mean[:, None]) * kept) ** 2).sum(dim=1) / n
    return var.sqrt()


def _sym_error(w2: torch.Tensor, kept: torch.Tensor, c: torch.Tensor, bits: int) -> torch.Tensor:
    """Squared error per group of a symmetric quantizer with clip magnitude ``c``."""
    qp = _qparams_from_range(-c, c, bits, True)
    deq = dequantize_codes(quantize_codes(w2, qp), qp)
    return (((deq - w2) * kept) ** 2).sum(dim=1)


def _asym_error(
    w2: torch.Tensor, kept: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int
) -> torch.Tensor:
    qp = _qparams_from_range(lo, hi, bits, False)
    deq = dequantize_codes(quantize_codes(w2, qp), qp)
    return (((deq - w2) * kept) ** 2).sum(dim=1)


def _mse_ratio(
    w2: torch.Tensor, kept: torch.Tensor, cfg_bits: int, symmetric: bool
) -> torch.Tensor:
    """Per group, the fraction of the full range whose quantizer has the least squared error.

    A coarse grid (0.05 .. 1.0) and then a fine one (steps of 0.0025) around the best.
    """
    lo, hi = _masked_extremes(w2, kept)
    amax = torch.maximum(-lo, hi)

    def error(r: torch.Tensor) -> torch.Tensor:
        if symmetric:
            return _sym_error(w2, kept, r * amax, cfg_bits)
        return _asym_error(w2, kept, r * lo, r * hi, cfg_bits)

    best_r = torch.ones(w2.shape[0])
    best_e = error(best_r)

    def consider(r: torch.Tensor) -> None:
        nonlocal best_r, best_e
        e = error(r)
        better = e < best_e
        best_r, best_e = torch.where(better, r, best_r), torch.where(better, e, best_e)

    for s in torch.linspace(0.05, 0.95, 19):
        consider(torch.full_like(best_r, float(s)))
    coarse = best_r.clone()
    for s in torch.linspace(-0.05, 0.05, 41):
        consider((coarse + s).clamp(0.01, 1.0))
    return best_r


def clip_range(
    w2: torch.Tensor, kept: torch.Tensor, cfg: QuantConfig, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The range [lo, hi] (each (G,)) the quantizer covers for groups ``w2`` (G, K)."""
    lo, hi = _masked_extremes(w2, kept)
    amax = torch.maximum(-lo, hi)
    mode, c = cfg.clip_mode, cfg.clip
    if mode == "ratio":
        return (-c * amax, c * amax) if cfg.symmetric or bits == 1 else (c * lo, c * hi)
    if mode == "mse":
        if bits == 1:  # mean|w| is already the least-squares alpha for sign(w) * alpha
            return -amax, amax
        r = _mse_ratio(w2, kept, bits, cfg.symmetric)
        return (-r * amax, r * amax) if cfg.symmetric else (r * lo, r * hi)
    if mode == "absolute":
        bound = torch.full_like(amax, c)
    elif mode == "sigma":
        bound = torch.minimum(c * _masked_std(w2, kept), amax)
    else:  # percentile of |w| over the kept weights
        a = torch.where(kept, w2.abs(), torch.tensor(float("nan")))
        bound = torch.nan_to_num(torch.nanquantile(a, c / 100.0, dim=1), nan=0.0)
    if cfg.symmetric or bits == 1:
        return -bound, bound
    return torch.maximum(lo, -bound), torch.minimum(hi, bound)


def _qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> QParams:
    qmin, qmax = code_range(bits, symmetric)
    if symmetric:
        c = torch.maximum(-lo, hi)
        scale = _floor_scale(torch.where(c > 0, c / qmax, torch.ones_like(c)))
        zp = torch.zeros_like(c, dtype=torch.int64)
    else:
        width = hi - lo
        scale = _floor_scale(torch.where(width > 0, width / qmax, torch.ones_like(width)))
        zp = torch.round(-lo / scale).clamp(qmin, qmax).to(torch.int64)
    return QParams(scale.float(), zp, qmin, qmax, lo.float(), hi.float())


def _floor_scale(scale: torch.Tensor) -> torch.Tensor:
    # a range of subnormal width would give scale 0 (or 1/scale = inf) and wrong codes
    return scale.float().clamp(min=torch.finfo(torch.float32).tiny)


def choose_qparams(
    w2: torch.Tensor, kept: torch.Tensor, cfg: QuantConfig, bits: int
) -> QParams:
    """Scale and zero point per group of ``w2`` (G, K) for ``bits``-bit codes."""
    lo, hi = clip_range(w2, kept, cfg, bits)
    if bits == 1:
        clipped = torch.maximum(torch.minimum(w2, hi[:, None]), lo[:, None]).abs()
        n = kept.sum(dim=1).clamp(min=1)
        alpha = (clipped * kept).sum(dim=1) / n
        zp = torch.zeros_like(alpha, dtype=torch.int64)
        # lo and hi stay the clip range (what the histogram draws); alpha is the level
        return QParams(alpha.float(), zp, 0, 1, lo.float(), hi.float(), binary=True)
    return _qparams_from_range(lo, hi, bits, cfg.symmetric)


def quantize_codes(
    w2: torch.Tensor, qp: QParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Integer codes (int64, same shape as ``w2``) for groups ``w2`` (G, K).

    Rounds half to even, like ``torch.fake_quantize_per_channel_affine``; with a
    ``generator`` it rounds stochastically: floor(x + u), u ~ U[0, 1).
    """
    if qp.binary:
        return (w2 >= 0).to(torch.int64)
    inv_scale = 1.0 / qp.scale[:, None]
    x = w2 * inv_scale
    if generator is None:
        x = torch.round(x)
    else:
        x = torch.floor(x + torch.rand(x.shape, generator=generator, dtype=x.dtype))
    # clamp before the cast: far outside the clip range w / scale overflows int64
    x = x.clamp(-(2.0**31), 2.0**31)
    return (x.to(torch.int64) + qp.zero_point[:, None]).clamp(qp.qmin, qp.qmax)


def dequantize_codes(codes: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Weights from codes: (code - zero_point) * scale, or (2 * code - 1) * alpha for 1 bit."""
    if qp.binary:
        return (2 * codes - 1).float() * qp.scale[:, None]
    return (codes - qp.zero_point[:, None]).float() * qp.scale[:, None]


def quantize_with_params(
    w: torch.Tensor,
    cfg: QuantConfig,
    *,
    bits: int | None = None,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> QuantResult:
    """Quantize ``w`` and return values, codes and parameters. Never changes ``w``.

    ``mask`` (bool, same shape) marks the weights pruning kept: ranges are computed over
    them and pruned weights stay exactly zero.
    """
    if not torch.is_floating_point(w):
        raise ValueError("Only floating-point weights can be quantized.")
    if not torch.isfinite(w).all():
        raise ValueError("The weights contain NaN or infinite values; they cannot be quantized.")
    return quantize_checked(w, cfg, bits=bits, mask=mask, generator=generator)


def quantize_checked(
    w: torch.Tensor,
    cfg: QuantConfig,
    *,
    bits: int | None = None,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> QuantResult:
    """:func:`quantize_with_params` for weights already known to be finite floats.

    ``compress`` checks each layer once, naming it, and calls this on the slider path.
    """
    bits = cfg.bits if bits is None else bits
    w = w.detach().float()
    per_channel = cfg.per_channel and w.dim() >= 2
    w2 = _groups(w, per_channel)
    if mask is None:
        kept = torch.ones_like(w2, dtype=torch.bool)
    else:
        kept = _groups(mask.bool(), per_channel)
    qp = choose_qparams(w2, kept, cfg, bits)
    if cfg.rounding == "stochastic" and generator is None:
        generator = torch.Generator().manual_seed(cfg.seed)
    gen = generator if cfg.rounding == "stochastic" else None
    codes = quantize_codes(w2, qp, gen)
    values = dequantize_codes(codes, qp)
    if mask is not None:
        values = values * kept
    return QuantResult(
        values.reshape(w.shape), codes.reshape(w.shape), qp, bits, per_channel, cfg.symmetric
    )


def quantize_tensor(
    w: torch.Tensor, cfg: QuantConfig, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Dequantized values of ``w`` under ``cfg`` (same shape and dtype float32)."""
    return quantize_with_params(w, cfg, mask=mask).values
