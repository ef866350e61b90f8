"""Straight-through fake quantization and gradient quantization, for training.

The forward pass rounds exactly as :mod:`qcore.affine` does (so a training step sees the
values ``compress`` would produce); the backward pass is the straight-through estimator
(Bengio et al., 2013), as ``torch.fake_quantize_per_tensor_affine`` defines it:

    forward:  x_q = (clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale
    backward: dL/dx = dL/dx_q  where qmin <= round(x / scale) + zero_point <= qmax,  else 0

At 1 bit (``sign(x) * alpha``) the gradient passes where x lies in the clip range [lo, hi].

Gradient quantization (low-precision training): a gradient g becomes b-bit codes times
one per-tensor scale s = max|g| / (2^(b-1) - 1), rounded stochastically,
q = floor(g / s + u) * s with u ~ U[0, 1), so that E[q] = g (unbiased).

LSQ (Esser et al., 2020): with a learned step s the codes are
round(clamp(x / s + zero_point, qmin, qmax)); the step's gradient is scaled by
1 / sqrt(K * qmax) for K values per step.

>>> import torch
>>> from qcore.affine import qparams_from_range
>>> qp = qparams_from_range(torch.tensor([-1.0]), torch.tensor([1.0]), 2, True)  # step 1
>>> x = torch.tensor([[-2.0, -0.4, 0.7, 1.4, 1.6]], requires_grad=True)
>>> y = fake_quantize_ste(x, qp)
>>> y.tolist()
[[-1.0, 0.0, 1.0, 1.0, 1.0]]
>>> y.sum().backward(); x.grad.tolist()    # round(1.6) = 2 lies outside [-1, 1]
[[0.0, 1.0, 1.0, 1.0, 0.0]]
"""

from __future__ import annotations

import math

import torch

from qcore.affine import QParams, fake_quantize

__all__ = [
    "straight_through",
    "inside_clip",
    "fake_quantize_ste",
    "quantize_gradient",
    "lsq_quantize",
]


def straight_through(x: torch.Tensor, values: torch.Tensor, passes: torch.Tensor) -> torch.Tensor:
    """``values`` in the forward pass; in the backward pass the gradient of ``x`` where
    ``passes`` (bool, x's shape) is True and zero elsewhere.

    The forward value is ``values`` exactly: ``x - x.detach()`` is an exact zero.
    """
    return values.detach() + (x - x.detach()) * passes


def inside_clip(x2: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Bool (G, K): where the straight-through gradient of groups ``x2`` passes.

    The rounded code (to nearest, as :func:`qcore.affine.quantize_codes` computes it) lies
    in [qmin, qmax]; at 1 bit, x lies in [lo, hi]. With stochastic rounding the test is the
    same nearest-rounding one (the clip edge moves by at most half a step).
    """
    x2 = x2.detach()
    if qp.binary:
        return (x2 >= qp.lo[:, None]) & (x2 <= qp.hi[:, None])
    code = torch.round(x2 * (1.0 / qp.scale[:, None])) + qp.zero_point[:, None]
    return (code >= qp.qmin) & (code <= qp.qmax)


def fake_quantize_ste(x2: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Groups ``x2`` (G, K) fake-quantized with ``qp``, straight-through gradient."""
    return straight_through(x2, fake_quantize(x2.detach(), qp), inside_clip(x2, qp))


def quantize_gradient(
    g: torch.Tensor, bits: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, float]:
    """``g`` on a ``bits``-bit symmetric per-tensor grid, rounded stochastically.

    Returns (quantized gradient, scale): every entry is an integer in
    [-(2^(b-1)-1), 2^(b-1)-1] times ``scale = max|g| / (2^(b-1)-1)``, and its expectation
    over the rounding is ``g``. A zero gradient stays zero (scale 0).

    >>> q, s = quantize_gradient(torch.tensor([0.3, -0.6, 0.0]), 2)   # levels -0.6, 0, 0.6
    >>> s, sorted(set((q / s).tolist())) <= [-1.0, 0.0, 1.0]
    (0.6000000238418579, True)
    """
    if not 2 <= bits <= 16:
        raise ValueError(f"Gradient bits must be from 2 to 16; got {bits}.")
    g = g.detach()
    qmax = 2 ** (bits - 1) - 1
    amax = float(g.abs().max()) if g.numel() else 0.0
    if amax == 0.0 or not math.isfinite(amax):
        return g.clone(), 0.0
    scale = torch.tensor(amax / qmax, dtype=g.dtype)
    u = torch.rand(g.shape, generator=generator, dtype=g.dtype)
    codes = torch.floor(g / scale + u).clamp(-qmax, qmax)  # |g / scale| <= qmax, to rounding
    return codes * scale, float(scale)


class _RoundSTE(torch.autograd.Function):
    """round(x) forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad


def _grad_scaled(s: torch.Tensor, factor: float) -> torch.Tensor:
    """``s`` in the forward pass, its gradient times ``factor`` in the backward pass."""
    return (s - s * factor).detach() + s * factor


def lsq_quantize(
    x2: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """LSQ fake quantization of groups ``x2`` (G, K) with learned steps ``step`` (G,).

    Forward: (round(clamp(x / s + zp, qmin, qmax)) - zp) * s. The gradient reaches x
    inside the range and s everywhere, scaled by 1 / sqrt(K * qmax).
    """
    factor = 1.0 / math.sqrt(x2.shape[1] * max(qmax, 1))
    s = _grad_scaled(step, factor)[:, None]
    zp = zero_point.to(x2.dtype)[:, None]
    v = torch.clamp(x2 / s + zp, qmin, qmax)
    return (_RoundSTE.apply(v) - zp) * s
