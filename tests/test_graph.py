"""Tests for qcore.graph: the one runtime every variant, analysis and evaluation runs on."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import Residual, make_bn_model, make_mlp, state_hash
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qcore
from qcore.compress import compress
from qcore.config import CompressionConfig, PruneConfig, QuantConfig
from qcore.evaluate import evaluate
from qcore.graph import Graph, graph_of


@pytest.mark.parametrize("name", qcore.list_models())
def test_graph_equals_float_model_on_every_sample_model(name: str) -> None:
    """No replacements: the graph's logits are the module's, bit for bit."""
    model = qcore.load_model(name)
    x = qcore.load_dataset(qcore.model_info(name).dataset).x[:200]
    with torch.inference_mode():
        assert torch.equal(graph_of(model, fold_bn=False).run(x), model(x))
        folded = qcore.graph.fold_batchnorm(model)
        assert torch.equal(graph_of(model, fold_bn=True).run(x), folded(x))


def test_graph_is_made_once_and_remade_after_a_change(images: torch.Tensor) -> None:
    model = make_bn_model(3)
    g = graph_of(model)
    assert graph_of(model) is g and graph_of(model, fold_bn=False) is not g
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    g2 = graph_of(model)
    assert g2 is not g
    with torch.inference_mode():
        assert torch.allclose(g2.run(images), model(images), atol=1e-5)


def test_replacements_change_only_that_run(images: torch.Tensor) -> None:
    model = make_mlp(1)
    g = graph_of(model)
    before = state_hash(model)
    zero = {"1.weight": torch.zeros_like(g.params["1.weight"])}
    with torch.inference_mode():
        out = g.run(images, zero)
        ref = model[3](torch.relu(model[1].bias.expand(images.shape[0], -1)))
        assert torch.equal(out, ref)
        assert torch.equal(g.run(images), model(images))
    assert state_hash(model) == before
    with pytest.raises(ValueError, match="No tensor named 'nope'"):
        g.run(images, {"nope": torch.zeros(1)})


def test_gradients_flow_through_a_variant_and_float_weights_stay(images: torch.Tensor) -> None:
    model = make_bn_model(2)
    g = graph_of(model)
    before = state_hash(model)
    w = g.params["7.weight"].clone().requires_grad_(True)
    x = images.clone().requires_grad_(True)  # adversarial inputs need input gradients too
    loss = g.run(x, {"7.weight": w}).square().sum()
    loss.backward()
    assert w.grad is not None and float(w.grad.abs().sum()) > 0
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert not any(t.requires_grad for t in g.params.values())
    assert all(t.grad is None for t in g.params.values())
    assert state_hash(model) == before


def test_points_observe_and_fake_quantize_edges(images: torch.Tensor) -> None:
    model = make_bn_model(0)
    g = graph_of(model)
    names = g.point_names()
    assert names[0] == "input"
    assert {"0.input", "3.input", "7.input", "10.input"} <= set(names)
    seen: dict[str, tuple[int, ...]] = {}

    def observer(name):
        def point(t: torch.Tensor) -> torch.Tensor:
            seen[name] = tuple(t.shape)
            return t
        return point

    with torch.inference_mode():
        out = g.run(images, points={n: observer(n) for n in names})
        assert torch.equal(out, g.run(images))  # observers change nothing
        assert seen["input"] == tuple(images.shape) and seen["7.input"] == (images.shape[0], 96)
        rounded = g.run(images, points={"7.input": lambda t: torch.round(t)})
        plain = g.run(images)
    assert not torch.equal(rounded, plain)


def test_points_on_additions() -> None:
    torch.manual_seed(0)
    model = Residual().eval()
    g = graph_of(model)
    adds = [n for n in g.point_names() if n.startswith("add")]
    assert len(adds) == 1
    x = torch.randn(5, 4)
    with torch.inference_mode():
        out = g.run(x, points={adds[0]: torch.zeros_like})
        assert torch.equal(out, model.b(torch.zeros(5, 4)))


def test_untraceable_model_names_the_operation() -> None:
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return self.fc(x)
            return -self.fc(x)

    with pytest.raises(ValueError, match=r"cannot be traced.*`if x\.sum\(\) > 0:`"):
        Graph(Branch().eval())


def test_prefix_reuse_equals_a_whole_run(images: torch.Tensor) -> None:
    model = make_bn_model(4)
    g = graph_of(model)
    new = {"3.weight": g.params["3.weight"] * 0.5}
    plan = g.plan(new)
    assert plan.suffix and all(n in g.nodes for n in plan.suffix)
    with torch.inference_mode():
        _, cache = g.run(images, keep=plan.reads | {g.output})
        assert torch.equal(g.run_suffix(plan, cache, new), g.run(images, new))


def test_variants_of_one_graph_in_threads() -> None:
    """Two sessions run different variants of one shared model at once: no mixing."""
    model = make_bn_model(7)
    x = torch.randn(16, 1, 6, 6)
    variants = [compress(model, CompressionConfig(quant=QuantConfig(bits=b),
                                                  prune=PruneConfig(rate=r)))
                for b, r in ((2, 0.0), (4, 0.5), (8, 0.0))]  # fmt: skip
    assert len({id(v.graph) for v in variants}) == 1  # one shared graph
    with torch.inference_mode():
        expected = [v.model(x) for v in variants]
    errors: list[str] = []

    def run(i: int) -> None:
        with torch.inference_mode():
            for _ in range(40):
                if not torch.equal(variants[i].model(x), expected[i]):
                    errors.append(f"variant {i} saw another variant's weights")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(variants))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_evaluate_runs_on_the_graph_with_the_same_numbers() -> None:
    model = qcore.load_model("digits-mlp")
    data = qcore.load_dataset("digits")
    m = evaluate(model, data)
    with torch.inference_mode():
        logits = model(data.x)
    assert m.accuracy == int((logits.argmax(1) == data.y).sum()) / len(data.y)
    assert round(m.accuracy, 4) == qcore.model_info("digits-mlp").float_accuracy


def test_variant_is_the_one_module_qcore_defines_outside_models() -> None:
    import importlib
    import inspect
    import pkgutil

    found = set()
    for info in pkgutil.iter_modules(qcore.__path__):
        mod = importlib.import_module(f"qcore.{info.name}")
        for _, obj in inspect.getmembers(mod, inspect.isclass):
            if issubclass(obj, nn.Module) and obj.__module__.startswith("qcore.") \
                    and obj.__module__ != "qcore.models":  # fmt: skip
                found.add(f"{obj.__module__}.{obj.__qualname__}")
    assert found == {"qcore.graph.Variant"}


def test_compress_and_load_packed_give_variants_with_the_same_outputs(tmp_path) -> None:
    model = make_bn_model(3)
    cfg = qcore.CompressionConfig(quant=qcore.QuantConfig(bits=4))
    c = qcore.compress(model, cfg)
    qcore.export_packed(c, tmp_path / "m.qpk")
    loaded = qcore.load_packed(tmp_path / "m.qpk", template=model).model
    assert isinstance(c.model, qcore.Variant) and isinstance(loaded, qcore.Variant)
    assert qcore.Variant.of(c) is c.model and qcore.Variant.of(loaded) is loaded
    x = torch.randn(5, 1, 6, 6)
    with torch.no_grad():
        assert torch.equal(c.model(x), loaded(x))
    # the variant's replacements are the dequantized codes; nothing of the model changed
    for r in c.layers:
        assert torch.equal(c.model.weight(f"{r.name}.weight"), r.dequantized)
    with pytest.raises(RuntimeError, match="eval mode only"):
        c.model.train()


def test_gradients_flow_through_variant_tensors_not_the_shared_ones() -> None:
    model = nn.Sequential(nn.Linear(3, 2)).eval()
    g = qcore.graph_of(model)
    w = torch.zeros(2, 3, requires_grad=True)
    v = qcore.Variant(g, lambda: {"0.weight": w * 2})
    v(torch.ones(4, 3)).sum().backward()
    assert torch.equal(w.grad, torch.full((2, 3), 8.0))
    assert all(not t.requires_grad for t in g.params.values())


_VALUES = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, float("inf"), float("-inf"), float("nan")])


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 2), c=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9),
    kh=st.integers(1, 3), kw=st.integers(1, 3), special=st.lists(_VALUES, max_size=6),
    seed=st.integers(0, 2**16), batched=st.booleans(),
)  # fmt: skip
def test_tiled_max_pool_is_max_pool2d_value_for_value(n, c, h, w, kh, kw, special, seed,
                                                       batched) -> None:  # fmt: skip
    """The graph runs a MaxPool2d over non-overlapping tiles as the maximum of strided
    slices: the same values as the module, NaN and infinities included, odd sizes cropped
    as max_pool2d crops them; an input smaller than a tile gets max_pool2d's own error."""
    from qcore.graph import _max_of_tiles, _tile_of

    pool = nn.MaxPool2d((kh, kw))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, c, h, w) if batched else (c, h, w), generator=gen).round(decimals=1)
    flat = x.view(-1)
    for i, v in enumerate(special):  # ties, signed zeros, NaN and infinities at known places
        flat[(i * 7) % flat.numel()] = v
    tile = _tile_of(pool)
    if (kh, kw) == (1, 1):
        assert tile is None  # nothing to gain: the module runs
        return
    assert tile == (kh, kw)
    if h < kh or w < kw:
        with pytest.raises(RuntimeError):
            pool(x)
        with pytest.raises(RuntimeError):
            _max_of_tiles(x, tile, pool)
        return
    with torch.inference_mode():
        torch.testing.assert_close(_max_of_tiles(x, tile, pool), pool(x), rtol=0, atol=0,
                                   equal_nan=True)  # fmt: skip


def test_pools_that_do_not_tile_run_as_the_module() -> None:
    from qcore.graph import _tile_of

    assert _tile_of(nn.MaxPool2d(2)) == (2, 2)
    assert _tile_of(nn.MaxPool2d((2, 3))) == (2, 3)
    for pool in (nn.MaxPool2d(3, stride=2), nn.MaxPool2d(2, padding=1),
                 nn.MaxPool2d(2, dilation=2), nn.MaxPool2d(2, ceil_mode=True),
                 nn.MaxPool2d(2, return_indices=True), nn.AvgPool2d(2)):  # fmt: skip
        assert _tile_of(pool) is None, pool


def test_a_pool_with_a_gradient_to_carry_runs_the_module() -> None:
    """Training through a tiled pool sends each tile's gradient to one input, as
    max_pool2d does (the element-wise maximum would split it between ties)."""
    from qcore.graph import _max_of_tiles

    pool = nn.MaxPool2d(2)
    x = torch.zeros(1, 1, 2, 2, requires_grad=True)  # a four-way tie
    _max_of_tiles(x, (2, 2), pool).sum().backward()
    assert x.grad.sum().item() == 1.0 and int((x.grad != 0).sum()) == 1
