"""The URL query: a link restores a page, and the page keeps its link current.

The query holds ``model``, ``dataset`` and the flat compression settings
(``Settings.to_flat``: ``bits``, ``clip``, ``clip_mode``, ``prune``, ...). The settings are
parsed by qcore (:func:`qcore.config.parse_flat`, the mapping the command line shares);
this module adds the model and dataset, and the session-state form of the values.
:func:`parse_query` is pure and unit-tested.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import streamlit as st

from qcore.config import FLOAT, SETTING_KEYS, parse_flat

DEFAULT_MODEL = "mnist-cnn"  # the model a link without ``model=`` opens
QUERY_KEYS: tuple[str, ...] = ("model", "dataset", *SETTING_KEYS)


def parse_query(
    params: Mapping[str, str | Sequence[str]],
    *,
    models: Sequence[str],
    datasets: Sequence[str],
    layer_names: Callable[[str], Sequence[str]],
    default_model: str = DEFAULT_MODEL,
) -> tuple[dict[str, Any], list[str]]:
    """Validate a URL query; return the valid values (session-state form) and warnings.

    Only keys present and valid appear in the result; each bad or unknown one adds a
    warning sentence, and the caller keeps the default for it. ``layer_names(model)`` is
    called only when the link names layers.
    """
    flat = {k: v if isinstance(v, str) else (v[-1] if len(v) else "") for k, v in params.items()}
    values: dict[str, Any] = {}
    warnings = [
        f"The link has an unknown setting `{key}`; it was ignored."
        for key in flat
        if key not in QUERY_KEYS
    ]

    def bad(key: str, raw: str, expected: str) -> None:
        warnings.append(f"The link's `{key}={raw}` is not valid ({expected}); using the default.")

    raw = flat.get("model")
    if raw is not None:
        if raw in models:
            values["model"] = raw
        else:
            bad("model", raw, "known models: " + ", ".join(models))
    model = values.get("model", default_model)

    raw = flat.get("dataset")
    if raw is not None:
        if raw in datasets:
            values["dataset"] = raw
        else:
            bad("dataset", raw, "known datasets: " + ", ".join(datasets))

    settings = {k: v for k, v in flat.items() if k in SETTING_KEYS}
    names = layer_names(model) if {"layers", "layer_bits"} & settings.keys() else ()
    parsed, more = parse_flat(settings, names, model=model, source="link")
    warnings += more
    if "bits" in parsed and parsed["bits"] is None:
        parsed["bits"] = FLOAT  # the bit-width slider's value for float
    if "layers" in parsed:
        parsed["layers"] = list(parsed["layers"])  # the layer picker's value
    values.update(parsed)
    return values, warnings


def show_query_warnings() -> None:
    """Show (once) the warnings about bad values in the link the session opened with."""
    for w in st.session_state.pop("query_warnings", []):
        st.warning(w, icon="⚠️")


def sync_query(page_params: Mapping[str, str]) -> None:
    """Write model, dataset and ``page_params`` to the URL, so it can always be shared."""
    ss = st.session_state
    want = {"model": ss["model"], "dataset": ss["dataset"], **page_params}
    if st.query_params.to_dict() != want:
        st.query_params.from_dict(want)
