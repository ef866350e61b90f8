"""Quantization-aware fine-tuning: the straight-through estimator, gradient quantization,
masks, determinism, stopping, and that compress() on the result is what was trained."""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import pytest
import torch
from conftest import FakeDataset, make_bn_model, make_mlp, state_hash
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qcore
from qcore.affine import qparams_from_range
from qcore.cli import main
from qcore.config import ActQuantConfig, CompressionConfig, PruneConfig, QuantConfig
from qcore.finetune import (
    FinetuneConfig,
    FinetuneResult,
    _TrainState,
    cubic_rate,
    finetune,
    float_module,
)
from qcore.graph import param_key
from qcore.ste import fake_quantize_ste, inside_clip, quantize_gradient


@dataclasses.dataclass(frozen=True)
class Split(FakeDataset):
    """A FakeDataset with a split name and a length, as finetune reads them."""

    split: str = "train"

    def __len__(self) -> int:
        return int(self.y.shape[0])


def _split(n: int, seed: int, split: str = "train") -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    return Split(x, torch.randint(0, 3, (n,), generator=g), ("a", "b", "c"), split=split)


@pytest.fixture(scope="module")
def digits():
    model = qcore.load_model("digits-mlp")
    return (model, qcore.load_dataset("digits", "train"), qcore.load_dataset("digits", "calib"))


def _subset(ds, n: int):
    return dataclasses.replace(ds, x=ds.x[:n], y=ds.y[:n], indices=ds.indices[:n])


TWO_BIT = CompressionConfig(quant=QuantConfig(bits=2, per_channel=True))


# ------------------------------------------------------------------ the straight-through estimator


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_ste_matches_torch_fake_quantize_forward_and_gradient(bits, symmetric):
    """Identity gradient inside the clip range, zero outside: torch's own fake-quant op is
    the oracle, per tensor and per channel."""
    g = torch.Generator().manual_seed(bits)
    x2 = torch.randn(3, 200, generator=g) * 2.0
    lo, hi = torch.tensor([-1.5, -0.7, -1.0]), torch.tensor([1.5, 1.1, 0.6])
    qp = qparams_from_range(lo, hi, bits, symmetric)
    up = torch.randn(3, 200, generator=g)
    a = x2.clone().requires_grad_(True)
    fake_quantize_ste(a, qp).backward(up)
    b = x2.clone().requires_grad_(True)
    ref = torch.fake_quantize_per_channel_affine(b, qp.scale, qp.zero_point.int(), 0,
                                                 qp.qmin, qp.qmax)  # fmt: skip
    ref.backward(up)
    assert torch.equal(fake_quantize_ste(x2, qp), ref.detach())
    assert torch.equal(a.grad, b.grad)
    inside = inside_clip(x2, qp)
    assert 0 < int(inside.sum()) < x2.numel()  # both cases occur
    assert torch.equal(a.grad, torch.where(inside, up, torch.zeros(())))


def test_ste_at_one_bit_passes_inside_the_clip_range():
    qp = qcore.choose_qparams(torch.tensor([[-2.0, -0.5, 0.3, 1.0, 2.0]]),
                              torch.ones(1, 5, dtype=torch.bool), QuantConfig(bits=1, clip=0.5),
                              1)  # range [-1, 1]  # fmt: skip
    x = torch.tensor([[-2.0, -0.5, 0.3, 1.0, 2.0]], requires_grad=True)
    fake_quantize_ste(x, qp).sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0]]


# ------------------------------------------------------------------ gradient quantization


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=40),
       st.integers(2, 16), st.integers(0, 2**31))  # fmt: skip
def test_quantized_gradients_lie_on_the_grid(values, bits, seed):
    g = torch.tensor(values)
    q, scale = quantize_gradient(g, bits, torch.Generator().manual_seed(seed))
    qmax = 2 ** (bits - 1) - 1
    if float(g.abs().max()) == 0.0:
        assert scale == 0.0 and torch.equal(q, g)
        return
    assert scale == pytest.approx(float(g.abs().max()) / qmax, rel=1e-6)
    s = torch.tensor(scale)
    codes = torch.round(q / s)
    assert torch.equal(codes * s, q)  # every value an integer code times the scale
    assert torch.allclose(q / s, codes, rtol=1e-5, atol=1e-5)
    assert int(codes.abs().max()) <= qmax
    # each entry is one of the two levels next to it
    assert bool(((q - g).abs() <= scale * (1 + 1e-5)).all())


@settings(max_examples=15, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=2, max_size=8),
       st.integers(2, 6))  # fmt: skip
def test_gradient_quantization_is_unbiased(values, bits):
    """The mean over many roundings approaches g: |mean - g| within 5 standard errors."""
    g = torch.tensor(values)
    if float(g.abs().max()) == 0.0:
        return
    n = 4000
    gen = torch.Generator().manual_seed(0)
    reps = g.expand(n, -1).contiguous()  # one tensor: per-tensor scale as for g alone
    q, scale = quantize_gradient(reps, bits, gen)
    # the same scale as quantizing g by itself (max|g| is the same)
    assert scale == quantize_gradient(g, bits, gen)[1]
    err = (q.double().mean(0) - g.double()).abs()
    bound = 5 * (scale / 2) / math.sqrt(n) + 1e-6  # rounding noise has std <= scale / 2
    assert bool((err <= bound).all()), (err.max(), bound)


# ------------------------------------------------------------------ the config


def test_config_round_trips_and_refuses_bad_values():
    ft = FinetuneConfig(epochs=3, lr=2e-3, distill=True, grad_bits=8, prune_schedule="gradual")
    assert FinetuneConfig.from_dict(ft.to_dict()) == ft
    assert FinetuneConfig.from_dict({}) == FinetuneConfig()
    for bad in ({"epochs": 0}, {"lr": 0.0}, {"lr": -1.0}, {"lr": math.nan}, {"grad_bits": 1},
                {"grad_bits": 17}, {"alpha": 1.5}, {"alpha": -0.1}, {"temperature": 0.0},
                {"prune_schedule": "linear"}, {"batch_size": 0}, {"epochs": 1.5},
                {"distill": "yes"}, {"seed": -1}):  # fmt: skip
        with pytest.raises(ValueError):
            FinetuneConfig(**bad)
    with pytest.raises(ValueError, match="no setting"):
        FinetuneConfig.from_dict({"epoch": 2})
    with pytest.raises(ValueError, match="true or false"):
        FinetuneConfig.from_dict({"distill": 1})


def test_cubic_schedule_ends_at_the_final_rate():
    rates = [cubic_rate(0.9, t, 100) for t in range(0, 121)]
    assert rates[0] == 0.0 and rates[100] == 0.9 and rates[120] == 0.9
    assert all(a <= b for a, b in zip(rates, rates[1:], strict=False))
    assert rates[50] == pytest.approx(0.9 * (1 - 0.5**3))


# ------------------------------------------------------------------ the compressed forward pass

STEP0_CONFIGS = [
    CompressionConfig(quant=QuantConfig(bits=2, per_channel=True)),
    CompressionConfig(quant=QuantConfig(bits=3, symmetric=False, clip=0.8)),
    CompressionConfig(quant=QuantConfig(bits=1)),
    CompressionConfig(quant=QuantConfig(bits=4, scale="pow2", clip_mode="mse")),
    CompressionConfig(quant=QuantConfig(bits=4, rounding="stochastic", seed=3)),
    CompressionConfig(quant=QuantConfig(bits=4), prune=PruneConfig(rate=0.5, structured=True)),
    CompressionConfig(quant=QuantConfig(bits=4), prune=PruneConfig(rate=0.6, scope="global")),
    CompressionConfig(quant=None, prune=PruneConfig(rate=0.5)),
    CompressionConfig(quant=QuantConfig(bits=4), act=ActQuantConfig(bits=4)),
    CompressionConfig(quant=QuantConfig(bits=4), layers=("3", "7"), fold_bn=False),
]


@pytest.mark.parametrize("config", STEP0_CONFIGS, ids=lambda c: str(c.to_dict())[:60])
def test_step0_forward_equals_compress(config, images):
    """Before any step, the training forward pass gives compress()'s logits exactly."""
    model = make_bn_model()
    calib = _split(32, 5, "calib")
    c = qcore.compress(model, config, calib=calib)
    student = _TrainState(c.graph, c, learn_scales=False)
    with torch.no_grad():
        assert torch.equal(student.variant()(images), c.model(images))


@pytest.mark.parametrize("config", STEP0_CONFIGS[:7] + STEP0_CONFIGS[8:],
                         ids=lambda c: str(c.to_dict())[:60])  # fmt: skip
def test_compress_of_the_result_reproduces_the_trained_weights(config, images):
    """After weights move (as training moves them), the module finetune returns compresses
    to exactly the weights and biases the training forward pass ran with."""
    model = make_bn_model()
    calib = _split(32, 5, "calib")
    c = qcore.compress(model, config, calib=calib)
    student = _TrainState(c.graph, c, learn_scales=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in (*student.weights.values(), *student.biases.values()):
            t.add_(torch.randn(t.shape, generator=g) * 0.05)
        student.apply_masks()
        trained = {k: v.detach() for k, v in student.replacements().items()}
    module = float_module(model, student.float_tensors(), config.fold_bn)
    again = qcore.compress(module, config, calib=calib)
    got = again.replacements()
    for r in again.layers:
        key = param_key(r.name, "weight")
        assert torch.equal(got[key], trained[key]), key
        bias = param_key(r.name, "bias")
        if bias in trained:
            assert torch.equal(got.get(bias, again.graph.params[bias]), trained[bias]), bias
        if r.mask is not None:  # compress finds the masks training kept
            assert torch.equal(r.mask, student.masks[r.name])


# ------------------------------------------------------------------ training


def _run(model, train, config, ft=None, **kw) -> FinetuneResult:
    return finetune(model, train, config, ft or FinetuneConfig(batch_size=8), **kw)


def test_shared_model_is_never_touched():
    model = make_bn_model()
    before = state_hash(model)
    params = list(model.parameters())
    result = _run(model, _split(48, 1), TWO_BIT, FinetuneConfig(batch_size=16, distill=True,
                                                               grad_bits=8))  # fmt: skip
    assert state_hash(model) == before
    assert all(p.grad is None for p in params)
    graph = qcore.graph_of(model, True)
    assert all(t.grad is None and not t.requires_grad for t in graph.params.values())
    assert result.model is not model and not result.model.training
    # and the result moved away from the starting weights
    assert state_hash(result.model) != state_hash(qcore.graph.fold_batchnorm(model))


def test_one_seed_gives_identical_histories():
    model, train = make_mlp(), _split(64, 2)
    cfg = CompressionConfig(quant=QuantConfig(bits=3), prune=PruneConfig(rate=0.5))
    ft = FinetuneConfig(epochs=2, batch_size=16, distill=True, grad_bits=6,
                        prune_schedule="gradual")  # fmt: skip
    a = _run(model, train, cfg, ft, calib=_split(16, 3, "calib"))
    b = _run(model, train, cfg, ft, calib=_split(16, 3, "calib"))
    cols = [c for c in a.history.columns if c != "seconds"]
    pd.testing.assert_frame_equal(a.history[cols], b.history[cols])
    assert state_hash(a.model) == state_hash(b.model)
    c = _run(model, train, cfg, dataclasses.replace(ft, seed=1), calib=_split(16, 3, "calib"))
    assert not a.history["loss"].equals(c.history["loss"])


def test_history_columns_and_progress_rows():
    model, train = make_mlp(), _split(40, 4)
    seen = []
    result = _run(model, train, TWO_BIT, FinetuneConfig(epochs=2, batch_size=16, grad_bits=4),
                  calib=_split(16, 3, "calib"), progress=lambda d, t, row: seen.append((d, t, row)))
    h = result.history
    assert list(h.columns[:5]) == ["epoch", "step", "loss", "train_accuracy", "calib_accuracy"]
    assert len(h) == 1 + 2 * 3  # the starting row, then 3 steps per epoch
    assert [d for d, _, _ in seen] == list(range(7)) and {t for _, t, _ in seen} == {6}
    assert [r["step"] for _, _, r in seen] == h["step"].tolist()
    ends = h["calib_accuracy"].notna()
    assert h.loc[ends, "step"].tolist() == [0, 3, 6]  # start and the end of each epoch
    assert h["grad_sqnr_db"].iloc[1:].map(math.isfinite).all()
    assert not result.stopped and result.seconds > 0


def test_should_stop_ends_within_one_batch():
    model, train = make_mlp(), _split(160, 5)
    polls = []

    def stop() -> bool:
        polls.append(1)
        return len(polls) > 3

    result = _run(model, train, TWO_BIT, FinetuneConfig(epochs=3, batch_size=8),
                  should_stop=stop)
    assert result.stopped
    assert result.history["step"].max() == 3  # the 4th poll said stop: no 4th step
    qcore.compress(result.model, TWO_BIT)  # the model is usable


@pytest.mark.parametrize("prune", [PruneConfig(rate=0.7), PruneConfig(rate=0.6, scope="global"),
                                   PruneConfig(rate=0.5, structured=True)])  # fmt: skip
@pytest.mark.parametrize("schedule", ["oneshot", "gradual"])
def test_pruned_weights_stay_exactly_zero(prune, schedule):
    model = make_bn_model()
    cfg = CompressionConfig(quant=QuantConfig(bits=4), prune=prune)
    result = _run(model, _split(48, 6), cfg, FinetuneConfig(batch_size=8, epochs=2,
                                                           prune_schedule=schedule))
    start = qcore.compress(model, cfg)
    after = qcore.compress(result.model, cfg)
    for r0, r1 in zip(start.layers, after.layers, strict=True):
        w = result.model.state_dict()[param_key(r1.name, "weight")]
        assert torch.equal(w == 0, ~r1.mask)  # exactly the pruned ones are zero
        if schedule == "oneshot":  # the masks chosen at the start, kept through training
            assert torch.equal(r1.mask, r0.mask)
    assert after.pruned == pytest.approx(start.pruned)
    if schedule == "gradual":
        h = result.history
        # the step-0 row is the post-training model, compressed at the final rate
        assert (h[h.step == 0]["prune_rate"] == prune.rate).all()
        rates = h[h.step > 0]["prune_rate"].tolist()
        assert rates[0] < rates[-1] == prune.rate
        assert all(a <= b for a, b in zip(rates, rates[1:], strict=False))


def test_bad_splits_are_refused():
    model = make_mlp()
    with pytest.raises(ValueError, match="train split"):
        _run(model, _split(8, 1, "test"), TWO_BIT)
    with pytest.raises(ValueError, match="never the test split"):
        _run(model, _split(8, 1), TWO_BIT, calib=_split(8, 1, "test"))
    with pytest.raises(ValueError, match="calib"):
        _run(model, _split(8, 1), CompressionConfig(act=ActQuantConfig(bits=8)))


def test_activations_and_learned_scales_run_through():
    model, train, calib = make_bn_model(), _split(48, 7), _split(32, 8, "calib")
    cfg = CompressionConfig(quant=QuantConfig(bits=3), act=ActQuantConfig(bits=4))
    result = _run(model, train, cfg, FinetuneConfig(batch_size=16, epochs=2), calib=calib)
    acc = qcore.evaluate(qcore.compress(result.model, cfg, calib=calib).model, calib).accuracy
    assert result.history["calib_accuracy"].iloc[-1] == acc
    lsq = _run(model, train, TWO_BIT, FinetuneConfig(batch_size=16, learn_scales=True))
    assert math.isfinite(lsq.history["loss"].iloc[-1])


def test_finetune_recovers_a_2bit_digits_mlp(digits):
    """A real, seeded run: one epoch buys back calib accuracy that 2-bit rounding lost."""
    model, train, calib = digits
    result = finetune(model, train, TWO_BIT, FinetuneConfig(epochs=2), calib=calib)
    h = result.history
    start, end = h["calib_accuracy"].iloc[0], h["calib_accuracy"].iloc[-1]
    assert end >= start + 0.08, (start, end)
    assert end == qcore.evaluate(qcore.compress(result.model, TWO_BIT).model, calib).accuracy


# ------------------------------------------------------------------ command line


def test_cli_finetune_writes_the_fine_tuned_file(tmp_path, capsys, digits):
    out = tmp_path / "ft.qpk"
    assert main(["finetune", "--model", "digits-mlp", "--bits", "2", "--per-channel",
                 "--epochs", "1", "--quiet", "--out", str(out)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in text.splitlines()}
    tuned = float(lines["fine-tuned"].split()[2])
    test = qcore.load_dataset("digits", "test")
    packed = qcore.evaluate(qcore.load_packed(out).model, test).accuracy
    assert packed == pytest.approx(tuned, abs=5e-5)
    assert float(lines["post-training"].split()[2]) < tuned


@pytest.mark.parametrize("argv, words", [
    (["--epochs", "0"], ["epochs"]),
    (["--grad-bits", "1"], ["grad_bits"]),
    (["--lr", "-1"], ["learning rate"]),
    (["--alpha", "2"], ["alpha"]),
    (["--epochs", "two"], ["--epochs"]),
])  # fmt: skip
def test_cli_bad_arguments_are_one_error_line(argv, words, tmp_path, capsys):
    out = tmp_path / "x.qpk"
    assert main(["finetune", "--model", "digits-mlp", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words)
    assert not out.exists()


# ------------------------------------------------------------------ removed blocks


class BNChain(nn.Module):
    """conv+BN stem, a residual block with BatchNorm (removable), a shape-changing conv, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                   nn.Conv2d(4, 4, 3, padding=1))  # fmt: skip
        self.down = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8 * 3 * 3, 3)
        self.qcore_spec = {"input_shape": [1, 6, 6]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = h + self.block(h)
        return self.head(torch.relu(self.down(h)).flatten(1))


def test_folded_result_keeps_the_model_structure(images):
    """BatchNorm folded: the result is the model's own class, each folded BatchNorm an
    identity and its layer holding the trained folded weights (with a new bias)."""
    torch.manual_seed(0)
    model = BNChain().eval()
    cfg = CompressionConfig(quant=QuantConfig(bits=3))
    result = _run(model, _split(32, 9), cfg, FinetuneConfig(batch_size=16))
    m = result.model
    assert type(m) is BNChain and isinstance(m.stem[1], nn.Identity)
    assert isinstance(m.block[1], nn.Identity) and m.stem[0].bias is not None
    assert model.stem[0].bias is None and isinstance(model.stem[1], nn.BatchNorm2d)
    assert not qcore.fold.has_batchnorm(m)
    folded = qcore.fold.state_for_size(qcore.graph.fold_batchnorm(model))
    assert set(qcore.fold.state_for_size(m)) == set(folded)


@pytest.mark.skipif(not hasattr(CompressionConfig(), "drop"), reason="no layer removal yet")
def test_removed_blocks_are_skipped_and_kept_for_compress(images):
    torch.manual_seed(0)
    model = BNChain().eval()
    cfg = CompressionConfig(quant=QuantConfig(bits=4), drop=("block",))
    calib = _split(32, 5, "calib")
    result = _run(model, _split(48, 9), cfg, FinetuneConfig(batch_size=16, distill=True),
                  calib=calib)
    # the block's weights were not trained: they are the folded float ones
    folded = qcore.fold.state_for_size(qcore.graph.fold_batchnorm(model))
    state = result.model.state_dict()
    for k in ("block.0.weight", "block.0.bias", "block.3.weight"):
        assert torch.equal(state[k], folded[k])
    assert not torch.equal(state["down.weight"], folded["down.weight"])
    again = qcore.compress(result.model, cfg, calib=calib)
    assert [r.name for r in again.layers] == ["stem.0", "down", "head"]
    acc = qcore.evaluate(again.model, calib).accuracy
    assert result.history["calib_accuracy"].iloc[-1] == acc


@pytest.mark.parametrize("quant", [QuantConfig(bits=2, per_channel=True),
                                   QuantConfig(bits=3, symmetric=False), QuantConfig(bits=4)])
def test_learned_steps_are_what_compress_finds_again(quant, images):
    """LSQ: the result's weights are clipped to the learned ranges, so compress re-chooses
    the learned grids (to float rounding) when the learned steps clip."""
    cfg = CompressionConfig(quant=quant)
    model = make_bn_model()
    c = qcore.compress(model, cfg)
    student = _TrainState(c.graph, c, learn_scales=True)
    assert set(student.steps) == {r.name for r in c.layers}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in student.weights.values():
            t.add_(torch.randn(t.shape, generator=g) * 0.05)
        for t in student.steps.values():
            t.mul_(0.8)  # learned steps that clip
        trained = {k: v.detach() for k, v in student.replacements().items()}
    module = float_module(model, student.float_tensors(), cfg.fold_bn)
    again = qcore.compress(module, cfg).replacements()
    for key, value in again.items():
        assert torch.allclose(value, trained[key], rtol=0, atol=1e-6), key
