"""Tests for qcore.huffman and Huffman coding in the codecs: prefix-free complete codes,
exact round trips, never larger than fixed width, and hostile tables refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcore import huffman
from qcore.codecs import decode, encode_codebook, encode_float, encode_quantized
from qcore.quant import QuantConfig, quantize_with_params

PROPS = settings(deadline=None, max_examples=80)

symbol_lists = st.lists(st.integers(0, 40), min_size=1, max_size=400)


def bit_strings(lengths: np.ndarray) -> dict[int, str]:
    codes = huffman.canonical_codes(lengths)
    return {s: format(int(codes[s]), f"0{int(lengths[s])}b")
            for s in range(lengths.size) if lengths[s] > 0}  # fmt: skip


@PROPS
@given(symbols=symbol_lists)
def test_codes_are_prefix_free_and_round_trip(symbols: list[int]) -> None:
    x = np.array(symbols)
    counts = np.bincount(x)
    lengths = huffman.code_lengths(counts)
    assert (lengths[counts > 0] > 0).all() and (lengths[counts == 0] == 0).all()
    assert lengths.max() <= huffman.MAX_CODE_LENGTH
    huffman.check_lengths(lengths, "t")  # complete (or one 1-bit code)
    words = sorted(bit_strings(lengths).values())
    for a, b in zip(words, words[1:], strict=False):  # sorted: a prefix sits just before
        assert not b.startswith(a)
    data = huffman.encode(x, lengths)
    bits = huffman.encoded_bits(counts, lengths)
    assert len(data) == math.ceil(bits / 8)
    out, used = huffman.decode(data, lengths, x.size)
    assert out.tolist() == symbols and used == bits


@PROPS
@given(symbols=symbol_lists)
def test_huffman_is_optimal_within_one_bit_of_the_entropy(symbols: list[int]) -> None:
    counts = np.bincount(np.array(symbols))
    lengths = huffman.code_lengths(counts)
    bits = huffman.encoded_bits(counts, lengths)
    p = counts[counts > 0] / counts.sum()
    h = float(-(p * np.log2(p)).sum()) * counts.sum()
    n = len(symbols)
    assert h - 1e-6 <= bits <= h + n + 1e-6  # Shannon: H <= L < H + 1 per symbol
    width = max(1, int(np.max(symbols)).bit_length())
    assert bits <= n * width  # never longer than fixed width


def test_hand_computed_code() -> None:
    counts = np.array([5, 1, 1, 2])
    lengths = huffman.code_lengths(counts)
    assert lengths.tolist() == [1, 3, 3, 2]
    assert bit_strings(lengths) == {0: "0", 3: "10", 1: "110", 2: "111"}
    assert huffman.encode(np.array([0, 3, 1, 0]), lengths) == bytes([0b01011000])


def test_one_symbol_and_length_limit() -> None:
    lengths = huffman.code_lengths(np.array([0, 0, 7]))
    assert lengths.tolist() == [0, 0, 1]
    data = huffman.encode(np.array([2] * 7), lengths)
    assert data == b"\x00" and huffman.decode(data, lengths, 7)[0].tolist() == [2] * 7
    counts = np.array([2**i for i in range(30)])  # Huffman depth 29 without a limit
    lengths = huffman.code_lengths(counts)
    assert lengths.max() == huffman.MAX_CODE_LENGTH
    huffman.check_lengths(lengths, "t")
    x = np.repeat(np.arange(30), np.minimum(counts, 50))
    out, _ = huffman.decode(huffman.encode(x, lengths), lengths, x.size)
    assert out.tolist() == x.tolist()


@pytest.mark.parametrize(("lengths", "message"), [
    ([1, 1, 1], "not a complete prefix code"),  # over-subscribed: not prefix-free
    ([1, 2, 0], "not a complete prefix code"),  # incomplete
    ([17, 1, 0], "beyond 16 bits"),
    ([0, 0], "empty code table"),
    ([2, 0], "one-symbol code longer than 1 bit"),
])  # fmt: skip
def test_bad_tables_refused(lengths: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        huffman.check_lengths(np.array(lengths), "The table")


def test_truncated_stream_refused() -> None:
    lengths = huffman.code_lengths(np.array([3, 1, 1]))
    data = huffman.encode(np.array([0, 1, 2, 0, 1]), lengths)
    with pytest.raises(ValueError, match="ends"):
        huffman.decode(data, lengths, 40)


def test_escapes_past_the_limit_refused_and_long_streams_decode_in_chunks() -> None:
    lengths = huffman.code_lengths(np.array([1, 9]))  # symbol 1 (the escape) is "1"
    data = b"\xff" * 4096  # 32768 escapes, never a terminal entry
    with pytest.raises(ValueError, match="more codes than"):
        huffman.decode(data, lengths, 1, escape=1, limit=100)
    x = np.random.default_rng(0).integers(0, 5, 300_000)  # several lookup chunks of bits
    lengths = huffman.code_lengths(np.bincount(x))
    out, used = huffman.decode(huffman.encode(x, lengths), lengths, x.size)
    assert np.array_equal(out, x) and used == huffman.encoded_bits(np.bincount(x), lengths)


@PROPS
@given(seed=st.integers(0, 10_000), bits=st.integers(1, 9), rate=st.floats(0.0, 0.97),
       per_channel=st.booleans(), symmetric=st.booleans())  # fmt: skip
def test_codec_never_larger_than_fixed_width_and_round_trips(
    seed, bits, rate, per_channel, symmetric
) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 30, generator=g)
    mask = torch.rand(12, 30, generator=g) >= rate
    cfg = QuantConfig(bits=bits, per_channel=per_channel, symmetric=symmetric)
    res = quantize_with_params(w, cfg, mask=mask)
    codes = res.codes
    if bits > 1:
        zp = res.qparams.zero_point.to(codes.dtype)[:, None]
        codes = torch.where(mask.reshape(zp.numel(), -1), codes.reshape(zp.numel(), -1),
                            zp).reshape(codes.shape)  # fmt: skip
    args = dict(per_channel=res.per_channel, symmetric=symmetric, mask=mask)
    fixed = encode_quantized(codes, res.qparams, bits, **args)
    coded = encode_quantized(codes, res.qparams, bits, **args, entropy="huffman")
    table = coded.bytes_of("table")
    assert coded.nbytes() <= fixed.nbytes()
    # the coded streams alone are never longer than fixed-width ones beyond the table
    assert coded.nbytes() - table <= fixed.nbytes()
    for enc in (fixed, coded):
        blob = enc.encode()
        assert len(blob) == enc.nbytes()
        assert torch.equal(decode(enc.header(), blob, (12, 30), "w"), res.values)


@PROPS
@given(seed=st.integers(0, 10_000), bits=st.integers(1, 6), rate=st.floats(0.0, 0.99))
def test_codebook_and_float_codecs_round_trip_with_huffman(seed, bits, rate) -> None:
    from qcore.kmeans import kmeans_codebook

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 50, generator=g)
    mask = torch.rand(8, 50, generator=g) >= rate
    cb = kmeans_codebook(w, bits, mask)
    for entropy in (None, "huffman"):
        for enc in (encode_codebook(cb.codes, cb.codebook, bits, mask=mask, entropy=entropy),
                    encode_float(cb.values, entropy)):  # fmt: skip
            blob = enc.encode()
            assert len(blob) == enc.nbytes()
            assert torch.equal(decode(enc.header(), blob, (8, 50), "w"), cb.values)
    plain = encode_codebook(cb.codes, cb.codebook, bits, mask=mask)
    coded = encode_codebook(cb.codes, cb.codebook, bits, mask=mask, entropy="huffman")
    assert coded.nbytes() <= plain.nbytes()
