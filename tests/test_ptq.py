"""Tests for qcore.ptq: cross-layer equalization, bias correction and AdaRound."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass

import pytest
import torch
from conftest import make_bn_model, state_hash
from torch import nn

import qcore
from qcore import ptq
from qcore.compress import compress
from qcore.config import CompressionConfig, QuantConfig, Settings
from qcore.export import MAGIC, load_packed, packed_bytes
from qcore.graph import graph_of, param_key


@dataclass(frozen=True)
class Split:
    """A dataset split as compress reads it: .x, .y and the split's name."""

    x: torch.Tensor
    y: torch.Tensor
    split: str = "calib"
    name: str = "fake"

    def inputs(self, rows=slice(None)) -> torch.Tensor:
        return self.x[rows]


def _data(n: int = 64, split: str = "calib", seed: int = 5, shape=(1, 6, 6)) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, *shape, generator=g), torch.randint(0, 3, (n,), generator=g),
                 split)  # fmt: skip


class DepthwiseNet(nn.Module):
    """conv, BN, ReLU, depthwise conv, BN, ReLU, pointwise conv, ReLU, pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.bn2 = nn.BatchNorm2d(6)
        self.pw = nn.Conv2d(6, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        x = torch.relu(self.pw(x))
        return self.fc(self.pool(x).flatten(1))


class Blocked(nn.Module):
    """linear, GELU, linear; and a residual addition before the head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(36, 36)
        self.b = nn.Linear(36, 36)
        self.head = nn.Linear(36, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        y = self.b(nn.functional.gelu(self.a(x)))
        return self.head(torch.relu(y + x))


def _depthwise(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = DepthwiseNet()
    with torch.no_grad():  # very unequal channels, as trained depthwise layers have
        m.stem.weight.mul_(torch.logspace(-1, 1, 6)[:, None, None, None])
        m.dw.weight.mul_(torch.logspace(1, -1, 6)[:, None, None, None])
    return m.eval()


def _tensors(model: nn.Module) -> tuple:
    g = graph_of(model)
    names = list(g.layers)
    w = {n: g.params[param_key(n, "weight")] for n in names}
    b = {n: g.params.get(param_key(n, "bias")) for n in names}
    return g, names, w, b


def _as_replacements(eq: ptq.Equalization) -> dict:
    out = {param_key(n, "weight"): v for n, v in eq.weights.items()}
    out.update({param_key(n, "bias"): v for n, v in eq.biases.items()})
    return out


# ---------------------------------------------------------------- equalization


@pytest.mark.parametrize("make", [make_bn_model, _depthwise])
def test_equalization_keeps_the_float_function_and_equalizes_ranges(make) -> None:
    model = make()
    before = state_hash(model)
    g, names, w, b = _tensors(model)
    eq = ptq.equalize(g, names, w, b)
    assert eq.pairs and not eq.skipped
    x = _data(32).x
    with torch.no_grad():
        ref, out = g.run(x), g.run(x, _as_replacements(eq))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)  # float rounding only
    for first, second in eq.pairs:  # r1_i == r2_i: the first layer's output channel i and
        r1 = ptq.channel_ranges(eq.weights[first])  # the second's input channel i
        w2 = eq.weights[second]
        idx = ptq._in_channel_index(g.layers[second], w2, r1.numel())
        r2 = torch.zeros_like(r1).scatter_reduce(
            0, idx.reshape(-1), w2.abs().reshape(w2.shape[0], -1).reshape(-1), "amax")
        torch.testing.assert_close(r1, r2, rtol=1e-3, atol=1e-7)
    assert state_hash(model) == before  # the model and its shared tensors are untouched


def test_equalization_scale_is_the_papers_formula() -> None:
    """One pair, one sweep: s_i = sqrt(r1_i * r2_i) / r2_i, hand-computed."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[4.0, -1.0], [0.5, 0.25]]))
        model[0].bias.copy_(torch.tensor([2.0, 1.0]))
        model[2].weight.copy_(torch.tensor([[1.0, -8.0]]))
    g, names, w, b = _tensors(model)
    eq = ptq.equalize(g, names, w, b)
    # r1 = (4, 0.5), r2 = (1, 8): s = (sqrt(4)/1, sqrt(4)/8) = (2, 0.25)
    torch.testing.assert_close(eq.scales["0"], torch.tensor([2.0, 0.25]))
    torch.testing.assert_close(eq.weights["0"], torch.tensor([[2.0, -0.5], [2.0, 1.0]]))
    torch.testing.assert_close(eq.biases["0"], torch.tensor([1.0, 4.0]))
    torch.testing.assert_close(eq.weights["2"], torch.tensor([[2.0, -2.0]]))


def test_pairs_that_cannot_be_equalized_are_listed() -> None:
    torch.manual_seed(0)
    model = Blocked().eval()
    g, names, w, b = _tensors(model)
    eq = ptq.equalize(g, names, w, b)
    assert eq.pairs == ()
    reasons = {(f, s): why for f, s, why in eq.skipped}
    assert "not positively homogeneous" in reasons[("a", "b")]
    assert "gelu" in reasons[("a", "b")]
    assert "residual addition" in reasons[("b", "head")]
    assert eq.weights == {}


def test_sample_resnet_lists_residual_pairs() -> None:
    model = qcore.load_model("mnist-resnet")
    comp = compress(model, CompressionConfig(quant=QuantConfig(bits=4), equalize=True))
    eq = comp.equalization
    assert ("layer1.conv1", "layer1.conv2") in eq.pairs
    assert any(s == "layer2.conv1" and "residual addition" in why for _, s, why in eq.skipped)
    g = comp.graph
    x = qcore.load_dataset("mnist-5k", "calib").x[:64]
    with torch.no_grad():
        torch.testing.assert_close(g.run(x, _as_replacements(eq)), g.run(x), rtol=1e-4,
                                   atol=1e-4)  # fmt: skip


def test_equalize_runs_before_quantizing_and_changes_the_weights_it_stores() -> None:
    model = _depthwise()
    q = QuantConfig(bits=4)
    plain = compress(model, CompressionConfig(quant=q))
    eq = compress(model, CompressionConfig(quant=q, equalize=True))
    assert plain.equalization is None and eq.equalization is not None
    assert [r.bits for r in plain.layers] == [r.bits for r in eq.layers]
    x = _data(64).x
    with torch.no_grad():
        ref = graph_of(model).run(x)
        err_plain = (plain.model(x) - ref).pow(2).mean()
        err_eq = (eq.model(x) - ref).pow(2).mean()
    assert err_eq < err_plain  # unequal channels: one per-tensor grid fits them better after
    # the first layer runs with its rescaled bias, which the file stores
    assert eq.layer("stem").bias is not None
    loaded = load_packed_bytes(eq, model)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), eq.model(x), rtol=1e-5, atol=1e-5)


def test_activation_ranges_are_calibrated_on_the_equalized_model() -> None:
    """16-bit weights and activations: the equalized variant stays on the float function,
    which it would not if its activation ranges came from the unequalized model."""
    model, calib = _depthwise(), _data(64)
    cfg = CompressionConfig(quant=QuantConfig(bits=16), act=qcore.ActQuantConfig(bits=16),
                            equalize=True)  # fmt: skip
    comp = compress(model, cfg, calib=calib)
    plain = compress(model, CompressionConfig(quant=QuantConfig(bits=16),
                                              act=qcore.ActQuantConfig(bits=16)), calib=calib)
    g = graph_of(model)
    edge = comp.layer("dw").act.edge  # the stem's group output, which dw reads
    assert edge == plain.layer("dw").act.edge
    # the stem's output channels were divided by s, so the range reaching dw changed
    assert comp.activations[edge].hi != plain.activations[edge].hi
    with torch.no_grad():
        torch.testing.assert_close(comp.model(calib.x), g.run(calib.x), rtol=1e-3, atol=1e-3)


def test_equalize_is_skipped_without_quantization() -> None:
    model = _depthwise()
    comp = compress(model, CompressionConfig(quant=None, equalize=True))
    assert comp.equalization is None
    assert Settings(bits=None, equalize=True).canonical() == Settings(bits=None)


def load_packed_bytes(comp, template):
    """Write the packed file and read it back (template: the float model it came from)."""
    fd, path = tempfile.mkstemp(suffix=".qpk")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(packed_bytes(comp))
        return load_packed(path, template=template)
    finally:
        os.remove(path)


def _payload(comp) -> int:
    """The bytes of a packed file after its header (what size_bytes counts)."""
    data = packed_bytes(comp)
    (head,) = struct.unpack("<I", data[len(MAGIC) : len(MAGIC) + 4])
    return len(data) - len(MAGIC) - 4 - 32 - head


# ---------------------------------------------------------------- bias correction


def test_bias_correction_matches_the_float_mean_output_of_one_layer() -> None:
    """One linear layer: after correction, E[W_q x + b'] == E[W x + b] on calib exactly."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 5)).eval()
    calib = _data(200)
    comp = compress(model, CompressionConfig(quant=QuantConfig(bits=2), bias_correction=True),
                    calib=calib)  # fmt: skip
    with torch.no_grad():
        ref = model(calib.x).mean(dim=0)
        out = comp.model(calib.x).mean(dim=0)
        plain = compress(model, CompressionConfig(quant=QuantConfig(bits=2))).model(calib.x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert (plain.mean(dim=0) - ref).abs().max() > 1e-3  # there was a shift to correct
    # the weights are those of plain rounding; only the bias moved
    r = comp.layer("1")
    assert torch.equal(r.codes, compress(model, CompressionConfig(
        quant=QuantConfig(bits=2))).layer("1").codes)  # fmt: skip
    assert r.bias is not None and not torch.equal(r.bias, model[1].bias)


def test_bias_correction_needs_calib_and_refuses_the_test_split() -> None:
    model = make_bn_model()
    cfg = CompressionConfig(quant=QuantConfig(bits=3), bias_correction=True)
    with pytest.raises(ValueError, match="calibration data"):
        compress(model, cfg)
    with pytest.raises(ValueError, match="never from the test split"):
        compress(model, cfg, calib=_data(16, split="test"))


def test_bias_correction_reads_only_the_calib_split(monkeypatch) -> None:
    """Everything it reads comes through the calib split given: record every graph run."""
    model = make_bn_model()
    calib = _data(48)
    seen = []
    g = graph_of(model)
    real = type(g).run

    def spy(self, x, *a, **k):
        seen.append(x)
        return real(self, x, *a, **k)

    monkeypatch.setattr(type(g), "run", spy)
    compress(model, CompressionConfig(quant=QuantConfig(bits=3), bias_correction=True),
             calib=calib)  # fmt: skip
    assert seen
    rows = {bytes(r.numpy().tobytes()) for r in calib.x}
    for x in seen:
        assert all(bytes(r.numpy().tobytes()) in rows for r in x)


def test_bias_correction_on_a_sample_model_keeps_the_file_size() -> None:
    model = qcore.load_model("mnist-dwsep")
    calib = qcore.load_dataset("mnist-5k", "calib")
    q = QuantConfig(bits=3, per_channel=True)
    plain = compress(model, CompressionConfig(quant=q))
    fixed = compress(model, CompressionConfig(quant=q, bias_correction=True), calib=calib)
    assert fixed.size_bytes == plain.size_bytes
    assert _payload(fixed) == fixed.size_bytes == _payload(plain)
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(plain.layers, fixed.layers,
                                                             strict=True))  # fmt: skip


# ---------------------------------------------------------------- AdaRound


@pytest.fixture
def few_steps(monkeypatch):
    monkeypatch.setattr(ptq, "ADAROUND_ITERS", 60)


@pytest.mark.parametrize("per_channel,symmetric", [(False, True), (True, False)])
def test_adaround_codes_on_the_same_grid_same_size(few_steps, per_channel, symmetric) -> None:
    model = make_bn_model()
    calib = _data(64)
    q = QuantConfig(bits=3, per_channel=per_channel, symmetric=symmetric)
    near = compress(model, CompressionConfig(quant=q))
    ada = compress(model, CompressionConfig(quant=QuantConfig(
        bits=3, per_channel=per_channel, symmetric=symmetric, rounding="adaround")),
        calib=calib)  # fmt: skip
    assert ada.size_bytes == near.size_bytes
    assert _payload(ada) == ada.size_bytes == _payload(near)
    for a, n in zip(ada.layers, near.layers, strict=True):
        assert torch.equal(a.qparams.scale, n.qparams.scale)  # the same grid
        assert torch.equal(a.qparams.zero_point, n.qparams.zero_point)
        assert a.codes.dtype == n.codes.dtype
        assert int(a.codes.min()) >= a.qparams.qmin and int(a.codes.max()) <= a.qparams.qmax
        # each code is the floor or the ceiling of w / s + z (clamped to the grid)
        g = a.qparams.scale.numel()
        t = (a.float_weight.reshape(g, -1) / a.qparams.scale[:, None]
             + a.qparams.zero_point[:, None])  # fmt: skip
        c = a.codes.reshape(g, -1).float()
        lo = torch.floor(t).clamp(a.qparams.qmin, a.qparams.qmax)
        hi = torch.ceil(t).clamp(a.qparams.qmin, a.qparams.qmax)
        assert bool(((c == lo) | (c == hi)).all())
        changed = float((a.codes != n.codes).float().mean())
        assert a.rounding_changed == pytest.approx(changed)
        assert n.rounding_changed is None
    # the file stores the learnt codes: a reload runs the same model
    x = calib.x[:8]
    with torch.no_grad():
        torch.testing.assert_close(load_packed_bytes(ada, model).model(x), ada.model(x), rtol=1e-5,
                                   atol=1e-5)  # fmt: skip


def test_adaround_reconstructs_better_than_nearest(few_steps, monkeypatch) -> None:
    """On one layer, AdaRound's output error on its own calibration inputs is below
    round-to-nearest's."""
    monkeypatch.setattr(ptq, "ADAROUND_ITERS", 300)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 8)).eval()
    calib = _data(256)
    q = dict(bits=2, per_channel=True)
    near = compress(model, CompressionConfig(quant=QuantConfig(**q)))
    ada = compress(model, CompressionConfig(quant=QuantConfig(**q, rounding="adaround")),
                   calib=calib)  # fmt: skip
    with torch.no_grad():
        ref = model(calib.x)
        e_near = (near.model(calib.x) - ref).pow(2).mean()
        e_ada = (ada.model(calib.x) - ref).pow(2).mean()
    assert e_ada < e_near
    assert 0 < ada.layers[0].rounding_changed < 1


def test_adaround_needs_calib_and_two_bits(few_steps) -> None:
    model = make_bn_model()
    with pytest.raises(ValueError, match="AdaRound needs calibration data"):
        compress(model, CompressionConfig(quant=QuantConfig(bits=4, rounding="adaround")))
    with pytest.raises(ValueError, match="never from the test split"):
        compress(model, CompressionConfig(quant=QuantConfig(bits=4, rounding="adaround")),
                 calib=_data(8, split="test"))  # fmt: skip
    with pytest.raises(ValueError, match="at least 2 bits"):
        compress(model, CompressionConfig(quant=QuantConfig(bits=1, rounding="adaround")),
                 calib=_data(8))  # fmt: skip


def test_adaround_learns_under_inference_mode(few_steps) -> None:
    model, calib = make_bn_model(), _data(16)
    cfg = CompressionConfig(quant=QuantConfig(bits=3, rounding="adaround"))
    plain = compress(model, cfg, calib=calib)
    with torch.inference_mode():
        inside = compress(model, cfg, calib=calib)
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(plain.layers, inside.layers,
                                                             strict=True))  # fmt: skip


def test_adaround_reports_progress_per_layer(few_steps) -> None:
    model = make_bn_model()
    calls = []
    compress(model, CompressionConfig(quant=QuantConfig(bits=4, rounding="adaround")),
             calib=_data(16), progress=lambda d, t, row: calls.append((d, t, row["layer"])))
    assert calls == [(i + 1, 4, n) for i, n in enumerate(["0", "3", "7", "10"])]


# ---------------------------------------------------------------- configs and settings


def test_configs_round_trip_with_the_new_options() -> None:
    cfg = CompressionConfig(quant=QuantConfig(bits=3, rounding="adaround"), equalize=True,
                            bias_correction=True)  # fmt: skip
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["equalize"] is True and d["bias_correction"] is True
    assert d["quant"]["rounding"] == "adaround"
    assert CompressionConfig.from_dict(d) == cfg
    assert "equalize" not in CompressionConfig().to_dict()  # old files read the same
    with pytest.raises(ValueError, match="equalize must be true or false"):
        CompressionConfig.from_dict({"equalize": "yes"})
    s = Settings.from_config(cfg)
    assert (s.equalize, s.bias_correction, s.rounding) == (True, True, "adaround")
    assert s.to_config() == cfg
    flat = s.to_flat()
    assert flat["equalize"] == "true" and flat["bias_correction"] == "true"
    assert flat["rounding"] == "adaround"
    back, warnings = Settings.from_flat(flat)
    assert back == s and warnings == []
    assert "AdaRound" in s.label() and "equalized" in s.label()
    assert s.needs_calib and not Settings(equalize=True).needs_calib


def test_flat_settings_refuse_a_bad_equalize_value() -> None:
    values, warnings = Settings.from_flat({"equalize": "maybe"})
    assert values == Settings()
    assert warnings and "equalize=maybe" in warnings[0]


def test_packed_file_header_holds_the_config() -> None:
    model = make_bn_model()
    cfg = CompressionConfig(quant=QuantConfig(bits=4), equalize=True, bias_correction=True)
    comp = compress(model, cfg, calib=_data(16))
    assert load_packed_bytes(comp, model).config == cfg


# ---------------------------------------------------------------- the command line


def test_cli_flags_reach_the_config(capsys, tmp_path, few_steps) -> None:
    from qcore.cli import main
    from qcore.export import read_header

    argv = ["--model", "digits-mlp", "--bits", "3", "--equalize", "--bias-correction",
            "--rounding", "adaround"]  # fmt: skip
    assert main(["evaluate", *argv]) == 0
    out = capsys.readouterr()
    cfg = CompressionConfig(quant=QuantConfig(bits=3, rounding="adaround"), equalize=True,
                            bias_correction=True)  # fmt: skip
    c = compress(qcore.load_model("digits-mlp"), cfg, calib=qcore.load_dataset("digits", "calib"))
    m = qcore.evaluate(c.model, qcore.load_dataset("digits", "test"))
    assert f"simulated accuracy  {m.accuracy:.4f}" in out.out
    assert "equalized pairs     fc1->fc2" in out.out
    assert f"rounding changed {c.layer('fc1').rounding_changed:.3f}" in out.out
    assert "AdaRound 2/2: fc2" in out.err
    path = tmp_path / "m.qpk"
    assert main(["export", *argv, "--out", str(path)]) == 0
    assert CompressionConfig.from_dict(read_header(path)["config"]) == cfg


def test_sweep_grid_has_the_remedies_as_axes(few_steps) -> None:
    grid = qcore.SweepGrid(bits=[1, 3], rounding=["nearest", "adaround"], equalize=[False, True],
                           bias_correction=[True])  # fmt: skip
    assert len(grid) == 2 + 4  # 1 bit has no rounding choice
    assert qcore.SweepGrid.from_dict(json.loads(json.dumps(grid.to_dict()))) == grid
    model = qcore.load_model("digits-mlp")
    test, calib = qcore.load_dataset("digits", "test"), qcore.load_dataset("digits", "calib")
    df = qcore.sweep(model, test, qcore.SweepGrid(bits=[3], equalize=[False, True],
                                                  bias_correction=[False, True]), calib=calib)
    assert df[["equalize", "bias_correction"]].values.tolist() == [
        [False, False], [False, True], [True, False], [True, True]]
    cfg = CompressionConfig(quant=QuantConfig(bits=3), equalize=True, bias_correction=True)
    direct = qcore.evaluate(compress(model, cfg, calib=calib).model, test).accuracy
    assert df["accuracy"].iloc[3] == direct
    with pytest.raises(ValueError, match="rounding must be one of"):
        qcore.SweepGrid(rounding=["up"])
