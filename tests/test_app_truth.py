"""Issue 18 through AppTest: numbers that agree across pages, settings that never empty the
page, and what a user reads after each fix."""

from __future__ import annotations

import math

import pytest

from pages import cache
from qcore.config import Settings
from qcore.refs import DatasetRef, ModelRef
from tests.test_app import metric, needs_sample, open_app, percent

CNN, MNIST = ModelRef("mnist-cnn"), DatasetRef("mnist-5k")


def texts(elements) -> list[str]:
    return [e.value for e in elements]


@needs_sample
def test_weight_label_says_what_per_layer_bits_store() -> None:
    # every layer at 4 bits: the slider's 8 is not what is stored
    at = open_app(bits="8", layer_bits="conv1:4,conv2:4,fc1:4,fc2:4")
    assert not at.exception
    assert "**W4A32** · simulated" in texts(at.caption)
    help_text = [m.help for m in at.metric if m.label.startswith("Accuracy")][0]
    assert "weights in 4 bits" in help_text and "8 bits" not in help_text
    at = open_app(bits="8", layer_bits="conv1:4,conv2:6")  # fc1, fc2 take the slider's 8
    assert "**W4-8 mixed A32** · simulated" in texts(at.caption)


@needs_sample
def test_kmeans_with_per_channel_scales_gives_results_and_says_what_changed() -> None:
    at = open_app(bits="4", per_channel="true")
    at.radio(key="codebook").set_value("kmeans").run()
    assert not at.exception and not at.error, texts(at.error)
    assert [m.label for m in at.metric][:4] == [
        "Accuracy (simulated)", "Packed size", "Sparsity", "SQNR (whole model)"]
    assert any("k-means codebook is shared by a whole layer" in t for t in texts(at.info))
    assert at.radio(key="per_channel").disabled
    # the same numbers as per-tensor k-means: the clash resolved one way everywhere
    same = cache.results(CNN, MNIST, Settings(bits=4, codebook="kmeans"))
    assert percent(metric(at, "Accuracy")) == pytest.approx(same.accuracy, abs=5e-4)


@needs_sample
def test_tradeoffs_shows_the_playgrounds_whole_model_sqnr() -> None:
    from streamlit.testing.v1 import AppTest

    from tests.test_app import APP

    at = AppTest.from_file(APP, default_timeout=300)
    at.switch_page("pages/views/tradeoffs.py")
    at.session_state["to_bits"] = [2, 4]  # set before the first run fills the defaults
    at.run()
    at.session_state["to_bits"] = [2, 4]
    at.session_state["to_prune"] = [0.0]
    at.button(key="to_run").click().run()
    assert not at.exception and not at.error, texts(at.error)
    (df,) = [d.value for d in at.dataframe if "sqnr_db" in d.value]
    assert "mean_sqnr_db" not in df.columns  # the per-layer mean is not on screen
    for bits in (2, 4):
        shown = float(df.loc[df["bits"] == bits, "sqnr_db"].iloc[0])
        playground = cache.results(CNN, MNIST, Settings(bits=bits))
        assert shown == pytest.approx(playground.sqnr_db)


@needs_sample
def test_absolute_clip_above_max_w_says_so_on_the_playground() -> None:
    at = open_app(bits="4", clip_mode="absolute", clip="1.5")
    assert not at.exception and not at.error
    (warning,) = [w.value for w in at.warning if "above the largest |w|" in w.value]
    assert warning.startswith("c = 1.5 is above the largest |w| of every quantized layer's "
                              "weights (0.50 at most)")  # fmt: skip
    assert "conv1: 10 of 15" in warning  # the levels that hold no weight, counted
    at.session_state["layer_view"] = "Clipping error"  # the curve's tab (drawn when open)
    at.run()
    assert any("c = 1.5 is above max|w| (0.50012): 10 of the 15 levels hold no weight." in c
               for c in texts(at.caption))  # fmt: skip


@needs_sample
def test_two_bit_tip_for_asymmetric_codes_names_four_levels() -> None:
    # mnist-cnn: 2 bits asymmetric 35.3 %, 1 bit 69.1 %, so the tip shows
    at = open_app(bits="2", symmetric="false")
    assert not at.exception
    (tip,) = [i.value for i in at.info if "below 1 bit's" in i.value]
    assert "its 4 levels are spread evenly from min(w) to max(w)" in tip
    assert "-max|w|, 0 and +max|w|" not in tip
    (sym,) = [i.value for i in open_app(bits="2").info if "below 1 bit's" in i.value]
    assert "its 3 levels are -max|w|, 0 and +max|w|" in sym


@needs_sample
def test_a_dataset_not_on_disk_is_the_one_the_link_names(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QCORE_DATA_DIR", str(tmp_path))  # nothing downloaded there
    at = open_app()
    assert at.query_params["dataset"] == "mnist-5k"
    at.selectbox(key="dataset_picker:mnist-cnn").set_value("fashion-mnist").run()
    assert not at.exception
    assert any("fashion-mnist dataset is not on this server" in e.value for e in at.error)
    assert at.query_params["dataset"] == "fashion-mnist"  # a shared link opens this one
    assert at.query_params["model"] == "mnist-cnn"
    assert not any(str(tmp_path) in e.value for e in at.error)


@needs_sample
def test_no_change_is_neither_green_nor_an_up_arrow() -> None:
    from streamlit.proto.Metric_pb2 import Metric as MetricProto

    at = open_app(bits="16")  # 16 bits: the float model's accuracy to the image
    (card,) = [m for m in at.metric if m.label.startswith("Accuracy")]
    assert card.delta == "±0.0 pts vs float"
    assert card.proto.color != MetricProto.MetricColor.GREEN
    assert card.proto.direction != MetricProto.MetricDirection.UP
    at = open_app(bits="2")  # a real loss: red, down
    (card,) = [m for m in at.metric if m.label.startswith("Accuracy")]
    assert card.delta.startswith("-") and card.delta.endswith(" pts vs float")
    assert card.proto.direction == MetricProto.MetricDirection.DOWN
    assert not any("digits's" in c.value or "'s test split" in c.value for c in at.caption)


@needs_sample
def test_gradient_bits_run_as_bit_width_and_the_hint_avoids_a_worse_lr() -> None:
    from streamlit.testing.v1 import AppTest

    from tests.test_app import APP

    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update({"model": "digits-mlp", "dataset": "digits", "bits": "2"})
    at.run()
    at.switch_page("pages/views/finetune.py").run()
    assert not at.exception
    grad = at.select_slider(key="ft_grad_bits")
    # low bits on the left, float32 at the right end, as the Bit width slider
    options = list(grad.options)
    assert options[0].startswith("2") and "float" in options[-1] and len(options) == 7
    hint = " ".join(c.value for c in at.caption if "steps in all" in c.value)
    assert "0.01" not in hint and "3e-3" in hint  # digits-mlp: 20 steps, few


@needs_sample
def test_pgd_steps_only_with_pgd() -> None:
    from tests.test_app_robustness import open_page

    at = open_page()
    assert not at.exception
    assert "rb_steps" not in [n.key for n in at.number_input]
    at.multiselect(key="rb_perturbations").select("pgd").run()
    assert not at.exception
    assert at.number_input(key="rb_steps").value == 10


@needs_sample
def test_teaching_tabs_pick_a_weight_and_show_error_and_sqnr_against_bits() -> None:
    import json

    at = open_app(bits="4", scale="pow2", rounding="stochastic")
    assert not at.exception and not at.error
    labels = [t.label for t in at.tabs]
    assert {"Error w − q(w)", "SQNR against bits"} <= set(labels)

    def show(view: str) -> None:  # only the open tab of the layer's views is drawn
        at.session_state["layer_view"] = view
        at.run()
        assert not at.exception

    show("One weight's journey")
    (pick,) = [n for n in at.number_input if (n.key or "").startswith("journey_pick:")]
    pick.set_value(5).run()
    assert not at.exception
    (journey,) = [m.value for m in at.markdown if "| 1. the weight |" in m.value]
    assert "weight #5," in journey and "the draw u = " in journey
    assert "Δ = 2^−" in journey and ". fixed point Q" in journey

    def charts() -> dict:
        return {json.loads(c.proto.spec)["layout"]["title"]["text"]: json.loads(c.proto.spec)
                for c in at.get("plotly_chart")
                if json.loads(c.proto.spec)["layout"].get("title", {}).get("text")}  # fmt: skip

    show("SQNR against bits")
    (bits_chart,) = [v for k, v in charts().items() if k.startswith("SQNR against bits")]
    names = [t["name"] for t in bits_chart["data"]]
    assert names[0] == "6.02 dB per bit (rule of thumb)" and names[2].startswith("now: 4 bits")
    assert any(c.value.startswith("Each extra bit halves the step") for c in at.caption)
    show("Error w − q(w)")
    (err_chart,) = [v for k, v in charts().items() if k.startswith("w − q(w)")]
    assert err_chart["data"][0]["name"] == "rounding error (inside the grid)"


@needs_sample
def test_sqnr_card_counts_a_removed_block_as_all_error() -> None:
    at = open_app(model="mnist-resnet", bits="8", drop="layer1")
    assert not at.exception and not at.error
    settings = Settings(bits=8, drop=("layer1",))
    c = cache.get_compressed(ModelRef("mnist-resnet"), settings)
    assert c.removed == ("layer1.conv1", "layer1.conv2")
    assert metric(at, "SQNR") == f"{c.sqnr_db:.1f} dB"
    # the kept layers alone are near 40 dB; the removed block's weights pull it down
    kept_only = 10 * math.log10(sum(s.weight_energy for s in c.layers)
                                / sum(s.error_energy for s in c.layers))  # fmt: skip
    assert kept_only > 35 and c.sqnr_db < 15
    help_text = [m.help for m in at.metric if m.label.startswith("SQNR")][0]
    assert "removed block count as all error" in help_text


@needs_sample
def test_per_layer_table_with_structured_pruning_describes_kept_channels() -> None:
    at = open_app(bits="4", per_channel="true", prune="0.3", structured="true")
    assert not at.exception and not at.error
    table = at.dataframe[0].value.set_index("layer")
    c = cache.get_compressed(CNN, Settings(bits=4, per_channel=True, prune=0.3,
                                           structured=True))  # fmt: skip
    for s in c.layers:
        kept = s.mask.reshape(s.shape[0], -1).any(dim=1)
        assert table.loc[s.name, "grid range"].endswith(
            f"({int(kept.sum())} of {s.shape[0]} channels kept)")
        top = float(s.scales[kept].max())
        assert table.loc[s.name, "scale Δ"].split(" over ")[0].endswith(f"{top:.4g}")
        assert "… 1 over" not in table.loc[s.name, "scale Δ"]
