"""Tests for qcore.onnx: QDQ export, ONNX Runtime accuracy against the simulation, latency."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import qcore
from qcore.config import ActQuantConfig, CompressionConfig, PruneConfig, QuantConfig

SAMPLES = ["digits-mlp", "mnist-lenet300", "mnist-cnn", "mnist-dwsep", "mnist-resnet"]
LOGITS = {"digits-mlp": "fc2", "mnist-lenet300": "fc3", "mnist-cnn": "fc2",
          "mnist-dwsep": "fc", "mnist-resnet": "fc"}  # fmt: skip


def _splits(name: str):
    ds = qcore.model_info(name).dataset
    return qcore.load_model(name), qcore.load_dataset(ds, "test"), qcore.load_dataset(ds, "calib")


def _initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


W8A8 = CompressionConfig(quant=QuantConfig(bits=8), act=ActQuantConfig(bits=8))


@pytest.mark.parametrize("name", SAMPLES)
def test_w8a8_onnx_runtime_scores_as_simulated(name: str, tmp_path) -> None:
    """Min-max W8A8: ONNX Runtime's int8 kernels within 0.5 pp of the simulation and
    agreeing on >= 99 % of the test images; every layer but the logits runs integer."""
    model, test, calib = _splits(name)
    c = qcore.compress(model, W8A8, calib=calib)
    e = qcore.export_onnx(c, tmp_path / "m.onnx")
    onnx.checker.check_model(onnx.load(str(e.path)), full_check=True)
    assert e.size_bytes == e.path.stat().st_size
    names = [r.name for r in c.layers]
    assert sorted(e.integer_layers + e.fake_quant_layers) == sorted(names)
    assert e.fake_quant_layers == (LOGITS[name],) and "logits" in e.reasons[LOGITS[name]]
    kernels = qcore.integer_kernels(e.path, names)
    assert set(kernels) == set(e.integer_layers)
    sim = qcore.evaluate(c.model, test)
    real = qcore.run_onnx(e.path, test)
    assert real.n == sim.n == len(test.y)
    assert abs(real.accuracy - sim.accuracy) <= 0.005, (real.accuracy, sim.accuracy)
    assert qcore.agreement(real, sim) >= 0.99


@pytest.mark.parametrize("quant", [QuantConfig(bits=8), QuantConfig(bits=8, per_channel=True),
                                   QuantConfig(bits=8, symmetric=False)])
def test_int8_initializers_are_qcores_codes_scales_and_zero_points(quant, tmp_path) -> None:
    model, _, calib = _splits("mnist-cnn")
    c = qcore.compress(model, CompressionConfig(quant=quant, act=ActQuantConfig(bits=8),
                                                prune=PruneConfig(rate=0.3)), calib=calib)
    e = qcore.export_onnx(c, tmp_path / "m.onnx")
    inits = _initializers(e.path)
    for r in c.layers:
        codes = inits[f"{r.name}.weight_quantized"]
        assert codes.dtype == (np.int8 if quant.symmetric else np.uint8)
        assert np.array_equal(codes.astype(np.int64), r.codes.numpy().astype(np.int64))
        scale = inits[f"{r.name}.weight_scale"].reshape(-1)
        assert scale.dtype == np.float32 and np.array_equal(scale, r.scales.numpy())
        zp = inits[f"{r.name}.weight_zero_point"].reshape(-1)
        assert np.array_equal(zp.astype(np.int64), r.zero_points.numpy())
    for edge, a in c.activations.items():  # activation pairs: the calibrated qparams exactly
        assert inits[f"{edge}.scale"].item() == a.scale
        assert int(inits[f"{edge}.zero_point"].item()) == a.zero_point
        assert inits[f"{edge}.zero_point"].dtype == np.uint8


def test_w4a8_names_its_fallback_layers_and_still_runs(tmp_path) -> None:
    model, test, calib = _splits("mnist-cnn")
    cfg = CompressionConfig(quant=QuantConfig(bits=4, layer_bits=(("fc1", 8),)),
                            act=ActQuantConfig(bits=8))
    c = qcore.compress(model, cfg, calib=calib)
    e = qcore.export_onnx(c, tmp_path / "m.onnx")
    assert e.integer_layers == ("fc1",)  # the one 8-bit layer with an 8-bit input and output
    assert e.fake_quant_layers == ("conv1", "conv2", "fc2")
    assert e.reasons["conv1"].startswith("4-bit weights: no integer kernel")
    inits = _initializers(e.path)
    w = inits["conv1.weight"]  # 4-bit weights written as their float fake-quant values
    assert w.dtype == np.float32 and np.array_equal(w, c.layer("conv1").dequantized.numpy())
    assert len(np.unique(w[0])) <= 15
    real, sim = qcore.run_onnx(e.path, test), qcore.evaluate(c.model, test)
    assert abs(real.accuracy - sim.accuracy) <= 0.005 and qcore.agreement(real, sim) >= 0.99


@pytest.mark.parametrize("name", ["mnist-cnn", "mnist-resnet"])
def test_low_bit_activations_export_as_float_fake_quant_and_match_the_simulation(
    name: str, tmp_path
) -> None:
    """A3: no integer kernel; the float ops round exactly as qcore does (same float32 ops)."""
    model, test, calib = _splits(name)
    c = qcore.compress(model, CompressionConfig(quant=QuantConfig(bits=8),
                                                act=ActQuantConfig(bits=3)), calib=calib)
    e = qcore.export_onnx(c, tmp_path / "m.onnx")
    assert e.integer_layers == ()
    assert all("3-bit input activations" in e.reasons[r.name] for r in c.layers)
    real, sim = qcore.run_onnx(e.path, test), qcore.evaluate(c.model, test)
    assert abs(real.accuracy - sim.accuracy) <= 0.005 and qcore.agreement(real, sim) >= 0.99


def test_float_export_runs_like_pytorch(tmp_path) -> None:
    model, test, _ = _splits("mnist-resnet")
    c = qcore.compress(model, CompressionConfig(quant=None))
    e = qcore.export_onnx(c, tmp_path / "f.onnx")
    assert e.integer_layers == () and set(e.reasons.values()) == {"left in float32"}
    real, ref = qcore.run_onnx(e.path, test), qcore.evaluate(model, test)
    assert qcore.agreement(real, ref) == 1.0 and real.accuracy == ref.accuracy


def test_logits_quantized_on_request_make_the_last_layer_integer(tmp_path) -> None:
    model, test, calib = _splits("digits-mlp")
    cfg = CompressionConfig(quant=QuantConfig(bits=8), act=ActQuantConfig(bits=8, output=True))
    c = qcore.compress(model, cfg, calib=calib)
    e = qcore.export_onnx(c, tmp_path / "m.onnx")
    assert e.integer_layers == ("fc1", "fc2") and e.fake_quant_layers == ()
    real, sim = qcore.run_onnx(e.path, test), qcore.evaluate(c.model, test)
    assert qcore.agreement(real, sim) >= 0.99


def test_measure_latency_reports_what_it_timed(tmp_path) -> None:
    model, test, calib = _splits("digits-mlp")
    c = qcore.compress(model, W8A8, calib=calib)
    e = qcore.export_onnx(c, tmp_path / "m.onnx")
    for target, runtime in ((model, "PyTorch"), (e.path, "ONNX Runtime")):
        lat = qcore.measure_latency(target, test, batch_size=4, threads=1, seconds=0.05)
        assert lat.runtime == runtime and lat.batch_size == 4 and lat.runs >= 5
        assert 0 < lat.median_ms <= lat.p90_ms
        assert lat.threads == (1 if runtime == "ONNX Runtime" else torch.get_num_threads())
        assert set(lat.cpu.flags) <= set(qcore.onnx.INT8_FLAGS)
    with pytest.raises(ValueError, match="batch size"):
        qcore.measure_latency(model, test, batch_size=0)
    with pytest.raises(ValueError, match="No ONNX file"):
        qcore.measure_latency(tmp_path / "missing.onnx", test)


def test_cpu_flags_are_read_and_explained() -> None:
    slow = qcore.cpu_int8("model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n")
    assert slow.flags == ("avx2",) and not slow.fast_int8
    assert "need not be faster" in slow.sentence() and "AMD EPYC" in slow.sentence()
    fast = qcore.cpu_int8("model name : Xeon\nflags : avx2 avx512bw avx512_vnni amx_int8\n")
    assert fast.flags == ("avx2", "avx512bw", "avx512_vnni", "amx_int8") and fast.fast_int8
    assert "can beat float32" in fast.sentence()
    arm = qcore.cpu_int8("Features\t: fp asimd asimddp i8mm\n")
    assert arm.flags == ("asimddp", "i8mm") and arm.fast_int8


def test_an_op_the_export_does_not_know_is_refused_with_a_sentence(tmp_path) -> None:
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)).eval()
    c = qcore.compress(model, CompressionConfig(quant=QuantConfig(bits=8)))
    with pytest.raises(ValueError, match="does not support GELU"):
        qcore.export_onnx(c, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="result of qcore.compress"):
        qcore.export_onnx(model, tmp_path / "m.onnx")


def test_sweep_latency_times_only_rows_with_an_integer_runtime() -> None:
    model, test, calib = _splits("digits-mlp")
    grid = qcore.SweepGrid(bits=[4, 8, None], act_bits=[None, 8])
    seen = []
    df = qcore.onnx.sweep_latency(model, test, grid, calib=calib, seconds=0.02,
                                  progress=lambda d, t, r: seen.append((d, t)))  # fmt: skip
    rows = qcore.sweep(model, test, grid, calib=calib)
    assert len(df) == len(rows) == 6 and seen == [(i, 6) for i in range(1, 7)]
    timed = df["runtime"].notna()
    # only W8A8 has ONNX Runtime integer kernels; the rest are simulated only, not timed
    assert (rows[timed]["bits"] == 8).all() and (rows[timed]["act_bits"] == 8).all()
    assert timed.sum() == 1 and df[timed]["integer_layers"].item() == 1
    assert df[timed]["latency_ms"].item() > 0 and df[~timed]["latency_ms"].isna().all()
    assert df.attrs["float_ms"] > 0 and df.attrs["batch_size"] == 1


def test_a_model_without_a_recorded_shape_needs_input_shape(tmp_path) -> None:
    import onnxruntime as ort
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    c = qcore.compress(model, CompressionConfig(quant=QuantConfig(bits=8)))
    with pytest.raises(ValueError, match="input_shape"):
        qcore.export_onnx(c, tmp_path / "m.onnx")
    e = qcore.export_onnx(c, tmp_path / "m.onnx", input_shape=(1, 4, 4))
    x = torch.randn(5, 1, 4, 4)
    out = ort.InferenceSession(str(e.path)).run(["logits"], {"input": x.numpy()})[0]
    with torch.inference_mode():
        ref = c.model(x).numpy()
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)  # int8 weights, float arithmetic
    assert e.reasons == {"1": "activations are float32: int8 weights, float arithmetic",
                         "3": "activations are float32: int8 weights, float arithmetic"}


def test_quantize_pairs_sit_on_the_placed_edges_and_their_pools(tmp_path) -> None:
    """mnist-cnn W8A8: one QuantizeLinear per edge (input, relu1, relu2, relu3) and one per
    op keeping its input's qparams (pool1, pool2, flatten), none before a ReLU."""
    model, _, calib = _splits("mnist-cnn")
    c = qcore.compress(model, W8A8, calib=calib)
    e = qcore.export_onnx(c, tmp_path / "m.onnx")
    nodes = onnx.load(str(e.path)).graph.node
    quantized = sorted(n.input[0] for n in nodes if n.op_type == "QuantizeLinear")
    assert quantized == ["flatten", "input", "pool1", "pool2", "relu1", "relu2", "relu3"]
    makers = {o: n.op_type for n in nodes for o in n.output}
    assert [makers[q] for q in quantized if q != "input"] == ["Flatten", "MaxPool", "MaxPool",
                                                              "Relu", "Relu", "Relu"]
