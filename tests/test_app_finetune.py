"""The Fine-tune page through AppTest, and the models of a session it makes: one tiny epoch
on digits-mlp at 2 bits, the result table, Open in Playground, and links and refs of
session models."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from streamlit.testing.v1 import AppTest
from test_app import APP, needs_sample, ok

import qcore
from pages import cache
from pages.query import parse_query
from qcore.config import Settings
from qcore.refs import DatasetRef, ModelRef, session_model_name, state_sha256

PAGE = "pages/views/finetune.py"
TITLE = "Fine-tune"


def open_finetune(**query: str) -> AppTest:
    """The app on the Fine-tune page (settings from the link, as the Playground's)."""
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params.update(query)
    at.run()
    return at.switch_page(PAGE).run()


def table_rows(at: AppTest) -> dict[str, dict]:
    (df,) = [d.value for d in at.dataframe]
    return {row["model"].split(" (")[0]: row for row in df.to_dict("records")}


@needs_sample
def test_page_renders_the_playground_setting_and_waits_for_train() -> None:
    at = open_finetune(model="digits-mlp", dataset="digits", bits="2")
    ok(at, TITLE)
    text = " ".join(m.value for m in at.markdown)
    assert "**W2A32** · 2 bits · clip 1 · symmetric · per-tensor · prune 0" in text
    assert "press **Train**" in at.info[0].value
    train_n = len(qcore.load_dataset("digits", "train").y)
    assert f"{train_n:,} training images" in at.info[0].value
    assert not at.get("plotly_chart") and not at.dataframe
    assert at.button(key="ft_stop").disabled and not at.button(key="ft_train").disabled


@needs_sample
def test_float_setting_and_gradual_without_pruning_are_sentences() -> None:
    at = open_finetune(model="digits-mlp", dataset="digits", bits="float")
    at.button(key="ft_train").click().run()
    assert not at.exception
    assert "nothing for training to recover" in at.error[0].value
    assert "ft_job" not in at.session_state
    at = open_finetune(model="digits-mlp", dataset="digits", bits="2")
    at.radio(key="ft_schedule").set_value("gradual")
    at.button(key="ft_train").click().run()
    assert not at.exception
    assert at.error[0].value.startswith("A gradual prune schedule needs a pruning rate above 0")


@needs_sample
def test_train_one_epoch_then_open_the_session_model_in_the_playground() -> None:
    at = open_finetune(model="digits-mlp", dataset="digits", bits="2")
    at.button(key="ft_train").click().run()
    ok(at, TITLE)
    ft = qcore.FinetuneConfig()  # the page's defaults: one epoch, lr 1e-3, batch 64, seed 0
    rows = table_rows(at)
    assert list(rows) == ["float", "post-training", "fine-tuned"]
    # the post-training row is the Playground's own cached number; the float one the model's
    post = cache.results(ModelRef("digits-mlp"), DatasetRef("digits"), Settings(bits=2))
    assert rows["post-training"]["accuracy"] == pytest.approx(post.accuracy * 100)
    assert rows["float"]["accuracy"] == pytest.approx(post.float_accuracy * 100)
    assert rows["float"]["size_bytes"] == post.float_size_bytes
    assert rows["post-training"]["size_bytes"] == post.size_bytes
    # the fine-tuned accuracy is the page's own run, recomputed here from the same seed
    key = (ModelRef("digits-mlp"), DatasetRef("digits"), Settings(bits=2).canonical(), ft)
    outcome = at.session_state["finetune_runs"][key]  # kept in the session, by this key
    assert not outcome.result.stopped
    again = qcore.finetune(
        qcore.load_model("digits-mlp"), qcore.load_dataset("digits", "train"),
        Settings(bits=2).to_config(), ft, calib=qcore.load_dataset("digits", "calib"),
    )  # fmt: skip
    again_comp = qcore.compress(again.model, Settings(bits=2).to_config())
    test = qcore.load_dataset("digits", "test")
    assert qcore.evaluate(again_comp.model, test).accuracy == outcome.accuracy
    assert rows["fine-tuned"]["accuracy"] == pytest.approx(outcome.accuracy * 100)
    # training keeps the number of weights and their bits; the bytes are the same unless an
    # encoding that depends on the values (zeros stored sparsely) changes: the page says which
    ft_size = again_comp.size_bytes
    assert rows["fine-tuned"]["size_bytes"] == ft_size == outcome.size_bytes
    captions = " ".join(c.value for c in at.caption)
    if ft_size == post.size_bytes:
        assert f"are the same size, {ft_size:,} bytes" in captions
    else:
        assert f"The fine-tuned file is {ft_size:,} bytes against {post.size_bytes:,}" in captions
    assert again.history["loss"].equals(outcome.result.history["loss"])
    # the curves: loss and accuracy traces over every step of the epoch
    (fig,) = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    names = [t["name"] for t in fig["data"]]
    assert names[:2] == ["loss", "training batches"]
    steps = math.ceil(len(qcore.load_dataset("digits", "train").y) / ft.batch_size)
    assert fig["layout"]["xaxis"]["range"] == [0, steps] == [0, outcome.result.history.step.max()]
    (download,) = at.get("download_button")
    assert "fine-tuned" in download.proto.label

    at.button(key="ft_open").click().run()
    ok(at)  # the Playground
    name = at.session_state["model"]
    sha = state_sha256(outcome.result.model)
    assert name == session_model_name(sha) and name.startswith("ft-")
    assert at.session_state["bits"] == 2 and at.session_state["dataset"] == "digits"
    picker = at.sidebar.selectbox(key="model_picker")
    assert picker.value == name
    assert f"{name} (this session)" in picker.options
    caption = " ".join(c.value for c in at.sidebar.caption)
    assert "A model of this session: digits-mlp fine-tuned on digits at W2A32" in caption
    assert "1 epoch, lr 0.001, batch 64, seed 0" in caption
    # the Playground's accuracy is computed from the session model: the fine-tuned one
    (acc,) = [m.value for m in at.metric if m.label.startswith("Accuracy")]
    assert acc == f"{outcome.accuracy:.1%}"
    # compared with the model it came from (issue 18 item 5), its own float labelled so
    base = cache.float_metrics(ModelRef("digits-mlp"), DatasetRef("digits")).accuracy
    (card,) = [m for m in at.metric if m.label.startswith("Accuracy")]
    d = round((outcome.accuracy - base) * 100, 1)
    assert card.delta == (f"{d:+.1f} pts vs digits-mlp" if d else "±0.0 pts vs digits-mlp")
    assert any(f"the model it was fine-tuned from: {base:.1%} in float. This fine-tuned "
               f"model's own weights, unquantized: {outcome.float_accuracy:.1%}." in c.value
               for c in at.caption)  # fmt: skip
    assert not any("Float model:" in c.value for c in at.caption)
    # its link cannot carry it: a fresh session warns and falls back to the default model
    assert at.query_params["model"] == name


@needs_sample
def test_a_session_models_link_falls_back_with_a_warning() -> None:
    name = "ft-0123456789ab"
    values, ignored = parse_query(
        {"model": name, "bits": "4"}, models=qcore.list_models(),
        datasets=qcore.list_datasets(), layer_names=lambda m: [],
    )  # fmt: skip
    assert "model" not in values and values["bits"] == 4
    assert ignored == [f"`model={name}` (a model made in another session: a link cannot carry it)"]
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update({"model": name, "bits": "4"})
    at.run()
    assert not at.exception
    assert at.session_state["model"] == "mnist-cnn"
    assert "a model made in another session" in at.warning[0].value


def test_session_model_refs_round_trip_and_refuse_a_wrong_name() -> None:
    model = torch.nn.Linear(3, 2)
    sha = state_sha256(model)
    ref = ModelRef(session_model_name(sha), sha256=sha)
    assert ModelRef.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref
    assert ref.to_dict() == {"name": "ft-" + sha[:12], "sha256": sha}
    assert ModelRef("mnist-cnn").to_dict() == {"name": "mnist-cnn"}
    with pytest.raises(ValueError, match="named 'ft-"):
        ModelRef("ft-000000000000", sha256=sha)
    with pytest.raises(ValueError, match="only that session holds it"):
        ref.load()
    with pytest.raises(ValueError, match="no longer holds it"):
        cache.get_model(ref)  # nobody holds it
    held = cache.hold_session_model(ref, model)
    assert cache.get_model(ref) is held is model
    # the same content held again is the one module
    twin = torch.nn.Linear(3, 2)
    twin.load_state_dict(model.state_dict())
    assert cache.hold_session_model(ref, twin) is model


# --- pages.progress.Job: the background run behind the live curves and Stop -----------------


def _count_until_stopped(limit: int, *, progress, should_stop) -> int:
    """Report one row per step until stopped or at ``limit``; return the steps done."""
    done = 0
    while done < limit and not should_stop():
        done += 1
        progress(done, limit, {"step": done, "loss": 1.0 / done})
        time.sleep(0.002)
    return done


def test_job_streams_rows_in_order_and_stops_between_steps() -> None:
    from pages.progress import Job, watch

    job = Job("key", _count_until_stopped, 10**6)
    seen: list[int] = []
    while len(job.rows) < 5:  # it runs on its own thread
        time.sleep(0.001)
    job.stop()
    watch(job, lambda j: seen.append(len(j.snapshot())), every_s=0.001)
    steps = job.result()
    assert job.stopping and not job.running and 5 <= steps < 10**6
    assert [r["step"] for r in job.rows] == list(range(1, steps + 1))  # every step, in order
    assert job.done == steps and job.total == 10**6
    assert seen and seen[-1] == steps == sorted(seen)[-1]  # the last draw saw every row


def test_job_finishes_and_hands_back_its_error() -> None:
    from pages.progress import Job, watch

    job = Job("key", _count_until_stopped, 7)
    watch(job, lambda j: None, every_s=0.001)
    assert job.result() == 7 and not job.stopping and len(job.rows) == 7

    def refuse(*, progress, should_stop):
        raise ValueError("Fine-tune on a train split, not on the 'test' split.")

    bad = Job("key", refuse)
    watch(bad, lambda j: None, every_s=0.001)
    with pytest.raises(ValueError, match="train split"):
        bad.result()
