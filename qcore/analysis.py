"""Binned weight histograms for plotting: counts, never raw weights."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qcore.compress import Compressed, LayerResult
from qcore.data import Dataset
from qcore.quant import code_range, dequantize_codes

__all__ = ["Histogram", "weight_histogram", "layer_histogram", "activation_histogram",
           "MAX_LEVELS_DRAWN", "ACT_HISTOGRAM_IMAGES"]

MAX_LEVELS_DRAWN = 256  # more levels than this are not listed (they would fill the plot)


@dataclass(frozen=True, eq=False)
class Histogram:
    """Counts of float and compressed weights on shared bins."""

    edges: np.ndarray  # float64 [bins + 1]
    before: np.ndarray  # int64 [bins]
    after: np.ndarray  # int64 [bins]
    levels: np.ndarray | None  # the values the quantizer can output, if few enough
    clip: tuple[float, float] | None  # the range the grid really covers: its end levels
    zeros_after: int  # weights exactly zero after compression
    requested: tuple[float, float] | None = None  # the clip range asked for (before rounding
    # the zero point; at 1 bit the range weights are clipped to before alpha is taken)
    # a k-means layer: how many of the levels are its codebook's shared values (the rest is
    # 0, where pruning removed weights); None on a uniform grid
    shared: int | None = None

    @property
    def centers(self) -> np.ndarray:
        return (self.edges[:-1] + self.edges[1:]) / 2


def weight_histogram(
    before: torch.Tensor,
    after: torch.Tensor,
    bins: int = 80,
    *,
    levels: torch.Tensor | None = None,
    clip: tuple[float, float] | None = None,
    requested: tuple[float, float] | None = None,
    shared: int | None = None,
) -> Histogram:
    """Histogram of ``before`` and ``after`` on the same ``bins`` bins over both ranges."""
    if bins < 1:
        raise ValueError(f"bins must be at least 1; got {bins}.")
    b = before.detach().float().reshape(-1)
    a = after.detach().float().reshape(-1)
    both = torch.cat([b, a])
    lo, hi = (float(both.min()), float(both.max())) if both.numel() else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    cb = torch.histogram(b.double(), bins=edges).hist
    ca = torch.histogram(a.double(), bins=edges).hist
    lv = None
    if levels is not None and levels.numel() <= MAX_LEVELS_DRAWN:
        lv = levels.detach().double().numpy()
    return Histogram(
        edges=edges.numpy(),
        before=cb.numpy().astype(np.int64),
        after=ca.numpy().astype(np.int64),
        levels=lv,
        clip=clip,
        zeros_after=int((a == 0).sum()),
        requested=requested,
        shared=shared,
    )


def shared_levels(res: LayerResult, channel: int | None = None) -> tuple[torch.Tensor, int]:
    """Every value a k-means layer's weights can take, sorted: its codebook's shared values,
    and 0 when pruning removed a weight (a pruned weight is zero by its mask, not a code);
    and how many of them are shared values. With ``channel``, only the values that channel's
    weights take."""
    assert res.codebook is not None
    values = res.codebook.detach().float()
    mask = res.mask
    if channel is not None:
        codes = res.codes[channel] if mask is None else res.codes[channel][mask[channel]]
        values = values[torch.unique(codes.long())]
        mask = None if mask is None else mask[channel]
    n = int(torch.unique(values).numel())
    if mask is not None and not bool(mask.all()):
        values = torch.cat([values, torch.zeros(1)])
    return torch.unique(values), n  # sorted, and each value once


def quant_levels(res: LayerResult, channel: int = 0) -> torch.Tensor:
    """Every value one group (channel) of a quantized tensor can take, sorted.

    At 1 bit that is -alpha and +alpha, and 0 as well when pruning removed a weight of the
    group (there is no zero code: a pruned weight is zero by its mask), so it is ternary.
    """
    qmin, qmax = code_range(res.bits, res.symmetric)
    if qmax - qmin + 1 > MAX_LEVELS_DRAWN:
        return torch.empty(MAX_LEVELS_DRAWN + 1)
    g = channel if res.per_channel else 0
    qp = res.qparams._replace(
        scale=res.qparams.scale[g : g + 1], zero_point=res.qparams.zero_point[g : g + 1]
    )
    codes = torch.arange(qmin, qmax + 1).reshape(1, -1)
    levels = dequantize_codes(codes, qp).reshape(-1)
    if res.qparams.binary and res.mask is not None:
        group_mask = res.mask[g] if res.per_channel else res.mask
        if not bool(group_mask.all()):
            levels = torch.cat([levels[:1], torch.zeros(1), levels[1:]])
    return levels


def layer_histogram(
    compressed: Compressed, layer: str, bins: int = 80, channel: int | None = None
) -> Histogram:
    """Histogram of one layer of a :class:`~qcore.compress.Compressed` model.

    ``clip`` is the grid's effective range (:attr:`LayerResult.grid_range`), so every
    level lies within it; ``requested`` is the clip range asked for. With per-channel
    scales, levels and bounds are drawn only for a chosen ``channel``.
    """
    res = compressed.layer(layer)  # a clear ValueError for an unknown layer name
    before, after = res.float_weight, res.dequantized
    if channel is not None:
        if not 0 <= channel < before.shape[0]:
            raise ValueError(f"Channel must be in 0..{before.shape[0] - 1}; got {channel}.")
        before, after = before[channel], after[channel]
    levels = clip = requested = None
    mask = res.mask
    if res.codebook is not None:  # k-means: the shared values; no grid, so no clip range
        levels, n = shared_levels(res, channel)
        return weight_histogram(before, after, bins, levels=levels, shared=n)
    if res.qparams is not None and (not res.per_channel or channel is not None):
        g = channel if (res.per_channel and channel is not None) else 0
        group_mask = mask if mask is None or not res.per_channel else mask[g]
        if group_mask is None or bool(group_mask.any()):  # a group pruned away has no grid
            levels = quant_levels(res, g)
            grid_lo, grid_hi = res.grid_range
            clip = (float(grid_lo[g]), float(grid_hi[g]))
            requested = (float(res.qparams.lo[g]), float(res.qparams.hi[g]))
    return weight_histogram(before, after, bins, levels=levels, clip=clip, requested=requested)


ACT_HISTOGRAM_IMAGES = 256  # calibration images whose activations an activation histogram bins


def activation_histogram(
    compressed: Compressed, edge: str, calib: Dataset, bins: int = 80
) -> Histogram:
    """Histogram of the values reaching activation ``edge`` and what its quantizer makes
    of them, over the first :data:`ACT_HISTOGRAM_IMAGES` images of the calibration split.

    ``edge`` is a key of ``compressed.activations`` (``"<layer>.input"``, ``"input"`` or
    an addition). The values are those of the compressed model itself (weights and the
    activations upstream quantized); ``clip`` is the grid's range, ``requested`` the
    calibrated range, ``levels`` every value the codes can take (if few enough).
    """
    if edge not in compressed.activations:
        known = ", ".join(compressed.activations) or "none (activations are not quantized)"
        raise ValueError(f"No quantized activation edge {edge!r}; the edges are {known}.")
    act = compressed.activations[edge]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    points = dict(compressed.model.points)

    def record(t: torch.Tensor) -> torch.Tensor:
        out = act.fake_quantize(t)
        seen.append((t.detach().reshape(-1), out.detach().reshape(-1)))
        return out

    points[edge] = record
    x = calib.inputs(slice(0, ACT_HISTOGRAM_IMAGES))
    with torch.inference_mode():
        compressed.graph.run(x, compressed.replacements(), points)
    before = torch.cat([b for b, _ in seen])
    after = torch.cat([a for _, a in seen])
    qp = act.qparams
    levels = None
    if qp.qmax - qp.qmin + 1 <= MAX_LEVELS_DRAWN:
        codes = torch.arange(qp.qmin, qp.qmax + 1).reshape(1, -1)
        levels = dequantize_codes(codes, qp).reshape(-1)
    return weight_histogram(before, after, bins, levels=levels, clip=act.grid_range,
                            requested=(act.lo, act.hi))  # fmt: skip
