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
from qcore.refs import DATA_PREFIX, SESSION_PREFIXES

DEFAULT_MODEL = "mnist-cnn"  # the model a link without ``model=`` opens
COMPARE_KEY = "a"  # the pinned setting A of compare mode: its flat settings, URL-encoded
QUERY_KEYS: tuple[str, ...] = ("model", "dataset", *SETTING_KEYS, COMPARE_KEY)
SHOWN_CHARS = 40  # a link's key or value is quoted at most this long
SHOWN_ITEMS = 10  # the query warning lists at most this many ignored settings


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` as a link quotes it: printable, no backticks (it sits in a code span),
    at most ``limit`` characters, then "…".

    >>> shown("0.5"), shown("x" * 50, 5), shown("a`b\\n")
    ('0.5', 'xxxx…', "a'b?")
    """
    clean = "".join(c if c.isprintable() else "?" for c in text).replace("`", "'")
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


def parse_query(
    params: Mapping[str, str | Sequence[str]],
    *,
    models: Sequence[str],
    datasets: Sequence[str],
    layer_names: Callable[[str], Sequence[str]],
    default_model: str = DEFAULT_MODEL,
    check_fit: Callable[[str, str], None] | None = None,
    block_names: Callable[[str], Sequence[str]] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Validate a URL query; return the valid values (session-state form) and what was
    ignored.

    Only keys present and valid appear in the result; each bad one adds an item
    (``"`key=value` (what it must be)"``, key and value cut short by :func:`shown`), then
    each unknown one, and the caller keeps the default for it. ``layer_names(model)`` is
    called only when the link names layers; ``check_fit(model, dataset)`` raises
    ValueError when a linked dataset cannot run on the model; ``block_names(model)``, the
    removable blocks, only when the link removes some.
    """
    flat = {k: v if isinstance(v, str) else (v[-1] if len(v) else "") for k, v in params.items()}
    values: dict[str, Any] = {}
    ignored: list[str] = []

    def bad(key: str, raw: str, expected: str) -> None:
        ignored.append(f"`{key}={shown(raw)}` ({expected})")

    raw = flat.get("model")
    if raw is not None:
        if raw in models:
            values["model"] = raw
        elif raw.startswith(SESSION_PREFIXES):  # fine-tuned or uploaded: its session alone has it
            bad("model", raw, "a model made in another session: a link cannot carry it")
        else:
            bad("model", raw, "known models: " + ", ".join(models))
    model = values.get("model", default_model)

    raw = flat.get("dataset")
    if raw is not None:
        if raw not in datasets and raw.startswith(DATA_PREFIX):  # uploaded in a session
            bad("dataset", raw, "a dataset uploaded in another session: a link cannot carry it")
        elif raw not in datasets:
            bad("dataset", raw, "known datasets: " + ", ".join(datasets))
        else:
            try:
                if check_fit is not None:
                    check_fit(model, raw)
                values["dataset"] = raw
            except ValueError as e:
                bad("dataset", raw, f"it does not fit {model}: {e}; its own dataset is used")

    if COMPARE_KEY in flat:  # read by pages.compare against the model's layers
        values["compare_a_link"] = flat[COMPARE_KEY]
    settings = {k: v for k, v in flat.items() if k in SETTING_KEYS}
    names = layer_names(model) if {"layers", "layer_bits"} & settings.keys() else ()
    blocks = block_names(model) if block_names is not None and "drop" in settings else None
    parsed, sentences = parse_flat(settings, names, model=model, source="link", blocks=blocks)
    ignored += [_short_sentence(w, settings) for w in sentences]
    # unknown keys last: a mistyped value of a known setting matters more than junk
    ignored += [f"`{shown(key)}` (unknown setting)" for key in flat if key not in QUERY_KEYS]
    for key in ("bits", "abits"):
        if key in parsed and parsed[key] is None:
            parsed[key] = FLOAT  # the bit-width sliders' value for float
    for key in ("layers", "drop"):
        if key in parsed:
            parsed[key] = list(parsed[key])  # the pickers' value
    values.update(parsed)
    return values, ignored


def _short_sentence(sentence: str, settings: Mapping[str, str]) -> str:
    """qcore's ``The link's `key=raw` is not valid (expected); using the default.`` as an
    item with the value cut short; any other sentence cut to a few lines."""
    middle, tail = "` is not valid (", "); using the default."
    for key, raw in settings.items():
        # qcore quotes the value itself cut short, so match around it
        if (sentence.startswith(f"The link's `{key}=") and sentence.endswith(tail)
                and middle in sentence):
            expected = sentence.rsplit(middle, 1)[1][: -len(tail)]
            return f"`{key}={shown(raw)}` ({expected})"
    return shown(sentence, 300)


def query_warning(ignored: Sequence[str], limit: int = SHOWN_ITEMS) -> str:
    """One warning for everything a link set that was ignored: at most ``limit`` items,
    then how many more."""
    lines = [f"- {item}" for item in ignored[:limit]]
    if len(ignored) > limit:
        lines.append(f"- … and {len(ignored) - limit} more")
    what = "a setting" if len(ignored) == 1 else "settings"
    return (
        f"The link has {what} this app cannot use; the defaults are used instead:\n\n"
        + "\n".join(lines)
    )


def show_query_warnings() -> None:
    """Show (once) one warning about what the link the session opened with set wrongly."""
    ignored = st.session_state.pop("query_warnings", [])
    if ignored:
        st.warning(query_warning(ignored), icon=":material/link_off:")


def sync_query(page_params: Mapping[str, str]) -> None:
    """Write model, dataset and ``page_params`` to the URL, so it can always be shared."""
    ss = st.session_state
    want = {"model": ss["model"], "dataset": ss["dataset"], **page_params}
    if st.query_params.to_dict() != want:
        st.query_params.from_dict(want)
