"""Per-session state: defaults filled once (from the link where it is valid), the
Playground's settings as widget values, the hand-off between pages, and the last run of
each analysis page.

The Playground's widgets keep their values in ``st.session_state`` under the same plain
keys as the URL query (``bits``, ``clip``, ...; ``bits`` and ``abits`` are ``"float"``
for None and ``layers`` a list), so a link restores the page. The analysis pages' widgets
have keys of their own (:data:`ANALYSIS_DEFAULTS`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar

import streamlit as st

import qcore
from pages.cache import (
    hold_session_dataset,
    hold_session_model,
    hold_uploaded_model,
    layer_names,
    removable_blocks,
    upload_held,
)
from pages.query import DEFAULT_MODEL, parse_query
from qcore.config import FLOAT, Settings
from qcore.refs import DatasetRef, ModelRef, session_model_name, state_sha256

ANALYSIS_DEFAULTS: dict[str, Any] = {  # widget values of the analysis pages
    "to_bits": [2, 3, 4, 6, 8],
    "to_prune": [0.0, 0.5],
    "to_clips": [1.0],
    "to_symmetric": [True],
    "to_per_channel": [False],
    "to_abits": [FLOAT],
    "to_rounding": ["nearest"],
    "to_equalize": [False],
    "to_bias_correction": [False],
    "sens_bits": [2, 3, 4, 5, 6, 7, 8],
    "sens_prune": [0.25, 0.5, 0.75, 0.9],
    "sens_per_channel": False,
    "mp_bits": [2, 3, 4, 5, 6, 8],
    "mp_per_channel": False,
    # the Fine-tune page: qcore.FinetuneConfig's defaults
    "ft_epochs": 1,
    "ft_lr": 1e-3,
    "ft_batch": 64,
    "ft_seed": 0,
    "ft_distill": False,
    "ft_temperature": 4.0,
    "ft_alpha": 0.5,
    "ft_grad_bits": FLOAT,
    "ft_schedule": "oneshot",
    "ft_learn_scales": False,
}

Choice = TypeVar("Choice")


# --- settings as widget values ----------------------------------------------------------------


def session_defaults(layer_names: Sequence[str]) -> dict[str, Any]:
    """Widget values (session-state form) of the default settings."""
    return settings_to_session(Settings(), layer_names)


def settings_to_session(s: Settings, layer_names: Sequence[str]) -> dict[str, Any]:
    """Settings as widget values: bits and abits ``"float"`` for None, layers as a list."""
    values = asdict(s)
    values["bits"] = FLOAT if s.bits is None else s.bits
    values["abits"] = FLOAT if s.abits is None else s.abits
    values["layers"] = list(layer_names) if s.layers is None else list(s.layers)
    values["layer_bits"] = tuple(s.layer_bits)
    values["drop"] = list(s.drop)
    return values


def settings_from_session(values: Mapping[str, Any], layer_names: Sequence[str]) -> Settings:
    """Settings from widget values; layers in model order, None when all are picked."""
    picked = set(values.get("layers", layer_names))
    layers = tuple(n for n in layer_names if n in picked)
    bits = values.get("bits", 8)
    abits = values.get("abits", FLOAT)
    overrides = {str(n): int(b) for n, b in values.get("layer_bits", ())}
    return Settings(
        bits=None if bits == FLOAT else int(bits),
        clip=float(values.get("clip", 1.0)),
        clip_mode=str(values.get("clip_mode", "ratio")),
        prune=float(values.get("prune", 0.0)),
        symmetric=bool(values.get("symmetric", True)),
        per_channel=bool(values.get("per_channel", False)),
        rounding=str(values.get("rounding", "nearest")),
        structured=bool(values.get("structured", False)),
        scope=str(values.get("scope", "layer")),
        fold_bn=bool(values.get("fold_bn", True)),
        layers=None if len(layers) == len(layer_names) else layers,
        layer_bits=tuple((n, overrides[n]) for n in layer_names if n in overrides),
        scale=str(values.get("scale", "float")),
        abits=None if abits in (FLOAT, None) else int(abits),
        aobs=str(values.get("aobs", "minmax")),
        codebook=str(values.get("codebook", "uniform")),
        entropy=str(values.get("entropy", "none")),
        drop=tuple(str(n) for n in values.get("drop", ())),
        equalize=bool(values.get("equalize", False)),
        bias_correction=bool(values.get("bias_correction", False)),
    )


# --- the session ------------------------------------------------------------------------------


def _default_model(models: Sequence[str]) -> str:
    return DEFAULT_MODEL if DEFAULT_MODEL in models else models[0]


def init_session() -> None:
    """Fill ``st.session_state`` once per session, from the URL query where it is valid.

    What the link set wrongly is kept in ``query_warnings`` for the page to show.
    """
    ss = st.session_state
    if "_initialised" in ss:
        return
    try:
        models = qcore.list_models()
    except ValueError as e:  # a corrupt manifest
        st.error(str(e))
        st.stop()
    if not models:
        st.error("No sample models were found. Run `python -m qcore train-samples` first.")
        st.stop()
    values, warnings = parse_query(
        st.query_params.to_dict(),
        models=models,
        datasets=qcore.list_datasets(),
        layer_names=_layer_names_or_empty,
        block_names=_block_names_or_empty,
        default_model=_default_model(models),
        check_fit=_check_fit,
    )
    model = values.get("model", _default_model(models))
    ss.update({k: v for k, v in session_defaults([]).items() if k != "layers"})
    ss["model"] = model
    ss["dataset"] = qcore.model_info(model).dataset
    ss.update(values)
    ss.update({k: list(v) if isinstance(v, list) else v for k, v in ANALYSIS_DEFAULTS.items()})
    ss["query_warnings"] = warnings
    ss["_initialised"] = True


def _check_fit(model_name: str, dataset_name: str) -> None:
    qcore.check_fit(qcore.model_info(model_name), qcore.dataset_info(dataset_name))


def _layer_names_or_empty(model_name: str) -> list[str]:
    try:
        return layer_names(ModelRef(model_name))
    except ValueError:  # the page reports why the model does not load
        return []


def _block_names_or_empty(model_name: str) -> list[str]:
    try:
        return list(removable_blocks(ModelRef(model_name)))
    except ValueError:  # the page reports why the model does not load
        return []


def ensure_layers(names: Sequence[str]) -> None:
    """Start the layer picker at "every layer" for a new model (or a new session)."""
    ss = st.session_state
    if "layers" not in ss or any(n not in names for n in ss["layers"]):
        ss["layers"] = list(names)


# --- models made in this session (fine-tuned) -------------------------------------------------
# Kept in st.session_state (per user): the module, its ModelRef (named by the SHA-256 of its
# state, so the shared caches key it by content), its manifest-like info and its origin.
# Everything that asks for "the current model" goes through model_names / model_info /
# model_ref below, so a session model works wherever a sample model does.

SESSION_MODELS = "session_models"  # st.session_state key: {name: SessionModel}


@dataclass(frozen=True, eq=False)
class SessionModel:
    """A model made in this session: the float module and where it came from."""

    ref: ModelRef  # ModelRef("ft-<12 hex>", sha256=...)
    info: qcore.ModelInfo  # as a sample's manifest entry: dataset, float accuracy, shape, ...
    origin: str  # e.g. "digits-mlp fine-tuned at 2 bits per-tensor, 1 epoch"
    module: Any  # float32, eval mode; shared read-only through pages.cache.get_model
    base: str = ""  # the model it was fine-tuned from ("" for an upload)


def session_models() -> dict[str, SessionModel]:
    """This session's models by name, oldest first."""
    return st.session_state.setdefault(SESSION_MODELS, {})


def model_names() -> list[str]:
    """The sample models, then this session's models."""
    return [*qcore.list_models(), *session_models()]


def model_info(name: str) -> qcore.ModelInfo:
    """``qcore.model_info`` for a sample model, the recorded info for a session model."""
    held = session_models().get(name)
    return held.info if held is not None else qcore.model_info(name)


def model_ref(name: str) -> ModelRef:
    """The cache key of a model: its name, or its name and SHA-256 for a session model."""
    held = session_models().get(name)
    return held.ref if held is not None else ModelRef(name)


def register_session_model(
    module: Any, *, base: str, dataset: str, float_accuracy: float, origin: str, recipe: str
) -> str:
    """Add ``module`` (a float model of ``base``'s architecture, eval mode) to this
    session's models; return its name. The same weights registered twice are one model."""
    sha = state_sha256(module)
    ref = ModelRef(session_model_name(sha), sha256=sha)
    held = session_models()
    if ref.name not in held:
        base_info = model_info(base)
        info = replace(
            base_info,
            name=ref.name,
            dataset=dataset,
            float_accuracy=float(float_accuracy),
            file="",  # not a file: it lives in this session
            sha256=sha,
            description=f"{origin}.",
            train_recipe=recipe,
        )
        module = hold_session_model(ref, module)
        held[ref.name] = SessionModel(ref=ref, info=info, origin=origin, module=module,
                                      base=base)
    return ref.name


def reference_model(name: str) -> str | None:
    """The model a fine-tuned session model came from, whose float accuracy is the one to
    compare it with; None for a sample or an uploaded model (its own float is the reference)."""
    held = session_models().get(name)
    return held.base if held is not None and held.base else None


def register_uploaded_model(uploaded: Any, float_accuracy: float) -> str:
    """Add a model whose weights were uploaded (a :class:`qcore.upload.UploadedModel`) to
    this session's models; return its name (``up-`` and 12 hex digits of its SHA-256). The
    same weights uploaded twice are one model; uploaded again as trained on another
    dataset, the model's record (its own dataset, float accuracy, file) is the new one."""
    ref = ModelRef(uploaded.name, sha256=uploaded.sha256)
    held = session_models()
    if ref.name in held and held[ref.name].info.dataset == uploaded.dataset:
        return ref.name
    # the file's name goes into markdown captions: only plain characters of it
    source = re.sub(r"[^\w.\- ]", "_", uploaded.filename)[:80] or "an uploaded file"
    origin = (f"weights uploaded from {source}, the {uploaded.arch} architecture on "
              f"{uploaded.dataset}")  # fmt: skip
    info = qcore.ModelInfo(
        name=ref.name,
        arch=uploaded.arch,
        dataset=uploaded.dataset,
        params=uploaded.params,
        float_accuracy=float(float_accuracy),
        input_shape=tuple(uploaded.module.qcore_spec["input_shape"]),
        num_classes=int(uploaded.module.qcore_spec["num_classes"]),
        file="",  # not a file on the server: it lives in this session
        sha256=uploaded.sha256,
        description=origin[0].upper() + origin[1:] + ".",
        train_recipe="uploaded",
    )
    # held within the process-wide budget for uploads (pages.cache), not by the session:
    # letting it go there must free its memory
    hold_uploaded_model(ref, uploaded.module)
    held[ref.name] = SessionModel(ref=ref, info=info, origin=origin, module=None)
    return ref.name


SESSION_DATA = "session_datasets"  # st.session_state key: {name: UploadRecord}
MAX_SESSION_DATASETS = 3  # uploads kept per session (all sessions' within one budget)


@dataclass(frozen=True)
class UploadRecord:
    """What a session keeps of an uploaded dataset: its name, hash and record. The images
    are held by pages.cache within the uploads' memory budget."""

    name: str  # "ud-" and 12 hex digits
    sha256: str
    info: qcore.DatasetInfo
    filename: str


def session_datasets() -> dict[str, UploadRecord]:
    """This session's uploaded datasets by name."""
    return st.session_state.setdefault(SESSION_DATA, {})


def forget_let_go() -> list[str]:
    """Drop this session's uploads (datasets, uploaded models) that the server let go to
    keep every session's uploads within its memory budget; return their names."""
    gone = [n for n, r in session_datasets().items() if not upload_held(r.sha256)]
    for name in gone:
        del session_datasets()[name]
    models = session_models()
    lost = [n for n, m in models.items()
            if m.info.train_recipe == "uploaded" and not upload_held(m.ref.sha256)]  # fmt: skip
    for name in lost:
        del models[name]
    return gone + lost


def dataset_names() -> list[str]:
    """The known datasets, then this session's uploaded ones."""
    return [*qcore.list_datasets(), *session_datasets()]


def dataset_info(name: str) -> qcore.DatasetInfo:
    """``qcore.dataset_info`` for a known dataset, the upload's record for an uploaded one."""
    held = session_datasets().get(name)
    return held.info if held is not None else qcore.dataset_info(name)


def dataset_ref(name: str, split: str = "test") -> DatasetRef:
    """The cache key of a dataset split: its name, and the file's SHA-256 if uploaded."""
    held = session_datasets().get(name)
    return DatasetRef(name, split, sha256=None if held is None else held.sha256)


def register_uploaded_dataset(uploaded: Any) -> str:
    """Add an uploaded dataset (a :class:`qcore.userdata.UploadedDataset`) to this session's
    datasets; return its name. The same file uploaded twice is one dataset."""
    held = session_datasets()
    if uploaded.name not in held:
        in_use = {st.session_state.get("dataset")} | {
            m.info.dataset for m in session_models().values()}  # fmt: skip
        spare = [n for n in held if n not in in_use]
        while len(held) >= MAX_SESSION_DATASETS and spare:  # bounded memory per session
            del held[spare.pop(0)]  # the oldest no page or model of this session uses
        hold_session_dataset(uploaded)
        held[uploaded.name] = UploadRecord(uploaded.name, uploaded.sha256, uploaded.info,
                                           uploaded.filename)  # fmt: skip
    return uploaded.name


def switch_model(name: str, dataset: str | None = None) -> None:
    """Make ``name`` the current model (on ``dataset``, else its own); every layer compressed.

    Call it from a widget callback: it resets the sidebar's model picker, which a script may
    not change once the picker is drawn.
    """
    ss = st.session_state
    ss["model"] = name
    ss["dataset"] = dataset if dataset is not None else model_info(name).dataset
    ss.pop("layers", None)  # ensure_layers picks all of the new model's layers
    ss["layer_bits"] = ()  # they name the old model's layers


# --- hand-off between pages -------------------------------------------------------------------


def open_in_playground(settings: Settings, layer_names: Sequence[str]) -> None:
    """Make ``settings`` the Playground's (its widgets read them on their next run)."""
    st.session_state.update(settings_to_session(settings, layer_names))


def playground_settings(layer_names: Sequence[str]) -> Settings:
    """The Playground's current settings (canonical), read from the session."""
    return settings_from_session(st.session_state, layer_names).canonical()


def mixed_settings(result: qcore.MixedPrecisionResult, layer_names: Sequence[str]) -> Settings:
    """The Playground settings that reproduce a mixed-precision choice: every layer's bits
    listed, in model order."""
    q = result.config
    s = Settings.from_config(qcore.CompressionConfig(quant=q), layer_names)
    return replace(s, layer_bits=tuple((n, q.bits_for(n)) for n in layer_names))


# --- the last run of an analysis page ---------------------------------------------------------


def last_run(
    key: str,
    model: ModelRef,
    data: DatasetRef,
    choice: Choice,
    *,
    run: bool,
    prompt: str,
    stale: str,
    check: Callable[[Choice], object] | None = None,
) -> Choice:
    """The choice of the page's last run on this model and dataset, kept under ``key``.

    A press of the page's button (``run``) records ``choice``, unless ``check(choice)``
    raises ValueError, which is shown as an error (the last good run stays). With no run
    for this model and dataset the page stops, after ``prompt`` (unless that error said
    what to do); when the run's choice differs from the widgets', ``stale`` says so above
    the results.
    """
    ss = st.session_state
    refused = False
    if run:
        try:
            if check is not None:
                check(choice)
            ss[key] = (model, data, choice)
        except ValueError as e:
            st.error(str(e))
            refused = True
    last = ss.get(key)
    if last is None or last[:2] != (model, data):
        if not refused:  # one message at a time: the error already says what to change
            st.info(prompt)
        st.stop()
    if last[2] != choice:
        st.caption(stale)
    return last[2]
