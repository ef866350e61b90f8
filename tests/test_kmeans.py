"""Tests for qcore.kmeans and k-means weight sharing through compress: at most 2^b shared
values, pruned weights exactly zero, already-shared layers kept exactly, and the centroids
against a plain Python Lloyd's algorithm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_bn_model, make_mlp
from hypothesis import given, settings
from hypothesis import strategies as st

from qcore.compress import compress
from qcore.config import CompressionConfig, PruneConfig, QuantConfig
from qcore.graph import param_key
from qcore.kmeans import MAX_ITERATIONS, kmeans_codebook

PROPS = settings(deadline=None, max_examples=60)

weights = st.lists(
    st.floats(-4.0, 4.0, allow_nan=False, width=32), min_size=1, max_size=300
).map(lambda xs: torch.tensor(xs, dtype=torch.float32))


def oracle_lloyd(x: list[float], k: int) -> list[float]:
    """Lloyd's algorithm written plainly: linear initialisation over [min, max], nearest
    centroid with ties to the lower, empty clusters keep their place, until stable."""
    xs = sorted(float(v) for v in x)
    lo, hi = xs[0], xs[-1]
    c = [lo + (hi - lo) * i / (k - 1) for i in range(k)] if k > 1 else [lo]
    assign = None
    for _ in range(MAX_ITERATIONS + 1):
        new = []
        for v in xs:
            best = 0
            for j in range(1, k):  # sorted centroids: move up while strictly nearer
                if abs(v - c[j]) < abs(v - c[best]):
                    best = j
            new.append(best)
        if new == assign:
            break
        assign = new
        sums, counts = [0.0] * k, [0] * k
        for v, j in zip(xs, assign, strict=True):
            sums[j] += v
            counts[j] += 1
        c = sorted(sums[j] / counts[j] if counts[j] else c[j] for j in range(k))
    used = sorted({c[j] for j in assign})
    return used


@PROPS
@given(w=weights, bits=st.integers(1, 5), data=st.data())
def test_at_most_2_to_the_b_values_and_pruned_exactly_zero(w, bits, data) -> None:
    keep = data.draw(st.lists(st.booleans(), min_size=w.numel(), max_size=w.numel()))
    mask = torch.tensor(keep)
    before = w.clone()
    cb = kmeans_codebook(w, bits, mask)
    assert torch.equal(w, before)  # never changed
    assert cb.codebook.numel() <= 2**bits
    assert cb.codebook.dtype == torch.float32
    assert bool((cb.codebook[1:] > cb.codebook[:-1]).all())  # sorted, distinct
    assert bool((cb.values[~mask] == 0).all())
    kept = cb.values[mask]
    assert torch.unique(kept).numel() <= 2**bits
    if mask.any():
        assert torch.equal(kept, cb.codebook[cb.codes[mask].long()])
        # every centroid is used by some kept weight
        assert set(cb.codes[mask].tolist()) == set(range(cb.codebook.numel()))
        # each weight sits at its nearest centroid
        dist = (w[mask][:, None] - cb.codebook[None, :]).abs()
        assert torch.equal(dist.min(dim=1).values, (w[mask] - kept).abs())
    else:
        assert cb.codebook.numel() == 0


@PROPS
@given(w=weights, bits=st.integers(1, 5))
def test_shared_weights_compress_to_themselves(w, bits) -> None:
    first = kmeans_codebook(w, bits)
    again = kmeans_codebook(first.values, bits)
    assert torch.equal(again.values, first.values)
    assert torch.equal(again.codebook, first.codebook)


@PROPS
@given(w=weights, bits=st.integers(1, 4))
def test_centroids_match_a_plain_lloyd(w, bits) -> None:
    cb = kmeans_codebook(w, bits)
    if torch.unique(w).numel() <= 2**bits:  # the values themselves, exactly
        assert cb.codebook.tolist() == torch.unique(w).tolist()
        return
    want = oracle_lloyd(w.tolist(), 2**bits)
    np.testing.assert_allclose(cb.codebook.numpy(), np.array(want, dtype=np.float32),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_hand_computed_and_one_bit() -> None:
    w = torch.tensor([0.0, 0.1, 0.9, 1.0, 5.0])
    cb = kmeans_codebook(w, 1)  # init 0 and 5: {0, .1, .9, 1} and {5}
    assert cb.codebook.tolist() == [0.5, 5.0]
    assert cb.codes.tolist() == [0, 0, 0, 0, 1]
    cb = kmeans_codebook(torch.tensor([-1.0, -0.9, 0.8, 1.2]), 1)  # two centroids at 1 bit
    assert cb.codebook.tolist() == pytest.approx([-0.95, 1.0])
    # already at most 2^b distinct values: they are the codebook
    cb = kmeans_codebook(torch.tensor([0.25, -3.0, 0.25, 7.5]), 2)
    assert cb.codebook.tolist() == [-3.0, 0.25, 7.5]
    assert cb.values.tolist() == [0.25, -3.0, 0.25, 7.5]


def test_deterministic_and_linear_init_covers_the_range() -> None:
    w = torch.randn(50, 40, generator=torch.Generator().manual_seed(3))
    a, b = kmeans_codebook(w, 3), kmeans_codebook(w, 3)
    assert torch.equal(a.codebook, b.codebook) and torch.equal(a.codes, b.codes)
    # the extreme weights keep centroids near them (linear init gives them clusters)
    assert float(a.codebook[0]) < float(w.min()) / 2
    assert float(a.codebook[-1]) > float(w.max()) / 2


def test_everything_pruned_and_bad_bits() -> None:
    cb = kmeans_codebook(torch.ones(6), 2, torch.zeros(6, dtype=torch.bool))
    assert cb.codebook.numel() == 0 and cb.values.tolist() == [0.0] * 6
    with pytest.raises(ValueError, match="1 to 16 bits"):
        kmeans_codebook(torch.ones(3), 0)


def test_config_refuses_per_channel_codebooks() -> None:
    with pytest.raises(ValueError, match="turn per-channel scales off"):
        QuantConfig(bits=4, codebook="kmeans", per_channel=True)
    with pytest.raises(ValueError, match="codebook must be one of"):
        QuantConfig(codebook="lloyd")
    cfg = QuantConfig(bits=4, codebook="kmeans")
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("bits", [1, 2, 4, 5])
@pytest.mark.parametrize("prune", [None, PruneConfig(rate=0.6, scope="global")])
def test_compress_shares_weights_per_layer(bits: int, prune) -> None:
    model = make_bn_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    c = compress(model, CompressionConfig(quant=QuantConfig(bits=bits, codebook="kmeans"),
                                          prune=prune))  # fmt: skip
    for k, v in model.state_dict().items():  # the model is never changed
        assert torch.equal(v, before[k])
    for r in c.layers:
        w = r.dequantized
        assert r.qparams is None and r.codebook is not None and r.bits == bits
        assert r.encoded.kind == "codebook"
        if r.mask is not None:
            assert bool((w[~r.mask] == 0).all())
            kept = w[r.mask]
        else:
            kept = w.reshape(-1)
        assert torch.unique(kept).numel() <= 2**bits
        assert torch.equal(torch.unique(kept), r.codebook)
        # the codebook is counted: float32 per centroid
        assert r.size_parts["codebook_bytes"] == 4 * r.codebook.numel()


def test_already_shared_model_recompresses_to_identical_weights() -> None:
    """A model whose weights are shared (as after centroid fine-tuning) compresses to the
    very same weights again, pruned zeros included."""
    model = make_mlp(1)
    cfg = CompressionConfig(quant=QuantConfig(bits=3, codebook="kmeans"),
                            prune=PruneConfig(rate=0.5, scope="global"))  # fmt: skip
    first = compress(model, cfg)
    shared = make_mlp(1)
    with torch.no_grad():
        for r in first.layers:
            shared.get_parameter(param_key(r.name, "weight")).copy_(r.dequantized)
    again = compress(shared, cfg)
    for a, b in zip(first.layers, again.layers, strict=True):
        assert torch.equal(a.dequantized, b.dequantized), a.name
        assert torch.equal(a.codebook, b.codebook)
