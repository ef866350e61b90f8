"""Weight quantization: group the weights, observe them once, choose a range, round.

The maths lives in :mod:`qcore.affine`, statistics in :mod:`qcore.observers` and range
policies in :mod:`qcore.ranges`; weights use those pieces with a single batch, through a
:class:`~qcore.observers.TensorObserver` so every policy sees the exact values.
Weights are viewed as (G, K): one group per output channel (dim 0) for per-channel
scales, a single group for per-tensor. Ranges and scales are computed over the weights a
pruning mask keeps, so levels are spent on the weights that survive. For ``bits == 1`` a
weight becomes sign(w) * alpha with alpha = mean|w| (clipped) over the tensor or channel.

>>> import torch
>>> w = torch.tensor([-1.0, -0.2, 0.0, 0.26, 1.0])
>>> quantize_tensor(w, QuantConfig(bits=2)).tolist()
[-1.0, 0.0, 0.0, 0.0, 1.0]
>>> quantize_tensor(w, QuantConfig(bits=3)).tolist()
[-1.0, -0.3333333432674408, 0.0, 0.3333333432674408, 1.0]
>>> quantize_with_params(w, QuantConfig(bits=3)).codes.tolist()
[-3, -1, 0, 1, 3]
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from qcore.affine import (
    QParams,
    code_range,
    dequantize_codes,
    pow2_scale,
    qparams_from_range,
    quantize_codes,
)
from qcore.config import QuantConfig
from qcore.observers import TensorObserver
from qcore.ranges import choose_range

__all__ = [
    "QParams",
    "QuantResult",
    "clip_range",
    "choose_qparams",
    "quantize_codes",
    "dequantize_codes",
    "quantize_with_params",
    "quantize_prechecked",
    "quantize_tensor",
    "code_range",
]


class QuantResult(NamedTuple):
    """Everything one quantized tensor needs: its values and how to store them."""

    values: torch.Tensor  # dequantized weights, same shape as the input
    codes: torch.Tensor  # integer codes, same shape, dtype affine.code_dtype(qmin, qmax)
    qparams: QParams
    bits: int
    per_channel: bool
    symmetric: bool


def _groups(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """View ``w`` as (G, K): one row per output channel, or a single row."""
    if per_channel and w.dim() >= 1:
        return w.reshape(w.shape[0], -1)
    return w.reshape(1, -1)


def clip_range(
    w2: torch.Tensor, kept: torch.Tensor, cfg: QuantConfig, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The range [lo, hi] (each (G,)) the quantizer covers for groups ``w2`` (G, K)."""
    obs = TensorObserver()
    obs.update(w2, kept)
    return choose_range(obs, cfg.clip_mode, cfg.clip, bits, cfg.symmetric)


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
        if cfg.scale == "pow2":  # the level itself is the step: the nearest power of two
            alpha = pow2_scale(alpha.float(), nearest=True)
        # lo and hi stay the clip range (what the histogram draws); alpha is the level
        return QParams(alpha.float(), zp, 0, 1, lo.float(), hi.float(), binary=True)
    return qparams_from_range(lo, hi, bits, cfg.symmetric, pow2=cfg.scale == "pow2")


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
    return quantize_prechecked(w, cfg, bits=bits, mask=mask, generator=generator)


def quantize_prechecked(
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
