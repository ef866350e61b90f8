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


def ok(at: AppTest, title: str = "Quantization Playground") -> None:
    """No traceback, no error, and the app shell (the page's one heading, the sidebar
    pickers, the upload panel's pickers) drawn in this run."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert [t.value for t in at.title] == [title]
    keys = [s.key for s in at.sidebar.selectbox]
    assert keys == ["model_picker", f"dataset_picker:{at.session_state['model']}",
                    "upload_arch", "upload_dataset"]  # fmt: skip


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
        "SQNR (whole model)",
        "Agreement",
    ]
    info = qcore.model_info("mnist-cnn")
    assert abs(percent(metric(at, "Accuracy")) - info.float_accuracy) < 0.01  # 8 bits ~ float
    assert [m.delta for m in at.metric][1].startswith("4.0x smaller")
    assert len(at.get("download_button")) == 2
    # only the open tabs are drawn: the weight histogram; the confusion matrix on its tab
    assert len(at.get("plotly_chart")) == 1
    at.session_state["details_view"] = "Confusion matrix"
    at.run()
    ok(at)
    assert len(at.get("plotly_chart")) == 2
    assert at.query_params["model"] == "mnist-cnn" and at.query_params["bits"] == "8"
    assert not at.warning
    assert any(m.value.startswith("A trained network stores") for m in at.markdown)


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
    assert len(at.warning) == 1  # one warning, listing everything the link set wrongly
    text = at.warning[0].value
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
    # what the SQNR card says at float is the Playground's (tests/test_playground.py)


@needs_sample
def test_user_errors_are_sentences_not_tracebacks() -> None:
    at = open_app()
    at.multiselect(key="layers").set_value([]).run()
    assert not at.exception
    assert "Pick at least one layer" in at.error[0].value


@needs_sample
@pytest.mark.parametrize("dataset", ["digits", "cifar10"])
def test_a_linked_dataset_that_cannot_fit_warns_and_uses_the_models_own(
    dataset: str, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("QCORE_DATA_DIR", str(tmp_path))  # cifar10 is not on disk either
    at = open_app(model="mnist-cnn", dataset=dataset)  # 8x8 or 3x32x32 for a 28x28 model
    ok(at)
    (warning,) = at.warning
    assert f"`dataset={dataset}`" in warning.value
    assert "expects 1x28x28 inputs" in warning.value
    assert at.session_state["dataset"] == "mnist-5k"
    assert len(at.metric) == 5
    # nothing that cannot run is offered: no download, and not in the picker
    assert not [b for b in at.button if b.key and b.key.startswith("download_")]
    assert dataset not in at.selectbox(key="dataset_picker:mnist-cnn").options


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
    # the Playground keys these widgets by model and layer: find them by their labels
    next(s for s in at.selectbox if s.label == "Layer").set_value("conv2").run()
    next(n for n in at.number_input if n.label == "Output channel").set_value(5).run()
    at.toggle(key="hist_log").set_value(True).run()
    ok(at)
    titles = [json.loads(c.proto.spec)["layout"].get("title", {}).get("text", "")
              for c in at.get("plotly_chart")]  # fmt: skip
    assert any(t.startswith("conv2, output channel 5") for t in titles), titles


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
    monkeypatch.setenv(DOWNLOAD_ENV, "1")  # as `make app` sets it (unset: no downloads)
    fetched = _stand_in_mnist(tmp_path, monkeypatch)
    try:
        at = open_app(model="mnist-cnn", dataset="mnist")
        assert not at.exception
        (error,) = at.error
        # a sentence for the viewer: no server folder, no root= or download=True
        assert "not on this server yet" in error.value and "Download" in error.value
        assert str(tmp_path) not in error.value and "root=" not in error.value
        assert "download=True" not in error.value
        assert at.button(key="download_mnist").label == "Download mnist"
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
    assert "turned off" in text and "pick another dataset" in text.lower()
    assert str(tmp_path) not in text  # the server's folders are not the viewer's business
    assert not [b for b in at.button if b.key and b.key.startswith("download_")]
    assert not at.metric
    at.run()
    assert fetched == [] and not any(tmp_path.iterdir())  # nothing was written


@pytest.mark.parametrize(
    ("value", "allowed"),
    [(None, False), ("", False), ("1", True), ("true", True), ("On", True), ("0", False),
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
def test_dataset_picker_lists_only_datasets_that_fit_the_model() -> None:
    at = open_app()
    ok(at)
    picker = at.selectbox(key="dataset_picker:mnist-cnn")
    assert [o.split()[0] for o in picker.options] == ["mnist-5k", "mnist", "fashion-mnist"]
    captions = " ".join(c.value for c in at.sidebar.caption)
    assert "Not listed: digits, cifar10" in captions and "1x28x28" in captions
    at.selectbox(key="model_picker").set_value("digits-mlp").run()
    ok(at)
    assert at.selectbox(key="dataset_picker:digits-mlp").options == ["digits (the model's own)"]


# --- the controls say what they do ------------------------------------------------------------


@needs_sample
def test_pruning_help_says_what_the_rate_is_a_share_of() -> None:
    at = open_app()
    text = at.slider(key="prune").help
    assert "each layer's weights" in text and "all compressed weights" in text
    assert "smallest |w| first" in text
    assert "until that share of the weights is reached" in text
    assert "never removes a layer's last channel" in text


@needs_sample
def test_range_and_rounding_are_off_at_one_bit_with_a_note_why() -> None:
    at = open_app(bits="2")
    ok(at)
    assert not at.radio(key="symmetric").disabled and not at.radio(key="rounding").disabled
    at.select_slider(key="bits").set_value(1).run()
    ok(at)
    assert at.radio(key="symmetric").disabled and at.radio(key="rounding").disabled
    assert not at.radio(key="per_channel").disabled  # one alpha per channel still differs
    assert any("At 1 bit each weight becomes ±α" in c.value for c in at.caption)


@pytest.mark.parametrize(
    ("mode", "label"),
    [("ratio", "fraction of max|w|"), ("absolute", "±c (weight units)"),
     ("sigma", "standard deviations"), ("percentile", "percentile of |w|"),
     ("mse", "unused under mse")],
)  # fmt: skip
@needs_sample
def test_clip_threshold_is_labelled_by_its_mode(mode: str, label: str) -> None:
    at = open_app(clip_mode=mode)
    ok(at)
    slider = at.slider(key="clip")
    assert label in slider.label
    assert slider.disabled == (mode == "mse")
    if mode == "absolute":  # a c above max|w| widens the grid: the help says so
        assert "widens its grid" in slider.help and "2.0" in slider.help
    shown = at.selectbox(key="clip_mode").options
    assert all(len(o) <= 18 for o in shown), shown  # readable in its column


@needs_sample
def test_bit_width_slider_is_off_while_per_layer_bits_cover_every_layer() -> None:
    at = open_app(model="digits-mlp", dataset="digits", layer_bits="fc1:4")
    ok(at)
    assert not at.select_slider(key="bits").disabled  # fc2 still follows the slider
    at = open_app(model="digits-mlp", dataset="digits", layer_bits="fc1:4,fc2:6")
    ok(at)
    assert at.select_slider(key="bits").disabled
    assert any("set every layer" in c.value for c in at.caption)
    notes = [i.value for i in at.info if i.value.startswith("Per-layer bit widths")]
    assert len(notes) == 1 and "the bit-width slider is off" in notes[0]
    at.button(key="clear_layer_bits").click().run()
    ok(at)
    assert not at.select_slider(key="bits").disabled
    # only fc2 compressed, and it has its own bits: the slider again sets nothing
    at = open_app(model="digits-mlp", dataset="digits", layers="fc2", layer_bits="fc2:3")
    assert at.select_slider(key="bits").disabled


@needs_sample
def test_pickers_show_whole_values() -> None:
    at = open_app()
    models = at.selectbox(key="model_picker").options
    assert all(len(o) <= 24 for o in models), models
    assert "mnist-cnn (334k)" in models


def test_every_page_icon_is_a_bundled_material_icon() -> None:
    """Emoji icons are empty boxes where no emoji font is installed."""
    import ast

    from streamlit.material_icon_names import ALL_MATERIAL_ICONS

    tree = ast.parse(Path(APP).read_text(encoding="utf-8"))
    icons = [
        kw.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        for kw in node.keywords
        if kw.arg == "icon"
    ]
    pages = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, "attr", None) == "Page"]  # fmt: skip
    assert len(icons) == len(pages) >= 5  # every page
    # the tab's icon is a file the app serves (a Material icon there is fetched from
    # fonts.gstatic.com by every visitor's browser): tests/test_app_hostile.py
    for icon in icons:
        assert icon.startswith(":material/") and icon.endswith(":"), icon
        assert icon[len(":material/") : -1] in ALL_MATERIAL_ICONS, icon


# --- hostile links ----------------------------------------------------------------------------


@needs_sample
def test_a_hostile_link_gets_one_short_warning() -> None:
    query = {f"junk{i}": "x" for i in range(300)}
    query["bits"] = "9" * 10_000
    at = open_app(**query)
    ok(at)
    (warning,) = at.warning
    text = warning.value
    assert len(text) < 2_000, len(text)
    assert "`bits=" + "9" * 39 + "…`" in text  # the value cut to 40 characters
    assert "and 291 more" in text  # 301 things ignored, 10 listed
    assert text.count("\n- ") == 11
    assert at.select_slider(key="bits").value == 8


def test_query_warning_lists_at_most_ten_items() -> None:
    from pages.query import query_warning

    assert "and" not in query_warning(["`a` (unknown setting)"]).split("\n")[-1]
    assert query_warning(["`a` (x)"] * 10).count("\n- ") == 10
    text = query_warning([f"`k{i}` (x)" for i in range(25)])
    assert text.count("\n- ") == 11 and text.endswith("- … and 15 more")


@pytest.mark.parametrize(
    "raw", ["x" * 10_000, "`**bold**` [link](http://example.com)", "a\nb\x00c"]
)
def test_a_links_values_are_quoted_short_and_inert(raw: str) -> None:
    from pages.query import shown

    for key in ("bits", "prune", "clip_mode", "model", raw):
        _, items = parse(**{key: raw})
        assert len(items) == 1
        item = items[0]
        assert len(item) < 250, item
        assert "\n" not in item and "\x00" not in item
        inner = item[1 : item.index("`", 1)]  # the code span holds the key and the value
        assert "`" not in inner and shown(raw) in inner


@pytest.mark.parametrize(
    ("key", "raw"), [("bits", "４"), ("prune", "０.５"), ("clip", "０.５"), ("bits", "٤")]
)
def test_link_numbers_in_other_scripts_are_refused_for_every_key(key: str, raw: str) -> None:
    values, items = parse(**{key: raw})
    assert key not in values and len(items) == 1 and f"`{key}={raw}`" in items[0]
