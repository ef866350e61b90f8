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


# the page's tables, in order: the stages (ours beside the paper's), bits per weight by layer


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
    assert list(stages["paper_ratio"]) == ["1x", "—", "32x", "40x"]
    assert list(stages["paper_error"]) == ["1.64%", "—", "—", "1.58%"]
    layers = at.dataframe[1].value
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
    layers = at.dataframe[1].value
    assert len(layers) == 2
    note = [c.value for c in at.caption if "pruned 50%" in c.value]
    assert note and "3 bits" in note[0]


# --- the figure and the table builders (no browser) -------------------------------------------


def _stages():
    import pandas as pd

    return pd.DataFrame({
        "stage": ["float", "pruned", "shared", "huffman"],
        "label": ["float32", "pruned + retrained", "shared", "Huffman coded"],
        "size_bytes": [40_000, 8_000, 2_500, 2_000],
        "ratio": [1.0, 5.0, 16.0, 20.0],
        "accuracy": [0.98, 0.97, 0.975, 0.975],
    })  # fmt: skip


def test_waterfall_steps_add_up_to_each_stage() -> None:
    from pages import figures

    fig = figures.deep_waterfall(_stages(), title="t")
    bars, line = fig.data
    assert list(bars.measure) == ["absolute", "relative", "relative", "relative", "total"]
    # the float bar, then what each stage saved: their running sums are the stage sizes
    steps = list(bars.y[:-1])
    assert steps == [40_000, -32_000, -5_500, -500]
    running = [sum(steps[: i + 1]) for i in range(len(steps))]
    assert running == [40_000, 8_000, 2_500, 2_000]
    assert bars.text[-1] == "2.00 kB (20.0x)"
    # the accuracy after each stage on the second axis, in percent
    assert line.yaxis == "y2"
    assert list(line.y) == [98.0, 97.0, 97.5, 97.5, 97.5]
    # issue 18 item 12: accuracy labels dark on white; every step's size change is shown
    notes = [a for a in fig.layout.annotations if a.yref == "y2"]
    assert [a.text for a in notes] == ["98.0 %", "97.0 %", "97.5 %", "97.5 %", "97.5 %"]
    assert all(a.font.color == "#111111" and a.bgcolor.startswith("rgba(255, 255, 255")
               for a in notes)  # fmt: skip
    ticks = list(fig.layout.xaxis.ticktext)
    assert [t.split("<br>")[1] for t in ticks] == [
        "40.0 kB", "−32.0 kB", "−5.50 kB", "−500 B", "2.00 kB (20.0x)"]


def test_layer_bits_table_is_layers_by_stages_in_order() -> None:
    import pandas as pd

    from pages import tables

    layers = pd.DataFrame({
        "layer": ["fc1", "fc2", "fc1", "fc2"],
        "stage": ["float", "float", "pruned", "pruned"],
        "bits_per_weight": [32.0, 32.0, 3.5, 9.25],
    })  # fmt: skip
    table = tables.deep_layer_bits(layers)
    assert list(table.columns) == ["layer", "float", "pruned"]
    assert table.to_dict("records") == [
        {"layer": "fc1", "float": 32.0, "pruned": 3.5},
        {"layer": "fc2", "float": 32.0, "pruned": 9.25},
    ]


def test_comparison_puts_the_papers_numbers_beside_ours() -> None:
    from pages import tables

    table = tables.deep_comparison(_stages().assign(kept=[1.0, 0.1, 0.1, 0.1]),
                                    qcore.deep.PAPER["LeNet-300-100"])  # fmt: skip
    assert list(table["stage"]) == list(_stages()["label"])
    assert list(table["size_bytes"]) == [40_000, 8_000, 2_500, 2_000]
    assert table["error"].round(6).tolist() == [2.0, 3.0, 2.5, 2.5]
    assert list(table["kept"]) == [100.0, 10.0, 10.0, 10.0]
    # the paper's Tables 1 and 2, "—" where it publishes nothing
    assert list(table["paper_size"]) == ["1070 KB", "—", "—", "27 KB"]
    assert list(table["paper_ratio"]) == ["1x", "—", "32x", "40x"]
    assert list(table["paper_kept"]) == ["100%", "8%", "8%", "8%"]
