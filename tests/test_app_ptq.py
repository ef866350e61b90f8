"""The post-training remedies in the app: the Playground's Advanced controls, the
equalization picture, AdaRound's per-layer column, links, downloads and the sweep grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import qcore
from pages import cache, figures, tables
from qcore import ptq
from qcore.config import CompressionConfig, QuantConfig, Settings
from qcore.refs import DatasetRef, ModelRef

APP = str(Path(__file__).resolve().parent.parent / "app.py")


def open_app(**query: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    at.query_params.update(query)
    return at.run()


def ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def accuracy_shown(at: AppTest) -> str:
    (value,) = [m.value for m in at.metric if m.label.startswith("Accuracy")]
    return value


def simulated(model: str, cfg: CompressionConfig) -> float:
    ds = qcore.model_info(model).dataset
    c = qcore.compress(qcore.load_model(model), cfg, calib=qcore.load_dataset(ds, "calib"))
    return qcore.evaluate(c.model, qcore.load_dataset(ds, "test")).accuracy


def test_advanced_toggles_equalize_and_correct_biases() -> None:
    at = open_app(model="mnist-dwsep", bits="4")
    ok(at)
    assert at.toggle(key="equalize").value is False
    assert at.toggle(key="bias_correction").value is False
    assert "adaround" in at.radio(key="rounding").options
    plain = accuracy_shown(at)
    at.toggle(key="equalize").set_value(True).run()
    ok(at)
    cfg = CompressionConfig(quant=QuantConfig(bits=4), equalize=True)
    assert accuracy_shown(at) == f"{simulated('mnist-dwsep', cfg):.1%}" != plain
    # AIMET's picture: the expander names the pairs and draws one layer's channel ranges
    (exp,) = [e for e in at.expander if e.label.startswith("Cross-layer equalization")]
    assert exp.label == "Cross-layer equalization: 7 pairs of layers rescaled"
    assert at.selectbox(key="eq_layer:mnist-dwsep").value == "stem.0"
    assert any("stem.0 → features.0.0" in c.value for c in at.caption)
    at.toggle(key="bias_correction").set_value(True).run()
    ok(at)
    cfg = CompressionConfig(quant=QuantConfig(bits=4), equalize=True, bias_correction=True)
    assert accuracy_shown(at) == f"{simulated('mnist-dwsep', cfg):.1%}"
    assert at.query_params["equalize"] == "true"
    assert at.query_params["bias_correction"] == "true"


def test_remedies_are_off_for_float_weights() -> None:
    at = open_app(bits="float")
    ok(at)
    assert at.toggle(key="equalize").disabled
    assert at.toggle(key="bias_correction").disabled


def test_a_link_restores_the_remedies_and_lists_residual_pairs() -> None:
    at = open_app(model="mnist-resnet", bits="3", equalize="true")
    ok(at)
    assert at.toggle(key="equalize").value is True
    text = " ".join(m.value for m in at.markdown)
    assert "layer1.conv2 → layer2.conv1: a residual addition" in text


def test_adaround_link_shows_the_share_of_changed_rounding(monkeypatch) -> None:
    monkeypatch.setattr(ptq, "ADAROUND_ITERS", 40)
    at = open_app(model="digits-mlp", bits="3", rounding="adaround")
    ok(at)
    assert at.radio(key="rounding").value == "adaround"
    table = next(d.value for d in at.dataframe if "rounding changed" in d.value.columns)
    assert list(table["layer"]) == ["fc1", "fc2"]
    shares = table["rounding changed"].tolist()
    comp = cache.get_compressed(ModelRef("digits-mlp"), Settings(bits=3, rounding="adaround"),
                                DatasetRef("digits"))  # fmt: skip
    assert shares == [r.rounding_changed for r in comp.layers]
    assert all(0 < s < 1 for s in shares)


def test_json_download_and_packed_file_carry_the_remedies(tmp_path: Path) -> None:
    settings = Settings(bits=4, equalize=True, bias_correction=True)
    model, data = ModelRef("digits-mlp"), DatasetRef("digits")
    r = cache.results(model, data, settings)
    doc = json.loads(tables.results_json("digits-mlp", "digits", settings, r))
    assert doc["settings"]["equalize"] is True and doc["settings"]["bias_correction"] is True
    assert CompressionConfig.from_dict(doc["config"]) == settings.to_config()
    path = tmp_path / "m.qpk"
    path.write_bytes(cache.packed_download(model, settings, data)())
    packed = qcore.load_packed(path)
    assert packed.config == settings.to_config()
    reloaded = qcore.evaluate(packed.model, cache.get_dataset(data))
    assert reloaded.accuracy == r.accuracy
    assert cache.packed_size(model, settings) == r.size_bytes  # no calibration for the size


def test_sweep_params_carry_the_remedies() -> None:
    params = cache.SweepParams(bits=(4,), prune_rates=(0.0,), equalize=(False, True),
                               bias_correction=(False, True))  # fmt: skip
    grid = params.grid()
    assert len(grid) == 4 and params.needs_calib
    assert [c.equalize for c in grid.configs()] == [False, False, True, True]
    assert not cache.SweepParams().needs_calib
    with pytest.raises(ValueError, match="Pick at least one rounding"):
        cache.SweepParams(rounding=()).grid()
    row = {"bits": 4, "clip": 1.0, "scheme": "symmetric", "granularity": "per-tensor",
           "rounding": "adaround", "equalize": True, "bias_correction": True, "prune": 0.0}
    assert figures.config_label(row) == ("4 bits · clip 1 · symmetric · per-tensor · AdaRound · "
                                         "equalized · bias corrected · prune 0")


def test_channel_ranges_figure_draws_before_and_after() -> None:
    import numpy as np

    ranges = {"before min": np.array([-1.0, -4.0]), "before max": np.array([2.0, 3.0]),
              "after min": np.array([-1.5, -2.0]), "after max": np.array([2.5, 1.5])}
    fig = figures.channel_ranges_figure(ranges, "conv1")
    before, after = fig.data
    assert list(before.base) == [-1.0, -4.0] and list(before.y) == [3.0, 7.0]
    assert list(after.base) == [-1.5, -2.0] and list(after.y) == [4.0, 3.5]
