"""Robustness: does clipping and quantizing make a model sturdier? Accuracy against the
strength of a perturbation, for the float model, the Playground's setting and pinned ones."""

from __future__ import annotations

from urllib.parse import parse_qsl

import pandas as pd
import streamlit as st

from pages import cache, controls, figures, jobs, tables
from pages.cache import RobustnessParams
from pages.query import sync_query
from pages.session import last_run, playground_settings
from pages.sidebar import require_model_and_dataset
from qcore.config import Settings
from qcore.robustness import INPUT_PERTURBATIONS, parse_strengths, strength_unit

DEFAULT_STRENGTHS = {
    "gaussian": "0 0.25 0.5 1",
    "fgsm": "0 0.05 0.1 0.2",
    "pgd": "0 0.05 0.1 0.2",
    "weight_noise": "0 0.1 0.2 0.4",
    "bitflip": "0 0.0001 0.001 0.01",
}
NAMES = {
    "gaussian": "Gaussian input noise",
    "fgsm": "FGSM",
    "pgd": "PGD",
    "weight_noise": "Weight noise",
    "bitflip": "Bit flips",
}
IMAGE_LIMITS = (100, 250, 500, 1000)  # and the whole test split
GRID_IMAGES = 8
MAX_PINS = 4
FLOAT = Settings(bits=None).canonical()


def parse_pin(text: str, layer_names: list[str], model: str) -> Settings:
    """A pinned setting from flat text such as ``bits=4&clip=0.5`` (a link's query)."""
    flat = dict(parse_qsl(text.strip().lstrip("?"), keep_blank_values=True))
    if not flat:
        raise ValueError("Write a setting to pin, e.g. bits=4&clip=0.5 (the Playground link's "
                         "part after the ?).")  # fmt: skip
    settings, warnings = Settings.from_flat(flat, layer_names, model=model, source="pin")
    if warnings:
        raise ValueError(" ".join(warnings))
    settings = settings.canonical()
    settings.to_config()
    return settings


st.title("Robustness")
model, data = require_model_and_dataset()
sync_query({})
ds = cache.get_dataset(data)
std = ", ".join(f"{s:g}" for s in ds.std)
st.caption(
    "Does clipping and quantizing make a model sturdier? Each curve is the accuracy on "
    f"the {data.name} test split (simulated, fake-quant) as a perturbation grows. "
    "**Gaussian**: noise of that standard deviation added to the normalised input "
    f"(pixel in [0, 1] − mean) / std, std {std}, then clamped to the valid pixel range. "
    "**FGSM / PGD**: white-box attacks computed against each model itself, epsilon in "
    "pixel units (0.1 = a tenth of black-to-white per pixel), inputs kept in the valid "
    "range; PGD starts at a random point and takes several steps. **Weight noise**: every "
    "weight times (1 + s·N(0, 1)), mean of 3 draws. **Bit flips**: that fraction of the "
    "stored bits flipped at random (b bits per quantized weight, the 32 bits of each "
    "float32 word for the float model), mean of 3 draws; a NaN or infinite output counts "
    "as wrong."
)

layer_names = cache.layer_names(model)
ss = st.session_state
ss.setdefault("rb_pins", [])

with st.container(border=True):
    picked = st.multiselect(
        "Perturbations", list(NAMES), default=["gaussian", "fgsm"], key="rb_perturbations",
        format_func=NAMES.__getitem__,
    )  # fmt: skip
    cols = st.columns(max(len(picked), 1))
    texts = {}
    for col, p in zip(cols, picked, strict=False):
        texts[p] = col.text_input(
            f"{NAMES[p]} strengths", value=DEFAULT_STRENGTHS[p], key=f"rb_strengths_{p}",
            help=f"{figures.ROBUST_TITLES[p]}: {strength_unit(p)}. Numbers separated by spaces.",
        )  # fmt: skip
    c1, c2 = st.columns(2)
    limits = [n for n in IMAGE_LIMITS if n < len(ds.y)] + [len(ds.y)]  # the last: all
    if ss.get("rb_limit") not in limits:  # a new session, or a smaller test split
        ss["rb_limit"] = limits[min(2, len(limits) - 1)]
    n_images = c1.selectbox(
        "Test images", limits, key="rb_limit",
        format_func=lambda n: f"all {n:,}" if n == len(ds.y) else f"first {n:,}",
        help="Input perturbations run every image through the model once per strength, "
        "PGD once per step: fewer images are faster.",
    )  # fmt: skip
    limit = None if n_images >= len(ds.y) else int(n_images)
    steps = 10  # PGD's default, unused by the other perturbations
    if "pgd" in picked:  # shown only where it does something
        steps = c2.number_input("PGD steps", 1, 50, 10, key="rb_steps", persist_state="session")

    current = playground_settings(layer_names)
    p1, p2, p3 = st.columns([3, 1, 1], vertical_alignment="bottom")
    pin_text = p1.text_input(
        "Pin a setting", placeholder="bits=4&clip=0.5", key="rb_pin_text",
        help="Flat settings as in a Playground link; the pinned curves are drawn beside "
        "the float model and the Playground's setting.",
    )  # fmt: skip
    if p2.button("Pin", key="rb_pin"):
        try:
            s = parse_pin(pin_text, layer_names, model.name)
            if s not in ss["rb_pins"] and len(ss["rb_pins"]) < MAX_PINS:
                ss["rb_pins"] = [*ss["rb_pins"], s]
        except ValueError as e:
            st.error(str(e))
    if p3.button("Pin current", key="rb_pin_current",
                 help="Pin the Playground's current setting."):  # fmt: skip
        if current not in ss["rb_pins"] and len(ss["rb_pins"]) < MAX_PINS:
            ss["rb_pins"] = [*ss["rb_pins"], current]
    if ss["rb_pins"]:
        st.caption("Pinned: " + " | ".join(s.label() for s in ss["rb_pins"]))
        if st.button("Clear pins", key="rb_clear"):
            ss["rb_pins"] = []
            st.rerun()
    run = st.button("Run", type="primary", key="rb_run", icon=":material/play_arrow:")


def _choice() -> tuple:
    params = tuple(
        RobustnessParams(p, parse_strengths(p, texts[p], NAMES[p]), limit, int(steps))
        for p in picked
    )
    if not params:
        raise ValueError("Pick at least one perturbation.")
    variants = [FLOAT, current, *ss["rb_pins"]]
    unique = tuple(dict.fromkeys(variants))
    for s in unique:
        s.to_config()
    return params, unique


try:
    choice = _choice()
except ValueError as e:
    choice = None
    if run:
        st.error(str(e))
        run = False
params, variants = last_run(
    "robustness_last", model, data, choice, run=run,
    prompt=f"Choose perturbations and strengths and press **Run** ({model.name} on "
    f"{data.name}). The float model and the Playground's setting "
    f"({current.label()}) are compared.",
    stale="The curves below are of the last run; press **Run** for the choice above.",
)  # fmt: skip


def _label(s: Settings) -> str:
    return "float32" if s == FLOAT else s.label()


try:
    # every curve (a table, or a sentence for one that cannot be drawn), in a worker's job
    results = jobs.run_robustness(model, data, variants, params, restart=run)
except ValueError as e:
    st.error(str(e))
    st.stop()
for prm in params:
    curves = {_label(s): results[prm, s] for s in variants}
    error = next((c for c in curves.values() if isinstance(c, str)), None)
    if error is not None:
        st.error(error)
        continue
    first = next(iter(curves.values()))
    st.subheader(NAMES[prm.perturbation])
    st.markdown(f"**{tables.robustness_summary(curves, prm.perturbation)}**")
    st.plotly_chart(
        figures.robustness_curves(curves, prm.perturbation, first.attrs["unit"]),
        key=f"rb_chart_{prm.perturbation}",
    )
    st.caption(f"{int(first['n'].iloc[0]):,} test images of {data.name}" + (
        f"; PGD with {prm.steps} steps" if prm.perturbation == "pgd" else "") + (
        "; bars: lowest and highest of the draws" if prm.perturbation in
        ("weight_noise", "bitflip") else ""))  # fmt: skip
    with st.expander("The rows"):
        table = pd.concat(
            [df.assign(variant=label) for label, df in curves.items()], ignore_index=True
        )
        st.dataframe(table, hide_index=True, key=f"rb_table_{prm.perturbation}")

inputs = [p for p in params
          if p.perturbation in INPUT_PERTURBATIONS and any(s > 0 for s in p.strengths)]
target = variants[1] if len(variants) > 1 else FLOAT
if inputs:
    st.subheader("What the perturbed images look like")
    g1, g2 = st.columns(2)
    names = [p.perturbation for p in inputs]
    if ss.get("rb_grid_perturbation") not in names:  # the run's choice changed
        ss["rb_grid_perturbation"] = names[0]
    which = g1.selectbox("Perturbation", names, format_func=NAMES.__getitem__,
                         key="rb_grid_perturbation")  # fmt: skip
    prm = next(p for p in inputs if p.perturbation == which)
    levels = [s for s in prm.strengths if s > 0]
    if ss.get(f"rb_grid_strength_{which}") not in levels:
        ss[f"rb_grid_strength_{which}"] = levels[len(levels) // 2]
    strength = g2.select_slider("Strength", levels, key=f"rb_grid_strength_{which}")
    try:
        grid = cache.perturbed_images(model, data, target, which, strength, GRID_IMAGES,
                                      prm.steps)  # fmt: skip
    except ValueError as e:
        st.error(str(e))
        st.stop()
    attacked = "the same noise for both" if which == "gaussian" else (
        f"the attack computed against {_label(target)}; the float model sees the same image")
    st.caption(f"The first {GRID_IMAGES} test images, {NAMES[which]} at {strength:g} "
               f"({attacked}). Under each: true class · float32's answer · "
               f"the answer of {_label(target)}.")  # fmt: skip
    images = controls.display_images(grid.images, ds.mean, ds.std)
    cols = st.columns(GRID_IMAGES)
    for i, col in enumerate(cols):
        col.image(images[i], width="content")
        col.caption(f"true {grid.truth[i]} · float {grid.float_pred[i]} · "
                    f"comp. {grid.compressed_pred[i]}")  # fmt: skip
