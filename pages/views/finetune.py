"""Fine-tune: train with the Playground's compression in the loop and see the accuracy that
training buys back, live."""

import itertools
import json
import math

import pandas as pd
import streamlit as st

import qcore
from pages import cache, figures, jobs, tables
from pages.progress import Job, watch
from pages.query import sync_query
from pages.session import (
    dataset_ref,
    model_ref,
    open_in_playground,
    playground_settings,
    register_session_model,
    switch_model,
)
from pages.sidebar import MODEL_PICKER, require_model_and_dataset
from qcore.config import FLOAT, Settings
from qcore.refs import DatasetRef, ModelRef

JOB = "ft_job"  # st.session_state key: the session's training run (one at a time)
ERROR = "ft_error"  # st.session_state key: what the Train button refused, for the page
OPEN = "ft_open_playground"  # st.session_state key: Open in Playground was pressed
LR_OPTIONS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
BATCH_OPTIONS = (16, 32, 64, 128, 256)
GRAD_BITS_OPTIONS = (2, 3, 4, 6, 8, 16, FLOAT)  # as Bit width: float32 at the right end
MAX_EPOCHS_HERE = 20  # the page's limit; qcore's own is higher (the command line)
# below this many steps a run at lr 1e-3 barely moves (2-bit digits-mlp: 20 steps an epoch)
FEW_STEPS = 100
SCHEDULE_HELP = (
    "How the pruning rate is reached. **oneshot**: the Playground's masks from the start. "
    "**gradual**: the rate rises from 0 along Zhu & Gupta's cubic schedule over the first "
    "three quarters of the steps, the masks recomputed by magnitude on the way."
)


def _finetune_ui() -> qcore.FinetuneConfig:
    """The training widgets (keys ``ft_*``, defaults in pages.session); raises ValueError
    with a sentence for a bad value."""
    c1, c2, c3, c4 = st.columns(4)
    epochs = c1.number_input("Epochs", 1, MAX_EPOCHS_HERE, step=1, key="ft_epochs",
                             help="Passes over the training split.")  # fmt: skip
    lr = c2.select_slider("Learning rate", LR_OPTIONS, key="ft_lr", format_func=lambda v: f"{v:g}",
                          help="Peak Adam learning rate, decayed to 0 along a cosine.")  # fmt: skip
    batch = c3.select_slider("Batch size", BATCH_OPTIONS, key="ft_batch",
                             help="Training images per step.")  # fmt: skip
    grad_bits = c4.select_slider(
        "Gradient bits", GRAD_BITS_OPTIONS, key="ft_grad_bits",
        format_func=lambda v: "float32" if v == FLOAT else f"{v} bits",
        help="Quantize every gradient to this many bits (one scale per tensor, stochastic "
        "rounding) before the optimizer step, as low-precision training does.",
    )  # fmt: skip
    d1, d2, d3, d4 = st.columns(4)
    distill = d1.toggle(
        "Distillation", key="ft_distill",
        help="Learn from the float model's soft outputs as well as the labels: loss = "
        "alpha·T²·KL(teacher/T ‖ student/T) + (1 − alpha)·cross-entropy.",
    )  # fmt: skip
    temperature = d2.slider(
        "Temperature T", 1.0, 10.0, step=0.5, key="ft_temperature", disabled=not distill,
        help="Softens both output distributions in the distillation term.",
    )  # fmt: skip
    alpha = d3.slider("Distillation weight alpha", 0.0, 1.0, step=0.05, key="ft_alpha",
                      disabled=not distill,
                      help="0: cross-entropy only; 1: the distillation term only.")  # fmt: skip
    schedule = d4.radio("Prune schedule", ("oneshot", "gradual"), key="ft_schedule",
                        horizontal=True, help=SCHEDULE_HELP)  # fmt: skip
    with st.expander("More options"):
        e1, e2 = st.columns(2)
        seed = e1.number_input("Seed", 0, 2**32 - 1, step=1, key="ft_seed",
                               help="Shuffling and stochastic rounding; the same seed gives "
                               "the same curves.")  # fmt: skip
        learn_scales = e2.toggle("Learn the scales (LSQ)", key="ft_learn_scales",
                                 help="Learn each layer's quantization step by gradient "
                                 "(Esser et al., 2020) instead of choosing it from the "
                                 "weights at every step.")  # fmt: skip
    del epochs, lr, batch, grad_bits, temperature, alpha, schedule, seed, learn_scales
    return _finetune_config(st.session_state)


def _finetune_config(values) -> qcore.FinetuneConfig:
    """The fine-tuning config of the widget values (``ft_*`` keys)."""
    g = values["ft_grad_bits"]
    return qcore.FinetuneConfig(
        epochs=int(values["ft_epochs"]), lr=float(values["ft_lr"]),
        batch_size=int(values["ft_batch"]), seed=int(values["ft_seed"]),
        distill=bool(values["ft_distill"]), temperature=float(values["ft_temperature"]),
        alpha=float(values["ft_alpha"]), grad_bits=None if g == FLOAT else int(g),
        prune_schedule=str(values["ft_schedule"]), learn_scales=bool(values["ft_learn_scales"]),
    )  # fmt: skip


def _check_choice(settings: Settings, ft: qcore.FinetuneConfig) -> None:
    """Raise ValueError with a sentence for a setting that fine-tuning cannot use."""
    if settings.to_config().keeps_float:  # after the Playground's own checks
        raise ValueError(
            "The Playground's setting leaves the model in float32 (no bits, no pruning, float "
            "activations, no block removed), so there is nothing for training to recover. "
            "Pick a bit width, a pruning rate or a block to remove on the Playground first."
        )
    if ft.prune_schedule == "gradual" and settings.prune == 0:
        raise ValueError(
            "A gradual prune schedule needs a pruning rate above 0; the Playground's setting "
            "prunes nothing. Pick oneshot, or set a pruning rate on the Playground."
        )


def _origin(base: str, data: DatasetRef, settings: Settings, ft: qcore.FinetuneConfig,
            stopped_at: tuple[int, int] | None) -> str:  # fmt: skip
    """Where a fine-tuned model comes from, in words (the sidebar's caption)."""
    parts = [f"{ft.epochs} epoch{'s' if ft.epochs != 1 else ''}", f"lr {ft.lr:g}",
             f"batch {ft.batch_size}", f"seed {ft.seed}"]  # fmt: skip
    if ft.distill:
        parts.append(f"distilled (T {ft.temperature:g}, alpha {ft.alpha:g})")
    if ft.grad_bits is not None:
        parts.append(f"{ft.grad_bits}-bit gradients")
    if settings.prune > 0:
        parts.append(f"{ft.prune_schedule} pruning")
    if ft.learn_scales:
        parts.append("learned scales")
    text = (f"{base} fine-tuned on {data.name} at {settings.wa_label()} "
            f"({settings.label()}): {', '.join(parts)}")  # fmt: skip
    if stopped_at is not None:
        text += f"; stopped after step {stopped_at[0]} of {stopped_at[1]}"
    return text


def _open(outcome: cache.FinetuneOutcome, model: ModelRef, data: DatasetRef,
          settings: Settings, layer_names: list[str], origin: str) -> None:  # fmt: skip
    """Make the fine-tuned model one of this session's and the Playground's current model
    (a callback: the sidebar's picker may only be reset before it is drawn)."""
    name = register_session_model(
        outcome.result.model, base=model.name, dataset=data.name,
        float_accuracy=outcome.float_accuracy, origin=origin,
        recipe=json.dumps(outcome.result.ft.to_dict()),
    )  # fmt: skip
    switch_model(name, data.name)
    open_in_playground(settings, layer_names)  # the same layers: the same architecture
    # the sidebar's picker shows the new model (its index says so too: see pages.sidebar)
    st.session_state[MODEL_PICKER] = name
    st.session_state[OPEN] = True  # the page switches at its top: the model is new now


def _planned_steps(data: DatasetRef, ft: qcore.FinetuneConfig) -> int:
    """Steps of a run: epochs times the batches of the train split."""
    return ft.epochs * math.ceil(len(cache.train_dataset(data).y) / ft.batch_size)


def _start() -> None:
    """The Train button: start the run in the background. A callback, so that the buttons
    are drawn with Stop on in the same run; it reads the widgets' values as they are now."""
    ss = st.session_state
    try:
        model, data = model_ref(ss["model"]), dataset_ref(ss["dataset"])
        settings = playground_settings(cache.layer_names(model))
        ft = _finetune_config(ss)
        _check_choice(settings, ft)
        key = (model, data, settings, ft)
        if cache.finished_finetune(key) is None and not (JOB in ss and ss[JOB].running):
            # a worker process (pages.jobs), or a thread here for uploaded data
            ss[JOB] = jobs.start_finetune(key, model, data, settings, ft)
    except ValueError as e:
        ss[ERROR] = str(e)


def _stop() -> None:
    job = st.session_state.get(JOB)
    if job is not None:
        job.stop()


if st.session_state.pop(OPEN, False):
    st.switch_page("pages/views/playground.py")
st.title("Fine-tune")
model, data = require_model_and_dataset()
sync_query({})
layer_names = cache.layer_names(model)
settings = playground_settings(layer_names)
wa = settings.wa_label(layer_names)  # what is stored: per-layer bits read as they are
st.caption(
    "Post-training compression rounds a trained model's weights once; below 3 or 4 bits that "
    "costs accuracy. Fine-tuning trains with the compression in the forward pass (the "
    "straight-through estimator lets the gradient through the rounding), so the weights "
    f"learn to work on the grid. It trains on the {data.name} train split, reports on its "
    "calibration split while training, and measures on its test split at the end. The "
    "model in the sidebar is never changed: the result is a new model."
)
st.markdown(
    f"Starting from the Playground's setting: **{wa}** · {settings.label()}"
)

try:
    ft = _finetune_ui()
except ValueError as e:
    st.error(str(e))
    st.stop()
steps = _planned_steps(data, ft)
few = steps < FEW_STEPS
st.caption(
    f"{steps:,} steps in all ({ft.epochs} × {steps // ft.epochs:,} batches of {ft.batch_size})."
    + (" That is few for the weights to move far: more epochs train further, or a learning "
       "rate of 3e-3 (at 1e-2 training was measured worse at 2 bits; see the README)."
       if few else "")
)  # fmt: skip
ss = st.session_state
key = (model, data, settings, ft)
b1, b2, _ = st.columns([1, 1, 4])
running = JOB in ss and ss[JOB].running
b1.button("Train", key="ft_train", type="primary", icon=":material/model_training:",
          disabled=running, on_click=_start)  # fmt: skip
b2.button("Stop", key="ft_stop", icon=":material/stop:", disabled=not running, on_click=_stop,
          help="End training after this batch; the model as it is then is shown.")  # fmt: skip
if ERROR in ss:
    st.error(ss.pop(ERROR))
    st.stop()

job: Job | None = ss.get(JOB)
if job is not None and job.running:
    total_planned = _planned_steps(job.key[1], job.key[3])
    live = st.container()
    bar = live.progress(0.0)
    chart = live.empty()
    draws = itertools.count()

    def draw(j: Job) -> None:
        total = j.total or total_planned
        ahead = getattr(j, "ahead", None)  # a job in the pool waits for a worker first
        if ahead is not None:
            what = f"Waiting for a worker ({ahead} ahead)…"
        elif getattr(j, "starting", False):  # the worker loads the model and the data
            what = "Starting a worker…"
        elif j.done >= total:  # the worker now compresses the model and evaluates it
            what = "Trained; measuring on the test split…"
        else:
            what = "Stopping after this batch…" if j.stopping else "Training…"
        bar.progress(min(j.done / max(total, 1), 1.0), text=f"{what} step {j.done} of {total}")
        chart.plotly_chart(
            figures.training_curves(pd.DataFrame(j.snapshot()), total_steps=total,
                                    title="Training (live)"),
            key=f"ft_live_chart_{next(draws)}",  # one key per redraw: a run's keys are unique
        )  # fmt: skip

    watch(job, draw)
    st.rerun()  # the buttons again, drawn as they are now (Train on, Stop off), then the results
if job is not None and not job.running:
    try:
        finished = job.result()
    except ValueError as e:
        ss.pop(JOB, None)
        st.error(str(e))
        st.stop()
    if not finished.result.stopped:
        cache.keep_finetune(job.key, finished)
        ss.pop(JOB, None)
    elif job.key != key:  # a stopped run of another choice is not shown again
        ss.pop(JOB, None)

outcome = cache.finished_finetune(key)
if outcome is None and job is not None and job.key == key and not job.running:
    outcome = job.result()  # stopped early: shown, not kept
if outcome is None:
    st.info(
        f"Choose the training and press **Train** ({model.name} on {data.name}, "
        f"{len(cache.train_dataset(data).y):,} training images)."
    )
    st.stop()

# --- the result -------------------------------------------------------------------------------
res = outcome.result
hist = res.history
steps = int(hist["step"].max()) if len(hist) else 0
if res.stopped:
    st.warning(f"Stopped after step {steps}: the results below are of the model at that step.")
try:
    post = cache.results(model, data, settings)  # the Playground's own numbers
except ValueError as e:
    st.error(str(e))
    st.stop()
same_size = outcome.size_bytes == post.size_bytes
gain = tables.points_delta(outcome.accuracy, post.accuracy, "post-training")
c1, c2, c3 = st.columns(3)
c1.metric("Accuracy, fine-tuned", f"{outcome.accuracy:.1%}", border=True,
          delta=gain.text, delta_color=gain.color, delta_arrow=gain.arrow,
          help=f"Simulated top-1 on the {outcome.n:,} test images of {data.name}, the "
          "fine-tuned weights compressed with the same setting.")  # fmt: skip
post_change = tables.points_delta(post.accuracy, post.float_accuracy, "float")
c2.metric("Accuracy, post-training", f"{post.accuracy:.1%}", border=True,
          delta=post_change.text, delta_color=post_change.color, delta_arrow=post_change.arrow,
          help="The same setting applied to the model without training (the Playground's "
          "number).")  # fmt: skip
c3.metric("Packed size", tables.format_bytes(outcome.size_bytes), border=True,
          delta="same as post-training" if same_size else
          f"{outcome.size_bytes - post.size_bytes:+,} B vs post-training",
          delta_color="off", delta_arrow="off",
          help=f"{outcome.size_bytes:,} bytes of packed export.")  # fmt: skip

table = pd.DataFrame([
    {"model": f"float ({model.name})", "accuracy": post.float_accuracy * 100,
     "size_bytes": post.float_size_bytes, "stored as": "float32"},
    {"model": "post-training", "accuracy": post.accuracy * 100,
     "size_bytes": post.size_bytes, "stored as": f"packed, {wa}"},
    {"model": "fine-tuned", "accuracy": outcome.accuracy * 100,
     "size_bytes": outcome.size_bytes, "stored as": f"packed, {wa}"},
])  # fmt: skip
st.dataframe(
    table,
    hide_index=True,
    key="ft_table",
    column_config={
        "model": st.column_config.TextColumn("model"),
        "accuracy": st.column_config.NumberColumn(
            "accuracy, test split", format="%.1f %%",
            help=f"Top-1 on the {outcome.n:,} test images (simulated for the packed ones).",
        ),
        "size_bytes": st.column_config.NumberColumn("packed bytes", format="localized"),
        "stored as": st.column_config.TextColumn("stored as"),
    },
)  # fmt: skip
if same_size:
    st.caption(
        f"Post-training and fine-tuned files are the same size, {post.size_bytes:,} bytes: "
        "training changes the weights' values, not how many there are or how they are stored."
    )
else:
    st.caption(
        f"The fine-tuned file is {outcome.size_bytes:,} bytes against "
        f"{post.size_bytes:,} post-training: training moved some weights to or from the zero "
        "code, and a sparse encoding stores zeros in fewer or more bytes."
    )
st.caption(
    f"Trained for {steps} step{'s' if steps != 1 else ''} in {res.seconds:.1f} s. The "
    f"fine-tuned float model, before compression, gets {outcome.float_accuracy:.1%}."
)
st.plotly_chart(
    figures.training_curves(hist, total_steps=steps or None,
                            title=f"Training curves ({wa})"),
    key="ft_curves",
)  # fmt: skip

stopped_at = (steps, _planned_steps(data, res.ft)) if res.stopped else None
origin = _origin(model.name, data, settings, res.ft, stopped_at)
d1, d2 = st.columns(2)
d1.download_button(
    "Download the fine-tuned packed model",
    data=outcome.packed_bytes,
    file_name=f"{model.name}-{settings.slug()}-finetuned.qpk",
    mime="application/octet-stream",
    on_click="ignore",
    key="ft_download",
    icon=":material/download:",
    help=f"Exactly {outcome.size_bytes:,} bytes of payload plus a small JSON "
    "header; load it with qcore.load_packed.",
)
d2.button(
    "Open in Playground",
    key="ft_open",
    icon=":material/open_in_new:",
    on_click=_open,
    args=(outcome, model, data, settings, layer_names, origin),
    help="Add the fine-tuned model to this session's models (the sidebar lists it) and show "
    "it on the Playground with the same setting.",
)
