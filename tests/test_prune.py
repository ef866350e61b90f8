"""Tests for qcore.prune and PruneConfig: exact counts, magnitude order, channels, global."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcore.config import PruneConfig
from qcore.prune import (
    channel_mask,
    global_masks,
    layer_mask,
    magnitude_mask,
    prune_count,
    prune_tensor,
)

PROPS = settings(deadline=None, max_examples=50)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("rate", "n", "k"),
    [(0.29, 100, 29), (0.57, 100, 57), (0.58, 100, 58), (0.1, 10, 1), (0.3, 10, 3),
     (0.7, 10, 7), (0.5, 3, 1), (0.99, 10, 9), (0.0, 50, 0), (0.999, 1000, 999),
     (0.33, 3, 0), (0.9, 1, 0), (0.35, 20, 7), (0.15, 20, 3)],
)
def test_prune_count_is_floor(rate: float, n: int, k: int) -> None:
    assert prune_count(rate, n) == k


def test_prune_count_decimal_rates() -> None:
    for pct in range(100):
        assert prune_count(pct / 100, 100) == pct
        assert prune_count(pct / 100, 1000) == 10 * pct


def test_docstring_case() -> None:
    out = prune_tensor(torch.tensor([0.5, -0.1, 2.0, -3.0]), PruneConfig(rate=0.5))
    assert out.tolist() == [0.0, 0.0, 2.0, -3.0]


@PROPS
@given(
    n=st.integers(1, 300),
    rate=st.floats(0.0, 0.999),
    seed=st.integers(0, 10_000),
)
def test_property_exact_count_and_largest_kept(n: int, rate: float, seed: int) -> None:
    w = randn(n, seed=seed)
    before = w.clone()
    mask = magnitude_mask(w, rate)
    assert torch.equal(w, before)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert int((~mask).sum()) == math.floor(rate * n + 1e-9)
    out = prune_tensor(w, PruneConfig(rate=rate))
    assert int((out == 0).sum()) == int((~mask).sum())
    assert torch.equal(out[mask], w[mask])
    if mask.any() and (~mask).any():
        assert float(w[mask].abs().min()) >= float(w[~mask].abs().max())


def test_ties_are_broken_by_position_and_count_is_exact() -> None:
    w = torch.tensor([1.0, -1.0, 1.0, 1.0, 2.0, -1.0])
    mask = magnitude_mask(w, 0.5)
    assert mask.tolist() == [False, False, False, True, True, True]


def test_magnitude_mask_on_matrix_prunes_29_of_100() -> None:
    w = randn(10, 10, seed=1)
    out = prune_tensor(w, PruneConfig(rate=0.29))
    assert int((out == 0).sum()) == 29
    kept = w.abs().reshape(-1).sort().values[29:]
    assert torch.equal(out.abs().reshape(-1).sort().values[29:], kept)


def test_structured_removes_whole_channels_by_l2_norm() -> None:
    w = randn(8, 3, 2, 2, seed=2)
    scale = torch.tensor([5.0, 0.1, 3.0, 0.2, 4.0, 0.3, 2.0, 1.0])
    w = w * scale[:, None, None, None]
    norms = w.reshape(8, -1).norm(dim=1)
    cfg = PruneConfig(rate=0.4, structured=True)  # floor(0.4 * 8) = 3 channels
    out = prune_tensor(w, cfg)
    removed = [c for c in range(8) if torch.all(out[c] == 0)]
    assert len(removed) == 3
    assert sorted(removed) == sorted(norms.argsort()[:3].tolist())
    for c in range(8):
        if c not in removed:
            assert torch.equal(out[c], w[c])
    mask = channel_mask(w, 0.4)
    assert mask.shape == w.shape
    assert torch.equal(layer_mask(w, cfg), mask)


def test_structured_uses_l2_not_l1() -> None:
    # channel 0 has the larger L1 norm (4 * 1 = 4) but the smaller L2 norm (2 < 3)
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    assert channel_mask(w, 0.5).tolist() == [[False] * 4, [True] * 4]


def test_structured_on_vector_falls_back_to_unstructured() -> None:
    w = torch.tensor([0.1, -2.0, 0.3, 4.0])
    assert channel_mask(w, 0.5).tolist() == [False, True, False, True]


def test_global_unstructured_ranks_across_tensors() -> None:
    a = torch.tensor([[0.1, 0.2], [5.0, 6.0]])
    b = torch.tensor([0.3, 0.05, 7.0, 8.0, 0.4, 9.0])
    masks = global_masks({"a": a, "b": b}, PruneConfig(rate=0.5, scope="global"))
    # 10 weights, floor(0.5 * 10) = 5 smallest: 0.05, 0.1, 0.2, 0.3, 0.4
    assert masks["a"].tolist() == [[False, False], [True, True]]
    assert masks["b"].tolist() == [False, False, True, True, False, True]


@PROPS
@given(
    sizes=st.lists(st.integers(1, 60), min_size=1, max_size=4),
    rate=st.floats(0.0, 0.99),
    seed=st.integers(0, 10_000),
)
def test_property_global_exact_total_and_order(sizes: list[int], rate: float, seed: int) -> None:
    weights = {f"l{i}": randn(n, seed=seed + i) * (i + 1) for i, n in enumerate(sizes)}
    copies = {k: v.clone() for k, v in weights.items()}
    masks = global_masks(weights, PruneConfig(rate=rate, scope="global"))
    for k in weights:
        assert torch.equal(weights[k], copies[k])
    total = sum(sizes)
    assert sum(int((~m).sum()) for m in masks.values()) == prune_count(rate, total)
    kept = torch.cat([weights[k][masks[k]].abs() for k in weights])
    pruned = torch.cat([weights[k][~masks[k]].abs() for k in weights])
    if kept.numel() and pruned.numel():
        assert float(kept.min()) >= float(pruned.max())


def test_global_structured_ranks_channels_by_rms() -> None:
    # a: 2 channels of 4 weights, b: 2 channels of 1 weight
    a = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.1, 0.1, 0.1, 0.1]])  # rms 1, 0.1
    b = torch.tensor([[1.5], [0.5]])  # rms 1.5, 0.5 (a[0] has the larger L2 norm, 2)
    masks = global_masks({"a": a, "b": b}, PruneConfig(rate=0.5, structured=True,
                                                       scope="global"))
    assert masks["a"].tolist() == [[True] * 4, [False] * 4]
    assert masks["b"].tolist() == [[True], [False]]


def _brute_force_global_channels(ws: dict, rate: float) -> dict[str, list[bool]]:
    """The documented rule, one channel at a time: rank every channel by RMS (ties by layer
    then channel), skip each layer's last-ranked channel, remove while fewer than
    floor(rate * total) weights are gone."""
    chans = []  # (rms, layer index, channel, fan-in)
    for i, w in enumerate(ws.values()):
        rows = w.reshape(w.shape[0], -1).float()
        rms = (rows.norm(dim=1) / math.sqrt(rows.shape[1])).tolist()  # float32, as ranked
        chans += [(r, i, c, rows.shape[1]) for c, r in enumerate(rms)]
    ranked = sorted(chans, key=lambda t: t[0])  # Python's sort is stable: ties by position
    last = {i: max(k for k, t in enumerate(ranked) if t[1] == i) for i in range(len(ws))}
    keep = {name: [True] * w.shape[0] for name, w in ws.items()}
    names = list(ws)
    target, removed = prune_count(rate, sum(w.numel() for w in ws.values())), 0
    for k, (_, i, c, fan_in) in enumerate(ranked):
        if k == last[i] or removed >= target:
            continue
        keep[names[i]][c] = False
        removed += fan_in
    return keep


def _kept_rows(m: torch.Tensor) -> list[bool]:
    rows = m.reshape(m.shape[0], -1)
    assert torch.all(rows.all(dim=1) | (~rows).all(dim=1))  # whole channels only
    return rows.all(dim=1).tolist()


def test_global_structured_counts_weights_not_channels() -> None:
    # a: 6 channels of 27 weights, b: 10 channels of 20; 362 weights in all, so a rate of
    # 0.3 removes channels until floor(0.3 * 362) = 108 weights are gone (the old rule
    # removed floor(0.3 * 16) = 4 channels, whatever their size)
    ws = {"a": randn(6, 3, 3, 3, seed=3), "b": randn(10, 20, seed=4)}
    masks = global_masks(ws, PruneConfig(rate=0.3, structured=True, scope="global"))
    expected = _brute_force_global_channels(ws, 0.3)
    assert {k: _kept_rows(m) for k, m in masks.items()} == expected
    removed = sum(int((~m).sum()) for m in masks.values())
    last_fan_in = 27 if not all(expected["a"]) else 20
    assert 108 <= removed < 108 + last_fan_in


def test_global_structured_hand_counts() -> None:
    # RMS: a = (1, 0.3, 0.25) with fan-in 4, b = (3, 0.5, 0.2) with fan-in 1, c = (2, 0.1)
    # with fan-in 10; 35 weights. Ranked: c1 0.1, b2 0.2, a2 0.25, a1 0.3, b1 0.5, a0 1,
    # c0 2, b0 3; c1 is c's last channel but one and c0 its last (never removed).
    a = torch.tensor([[1.0] * 4, [0.3] * 4, [0.25] * 4])
    b = torch.tensor([[3.0], [0.5], [0.2]])
    c = torch.tensor([[2.0] * 10, [0.1] * 10])
    ws = {"a": a, "b": b, "c": c}

    def kept(rate: float) -> dict[str, list[bool]]:
        masks = global_masks(ws, PruneConfig(rate=rate, structured=True, scope="global"))
        return {k: _kept_rows(m) for k, m in masks.items()}

    # floor(0.02 * 35) = 0: nothing
    assert kept(0.02) == {"a": [True] * 3, "b": [True] * 3, "c": [True] * 2}
    # floor(0.1 * 35) = 3: c1 (10 weights) overshoots by 7 < 10
    assert kept(0.1) == {"a": [True] * 3, "b": [True] * 3, "c": [True, False]}
    # floor(0.4 * 35) = 14: c1 (10), b2 (11), a2 (15)
    assert kept(0.4) == {"a": [True, True, False], "b": [True, True, False],
                         "c": [True, False]}
    # floor(0.5 * 35) = 17: + a1 (19)
    assert kept(0.5) == {"a": [True, False, False], "b": [True, True, False],
                         "c": [True, False]}
    # floor(0.99 * 35) = 34: everything but each layer's last channel (20 weights), short
    # of the target because a layer always keeps a channel
    assert kept(0.99) == {"a": [True, False, False], "b": [True, False, False],
                          "c": [True, False]}


@PROPS
@given(
    shapes=st.lists(st.tuples(st.integers(1, 8), st.integers(1, 30)), min_size=1, max_size=4),
    rate=st.floats(0.0, 0.9999),
    seed=st.integers(0, 10_000),
)
def test_property_global_structured(shapes: list, rate: float, seed: int) -> None:
    ws = {f"l{i}": randn(c, k, seed=seed + i) * (i + 1) for i, (c, k) in enumerate(shapes)}
    copies = {k: v.clone() for k, v in ws.items()}
    masks = global_masks(ws, PruneConfig(rate=rate, structured=True, scope="global"))
    assert all(torch.equal(ws[k], copies[k]) for k in ws)
    kept = {k: _kept_rows(m) for k, m in masks.items()}
    assert kept == _brute_force_global_channels(ws, rate)
    assert all(any(v) for v in kept.values())  # every layer keeps a channel
    target = prune_count(rate, sum(w.numel() for w in ws.values()))
    removed = sum(int((~m).sum()) for m in masks.values())
    removable = sum(w.numel() - w.shape[1] for w in ws.values())
    largest_fan_in = max(k for _, k in shapes)
    assert min(target, removable) <= removed < target + largest_fan_in or removed == 0 == target


def test_structured_never_removes_a_layers_last_channel() -> None:
    # floor(0.9999999999 * 3 + 1e-9) = 3 channels of 3; the strongest one stays
    w = torch.tensor([[0.1, 0.1], [5.0, 5.0], [1.0, 1.0]])
    out = prune_tensor(w, PruneConfig(rate=0.9999999999, structured=True))
    assert out.tolist() == [[0.0, 0.0], [5.0, 5.0], [0.0, 0.0]]
    masks = global_masks({"w": w, "v": torch.ones(4, 2)},
                         PruneConfig(rate=0.9999999999, structured=True, scope="global"))
    assert _kept_rows(masks["w"]) == [False, True, False]
    assert _kept_rows(masks["v"]) == [False, False, False, True]  # last of equals kept


def test_mnist_cnn_global_structured_half_of_the_weights() -> None:
    """``?bits=float&prune=0.5&structured=true&scope=global`` used to zero 94% of the
    weights and remove fc1 entirely (half the channels, most of them fc1's)."""
    import qcore
    from qcore.compress import compress
    from qcore.config import CompressionConfig

    try:
        model = qcore.load_model("mnist-cnn")
    except ValueError as exc:
        pytest.skip(f"sample model not available: {exc}")
    c = compress(model, CompressionConfig(quant=None, prune=PruneConfig(
        0.5, structured=True, scope="global")))
    total = sum(math.prod(s.shape) for s in c.layers)
    removed = sum(int((~s.mask).sum()) for s in c.layers)
    largest_fan_in = max(math.prod(s.shape[1:]) for s in c.layers)  # fc1: 3136
    assert total // 2 <= removed < total // 2 + largest_fan_in
    assert abs(c.sparsity - 0.5) < largest_fan_in / total
    for s in c.layers:
        assert bool(s.mask.reshape(s.shape[0], -1).all(dim=1).any()), s.name


def test_global_empty() -> None:
    assert global_masks({}, PruneConfig(rate=0.5, scope="global")) == {}


def test_prune_tensor_does_not_modify_input_and_zero_rate_is_identity() -> None:
    w = randn(5, 5, seed=5).requires_grad_(True)
    before = w.detach().clone()
    out = prune_tensor(w, PruneConfig(rate=0.6, structured=True))
    assert torch.equal(w.detach(), before)
    assert int((out == 0).all(dim=1).sum()) == 3
    assert torch.equal(prune_tensor(w, PruneConfig()), before)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rate=1.5), "at least 0 and below 1"),
        (dict(rate=-0.1), "at least 0 and below 1"),
        (dict(rate=1.0), "1 would remove every weight"),
        (dict(rate=float("nan")), "finite"),
        (dict(rate="0.5"), "finite"),
        (dict(scope="model"), "scope must be one of layer, global"),
    ],
)
def test_bad_prune_config_raises(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PruneConfig(**kwargs)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    rate=st.floats(0.0, 0.99),
    levels=st.integers(1, 6),
    seed=st.integers(0, 10_000),
)
def test_selection_matches_a_stable_sort_even_with_many_ties(n, rate, levels, seed):
    """Two ways to pick the k smallest agree: linear-time selection and a stable argsort."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-levels, levels + 1, (n,), generator=g).float()  # many equal |w|
    k = prune_count(rate, n)
    expected = torch.ones(n, dtype=torch.bool)
    expected[torch.argsort(w.abs(), stable=True)[:k]] = False
    assert torch.equal(magnitude_mask(w, rate), expected)
