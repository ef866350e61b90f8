"""Tests for qcore.codecs: packed bytes on hand-computed cases, the relative index, and
every codec's bytes (nbytes() == len(encode()), decode(encode(x)) == x)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcore.codecs import (
    Encoded,
    decode,
    encode_float,
    encode_quantized,
    float_bytes,
    positions_from_stream,
    relative_index,
    relative_index_stream,
)
from qcore.quant import QParams, code_range

PROPS = settings(deadline=None, max_examples=50)


def mask_at(n: int, positions: list[int]) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[positions] = True
    return m


class Size:
    """An encoded tensor's bytes by part (what the old size record held)."""

    def __init__(self, enc: Encoded):
        self.enc = enc
        self.total = enc.nbytes()
        self.encoding = enc.encoding
        self.kept = enc.fields["kept"]
        self.index_width = enc.fields.get("index_width", 0)
        self.code_bytes = enc.bytes_of("codes") + enc.bytes_of("values")
        self.index_bytes = enc.bytes_of("mask") + enc.bytes_of("relidx")
        self.param_bytes = enc.bytes_of("scales") + enc.bytes_of("zero_points")
        self.bits = enc.fields.get("bits", 32)
        assert len(enc.encode()) == self.total  # the size is the bytes


def packed_weight_size(n, bits, *, groups, symmetric, mask=None, quantized=True) -> Size:
    """Encode n weights whose nonzeros are exactly ``mask`` (all nonzero without one)."""
    mask = torch.ones(n, dtype=torch.bool) if mask is None else mask.reshape(-1)
    if not quantized:
        return Size(encode_float(torch.where(mask, 1.5, 0.0)))
    qmin, qmax = code_range(bits, symmetric)
    qp = QParams(torch.ones(groups), torch.zeros(groups, dtype=torch.int64), qmin, qmax,
                 -torch.ones(groups), torch.ones(groups), binary=bits == 1)
    codes = mask.to(torch.int16)  # code 1 where kept, the zero code 0 elsewhere
    shape = (groups, n // groups)
    return Size(encode_quantized(codes.reshape(shape), qp, bits, per_channel=groups > 1,
                                 symmetric=symmetric, mask=mask.reshape(shape)))


@pytest.mark.parametrize(
    ("n", "bits", "groups", "symmetric", "total"),
    [
        (100, 4, 1, True, 50 + 4),
        (100, 4, 1, False, 50 + 4 + 4),
        (100, 4, 10, False, 50 + 40 + 40),
        (100, 4, 10, True, 50 + 40),
        (10, 3, 1, True, 4 + 4),  # 30 bits -> 4 bytes
        (100, 1, 1, True, 13 + 4),
        (100, 1, 1, False, 13 + 4),  # 1 bit has no zero point
        (7, 16, 7, False, 14 + 28 + 28),
        (1, 8, 1, True, 1 + 4),
        (9, 8, 1, True, 9 + 4),
    ],
)
def test_dense_sizes(n: int, bits: int, groups: int, symmetric: bool, total: int) -> None:
    s = packed_weight_size(n, bits, groups=groups, symmetric=symmetric)
    assert s.total == total
    assert s.encoding == "dense" and s.kept == n and s.index_bytes == 0
    assert s.code_bytes == math.ceil(bits * n / 8)
    zp = 0 if symmetric or bits == 1 else 4 * groups
    assert s.param_bytes == 4 * groups + zp


def test_full_mask_is_dense() -> None:
    s = packed_weight_size(20, 4, groups=1, symmetric=True, mask=torch.ones(4, 5, dtype=bool))
    assert s.encoding == "dense" and s.total == 10 + 4


def test_unquantized_sizes() -> None:
    s = packed_weight_size(10, 3, groups=0, symmetric=True, quantized=False)
    assert (s.total, s.bits, s.param_bytes) == (40, 32, 0)
    m = mask_at(10, [0, 2, 5])  # gaps 0, 1, 2: width 2 gives 3 entries = 6 bits (1 byte)
    s = packed_weight_size(10, 3, groups=0, symmetric=True, mask=m, quantized=False)
    assert (s.code_bytes, s.index_bytes, s.param_bytes, s.total) == (12, 1, 0, 13)
    assert float_bytes(7) == 28


def test_docstring_relidx_case() -> None:
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[::100] = True  # 10 kept, gaps 0 then 99
    s = packed_weight_size(1000, 8, groups=1, symmetric=True, mask=mask)
    # width 7 (escape 127): 10 entries, 70 bits = 9 bytes; width 6 needs 10 + 9 escapes
    assert (s.encoding, s.index_width, s.code_bytes, s.index_bytes) == ("relidx", 7, 10, 9)
    assert s.total == 10 + 9 + 4
    assert relative_index(mask) == (7, 70)


def test_escape_rule_hand_case() -> None:
    mask = mask_at(12, [3, 11])  # gaps 3 and 7
    # width 1: 2 + 3 + 7 = 12 entries (12 bits); 2: 2 + 1 + 2 = 5 (10 bits);
    # 3: 2 + 0 + 1 = 3 (9 bits); 4: 2 entries (8 bits); 5: 10 bits
    assert relative_index(mask) == (4, 8)
    assert relative_index_stream(mask, 4).tolist() == [3, 7]
    assert relative_index_stream(mask, 3).tolist() == [3, 7, 0]  # 7 = escape, then 0
    assert relative_index_stream(mask, 2).tolist() == [3, 0, 3, 3, 1]
    assert relative_index_stream(mask, 1).tolist() == [1, 1, 1, 0] + [1] * 7 + [0]
    for r in range(1, 17):
        assert positions_from_stream(relative_index_stream(mask, r), r).tolist() == [3, 11]
    s = packed_weight_size(12, 8, groups=1, symmetric=True, mask=mask)
    assert (s.encoding, s.index_width, s.code_bytes, s.index_bytes, s.total) == (
        "relidx", 4, 2, 1, 7
    )


def test_narrowest_of_equal_widths_wins() -> None:
    mask = mask_at(4, [1, 3])  # gaps 1, 1: width 1 -> 4 bits, width 2 -> 4 bits
    assert relative_index(mask) == (1, 4)


def test_mask_encoding_wins_when_dense_enough() -> None:
    mask = torch.tensor([True, False] * 8)  # gaps 0, 1 x7: width 1 -> 15 bits, mask 16 bits
    assert relative_index(mask) == (1, 15)
    s = packed_weight_size(16, 4, groups=1, symmetric=False, mask=mask)
    # the 2-byte index ties with the 2-byte mask; the mask is kept on a tie
    assert (s.encoding, s.index_width, s.kept) == ("mask", 0, 8)
    assert (s.code_bytes, s.index_bytes, s.param_bytes, s.total) == (4, 2, 8, 14)


def test_random_half_mask_uses_mask() -> None:
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(1000, generator=g) > 0.5
    s = packed_weight_size(1000, 4, groups=1, symmetric=True, mask=mask)
    kept = int(mask.sum())
    assert s.encoding == "mask"
    assert s.total == math.ceil(4 * kept / 8) + 125 + 4


def test_empty_mask() -> None:
    mask = torch.zeros(30, dtype=torch.bool)
    assert relative_index(mask) == (1, 0)
    s = packed_weight_size(30, 4, groups=1, symmetric=True, mask=mask)
    assert (s.kept, s.code_bytes, s.index_bytes, s.total) == (0, 0, 0, 4)
    assert relative_index_stream(mask, 3).numel() == 0
    assert positions_from_stream(relative_index_stream(mask, 3), 3).numel() == 0


def test_trailing_zeros_cost_nothing() -> None:
    assert relative_index(mask_at(10_000, [0])) == (1, 1)


@PROPS
@given(
    n=st.integers(1, 2000),
    density=st.sampled_from([0.001, 0.01, 0.1, 0.5, 0.9]),
    seed=st.integers(0, 10_000),
    width=st.integers(1, 16),
)
def test_property_stream_round_trip(n: int, density: float, seed: int, width: int) -> None:
    mask = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < density
    stream = relative_index_stream(mask, width)
    assert stream.dtype == torch.int64
    if stream.numel():
        assert int(stream.min()) >= 0 and int(stream.max()) <= 2**width - 1
    pos = positions_from_stream(stream, width)
    assert torch.equal(pos, torch.nonzero(mask).reshape(-1))
    best, bits = relative_index(mask)
    if mask.any():
        assert bits == relative_index_stream(mask, best).numel() * best
        for r in range(1, 17):  # the chosen width is the cheapest
            assert relative_index_stream(mask, r).numel() * r >= bits
    s = packed_weight_size(n, 5, groups=1, symmetric=True, mask=mask)
    kept = int(mask.sum())
    # the cheapest of dense and the nonzero codes with a mask or relative index
    dense = math.ceil(5 * n / 8)
    sparse = math.ceil(5 * kept / 8) + min(math.ceil(n / 8), math.ceil(bits / 8))
    assert s.total == 4 + min(dense, sparse)
    if s.encoding != "dense":
        assert s.index_bytes == min(math.ceil(n / 8), math.ceil(bits / 8))
        assert s.code_bytes == math.ceil(5 * kept / 8)


# ---------------------------------------------------------------- every codec, generated


def _decoded(enc: Encoded, shape: tuple[int, ...]) -> torch.Tensor:
    data = enc.encode()
    assert len(data) == enc.nbytes()
    return decode(enc.header(), data, shape, "w")


@PROPS
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 40),
    bits=st.integers(1, 16),
    symmetric=st.booleans(),
    per_channel=st.booleans(),
    rate=st.sampled_from([0.0, 0.01, 0.3, 0.9]),
    structured=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_property_quantized_codec_round_trip(
    rows, cols, bits, symmetric, per_channel, rate, structured, seed
) -> None:
    from qcore.compress import _zero_pruned
    from qcore.config import PruneConfig, QuantConfig
    from qcore.prune import layer_mask
    from qcore.quant import dequantize_codes, quantize_with_params

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
    mask = None
    if rate:
        mask = layer_mask(w, PruneConfig(rate=rate, structured=structured))
    res = quantize_with_params(w, QuantConfig(bits=bits, symmetric=symmetric,
                                              per_channel=per_channel), mask=mask)
    codes = res.codes
    if mask is not None and not res.qparams.binary:
        codes = _zero_pruned(codes, mask, res.qparams)
    enc = encode_quantized(codes, res.qparams, bits, per_channel=res.per_channel,
                           symmetric=symmetric, mask=mask)
    gr = res.qparams.scale.numel()
    expected = dequantize_codes(codes.reshape(gr, -1), res.qparams).reshape(w.shape)
    if mask is not None and res.qparams.binary:
        expected = expected * mask
    assert torch.equal(_decoded(enc, (rows, cols)), expected)
    assert torch.equal(expected, res.values)
    # the chosen form is the cheapest one offered; dense is always offered but at 1 bit
    # with pruning (no zero code there)
    if not (res.qparams.binary and mask is not None and not bool(mask.all())):
        params = 4 * gr * (1 if symmetric or bits == 1 else 2)  # scales (+ zero points)
        assert enc.nbytes() <= math.ceil(bits * rows * cols / 8) + params


@PROPS
@given(
    n=st.integers(0, 300),
    zeros=st.sampled_from([0.0, 0.05, 0.5, 0.99, 1.0]),
    rows=st.sampled_from([1, 3]),
    seed=st.integers(0, 10_000),
)
def test_property_float_codec_round_trip(n: int, zeros: float, rows: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g)
    x = torch.where(torch.rand(rows, n, generator=g) < zeros, 0.0, x)
    enc = encode_float(x)
    assert torch.equal(_decoded(enc, (rows, n)), x)
    assert enc.nbytes() <= 4 * rows * n


def test_light_pruning_stays_dense_and_costs_nothing() -> None:
    """8 bits with 1 % pruned is never larger than plain 8 bits (pruned take the zero code)."""
    from qcore.compress import compress
    from qcore.config import CompressionConfig, PruneConfig, QuantConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 10)).eval()
    plain = compress(model, CompressionConfig(quant=QuantConfig(bits=8)))
    light = compress(model, CompressionConfig(quant=QuantConfig(bits=8),
                                              prune=PruneConfig(rate=0.01)))
    assert light.size_bytes <= plain.size_bytes
    assert [s.encoding for s in light.layers] == ["dense", "dense"]


def test_rounded_zeros_count_like_pruned_ones() -> None:
    """A tensor that rounds almost entirely to zero is stored sparse, not dense."""
    w = torch.zeros(1000)
    w[::50] = 1.0  # 20 large weights; the rest rounds to the zero code at 2 bits
    w[1::50] = 0.01
    from qcore.config import QuantConfig
    from qcore.quant import quantize_with_params

    res = quantize_with_params(w, QuantConfig(bits=2))
    enc = encode_quantized(res.codes, res.qparams, 2, per_channel=False, symmetric=True)
    assert enc.encoding == "relidx"
    assert enc.nbytes() < math.ceil(2 * 1000 / 8)
    assert torch.equal(_decoded(enc, (1000,)), res.values)


# --------------------------------------------------------------- codebook and Huffman codecs


def huffman_codebook_tensor() -> tuple[dict, bytes, torch.Tensor]:
    """A pruned k-means tensor whose codes and relative index are both Huffman coded."""
    from qcore.codecs import encode_codebook
    from qcore.kmeans import kmeans_codebook

    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 100, generator=g)
    mask = w.abs() > 1.5
    cb = kmeans_codebook(w, 4, mask)
    enc = encode_codebook(cb.codes, cb.codebook, 4, mask=mask, entropy="huffman")
    fields = enc.header()
    assert fields["code_coding"] == fields["index_coding"] == "huffman"
    assert enc.encoding == "relidx"
    return fields, enc.encode(), cb.values


def set_bits(blob: bytes, at_bit: int, value: int, width: int) -> bytes:
    """``blob`` with ``width`` bits from bit ``at_bit`` (MSB first) set to ``value``."""
    bits = [(blob[i // 8] >> (7 - i % 8)) & 1 for i in range(8 * len(blob))]
    for j in range(width):
        bits[at_bit + j] = (value >> (width - 1 - j)) & 1
    return bytes(sum(bits[i + k] << (7 - k) for k in range(8)) for i in range(0, len(bits), 8))


def test_codebook_huffman_round_trip_and_sizes() -> None:
    fields, blob, values = huffman_codebook_tensor()
    assert torch.equal(decode(fields, blob, (40, 100), "w"), values)
    # the codebook: float32 per centroid, first in the block
    c = fields["centroids"]
    book = torch.frombuffer(bytearray(blob[: 4 * c]), dtype=torch.float32)
    assert torch.equal(book, torch.unique(values[values != 0]))


def test_hostile_codebook_and_huffman_fields() -> None:
    fields, blob, _ = huffman_codebook_tensor()
    c, a = fields["centroids"], fields["code_symbols"]
    table_at = 8 * 4 * c  # the code table's first bit, after the codebook
    cases = {
        "code length beyond 16": (fields, set_bits(blob, table_at, 31, 5)),
        "table not prefix-free": (fields, set_bits(blob, table_at, 1, 5)),
        "table incomplete": (fields, set_bits(blob, table_at, 16, 5)),
        "index stream past the end": (fields, blob[:-1]),
        "index stream with bytes after": (fields, blob + b"\x00"),
        "codebook larger than 2^bits": ({**fields, "centroids": 17}, blob),
        "codebook size lie": ({**fields, "centroids": c - 1}, blob),
        "codebook size lie up": ({**fields, "centroids": c + 1}, blob),
        "code symbols beyond 2^bits": ({**fields, "code_symbols": 17}, blob),
        "code symbols lie": ({**fields, "code_symbols": a - 1}, blob),
        "code symbols zero": ({**fields, "code_symbols": 0}, blob),
        "unknown code coding": ({**fields, "code_coding": "lzma"}, blob),
        "index symbols beyond 2^width": (
            {**fields, "index_symbols": 2 ** fields["index_width"] + 1}, blob),
        "unknown index coding": ({**fields, "index_coding": "zip"}, blob),
        "kept lie": ({**fields, "kept": fields["kept"] + 1}, blob),
        "empty codebook with weights": ({**fields, "centroids": 0}, blob),
    }  # fmt: skip
    for case, (f, b) in cases.items():
        with pytest.raises(ValueError):
            decode(f, b, (40, 100), "w")
            pytest.fail(case)


def test_codes_beyond_the_codebook_refused() -> None:
    from qcore.codecs import encode_codebook

    codes = torch.tensor([0, 1, 2, 3])
    enc = encode_codebook(codes, torch.tensor([0.5, 1.5, 2.5, 3.5]), 2)
    fields, blob = enc.header(), enc.encode()
    short = {**fields, "centroids": 3}  # the codebook loses an entry; codes reach it
    blob3 = blob[:12] + blob[16:]
    with pytest.raises(ValueError, match="beyond its codebook"):
        decode(short, blob3, (4,), "w")


def test_every_bit_flip_of_a_huffman_tensor_is_refused_or_decodes() -> None:
    """Flipping any one bit gives a ValueError or a tensor of the right shape, never
    another exception (a flip in a centroid or a code is a different, valid tensor)."""
    fields, blob, _ = huffman_codebook_tensor()
    refused = 0
    for bit in range(0, 8 * len(blob), 3):  # every third bit: each block is hit many times
        bad = bytearray(blob)
        bad[bit // 8] ^= 1 << (7 - bit % 8)
        try:
            out = decode(fields, bytes(bad), (40, 100), "w")
        except ValueError:
            refused += 1
        else:
            assert out.shape == (40, 100) and bool(torch.isfinite(out).all())
    assert refused > 0
