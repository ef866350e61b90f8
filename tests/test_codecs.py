"""Tests for qcore.size: packed bytes on hand-computed cases and the relative index."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcore.size import (
    float_bytes,
    packed_weight_size,
    positions_from_stream,
    relative_index,
    relative_index_stream,
)

PROPS = settings(deadline=None, max_examples=50)


def mask_at(n: int, positions: list[int]) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[positions] = True
    return m


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
    if not mask.all():
        assert s.index_bytes == min(math.ceil(n / 8), math.ceil(bits / 8))
        assert s.code_bytes == math.ceil(5 * int(mask.sum()) / 8)
