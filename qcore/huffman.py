"""Canonical Huffman codes: lengths from counts, the code table, encoding and decoding.

A stream of small unsigned integers (weight codes, relative-index entries) over an
alphabet of ``A`` symbols 0..A-1 is written as variable-length codes, MSB first, padded
with zero bits to a whole byte. Only the code *lengths* are stored (the table: one
:data:`LENGTH_BITS`-bit length per symbol, 0 for a symbol that never occurs); the codes
themselves follow from the lengths by the canonical rule (shorter codes first, then by
symbol), as in DEFLATE. Lengths are limited to :data:`MAX_CODE_LENGTH` bits.

A table read from a file is checked: every length within the limit, and the code
complete (Kraft sum exactly 1: prefix-free and with no unused bit pattern), except the
one-symbol code, a single 1-bit code "0".

>>> counts = np.array([5, 1, 1, 2])
>>> lengths = code_lengths(counts)
>>> lengths.tolist(), encoded_bits(counts, lengths)
([1, 3, 3, 2], 15)
>>> data = encode(np.array([0, 3, 1, 0]), lengths)
>>> decode(data, lengths, 4)[0].tolist()
[0, 3, 1, 0]
"""

from __future__ import annotations

import heapq
from array import array

import numpy as np

__all__ = ["MAX_CODE_LENGTH", "LENGTH_BITS", "code_lengths", "canonical_codes",
           "check_lengths", "encoded_bits", "table_bits", "encode", "decode"]  # fmt: skip

MAX_CODE_LENGTH = 16  # bits; decoding looks codes up in a table of 2^16 entries
LENGTH_BITS = 5  # a stored code length: 0..MAX_CODE_LENGTH


def table_bits(alphabet: int) -> int:
    """Bits of the stored table: one length per symbol of the alphabet."""
    return LENGTH_BITS * int(alphabet)


def code_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code lengths (int64, 0 for an absent symbol), at most MAX_CODE_LENGTH.

    Deterministic: ties are broken by symbol. A single present symbol gets length 1.
    Lengths over the limit are shortened as JPEG does (Annex K.3), which keeps the code
    complete, then handed out again shortest to the most frequent symbol.
    """
    counts = np.asarray(counts, dtype=np.int64)
    present = np.flatnonzero(counts)
    lengths = np.zeros(counts.size, dtype=np.int64)
    if present.size == 0:
        return lengths
    if present.size == 1:
        lengths[present[0]] = 1
        return lengths
    # heap of (weight, tie-break, node); leaves are symbols, inner nodes record children
    heap = [(int(counts[s]), i, i) for i, s in enumerate(present)]
    heapq.heapify(heap)
    parent = list(range(present.size))  # filled for inner nodes as they are made
    next_id = present.size
    while len(heap) > 1:
        w1, _, a = heapq.heappop(heap)
        w2, _, b = heapq.heappop(heap)
        parent.append(next_id)
        parent[a] = parent[b] = next_id
        heapq.heappush(heap, (w1 + w2, next_id, next_id))
        next_id += 1
    root = next_id - 1
    depth = [0] * next_id
    for node in range(root - 1, -1, -1):  # parents are made after their children
        depth[node] = depth[parent[node]] + 1
    leaf_depth = np.array(depth[: present.size], dtype=np.int64)
    if leaf_depth.max() > MAX_CODE_LENGTH:
        leaf_depth = _limit(leaf_depth, counts[present])
    lengths[present] = leaf_depth
    return lengths


def _limit(depths: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Depths cut to MAX_CODE_LENGTH with the Kraft sum kept at 1 (JPEG Annex K.3)."""
    top = int(depths.max())
    per = np.bincount(depths, minlength=top + 1).tolist()  # codes of each length
    for i in range(top, MAX_CODE_LENGTH, -1):
        while per[i] > 0:
            j = i - 2
            while per[j] == 0:
                j -= 1
            per[i] -= 2  # two leaves at depth i: one moves up to i - 1 ...
            per[i - 1] += 1
            per[j + 1] += 2  # ... the other joins a leaf at depth j, both at j + 1
            per[j] -= 1
    # the most frequent symbol gets the shortest code (ties: the lower symbol)
    order = np.lexsort((np.arange(weights.size), -weights))
    new = np.repeat(np.arange(len(per)), per)[: weights.size]
    out = np.empty_like(depths)
    out[order] = new
    return out


def check_lengths(lengths: np.ndarray, what: str) -> None:
    """ValueError unless ``lengths`` make a complete prefix code (or one 1-bit code)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 0 or lengths.max() > MAX_CODE_LENGTH):
        raise ValueError(f"{what} has a code length beyond {MAX_CODE_LENGTH} bits.")
    used = lengths[lengths > 0]
    if used.size == 0:
        raise ValueError(f"{what} has an empty code table.")
    if used.size == 1:
        if used[0] != 1:
            raise ValueError(f"{what} has a one-symbol code longer than 1 bit.")
        return
    # Kraft sum in units of 2^-MAX_CODE_LENGTH: exactly 1 for a complete prefix code
    kraft = int(np.sum(np.left_shift(1, MAX_CODE_LENGTH - used)))
    if kraft != 1 << MAX_CODE_LENGTH:
        raise ValueError(f"{what} has a code table that is not a complete prefix code.")


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code of each symbol (int64; meaningless where the length is 0)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.size, dtype=np.int64)
    order = np.lexsort((np.arange(lengths.size), lengths))
    order = order[lengths[order] > 0]
    code, prev = 0, 0
    for s in order.tolist():
        length = int(lengths[s])
        code <<= length - prev
        codes[s] = code
        code += 1
        prev = length
    return codes


def encoded_bits(counts: np.ndarray, lengths: np.ndarray) -> int:
    """Bits of the coded stream (before padding to a byte)."""
    return int(np.dot(np.asarray(counts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)))


def encode(symbols: np.ndarray, lengths: np.ndarray) -> bytes:
    """``symbols`` as canonical codes, MSB first, zero-padded to a whole byte."""
    symbols = np.asarray(symbols, dtype=np.int64).reshape(-1)
    if symbols.size == 0:
        return b""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = canonical_codes(lengths)
    ln, cd = lengths[symbols], codes[symbols]
    if (ln == 0).any():  # a bug, never a user's doing
        raise AssertionError("a symbol without a code")
    # every code left-aligned in MAX_CODE_LENGTH bits, then only its first ``ln`` bits kept
    shifts = np.arange(MAX_CODE_LENGTH - 1, -1, -1, dtype=np.int64)
    aligned = cd << (MAX_CODE_LENGTH - ln)
    bits = ((aligned[:, None] >> shifts) & 1).astype(np.uint8)
    keep = np.arange(MAX_CODE_LENGTH)[None, :] < ln[:, None]
    return np.packbits(bits[keep]).tobytes()


def decode(
    buf: bytes, lengths: np.ndarray, count: int, escape: int | None = None,
    what: str = "The Huffman-coded stream", limit: int | None = None,
) -> tuple[np.ndarray, int]:
    """(symbols, bits read): symbols from the start of ``buf`` until ``count`` of them
    differ from ``escape`` (all of them count when ``escape`` is None), at most ``limit``
    symbols in all (default ``count``).

    ``lengths`` must have passed :func:`check_lengths`. Raises ValueError when the data
    ends first, runs past ``limit`` or holds a bit pattern no code starts with. Memory is
    bounded: the bits are looked up a chunk at a time, and never more of ``buf`` than
    ``limit`` codes can fill.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    limit = count if limit is None else limit
    if count == 0:
        return np.zeros(0, dtype=np.int64), 0
    codes = canonical_codes(lengths)
    # every 16-bit window -> (symbol, length): a code of length l fills 2^(16-l) windows
    sym_of = np.full(1 << MAX_CODE_LENGTH, -1, dtype=np.int32)
    len_of = np.zeros(1 << MAX_CODE_LENGTH, dtype=np.int32)
    for s in np.flatnonzero(lengths).tolist():
        lo = int(codes[s]) << (MAX_CODE_LENGTH - int(lengths[s]))
        hi = lo + (1 << (MAX_CODE_LENGTH - int(lengths[s])))
        sym_of[lo:hi], len_of[lo:hi] = s, lengths[s]
    buf = buf[: (limit * MAX_CODE_LENGTH + 7) // 8]  # no more than ``limit`` codes can use
    total = 8 * len(buf)
    out = array("q")
    esc = -2 if escape is None else escape
    pos, found = 0, 0
    while found < count:  # a chunk of bit positions at a time
        if pos >= total:
            raise ValueError(f"{what} ends before its last code.")
        first, end = pos, min(total, pos + _CHUNK_BITS)
        step, sym = _lookup(buf, first, end, sym_of, len_of)
        while found < count and pos < end:  # one code after another: each start depends
            n = step[pos - first]             # on the last
            if n == 0:  # only an incomplete one-symbol code leaves patterns unused
                raise ValueError(f"{what} holds a bit pattern that is not a code.")
            v = sym[pos - first]
            out.append(v)
            found += v != esc
            pos += n
            if len(out) > limit:
                raise ValueError(f"{what} holds more codes than its tensor has room for.")
    if pos > total:
        raise ValueError(f"{what} ends inside its last code.")
    return np.frombuffer(out, dtype=np.int64).copy(), pos


_CHUNK_BITS = 1 << 18  # bit positions looked up at once (a few MiB of work arrays)


def _lookup(buf: bytes, first: int, end: int, sym_of: np.ndarray, len_of: np.ndarray):
    """(code length, symbol) of the code starting at each bit position in [first, end)."""
    raw = np.frombuffer(buf[first // 8 : (end + MAX_CODE_LENGTH + 7) // 8], dtype=np.uint8)
    bits = np.unpackbits(raw)[first % 8 :]
    n = end - first
    bits = np.concatenate([bits, np.zeros(MAX_CODE_LENGTH, dtype=np.uint8)])
    window = np.zeros(n, dtype=np.int32)  # the 16 bits starting at each position
    for j in range(MAX_CODE_LENGTH):
        window = (window << 1) | bits[j : j + n]
    return memoryview(len_of[window]), memoryview(sym_of[window])
