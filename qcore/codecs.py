"""Codecs: the packed form of each tensor, whose size is exactly the bytes it writes.

A block is one run of bytes: unsigned integers of a fixed bit width packed MSB first
(:class:`UIntBlock`: codes, a bit mask, relative-index entries), or little-endian float32
or int32 values. Every block computes ``nbytes()`` from the counts it holds and
``encode()`` writes exactly that many bytes, so the packed size is a sum of block sizes
and never a second formula. An :class:`Encoded` tensor is a short list of blocks plus the
header fields needed to read them back; :func:`decode` is its inverse.

Encodings of a weight tensor (n weights, "stored" = the values actually written):

- ``dense``: every value, pruned weights taking the zero code (needs a zero code, so a
  1-bit tensor is dense only when nothing is pruned).
- ``mask``: the nonzero values, then a 1-bit-per-weight mask.
- ``relidx``: the nonzero values, then before each one the number of zeros skipped, in r
  bits; a skip of 2^r - 1 or more is split with escape entries (value 2^r - 1, "skip that
  many and read on"); r in 1..16, the cheapest.
- ``channels``: a 1-bit-per-output-channel bitmap first, then the channels kept, dense
  (what structured pruning leaves); per-channel scales only for the channels kept.

Zeros made by rounding count like pruned zeros: "nonzero" means a code other than the zero
code. A k-means codebook tensor (kind ``codebook``, :mod:`qcore.kmeans`) has no zero code:
its float32 centroids come first, then b-bit centroid indices; only its pruning mask makes
zeros, so it is dense only when nothing is pruned.

With entropy coding allowed (``entropy="huffman"``), the weight codes and the
relative-index entries may each be stored as canonical Huffman codes
(:mod:`qcore.huffman`): a table of code lengths (5 bits per symbol), then the coded
stream. Each stream keeps whichever form is smaller, table included, and the relative
index its best width under Huffman coding; the header then says ``code_coding`` /
``index_coding`` = ``"huffman"`` and the alphabet sizes ``code_symbols`` /
``index_symbols`` (absent for fixed-width streams, so older files read as before).

Quantized tensors start with their float32 scales (and int32 zero points when
asymmetric), one per group (after the bitmap for ``channels``). The cheapest encoding is
used; on a tie the earlier in the order dense, channels, mask, relidx.

>>> t = torch.tensor([0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 5])
>>> e = encode_float(t.float())
>>> e.encoding, e.nbytes(), len(e.encode())   # 2 floats, then skips 2 and 8 in 4 bits
('relidx', 9, 9)
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qcore import huffman
from qcore.affine import QParams, code_range

__all__ = [
    "UIntBlock",
    "HuffmanBlock",
    "Float32Block",
    "Int32Block",
    "Encoded",
    "encode_quantized",
    "encode_float",
    "encode_codebook",
    "float_values",
    "decode",
    "relative_index",
    "relative_index_stream",
    "positions_from_stream",
    "FLOAT_BYTES",
    "float_bytes",
    "ENCODINGS",
]

FLOAT_BYTES = 4
MAX_INDEX_WIDTH = 16
# the largest magnitude a decoded weight, value or scale may have: far beyond any trained
# weight, and far enough below float32's 3.4e38 that a forward pass through it stays finite
MAX_MAGNITUDE = 1e30
ENCODINGS = ("dense", "channels", "mask", "relidx")
KINDS = ("quant", "float", "codebook")
ENTROPY = (None, "huffman")


def float_bytes(numel: int) -> int:
    """Bytes of ``numel`` float32 values."""
    return FLOAT_BYTES * int(numel)


def _ceil_bytes(bits: int) -> int:
    return (int(bits) + 7) // 8


# ---------------------------------------------------------------------------------------------
# Blocks


def pack_uint(values: np.ndarray, width: int) -> bytes:
    """Unsigned integers as a big-endian bit stream of ``width`` bits each."""
    if values.size == 0:
        return b""
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint32)
    bits = ((values.astype(np.uint32)[:, None] >> shifts) & np.uint32(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1)).tobytes()


def unpack_uint(buf: bytes, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_uint` (int64)."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8))[: count * width]
    # a bit column at a time: ``width`` bytes and one int64 per value, never an int64 per bit
    out = np.zeros(count, dtype=np.int64)
    for column in bits.reshape(count, width).T:  # most significant first
        out <<= 1
        out |= column
    return out


@dataclass(frozen=True, eq=False)
class UIntBlock:
    """``count`` unsigned integers of ``width`` bits, MSB first; made on demand by ``make``."""

    count: int
    width: int
    make: Any = field(repr=False)  # () -> integer tensor of ``count`` values in [0, 2^width)
    role: str = "codes"  # "codes", "mask", "relidx" or "channels"

    def nbytes(self) -> int:
        return _ceil_bytes(self.count * self.width)

    def bits(self) -> int:
        return self.count * self.width

    def encode(self) -> bytes:
        values = self.make().reshape(-1)
        if values.numel() != self.count:  # a bug, never a user's doing
            raise AssertionError(f"block holds {values.numel()} values, said {self.count}")
        return pack_uint(values.numpy(), self.width)


@dataclass(frozen=True, eq=False)
class HuffmanBlock:
    """``count`` symbols as canonical Huffman codes of ``lengths``, zero-padded to a byte."""

    count: int
    lengths: np.ndarray = field(repr=False)  # code length of each symbol (0: absent)
    total_bits: int  # the coded stream's bits, before padding
    make: Any = field(repr=False)  # () -> integer tensor of the ``count`` symbols
    role: str = "codes"  # "codes" or "relidx"

    def bits(self) -> int:
        return self.total_bits

    def nbytes(self) -> int:
        return _ceil_bytes(self.total_bits)

    def encode(self) -> bytes:
        values = self.make().reshape(-1)
        if values.numel() != self.count:  # a bug, never a user's doing
            raise AssertionError(f"block holds {values.numel()} values, said {self.count}")
        return huffman.encode(values.numpy(), self.lengths)


@dataclass(frozen=True, eq=False)
class Float32Block:
    """float32 values, little-endian: ``values``, or only those where ``select`` is True."""

    values: torch.Tensor
    role: str = "values"  # "values" or "scales"
    select: torch.Tensor | None = field(default=None, repr=False)  # picked when encoding
    count: int = field(init=False)

    def __post_init__(self) -> None:
        n = self.values.numel() if self.select is None else int(self.select.sum())
        object.__setattr__(self, "count", n)

    def nbytes(self) -> int:
        return FLOAT_BYTES * self.count

    def bits(self) -> int:
        return 8 * self.nbytes()

    def encode(self) -> bytes:
        flat = self.values.detach().reshape(-1)
        if self.select is not None:
            flat = flat[self.select]
        return flat.float().numpy().astype("<f4").tobytes()


@dataclass(frozen=True, eq=False)
class Int32Block:
    """int32 values, little-endian (zero points)."""

    values: torch.Tensor
    role: str = "zero_points"

    def nbytes(self) -> int:
        return 4 * self.values.numel()

    def bits(self) -> int:
        return 8 * self.nbytes()

    def encode(self) -> bytes:
        return self.values.reshape(-1).numpy().astype("<i4").tobytes()


@dataclass(frozen=True, eq=False)
class Int8Block:
    """Signed bytes (the exponents of power-of-two scales)."""

    values: torch.Tensor
    role: str = "exponents"

    def nbytes(self) -> int:
        return self.values.numel()

    def bits(self) -> int:
        return 8 * self.nbytes()

    def encode(self) -> bytes:
        return self.values.reshape(-1).numpy().astype("i1").tobytes()


Block = UIntBlock | HuffmanBlock | Float32Block | Int32Block | Int8Block


@dataclass(frozen=True, eq=False)
class Encoded:
    """One tensor in packed form: its blocks and the header fields that describe them."""

    kind: str  # "quant", "float" or "codebook"
    encoding: str  # one of ENCODINGS
    blocks: tuple[Block, ...] = field(repr=False)
    fields: dict[str, Any] = field(default_factory=dict)  # JSON-safe, for the file header

    def nbytes(self) -> int:
        return sum(b.nbytes() for b in self.blocks)

    def encode(self) -> bytes:
        return b"".join(b.encode() for b in self.blocks)

    def header(self) -> dict[str, Any]:
        return {"kind": self.kind, "encoding": self.encoding, **self.fields}

    def bytes_of(self, role: str) -> int:
        """Bytes of the blocks with ``role`` ("codes", "values", "scales", "mask", ...)."""
        return sum(b.nbytes() for b in self.blocks if b.role == role)

    def bits_of(self, *roles: str) -> int:
        """Bits of the blocks with one of ``roles``, before each block's padding to a byte."""
        return sum(b.bits() for b in self.blocks if b.role in roles)


# ---------------------------------------------------------------------------------------------
# The relative index


def _gaps(mask_flat: torch.Tensor) -> torch.Tensor:
    """Zeros skipped before each kept position (int64, one per kept weight)."""
    pos = torch.nonzero(mask_flat, as_tuple=False).reshape(-1)
    prev = torch.cat([torch.tensor([-1]), pos[:-1]])
    return pos - prev - 1


def relative_index(mask_flat: torch.Tensor) -> tuple[int, int]:
    """The cheapest relative-index width r and the stream's length in bits.

    >>> relative_index(torch.tensor([False] * 3 + [True] + [False] * 7 + [True]))
    (4, 8)
    """
    gaps = _gaps(mask_flat)
    if gaps.numel() == 0:
        return 1, 0
    # price every width over the distinct gap lengths (few) rather than every gap (many)
    counts = torch.bincount(gaps)
    lengths = torch.nonzero(counts).reshape(-1)
    widths = torch.arange(1, MAX_INDEX_WIDTH + 1)
    escape = (2**widths - 1)[:, None]  # (R, 1)
    fills = (lengths[None, :] // escape) * counts[lengths][None, :]  # (R, distinct lengths)
    entries = gaps.numel() + fills.sum(dim=1)  # (R,)
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


# ---------------------------------------------------------------------------------------------
# Choosing an encoding


def _huffman_blocks(
    counts: np.ndarray, count: int, make: Any, role: str, prefix: str
) -> tuple[tuple[Block, ...], dict[str, Any]]:
    """A stream's code table and Huffman-coded symbols (``counts``: how often each
    symbol occurs, trailing zeros cut), and the header fields that name them."""
    lengths = huffman.code_lengths(counts)
    table = UIntBlock(lengths.size, huffman.LENGTH_BITS, lambda: torch.from_numpy(lengths),
                      "table")  # fmt: skip
    stream = HuffmanBlock(count, lengths, huffman.encoded_bits(counts, lengths), make, role)
    return (table, stream), {f"{prefix}_coding": "huffman", f"{prefix}_symbols": lengths.size}


def _coded(
    count: int, width: int, make: Any, role: str, prefix: str, entropy: str | None
) -> tuple[tuple[Block, ...], dict[str, Any]]:
    """``count`` symbols of ``width`` bits: fixed width, or Huffman coded with its table
    when that is smaller (only with ``entropy="huffman"``)."""
    fixed = UIntBlock(count, width, make, role)
    if entropy is None or count == 0:
        return (fixed,), {}
    counts = torch.bincount(make().reshape(-1).to(torch.int64)).numpy()
    coded, fields = _huffman_blocks(counts, count, make, role, prefix)
    if sum(b.nbytes() for b in coded) < fixed.nbytes():
        return coded, fields
    return (fixed,), {}


def _relidx(
    nonzero: torch.Tensor, entropy: str | None
) -> tuple[tuple[Block, ...], dict[str, Any]]:
    """The relative index at its cheapest width: fixed width, or (``entropy="huffman"``)
    Huffman coded at whichever width makes table and stream smallest."""
    width, rel_bits = relative_index(nonzero)
    fixed = UIntBlock(rel_bits // width, width, lambda: relative_index_stream(nonzero, width),
                      "relidx")  # fmt: skip
    best: tuple[tuple[Block, ...], dict[str, Any]] = ((fixed,), {"index_width": width})
    if entropy is None or fixed.count == 0:
        return best
    best_bytes = fixed.nbytes()
    gaps = torch.bincount(_gaps(nonzero)).numpy()
    lengths = np.flatnonzero(gaps)  # the distinct gap lengths, and how often each occurs
    often = gaps[lengths]
    longest = int(lengths.max())
    for r in range(1, MAX_INDEX_WIDTH + 1):
        escape = 2**r - 1
        # a gap g is g // escape escape entries and one entry g % escape
        counts = np.bincount(lengths % escape, weights=often, minlength=escape + 1)
        counts[escape] += float(np.sum((lengths // escape) * often))
        counts = np.round(counts).astype(np.int64)
        counts = counts[: int(np.flatnonzero(counts).max()) + 1]
        entries = int(counts.sum())
        blocks, fields = _huffman_blocks(
            counts, entries, lambda r=r: relative_index_stream(nonzero, r), "relidx", "index"
        )
        size = sum(b.nbytes() for b in blocks)
        if size < best_bytes:
            best, best_bytes = (blocks, {"index_width": r, **fields}), size
        if escape > longest:  # wider streams hold the same entries: the same code
            break
    return best


def _index_candidates(
    nonzero: torch.Tensor, value_bits: int, dense: bool = True, entropy: str | None = None
) -> list[tuple[str, tuple[Block, ...], dict[str, Any]]]:
    """(encoding, index blocks, header fields) for the sparse encodings worth pricing."""
    n = nonzero.numel()
    k = int(nonzero.sum())
    # a sparse form saves at most value_bits * (n - k) bits and its index costs at least
    # min(n, k) bits (a bit per weight, or an entry per kept weight): skip it when it
    # cannot beat dense
    if dense and value_bits * (n - k) < min(n, k):
        return []
    mask_block = UIntBlock(n, 1, lambda: nonzero.to(torch.uint8), "mask")
    out = [("mask", (mask_block,), {"index_width": 0})]
    rel, fields = _relidx(nonzero, entropy)
    out.append(("relidx", rel, fields))
    return out


def _dead_channels(nonzero: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """Per output channel, True when it is kept (has a nonzero); None if none is all zero."""
    if len(shape) < 2:
        return None
    alive = nonzero.reshape(shape[0], -1).any(dim=1)
    return None if bool(alive.all()) else alive


def _cheapest(candidates: list[Encoded]) -> Encoded:
    best = candidates[0]
    for c in candidates[1:]:
        if c.nbytes() < best.nbytes():
            best = c
    return best


def encode_quantized(
    codes: torch.Tensor,
    qp: QParams,
    bits: int,
    *,
    per_channel: bool,
    symmetric: bool,
    mask: torch.Tensor | None = None,
    pow2: bool = False,
    entropy: str | None = None,
) -> Encoded:
    """The cheapest packed form of a quantized tensor.

    ``codes`` has the tensor's shape (pruned weights already at the zero code when
    ``bits >= 2``); ``mask`` (True = kept) is what pruning left, needed at 1 bit where no
    zero code exists. ``entropy="huffman"`` lets the codes and the relative index be
    Huffman coded where that is smaller.
    """
    shape = tuple(codes.shape)
    groups = int(qp.scale.numel())
    flat = codes.reshape(-1)
    n = flat.numel()
    if qp.binary:  # no zero code: only the pruning mask makes zeros
        nonzero = None if mask is None or bool(mask.all()) else mask.reshape(-1)
    else:
        nonzero = (codes.reshape(groups, -1) != qp.zero_point[:, None]).reshape(-1)
    base = {"bits": bits, "symmetric": symmetric, "binary": qp.binary,
            "per_channel": per_channel, "groups": groups}  # fmt: skip
    if pow2:  # only written when set, so files of float scales read as before
        base["pow2"] = True

    def params(select: torch.Tensor | None = None) -> list[Block]:
        scale = qp.scale if select is None else qp.scale[select]
        blocks: list[Block] = [
            Int8Block(torch.log2(scale).round().to(torch.int8)) if pow2
            else Float32Block(scale, "scales")
        ]  # fmt: skip
        if not symmetric and not qp.binary:
            zp = qp.zero_point if select is None else qp.zero_point[select]
            blocks.append(Int32Block(zp))
        return blocks

    def code_block(select: torch.Tensor | None, count: int):
        # widened first: int8 codes minus qmin would overflow
        if select is None:
            return _coded(count, bits, lambda: flat.to(torch.int32) - qp.qmin, "codes", "code",
                          entropy)  # fmt: skip
        return _coded(count, bits, lambda: flat[select].to(torch.int32) - qp.qmin, "codes",
                      "code", entropy)  # fmt: skip

    candidates = []
    has_dense = nonzero is None or not qp.binary
    if has_dense:
        cb, cf = code_block(None, n)
        candidates.append(Encoded("quant", "dense", (*params(), *cb), {**base, "kept": n, **cf}))
    if nonzero is not None and not bool(nonzero.all()):
        alive = _dead_channels(nonzero, shape)
        keep = None if alive is None else alive.repeat_interleave(n // shape[0])
        # at 1 bit a pruned weight inside a kept channel has no code to take
        if keep is not None and (has_dense or torch.equal(keep, nonzero)):
            kept = int(keep.sum())
            sel = alive if per_channel else None
            cb, cf = code_block(keep, kept)
            candidates.append(Encoded(
                "quant", "channels",
                (UIntBlock(shape[0], 1, lambda: alive.to(torch.uint8), "channels"), *params(sel),
                 *cb),
                {**base, "kept": kept, **cf},
            ))  # fmt: skip
        k = int(nonzero.sum())
        index_candidates = _index_candidates(nonzero, bits, dense=has_dense, entropy=entropy)
        if index_candidates:
            cb, cf = code_block(nonzero, k)
        for enc, index, fields in index_candidates:
            candidates.append(Encoded(
                "quant", enc, (*params(), *cb, *index), {**base, "kept": k, **cf, **fields},
            ))  # fmt: skip
    return _cheapest(candidates)


def encode_codebook(
    codes: torch.Tensor,
    codebook: torch.Tensor,
    bits: int,
    *,
    mask: torch.Tensor | None = None,
    entropy: str | None = None,
) -> Encoded:
    """The cheapest packed form of a shared-weight (k-means) tensor.

    ``codes`` (the tensor's shape) index ``codebook`` (float32, at most 2^bits centroids)
    where ``mask`` keeps a weight; a pruned weight's code is ignored (it is zero by its
    mask: the codebook has no zero code).
    """
    shape = tuple(codes.shape)
    flat = codes.reshape(-1)
    n = flat.numel()
    nonzero = None if mask is None or bool(mask.all()) else mask.reshape(-1)
    base = {"bits": bits, "centroids": int(codebook.numel())}
    book = Float32Block(codebook.reshape(-1), "codebook")

    def code_block(select: torch.Tensor | None, count: int):
        if select is None:
            return _coded(count, bits, lambda: flat.to(torch.int32), "codes", "code", entropy)
        return _coded(count, bits, lambda: flat[select].to(torch.int32), "codes", "code",
                      entropy)  # fmt: skip

    if nonzero is None:
        cb, cf = code_block(None, n)
        return Encoded("codebook", "dense", (book, *cb), {**base, "kept": n, **cf})
    candidates = []
    alive = _dead_channels(nonzero, shape)
    if alive is not None:
        keep = alive.repeat_interleave(n // shape[0])
        if torch.equal(keep, nonzero):  # every weight of a kept channel kept
            kept = int(keep.sum())
            cb, cf = code_block(keep, kept)
            candidates.append(Encoded(
                "codebook", "channels",
                (UIntBlock(shape[0], 1, lambda: alive.to(torch.uint8), "channels"), book, *cb),
                {**base, "kept": kept, **cf},
            ))  # fmt: skip
    k = int(nonzero.sum())
    cb, cf = code_block(nonzero, k)
    for enc, index, fields in _index_candidates(nonzero, bits, dense=False, entropy=entropy):
        candidates.append(Encoded(
            "codebook", enc, (book, *cb, *index), {**base, "kept": k, **cf, **fields},
        ))  # fmt: skip
    return _cheapest(candidates)


def float_values(values: torch.Tensor) -> Encoded:
    """A tensor stored as plain float32 values (biases, BatchNorm, layers left alone)."""
    return Encoded("float", "dense", (Float32Block(values.detach().reshape(-1)),),
                   {"kept": values.numel()})


def encode_float(values: torch.Tensor, entropy: str | None = None) -> Encoded:
    """The cheapest packed form of a float32 tensor: dense, or its nonzeros and an index
    (Huffman coded where smaller with ``entropy="huffman"``)."""
    shape = tuple(values.shape)
    flat = values.detach().reshape(-1)
    n = flat.numel()
    candidates = [float_values(flat)]
    nonzero = flat != 0
    if n and not bool(nonzero.all()):
        alive = _dead_channels(nonzero, shape)
        if alive is not None:
            keep = alive.repeat_interleave(n // shape[0])
            candidates.append(Encoded(
                "float", "channels",
                (UIntBlock(shape[0], 1, lambda: alive.to(torch.uint8), "channels"),
                 Float32Block(flat, select=keep)),
                {"kept": int(keep.sum())},
            ))  # fmt: skip
        for enc, index, fields in _index_candidates(nonzero, 32, entropy=entropy):
            candidates.append(Encoded(
                "float", enc, (Float32Block(flat, select=nonzero), *index),
                {"kept": int(nonzero.sum()), **fields},
            ))  # fmt: skip
    return _cheapest(candidates)


# ---------------------------------------------------------------------------------------------
# Decoding (hostile input: every field and length is checked; errors are ValueErrors)

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 60


def _show(value: Any) -> str:
    """``repr(value)`` cut short (depth, length, digits): messages quote hostile input."""
    return _REPR.repr(value)


class _Reader:
    def __init__(self, buf: bytes, name: str):
        self.buf, self.pos, self.name = buf, 0, name

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError(f"The packed data for {self.name!r} is truncated.")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def floats(self, n: int) -> torch.Tensor:
        vals = np.frombuffer(self.take(4 * n), dtype="<f4").astype(np.float32)
        if not np.isfinite(vals).all():
            raise ValueError(f"The packed data for {self.name!r} holds NaN or infinite values.")
        if vals.size and float(np.abs(vals).max()) > MAX_MAGNITUDE:
            raise ValueError(
                f"The packed data for {self.name!r} holds values beyond {MAX_MAGNITUDE:g}, "
                "too large for a model."
            )
        return torch.from_numpy(vals)


def _int_field(fields: dict, key: str, lo: int, hi: int, name: str) -> int:
    v = fields.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"Tensor {name!r} has an invalid {key} ({_show(v)}) in the packed file.")
    return v


def decode(fields: dict, blob: bytes, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """The float32 tensor an :class:`Encoded` wrote (``fields`` is its ``header()``)."""
    numel = math.prod(shape)
    r = _Reader(blob, name)
    kind, encoding = fields.get("kind"), fields.get("encoding")
    if kind not in KINDS or encoding not in ENCODINGS:
        raise ValueError(f"Tensor {name!r} has an unknown kind or encoding in the packed file.")
    kept = _int_field(fields, "kept", 0, numel, name)
    channels = shape[0] if len(shape) >= 2 else 0
    if encoding == "channels" and not channels:
        raise ValueError(f"Tensor {name!r} is stored by channels but has no channel axis.")
    if encoding == "dense" and kept != numel:
        raise ValueError(f"Tensor {name!r} is dense but lists {kept} of {numel} weights.")
    alive = None
    if kind == "float":
        if encoding == "channels":
            alive = _channel_bitmap(r, channels)
        vals = r.floats(kept)
    elif kind == "codebook":
        bits = _int_field(fields, "bits", 1, 16, name)
        centroids = _int_field(fields, "centroids", 0, min(2**bits, max(kept, 1)), name)
        if centroids == 0 and kept:
            raise ValueError(f"Tensor {name!r} has weights but an empty codebook.")
        if encoding == "channels":
            alive = _channel_bitmap(r, channels)
        book = r.floats(centroids)
        codes = _read_codes(fields, r, bits, kept, name)
        if kept and int(codes.max()) >= centroids:
            raise ValueError(
                f"Tensor {name!r} has a code beyond its codebook of {centroids} values."
            )
        vals = book[codes]
    else:
        bits = _int_field(fields, "bits", 1, 16, name)
        groups = _int_field(fields, "groups", 1, max(numel, 1), name)
        binary, symmetric = fields.get("binary"), fields.get("symmetric")
        per_channel = fields.get("per_channel")
        if not all(isinstance(v, bool) for v in (binary, symmetric, per_channel)) \
                or binary != (bits == 1):
            raise ValueError(f"Tensor {name!r} has invalid quantization fields.")
        if per_channel and (not shape or groups != shape[0]):
            raise ValueError(f"Tensor {name!r} has {groups} scales for {shape[:1]} channels.")
        if not per_channel and groups != 1:
            raise ValueError(f"Tensor {name!r} has {groups} scales but is per-tensor.")
        if encoding == "channels":
            alive = _channel_bitmap(r, channels)
        stored = int(alive.sum()) if alive is not None and per_channel else groups
        pow2 = fields.get("pow2", False)
        if not isinstance(pow2, bool):
            raise ValueError(f"Tensor {name!r} has an invalid pow2 field in the packed file.")
        if pow2:  # exponents in signed bytes: scale = 2^e
            e = torch.from_numpy(np.frombuffer(r.take(stored), dtype="i1").astype(np.float64))
            if bool(((e < -126) | (e > 127)).any()):
                raise ValueError(f"Tensor {name!r} has a scale exponent outside -126..127.")
            scale = (2.0**e).float()
        else:
            scale = r.floats(stored)
        if bool((scale < 0).any()):
            raise ValueError(f"Tensor {name!r} has a negative scale in the packed file.")
        zp = torch.zeros(stored, dtype=torch.int64)
        qmin, qmax = code_range(bits, symmetric)
        if not symmetric and not binary:
            zp = torch.from_numpy(np.frombuffer(r.take(4 * stored), dtype="<i4").astype(np.int64))
            if bool(((zp < qmin) | (zp > qmax)).any()):
                raise ValueError(f"Tensor {name!r} has a zero point outside its code range.")
        if stored != groups:  # scatter the kept channels' parameters back to every channel
            scale = torch.ones(groups).index_put((alive,), scale)
            zp = torch.zeros(groups, dtype=torch.int64).index_put((alive,), zp)
        codes = _read_codes(fields, r, bits, kept, name) + qmin
    positions = _positions(fields, r, encoding, numel, kept, alive, name)
    if kind == "quant":
        # every stored weight's group: its output channel, or group 0 per tensor
        group_of = positions // (numel // groups) if groups > 1 else torch.zeros_like(positions)
        s, z = scale[group_of], zp[group_of]
        vals = (2 * codes - 1).float() * s if binary else (codes - z).float() * s
        if vals.numel() and not float(vals.abs().max()) <= MAX_MAGNITUDE:  # or inf, or nan
            raise ValueError(
                f"Tensor {name!r} has scales so large that its weights pass {MAX_MAGNITUDE:g}."
            )
    out = torch.zeros(numel)
    out[positions] = vals
    if r.pos != len(r.buf):  # a header lying about bits or counts
        raise ValueError(f"The packed data for {name!r} does not match its header.")
    return out.reshape(shape)


def _coding(fields: dict, prefix: str, width: int, name: str) -> int:
    """0 for a fixed-width stream; the alphabet size of a Huffman-coded one."""
    coding = fields.get(f"{prefix}_coding")
    if coding is None:
        return 0
    if coding != "huffman":
        raise ValueError(f"Tensor {name!r} has an unknown {prefix}_coding {_show(coding)}.")
    return _int_field(fields, f"{prefix}_symbols", 1, 2**width, name)


def _huffman_stream(
    r: _Reader, alphabet: int, count: int, escape: int | None, what: str, limit: int
) -> torch.Tensor:
    """A code table of ``alphabet`` lengths, then symbols until ``count`` of them are not
    ``escape`` (at most ``limit`` in all); the stream's padding to a byte must be zero
    bits."""
    table = r.take(_ceil_bytes(huffman.table_bits(alphabet)))
    lengths = unpack_uint(table, huffman.LENGTH_BITS, alphabet)
    huffman.check_lengths(lengths, what)
    rest = r.buf[r.pos :]
    symbols, used = huffman.decode(rest, lengths, count, escape, what, limit)
    tail = np.unpackbits(np.frombuffer(rest[: _ceil_bytes(used)], dtype=np.uint8))[used:]
    if tail.any():
        raise ValueError(f"{what} does not end where its header says.")
    r.take(_ceil_bytes(used))
    return torch.from_numpy(symbols)


def _read_codes(fields: dict, r: _Reader, bits: int, kept: int, name: str) -> torch.Tensor:
    """The ``kept`` stored codes (int64, from 0), fixed width or Huffman coded."""
    alphabet = _coding(fields, "code", bits, name)
    if alphabet:
        return _huffman_stream(r, alphabet, kept, None, f"The codes of tensor {name!r}", kept)
    return torch.from_numpy(unpack_uint(r.take(_ceil_bytes(bits * kept)), bits, kept))


def _channel_bitmap(r: _Reader, channels: int) -> torch.Tensor:
    bits = np.unpackbits(np.frombuffer(r.take(_ceil_bytes(channels)), dtype=np.uint8))
    return torch.from_numpy(bits[:channels].astype(bool))


def _positions(fields, r: _Reader, encoding, numel, kept, alive, name) -> torch.Tensor:
    if encoding == "dense":
        return torch.arange(numel)
    if encoding == "channels":
        per = numel // alive.numel()
        pos = torch.nonzero(alive.repeat_interleave(per)).reshape(-1)
    elif encoding == "mask":
        bits = np.unpackbits(np.frombuffer(r.take(_ceil_bytes(numel)), dtype=np.uint8))[:numel]
        pos = torch.from_numpy(np.nonzero(bits)[0].astype(np.int64))
    elif _coding(fields, "index", 16, name):
        width = _int_field(fields, "index_width", 1, MAX_INDEX_WIDTH, name)
        alphabet = _coding(fields, "index", width, name)
        what = f"The sparse index of tensor {name!r}"
        # at most an entry per kept weight and an escape per 2^width - 1 zeros skipped
        most = kept + (numel - kept) // (2**width - 1)
        stream = _huffman_stream(r, alphabet, kept, 2**width - 1, what, most)
        if r.pos != len(r.buf):
            raise ValueError(f"{what} does not match its weights.")
        pos = positions_from_stream(stream, width)
    else:
        width = _int_field(fields, "index_width", 1, MAX_INDEX_WIDTH, name)
        rest = len(r.buf) - r.pos
        # the stream is the rest of the block: at most an entry per kept weight and an escape
        # per 2^width - 1 zeros skipped, so a longer one is refused before it is unpacked
        if rest > _ceil_bytes((kept + (numel - kept) // (2**width - 1)) * width):
            raise ValueError(f"The sparse index of tensor {name!r} does not match its weights.")
        blob = r.take(rest)
        stream = torch.from_numpy(unpack_uint(blob, width, rest * 8 // width))
        # it ends with the kept-th terminal entry, then zero bits up to a whole byte
        ends = torch.nonzero(stream != 2**width - 1).reshape(-1)
        used = int(ends[kept - 1]) + 1 if 0 < kept <= ends.numel() else 0
        tail = np.unpackbits(np.frombuffer(blob, dtype=np.uint8))[used * width :]
        if kept > ends.numel() or _ceil_bytes(used * width) != rest or tail.any():
            raise ValueError(f"The sparse index of tensor {name!r} does not match its weights.")
        pos = positions_from_stream(stream[:used], width)
    if pos.numel() != kept or (kept and int(pos.max()) >= numel):
        raise ValueError(f"The sparse index of tensor {name!r} does not match its weights.")
    return pos
