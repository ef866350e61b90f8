"""Packed-size arithmetic: the exact bytes the export writes for each tensor.

A compressed weight tensor with n weights, k of them kept by pruning, b-bit codes and
G scale groups takes

    ceil(code_bits / 8) + ceil(index_bits / 8) + 4 * G  (+ 4 * G zero points if asymmetric)

where code_bits = b * n when nothing is pruned, otherwise b * k plus the cheaper sparse
index: a mask of n bits, or a relative-index stream. The relative index stores, before
each kept weight, the number of zeros skipped in r bits; a skip of 2^r - 1 or more is
split with escape entries (value 2^r - 1, "skip that many and read on"). r runs over
1..16 and the cheapest is kept. Unquantized tensors (biases, BatchNorm, float layers)
take 4 bytes per value; ``num_batches_tracked`` counters are not stored.

>>> packed_weight_size(100, 4, groups=1, symmetric=True).total
54
>>> mask = torch.zeros(1000, dtype=torch.bool); mask[::100] = True   # 10 kept, gaps of 99
>>> s = packed_weight_size(1000, 8, groups=1, symmetric=True, mask=mask)
>>> s.encoding, s.index_width, s.code_bytes, s.index_bytes
('relidx', 7, 10, 9)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TensorSize", "relative_index", "packed_weight_size", "FLOAT_BYTES", "float_bytes"]

FLOAT_BYTES = 4
MAX_INDEX_WIDTH = 16


def float_bytes(numel: int) -> int:
    """Bytes of ``numel`` float32 values."""
    return FLOAT_BYTES * int(numel)


def _ceil_bytes(bits: int) -> int:
    return (int(bits) + 7) // 8


@dataclass(frozen=True)
class TensorSize:
    """The packed form of one weight tensor and its bytes."""

    numel: int
    kept: int
    bits: int  # bits per stored value (32 for float values)
    encoding: str  # "dense", "mask" or "relidx"
    index_width: int  # r for "relidx", 0 otherwise
    code_bytes: int
    index_bytes: int
    param_bytes: int  # scales (and zero points)

    @property
    def total(self) -> int:
        return self.code_bytes + self.index_bytes + self.param_bytes


def _gaps(mask_flat: torch.Tensor) -> torch.Tensor:
    """Zeros skipped before each kept position (int64, one per kept weight)."""
    pos = torch.nonzero(mask_flat, as_tuple=False).reshape(-1)
    prev = torch.cat([torch.tensor([-1]), pos[:-1]])
    return pos - prev - 1


def relative_index(mask_flat: torch.Tensor) -> tuple[int, int]:
    """The cheapest relative-index width r and the stream's length in bits."""
    gaps = _gaps(mask_flat)
    if gaps.numel() == 0:
        return 1, 0
    widths = torch.arange(1, MAX_INDEX_WIDTH + 1)
    escape = (2**widths - 1)[:, None]  # (R, 1)
    entries = gaps.numel() + (gaps[None, :] // escape).sum(dim=1)  # (R,)
    bits = entries * widths
    best = int(torch.argmin(bits))  # first minimum: the narrowest of equals
    return int(widths[best]), int(bits[best])


def relative_index_stream(mask_flat: torch.Tensor, width: int) -> torch.Tensor:
    """The relative-index entries (int64) for ``mask_flat`` at width ``width``."""
    gaps = _gaps(mask_flat)
    escape = 2**width - 1
    fills = gaps // escape
    counts = fills + 1
    stream = torch.full((int(counts.sum()),), escape, dtype=torch.int64)
    stream[torch.cumsum(counts, 0) - 1] = gaps - fills * escape
    return stream


def positions_from_stream(stream: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of :func:`relative_index_stream`: the kept positions."""
    escape = 2**width - 1
    terminal = stream != escape
    advance = torch.cumsum(stream + terminal.to(torch.int64), 0)
    return advance[terminal] - 1


def packed_weight_size(
    numel: int,
    bits: int,
    *,
    groups: int,
    symmetric: bool,
    mask: torch.Tensor | None = None,
    quantized: bool = True,
) -> TensorSize:
    """Bytes of one weight tensor in packed form (see the module docstring).

    ``quantized=False`` stores kept values as float32 with no scales (``bits`` is ignored).
    """
    value_bits = bits if quantized else 32
    params = 0
    if quantized:
        params = FLOAT_BYTES * groups
        if not symmetric and bits > 1:
            params += FLOAT_BYTES * groups  # int32 zero points
    if mask is None or bool(mask.all()):
        return TensorSize(numel, numel, value_bits, "dense", 0, _ceil_bytes(value_bits * numel),
                          0, params)
    flat = mask.reshape(-1)
    kept = int(flat.sum())
    code = _ceil_bytes(value_bits * kept)
    width, rel_bits = relative_index(flat)
    if _ceil_bytes(rel_bits) < _ceil_bytes(numel):
        return TensorSize(numel, kept, value_bits, "relidx", width, code, _ceil_bytes(rel_bits),
                          params)
    return TensorSize(numel, kept, value_bits, "mask", 0, code, _ceil_bytes(numel), params)
