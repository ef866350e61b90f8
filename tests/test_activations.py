"""Tests for qcore.activations: calibrated ranges per edge, against torch.ao's observers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import Residual
from torch import nn

from qcore.activations import activation_edges, calibrate, entropy_threshold, placement
from qcore.config import ActQuantConfig, CompressionConfig
from qcore.graph import graph_of


@dataclass(frozen=True)
class Split:
    """The parts of a qcore Dataset that calibration reads."""

    x: torch.Tensor
    split: str = "calib"
    name: str = "synthetic"

    def inputs(self, rows: slice = slice(None)) -> torch.Tensor:
        return self.x[rows]


def one_layer(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 4)).eval()


def test_minmax_matches_torch_ao_observer_and_fake_quant() -> None:
    """Oracle: min-max asymmetric 8-bit equals MinMaxObserver + fake_quantize_per_tensor."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 8, generator=g) * 3 + 0.7
    graph = graph_of(one_layer())
    ranges = calibrate(graph, Split(x), ActQuantConfig(bits=8, observer="minmax"), ["0.input"])
    r = ranges["0.input"]
    obs = torch.ao.quantization.MinMaxObserver(dtype=torch.quint8,
                                               qscheme=torch.per_tensor_affine)
    for i in range(0, 600, 256):  # batch by batch, as calibration runs
        obs(x[i : i + 256])
    scale, zp = obs.calculate_qparams()
    assert r.scale == float(scale) and r.zero_point == int(zp)
    expected = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), 0, 255)
    assert torch.equal(r.fake_quantize(x), expected)


def test_calibration_never_reads_the_test_split() -> None:
    graph = graph_of(one_layer())
    with pytest.raises(ValueError, match="never on the test split"):
        calibrate(graph, Split(torch.randn(10, 8), split="test"), ActQuantConfig(), ["0.input"])


def test_batches_do_not_change_minmax_ranges() -> None:
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(2))
    graph = graph_of(one_layer(3))
    cfg = ActQuantConfig(bits=4, observer="minmax")
    a = calibrate(graph, Split(x, name="a"), cfg, ["0.input"], batch_size=7)["0.input"]
    b = calibrate(graph, Split(x.clone(), name="b"), cfg, ["0.input"], batch_size=300)["0.input"]
    assert (a.lo, a.hi, a.scale, a.zero_point) == (b.lo, b.hi, b.scale, b.zero_point)
    assert a.lo == float(x.min()) and a.hi == float(x.max())


def test_percentile_ignores_one_outlier_and_minmax_does_not() -> None:
    """A ReLU-like input with one huge value: min-max spends its levels on the outlier."""
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2000, 8, generator=g)
    x[0, 0] = 100.0
    graph = graph_of(one_layer())
    mm = calibrate(graph, Split(x), ActQuantConfig(bits=8), ["0.input"])["0.input"]
    pc = calibrate(graph, Split(x), ActQuantConfig(bits=8, observer="percentile",
                                                   percentile=99.9), ["0.input"])["0.input"]
    assert mm.hi == 100.0 and pc.hi < 1.1
    err = {k: float((r.fake_quantize(x[1:]) - x[1:]).square().mean()) for k, r in
           (("minmax", mm), ("percentile", pc))}  # fmt: skip
    assert err["percentile"] < err["minmax"] / 100


@pytest.mark.parametrize("observer", ["mse", "entropy"])
def test_search_observers_clip_a_long_tail(observer: str) -> None:
    g = torch.Generator().manual_seed(5)
    x = -torch.log(torch.rand(4000, 8, generator=g))  # exponential: a long right tail
    graph = graph_of(one_layer())
    cfg = ActQuantConfig(bits=4, observer=observer)
    r = calibrate(graph, Split(x), cfg, ["0.input"])["0.input"]
    mm = calibrate(graph, Split(x), ActQuantConfig(bits=4), ["0.input"])["0.input"]
    assert 0.0 <= r.lo and r.hi < mm.hi  # clipped below the maximum

    def mse(rr) -> float:
        return float((rr.fake_quantize(x) - x).square().mean())

    assert mse(r) < mse(mm)


def test_entropy_threshold_hand_case() -> None:
    h = np.round(1000 * np.exp(-np.arange(64) / 3))  # a decaying tail ...
    h[63] = 1.0  # ... and one outlier at the top
    t = entropy_threshold(h, 64.0, 4)
    assert 4.0 < t < 32.0  # the tail is clipped, the 4 levels go where the mass is
    flat = np.ones(64)  # nothing to gain by clipping a flat histogram
    assert entropy_threshold(flat, 64.0, 4) == 64.0
    assert entropy_threshold(np.ones(4), 4.0, 8) == 4.0  # fewer bins than levels: all of it


def test_edges_are_where_an_int8_engine_stores_tensors() -> None:
    """b(relu(a(x)) + x): the input, a + relu's output, the sum; the logits stay float."""
    graph = graph_of(Residual().eval())
    assert activation_edges(graph) == ["input", "relu", "add"]
    assert activation_edges(graph, output=True) == ["input", "relu", "add", "b"]
    assert activation_edges(graph, ["b"]) == ["input", "add"]  # a's group left float
    p = placement(graph)
    assert p.inputs == {"a": "input", "b": "add"} and p.logits == "b"
    assert p.describe("relu") == "a + relu output"


def test_placement_fuses_conv_bn_relu_and_add_relu_and_pools_keep_qparams() -> None:
    """mnist-resnet: no edge inside a block's conv+BN+ReLU or add+ReLU; the average pool
    is rounded on its input's grid; the fc reads it."""
    import qcore

    graph = graph_of(qcore.load_model("mnist-resnet"))
    p = placement(graph)
    assert p.edges == ("input", "stem_2", "layer1_relu1", "layer1_conv2", "layer1_relu2",
                       "layer2_relu1", "layer2_conv2", "layer2_shortcut_0", "layer2_relu2",
                       "layer3_relu1", "layer3_conv2", "layer3_shortcut_0", "layer3_relu2")
    assert not any(e.startswith("add") for e in p.edges)  # every sum is stored after its ReLU
    assert p.groups["layer1_relu2"] == ("add", "layer1.relu2")
    assert p.shared == {"layer1_shortcut": "stem_2", "pool": "layer3_relu2",
                        "flatten": "layer3_relu2"}
    assert p.rounds == ("pool",) and p.inputs["fc"] == "pool" and p.logits == "fc"
    cnn = placement(graph_of(qcore.load_model("mnist-cnn")))
    assert cnn.edges == ("input", "relu1", "relu2", "relu3") and cnn.rounds == ()
    assert cnn.inputs == {"conv1": "input", "conv2": "relu1", "fc1": "relu2", "fc2": "relu3"}


def test_act_config_checks_and_round_trips() -> None:
    c = CompressionConfig(act=ActQuantConfig(bits=4, observer="entropy"))
    assert CompressionConfig.from_dict(c.to_dict()) == c
    assert "act" not in CompressionConfig().to_dict()  # files without activations unchanged
    with pytest.raises(ValueError, match="at least 2 bits"):
        ActQuantConfig(bits=1)
    with pytest.raises(ValueError, match="observer"):
        ActQuantConfig(observer="kl")
    with pytest.raises(ValueError, match="percentile"):
        ActQuantConfig(observer="percentile", percentile=0.0)
    with pytest.raises(ValueError, match="ActQuantConfig"):
        CompressionConfig(act=8)


# ---------------------------------------------------------------- through compress


def _splits(name: str):
    import qcore

    ds = qcore.model_info(name).dataset
    return qcore.load_model(name), qcore.load_dataset(ds, "test"), qcore.load_dataset(ds, "calib")


def test_compress_needs_calibration_data_and_refuses_the_test_split() -> None:
    import qcore

    model, test, _ = _splits("digits-mlp")
    cfg = CompressionConfig(act=ActQuantConfig())
    with pytest.raises(ValueError, match="calibration data"):
        qcore.compress(model, cfg)
    with pytest.raises(ValueError, match="never on the test split"):
        qcore.compress(model, cfg, calib=test)


@pytest.mark.parametrize("name", ["digits-mlp", "mnist-lenet300", "mnist-cnn", "mnist-dwsep",
                                  "mnist-resnet"])
def test_w16a16_matches_float_and_w8a8_stays_within_a_point(name: str) -> None:
    import qcore
    from qcore.config import QuantConfig

    model, test, calib = _splits(name)
    ref = qcore.evaluate(model, test).accuracy
    c16 = qcore.compress(model, CompressionConfig(quant=QuantConfig(bits=16),
                                                  act=ActQuantConfig(bits=16)), calib=calib)
    c8 = qcore.compress(model, CompressionConfig(quant=QuantConfig(bits=8),
                                                 act=ActQuantConfig(bits=8)), calib=calib)
    assert abs(qcore.evaluate(c16.model, test).accuracy - ref) <= 0.001
    assert abs(qcore.evaluate(c8.model, test).accuracy - ref) <= 0.01
    # every weight layer's input is quantized, and the record says how
    assert all(r.act is not None and r.act.bits == 8 for r in c8.layers)
    assert {r.act.edge for r in c8.layers} <= set(c8.activations)
    assert "input" in c8.activations


def test_two_bit_activations_cost_accuracy_and_calibration_ignores_the_test_split() -> None:
    import qcore

    model, test, calib = _splits("mnist-cnn")
    c2 = qcore.compress(model, CompressionConfig(act=ActQuantConfig(bits=2)), calib=calib)
    c8 = qcore.compress(model, CompressionConfig(act=ActQuantConfig(bits=8)), calib=calib)
    # 4 levels per activation: 96.5 % against 98.5 % at 8 bits on mnist-cnn
    assert qcore.evaluate(c2.model, test).accuracy < qcore.evaluate(c8.model, test).accuracy - 0.01
    # poison the test split in place (a copy of the shared data): the ranges do not move
    before = {e: (r.lo, r.hi) for e, r in c8.activations.items()}
    poisoned = type(test)(**{**test.__dict__, "x": test.x * 100 + 7})
    qcore.evaluate(c8.model, poisoned)
    again = qcore.compress(model, CompressionConfig(act=ActQuantConfig(bits=8)), calib=calib)
    assert {e: (r.lo, r.hi) for e, r in again.activations.items()} == before


def test_weight_sliders_do_not_recalibrate(monkeypatch: pytest.MonkeyPatch) -> None:
    import qcore
    from qcore import activations
    from qcore.config import QuantConfig

    model, _, calib = _splits("digits-mlp")
    act = ActQuantConfig(bits=6, observer="percentile")
    qcore.compress(model, CompressionConfig(quant=QuantConfig(bits=8), act=act), calib=calib)
    calls = []
    real = activations.HistogramObserver.update
    monkeypatch.setattr(activations.HistogramObserver, "update",
                        lambda self, *a, **k: (calls.append(1), real(self, *a, **k)))
    for bits in (2, 4, 8):
        qcore.compress(model, CompressionConfig(quant=QuantConfig(bits=bits), act=act),
                       calib=calib)
    assert calls == []


def test_export_carries_the_activation_ranges(tmp_path) -> None:
    import qcore
    from qcore.config import QuantConfig

    model, test, calib = _splits("mnist-resnet")  # additions (residuals) are edges too
    c = qcore.compress(model, CompressionConfig(quant=QuantConfig(bits=6, scale="pow2"),
                                                act=ActQuantConfig(bits=4, scale="pow2")),
                       calib=calib)
    assert "layer1_relu2" in c.activations  # add + ReLU: one edge after the sum
    qcore.export_packed(c, tmp_path / "m.qpk")
    packed = qcore.load_packed(tmp_path / "m.qpk")
    assert packed.config == c.config
    x = test.x[:64]
    with torch.inference_mode():
        assert torch.equal(packed.model(x), c.model(x))
    for r in c.activations.values():  # power-of-two activation scales
        assert r.scale == 2.0 ** round(np.log2(r.scale))


def test_activation_histogram_bins_what_reaches_the_edge() -> None:
    import qcore
    from qcore.analysis import ACT_HISTOGRAM_IMAGES

    model, _, calib = _splits("mnist-cnn")
    c = qcore.compress(model, CompressionConfig(act=ActQuantConfig(bits=3)), calib=calib)
    r = c.layer("fc2").act
    assert r.edge == "relu3"  # fc1 + relu3's output is what fc2 reads
    h = qcore.activation_histogram(c, r.edge, calib)
    n = min(ACT_HISTOGRAM_IMAGES, len(calib.x)) * c.layer("fc2").shape[1]
    assert int(h.before.sum()) == int(h.after.sum()) == n  # every value, once
    assert len(h.levels) == 8 and h.clip == r.grid_range and h.requested == (r.lo, r.hi)
    # after quantization every value sits on one of the 8 levels
    occupied = h.centers[h.after > 0]
    step = h.edges[1] - h.edges[0]
    assert all(np.min(np.abs(h.levels - v)) <= step for v in occupied)
    with pytest.raises(ValueError, match="No quantized activation edge"):
        qcore.activation_histogram(c, "nope", calib)


@pytest.mark.parametrize("name", ["digits-mlp", "mnist-lenet300", "mnist-cnn", "mnist-dwsep",
                                  "mnist-resnet"])
def test_w8a8_agrees_with_torch_ao_int8_kernels(name: str) -> None:
    """External oracle: torch.ao's FX-mode int8 model (real int8 kernels, min-max
    activations, per-channel weights) calibrated on the same split; within 1 point."""
    import copy
    import warnings

    from torch.ao.quantization import (
        MinMaxObserver,
        PerChannelMinMaxObserver,
        QConfig,
        QConfigMapping,
    )
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    import qcore
    from qcore.config import QuantConfig

    model, test, calib = _splits(name)
    torch.backends.quantized.engine = "fbgemm"
    qconfig = QConfig(
        activation=MinMaxObserver.with_args(dtype=torch.quint8, reduce_range=True),
        weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8,
                                                  qscheme=torch.per_channel_symmetric),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model), QConfigMapping().set_global(qconfig),
                              (calib.x[:2],))
        with torch.inference_mode():
            for i in range(0, len(calib.x), 256):
                prepared(calib.x[i : i + 256])
        int8 = convert_fx(prepared)
    with torch.inference_mode():
        theirs = float((int8(test.x).argmax(1) == test.y).double().mean())
    c = qcore.compress(model, CompressionConfig(quant=QuantConfig(bits=8, per_channel=True),
                                                act=ActQuantConfig(bits=8)), calib=calib)
    ours = qcore.evaluate(c.model, test).accuracy
    assert abs(ours - theirs) <= 0.01, (ours, theirs)


def test_a_loaded_activation_file_evaluates_like_the_compressed_model(tmp_path) -> None:
    import qcore

    model, test, calib = _splits("digits-mlp")
    c = qcore.compress(model, CompressionConfig(act=ActQuantConfig(bits=3)), calib=calib)
    qcore.export_packed(c, tmp_path / "m.qpk")
    loaded = qcore.load_packed(tmp_path / "m.qpk").model
    assert qcore.evaluate(loaded, test).accuracy == qcore.evaluate(c.model, test).accuracy


def test_extremes_observer_equals_the_min_max_observer_and_refuses_nan() -> None:
    from qcore.observers import ExtremesObserver, MinMaxObserver

    g = torch.Generator().manual_seed(3)
    a, b = ExtremesObserver(), MinMaxObserver()
    for _ in range(4):
        x = torch.randn(2, 50, generator=g) * 3
        a.update(x)
        b.update(x)
    assert all(torch.equal(u, v) for u, v in zip(a.extremes(), b.extremes(), strict=True))
    with pytest.raises(ValueError, match="NaN or infinite"):
        a.update(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="2 groups"):
        a.update(torch.zeros(3, 4))


@pytest.mark.parametrize("observer", ["minmax", "percentile"])
def test_a_new_activation_width_reuses_the_statistics_without_a_pass(observer: str) -> None:
    """The statistics do not depend on the bit width: a new width derives its ranges from
    the cached ones, and they equal a calibration from scratch."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 8, generator=g)
    model = one_layer(4)
    graph = graph_of(model)
    runs = []
    original = graph.run

    def counting_run(*args, **kwargs):
        runs.append(1)
        return original(*args, **kwargs)

    graph.run = counting_run  # an instance attribute: this graph only
    try:
        r8 = calibrate(graph, Split(x), ActQuantConfig(bits=8, observer=observer), ["0.input"])
        passes = len(runs)
        r4 = calibrate(graph, Split(x), ActQuantConfig(bits=4, observer=observer), ["0.input"])
        assert len(runs) == passes > 0  # no second pass over the data
    finally:
        del graph.run
    fresh = calibrate(graph_of(one_layer(4)), Split(x), ActQuantConfig(bits=4, observer=observer),
                      ["0.input"])  # fmt: skip
    assert (r4["0.input"].lo, r4["0.input"].hi) == (fresh["0.input"].lo, fresh["0.input"].hi)
    assert r8["0.input"].scale != r4["0.input"].scale


def _torch_ao_fake_quant(model: nn.Module, calib, bits: int, logits_layer: str) -> nn.Module:
    """torch.ao's FX fake-quant: min-max per tensor, conv+bn+relu and add+relu fused, the
    last layer left float; observers calibrated first, then fake quant switched on."""
    import copy
    import warnings

    from torch.ao.quantization import (
        FakeQuantize,
        MinMaxObserver,
        QConfig,
        QConfigMapping,
        disable_fake_quant,
        disable_observer,
        enable_fake_quant,
        enable_observer,
    )
    from torch.ao.quantization.quantize_fx import prepare_fx

    act = FakeQuantize.with_args(observer=MinMaxObserver, quant_min=0, quant_max=2**bits - 1,
                                 dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    weight = FakeQuantize.with_args(observer=MinMaxObserver, dtype=torch.qint8,
                                    qscheme=torch.per_tensor_symmetric)
    mapping = QConfigMapping().set_global(QConfig(activation=act, weight=weight))
    mapping = mapping.set_module_name(logits_layer, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model), mapping, (calib.x[:2],))
    prepared.apply(disable_fake_quant)
    prepared.apply(enable_observer)
    with torch.inference_mode():
        for i in range(0, len(calib.x), 256):
            prepared(calib.x[i : i + 256])
    prepared.apply(disable_observer)
    prepared.apply(enable_fake_quant)
    return prepared  # runs float weights (post-training prepare) and fake-quant activations


@pytest.mark.parametrize("name,logits", [("mnist-cnn", "fc2"), ("mnist-resnet", "fc")])
def test_low_bit_activations_match_torch_ao_fused_placement(name: str, logits: str) -> None:
    """External oracle at A3 and A2 (float weights): within 1 point of torch.ao's fake-quant
    (measured: equal, 98.6/96.5 % on mnist-cnn, 89.9/11.2 % on mnist-resnet)."""
    import qcore

    model, test, calib = _splits(name)
    for bits in (3, 2):
        ref = _torch_ao_fake_quant(model, calib, bits, logits)
        with torch.inference_mode():
            theirs = float((ref(test.x).argmax(1) == test.y).double().mean())
        c = qcore.compress(model, CompressionConfig(quant=None, act=ActQuantConfig(bits=bits)),
                           calib=calib)
        ours = qcore.evaluate(c.model, test).accuracy
        assert abs(ours - theirs) <= 0.01, (bits, ours, theirs)


def test_output_true_quantizes_the_logits() -> None:
    import qcore

    model, test, calib = _splits("mnist-cnn")
    off = qcore.compress(model, CompressionConfig(act=ActQuantConfig(bits=3)), calib=calib)
    on = qcore.compress(model, CompressionConfig(act=ActQuantConfig(bits=3, output=True)),
                        calib=calib)
    assert set(on.activations) - set(off.activations) == {"fc2"}
    with torch.inference_mode():
        logits = on.model(test.x[:32])
    assert len(torch.unique(logits)) <= 8  # 3-bit codes: at most 8 values
    cfg = CompressionConfig(act=ActQuantConfig(bits=3, output=True))
    assert CompressionConfig.from_dict(cfg.to_dict()) == cfg
    assert "output" not in ActQuantConfig().to_dict()
    with pytest.raises(ValueError, match="float logits"):  # no flat setting (URL) says it
        qcore.Settings.from_config(cfg)


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 12, 16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_an_edges_fused_fake_quant_equals_qcores_formula_bit_for_bit(bits, symmetric) -> None:
    """ActRange.fake_quantize runs torch's fused kernel; it must give exactly the values of
    qcore.affine.fake_quantize (quantize_codes then dequantize_codes)."""
    from qcore.activations import ActRange
    from qcore.affine import fake_quantize, qparams_from_range

    g = torch.Generator().manual_seed(bits * 2 + symmetric)
    for scale in (1e-3, 1.0, 300.0):
        x = torch.randn(20_000, generator=g) * scale
        lo, hi = torch.tensor([float(x.min()) * 0.7]), torch.tensor([float(x.max()) * 0.6])
        qp = qparams_from_range(lo, hi, bits, symmetric)
        r = ActRange("e", float(lo[0]), float(hi[0]), float(lo[0]), float(hi[0]), qp, bits,
                     symmetric)  # fmt: skip
        assert torch.equal(r.fake_quantize(x), fake_quantize(x.reshape(1, -1), qp).reshape(-1))
