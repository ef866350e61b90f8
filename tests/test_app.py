"""The Streamlit app through AppTest, and the pure URL-query helpers behind its deep links."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import qcore
from pages import cache, tables
from pages.controls import CLIP_SLIDERS
from pages.query import parse_query
from pages.session import settings_from_session
from pages.sidebar import DOWNLOAD_ENV, data_download_allowed
from qcore.config import CompressionConfig, Settings
from qcore.refs import DatasetRef, ModelRef

APP = str(Path(__file__).resolve().parent.parent / "app.py")
needs_sample = pytest.mark.skipif(
    "mnist-cnn" not in qcore.list_models(), reason="sample models not trained yet"
)


def open_app(**query: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update(query)
    return at.run()


def metric(at: AppTest, label: str) -> str:
    found = [m.value for m in at.metric if m.label.startswith(label)]
    assert len(found) == 1, [m.label for m in at.metric]
    return found[0]


def percent(text: str) -> float:
    return float(text.rstrip("%")) / 100


def size_bytes(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"B": 1, "kB": 1e3, "MB": 1e6}[unit]


def ok(at: AppTest) -> None:
    """No traceback, no error, and the app shell (title, sidebar pickers) drawn in this run."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert [t.value for t in at.title] == ["Quantization Playground"]
    keys = [s.key for s in at.sidebar.selectbox]
    assert keys == ["model_picker", f"dataset_picker:{at.session_state['model']}"]


# --- AppTest ----------------------------------------------------------------------------------


@needs_sample
def test_app_starts_with_default_model_on_the_playground() -> None:
    at = open_app()
    ok(at)
    assert at.title[0].value == "Quantization Playground"
    assert at.session_state["model"] == "mnist-cnn"
    assert at.session_state["dataset"] == "mnist-5k"
    assert at.select_slider(key="bits").value == 8
    assert at.slider(key="clip").value == 1.0
    assert at.selectbox(key="clip_mode").value == "ratio"
    labels = [m.label for m in at.metric]
    assert labels == [
        "Accuracy (simulated)",
        "Packed size",
        "Sparsity",
        "Mean SQNR",
        "Agreement",
    ]
    info = qcore.model_info("mnist-cnn")
    assert abs(percent(metric(at, "Accuracy")) - info.float_accuracy) < 0.01  # 8 bits ~ float
    assert "4.0x smaller" == [m.delta for m in at.metric][1]
    assert len(at.get("plotly_chart")) == 2  # histogram and confusion matrix
    assert len(at.get("download_button")) == 2
    assert at.query_params["model"] == "mnist-cnn" and at.query_params["bits"] == "8"
    assert not at.warning


@needs_sample
def test_two_bits_lower_accuracy_and_size_against_eight() -> None:
    at = open_app()
    acc8, size8 = percent(metric(at, "Accuracy")), size_bytes(metric(at, "Packed size"))
    at.select_slider(key="bits").set_value(2).run()
    ok(at)
    acc2, size2 = percent(metric(at, "Accuracy")), size_bytes(metric(at, "Packed size"))
    assert acc2 < acc8
    assert size2 < size8
    assert at.query_params["bits"] == "2"  # the URL follows the slider


@needs_sample
def test_pruning_point_nine_shows_about_ninety_percent_sparsity() -> None:
    at = open_app()
    at.slider(key="prune").set_value(0.9).run()
    ok(at)
    assert 0.895 <= percent(metric(at, "Sparsity")) <= 0.93
    assert at.query_params["prune"] == "0.9"


@needs_sample
def test_deep_link_restores_its_state() -> None:
    at = open_app(
        model="mnist-cnn",
        dataset="mnist-5k",
        bits="4",
        prune="0.5",
        clip_mode="percentile",
        clip="99.5",
        per_channel="true",
        scope="global",
    )
    ok(at)
    assert not at.warning
    assert at.select_slider(key="bits").value == 4
    assert at.slider(key="prune").value == 0.5
    assert at.selectbox(key="clip_mode").value == "percentile"
    assert at.slider(key="clip").value == 99.5
    assert at.radio(key="per_channel").value is True
    assert at.radio(key="scope").value == "global"
    assert 0.49 <= percent(metric(at, "Sparsity")) <= 0.6
    # the link is written back, so the page can be shared again as it is
    assert at.query_params["bits"] == "4" and at.query_params["per_channel"] == "true"


@needs_sample
def test_bad_query_values_warn_and_fall_back_to_defaults() -> None:
    at = open_app(
        model="no-such-model",
        bits="99",
        prune="lots",
        clip="7",
        symmetric="maybe",
        layers="fc9",
        colour="red",
    )
    ok(at)
    text = " ".join(w.value for w in at.warning)
    for key in ("model", "bits", "prune", "clip", "symmetric", "layers", "colour"):
        assert f"`{key}" in text, key
    assert at.session_state["model"] == "mnist-cnn"
    assert at.select_slider(key="bits").value == 8
    assert at.slider(key="prune").value == 0.0
    assert at.radio(key="symmetric").value is True
    assert len(at.metric) == 5
    at.run()  # the warnings are shown once, then the URL holds good values
    assert not at.warning and at.query_params["bits"] == "8"


@needs_sample
def test_float_setting_reproduces_the_float_model() -> None:
    at = open_app(bits="float")
    ok(at)
    info = qcore.model_info("mnist-cnn")
    assert abs(percent(metric(at, "Accuracy")) - info.float_accuracy) < 1e-3
    assert percent(metric(at, "Agreement")) == 1.0
    assert metric(at, "Mean SQNR").startswith("∞")


@needs_sample
def test_user_errors_are_sentences_not_tracebacks() -> None:
    at = open_app()
    at.multiselect(key="layers").set_value([]).run()
    assert not at.exception
    assert "Pick at least one layer" in at.error[0].value
    at = open_app(model="mnist-cnn", dataset="digits")  # 8x8 images for a 28x28 model
    assert not at.exception
    assert "expects 1x28x28 inputs" in at.error[0].value


@needs_sample
def test_model_change_picks_its_dataset_and_layers() -> None:
    at = open_app()
    at.selectbox(key="model_picker").set_value("digits-mlp").run()
    ok(at)
    assert at.session_state["model"] == "digits-mlp"
    assert at.session_state["dataset"] == "digits"
    assert at.selectbox(key="dataset_picker:digits-mlp").value == "digits"
    assert at.multiselect(key="layers").value == ["fc1", "fc2"]
    assert at.query_params["model"] == "digits-mlp"


@needs_sample
def test_clip_mode_change_resets_clip_to_that_modes_default() -> None:
    at = open_app()
    at.selectbox(key="clip_mode").set_value("sigma").run()
    ok(at)
    assert at.slider(key="clip").value == CLIP_SLIDERS["sigma"].default
    assert at.query_params["clip_mode"] == "sigma"


@needs_sample
def test_histogram_controls_per_channel_and_log_scale() -> None:
    at = open_app(bits="3", per_channel="true")
    ok(at)
    at.selectbox(key="hist_layer").set_value("conv2").run()
    at.number_input(key="hist_channel").set_value(5).run()
    at.toggle(key="hist_log").set_value(True).run()
    ok(at)
    assert len(at.get("plotly_chart")) == 2


@needs_sample
def test_downloads_agree_with_the_numbers_on_screen(tmp_path: Path) -> None:
    settings = Settings(bits=4, prune=0.5)
    r = cache.results(ModelRef("mnist-cnn"), DatasetRef("mnist-5k"), settings)
    doc = json.loads(tables.results_json("mnist-cnn", "mnist-5k", settings, r))
    assert doc["packed_size_bytes"] == r.size_bytes and doc["accuracy_simulated"] == r.accuracy
    assert doc["config"] == settings.to_config().to_dict()  # reads back into the same config
    assert CompressionConfig.from_dict(doc["config"]) == settings.to_config()
    assert [row["layer"] for row in doc["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
    data = cache.packed_download(ModelRef("mnist-cnn"), settings)()
    path = tmp_path / "m.qpk"
    path.write_bytes(data)
    assert qcore.read_header(path)["size_bytes"] == r.size_bytes
    packed = qcore.load_packed(path)
    assert packed.config == settings.to_config()  # the file says how it was compressed
    reloaded = qcore.evaluate(packed.model, cache.get_dataset(DatasetRef("mnist-5k")))
    assert reloaded.accuracy == r.accuracy


EXTREME_LINKS = [
    {"bits": "1", "symmetric": "false", "per_channel": "true", "rounding": "stochastic"},
    {"bits": "16", "clip_mode": "mse", "prune": "0.99", "structured": "true", "scope": "global"},
    {"bits": "float", "prune": "0.7", "scope": "global", "layers": "conv2,fc1"},
    {"bits": "3", "clip_mode": "absolute", "clip": "0.005", "symmetric": "false"},
    {"model": "mnist-resnet", "bits": "4", "fold_bn": "false", "per_channel": "true"},
]


@needs_sample
@pytest.mark.parametrize("query", EXTREME_LINKS, ids=lambda q: "&".join(q.values()))
def test_extreme_settings_render_without_errors(query: dict[str, str]) -> None:
    at = open_app(**query)
    ok(at)
    assert not at.warning
    assert len(at.metric) == 5


# --- pure helpers -----------------------------------------------------------------------------

MODELS, DATASETS = ["mnist-cnn", "digits-mlp"], ["mnist-5k", "digits"]
LAYERS = {"mnist-cnn": ["conv1", "conv2", "fc1", "fc2"], "digits-mlp": ["fc1", "fc2"]}


def parse(**q: str):
    return parse_query(q, models=MODELS, datasets=DATASETS, layer_names=LAYERS.__getitem__)


def test_parse_query_reads_good_values() -> None:
    values, warnings = parse(
        model="digits-mlp",
        bits="3",
        prune="0.25",
        clip_mode="sigma",
        clip="2.5",
        symmetric="false",
        rounding="stochastic",
        layers="fc2",
        fold_bn="0",
    )
    assert warnings == []
    assert values == {
        "model": "digits-mlp",
        "bits": 3,
        "prune": 0.25,
        "clip_mode": "sigma",
        "clip": 2.5,
        "symmetric": False,
        "rounding": "stochastic",
        "layers": ["fc2"],
        "fold_bn": False,
    }
    assert parse(bits="float")[0] == {"bits": "float"}
    assert parse(clip_mode="mse")[0] == {"clip_mode": "mse", "clip": CLIP_SLIDERS["mse"].default}


@pytest.mark.parametrize(
    "key,raw",
    [
        ("model", "resnet9000"),
        ("dataset", "imagenet"),
        ("bits", "0"),
        ("bits", "17"),
        ("bits", "4.5"),
        ("bits", ""),
        ("clip", "0"),
        ("clip", "1.5"),
        ("clip", "nan"),
        ("clip_mode", "huge"),
        ("prune", "1"),
        ("prune", "-0.1"),
        ("prune", "inf"),
        ("per_channel", "yes please"),
        ("scope", "world"),
        ("layers", "conv1,fc9"),
        ("layers", ","),
        ("unknown", "1"),
    ],
)
def test_parse_query_warns_on_each_bad_value(key: str, raw: str) -> None:
    values, warnings = parse(**{key: raw})
    assert key not in values
    assert len(warnings) == 1 and f"`{key}" in warnings[0]


def test_settings_round_trip_through_the_url() -> None:
    names = LAYERS["mnist-cnn"]
    s = Settings(
        bits=5,
        clip=0.8,
        prune=0.3,
        symmetric=False,
        per_channel=True,
        scope="global",
        layers=("conv2", "fc1"),
    )
    q = s.to_flat()
    assert q["bits"] == "5" and q["layers"] == "conv2,fc1" and "rounding" not in q
    values, warnings = parse(**q)
    assert warnings == []
    assert settings_from_session(values | {"model": "mnist-cnn"}, names) == s
    default = Settings()
    assert set(default.to_flat()) == {"bits", "clip", "clip_mode", "prune"}
    assert Settings(bits=None).to_flat()["bits"] == "float"


def _stand_in_mnist(tmp_path: Path, monkeypatch) -> list:
    """MNIST missing from an empty data folder; its download writes a tiny stand-in there."""
    from test_data import _write_mnist

    import qcore.data

    monkeypatch.setenv("QCORE_DATA_DIR", str(tmp_path))
    fetched: list = []

    def fake_fetch(name: str, root: Path) -> None:  # stands in for torchvision's download
        fetched.append((name, root))
        _write_mnist(root, "MNIST", n_train=30, n_test=10)

    monkeypatch.setattr(qcore.data, "_fetch", fake_fetch)
    return fetched


@needs_sample
def test_missing_torchvision_dataset_offers_a_download(tmp_path, monkeypatch) -> None:
    """MNIST not on disk: an error naming the folder and a button that fetches it."""
    monkeypatch.delenv(DOWNLOAD_ENV, raising=False)  # the default: downloads allowed
    fetched = _stand_in_mnist(tmp_path, monkeypatch)
    try:
        at = open_app(model="mnist-cnn", dataset="mnist")
        assert not at.exception
        assert len(at.error) == 1 and str(tmp_path) in at.error[0].value
        assert "download" in at.error[0].value
        assert not at.metric  # nothing computed on a dataset that is not there
        at.button(key="download_mnist").click().run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        assert fetched == [("mnist", tmp_path)]
        # the page's number is qcore's for the default settings on the 10 stand-in images
        test = qcore.load_dataset("mnist", "test")
        compressed = qcore.compress(qcore.load_model("mnist-cnn"), Settings().to_config())
        expected = qcore.evaluate(compressed.model, test)
        assert expected.n == 10
        assert metric(at, "Accuracy") == f"{expected.accuracy:.1%}"
        r = cache.results(ModelRef("mnist-cnn"), DatasetRef("mnist"), Settings())
        assert r.accuracy == expected.accuracy
        assert at.session_state["dataset"] == "mnist"
    finally:
        cache.get_dataset.clear()  # the tiny stand-in MNIST must not outlive this test
        cache.results.clear()
        cache.float_metrics.clear()


@needs_sample
@pytest.mark.parametrize("value", ["0", "false"])
def test_hosted_app_offers_no_dataset_download(tmp_path, monkeypatch, value: str) -> None:
    """With downloads turned off, no viewer can write into the server's data folder."""
    monkeypatch.setenv(DOWNLOAD_ENV, value)
    fetched = _stand_in_mnist(tmp_path, monkeypatch)
    at = open_app(model="mnist-cnn", dataset="mnist")
    assert not at.exception
    assert len(at.error) == 1
    text = at.error[0].value
    assert str(tmp_path) in text and "turned off" in text and "copy" in text
    assert not [b for b in at.button if b.key and b.key.startswith("download_")]
    assert not at.metric
    at.run()
    assert fetched == [] and not any(tmp_path.iterdir())  # nothing was written


@pytest.mark.parametrize(
    ("value", "allowed"),
    [(None, True), ("", True), ("1", True), ("true", True), ("On", True), ("0", False),
     ("false", False), ("no", False), ("OFF", False), ("maybe", False)],
)  # fmt: skip
def test_download_setting_reads_the_environment(monkeypatch, value, allowed: bool) -> None:
    if value is None:
        monkeypatch.delenv(DOWNLOAD_ENV, raising=False)
    else:
        monkeypatch.setenv(DOWNLOAD_ENV, value)
    assert data_download_allowed() is allowed


@pytest.mark.parametrize(("key", "raw"), [("bits", "²"), ("bits", "٣"), ("layer_bits", "fc1:²")])
def test_non_ascii_digits_in_a_link_warn_instead_of_crashing(key: str, raw: str) -> None:
    values, warnings = parse_query(
        {key: raw}, models=qcore.list_models(), datasets=qcore.list_datasets(),
        layer_names=lambda _m: ["conv1", "conv2", "fc1", "fc2"], default_model="mnist-cnn",
    )  # fmt: skip
    assert key not in values and len(warnings) == 1 and raw in warnings[0]


@needs_sample
def test_a_dataset_that_cannot_fit_is_not_offered_for_download(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QCORE_DATA_DIR", str(tmp_path))  # cifar10 is not on disk either
    at = open_app(model="mnist-cnn", dataset="cifar10")
    assert not at.exception
    assert len(at.error) == 1 and "expects 1x28x28 inputs" in at.error[0].value
    assert not [b for b in at.button if b.key and b.key.startswith("download_")]
