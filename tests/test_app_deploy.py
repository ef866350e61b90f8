"""The Deploy page through AppTest (digits-mlp: small and fast)."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest
from test_app import APP, needs_sample, ok

import qcore
from qcore.config import Settings

PAGE = "pages/views/deploy.py"


def open_page(**session) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    at.switch_page(PAGE).run()
    at.selectbox(key="model_picker").set_value("digits-mlp").run()
    for k, v in session.items():  # the Playground's setting
        at.session_state[k] = v
    at.run()
    return at


def _compressed(settings: Settings):
    model = qcore.load_model("digits-mlp")
    calib = qcore.load_dataset("digits", "calib")
    return qcore.compress(model, settings.to_config(), calib=calib)


@needs_sample
def test_the_file_and_its_integer_layers_show_before_any_measuring() -> None:
    at = open_page(bits=8, abits=8)
    ok(at, "Deploy")
    assert "**W8A8**" in at.main.caption[0].value
    md = [m.value for m in at.markdown]
    assert "**1 of 2 layers run ONNX Runtime integer kernels: fc1.**" in md
    assert any(m.startswith("- `fc2`: its output, the logits, stays float") for m in md)
    buttons = at.get("download_button")
    e = qcore.export_onnx(_compressed(Settings(bits=8, abits=8)), "/tmp/qcore-deploy-test.onnx")
    assert any(f"Download the ONNX file ({e.size_bytes:,} bytes)" in b.proto.label
               for b in buttons)  # fmt: skip
    assert any("Press **Measure accuracy and latency**" in i.value for i in at.info)
    assert not at.get("arrow_data_frame")


@needs_sample
def test_measure_draws_the_runtime_table() -> None:
    at = open_page(bits=8, abits=8)
    at.button(key="deploy_run").click().run()
    ok(at, "Deploy")
    df = at.dataframe[0].value
    assert list(df["runtime"]) == ["float PyTorch", "float ONNX Runtime",
                                   "simulated W8A8 (PyTorch fake-quant)",
                                   "int8 ONNX Runtime (W8A8)"]  # fmt: skip
    test = qcore.load_dataset("digits", "test")
    c = _compressed(Settings(bits=8, abits=8))
    sim = qcore.evaluate(c.model, test)
    base = qcore.evaluate(qcore.load_model("digits-mlp"), test)
    assert df["test accuracy"][0] == f"{base.accuracy:.2%}"
    assert df["test accuracy"][2] == f"{sim.accuracy:.2%}"
    for b in (1, 256):
        ms = df[f"batch {b}: median ms"]
        assert (ms > 0).all() and (df[f"batch {b}: p90 ms"] >= ms).all()
    assert df["file bytes"][0] == "—" and df["file bytes"][3].replace(",", "").isdigit()
    caption = [c.value for c in at.main.caption if c.value.startswith("Latency:")]
    assert len(caption) == 1
    assert qcore.cpu_int8().sentence() in caption[0] and "thread(s)" in caption[0]
    # the integer sentence under the table: the same layers as the file's record
    assert "1 of 2 layers ran ONNX Runtime integer kernels: fc1." in [
        m.value.split(" In float")[0] for m in at.markdown]


@needs_sample
def test_float_activations_say_why_nothing_runs_integer() -> None:
    at = open_page(bits=4)
    ok(at, "Deploy")
    md = [m.value for m in at.markdown]
    assert "**No layer of 2 runs an integer kernel in this setting.**" in md
    assert any("4-bit weights: no integer kernel" in m for m in md)
    assert any("Activations are float32 in this setting" in i.value for i in at.info)


@needs_sample
def test_tradeoffs_latency_axis_plots_only_rows_with_a_real_runtime() -> None:
    import json

    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    at.switch_page("pages/views/tradeoffs.py").run()
    at.selectbox(key="model_picker").set_value("digits-mlp").run()
    at.multiselect(key="to_bits").set_value([4, 8])
    at.multiselect(key="to_prune").set_value([0.0])
    at.multiselect(key="to_abits").set_value(["float32", 8])
    at.button(key="to_run").click().run()
    ok(at, "Trade-offs")
    table = at.dataframe[0].value
    assert len(table) == 4 and set(table["act_bits"].dropna()) == {8}
    assert not any("Latency" in json.loads(c.proto.spec)["layout"]["xaxis"]["title"]["text"]
                   for c in at.get("plotly_chart"))  # nothing measured before the button
    at.button(key="to_latency_run").click().run()
    ok(at, "Trade-offs")
    figs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    (lat,) = [f for f in figs if "latency" in f["layout"]["xaxis"]["title"]["text"]]
    (points,) = lat["data"]
    assert points["name"] == "int8 ONNX Runtime (measured)" and len(points["x"]) == 1
    assert "8 bits" in points["text"][0] and "activations 8 bits" in points["text"][0]
    assert points["x"][0] > 0
    calib = qcore.load_dataset("digits", "calib")
    c = qcore.compress(qcore.load_model("digits-mlp"), Settings(bits=8, abits=8).to_config(),
                       calib=calib)
    assert points["y"] == [qcore.evaluate(c.model, qcore.load_dataset("digits", "test")).accuracy]
    text = [m.value for m in at.main.caption if "ran in a real runtime" in m.value]
    assert len(text) == 1 and text[0].startswith("1 of 4 rows ran in a real runtime")
    assert "the other 3 have no integer kernel" in text[0]
