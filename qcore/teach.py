"""Teaching views of a compressed layer: one weight's journey, the clipping trade-off, hints.

Pure functions over a :class:`~qcore.compress.Compressed` result (no UI library). Every
number is read from, or recomputed exactly as, the pipeline that made the layer:

    code = clamp(round(w / scale) + zero_point, qmin, qmax)    (bits >= 2)
    w_q  = (code - zero_point) * scale

stored as the ``bits``-digit binary number ``code - qmin``. At 1 bit the code is 1 for
w >= 0 and 0 otherwise, and w_q = (2 * code - 1) * alpha. A pruned weight is 0 whatever
its code says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pandas as pd
import torch

from qcore.affine import fake_quantize
from qcore.compress import Compressed, LayerResult, sqnr_db
from qcore.config import QuantConfig
from qcore.quant import choose_qparams, quantize_prechecked

__all__ = [
    "Journey", "weight_journey", "random_weight_index", "ErrorCurve", "clip_error_curve",
    "trap_hint", "empty_levels", "clip_note", "fixed_point", "ErrorHistogram",
    "error_histogram", "sqnr_by_bits", "DB_PER_BIT",
]  # fmt: skip


@dataclass(frozen=True)
class Journey:
    """One weight through prune -> clip -> scale -> round -> store -> dequantize."""

    layer: str
    index: int  # flat index into the weight tensor
    position: tuple[int, ...]  # the same index per dimension, e.g. (out, in, kh, kw)
    weight: float  # the float weight (after BatchNorm folding)
    pruned: bool  # removed by the pruning mask: dequantizes to 0
    bits: int
    clip_lo: float  # the clip range asked for, of the weight's group (tensor or channel)
    clip_hi: float
    grid_lo: float  # the range the grid really covers: its lowest and highest level
    grid_hi: float
    scale: float  # the step between levels; alpha at 1 bit
    zero_point: int  # 0 when symmetric and at 1 bit
    scaled: float  # weight / scale + zero_point before rounding and clamping; nan at 1 bit
    code: int  # the integer code stored, in [qmin, qmax]
    code_binary: str  # code - qmin as exactly ``bits`` binary digits, the stored bits
    dequantized: float  # the value the compressed model runs with
    error: float  # dequantized - weight
    # fixed point (power-of-two scales): scale = 2^-exponent, else None
    exponent: int | None = None
    # stochastic rounding: the uniform draw u in [0, 1) the stored code came from,
    # floor(w / scale + u) + zero_point; None when rounding to nearest
    draw: float | None = None

    @property
    def neighbours(self) -> tuple[int, int]:
        """The two codes on either side of ``scaled``: floor and floor + 1."""
        lo = math.floor(self.scaled)
        return lo, lo + 1

    @property
    def p_up(self) -> float:
        """Stochastic rounding's chance of the upper neighbour: the fraction of ``scaled``."""
        return self.scaled - math.floor(self.scaled)


def _layer(compressed: Compressed, layer: str) -> LayerResult:
    res = compressed.layer(layer)  # a ValueError naming the layers for an unknown name
    if res.qparams is None:
        raise ValueError(
            f"Layer {layer!r} is left in float (32-bit), so no quantizer touches its weights; "
            "choose a bit width for it to follow a weight through quantization."
        )
    return res


def weight_journey(compressed: Compressed, layer: str, index: int | None = None) -> Journey:
    """The journey of weight ``index`` (flat; default: the largest |w|, first on ties).

    ``code`` is the code actually stored (so with stochastic rounding it may differ from
    rounding ``scaled`` to nearest), and ``dequantized`` equals the compressed weight.
    ``scaled`` is w / scale + zero_point; the code rounds w / scale (half to even) before
    adding the integer zero point, which only differs from rounding ``scaled`` on exact
    halves. At 1 bit there is no scaling step (the code is the sign rule), so ``scaled``
    is nan.
    """
    res = _layer(compressed, layer)
    w = res.float_weight.detach().reshape(-1)
    n = w.numel()
    if index is None:
        index = int(torch.argmax(w.abs()))  # the first of equal maxima
    elif isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
        raise ValueError(f"The weight index must be a whole number in 0..{n - 1}; got {index!r}.")
    position, rest = [], index
    for size in reversed(res.shape):
        position.append(rest % size)
        rest //= size
    position = tuple(reversed(position))
    qp = res.qparams
    g = position[0] if res.per_channel else 0
    scale, zero_point = qp.scale[g], int(qp.zero_point[g])
    grid_lo, grid_hi = res.grid_range
    code = int(res.codes.reshape(-1)[index])
    wi = w[index]
    if qp.binary:
        scaled = math.nan
    else:
        # the quantizer's own float32 product (w * (1 / scale)), then the zero point
        scaled = float(wi * (1.0 / scale)) + zero_point
    dequantized = float(res.dequantized.reshape(-1)[index]) + 0.0  # -0.0 (1 bit, pruned) -> 0
    weight = float(wi)
    q = compressed.config.quant
    exponent = draw = None
    if q is not None and q.scale == "pow2" and not qp.binary:
        exponent = -round(math.log2(float(scale)))  # the scale is exactly 2^-exponent
    if q is not None and q.rounding == "stochastic" and not qp.binary:
        draw = _stochastic_draw(compressed, res, index)
    return Journey(
        layer=layer,
        index=index,
        position=position,
        weight=weight,
        pruned=res.mask is not None and not bool(res.mask.reshape(-1)[index]),
        bits=res.bits,
        clip_lo=float(qp.lo[g]),
        clip_hi=float(qp.hi[g]),
        grid_lo=float(grid_lo[g]),
        grid_hi=float(grid_hi[g]),
        scale=float(scale),
        zero_point=zero_point,
        scaled=scaled,
        code=code,
        code_binary=format(code - qp.qmin, f"0{res.bits}b"),
        dequantized=dequantized,
        error=dequantized - weight,
        exponent=exponent,
        draw=draw,
    )


def _stochastic_draw(compressed: Compressed, res: LayerResult, index: int) -> float | None:
    """The uniform draw u behind a stochastically rounded code, regenerated as compress drew
    it (one generator per layer, seeded seed * 1_000_003 + the layer's position); None if
    regenerating it does not give the stored code back."""
    q = compressed.config.quant
    pos = [r.name for r in compressed.layers].index(res.name)
    g = res.qparams.scale.numel()
    gen = torch.Generator().manual_seed(q.seed * 1_000_003 + pos)
    u = torch.rand((g, res.float_weight.numel() // g), generator=gen).reshape(-1)[index]
    w2 = res.float_weight.detach().float().reshape(g, -1)
    x = w2 * (1.0 / res.qparams.scale[:, None])
    k = index % w2.shape[1]
    grp = index // w2.shape[1]
    code = torch.floor(x[grp, k] + u) + res.qparams.zero_point[grp]
    code = code.clamp(res.qparams.qmin, res.qparams.qmax)
    if int(code) != int(res.codes.reshape(-1)[index]):
        return None
    return float(u)


def fixed_point(value: int, bits: int, fraction_bits: int) -> tuple[int, int, str]:
    """A signed integer ``value`` (two's complement in ``bits`` bits) read as a fixed-point
    number with ``fraction_bits`` bits after the binary point: (m, n, text) in Q m.n
    notation (m integer bits besides the sign, n fraction bits; m < 0 when the point lies
    left of the stored bits), the bits written with their point.

    >>> fixed_point(5, 4, 3)          # 0.101 = 5/8
    (0, 3, '0.101')
    >>> fixed_point(-3, 4, 1)         # 110.1 = -1.5
    (2, 1, '110.1')
    >>> fixed_point(3, 4, 6)          # 0.000011 = 3/64: the point two places left
    (-3, 6, '0.000011')
    """
    raw = format(value & ((1 << bits) - 1), f"0{bits}b")  # two's complement
    n = fraction_bits
    m = bits - 1 - n
    if n <= 0:
        return m, n, raw + "0" * (-n) + "."
    if n >= bits:  # sign-extend up to the point
        digits = raw[0] * (n - bits + 1) + raw
    else:
        digits = raw
    return m, n, digits[:-n] + "." + digits[-n:]


def random_weight_index(compressed: Compressed, layer: str, seed: int) -> int:
    """A flat weight index of ``layer`` drawn uniformly, the same for the same ``seed``."""
    n = compressed.layer(layer).float_weight.numel()
    g = torch.Generator().manual_seed(int(seed))
    return int(torch.randint(n, (1,), generator=g))


@dataclass(frozen=True, eq=False)
class ErrorCurve:
    """The squared weight error of one layer against its clip magnitude c (range [-c, c]).

    For each c the layer's kept weights (pruned ones left out) are quantized at its bit
    width and scheme over the range [-c, c] (asymmetric: the observed range cut to it, as
    the ``absolute`` clip mode does), per tensor and rounding to nearest, and

        clip_error     = sum over |w| >  c of (w - q(w))^2   (clamped to the range's ends)
        rounding_error = sum over |w| <= c of (w - q(w))^2
        total          = clip_error + rounding_error
    """

    layer: str
    bits: int
    symmetric: bool
    per_channel: bool  # the layer has a scale per channel; this curve uses one per tensor
    note: str  # what the curve leaves out for this layer ("" when nothing)
    max_abs: float  # max |w| over the kept weights
    table: pd.DataFrame  # columns c, clip_error, rounding_error, total; c ascending
    current: tuple[float, float]  # (the layer's clip magnitude, the curve's total there)
    optimum: tuple[float, float]  # (the c of least total on the curve, that total)
    # (levels holding no kept weight, levels) of the layer's grid at ``current`` (its
    # widest channel with per-channel scales)
    empty: tuple[int, int] = (0, 0)


class _Errors:
    """(clip_error, rounding_error) of some weights over [-c, c], for many c."""

    def __init__(self, w: torch.Tensor, cfg: QuantConfig, bits: int):
        a, order = w.abs().sort()
        self.abs = a  # (K,) ascending: the weights within [-c, c] come first
        self.w2 = w[order].reshape(1, -1)  # (1, K) in that order
        self.w64 = self.w2.double()
        self.cfg, self.bits = cfg, bits
        # in absolute mode a range of 2+ bits depends on the extremes alone: a (1, 2)
        # stand-in gives the same scale and zero point at a fraction of the cost
        ext = torch.stack([w.min(), w.max()]).reshape(1, 2)
        # alpha needs every weight, summed in their own order as the layer's quantizer does
        self.observed = w.reshape(1, -1) if bits == 1 else ext

    def __call__(self, c: float) -> tuple[float, float]:
        seen = self.observed
        qp = choose_qparams(seen, torch.ones_like(seen, dtype=torch.bool),
                            replace(self.cfg, clip=c), self.bits)
        e = ((self.w64 - fake_quantize(self.w2, qp).double()) ** 2)[0]
        inside = int(torch.searchsorted(self.abs, torch.tensor([c]), right=True))  # |w| <= c
        return float(e[inside:].sum()), float(e[:inside].sum())


EXTRA_POINTS = 12  # points added past 1.25 * max|w| when the layer's clip lies beyond


def clip_error_curve(compressed: Compressed, layer: str, points: int = 60) -> ErrorCurve:
    """The clip / rounding error trade-off of ``layer`` at ``points`` clip magnitudes.

    c runs over i * max|w| / round(0.8 * points) for i = 1..points: from a small fraction
    of max|w| through max|w| exactly (where clip_error is 0) to about 1.25 * max|w|, so
    the widening of the steps past max|w| shows; when the layer's own clip magnitude lies
    beyond, :data:`EXTRA_POINTS` more run evenly on to 1.05 times it, so the curve covers
    it. ``current`` is the curve at the layer's clip magnitude max(-lo, hi) (the widest
    channel's with per-channel scales).
    """
    res = _layer(compressed, layer)
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be a whole number of at least 2; got {points!r}.")
    q = compressed.config.quant
    w = res.float_weight.detach().float().reshape(-1)
    if res.mask is not None:
        w = w[res.mask.reshape(-1)]
    amax = float(w.abs().max()) if w.numel() else 0.0
    if amax == 0.0:
        raise ValueError(
            f"Layer {layer!r} has no nonzero weight left after pruning; there is no range "
            "to choose."
        )
    cfg = QuantConfig(bits=res.bits, symmetric=res.symmetric, clip_mode="absolute",
                      scale=q.scale if q is not None else "float")  # fmt: skip
    errors = _Errors(w, cfg, res.bits)
    k = max(1, round(0.8 * points))
    cs = [float(torch.tensor(amax * (i / k), dtype=torch.float32)) for i in range(1, points + 1)]
    c_now = float(torch.maximum(-res.qparams.lo, res.qparams.hi).max())
    if c_now > cs[-1]:  # a clip above the curve's end (absolute mode): reach past it
        step = (1.05 * c_now - cs[-1]) / EXTRA_POINTS
        cs += [float(torch.tensor(cs[-1] + step * i, dtype=torch.float32))
               for i in range(1, EXTRA_POINTS + 1)]  # fmt: skip
    rows = []
    for c in cs:
        clip_error, rounding_error = errors(c)
        rows.append((c, clip_error, rounding_error, clip_error + rounding_error))
    table = pd.DataFrame(rows, columns=["c", "clip_error", "rounding_error", "total"])
    best = int(table["total"].to_numpy().argmin())  # the first of equal minima
    now = sum(errors(c_now)) if c_now > 0 else float((w.double() ** 2).sum())
    notes = []
    if res.per_channel:
        notes.append("The layer has a scale per output channel; this curve uses one scale "
                     "for the whole tensor, so its errors are larger than the layer's.")
    if q is not None and q.rounding == "stochastic":
        notes.append("The layer rounds stochastically; this curve rounds to nearest.")
    return ErrorCurve(
        layer=layer,
        bits=res.bits,
        symmetric=res.symmetric,
        per_channel=res.per_channel,
        note=" ".join(notes),
        max_abs=amax,
        table=table,
        current=(c_now, now),
        optimum=(float(table["c"].iloc[best]), float(table["total"].iloc[best])),
        empty=empty_levels(res, int(torch.argmax(torch.maximum(-res.qparams.lo,
                                                               res.qparams.hi)))),
    )


@dataclass(frozen=True, eq=False)
class ErrorHistogram:
    """w - q(w) of one layer's kept weights: counts on ``edges``, split into the weights
    inside the grid (rounding error, within half a step) and those clipped (outside it)."""

    layer: str
    edges: list[float]  # bins + 1, ascending
    rounding: list[int]  # counts of weights inside the grid's range
    clipping: list[int]  # counts of weights beyond it (clipped to its ends)
    half_step: float  # Δ / 2: where rounding error ends (the largest per-channel step)
    clipped: int  # how many weights were clipped
    kept: int  # how many weights are counted (pruned ones left out)


def error_histogram(compressed: Compressed, layer: str, bins: int = 60) -> ErrorHistogram:
    """The error w - q(w) of ``layer``'s kept weights on ``bins`` equal bins: rounding error
    of the weights inside the grid spreads over [-Δ/2, Δ/2]; a clipped weight's error is its
    distance beyond the grid's end, in the tails."""
    res = _layer(compressed, layer)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be a whole number of at least 2; got {bins!r}.")
    g = res.qparams.scale.numel()
    w = res.float_weight.detach().float().reshape(g, -1)
    err = (w - res.dequantized.reshape(g, -1)).double()
    lo, hi = res.grid_range
    outside = (w < lo[:, None]) | (w > hi[:, None])
    keep = torch.ones_like(w, dtype=torch.bool) if res.mask is None else res.mask.reshape(g, -1)
    err, outside = err[keep], outside[keep]
    if res.qparams.binary:  # +-alpha: no grid to fall outside of
        outside = torch.zeros_like(outside)
    half = float(res.qparams.scale.max()) / (1 if res.qparams.binary else 2)
    top = max(float(err.abs().max()) if err.numel() else 0.0, half) * 1.02
    edges = torch.linspace(-top, top, bins + 1, dtype=torch.float64)
    inside_counts = torch.histc(err[~outside], bins, -top, top) if err.numel() else None
    out_counts = torch.histc(err[outside], bins, -top, top) if err.numel() else None
    zero = [0] * bins
    return ErrorHistogram(
        layer=layer, edges=edges.tolist(),
        rounding=zero if inside_counts is None else [int(c) for c in inside_counts],
        clipping=zero if out_counts is None else [int(c) for c in out_counts],
        half_step=half, clipped=int(outside.sum()), kept=int(err.numel()),
    )  # fmt: skip


DB_PER_BIT = 20 * math.log10(2)  # 6.02 dB: each bit halves the step, a quarter the noise power


def sqnr_by_bits(compressed: Compressed, layer: str, bits: tuple[int, ...] = tuple(
        range(2, 13))) -> pd.DataFrame:  # fmt: skip
    """``layer``'s SQNR (dB) at each bit width in ``bits``, everything else as the layer was
    compressed (scheme, clip, scale mode, pruning mask; rounding to nearest), beside the
    rule of thumb: a line of slope 6.02 dB per bit through the layer's own bit width (or
    the middle of ``bits``). Columns: bits, sqnr_db, rule_db."""
    res = compressed.layer(layer)
    q = compressed.config.quant
    if q is None or q.codebook != "uniform" or res.qparams is None:
        raise ValueError(
            f"Layer {layer!r} has no uniform grid (left in float or shared by a codebook), so "
            "there is no bit width to vary."
        )
    bits = tuple(sorted({check for check in bits if 2 <= check <= 16}))
    if not bits:
        raise ValueError("Give bit widths from 2 to 16.")
    cfg = replace(q, layer_bits=(), rounding="nearest", seed=0)
    w = res.float_weight.detach()
    rows = []
    for b in bits:
        r = quantize_prechecked(w, cfg, bits=b, mask=res.mask)
        rows.append((b, sqnr_db(w, r.values)))
    df = pd.DataFrame(rows, columns=["bits", "sqnr_db"])
    anchor = res.bits if res.bits in bits else bits[len(bits) // 2]
    at = float(df.loc[df["bits"] == anchor, "sqnr_db"].iloc[0])
    df["rule_db"] = [at + DB_PER_BIT * (b - anchor) for b in df["bits"]]
    df.attrs.update(anchor=anchor)
    return df


def trap_hint(
    bits: int,
    clip_mode: str,
    clip: float,
    accuracy: float,
    one_bit_accuracy: float | None,
    symmetric: bool = True,
) -> str | None:
    """A one-line hint when 2 bits without clipping scores below 1 bit; None otherwise.
    It describes the grid of the setting shown: symmetric 2-bit codes have 3 levels,
    asymmetric ones 4.

    >>> trap_hint(2, "ratio", 1.0, 0.10, 0.62) is not None, trap_hint(2, "mse", 1.0, 0.1, 0.62)
    (True, None)
    """
    if (bits != 2 or clip_mode != "ratio" or clip != 1.0 or one_bit_accuracy is None
            or not accuracy < one_bit_accuracy):
        return None
    levels = ("its 3 levels are -max|w|, 0 and +max|w|" if symmetric else
              "its 4 levels are spread evenly from min(w) to max(w), a third of that range "
              "apart, with 0 one of them")  # fmt: skip
    return (f"2 bits without clipping scores {accuracy:.1%}, below 1 bit's "
            f"{one_bit_accuracy:.1%}: {levels}, so almost every weight rounds to 0. Try the "
            "mse clip mode, which narrows the range.")


def empty_levels(res: LayerResult, group: int = 0) -> tuple[int, int]:
    """(levels no kept weight rounds to, levels) of one scale group of a quantized layer:
    with a clip range wider than the weights, the outer levels hold nothing.

    >>> from qcore.compress import compress
    >>> from qcore.config import CompressionConfig
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 1, bias=False))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.copy_(torch.tensor([[0.25, -0.5]]))
    >>> q = QuantConfig(bits=3, clip_mode="absolute", clip=2.0)
    >>> c = compress(net.eval(), CompressionConfig(quant=q))
    >>> empty_levels(c.layer("0"))   # levels -2 .. 2 in steps of 2/3: 0.25 -> 0, -0.5 -> -2/3
    (5, 7)
    """
    qp = res.qparams
    if qp is None:
        raise ValueError(f"Layer {res.name!r} has no grid: it is left in float or shared.")
    levels = 2 if qp.binary else int(qp.qmax - qp.qmin + 1)
    g = qp.scale.numel()
    codes = res.codes.reshape(g, -1)[group]
    if res.mask is not None:
        codes = codes[res.mask.reshape(g, -1)[group]]
    return levels - int(torch.unique(codes).numel()), levels


def clip_note(compressed: Compressed) -> str:
    """A sentence when the ``absolute`` clip c lies above a quantized layer's max|w| (its
    grid then reaches past every weight and some levels hold no weight); "" otherwise."""
    q = compressed.config.quant
    if q is None or q.clip_mode != "absolute" or q.codebook != "uniform":
        return ""
    over = []
    for res in compressed.layers:
        if res.qparams is None or res.qparams.binary:
            continue
        w = res.float_weight if res.mask is None else res.float_weight[res.mask]
        amax = float(w.abs().max()) if w.numel() else 0.0
        if q.clip > amax:
            g = int(torch.argmax(torch.maximum(-res.qparams.lo, res.qparams.hi)))
            empty, levels = empty_levels(res, g)
            over.append((res.name, amax, empty, levels))
    if not over:
        return ""
    top = max(a for _, a, _, _ in over)
    every = len(over) == sum(1 for r in compressed.layers if r.qparams is not None)
    which = ("every quantized layer's" if every else
             "one layer's" if len(over) == 1 else f"{len(over)} layers'")  # fmt: skip
    parts = "; ".join(f"{n}: {e} of {lv}" for n, _, e, lv in over)
    return (f"c = {q.clip:g} is above the largest |w| of {which} weights ({top:.2f} at most): "
            f"the grid reaches past every weight, so its outer levels hold none. Levels that "
            f"hold no weight: {parts}. A c at or below max|w| puts the levels on the weights.")
