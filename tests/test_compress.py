"""Tests for qcore.fold and qcore.compress: folding, purity, no copies, stats, sizes."""

from __future__ import annotations

import copy
import math
import struct

import pytest
import torch
from conftest import make_bn_model, make_mlp, state_hash
from torch import nn

from qcore.compress import compress, sqnr_db
from qcore.config import CompressionConfig, PruneConfig, QuantConfig
from qcore.export import MAGIC, PREFIX_BYTES, export_packed
from qcore.fold import fold_copy, weight_layers
from qcore.graph import fold_batchnorm
from qcore.quant import quantize_with_params

Q4 = QuantConfig(bits=4)


def cfg(quant=Q4, prune=None, **kw) -> CompressionConfig:
    return CompressionConfig(quant=quant, prune=prune, **kw)


# ---------------------------------------------------------------- BatchNorm folding


def test_fold_same_outputs_and_removes_bn(bn_model: nn.Module, images: torch.Tensor) -> None:
    before = state_hash(bn_model)
    folded = fold_batchnorm(bn_model)
    assert folded is not bn_model
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert list(weight_layers(folded)) == list(weight_layers(bn_model)) == ["0", "3", "7", "10"]
    with torch.no_grad():
        assert torch.allclose(folded(images), bn_model(images), atol=1e-5)
    assert state_hash(bn_model) == before
    assert fold_batchnorm(bn_model) is folded  # cached
    assert not any(p.requires_grad for p in folded.parameters())


def test_fold_skips_conv_used_twice(twice_used: nn.Module, images: torch.Tensor) -> None:
    before = state_hash(twice_used)
    folded = fold_batchnorm(twice_used)
    names = dict(folded.named_modules())
    assert isinstance(names.get("bn"), nn.BatchNorm2d)  # conv output used twice: kept
    assert "bn2" not in names  # folded into conv2
    with torch.no_grad():
        assert torch.allclose(folded(images), twice_used(images), atol=1e-5)
    assert state_hash(twice_used) == before
    c = compress(twice_used, cfg(quant=None))
    with torch.no_grad():
        assert torch.allclose(c.model(images), twice_used(images), atol=1e-5)


def test_fold_without_bn_returns_model(mlp: nn.Module) -> None:
    assert fold_batchnorm(mlp) is mlp


def test_fold_refolds_after_in_place_change(images: torch.Tensor) -> None:
    model = make_bn_model(3)
    first = fold_batchnorm(model)
    with torch.no_grad():
        model[0].weight.mul_(2.0)
        model[1].running_var.mul_(3.0)
    second = fold_batchnorm(model)
    assert second is not first
    with torch.no_grad():
        assert torch.allclose(second(images), model(images), atol=1e-5)
    assert fold_batchnorm(model) is second


# ---------------------------------------------------------------- purity and copies


@pytest.mark.parametrize(
    "config",
    [
        cfg(),
        cfg(QuantConfig(bits=3, per_channel=True, symmetric=False, clip_mode="mse")),
        cfg(QuantConfig(bits=2, rounding="stochastic"), PruneConfig(rate=0.5)),
        cfg(None, PruneConfig(rate=0.5, structured=True)),
        cfg(QuantConfig(bits=1), PruneConfig(rate=0.3, scope="global"), fold_bn=False),
    ],
)
def test_compress_never_changes_model(config: CompressionConfig, images: torch.Tensor) -> None:
    model = make_bn_model(1)
    before = state_hash(model)
    with torch.no_grad():
        out = model(images)
    c = compress(model, config)
    with torch.no_grad():
        c.model(images)
    assert state_hash(model) == before
    # the shared graph holds the float (folded) tensors, not the compressed ones
    float_model = fold_copy(model) if config.fold_bn else model
    assert state_hash(c.graph.module) == state_hash(float_model)
    base_before = state_hash(c.graph.module)
    compress(model, config).model(images)
    assert state_hash(c.graph.module) == base_before
    with torch.no_grad():
        assert torch.equal(model(images), out)
    assert not model.training


def count_deepcopies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = copy.deepcopy

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", counting)
    return calls


def test_no_deepcopy_per_call(monkeypatch: pytest.MonkeyPatch, images: torch.Tensor) -> None:
    model = make_bn_model(2)
    calls = count_deepcopies(monkeypatch)
    compress(model, cfg())
    assert calls[0] >= 1  # the one-off fold
    calls[0] = 0
    for bits in (2, 4, 8):
        c = compress(model, cfg(QuantConfig(bits=bits), PruneConfig(rate=0.2)))
        c.model(images)
    assert calls[0] == 0


def test_no_deepcopy_ever_without_bn(monkeypatch: pytest.MonkeyPatch, images: torch.Tensor) -> None:
    model = make_mlp(2)
    calls = count_deepcopies(monkeypatch)
    for bits in (2, 8):
        compress(model, cfg(QuantConfig(bits=bits), PruneConfig(rate=0.5))).model(images)
    assert calls[0] == 0


# ---------------------------------------------------------------- layers and stats


def test_layer_subset_only_changes_named_layers(bn_model: nn.Module) -> None:
    c = compress(bn_model, cfg(QuantConfig(bits=2), layers=["3", "10"]))
    base = c.graph.module
    state = c.graph.tensors(c.replacements())
    assert set(c.replacements()) == {"3.weight", "10.weight"}
    for name in ("0", "7"):
        assert torch.equal(state[f"{name}.weight"], base.get_submodule(name).weight)
    for name in ("3", "10"):
        assert not torch.equal(state[f"{name}.weight"], base.get_submodule(name).weight)
    assert [s.name for s in c.layers] == ["3", "10"]


def test_duplicate_layer_names_counted_once(mlp: nn.Module) -> None:
    c = compress(mlp, cfg(layers=["1", "1"]))
    assert [s.name for s in c.layers] == ["1"]
    assert c.size_bytes == compress(mlp, cfg(layers=["1"])).size_bytes


def test_unknown_layer_names_known_layers(bn_model: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"'fc'.*weight layers are 0, 3, 7, 10"):
        compress(bn_model, cfg(layers=["fc"]))
    with pytest.raises(ValueError, match=r"Per-layer bits.*'nope'"):
        compress(bn_model, cfg(QuantConfig(layer_bits={"nope": 4})))
    with pytest.raises(ValueError, match="not a single string"):
        CompressionConfig(layers="0")


def test_per_layer_bits_override(bn_model: nn.Module) -> None:
    c = compress(bn_model, cfg(QuantConfig(bits=8, layer_bits={"3": 2, "10": 16})))
    assert [s.bits for s in c.layers] == [8, 2, 8, 16]
    assert c.layer("3").dequantized.unique().numel() <= 3
    # 2 bits per stored code (at 2 bits most codes round to zero, and whole channels do:
    # those are left out, so fewer than all 4 * 6 * 9 codes may be stored)
    enc = c.layer("3").encoded
    assert enc.bytes_of("codes") == math.ceil(2 * enc.fields["kept"] / 8)
    assert enc.fields["kept"] <= 4 * 6 * 9


def test_layer_stats(bn_model: nn.Module) -> None:
    c = compress(bn_model, cfg(QuantConfig(bits=4, per_channel=True), PruneConfig(rate=0.5)))
    folded = fold_batchnorm(bn_model)
    for s in c.layers:
        layer = folded.get_submodule(s.name)
        w = layer.weight.detach()
        assert s.shape == tuple(w.shape)
        assert s.params == w.numel() + layer.bias.numel()
        assert s.bits == 4
        assert s.kind == ("conv" if w.dim() == 4 else "linear")
        assert s.sparsity >= math.floor(0.5 * w.numel()) / w.numel()
        assert s.sparsity == pytest.approx(0.5, abs=0.1)
        q = c.replacements()[f"{s.name}.weight"]
        direct = 10 * math.log10(float((w.double() ** 2).sum())
                                 / float(((w.double() - q.double()) ** 2).sum()))
        assert math.isfinite(s.sqnr_db) and s.sqnr_db == pytest.approx(direct, rel=1e-9)
        assert s.size_bytes == s.encoded.nbytes() + 4 * layer.bias.numel()
        assert s.float_bytes == 4 * s.params
        # the layer's values are exactly the quantizer's under the pruning mask
        mask = s.mask
        ref = quantize_with_params(w, QuantConfig(bits=4, per_channel=True), mask=mask).values
        assert torch.equal(q, ref)
    assert c.layer("7").name == "7"
    with pytest.raises(ValueError, match="layers are 0, 3, 7, 10"):
        c.layer("x")
    assert 0.4 < c.sparsity < 0.6 and math.isfinite(c.mean_sqnr_db)


def test_sizes_add_up(bn_model: nn.Module, tmp_path) -> None:
    c = compress(bn_model, cfg(QuantConfig(bits=4, symmetric=False), PruneConfig(rate=0.3),
                               layers=["0", "7"]))
    folded = fold_batchnorm(bn_model)
    rest = sum(v.numel() for k, v in folded.state_dict().items()
               if not k.startswith(("0.", "7.")))
    assert c.size_bytes == sum(s.size_bytes for s in c.layers) + 4 * rest
    n_params = sum(p.numel() for p in bn_model.parameters())
    n_stats = sum(m.running_mean.numel() + m.running_var.numel() for m in bn_model.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert c.float_size_bytes == 4 * (n_params + n_stats)
    # the packed size is the file's payload: the file less its header
    path = tmp_path / "m.qpk"
    export_packed(c, path)
    data = path.read_bytes()
    (head,) = struct.unpack("<I", data[len(MAGIC) : len(MAGIC) + 4])
    assert len(data) - PREFIX_BYTES - head == c.size_bytes


def test_dense_size_hand_computed(mlp: nn.Module) -> None:
    c = compress(mlp, cfg(QuantConfig(bits=4)))
    # 36*16 and 16*3 weights at 4 bits, one float scale each, biases at 4 bytes
    assert c.size_bytes == (36 * 16 * 4 // 8 + 4 + 16 * 4) + (16 * 3 * 4 // 8 + 4 + 3 * 4)
    assert c.float_size_bytes == 4 * (36 * 16 + 16 + 16 * 3 + 3)
    assert c.ratio == pytest.approx(2572 / 396)  # the two sums above, by hand


def test_no_quant_no_prune_is_float(mlp: nn.Module, images: torch.Tensor) -> None:
    c = compress(mlp, cfg(None))
    with torch.no_grad():
        assert torch.equal(c.model(images), mlp(images))
    assert c.size_bytes == c.float_size_bytes and c.ratio == 1.0
    assert all(s.bits == 32 and s.sqnr_db == math.inf for s in c.layers)
    bn = make_bn_model(4)
    c = compress(bn, cfg(None, fold_bn=False))
    with torch.no_grad():
        assert torch.equal(c.model(images), bn(images))
    assert c.size_bytes == c.float_size_bytes
    c = compress(bn, cfg(None))
    with torch.no_grad():
        assert torch.allclose(c.model(images), bn(images), atol=1e-5)


def test_prune_only(mlp: nn.Module) -> None:
    c = compress(mlp, cfg(None, PruneConfig(rate=0.25)))
    w = mlp[1].weight.detach()
    out = c.replacements()["1.weight"]
    assert int((out == 0).sum()) == 144  # floor(0.25 * 576)
    assert torch.equal(out[out != 0], w[out != 0])
    s = c.layer("1")
    assert s.bits == 32 and s.encoded.bytes_of("values") == 4 * 432


def test_global_scope_exact_total(bn_model: nn.Module) -> None:
    c = compress(bn_model, cfg(None, PruneConfig(rate=0.37, scope="global")))
    total = sum(math.prod(s.shape) for s in c.layers)
    zeros = sum(int((c.replacements()[f"{s.name}.weight"] == 0).sum()) for s in c.layers)
    assert zeros == math.floor(0.37 * total)


def test_structured_pruning_zeroes_bias(bn_model: nn.Module, images: torch.Tensor) -> None:
    c = compress(bn_model, cfg(QuantConfig(bits=8), PruneConfig(rate=0.5, structured=True)))
    for name in ("0", "3", "7", "10"):
        w = c.replacements()[f"{name}.weight"]
        b = c.replacements()[f"{name}.bias"]
        dead = (w.reshape(w.shape[0], -1) == 0).all(dim=1)
        assert int(dead.sum()) == w.shape[0] // 2
        assert torch.all(b[dead] == 0) and torch.all(b[~dead] != 0)
    # a removed channel outputs exactly zero
    with torch.no_grad():
        act = torch.func.functional_call(c.graph.module.get_submodule("0"), {
            "weight": c.replacements()["0.weight"], "bias": c.replacements()["0.bias"]},
            (images,))
    dead = (c.replacements()["0.weight"].reshape(4, -1) == 0).all(dim=1)
    assert torch.all(act[:, dead] == 0)


def test_wrapper_runs_in_eval_mode_only_and_never_touches_base(
    bn_model: nn.Module, images: torch.Tensor
) -> None:
    c = compress(bn_model, cfg())
    with pytest.raises(RuntimeError, match="eval mode only"):
        c.model.train()
    assert not c.graph.module.training and not bn_model.training
    assert c.model.eval() is c.model
    with torch.no_grad():
        c.model(images)
    assert not c.graph.module.training


def test_variants_run_concurrently_without_seeing_each_other(images: torch.Tensor) -> None:
    """Sessions share one float model: running variants in threads must not mix weights."""
    import threading

    model = make_mlp(7)  # no BatchNorm: the variants share the caller's own module
    x = images
    variants = [compress(model, CompressionConfig(quant=QuantConfig(bits=b))) for b in (2, 4, 8)]
    with torch.no_grad():
        expected = [v.model(x) for v in variants]
        float_expected = model(x)
    errors: list[str] = []

    def run(i: int) -> None:
        with torch.no_grad():
            for _ in range(30):
                if i == len(variants):
                    if not torch.equal(model(x), float_expected):
                        errors.append("float model saw compressed weights")
                elif not torch.equal(variants[i].model(x), expected[i]):
                    errors.append(f"variant {i} saw another variant's weights")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(variants) + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_training_mode_bn_model_raises() -> None:
    model = make_bn_model(5).train()
    with pytest.raises(ValueError, match="training mode"):
        compress(model, cfg())


def test_nan_weights_raise(mlp: nn.Module) -> None:
    bad = copy.deepcopy(mlp)
    with torch.no_grad():
        bad[1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        compress(bad, cfg())


def test_model_without_weight_layers_raises() -> None:
    with pytest.raises(ValueError, match="no linear or convolution"):
        compress(nn.Sequential(nn.ReLU()).eval(), cfg())


def test_bad_config_types() -> None:
    with pytest.raises(ValueError, match="QuantConfig"):
        CompressionConfig(quant=8)
    with pytest.raises(ValueError, match="PruneConfig"):
        CompressionConfig(prune=0.5)
    with pytest.raises(ValueError, match="CompressionConfig"):
        compress(make_mlp(), QuantConfig())


def test_root_module_layer(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(36, 3).eval()
    c = compress(lin, cfg(QuantConfig(bits=2), PruneConfig(rate=0.5, structured=True)))
    assert [s.name for s in c.layers] == [""]
    assert set(c.replacements()) == {"weight", "bias"}
    x = images.flatten(1)
    with torch.no_grad():
        ref = nn.functional.linear(x, c.layer("").dequantized, c.replacements()["bias"])
        assert torch.equal(c.model(x), ref)
    # floor(0.5 * 3) = 1 row removed, stored by channels: a 3-bit channel bitmap (1 byte),
    # one scale, the 72 codes of the 2 kept rows at 2 bits, 3 float biases; a 108-bit mask
    # (14 bytes) after the nonzero codes would cost more
    assert c.layer("").encoding == "channels"
    assert c.size_bytes == 1 + 4 + 18 + 12


def test_stochastic_compress_is_deterministic(mlp: nn.Module) -> None:
    q = QuantConfig(bits=2, rounding="stochastic", seed=3)
    a, b = compress(mlp, cfg(q)), compress(mlp, cfg(q))
    for k in a.replacements():
        assert torch.equal(a.replacements()[k], b.replacements()[k])
    other = compress(mlp, cfg(QuantConfig(bits=2, rounding="stochastic", seed=4)))
    assert not torch.equal(a.replacements()["1.weight"], other.replacements()["1.weight"])


def test_sqnr_db() -> None:
    assert sqnr_db(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0])) == pytest.approx(
        10 * math.log10(25)
    )
    assert sqnr_db(torch.ones(3), torch.ones(3)) == math.inf
    assert sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf


def test_compressed_bn_model_without_folding_evaluates_in_eval_mode(bn_model, images) -> None:
    c = compress(bn_model, CompressionConfig(quant=QuantConfig(bits=8), fold_bn=False))
    assert not c.model.training and not any(m.training for m in c.model.modules())
    with torch.no_grad():
        out = c.model(images)
    before = [b.clone() for b in bn_model.buffers()]
    with torch.no_grad():
        assert torch.equal(c.model(images), out)
    assert all(torch.equal(a, b) for a, b in zip(before, bn_model.buffers(), strict=True))


# ---------------------------------------------------------------- whole-model numbers


def _linears(*weights: list[list[float]]) -> nn.Module:
    """A chain of bias-free linear layers with the given weights, named "0", "1", ..."""
    layers = []
    for w in weights:
        t = torch.tensor(w)
        lin = nn.Linear(t.shape[1], t.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(t)
        layers.append(lin)
    return nn.Sequential(*layers).eval()


def test_whole_model_sqnr_hand_computed() -> None:
    # layer 0: [3, 4] at 2 bits -> scale 4, both round to 4: ||w||^2 = 25, error 1
    # layer 1: [1, -0.5] at 2 bits -> scale 1: 1 and -0 (half to even): 1.25, error 0.25
    model = _linears([[3.0, 4.0]], [[1.0], [-0.5]])
    c = compress(model, cfg(QuantConfig(bits=2)))
    assert [s.dequantized.reshape(-1).tolist() for s in c.layers] == [[4.0, 4.0], [1.0, 0.0]]
    assert [(s.weight_energy, s.error_energy) for s in c.layers] == [(25.0, 1.0), (1.25, 0.25)]
    assert c.sqnr_db == 10 * math.log10(26.25 / 1.25)  # 13.22 dB: 10 log10(21)
    assert c.mean_sqnr_db == pytest.approx((10 * math.log10(25) + 10 * math.log10(5)) / 2)
    assert compress(model, cfg(None)).sqnr_db == math.inf
    assert compress(model, cfg(QuantConfig(bits=2), layers=["1"])).sqnr_db == pytest.approx(
        10 * math.log10(5))


def test_whole_model_sqnr_is_far_below_the_mean_with_one_bad_layer() -> None:
    """``?bits=8&layer_bits=fc1:2`` on mnist-cnn: fc1 at 2 bits loses almost all its signal
    (0.14 dB) while the other layers keep 36-46 dB, so the mean of the per-layer values
    reads 31.94 dB, while the whole model's weights have an SQNR of 1.91 dB."""
    import qcore

    try:
        model = qcore.load_model("mnist-cnn")
    except ValueError as exc:
        pytest.skip(f"sample model not available: {exc}")
    c = compress(model, cfg(QuantConfig(bits=8, layer_bits={"fc1": 2})))
    assert c.mean_sqnr_db == pytest.approx(31.94, abs=0.01)
    assert c.sqnr_db == pytest.approx(1.91, abs=0.01)
    sig = sum(float((s.float_weight.double() ** 2).sum()) for s in c.layers)
    err = sum(float(((s.float_weight.double() - s.dequantized.double()) ** 2).sum())
              for s in c.layers)
    assert c.sqnr_db == pytest.approx(10 * math.log10(sig / err), rel=1e-12)


def test_sparsity_split_into_pruned_and_rounded_zero() -> None:
    # layer 0 (5 weights) at 2 bits: -1, 0, 0, 0, 1 (0.26 / 1 rounds to 0; the 0.0 is kept)
    # layer 1 (3 weights): scale 3, 2 -> 3, 0.1 -> 0, -3 -> -3
    model = _linears([[-1.0, -0.2, 0.0, 0.26, 1.0]], [[2.0], [0.1], [-3.0]])
    c = compress(model, cfg(QuantConfig(bits=2)))
    assert [(s.pruned, s.rounded_zero) for s in c.layers] == [(0.0, 3 / 5), (0.0, 1 / 3)]
    assert (c.pruned, c.rounded_zero, c.sparsity) == (0.0, 0.5, 0.5)  # 4 of 8 weights
    # pruning floor(0.4 * 5) = 2 (0.0, -0.2) and floor(0.4 * 3) = 1 (0.1) first; the range
    # of layer 0 is still [-1, 1], so 0.26 still rounds to 0
    c = compress(model, cfg(QuantConfig(bits=2), PruneConfig(rate=0.4)))
    first, second = c.layers
    assert (first.pruned, first.rounded_zero) == (2 / 5, 1 / 5)
    assert (second.pruned, second.rounded_zero) == (1 / 3, 0.0)
    for s in c.layers:  # exactly, by construction (2/5 + 1/5 is 0.6000000000000001)
        assert s.sparsity == s.pruned + s.rounded_zero
    assert first.sparsity == pytest.approx(3 / 5) and second.sparsity == 1 / 3
    assert (c.pruned, c.rounded_zero) == (3 / 8, 1 / 8)
    assert c.sparsity == c.pruned + c.rounded_zero == 0.5
    # left in float, pruning alone: nothing rounds
    c = compress(model, cfg(None, PruneConfig(rate=0.4)))
    assert [(s.pruned, s.rounded_zero) for s in c.layers] == [(0.4, 0.0), (1 / 3, 0.0)]
    # a 1-bit pruned weight is zero by its mask, never by rounding
    c = compress(model, cfg(QuantConfig(bits=1), PruneConfig(rate=0.4)))
    assert [(s.pruned, s.rounded_zero) for s in c.layers] == [(0.4, 0.0), (1 / 3, 0.0)]


def test_sparsity_split_on_mnist_cnn() -> None:
    """At 8 bits without pruning 3.0% of mnist-cnn's weights round to zero; at 2 bits 99.6%."""
    import qcore

    try:
        model = qcore.load_model("mnist-cnn")
    except ValueError as exc:
        pytest.skip(f"sample model not available: {exc}")
    c8 = compress(model, cfg(QuantConfig(bits=8)))
    assert c8.pruned == 0.0 and c8.rounded_zero == pytest.approx(0.0303, abs=1e-4)
    c2 = compress(model, cfg(QuantConfig(bits=2), PruneConfig(rate=0.5)))
    assert c2.pruned == pytest.approx(0.5, abs=1e-5)
    assert c2.rounded_zero > 0.4 and c2.sparsity == c2.pruned + c2.rounded_zero


def test_scales_zero_points_and_grid_range() -> None:
    model = _linears([[-0.75, 2.25, 1.0], [0.5, -0.5, 0.0]])
    # asymmetric 2 bits per channel: row 0 range [-0.75, 2.25] -> scale 1, zero point
    # round(0.75) = 1, grid [-1, 2] (shifted off the range asked for); row 1 range
    # [-0.5, 0.5] -> scale 1/3, zero point round(1.5) = 2, grid [-2/3, 1/3]
    q = QuantConfig(bits=2, symmetric=False, per_channel=True)
    s = compress(model, cfg(q)).layer("0")
    assert s.scales.tolist() == [1.0, float(torch.tensor(1.0) / 3)]
    assert s.zero_points.tolist() == [1, 2]
    lo, hi = s.grid_range
    third = torch.tensor([1.0 / 3])
    assert lo.tolist() == [-1.0, float(-2 * third)] and hi.tolist() == [2.0, float(third)]
    assert (s.qparams.lo.tolist(), s.qparams.hi.tolist()) == ([-0.75, -0.5], [2.25, 0.5])
    # every value the layer holds lies on its grid, within [lo, hi]
    after = s.dequantized
    assert torch.all((lo[:, None] <= after) & (after <= hi[:, None]))
    # symmetric 3 bits per tensor: scale 2.25 / 3 = 0.75, grid [-2.25, 2.25]
    s = compress(model, cfg(QuantConfig(bits=3))).layer("0")
    assert s.scales.tolist() == [0.75] and s.zero_points.tolist() == [0]
    assert [t.tolist() for t in s.grid_range] == [[-2.25], [2.25]]
    # 1 bit: the two levels are -alpha and alpha, alpha = mean |w| = 5 / 6
    s = compress(model, cfg(QuantConfig(bits=1))).layer("0")
    alpha = float(torch.tensor(5.0) / 6)
    assert s.scales.tolist() == [alpha] and s.zero_points.tolist() == [0]
    assert [t.tolist() for t in s.grid_range] == [[-alpha], [alpha]]
    # left in float
    s = compress(model, cfg(None, PruneConfig(rate=0.5))).layer("0")
    assert s.scales is None and s.zero_points is None and s.grid_range is None
