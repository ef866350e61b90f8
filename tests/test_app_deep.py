"""The Deep Compression page through AppTest (digits-mlp, one epoch: seconds)."""

from __future__ import annotations

import json

from streamlit.testing.v1 import AppTest
from test_app import APP, needs_sample, ok, size_bytes

import qcore
from pages import cache
from qcore.refs import DatasetRef, ModelRef

PAGE = "pages/views/deep.py"
TITLE = "Deep Compression"


def open_deep(model: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=240)
    at.run()
    at.switch_page(PAGE).run()
    if model is not None:
        at.selectbox(key="model_picker").set_value(model).run()
    return at


# the page's tables, in order: ours stage by stage, the paper's, bits per weight by layer


def chart_titles(at: AppTest) -> list[str]:
    return [json.loads(c.proto.spec)["layout"].get("title", {}).get("text", "")
            for c in at.get("plotly_chart")]  # fmt: skip


@needs_sample
def test_page_waits_for_the_button() -> None:
    at = open_deep()
    ok(at, TITLE)
    assert "press" in at.info[0].value.lower()
    assert not at.get("plotly_chart")
    # the paper's recipe is on: the one-rate slider is off, the bits are the paper's
    assert at.slider(key="dc_prune").disabled
    assert at.select_slider(key="dc_bits").value == "recipe"


@needs_sample
def test_run_draws_waterfall_tables_and_a_download_of_the_size_shown() -> None:
    at = open_deep("digits-mlp")
    at.slider(key="dc_epochs").set_value(1)
    at.button(key="dc_run").click().run()
    ok(at, TITLE)
    assert chart_titles(at) == ["digits-mlp: packed bytes after each stage"]
    stages = at.dataframe[0].value
    assert len(stages) == 4
    sizes = list(stages["size_bytes"])
    assert all(b <= a for a, b in zip(sizes, sizes[1:], strict=False))
    paper = at.dataframe[1].value
    assert list(paper["ratio"].dropna()) == [1.0, 32.0, 40.0]
    layers = at.dataframe[2].value
    assert list(layers["layer"]) == ["fc1", "fc2"]
    assert list(layers["float"]) == [32.0, 32.0]
    # the metric is the payload the file carries; the download is that file
    res = cache.deep_result(ModelRef("digits-mlp"), DatasetRef("digits"), None, None, 1)
    shown = [m.value for m in at.metric if m.label == "Packed size"][0]
    assert abs(size_bytes(shown) - res.compressed.size_bytes) <= 0.01 * size_bytes(shown)
    assert sizes[-1] == res.compressed.size_bytes
    data = qcore.packed_bytes(res.compressed)
    caption = [c.value for c in at.caption if c.value.startswith("The packed file:")][0]
    assert f"{len(data):,} bytes" in caption
    assert f"{res.compressed.size_bytes:,}" in caption


@needs_sample
def test_one_rate_and_one_width_for_every_layer() -> None:
    at = open_deep("digits-mlp")
    at.toggle(key="dc_recipe").set_value(False).run()
    at.slider(key="dc_prune").set_value(0.5)
    at.select_slider(key="dc_bits").set_value(3)
    at.slider(key="dc_epochs").set_value(1)
    at.button(key="dc_run").click().run()
    ok(at, TITLE)
    layers = at.dataframe[2].value
    assert len(layers) == 2
    note = [c.value for c in at.caption if "pruned 50%" in c.value]
    assert note and "3 bits" in note[0]
