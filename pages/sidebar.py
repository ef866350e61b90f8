"""The shared sidebar: the model and dataset pickers, the upload of a user's own data and
weights, and the check every page starts with that the picked model and dataset load and
fit (with a download offer for a missing torchvision dataset, where the server allows it)."""

from __future__ import annotations

import os
import re

import streamlit as st

import qcore
from pages.cache import get_dataset, get_model
from pages.session import (
    dataset_info,
    dataset_names,
    dataset_ref,
    forget_let_go,
    model_info,
    model_names,
    model_ref,
    register_uploaded_dataset,
    register_uploaded_model,
    session_models,
    switch_model,
)
from qcore.config import parse_bool
from qcore.refs import DatasetRef, ModelRef
from qcore.upload import (
    MAX_UPLOAD_BYTES,
    MAX_UPLOAD_MB,
    WEIGHT_SUFFIXES,
    architectures,
    check_size,
    load_weights,
)
from qcore.userdata import load_npz

MODEL_PICKER, DATASET_PICKER = "model_picker", "dataset_picker"
# Whether a viewer may download a missing torchvision dataset into the server's data folder.
# Off unless set: a hosted server lets no viewer make it fetch and write; `make app` (a
# laptop) sets it to 1.
DOWNLOAD_ENV = "QP_ALLOW_DATA_DOWNLOAD"
LET_GO_NOTE = "uploads_let_go"  # st.session_state: this session's uploads the server let go
_AUTOLINK = re.compile(r"(?<=:)(?=//)|(?i:(?<=\bwww)(?=\.))|(?<=@)")  # where a link starts
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~$:=^])")


def data_download_allowed() -> bool:
    """``QP_ALLOW_DATA_DOWNLOAD``: true/1/yes/on allows it; unset, false/0/no/off and any
    value it cannot read leave it off (a typo must not open the data folder to viewers)."""
    raw = os.environ.get(DOWNLOAD_ENV, "").strip()
    try:
        return bool(raw) and parse_bool(raw)
    except ValueError:
        return False


def escape_markdown(text: str) -> str:
    r"""``text`` shown as it is by st.error and friends, which render markdown: a file name
    such as ``**x** [a](https://...) $$y$$.pt`` must not become bold text, a live link, a
    fetched image or KaTeX. Bare addresses get an invisible word joiner, which keeps the
    browser from making them links.

    >>> escape_markdown("**a** [b](c) $$d$$")
    '\\*\\*a\\*\\* \\[b\\]\\(c\\) \\$\\$d\\$\\$'
    """
    # backslashes stop markdown, not the links that GitHub-flavoured markdown makes of bare
    # addresses after parsing (https://..., www...., a@b.c): an invisible word joiner does
    text = _AUTOLINK.sub("\u2060", text)
    return _MARKDOWN.sub(r"\\\1", text)


def _forget_let_go() -> None:
    """Drop this session's uploads that the server let go (its uploads' memory budget), say
    so once, and leave a current model or dataset among them for one that is held."""
    gone = forget_let_go()
    if not gone:
        return
    ss = st.session_state
    ss[LET_GO_NOTE] = (
        f"{', '.join(gone)} {'was' if len(gone) == 1 else 'were'} let go to make room for "
        "newer uploads (this server keeps a fixed amount of uploads for all its users, the "
        "least recently used going first). Upload the file again to use it."
    )
    if ss["model"] in gone:
        ss.pop(MODEL_PICKER, None)
        switch_model(model_names()[0])
    if ss["dataset"] in gone:
        ss.pop(f"{DATASET_PICKER}:{ss['model']}", None)
        own = model_info(ss["model"]).dataset
        ss["dataset"] = own if own in dataset_names() else qcore.list_datasets()[0]


def _on_model_change() -> None:
    """A new model: its own dataset, and every layer of it compressed."""
    switch_model(st.session_state[MODEL_PICKER])


def _on_dataset_change() -> None:
    ss = st.session_state
    ss["dataset"] = ss[f"{DATASET_PICKER}:{ss['model']}"]


def _model_label(name: str) -> str:
    # short enough for the sidebar's picker; the caption below it tells the rest
    if name in session_models():
        return f"{name} (this session)"
    return f"{name} ({_count(model_info(name).params)})"


def _count(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.0f}k" if n >= 1e4 else (f"{n / 1e3:.1f}k" if n >= 1e3 else str(n))


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def fitting_datasets(model_name: str) -> tuple[list[str], list[str]]:
    """The datasets whose inputs and classes fit the model, and the others."""
    info = model_info(model_name)
    fits, others = [], []
    for name in dataset_names():
        try:
            qcore.check_fit(info, dataset_info(name))
            fits.append(name)
        except ValueError:
            others.append(name)
    return fits, others


def sidebar_pickers() -> None:
    """The model and dataset pickers (keys ``model``, ``dataset``), shared by every page."""
    # The pickers sit in app.py, outside the pages. Such a widget, when its value is set
    # through st.session_state, comes back as its first option after any other widget
    # changes (seen in the browser with Streamlit 1.67, not in AppTest). So the pickers
    # take their value from ``index`` under keys of their own, and copy it to "model" and
    # "dataset" when the user picks; the dataset picker's key names the model, so a new
    # model starts it afresh at that model's own dataset.
    ss = st.session_state
    _forget_let_go()
    if LET_GO_NOTE in ss:
        st.warning(escape_markdown(ss.pop(LET_GO_NOTE)), icon=":material/delete_sweep:")
    models = model_names()
    if ss["model"] not in models:  # never expected: a session model is kept for the session
        switch_model(models[0])
    st.selectbox(
        "Model",
        models,
        index=models.index(ss["model"]),
        key=MODEL_PICKER,
        format_func=_model_label,
        on_change=_on_model_change,
        help="The sample models, with their parameter counts, then the models made in this "
        "session (fine-tuned on the Fine-tune page, or uploaded below; a link cannot carry "
        "them).",
    )
    info = model_info(ss["model"])
    if ss["model"] in session_models():
        st.caption(
            f"A model of this session: {info.description} {info.params:,} parameters; "
            f"float accuracy {info.float_accuracy:.1%} on the {info.dataset} test split."
        )
    else:
        st.caption(
            f"{info.description} Trained on **{info.dataset}**; {info.params:,} parameters; "
            f"float accuracy {info.float_accuracy:.1%} on its test split."
        )
    datasets, others = fitting_datasets(ss["model"])
    if ss["dataset"] not in datasets:  # never offer a pick that cannot run
        datasets.append(ss["dataset"])
    st.selectbox(
        "Dataset",
        datasets,
        index=datasets.index(ss["dataset"]),
        key=f"{DATASET_PICKER}:{ss['model']}",
        on_change=_on_dataset_change,
        format_func=lambda n: f"{n} (the model's own)" if n == info.dataset else n,
        help="Accuracy is measured on this dataset's held-out test split. Only datasets "
        "with the model's input shape and classes are listed.",
    )
    st.caption(dataset_info(ss["dataset"]).description)
    if others:
        st.caption(
            f"Not listed: {', '.join(others)}; {ss['model']} takes "
            f"{_shape(info.input_shape)} images in {info.num_classes} classes."
        )


UPLOAD_ERROR = "upload_error"  # st.session_state: the last upload's refusal, shown once
UPLOADER = "upload_weights"  # the file uploader's key


def _arch_label(arch: str) -> str:
    samples = [i.name for i in qcore.models.read_manifest() if i.arch == arch]
    return f"{arch} (as {', '.join(samples)})" if samples else arch


def _on_upload() -> None:
    """Read the uploaded weights into a model of this session and switch to it; a refusal
    is kept for the panel to show. Runs again when the architecture or the dataset is
    changed, so a refusal that says to pick another one can be answered by picking it."""
    ss = st.session_state
    ss.pop(UPLOAD_ERROR, None)
    file = ss.get(UPLOADER)
    if file is None:  # no file yet, or it was removed from the uploader
        return
    arch, dataset = ss["upload_arch"], ss["upload_dataset"]
    try:
        check_size(file.size, repr(file.name))  # before reading it into memory
        uploaded = load_weights(file.getvalue(), arch, dataset_info(dataset),
                                filename=file.name)  # fmt: skip
        held = session_models().get(uploaded.name)
        if held is not None and held.info.dataset == dataset:  # measured already
            accuracy = held.info.float_accuracy
        else:
            test = get_dataset(dataset_ref(dataset))
            accuracy = qcore.evaluate(uploaded.module, test).accuracy
        name = register_uploaded_model(uploaded, accuracy)  # may be over the uploads' budget
    except qcore.DatasetNotFound as e:  # qcore's message is for a programmer
        ss[UPLOAD_ERROR] = (
            f"The weights fit, but the {e.name} dataset is not on this server, so their "
            "accuracy cannot be measured. Pick it as the Dataset above first (it can be "
            "downloaded there where the server allows), or pick another dataset."
        )
        return
    except ValueError as e:  # a refusal
        ss[UPLOAD_ERROR] = str(e)
        return
    switch_model(name, dataset)
    ss[MODEL_PICKER] = name  # a callback may set the picker: it is drawn after this


DATA_UPLOADER = "upload_data"  # the .npz uploader's key
DATA_ERROR = "upload_data_error"  # st.session_state: the last data upload's refusal
DATA_NOTE = "upload_data_note"  # st.session_state: what became of the accepted data
LAST_DATA = "upload_last_data"  # st.session_state: the dataset uploaded last


def _on_data_upload() -> None:
    """Read an uploaded .npz into a dataset of this session. When the current model takes
    its images, the dataset becomes the current one; either way it becomes the dataset that
    uploaded weights are said to be trained on."""
    ss = st.session_state
    ss.pop(DATA_ERROR, None)
    ss.pop(DATA_NOTE, None)
    file = ss.get(DATA_UPLOADER)
    if file is None:
        return
    try:
        check_size(file.size, repr(file.name), "data files")  # before reading it
        uploaded = load_npz(file.getvalue(), filename=file.name)
        name = register_uploaded_dataset(uploaded)  # may be over the uploads' budget
    except ValueError as e:
        ss[DATA_ERROR] = str(e)
        return
    # weights trained on it are the likely next upload
    ss[LAST_DATA] = name
    ss["upload_dataset"] = name
    info = uploaded.info
    what = (f"{name}: {info.splits[0][1]:,} train, {info.splits[1][1]:,} calib and "
            f"{info.splits[2][1]:,} test images of {_shape(info.input_shape)}, "
            f"{info.num_classes} classes")  # fmt: skip
    try:
        qcore.check_fit(model_info(ss["model"]), info)
    except ValueError:
        ss[DATA_NOTE] = (f"Added {what}. The current model takes other images: upload "
                         "weights trained on it below, or pick a model that fits.")  # fmt: skip
        return
    ss["dataset"] = name
    ss[f"{DATASET_PICKER}:{ss['model']}"] = name  # a callback may set it: drawn after this
    ss[DATA_NOTE] = f"Added {what}; it is the current dataset."


def data_panel() -> None:
    """Bring your own data: images and labels in a .npz file, split and normalised like the
    embedded sets. Held in this session only."""
    ss = st.session_state
    with st.expander("Upload your own data", icon=":material/dataset:",
                     expanded=DATA_ERROR in ss or DATA_NOTE in ss):  # fmt: skip
        st.caption(
            "Images and labels saved with `numpy.savez(path, x=images, y=labels)`: x is "
            "(N, H, W), (N, C, H, W) or (N, H, W, C), uint8 or floats in [0, 1]; y holds "
            "class numbers 0..K-1. Split 70/10/20 % into train, calib and test, by class."
        )
        st.file_uploader(
            "Data file",
            type=["npz"],
            key=DATA_UPLOADER,
            on_change=_on_data_upload,
            max_upload_size=MAX_UPLOAD_MB,  # the browser's cap is qcore's
            help=f"At most {MAX_UPLOAD_BYTES:,} bytes.",
        )
        if DATA_ERROR in ss:  # the file's name is in it: shown as typed, never as markdown
            st.error(escape_markdown(ss.pop(DATA_ERROR)))
        elif DATA_NOTE in ss:
            st.success(escape_markdown(ss.pop(DATA_NOTE)))


def upload_panel() -> None:
    """Bring your own model: weights for one of the sample architectures, trained on any of
    the datasets (which sets the input shape and classes). Held in this session only."""
    ss = st.session_state
    with st.expander("Upload your own weights", icon=":material/upload_file:",
                     expanded=UPLOAD_ERROR in ss):  # fmt: skip
        st.caption(
            "Weights you trained for one of the sample architectures: a state dict saved as "
            "safetensors or with torch.save. Nothing in the file is run; the model stays in "
            "this session only."
        )
        archs, datasets = architectures(), dataset_names()
        current = model_info(ss["model"])  # the pickers start at the current model's
        st.selectbox(
            "Architecture",
            list(archs),
            index=list(archs).index(current.arch) if current.arch in archs else 0,
            key="upload_arch",
            format_func=_arch_label,
            on_change=_on_upload,
            help="Build it for training with `qcore.models.build_model(arch, (C, H, W), "
            "classes)` and save `model.state_dict()`.\n\n"
            + "\n\n".join(f"**{a}**: {d}" for a, d in archs.items()),
        )
        if ss.get("upload_dataset") not in datasets:  # an upload this session let go
            ss.pop("upload_dataset", None)
        trained_on = ss.get(LAST_DATA) if ss.get(LAST_DATA) in datasets else current.dataset
        st.selectbox(
            "Trained on",
            datasets,
            index=datasets.index(trained_on) if trained_on in datasets else 0,
            key="upload_dataset",
            on_change=_on_upload,
            help="Sets the input shape and the number of classes; the float accuracy is "
            "measured on this dataset's test split.",
        )
        st.file_uploader(
            "Weights file",
            type=[s.lstrip(".") for s in WEIGHT_SUFFIXES],
            key=UPLOADER,
            on_change=_on_upload,
            max_upload_size=MAX_UPLOAD_MB,  # the browser's cap is qcore's
            help=f"At most {MAX_UPLOAD_BYTES:,} bytes.",
        )
        if UPLOAD_ERROR in ss:  # the file's name is in it: shown as typed, never as markdown
            st.error(escape_markdown(ss.pop(UPLOAD_ERROR)))


def require_model_and_dataset() -> tuple[ModelRef, DatasetRef]:
    """The picked model and dataset, loaded and checked to fit; else an error and stop."""
    ss = st.session_state
    model_name, dataset_name = ss["model"], ss["dataset"]
    try:
        # whether it fits is known without the data, so a dataset that cannot run is never
        # offered for download
        qcore.check_fit(model_info(model_name), dataset_info(dataset_name))
        get_model(model_ref(model_name))
        get_dataset(dataset_ref(dataset_name))
    except qcore.DatasetNotFound as e:
        # the link names what was picked, so a shared link opens this same choice
        _keep_url_true(model_name, dataset_name)
        # qcore's message is for a programmer (root=, download=True, the server's folder)
        if data_download_allowed():
            st.error(
                f"The {e.name} dataset is not on this server yet. Download it with the "
                "button below (once; it is kept for every later visit), or pick another "
                "dataset in the sidebar."
            )
            _download_button(e.name)
        else:
            st.error(
                f"The {e.name} dataset is not on this server, and downloading it from this "
                "page is turned off here. Pick another dataset in the sidebar, or ask "
                "whoever runs the server to add it."
            )
        st.stop()
    except ValueError as e:
        st.error(escape_markdown(str(e)))
        st.stop()
    return model_ref(model_name), dataset_ref(dataset_name)


def _keep_url_true(model_name: str, dataset_name: str) -> None:
    """Write the picked model and dataset to the URL even though the page stops before its
    own settings are written: the link must never name the dataset picked before."""
    q = st.query_params
    if q.get("model") != model_name or q.get("dataset") != dataset_name:
        q.update({"model": model_name, "dataset": dataset_name})


def _download_button(name: str) -> None:
    """Offer to fetch a torchvision dataset into the data folder, then show the page."""
    if not st.button(f"Download {name}", key=f"download_{name}", icon=":material/download:"):
        return
    try:
        with st.spinner(f"Downloading {name}…", show_time=True):
            qcore.load_dataset(name, "test", download=True)
    except ValueError:  # qcore's sentence may name the folder or the network's error
        st.error(
            f"Downloading {name} failed; the server may have no internet connection. Pick "
            "another dataset in the sidebar, or ask whoever runs the server to add it."
        )
        return
    st.rerun()
